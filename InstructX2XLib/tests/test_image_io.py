import numpy as np
import pytest
from PIL import Image

from instructx2x.image_io import ImageReadError, read_image, read_mask


def test_png_8_and_16_bit(tmp_path):
    Image.fromarray(np.tile(np.array([0, 255], np.uint8), 128).reshape(16, 16)).save(tmp_path / "a.png")
    eight = read_image(tmp_path / "a.png")
    assert eight.bits == 8 and eight.pixels.dtype == np.float32 and eight.pixels.max() == 1.0
    values = np.linspace(0, 65535, 256).astype(np.uint16).reshape(16, 16)
    Image.fromarray(values).save(tmp_path / "b.png")
    sixteen = read_image(tmp_path / "b.png")
    assert sixteen.bits == 16
    assert np.allclose(sixteen.pixels, values / 65535.0)
    assert len(sixteen.sha256) == 64 and sixteen.source == "b.png"


def test_gray_rgb_is_lossless_and_colour_is_converted_with_a_note(tmp_path):
    gray = np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8)
    Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / "g.png")
    assert np.array_equal(read_image(tmp_path / "g.png").pixels, gray / np.float32(255))
    colour = np.zeros((16, 16, 3), np.uint8)
    colour[..., 0] = 200
    Image.fromarray(colour).save(tmp_path / "c.png")
    assert "luminance" in read_image(tmp_path / "c.png").transforms[0]


def test_jpeg(tmp_path):
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(tmp_path / "x.jpg")
    assert read_image(tmp_path / "x.jpg").format == "jpeg"


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(ImageReadError, match="not a supported image"):
        read_image(tmp_path / "text.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "t.png")
    (tmp_path / "trunc.png").write_bytes((tmp_path / "t.png").read_bytes()[:40])
    with pytest.raises(ImageReadError, match="cannot decode"):
        read_image(tmp_path / "trunc.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "tiny.png")
    with pytest.raises(ImageReadError, match="too small"):
        read_image(tmp_path / "tiny.png")
    Image.fromarray(np.zeros((16, 16, 2), np.uint8)[..., 0]).convert("CMYK").save(tmp_path / "k.jpg")
    with pytest.raises(ImageReadError, match="CMYK"):
        read_image(tmp_path / "k.jpg")


def test_mask_must_match(tmp_path):
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png", (16, 16)).dtype == bool
    with pytest.raises(ImageReadError, match="16x16 but the image is 20x16"):
        read_mask(tmp_path / "m.png", (20, 16))


def test_masks_from_npy_and_single_slice_nrrd(tmp_path):
    import nrrd

    from instructx2x.image_io import read_mask

    region = np.zeros((30, 20), np.uint8)
    region[5:15, 2:9] = 1
    np.save(tmp_path / "m.npy", region)
    nrrd.write(str(tmp_path / "m.nrrd"), region[None], index_order="C")  # one slice, as Slicer saves
    for name in ("m.npy", "m.nrrd"):
        assert np.array_equal(read_mask(tmp_path / name, (30, 20)), region > 0)
    nrrd.write(str(tmp_path / "vol.nrrd"), np.zeros((3, 30, 20), np.uint8), index_order="C")
    with pytest.raises(ValueError, match="one slice"):
        read_mask(tmp_path / "vol.nrrd", (30, 20))
    (tmp_path / "bad.nrrd").write_bytes(b"NRRD0004\ngarbage")
    with pytest.raises(ValueError, match="cannot read it"):
        read_mask(tmp_path / "bad.nrrd", (30, 20))
