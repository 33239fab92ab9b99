"""The OpenVINO backend: the same edit as the torch fp32 path, its cache, and what it refuses.

The tiny random model is converted once for the module (about 15 s on an idle 2-core machine);
two tests convert it again (an entry another OpenVINO version wrote is not used).
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from instructx2x import EditParameters, InstructX2XEditor, Radiograph, backends
from instructx2x import openvino_runtime as ovr
from instructx2x.errors import ModelLoadError, ParameterError, ResourceError
from instructx2x.schedulers import make_scheduler
from instructx2x.untrained import build_untrained_pipeline

needs_openvino = pytest.mark.skipif(
    not backends.openvino_available(),
    reason="openvino is not installed (make install puts it in .venv)",
)

PROMPT = "Add the finding of left pleural effusion"
# OpenVINO's f32 kernels sum in another order than torch's: on the tiny model the latents and
# the image differ from the torch fp32 path by about 2e-5; this is the tolerance this suite holds
# them to (values of order 1, intensities in [0, 1]).
TOLERANCE = 2e-4


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("openvino-cache")


@pytest.fixture(scope="module")
def runtime(cache):
    """The tiny model converted into ``cache`` (the first load of this module)."""
    pipe = build_untrained_pipeline(seed=0)
    from instructx2x.loading import hash_modules

    runtime = ovr.OpenVINORuntime(
        pipe, hash_modules(pipe.unet, pipe.vae, pipe.text_encoder), 256, cache, name="untrained-tiny"
    )
    assert runtime.converted
    return runtime


def radiograph(size=256):
    yy, xx = np.mgrid[0:size, 0:size]
    pixels = 0.5 + 0.3 * np.sin(yy / 19) * np.cos(xx / 13)
    return Radiograph(pixels.astype(np.float32), "phantom.png", "f" * 64, "png", 8)


def editor(backend, cache, dtype="fp32", **kwargs):
    return InstructX2XEditor.from_model(
        "untrained-tiny", device="cpu", dtype=dtype, backend=backend, openvino_cache=cache, **kwargs
    )


def pipeline_run(pipe, seed=3):
    """One edit straight through the pipeline, with the latents after every step."""
    latents = []

    def keep(pipe, step, timestep, tensors):
        latents.append(tensors["latents"].clone())
        return {}

    pipe.scheduler = make_scheduler("dpm++")
    image = torch.from_numpy(radiograph().pixels)[None, None]
    output = pipe(
        PROMPT,
        image,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        return_reconstruction=True,
        callback_on_step_end=keep,
    )
    return output, latents


@needs_openvino
def test_same_edit_as_torch_fp32_through_the_pipeline(runtime):
    torch_pipe = build_untrained_pipeline(seed=0)
    ov_pipe = build_untrained_pipeline(seed=0)
    runtime.install(ov_pipe)
    assert type(ov_pipe.unet).__name__ == "OpenVINOUNet" and ov_pipe.unet.dtype == torch.float32
    expected, expected_latents = pipeline_run(torch_pipe)
    got, got_latents = pipeline_run(ov_pipe)
    assert len(got_latents) == len(expected_latents) == 3
    for ours, theirs in zip(got_latents, expected_latents):
        assert (ours - theirs).abs().max() < TOLERANCE
    assert (got.images - expected.images).abs().max() < TOLERANCE
    assert (got.reconstructions - expected.reconstructions).abs().max() < TOLERANCE
    assert (got.relevance_maps - expected.relevance_maps).abs().max() < TOLERANCE
    assert torch.equal(got.edit_masks, expected.edit_masks) and got.edit_masks.any()
    assert torch.equal(got.latent_edit_masks, expected.latent_edit_masks)


@needs_openvino
def test_same_edit_as_torch_fp32_through_the_editor(runtime, cache):
    image, parameters = radiograph(), EditParameters(PROMPT, seed=5, num_inference_steps=3)
    ours = editor("openvino", cache).edit(image, parameters)
    theirs = editor("torch", cache).edit(image, parameters)
    assert np.array_equal(ours.edit_mask, theirs.edit_mask) and ours.edit_mask.any()
    assert np.abs(ours.edited - theirs.edited).max() < TOLERANCE
    assert np.array_equal(ours.edited[~ours.edit_mask], image.pixels[~ours.edit_mask])
    backend = ours.manifest["backend"]
    assert backend["name"] == "openvino" and backend["reason"] == "openvino as requested"
    assert backend["converted_on_load"] is False  # the module's runtime converted it
    assert ours.manifest["software"]["openvino"] == runtime.version
    assert theirs.manifest["backend"] == {"name": "torch", "reason": "torch as requested"}


@needs_openvino
def test_a_decoded_window_matches_torch(runtime, cache):
    """--decode mask decodes a window of the latent grid: the decoder takes any window."""
    image, parameters = radiograph(), EditParameters(PROMPT, seed=5, num_inference_steps=2)
    ours = editor("openvino", cache, decode="mask").edit(image, parameters)
    theirs = editor("torch", cache, decode="mask").edit(image, parameters)
    assert not ours.edit_mask.all()  # a sided instruction: the window is not the whole grid
    assert np.array_equal(ours.edit_mask, theirs.edit_mask)
    assert np.abs(ours.edited - theirs.edited).max() < TOLERANCE


@needs_openvino
def test_bf16_runs_the_relevance_call_in_f32(runtime, tmp_path):
    """The pipeline's fp32 relevance call (docs/method.md section 2, step 3) casts the UNet
    stand-in to float32: it runs the f32 compiled model, the guidance batch the bf16 one."""
    cache = tmp_path / "cache"
    shutil.copytree(runtime.entry, cache / runtime.entry.name)
    parameters = EditParameters(PROMPT, seed=5, num_inference_steps=2)
    full = editor("openvino", cache).edit(radiograph(), parameters)  # f32 throughout
    ours = editor("openvino", cache, dtype="bf16")
    result = ours.edit(radiograph(), parameters)
    assert result.edit_mask.any() and result.manifest["dtype"] == "bfloat16"
    inside = result.edit_mask & full.edit_mask
    # bf16 against f32: about the torch path's own difference (docs/benchmarks.md section 4)
    assert np.isfinite(result.edited).all() and np.abs(result.edited - full.edited)[inside].mean() < 0.05
    unet_calls = {
        (hint, shapes[0][0]) for network, hint, shapes in ours.runtime._compiled if network == "unet"
    }
    assert unet_calls == {("f32", 2), ("bf16", 3)}
    # in f32 the relevance call's two members are padded to three: one compiled UNet serves both
    ours = editor("openvino", cache)
    ours.edit(radiograph(), parameters)
    assert [shapes[0][0] for network, _, shapes in ours.runtime._compiled if network == "unet"] == [3]


# An edit in a process whose kernels are capped at AVX2: OpenVINO's CPU plugin has no bf16 there.
CAPPED_EDIT = """
import json, sys
import numpy as np
from instructx2x import EditParameters, InstructX2XEditor, Radiograph, backends
editor = InstructX2XEditor.from_model(
    "untrained-tiny", device="cpu", dtype="bf16", backend="openvino", openvino_cache=sys.argv[1]
)
pixels = np.linspace(0.2, 0.8, 256 * 256, dtype=np.float32).reshape(256, 256)
result = editor.edit(Radiograph(pixels, "ramp.png", "f" * 64, "png", 8), EditParameters(sys.argv[2], num_inference_steps=2))
assert np.isfinite(result.edited).all()
print(json.dumps({"kind": backends.cpu_kind(), "bf16": editor.runtime.bf16, "compiled": editor.runtime.compiled_description()}))
"""


@needs_openvino
def test_without_bf16_kernels_a_bf16_edit_keeps_one_f32_unet(runtime, tmp_path):
    """Where OpenVINO's CPU plugin has no bf16 (here its kernels capped at AVX2, as an AVX2-only
    CPU runs) it compiles bf16 as f32: the guidance batch and the padded relevance call share
    one f32 UNet, as in an f32 edit, where two would hold the same weights twice."""
    cache = tmp_path / "cache"
    shutil.copytree(runtime.entry, cache / runtime.entry.name)
    capped = {**os.environ, "OV_CPU_MAX_ISA": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    done = subprocess.run(
        [sys.executable, "-c", CAPPED_EDIT, str(cache), PROMPT],
        env=capped,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["kind"] == "avx2" and report["bf16"] is False
    assert [(c["precision"], c["shapes"][0][0]) for c in report["compiled"] if c["network"] == "unet"] == [
        ("f32", 3)
    ]
    assert {c["precision"] for c in report["compiled"]} == {"f32"}
    assert {(c["threads"], c["streams"]) for c in report["compiled"]} == {(torch.get_num_threads(), 1)}


@needs_openvino
def test_a_second_load_converts_nothing(runtime, cache):
    files = sorted(path for path in runtime.entry.iterdir() if path.is_file())
    before = {path.name: path.stat().st_mtime_ns for path in files}
    again = ovr.OpenVINORuntime(
        build_untrained_pipeline(seed=0), runtime.key["weights_sha256"], 256, cache, name="untrained-tiny"
    )
    assert again.converted is False and again.entry == runtime.entry
    assert {path.name: path.stat().st_mtime_ns for path in files} == before


@needs_openvino
def test_an_entry_of_another_version_is_converted_again_and_stale_ones_removed(runtime, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(runtime.entry, cache / runtime.entry.name)
    stale = cache / "untrained-tiny-256px-000000000000000000000000"
    shutil.copytree(runtime.entry, stale)
    for folder in (cache / runtime.entry.name, stale):  # as OpenVINO 2025.0.0 would have written them
        record = json.loads((folder / ovr.ENTRY_RECORD).read_text())
        record["key"]["versions"]["openvino"] = "2025.0.0"
        (folder / ovr.ENTRY_RECORD).write_text(json.dumps(record))
    again = ovr.OpenVINORuntime(
        build_untrained_pipeline(seed=0), runtime.key["weights_sha256"], 256, cache, name="untrained-tiny"
    )
    assert again.converted and again.entry.name == runtime.entry.name
    record = json.loads((again.entry / ovr.ENTRY_RECORD).read_text())
    assert record["key"]["versions"]["openvino"] == runtime.version
    assert ovr.entry_problem(again.entry, again.key) is None
    assert not stale.exists()
    assert [path.name for path in cache.iterdir()] == [again.entry.name]  # no partial folder left


@needs_openvino
def test_an_openvino_update_is_named_converts_once_and_leaves_no_stale_entry(runtime, tmp_path, caplog):
    """The cache as an earlier OpenVINO left it (its entry under that version's key): the
    conversion says why it runs, in the log and in the backend's cache note, and the old entry
    goes; the next load takes the new one."""
    cache = tmp_path / "cache"
    old = cache / "untrained-tiny-256px-0123456789abcdef01234567"  # the old key's digest
    shutil.copytree(runtime.entry, old)
    record = json.loads((old / ovr.ENTRY_RECORD).read_text())
    record["key"]["versions"]["openvino"] = "2025.0.0"
    (old / ovr.ENTRY_RECORD).write_text(json.dumps(record))
    with caplog.at_level("WARNING", logger=ovr.__name__):
        again = ovr.OpenVINORuntime(
            build_untrained_pipeline(seed=0), runtime.key["weights_sha256"], 256, cache, name="untrained-tiny"
        )
    release = runtime.version.split("-")[0]  # 2026.4.1 of 2026.4.1-22982-...
    note = (
        f"converted again for OpenVINO {release}: the cache held this model converted with openvino 2025.0.0"
    )
    assert again.converted and again.describe()["cache"] == note + ", which is not used"
    assert [r.getMessage() for r in caplog.records] == [
        f"C{note[1:]}, which is not used; converting takes a while, once."
    ]
    assert [path.name for path in cache.iterdir()] == [runtime.entry.name]  # the old entry is gone
    later = ovr.OpenVINORuntime(
        build_untrained_pipeline(seed=0), runtime.key["weights_sha256"], 256, cache, name="untrained-tiny"
    )
    assert not later.converted and later.describe()["cache"] == "from the cache"


@needs_openvino
def test_an_unusable_entry_that_cannot_be_removed_is_refused_with_its_path(runtime, tmp_path, monkeypatch):
    """A damaged entry another user wrote in a shared cache folder: it is never used, and the
    message names it instead of a disk that is not full."""
    cache = tmp_path / "cache"
    entry = cache / runtime.entry.name
    shutil.copytree(runtime.entry, entry)
    _flip_a_byte(entry / "unet.bin")
    monkeypatch.setattr(ovr.shutil, "rmtree", lambda *args, **kwargs: None)  # as another user's files
    monkeypatch.setattr(ovr.OpenVINORuntime, "_convert", lambda *a: pytest.fail("converted"))
    with pytest.raises(ResourceError) as refused:
        ovr.OpenVINORuntime(
            build_untrained_pipeline(seed=0), runtime.key["weights_sha256"], 256, cache, name="untrained-tiny"
        )
    assert str(refused.value) == (
        f"the OpenVINO cache entry {entry} is not usable (unet.bin does not match its SHA-256) and "
        f"cannot be removed: remove it, set {backends.CACHE_ENV} to a folder of your own, or use --backend torch."
    )


@needs_openvino
@pytest.mark.parametrize(
    "damage,reason",
    [
        (lambda entry: (entry / "unet.bin").write_bytes((entry / "unet.bin").read_bytes()[:-10]), "bytes"),
        (lambda entry: _flip_a_byte(entry / "unet.bin"), "SHA-256"),
        (lambda entry: (entry / "vae_decoder.xml").unlink(), "missing"),
        (lambda entry: (entry / ovr.ENTRY_RECORD).write_text("{"), "unreadable"),
    ],
)
def test_a_damaged_entry_is_never_used(runtime, tmp_path, damage, reason):
    entry = tmp_path / runtime.entry.name
    shutil.copytree(runtime.entry, entry)
    assert ovr.entry_problem(entry, runtime.key) is None
    damage(entry)
    problem = ovr.entry_problem(entry, runtime.key)
    assert problem is not None and reason in problem


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@needs_openvino
def test_an_unwritable_cache_folder_is_named_and_torch_still_edits(tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv(backends.CACHE_ENV, str(blocked))
    loaded = []
    monkeypatch.setattr("instructx2x.editor.load_pipeline", lambda *a, **k: loaded.append(1))
    with pytest.raises(
        ResourceError, match="OpenVINO cache folder .*a-file/openvino is not writable"
    ) as error:
        InstructX2XEditor.from_model("untrained-tiny", backend="openvino")
    assert f"set {backends.CACHE_ENV}" in str(error.value) and "--backend torch" in str(error.value)
    assert not loaded  # refused before the model loads
    monkeypatch.undo()
    monkeypatch.setenv(backends.CACHE_ENV, str(blocked))
    # auto would take OpenVINO here (a large UNet on a measured CPU kind), but cannot write its cache
    monkeypatch.setattr(backends, "OPENVINO_MIN_PARAMETERS", 0)
    monkeypatch.setattr(
        backends, "MEASURED_SPEEDUP", {"amx": "x", "avx512_bf16": "x", "avx2": "x", "other": "x"}
    )
    fallback = InstructX2XEditor.from_model("untrained-tiny", device="cpu", backend="auto")
    assert fallback.backend == "torch" and "not writable" in fallback.backend_info["reason"]
    assert fallback.edit(radiograph(), EditParameters(PROMPT, num_inference_steps=2)).edit_mask.any()


@needs_openvino
def test_another_resolution_is_refused_before_any_model_call(runtime, cache, monkeypatch):
    ours = editor("openvino", cache)
    monkeypatch.setattr(ours.runtime, "compiled", lambda *a, **k: pytest.fail("a network ran"))
    with pytest.raises(ParameterError, match="own 256 px .* 128 px edit needs --backend torch"):
        ours.edit(radiograph(), EditParameters(PROMPT, resolution=128))


@needs_openvino
def test_a_network_that_does_not_convert_is_a_model_error(tmp_path, monkeypatch):
    import openvino

    def refuse(*args, **kwargs):
        raise RuntimeError("Cannot create ModuleExtension for aten::unsupported_op")

    monkeypatch.setattr(openvino, "convert_model", refuse)
    with pytest.raises(
        ModelLoadError, match="text encoder does not convert .*unsupported_op.*--backend torch"
    ):
        editor("openvino", tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-written is kept


def test_without_openvino_the_backend_names_the_extra_before_the_model_loads(monkeypatch):
    monkeypatch.setattr(backends, "openvino_available", lambda: False)
    monkeypatch.setattr("instructx2x.editor.load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(ParameterError, match=r"instructx2x\[openvino\]"):
        InstructX2XEditor.from_model("untrained-tiny", backend="openvino")


def test_the_cli_refuses_openvino_without_the_package_before_reading_anything(monkeypatch, capsys, tmp_path):
    from instructx2x.cli import main

    monkeypatch.setattr(backends, "openvino_available", lambda: False)
    monkeypatch.setattr("instructx2x.editor.load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    monkeypatch.setattr("instructx2x.cli.prepare", lambda *a, **k: pytest.fail("the input was read"))
    missing = tmp_path / "missing.png"
    for command in (["info"], ["edit", str(missing), "-i", PROMPT, "-o", str(tmp_path / "out")]):
        assert main([*command, "--model", "untrained-tiny", "--backend", "openvino"]) == 2
        assert "pip install -c constraints.txt -e './InstructX2XLib[openvino]'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "backend,device,parameters,kind,expected",
    [
        ("torch", "cpu", 10**9, "amx", ("torch", "torch as requested")),
        ("auto", "cpu", 10**6, "amx", ("torch", "1.0 M parameters")),
        ("auto", "cpu", 10**9, "other", ("torch", "not measured faster on this CPU kind (other)")),
    ],
)
def test_auto_picks_by_device_size_and_cpu_kind(backend, device, parameters, kind, expected, monkeypatch):
    monkeypatch.setattr(backends, "cpu_kind", lambda: kind)
    name, reason = backends.resolve_backend(backend, device, parameters)
    assert name == expected[0] and expected[1] in reason


@pytest.mark.parametrize(
    "caps,kind",
    [
        ({}, "amx"),
        ({"ONEDNN_MAX_CPU_ISA": "AVX2", "OV_CPU_MAX_ISA": "AVX2"}, "avx2"),
        ({"ONEDNN_MAX_CPU_ISA": "avx512_core_bf16"}, "avx512_bf16"),
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX", "OV_CPU_MAX_ISA": "avx512_core_vnni"}, "avx2"),
        ({"ONEDNN_MAX_CPU_ISA": "AVX"}, "other"),
        ({"ONEDNN_MAX_CPU_ISA": "ALL"}, "amx"),
    ],
)
def test_an_isa_cap_makes_the_cpu_the_kind_its_kernels_run_as(caps, kind):
    """Kernels capped below bf16 emulate it (torch) or run f32 (OpenVINO): the CPU kind, bf16
    choice and ``auto`` backend follow the cap, not /proc/cpuinfo."""
    amx = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    assert backends.cpu_kind_of(backends.limited_flags(amx, caps)) == kind


def test_auto_takes_openvino_where_it_measured_faster(monkeypatch, tmp_path):
    monkeypatch.setattr(backends, "cpu_kind", lambda: "amx")
    monkeypatch.setattr(backends, "MEASURED_SPEEDUP", {"amx": "2.5x faster"})
    monkeypatch.setattr(backends, "openvino_available", lambda: True)
    name, reason = backends.resolve_backend("auto", "cpu", 10**9, tmp_path)
    assert name == "openvino" and "2.5x faster" in reason and "amx" in reason
    monkeypatch.setattr(backends, "openvino_available", lambda: False)
    name, reason = backends.resolve_backend("auto", "cpu", 10**9, tmp_path)
    assert name == "torch" and "instructx2x[openvino]" in reason


def test_openvino_on_a_gpu_device_and_unknown_backends_are_refused():
    with pytest.raises(ParameterError, match="runs the model on the CPU, not on 'cuda'"):
        backends.check_backend("openvino", "cuda")
    with pytest.raises(ParameterError, match="unknown backend 'onnx'"):
        backends.check_backend("onnx")


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(backends.CACHE_ENV, str(tmp_path / "x"))
    assert backends.cache_folder() == tmp_path / "x" / "openvino"
    monkeypatch.delenv(backends.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert backends.cache_folder() == tmp_path / "xdg" / "instructx2x" / "openvino"
    assert backends.cache_folder(tmp_path / "given") == tmp_path / "given"
