import json

import numpy as np
import pytest
import torch

from instructx2x.loading import MODEL_CARD_NAME, ModelLoadError, hash_modules, load_pipeline, save_model
from instructx2x.untrained import build_untrained_pipeline


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """The tiny model in the authors' released layout (a diffusers folder)."""
    directory = tmp_path_factory.mktemp("models") / "Ix2x_V1_4500"
    build_untrained_pipeline(seed=3).save_pretrained(directory)
    return directory


CARD = {
    "name": "tiny-card",
    "trained": False,
    "trained_on": "nothing (random weights)",
    "resolution": 256,
    "intended_use": "tests",
}


def test_directory_round_trip_gives_identical_edits(saved_model, xray):
    in_memory = build_untrained_pipeline(seed=3)
    loaded, info = load_pipeline(saved_model)
    assert info.name == "Ix2x_V1_4500" and info.source == "directory"
    assert info.trained is None and info.card is None  # no model card: the loader cannot tell
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
    assert (
        type(load_pipeline(saved_model, scheduler="dpm++")[0].scheduler).__name__
        == "DPMSolverMultistepScheduler"
    )
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
    import shutil

    from diffusers import UNet2DConditionModel

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


@pytest.fixture(scope="module")
def single_file_setup(tmp_path_factory):
    """The tiny model as an original single-file checkpoint, plus its architecture configs."""
    import os

    from original_checkpoint import original_state_dict
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("single")
    pipe = build_untrained_pipeline(seed=5)
    state = original_state_dict(pipe)
    save_file(state, root / "tiny-ip2p.safetensors")
    torch.save({"state_dict": state, "global_step": 22000}, root / "tiny-ip2p.ckpt")
    config = root / "config"
    pipe.save_pretrained(config)
    for component in ("unet", "vae", "text_encoder"):
        for weights in (config / component).glob("*.safetensors"):
            os.remove(weights)
    return root, config, pipe


@pytest.mark.parametrize("name", ["tiny-ip2p.safetensors", "tiny-ip2p.ckpt"])
def test_single_file_checkpoint_converts_exactly(single_file_setup, xray, name):
    root, config, reference = single_file_setup
    loaded, info = load_pipeline(root / name, single_file_config=config)
    assert info.source == "single_file" and info.name == name
    for component in ("unet", "vae", "text_encoder"):
        expected = getattr(reference, component).state_dict()
        converted = getattr(loaded, component).state_dict()
        assert expected.keys() == converted.keys()
        assert all(torch.equal(expected[k], converted[k].reshape(expected[k].shape)) for k in expected)
    kwargs = dict(num_inference_steps=2, output_type="pt")
    assert torch.equal(
        loaded("Add edema", xray, generator=generator(), **kwargs).images,
        reference("Add edema", xray, generator=generator(), **kwargs).images,
    )


def test_pickled_code_is_never_executed(tmp_path, single_file_setup):
    import os

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": Payload()}}, path)
    with pytest.raises(ModelLoadError, match="evil.ckpt"):
        load_pipeline(path, single_file_config=single_file_setup[1])
    assert not (tmp_path / "pwned").exists()


def test_checkpoint_of_another_architecture(single_file_setup, tmp_path):
    from safetensors.torch import save_file

    root, config, pipe = single_file_setup
    from original_checkpoint import original_state_dict

    state = original_state_dict(pipe)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state[key] = state[key][:, :4].contiguous()  # a text-to-image SD UNet: 4 input channels
    save_file(state, tmp_path / "sd.safetensors")
    with pytest.raises(ModelLoadError, match="sd.safetensors"):
        load_pipeline(tmp_path / "sd.safetensors", single_file_config=config)


def test_truncated_checkpoint(single_file_setup, tmp_path):
    root, config, _ = single_file_setup
    (tmp_path / "cut.safetensors").write_bytes((root / "tiny-ip2p.safetensors").read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match="cut.safetensors"):
        load_pipeline(tmp_path / "cut.safetensors", single_file_config=config)


def test_model_card_says_whether_the_model_is_trained(tmp_path):
    directory = save_model(build_untrained_pipeline(seed=3), tmp_path / "carded", CARD)
    _, info = load_pipeline(directory)
    assert info.trained is False and info.card == CARD
    card = dict(CARD, trained=True)
    (directory / MODEL_CARD_NAME).write_text(json.dumps(card))
    assert load_pipeline(directory)[1].trained is True
    (directory / MODEL_CARD_NAME).write_text(json.dumps(dict(CARD, trained="yes")))
    with pytest.raises(ModelLoadError, match="'trained' must be true or false"):
        load_pipeline(directory)
    with pytest.raises(ValueError, match="'name'"):
        save_model(build_untrained_pipeline(), tmp_path / "bad", {"trained": True})
    assert not (tmp_path / "bad").exists()


def test_model_card_sets_the_few_step_solver_default(tmp_path):
    """A model that measured more DPM-Solver++ steps better says so in its card; the editor
    uses it when no step count is given, and DDIM keeps the authors' 100."""
    from instructx2x.editor import InstructX2XEditor
    from instructx2x.parameters import EditParameters

    directory = save_model(
        build_untrained_pipeline(seed=3), tmp_path / "carded", dict(CARD, few_step_solver_steps=7)
    )
    for scheduler, steps in (("dpm++", 7), ("unipc", 7), ("ddim", 100)):
        pipe, info = load_pipeline(directory, scheduler=scheduler)
        editor = InstructX2XEditor(pipe, info, device="cpu")
        assert editor.resolve(EditParameters(instruction="-")).num_inference_steps == steps
        assert editor.resolve(EditParameters(instruction="-", num_inference_steps=2)).num_inference_steps == 2
    (directory / MODEL_CARD_NAME).write_text(json.dumps(dict(CARD, few_step_solver_steps=0)))
    with pytest.raises(ModelLoadError, match="few_step_solver_steps"):
        load_pipeline(directory)


def test_model_card_sets_the_guidance_scales(tmp_path, xray):
    """A model that measured other s_T / s_I better says so in its card: an edit that names
    none runs with them (and records them), one that names its own keeps its own."""
    from instructx2x.editor import InstructX2XEditor
    from instructx2x.image_io import Radiograph
    from instructx2x.parameters import EditParameters

    def editor(card):
        directory = save_model(build_untrained_pipeline(seed=3), tmp_path / card["name"], card)
        return InstructX2XEditor(*load_pipeline(directory, scheduler="dpm++"), device="cpu", dtype="fp32")

    xray = Radiograph(xray[0, 0].numpy(), "x.png", "f" * 64, "png", 8)

    carded = editor(dict(CARD, name="carded", guidance_scale=4, image_guidance_scale=2.0))
    plain = editor(dict(CARD, name="plain"))
    prompt = "Add the finding of left pleural effusion"
    by_card = carded.edit(xray, EditParameters(prompt, num_inference_steps=2))
    assert by_card.manifest["parameters"]["guidance_scale"] == 4.0
    assert by_card.manifest["parameters"]["image_guidance_scale"] == 2.0
    named = plain.edit(
        xray, EditParameters(prompt, num_inference_steps=2, guidance_scale=4.0, image_guidance_scale=2.0)
    )
    authors = plain.edit(xray, EditParameters(prompt, num_inference_steps=2))
    assert authors.manifest["parameters"]["guidance_scale"] == 7.5
    assert np.array_equal(by_card.edited, named.edited)
    assert not np.array_equal(by_card.edited, authors.edited)
    assert carded.sampling(EditParameters(prompt, guidance_scale=9.0))["guidance_scale"] == 9.0
    for bad in (-1, 101, "4", True):
        (tmp_path / "carded" / MODEL_CARD_NAME).write_text(json.dumps(dict(CARD, guidance_scale=bad)))
        with pytest.raises(ModelLoadError, match="'guidance_scale' must be a number in"):
            load_pipeline(tmp_path / "carded")


def test_saved_scheduler_config_sets_the_training_schedule(tmp_path):
    directory = tmp_path / "vpred"
    pipe = build_untrained_pipeline(seed=3)
    pipe.save_pretrained(directory)
    config_path = directory / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(prediction_type="v_prediction", beta_end=0.02, steps_offset=7)
    config_path.write_text(json.dumps(config))
    loaded, info = load_pipeline(directory, scheduler="dpm++")
    assert info.scheduler_source == "model"
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    assert loaded.scheduler.config.beta_end == 0.02
    assert loaded.scheduler.config.steps_offset == 1  # sampling settings stay the authors'
    config_path.unlink()
    shipped, info = load_pipeline(directory)
    assert info.scheduler_source == "shipped" and shipped.scheduler.config.prediction_type == "epsilon"


def test_text_encoder_of_another_width_is_refused_at_load(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    directory = tmp_path / "mixed"
    build_untrained_pipeline(seed=3).save_pretrained(directory)
    wide = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=48, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1, vocab_size=49408
        )
    )
    wide.save_pretrained(directory / "text_encoder")
    with pytest.raises(
        ModelLoadError, match="text encoder is 48 wide but the UNet's cross-attention expects 32"
    ):
        load_pipeline(directory)


def test_test_checkpoint_uses_the_released_files_key_names():
    """Anchor the tests' CompVis writer to the real format, not to diffusers' inverse of it:
    these names (and the 8-channel conv_in, the 1x1-conv VAE attention) are those of
    instruct-pix2pix-00-22000.ckpt, written out by hand."""
    from original_checkpoint import original_state_dict

    state = original_state_dict(build_untrained_pipeline(seed=5))
    expected_shapes = {
        "model.diffusion_model.input_blocks.0.0.weight": (32, 8, 3, 3),
        "model.diffusion_model.time_embed.0.weight": (128, 32),
        "model.diffusion_model.input_blocks.1.0.in_layers.0.weight": (32,),
        "model.diffusion_model.input_blocks.3.0.op.weight": (32, 32, 3, 3),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (64, 32),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (64, 64, 3, 3),  # after its attention
        "model.diffusion_model.out.2.weight": (4, 32, 3, 3),
        "first_stage_model.encoder.conv_in.weight": (16, 3, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (32, 32, 1, 1),
        "first_stage_model.decoder.up.0.block.0.conv1.weight": (16, 32, 3, 3),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 32),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (32,),
    }
    assert {k: tuple(state[k].shape) for k in expected_shapes if k in state} == expected_shapes


def test_model_card_sets_the_relevance_draws(tmp_path, xray):
    """A card's relevance_draws is the edits' default (recorded in the manifest); an edit may
    name its own, and a model without one keeps the authors' single draw."""
    from instructx2x.editor import InstructX2XEditor
    from instructx2x.image_io import Radiograph
    from instructx2x.parameters import EditParameters

    directory = save_model(
        build_untrained_pipeline(seed=3), tmp_path / "carded", dict(CARD, relevance_draws=4)
    )
    carded = InstructX2XEditor(*load_pipeline(directory, scheduler="dpm++"), device="cpu", dtype="fp32")
    xray = Radiograph(xray[0, 0].numpy(), "x.png", "f" * 64, "png", 8)
    prompt = "Add the finding of left pleural effusion"
    by_card = carded.preview(xray, EditParameters(prompt, num_inference_steps=2))
    assert by_card.manifest["parameters"]["relevance_draws"] == 4
    named = carded.preview(xray, EditParameters(prompt, num_inference_steps=2, relevance_draws=4))
    one = carded.preview(xray, EditParameters(prompt, num_inference_steps=2, relevance_draws=1))
    assert by_card.relevance_map is not None and named.relevance_map is not None
    assert one.relevance_map is not None
    assert np.array_equal(by_card.relevance_map, named.relevance_map)
    assert not np.array_equal(by_card.relevance_map, one.relevance_map)
    assert carded.sampling()["relevance_draws"] == 4
    plain = save_model(build_untrained_pipeline(seed=3), tmp_path / "plain", dict(CARD, name="plain"))
    assert InstructX2XEditor(*load_pipeline(plain), device="cpu").sampling()["relevance_draws"] == 1
    for bad in (0, 17, 2.0, True):
        (directory / MODEL_CARD_NAME).write_text(json.dumps(dict(CARD, relevance_draws=bad)))
        with pytest.raises(ModelLoadError, match="'relevance_draws' must be an integer in 1..16"):
            load_pipeline(directory)


def test_diffusers_float32_notice_is_dropped_only_when_it_names_no_module():
    """ModelMixin.to(dtype) logs 'modules ... should be kept in float32: []' even for models that
    keep none: loading filters that notice, and it still shows when it names modules."""
    import logging

    from instructx2x.loading import DIFFUSERS_MODELING_LOGGER

    diffusers_logger = logging.getLogger(DIFFUSERS_MODELING_LOGGER)

    def shown(modules: str) -> bool:
        message = (
            f"There are modules in UNet2DConditionModel that should be kept in float32: {modules}. "
            "Casting directly with `to()` can lead to inconsistent results"
        )
        return bool(
            diffusers_logger.filter(
                diffusers_logger.makeRecord(
                    diffusers_logger.name, logging.WARNING, __file__, 0, message, (), None
                )
            )
        )

    load_pipeline("untrained-tiny")
    load_pipeline("untrained-tiny")
    assert not shown("[]") and shown("['proj_out']")
    ours = [f for f in diffusers_logger.filters if type(f).__module__ == "instructx2x.loading"]
    assert len(ours) == 1  # once per process, however many loads


def test_importing_the_loader_leaves_diffusers_logging_alone():
    import subprocess
    import sys

    code = (
        "import logging, instructx2x.loading\n"
        "filters = logging.getLogger(instructx2x.loading.DIFFUSERS_MODELING_LOGGER).filters\n"
        "print(sorted({type(f).__module__ for f in filters}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "instructx2x" not in out
