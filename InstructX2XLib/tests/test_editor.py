import dataclasses

import numpy as np
import pytest

from instructx2x import EditParameters, InstructX2XEditor, Radiograph
from instructx2x.errors import ParameterError
from instructx2x.loading import ModelInfo
from instructx2x.schedulers import FEW_STEP_SOLVER_STEPS

INFO = ModelInfo("untrained-tiny", "untrained", "0" * 64, False)


@pytest.fixture(scope="module")
def editor(tiny_pipe):
    return InstructX2XEditor(tiny_pipe, INFO, device="cpu", dtype="fp32")


@pytest.fixture
def radiograph():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:90, 0:70]
    pixels = 0.5 + 0.3 * np.sin(yy / 9) * np.cos(xx / 7) + 0.05 * rng.random((90, 70))
    return Radiograph(pixels.astype(np.float32), "phantom.png", "f" * 64, "png", 8)


def params(**kwargs):
    kwargs.setdefault("instruction", "Add the finding of pleural effusion")
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("resolution", 64)
    return EditParameters(**kwargs)


def test_result_has_input_geometry_and_untouched_outside(editor, radiograph):
    result = editor.edit(radiograph, params(tau=0.3))
    assert result.edited.shape == radiograph.pixels.shape == result.edit_mask.shape
    assert result.guidance_map.shape == result.relevance_map.shape == radiograph.pixels.shape
    outside = ~result.edit_mask
    assert outside.any() and result.edit_mask.any()
    assert np.array_equal(result.edited[outside], radiograph.pixels[outside])
    assert result.untrained


def test_manifest_records_everything_needed_to_reproduce(editor, radiograph):
    result = editor.edit(radiograph, params(seed=7))
    manifest = result.manifest
    assert manifest["parameters"]["seed"] == 7 and manifest["parameters"]["tau"] == 0.1
    assert manifest["model"]["sha256"] == INFO.sha256
    assert manifest["input"]["sha256"] == "f" * 64 and manifest["input"]["rows"] == 90
    assert manifest["prior"]["categories"] == ["Pleural Effusion"]
    assert manifest["instruction"]["operation"] == "add"
    assert manifest["scheduler"]["class"] == "DDIMScheduler"
    assert manifest["timings_s"]["total"] > 0
    again = editor.edit(radiograph, params(seed=7))
    assert np.array_equal(result.edited, again.edited)


def test_preview_has_maps_but_no_image(editor, radiograph):
    preview = editor.preview(radiograph, params())
    assert preview.edited is None and preview.manifest["kind"] == "guidance_preview"
    with pytest.raises(ParameterError, match="a guidance preview has no edited image"):
        preview.edited_image()
    assert np.array_equal(preview.edit_mask, editor.edit(radiograph, params()).edit_mask)


def test_mask_at_rethresholds_an_editor_result_and_refuses_one_without_its_maps(editor, radiograph):
    preview = editor.preview(radiograph, params(tau=0.3))
    assert np.array_equal(preview.mask_at(0.3), preview.edit_mask)
    assert preview.mask_at(0.05).sum() >= preview.edit_mask.sum() >= preview.mask_at(0.6).sum()
    bare = dataclasses.replace(preview, model_guidance=None, canvas=None)
    with pytest.raises(ParameterError, match="mask_at needs the model-grid guidance map"):
        bare.mask_at(0.3)


def test_progress_is_reported_every_step(editor, radiograph):
    steps = []
    editor.edit(radiograph, params(num_inference_steps=4), progress=lambda s, t: steps.append((s, t)))
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_user_and_keep_masks_at_input_size(editor, radiograph):
    mask = np.zeros((90, 70), bool)
    mask[10:60, 5:40] = True
    keep = np.zeros((90, 70), bool)
    keep[30:40, :] = True
    result = editor.edit(radiograph, params(region_mode="prior"), mask=mask, keep_mask=keep)
    assert not result.edit_mask[keep].any()
    assert not result.edit_mask[~mask].any()
    assert np.array_equal(result.edited[~result.edit_mask], radiograph.pixels[~result.edit_mask])


@pytest.mark.parametrize(
    "name,value,match",
    [
        ("mask", np.ones((10, 10), bool), "mask"),
        ("keep_mask", np.ones((90, 71), bool), "keep_mask"),
        ("mask", np.zeros((90, 70), bool), "empty"),
    ],
)
def test_bad_masks(editor, radiograph, name, value, match):
    with pytest.raises(ValueError, match=match):
        editor.edit(radiograph, params(), **{name: value})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"tau": 2.0}, "tau"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": -1.0}, "guidance"),
        ({"resolution": 100}, "resolution"),
        ({"region_mode": "all"}, "all"),
        ({"instruction": ""}, "empty"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        params(**kwargs)


def test_bf16_cpu_path_runs_and_keeps_outside(tiny_pipe, radiograph):
    from instructx2x.untrained import build_untrained_pipeline

    bf16 = InstructX2XEditor(build_untrained_pipeline(), INFO, device="cpu", dtype="bf16")
    result = bf16.edit(radiograph, params(tau=0.3))
    assert np.isfinite(result.edited).all()
    assert np.array_equal(result.edited[~result.edit_mask], radiograph.pixels[~result.edit_mask])


def test_fp16_on_cpu_is_refused(tiny_pipe):
    with pytest.raises(ValueError, match="fp16"):
        InstructX2XEditor(tiny_pipe, INFO, device="cpu", dtype="fp16")


def test_attention_is_sliced_only_when_accelerator_memory_is_short(editor):
    import torch

    from instructx2x.devices import SLICING_FREE_MEMORY_BYTES, needs_attention_slicing

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not needs_attention_slicing(cpu)
    assert needs_attention_slicing(cuda, free_bytes=SLICING_FREE_MEMORY_BYTES - 1)
    assert not needs_attention_slicing(cuda, free_bytes=80 * 2**30)
    assert editor.attention == "sdpa"


def test_steps_follow_the_scheduler_when_not_given(editor, radiograph):
    import torch

    from instructx2x import make_scheduler
    from instructx2x.untrained import build_untrained_pipeline

    # DDIM (the tiny model's scheduler): the authors' 100 steps, recorded in the manifest.
    preview = editor.preview(radiograph, params(num_inference_steps=None))
    assert preview.manifest["parameters"]["num_inference_steps"] == 100
    # DPM-Solver++ (the CPU default): its few steps, each reported.
    pipe = build_untrained_pipeline()
    pipe.scheduler = make_scheduler("dpm++")
    fast = InstructX2XEditor(pipe, INFO, device="cpu", dtype="fp32")
    steps = []
    result = fast.edit(
        radiograph, params(num_inference_steps=None), progress=lambda step, total: steps.append((step, total))
    )
    n = FEW_STEP_SOLVER_STEPS
    assert 1 < n < 10 and steps == [(step, n) for step in range(1, n + 1)]
    assert result.manifest["parameters"]["num_inference_steps"] == n
    assert result.manifest["scheduler"]["class"] == "DPMSolverMultistepScheduler"
    # On CPU the VAE runs channels-last (faster oneDNN convolutions).
    assert pipe.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_auto_scheduler_follows_the_device():
    import torch

    from instructx2x.schedulers import default_scheduler

    assert default_scheduler(torch.device("cuda")) == "ddim"  # the authors' sampler on GPUs
    assert default_scheduler(torch.device("cpu")) == "dpm++"
    assert default_scheduler(torch.device("mps")) == "dpm++"
    editor = InstructX2XEditor.from_model("untrained-tiny", device="cpu", dtype="fp32")
    assert type(editor.pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"
    explicit = InstructX2XEditor.from_model("untrained-tiny", device="cpu", scheduler="ddim")
    assert type(explicit.pipeline.scheduler).__name__ == "DDIMScheduler"


def test_pad_mode_priors_land_where_the_image_lands(editor):
    """A wide 200x400 film: the cardiomegaly prior must cover the same rows of the film in
    pad mode as in squash mode (applied in the padded square instead, it lands 44 rows off)."""
    yy, xx = np.mgrid[0:200, 0:400]
    film = Radiograph(
        (0.5 + 0.2 * np.sin(yy / 9) * np.cos(xx / 13)).astype(np.float32), "wide.png", "e" * 64, "png", 8
    )
    instruction = "Add the finding of cardiomegaly"
    squash = editor.preview(film, params(instruction=instruction, region_mode="prior", resolution=128))
    pad = editor.preview(
        film, params(instruction=instruction, region_mode="prior", resolution=128, aspect="pad")
    )
    top = [int(np.argmax(r.prior_mask.max(axis=1) > 0.5)) for r in (squash, pad)]
    left = [int(np.argmax(r.prior_mask.max(axis=0) > 0.5)) for r in (squash, pad)]
    assert abs(top[0] - top[1]) <= 2 and abs(left[0] - left[1]) <= 2, (top, left)
    assert pad.manifest["prior"]["categories"] == ["Cardiomegaly"]


def test_change_composite_keeps_native_detail_inside_the_mask(editor):
    """Inside the mask, 'change' adds the model's change to the native film, so detail finer
    than the model's grid survives; 'replace' puts the upsampled model output there."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:256, 0:256]
    film = 0.5 + 0.2 * np.sin(yy / 17) + 0.05 * np.sign(np.sin(xx * 1.3))  # detail at ~5 px
    image = Radiograph(
        np.clip(film + 0.01 * rng.standard_normal(film.shape), 0, 1).astype(np.float32),
        "detail.png",
        "d" * 64,
        "png",
        8,
    )
    mask = np.zeros((256, 256), bool)
    mask[40:200, 40:200] = True

    def detail(array):  # energy of the finest scale: each pixel minus its 3x3 mean
        blurred = sum(np.roll(np.roll(array, dy, 0), dx, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9
        return float(((array - blurred)[50:190, 50:190] ** 2).mean())

    change = editor.edit(image, params(region_mode="prior", composite="change"), mask=mask)
    replace = editor.edit(image, params(region_mode="prior", composite="replace"), mask=mask)
    source = detail(image.pixels)
    assert detail(replace.edited) < 0.2 * source
    assert detail(change.edited) > 0.8 * source
    model_change = change.model_output - change.reconstruction
    inside = change.edit_mask & (change.edited > 0) & (change.edited < 1)
    assert np.allclose(change.edited[inside], (image.pixels + model_change)[inside], atol=1e-6)
    assert np.array_equal(replace.edited[replace.edit_mask], replace.model_output[replace.edit_mask])
    assert change.manifest["composite"]["mode"] == "change"
    assert 0 <= change.manifest["composite"]["clipped_fraction"] <= 1


def test_edit_after_preview_reuses_encode_and_relevance_bit_for_bit(tiny_pipe, radiograph):
    """Preview, then edit the same image, instruction and seed: the edit skips the text
    encoder, the VAE encode and the relevance call, and equals an edit made from scratch."""
    fresh = InstructX2XEditor(tiny_pipe, INFO, device="cpu", dtype="fp32")
    expected = fresh.edit(radiograph, params(eta=1.0, tau=0.2))  # eta draws from the generator too
    warm = InstructX2XEditor(tiny_pipe, INFO, device="cpu", dtype="fp32")
    warm.preview(radiograph, params(eta=1.0, tau=0.4))
    calls = []
    modules = {"text": tiny_pipe.text_encoder, "encoder": tiny_pipe.vae.encoder, "unet": tiny_pipe.unet}
    handles = [
        m.register_forward_pre_hook(lambda module, args, name=name: calls.append(name))
        for name, m in modules.items()
    ]
    try:
        edited = warm.edit(radiograph, params(eta=1.0, tau=0.2))
    finally:
        for handle in handles:
            handle.remove()
    assert calls == ["unet"] * 3  # the 3 denoising steps only
    assert edited.manifest["reused_guidance"] and not expected.manifest["reused_guidance"]
    assert np.array_equal(edited.edited, expected.edited)
    other = warm.edit(radiograph, params(eta=1.0, tau=0.2, seed=1))
    assert not other.manifest["reused_guidance"]


def test_edit_batch_equals_single_edits_at_each_native_size(editor, radiograph):
    wide = Radiograph(np.tile(radiograph.pixels, (1, 2)), "wide.png", "c" * 64, "png", 8)
    parameters = [
        params(instruction="Add the finding of left pleural effusion", seed=4),
        params(instruction="Remove the finding of edema", seed=9),
    ]
    batch = editor.edit_batch([radiograph, wide], parameters)
    for image, element, result in zip([radiograph, wide], parameters, batch):
        alone = editor.edit(image, element)
        assert result.edited.shape == image.pixels.shape
        assert np.array_equal(result.edit_mask, alone.edit_mask)
        assert np.allclose(result.edited, alone.edited, atol=1e-4)
        assert result.manifest["parameters"]["seed"] == element.seed
    with pytest.raises(ValueError, match="shares every setting except instruction and seed"):
        editor.edit_batch([radiograph, wide], [params(), params(tau=0.3)])


def test_the_model_grid_output_comes_with_the_edit(editor, radiograph):
    result = editor.edit(radiograph, params(resolution=64))
    assert result.model_grid_output.shape == (64, 64)
    import torch

    from instructx2x.guidance import resize_map

    upsampled = result.model_output  # the same image, resized to the input's grid
    expected = resize_map(torch.from_numpy(result.model_grid_output)[None, None], (90, 70))[0, 0].numpy()
    assert np.allclose(upsampled, np.clip(expected, 0, 1), atol=1e-6)
    assert editor.preview(radiograph, params()).model_grid_output is None


def test_a_series_shares_seed_and_region_and_varies_only_the_level(editor, radiograph):
    from instructx2x.instructions import parse_series

    template = "Add the finding of {level} left pleural effusion"
    series = parse_series(["small", "moderate", "large"], template)
    calls = []
    result = editor.edit_series(
        radiograph,
        series,
        params(instruction=template, seed=3, tau=0.2),
        progress=lambda s, t: calls.append(s),
    )
    assert calls == [1, 2, 3]  # one batch: one progress report a denoising step
    assert [r.manifest["parameters"]["instruction"] for r in result.steps] == list(series.instructions)
    assert [r.manifest["series"]["level"] for r in result.steps] == ["small", "moderate", "large"]
    assert {r.manifest["parameters"]["seed"] for r in result.steps} == {3}
    assert result.steps[1].manifest["series"] == {
        "step": 2,
        "steps": 3,
        "level": "moderate",
        "direction": "increasing",
        "region_instruction": "Add the finding of large left pleural effusion",
    }
    for step in result.steps:
        assert np.array_equal(step.edit_mask, result.edit_mask)
        assert np.array_equal(step.guidance_map, result.guidance_map)
        assert np.array_equal(step.edited[~step.edit_mask], radiograph.pixels[~step.edit_mask])
    assert result.edit_mask.any() and not result.edit_mask.all()
    assert not np.array_equal(result.steps[0].edited, result.steps[2].edited)
    # the region is the region step's own: its guidance map alone, with the same seed
    alone = editor.preview(radiograph, params(instruction=series.instructions[2], seed=3, tau=0.2))
    assert np.allclose(result.guidance_map, alone.guidance_map, atol=1e-4)
    first = editor.preview(radiograph, params(instruction=series.instructions[0], seed=3, tau=0.2))
    assert not np.allclose(first.guidance_map, alone.guidance_map, atol=1e-2)  # it would differ
    with pytest.raises(ValueError, match="neither a template holding \\{level\\} nor one of its steps"):
        editor.edit_series(radiograph, series, params(instruction="Add the finding of edema"))
