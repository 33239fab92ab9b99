import pytest
import torch

from instructx2x.loading import ModelLoadError, hash_modules, load_pipeline
from instructx2x.untrained import build_untrained_pipeline

from conftest import generator


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """The tiny model in the authors' released layout (a diffusers folder)."""
    directory = tmp_path_factory.mktemp("models") / "Ix2x_V1_4500"
    build_untrained_pipeline(seed=3).save_pretrained(directory)
    return directory


def test_directory_round_trip_gives_identical_edits(saved_model, xray):
    in_memory = build_untrained_pipeline(seed=3)
    loaded, info = load_pipeline(saved_model)
    assert info.name == "Ix2x_V1_4500" and info.source == "directory" and info.trained
    assert len(info.sha256) == 64
    kwargs = dict(num_inference_steps=3, output_type="pt")
    expected = in_memory("Add edema", xray, generator=generator(), **kwargs).images
    assert torch.equal(loaded("Add edema", xray, generator=generator(), **kwargs).images, expected)
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"


def test_hash_is_stable_and_sees_weight_changes(saved_model):
    assert load_pipeline(saved_model)[1].sha256 == load_pipeline(saved_model)[1].sha256
    pipe = build_untrained_pipeline(seed=3)
    before = hash_modules(pipe.unet)
    with torch.no_grad():
        pipe.unet.conv_in.bias[0] += 1e-3
    assert hash_modules(pipe.unet) != before


def test_scheduler_choice(saved_model):
    assert type(load_pipeline(saved_model, scheduler="dpm++")[0].scheduler).__name__ == \
        "DPMSolverMultistepScheduler"
    with pytest.raises(ValueError, match="unknown scheduler"):
        load_pipeline(saved_model, scheduler="magic")


def test_missing_model_and_hub_ids_need_permission(tmp_path):
    with pytest.raises(FileNotFoundError, match="model not found"):
        load_pipeline(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="--allow-hub"):
        load_pipeline("timbrooks/instruct-pix2pix")


def test_incomplete_directory(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match="vae, text_encoder"):
        load_pipeline(tmp_path)


def test_corrupt_weights(saved_model, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved_model, broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_pipeline(broken)


def test_four_channel_unet_is_refused(saved_model, tmp_path):
    from diffusers import UNet2DConditionModel
    import shutil

    wrong = tmp_path / "sd"
    shutil.copytree(saved_model, wrong)
    unet = UNet2DConditionModel.from_pretrained(wrong / "unet")
    config = dict(unet.config, in_channels=4)
    shutil.rmtree(wrong / "unet")
    UNet2DConditionModel.from_config(config).save_pretrained(wrong / "unet")
    with pytest.raises(ModelLoadError, match="8"):
        load_pipeline(wrong)


def test_single_file_suffix_checked(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=".ckpt"):
        load_pipeline(path)
