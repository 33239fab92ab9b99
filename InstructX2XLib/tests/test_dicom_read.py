import numpy as np
import pytest
from dicom_factory import dcmtk_compress, make_radiograph, pydicom_data_file, write
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from instructx2x import read_image
from instructx2x.dicom import DicomReadError, read_dicom

RG1 = pydicom_data_file("RG1_UNCR.dcm")


def test_real_cr_monochrome1_is_inverted_and_windowed():
    image = read_dicom(RG1)
    stored = image.dicom_source().stored
    assert image.pixels.shape == (1955, 1841) and image.bits == 15
    assert image.transforms == ["VOI window 0: center 15000 width 30000 LINEAR", "MONOCHROME1 inverted"]
    # MONOCHROME1: the highest stored value is the darkest display value
    assert image.pixels.flat[stored.argmax()] == image.pixels.min()
    assert np.array_equal(image.dicom_source().mapping.inverse(image.pixels), stored)
    assert "PixelData" not in image.dicom_source().dataset
    assert image.dicom_source().pixel_spacing is None  # RG1 stores PixelSpacing 0\\0: no spacing
    assert read_image(RG1).format == "dicom"


@pytest.mark.parametrize("kind", ["CR", "DX", "DXP", "SC"])
def test_supported_kinds(tmp_path, kind):
    image = read_dicom(write(make_radiograph(kind), tmp_path / "x.dcm"))
    assert image.pixels.shape == (72, 64) and 0 <= image.pixels.min() < image.pixels.max() <= 1


def test_pixel_spacing_prefers_calibrated_values(tmp_path):
    ds = make_radiograph("DX")
    first = read_dicom(write(ds, tmp_path / "a.dcm")).dicom_source().pixel_spacing
    assert first is not None and first.attribute == "ImagerPixelSpacing"
    ds.PixelSpacing = [0.18, 0.19]
    spacing = read_dicom(write(ds, tmp_path / "b.dcm")).dicom_source().pixel_spacing
    assert spacing is not None and spacing.to_dict() == {
        "attribute": "PixelSpacing",
        "row_mm": 0.18,
        "column_mm": 0.19,
    }


def test_the_source_kept_for_the_export_is_a_record_and_only_dicom_has_one(tmp_path):
    import dataclasses

    from PIL import Image

    from instructx2x.dicom.read import PixelSpacing
    from instructx2x.errors import ParameterError

    ds = make_radiograph("DX")
    image = read_dicom(write(ds, tmp_path / "a.dcm"))
    source = image.dicom_source()
    assert source is image.dicom
    assert source.sop_instance_uid == str(ds.SOPInstanceUID) and source.warnings == ()
    assert source.dataset.StudyInstanceUID == ds.StudyInstanceUID and "PixelData" not in source.dataset
    assert source.stored.shape == image.pixels.shape and source.transfer_syntax == str(
        ds.file_meta.TransferSyntaxUID
    )
    assert source.pixel_spacing == PixelSpacing("ImagerPixelSpacing", *map(float, ds.ImagerPixelSpacing))
    with pytest.raises(dataclasses.FrozenInstanceError):
        source.stored = None  # type: ignore[misc, assignment]  # the point: it is read-only
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(tmp_path / "film.png")
    film = read_image(tmp_path / "film.png")
    assert film.dicom is None
    with pytest.raises(ParameterError, match="film.png was not read from DICOM"):
        film.dicom_source()


def test_rescale_window_and_signed_values(tmp_path):
    ds = make_radiograph(rescale=(2.0, -1000.0), window=(3000.0, 6000.0), signed=True, bits_stored=12)
    image = read_dicom(write(ds, tmp_path / "x.dcm"))
    stored = image.dicom_source().stored
    assert stored.dtype == np.int16 and stored.min() < 0
    assert "rescale slope 2 intercept -1000" in image.transforms
    expected = np.clip(((stored * 2.0 - 1000.0) - (3000 - 0.5)) / (6000 - 1) + 0.5, 0, 1)
    assert np.allclose(image.pixels, expected, atol=1e-6)


def test_voi_choices(tmp_path):
    ds = make_radiograph(window=None)
    ds.WindowCenter, ds.WindowWidth = [1000.0, 3000.0], [500.0, 2000.0]
    path = write(ds, tmp_path / "x.dcm")
    assert "center 1000" in read_dicom(path).transforms[0]
    assert "center 3000" in read_dicom(path, voi=1).transforms[0]
    full = read_dicom(path, voi="minmax")
    assert full.pixels.min() == 0 and full.pixels.max() == 1
    with pytest.raises(DicomReadError, match="voi index 5"):
        read_dicom(path, voi=5)
    no_window = read_dicom(write(make_radiograph(window=None), tmp_path / "y.dcm"))
    assert no_window.transforms[0].startswith("minmax")


def test_voi_lut_sequence(tmp_path):
    from pydicom import Dataset

    ds = make_radiograph(window=None, bits_stored=8)
    item = Dataset()
    item.add_new(0x00283002, "US", [256, 0, 8])  # LUTDescriptor
    item.add_new(0x00283006, "US", [int(v) for v in np.minimum(np.arange(256) * 2, 255)])
    ds.VOILUTSequence = [item]
    image = read_dicom(write(ds, tmp_path / "x.dcm"))
    stored = image.dicom_source().stored
    assert image.transforms == ["VOI LUT 0"]
    assert np.allclose(image.pixels, np.minimum(stored.astype(int) * 2, 255) / 255.0)


@pytest.mark.parametrize(
    "syntax", [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless, JPEG2000Lossless]
)
def test_lossless_transfer_syntaxes_decode_exactly(tmp_path, syntax):
    ds = make_radiograph()
    reference = read_dicom(write(ds, tmp_path / "plain.dcm"))
    if syntax in (RLELossless, JPEG2000Lossless):
        ds.compress(syntax)
    else:
        ds.file_meta.TransferSyntaxUID = syntax
    image = read_dicom(write(ds, tmp_path / "x.dcm"))
    assert image.dicom_source().transfer_syntax == syntax
    assert np.array_equal(image.dicom_source().stored, reference.dicom_source().stored)


@pytest.mark.parametrize(
    "tool,options,lossless",
    [
        ("dcmcjpeg", ["+e1"], False),  # JPEG baseline (process 1), 8 bit
        ("dcmcjpeg", ["+el"], True),  # JPEG lossless (process 14, SV1)
        ("dcmcjpls", ["+el"], True),  # JPEG-LS lossless
    ],
)
def test_jpeg_family_through_installed_decoders(tmp_path, tool, options, lossless):
    ds = make_radiograph(bits_stored=8, window=None)
    plain = write(ds, tmp_path / "plain.dcm")
    compressed = dcmtk_compress(plain, tmp_path / "c.dcm", tool, *options)
    image = read_dicom(compressed)
    original = read_dicom(plain).dicom_source().stored.astype(int)
    difference = np.abs(image.dicom_source().stored.astype(int) - original)
    assert difference.max() == 0 if lossless else difference.mean() < 3


def test_lateral_and_ap_views_warn(tmp_path, caplog):
    lateral = read_dicom(write(make_radiograph(view="LL"), tmp_path / "l.dcm"))
    assert "lateral view" in lateral.dicom_source().warnings[0]
    ap = read_dicom(write(make_radiograph(view="AP"), tmp_path / "patient_smith.dcm"))
    assert "AP view" in ap.dicom_source().warnings[0]
    assert "AP view" in caplog.text and "PHANTOM" not in caplog.text and "smith" not in caplog.text


def test_non_chest_body_part_is_refused_unless_overridden(tmp_path):
    path = write(make_radiograph(body_part="KNEE"), tmp_path / "knee.dcm")
    with pytest.raises(DicomReadError, match="'KNEE', not a chest"):
        read_dicom(path)
    assert read_dicom(path, allow_non_chest=True).dicom_source().warnings


def _without(keyword):
    ds = make_radiograph()
    delattr(ds, keyword)
    return ds


def _with(**attributes):
    ds = make_radiograph()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: make_radiograph("SR"), "Comprehensive SR|Enhanced SR|SR"),
        (lambda: _without("PixelData"), "no pixel data"),
        (lambda: _without("BitsStored"), "BitsStored"),
        (lambda: _with(NumberOfFrames=2), "multi-frame"),
        (lambda: _with(PhotometricInterpretation="RGB"), "grayscale radiograph"),
        (lambda: _with(SamplesPerPixel=3), "grayscale radiograph"),
        (lambda: _with(Rows=20000, Columns=20000), "outside the supported size"),
        (lambda: _with(Rows=4), "outside the supported size"),
        (lambda: _with(WindowWidth=0.5), "window width"),
        (lambda: _with(VOILUTFunction="LOG"), "LOG"),
    ],
)
def test_bad_datasets_are_refused_with_the_reason(tmp_path, build, match):
    path = write(build(), tmp_path / "bad.dcm")
    with pytest.raises(DicomReadError, match=match) as error:
        read_dicom(path)
    assert "PHANTOM" not in str(error.value) and "Test^Phantom" not in str(error.value)


def test_truncated_and_non_dicom_files(tmp_path):
    good = write(make_radiograph(), tmp_path / "good.dcm")
    (tmp_path / "cut.dcm").write_bytes(good.read_bytes()[:-2000])
    with pytest.raises(DicomReadError, match="pixel data"):
        read_dicom(tmp_path / "cut.dcm")
    (tmp_path / "text.dcm").write_text("not dicom at all")
    with pytest.raises(DicomReadError, match="not a DICOM file|cannot parse"):
        read_dicom(tmp_path / "text.dcm")
    with pytest.raises(FileNotFoundError):
        read_dicom(tmp_path / "missing.dcm")


def test_undecodable_transfer_syntax(tmp_path):
    ds = make_radiograph()
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2 video
    ds["PixelData"].VR = "OB"
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([b"\x00" * 64])
    path = write(ds, tmp_path / "mpeg.dcm")
    with pytest.raises(DicomReadError, match="MPEG2"):
        read_dicom(path)
