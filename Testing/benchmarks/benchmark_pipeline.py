"""Speed of the InstructX2X pipeline against baselines run in the same process.

Prints each figure as it is measured; the last line is one JSON object with all of them.

Sections (and the figure each aims for):
  overhead    RSE edit vs diffusers' StableDiffusionInstructPix2PixPipeline, same tiny model,
              steps and seed (target ratio <= 1.03).
  preview     guidance preview vs a full 100-step edit (target ratio <= 0.05).
  equivalence the default CPU sampling vs the paper's, on the tiny model: masks and mean
              absolute difference of the edits (mean of 3 seeds).
  sd15        an SD-1.5-size InstructPix2Pix (random weights, 859.5 M UNet parameters) at
              512 px: our default CPU path, measured end to end, vs the authors' configuration
              (fp32, attention slicing, DDIM 100 steps), whose per-step time is measured and
              multiplied out (a full run takes ~40 min on 2 cores). Targets: <= 60 s, >= 15x.
  gpu         100-step edit seconds and peak memory when CUDA is present.
  batch       images per second through InstructX2XEditor.edit_batch at batch 1, 4 and 16
              (tiny model, its native 256 px, the default CPU sampler).
  backends    torch against OpenVINO (--backend), the SD-1.5-size model at 512 px with every
              default `instructx2x edit` picks: setup (OpenVINO: conversion into a fresh
              cache, or --openvino-cache), first and warm edit with the wall and CPU time of
              each network's calls and of the rest, peak resident memory, each in a process
              of its own; then OpenVINO from its cache in a new process; then both with
              oneDNN's and OpenVINO's kernels limited to AVX-512 BF16 (AVX512_BF16_LIMITS: no
              AMX), as an AVX-512 BF16 CPU runs (bf16); then with torch's, MKL's, oneDNN's and
              OpenVINO's kernels limited to AVX2 (AVX2_LIMITS), as an AVX2-only CPU runs
              (fp32). The two edits of each ISA are compared (the same edit within a
              tolerance). --backends-runs picks some of the runs. Targets: warm
              edit <= 60 s and >= 2x faster than torch. Not in the default sections (the native
              and AVX2 runs took about 15 minutes on 2 idle AMX cores, conversion included).
  openvino-unet
              one guidance-batch call of the SD-1.5-size UNet by OpenVINO per precision and
              format (--unet-formats: float32; int8 weights by NNCF's weight compression; int8
              activations and weights by NNCF's post-training quantization, calibrated on
              guidance-batch inputs; the int8 formats need nncf): CPU time, the layers'
              shares, each int8 prediction's distance to float32's. Not in the defaults.

Usage: python benchmark_pipeline.py [--sections overhead,preview,equivalence,sd15,gpu,backends,openvino-unet]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from instructx2x import EditParameters, InstructX2XEditor, Radiograph, make_scheduler
from instructx2x.devices import cpu_description
from instructx2x.loading import ModelInfo
from instructx2x.pipeline import InstructX2XPipeline
from instructx2x.schedulers import FEW_STEP_SOLVER_STEPS, PAPER_STEPS, default_scheduler
from instructx2x.untrained import build_untrained_pipeline, load_clip_tokenizer

PROMPT = "Add the finding of pleural effusion"
# The default CPU sampling (what `instructx2x edit` picks on a CPU), the paper's, and DDIM with
# 10 steps as a yardstick of what a tenth of the paper's steps costs.
FAST = {"scheduler": default_scheduler(torch.device("cpu")), "num_inference_steps": FEW_STEP_SOLVER_STEPS}
PAPER = {"scheduler": "ddim", "num_inference_steps": PAPER_STEPS}
DDIM_10 = {"scheduler": "ddim", "num_inference_steps": 10}
SD15_INFO = ModelInfo("sd15-size-random", "random weights", "0" * 64, False)


# printed beside every figure: timings differ by CPU kind (docs/benchmarks.md section 1)
CPU = cpu_description()


def report(results: dict, key: str, value, unit: str = "") -> None:
    results[key] = value
    shown = f"{value:.4g}" if isinstance(value, float) else value
    print(f"{key:<44} {shown} {unit} [{CPU}]".replace("  [", " [").rstrip(), flush=True)


def smooth_image(size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    base = torch.rand(1, 1, 8, 8, generator=g)
    return torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear").clamp(0, 1)


def timed(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def section_overhead(results: dict) -> None:
    from diffusers import StableDiffusionInstructPix2PixPipeline

    ours = build_untrained_pipeline()
    ours.set_progress_bar_config(disable=True)
    theirs = StableDiffusionInstructPix2PixPipeline(
        vae=ours.vae,
        text_encoder=ours.text_encoder,
        tokenizer=ours.tokenizer,
        unet=ours.unet,
        scheduler=make_scheduler("ddim"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    theirs.set_progress_bar_config(disable=True)
    image = smooth_image(256)
    steps = 100

    def run_ours():
        ours(
            PROMPT,
            image,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        )

    def run_theirs():
        theirs(
            PROMPT,
            image=image.expand(-1, 3, -1, -1),
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        )

    run_ours(), run_theirs()  # warm-up
    ours_s, theirs_s = [], []
    for _ in range(3):  # alternate, so drifts of the machine hit both alike
        ours_s.append(timed(run_ours, 1))
        theirs_s.append(timed(run_theirs, 1))
    report(results, "overhead.ours_rse_edit_s", statistics.median(ours_s), "s")
    report(results, "overhead.diffusers_ip2p_s", statistics.median(theirs_s), "s")
    report(
        results, "overhead.ratio", statistics.median(ours_s) / statistics.median(theirs_s), "(target <= 1.03)"
    )


def section_preview(results: dict) -> None:
    pipe = build_untrained_pipeline()
    pipe.set_progress_bar_config(disable=True)
    image = smooth_image(256)
    kwargs = dict(num_inference_steps=100, output_type="pt")
    preview = timed(
        lambda: pipe(PROMPT, image, guidance_only=True, generator=torch.Generator().manual_seed(0), **kwargs),
        3,
    )
    edit = timed(lambda: pipe(PROMPT, image, generator=torch.Generator().manual_seed(0), **kwargs), 3)
    report(results, "preview.preview_s", preview, "s")
    report(results, "preview.edit_100_steps_s", edit, "s")
    report(results, "preview.ratio", preview / edit, "(target <= 0.05)")


def section_equivalence(results: dict, seeds: tuple[int, ...] = (0, 1, 2)) -> None:
    """The default CPU sampling vs the paper's, mean over ``seeds``; DDIM 10 as a yardstick."""
    image = smooth_image(256)

    def edit(settings: dict, dtype: torch.dtype, seed: int):
        pipe = build_untrained_pipeline()
        pipe.scheduler = make_scheduler(settings["scheduler"])
        pipe.set_progress_bar_config(disable=True)
        pipe.to(dtype=dtype)
        return pipe(
            PROMPT,
            image,
            num_inference_steps=settings["num_inference_steps"],
            tau=0.3,
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
        )

    same_mask = True
    mad: dict[str, list[float]] = {"fast": [], "ddim10": [], "fp32": []}
    iou: list[float] = []
    for seed in seeds:
        paper = edit(PAPER, torch.bfloat16, seed)
        inside = paper.edit_masks > 0
        for name, settings, dtype in (
            ("fast", FAST, torch.bfloat16),
            ("ddim10", DDIM_10, torch.bfloat16),
            ("fp32", PAPER, torch.float32),
        ):
            other = edit(settings, dtype, seed)
            mad[name].append(float((paper.images - other.images).abs()[inside].mean()))
            if name == "fast":
                same_mask &= bool(torch.equal(paper.edit_masks, other.edit_masks))
            if name == "fp32":
                union = (paper.edit_masks + other.edit_masks).clamp(max=1).sum()
                iou.append(float((paper.edit_masks * other.edit_masks).sum() / union))
    report(results, "equivalence.fast_settings", f"{FAST['scheduler']} {FAST['num_inference_steps']} steps")
    report(results, "equivalence.mask_identical_fast_vs_paper", same_mask)
    report(
        results, "equivalence.mad_inside_mask_fast_vs_paper", statistics.mean(mad["fast"]), "(intensity 0-1)"
    )
    report(
        results, "equivalence.mad_inside_mask_ddim10_vs_paper", statistics.mean(mad["ddim10"]), "(yardstick)"
    )
    report(
        results, "equivalence.mad_inside_mask_bf16_vs_fp32", statistics.mean(mad["fp32"]), "(intensity 0-1)"
    )
    report(results, "equivalence.mask_iou_bf16_vs_fp32", statistics.mean(iou))


def build_sd15_pipeline() -> InstructX2XPipeline:
    """SD-1.5-size InstructPix2Pix components with random weights, from the shipped configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = resources.files("instructx2x") / "resources" / "sd15_ip2p"

    def config(component):
        return json.loads((root / component / "config.json").read_text())

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(config("unet")).eval()
        vae = AutoencoderKL.from_config(config("vae")).eval()
        text_encoder = CLIPTextModel(CLIPTextConfig(**config("text_encoder"))).eval()
    return InstructX2XPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(),
        unet=unet,
        scheduler=make_scheduler("ddim"),
    )


def default_sd15_editor(device: str) -> tuple[InstructX2XEditor, Radiograph, EditParameters]:
    """The SD-1.5-size model on ``device`` with every default `instructx2x edit` would pick."""
    editor = InstructX2XEditor(build_sd15_pipeline(), SD15_INFO, device=device, dtype="auto")
    editor.pipeline.scheduler = make_scheduler(default_scheduler(editor.device))
    radiograph = Radiograph(smooth_image(512)[0, 0].numpy(), "smooth.png", "0" * 64, "png", 8)
    return editor, radiograph, editor.resolve(EditParameters(PROMPT))


def describe(editor: InstructX2XEditor, parameters: EditParameters) -> str:
    return (
        f"{str(editor.dtype).replace('torch.', '')} (relevance "
        f"{editor.precision['relevance_dtype']}), {type(editor.pipeline.scheduler).__name__} "
        f"{parameters.num_inference_steps} steps, attention {editor.attention}"
    )


def section_sd15(results: dict, baseline_steps: int) -> None:
    pipe = build_sd15_pipeline()
    pipe.set_progress_bar_config(disable=True)
    report(
        results, "sd15.unet_parameters_millions", sum(p.numel() for p in pipe.unet.parameters()) / 1e6, "M"
    )
    image = smooth_image(512)
    pixels = pipe.image_processor.normalize(image.expand(-1, 3, -1, -1))

    # The authors' configuration: fp32, attention slicing, DDIM. Time the parts of one edit:
    # VAE encode, `baseline_steps` CFG-batch UNet calls, VAE decode; an edit is 101 UNet calls
    # (100 steps + the relevance map).
    pipe.unet.set_attention_slice("auto")
    embeds = pipe.encode_prompt(PROMPT, torch.device("cpu"))
    with torch.no_grad():
        start = time.perf_counter()
        posterior = pipe.vae.encode(pixels).latent_dist
        encode_s = time.perf_counter() - start
        latents = posterior.mode()
        model_input = torch.cat([torch.cat([latents] * 3), torch.cat([latents] * 3)], dim=1)
        step_s = []
        for step in range(baseline_steps):
            start = time.perf_counter()
            pipe.unet(model_input, 500 - step, encoder_hidden_states=embeds)
            step_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        pipe.vae.decode(latents / pipe.vae.config.scaling_factor)
        decode_s = time.perf_counter() - start
    per_step = statistics.median(step_s)
    baseline = encode_s + decode_s + 101 * per_step
    report(results, "sd15.paper_fp32_sliced_unet_step_s", per_step, "s")
    report(results, "sd15.paper_fp32_vae_encode_decode_s", encode_s + decode_s, "s")
    report(results, "sd15.paper_fp32_edit_s_extrapolated", baseline, "s")

    # Our default CPU path, measured end to end through the editor as `instructx2x edit` runs
    # it: bf16, SDPA attention, DPM-Solver++ with its default steps, channels-last VAE. The
    # first edit in a process pays oneDNN's one-time kernel setup; the second shows the rest.
    # A fresh pipeline: undoing the slicing (set_default_attn_processor) would not bring back
    # SDPA, so reusing the baseline's would time a slower attention than users get.
    del pipe
    editor, radiograph, parameters = default_sd15_editor("cpu")
    report(results, "sd15.default_cpu_settings", describe(editor, parameters))

    def full_edit():
        editor._guidance_cache = None  # a full edit: nothing reused from the previous one
        return editor.edit(radiograph, parameters)

    edits = [timed(full_edit, 1) for _ in range(2)]
    report(results, "sd15.default_cpu_edit_s", edits[0], "s, first in the process (target <= 60)")
    report(results, "sd15.default_cpu_edit_warm_s", edits[1], "s, second")
    editor._guidance_cache = None
    report(
        results, "sd15.default_cpu_preview_s", timed(lambda: editor.preview(radiograph, parameters), 1), "s"
    )
    report(
        results,
        "sd15.default_cpu_edit_after_preview_s",
        timed(lambda: editor.edit(radiograph, parameters), 1),
        "s (reuses the preview's encode and R)",
    )
    editor.pipeline.relevance_dtype = None  # what the fp32 relevance call costs
    report(results, "sd15.default_cpu_edit_relevance_in_model_dtype_s", timed(full_edit, 1), "s")
    report(results, "sd15.speedup", baseline / edits[0], "x (target >= 15)")


def section_gpu(results: dict) -> None:
    """The default GPU path (the authors' DDIM, 100 steps, half precision) through the editor."""
    if not torch.cuda.is_available():
        report(results, "gpu", "skipped: no CUDA device")
        return
    editor, radiograph, parameters = default_sd15_editor("cuda")
    editor.edit(radiograph, parameters)  # warm-up: kernels, cuDNN autotuning
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    editor.edit(radiograph, parameters)
    torch.cuda.synchronize()
    report(results, "gpu.device", torch.cuda.get_device_name())
    report(results, "gpu.settings", describe(editor, parameters))
    report(results, "gpu.edit_100_steps_s", time.perf_counter() - start, "s (target <= 1)")
    report(results, "gpu.peak_memory_gib", torch.cuda.max_memory_allocated() / 2**30, "GiB (target <= 4)")


def section_batch(results: dict) -> None:
    editor = InstructX2XEditor(
        build_untrained_pipeline(), ModelInfo("untrained-tiny", "untrained", "0" * 64, False), device="cpu"
    )
    editor.pipeline.scheduler = make_scheduler(default_scheduler(editor.device))
    films = [
        Radiograph(smooth_image(320)[0, 0].numpy(), f"film{i}.png", "0" * 64, "png", 8) for i in range(16)
    ]
    single = None
    for size in (1, 4, 16):
        parameters = [EditParameters(PROMPT, seed=i) for i in range(size)]
        editor.edit_batch(films[:size], parameters)  # warm-up at this shape
        seconds = timed(lambda batch=films[:size], p=parameters: editor.edit_batch(batch, p), 3)
        rate = size / seconds
        single = single or rate
        report(results, f"batch.{size}_images_per_s", rate, f"img/s ({rate / single:.2f}x batch 1)")


# An AVX2-only CPU, emulated: torch's own kernels, MKL (torch's fp32 matrix products, in linear
# layers and attention), both oneDNN copies (torch's and OpenVINO's) and OpenVINO's kernels
# limited to AVX2. OpenVINO 2026.4 needs OV_CPU_MAX_ISA beside ONEDNN_MAX_CPU_ISA: with the
# latter alone its CPU plugin fails to start. Not capped: the MLAS matrix products of OpenVINO's
# f32 linear layers (docs/benchmarks.md section 3).
AVX2_LIMITS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OV_CPU_MAX_ISA": "AVX2",
}
# An AMX CPU run as an AVX-512 BF16 one (bf16 in AVX-512 instructions, no AMX tiles): both
# oneDNN copies and OpenVINO's kernels capped below AMX. torch's own kernels (ATen's AVX-512)
# and MKL's fp32 products use no AMX either way, so they are left alone.
AVX512_BF16_LIMITS = {
    "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16",
    "OV_CPU_MAX_ISA": "AVX512_CORE_BF16",
}
ISA_LIMITS = {"native": {}, "avx512bf16": AVX512_BF16_LIMITS, "avx2": AVX2_LIMITS}
BACKEND_RUNS = (
    "native.torch",
    "native.openvino",
    "native.openvino.from_cache",
    "avx512bf16.torch",
    "avx512bf16.openvino",
    "avx2.torch",
    "avx2.openvino",
)


class NetworkClock:
    """Wall and CPU seconds (all threads) spent inside each network's calls, by call: the UNet by
    batch size (three: the guidance batch; two: the relevance call), the autoencoder's encode
    and decode, the text encoder. What an edit spends outside them is the pipeline's own work
    (schedulers, guidance, relevance map, composite) and, with torch, the relevance call's casts."""

    def __init__(self, pipeline) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.wrap(pipeline.unet, "forward", lambda sample, *_, **__: f"unet_batch_{sample.shape[0]}")
        self.wrap(pipeline.vae, "encode", lambda *_, **__: "vae_encode")
        self.wrap(pipeline.vae, "decode", lambda latents, *_, **__: f"vae_decode_batch_{latents.shape[0]}")
        self.wrap(pipeline.text_encoder, "forward", lambda *_, **__: "text_encoder")

    def wrap(self, owner, attribute: str, name_of) -> None:
        original = getattr(owner, attribute)

        def timed_call(*args, **kwargs):
            name = name_of(*args, **kwargs)
            start, cpu_start = time.perf_counter(), cpu_seconds()
            try:
                return original(*args, **kwargs)
            finally:
                self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - start
                self.cpu[name] = self.cpu.get(name, 0.0) + cpu_seconds() - cpu_start
                self.calls[name] = self.calls.get(name, 0) + 1

        setattr(owner, attribute, timed_call)  # the instance's attribute: nn.Module.__call__ finds it

    def reset(self) -> None:
        self.wall, self.cpu, self.calls = {}, {}, {}

    def figures(self, wall: float, cpu: float) -> dict:
        """Each call's total seconds and count, and the rest of an edit of ``wall`` / ``cpu`` s."""
        figures = {
            name: {"calls": self.calls[name], "wall_s": self.wall[name], "cpu_s": self.cpu[name]}
            for name in sorted(self.wall)
        }
        figures["outside_networks"] = {
            "calls": 0,
            "wall_s": wall - sum(self.wall.values()),
            "cpu_s": cpu - sum(self.cpu.values()),
        }
        return figures


def backend_child(backend: str, dtype: str, cache: str, output: str) -> None:
    """One backend in this process: setup, first and warm edit with each network's share,
    memory; the result as JSON on the last line of stdout and the edit in ``output`` (npz)."""
    load = os.getloadavg()[0]
    pipe = build_sd15_pipeline()
    started, cpu_start = time.perf_counter(), cpu_seconds()
    editor = InstructX2XEditor(
        pipe,
        SD15_INFO,
        device="cpu",
        dtype=dtype,
        backend=backend,
        openvino_cache=cache,
    )
    del pipe
    editor.pipeline.scheduler = make_scheduler(default_scheduler(editor.device))
    setup, setup_cpu = time.perf_counter() - started, cpu_seconds() - cpu_start
    radiograph = Radiograph(smooth_image(512)[0, 0].numpy(), "smooth.png", "0" * 64, "png", 8)
    parameters = editor.resolve(EditParameters(PROMPT))
    clock = NetworkClock(editor.pipeline)
    times, cpu_times, results = [], [], []
    for _ in range(2):
        editor._guidance_cache = None  # a full edit: nothing reused from the previous one
        clock.reset()
        start, cpu_start = time.perf_counter(), cpu_seconds()
        results.append(editor.edit(radiograph, parameters))
        times.append(time.perf_counter() - start)
        cpu_times.append(cpu_seconds() - cpu_start)
    result = results[-1]
    np.savez(output, edited=result.edited, mask=result.edit_mask)
    with open("/proc/self/status") as handle:  # anonymous memory: what the file cache cannot give back
        anonymous = next(int(line.split()[1]) for line in handle if line.startswith("RssAnon:")) * 1024
    runtime = editor.runtime
    figures = {
        "cpu": cpu_description(),
        "settings": describe(editor, parameters),
        "backend": editor.backend_info,
        "setup_s": setup,
        "setup_cpu_s": setup_cpu,
        "convert_s": None if runtime is None else runtime.convert_seconds,
        "compile_s": None if runtime is None else runtime.compile_seconds,
        "first_edit_s": times[0],
        "warm_edit_s": times[1],
        "first_edit_cpu_s": cpu_times[0],
        "warm_edit_cpu_s": cpu_times[1],
        "warm_edit_networks": clock.figures(times[1], cpu_times[1]),
        "compiled": None if runtime is None else runtime.compiled_description(),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
        "anonymous_after_gib": anonymous / 2**30,
        "load_average": [load, os.getloadavg()[0]],
    }
    Path(output).with_suffix(".json").write_text(json.dumps(figures))
    print(json.dumps(figures))


def cpu_seconds() -> float:
    """CPU time of this process, all threads: on a machine shared with other work it grows as
    the work does, where wall time grows with the others' load too."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def section_backends(results: dict, runs: tuple[str, ...] = BACKEND_RUNS, cache: Path | None = None) -> None:
    """torch and OpenVINO side by side, each run in a child process (own memory, own ISA);
    ``runs`` picks some of ``BACKEND_RUNS``; ``cache``: an OpenVINO cache folder to convert
    into, or to take the converted model from (none: a fresh one per ISA)."""
    folder = Path(tempfile.mkdtemp(prefix="instructx2x-backends-"))
    for run in runs:
        isa, backend = run.split(".")[:2]
        name = f"backends.{run}"
        cache_folder = cache or folder / f"cache-{isa}"
        output = folder / f"{run}.npz"
        environment = {**os.environ, **ISA_LIMITS[isa]}
        command = [sys.executable, __file__, "--child", f"{backend},auto,{cache_folder},{output}"]
        done = subprocess.run(command, env=environment, capture_output=True, text=True)
        if done.returncode:
            report(results, name, f"failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        for key in ("cpu", "settings"):
            report(results, f"{name}.{key}", figures[key])
        report(results, f"{name}.reason", figures["backend"]["reason"])
        for key, unit in (
            ("setup_s", "s (OpenVINO: cache check and conversion)"),
            ("setup_cpu_s", "CPU s"),
            ("convert_s", "s"),
            ("compile_s", "s (during the edits)"),
            ("first_edit_s", "s"),
            ("first_edit_cpu_s", "CPU s"),
            ("warm_edit_s", "s (target <= 60)"),
            ("warm_edit_cpu_s", "CPU s (all threads)"),
            ("peak_rss_gib", "GiB"),
            ("anonymous_after_gib", "GiB anonymous after the edits (mapped files aside)"),
        ):
            if figures[key] is not None:
                report(results, f"{name}.{key}", figures[key], unit)
        report(results, f"{name}.load_average", figures["load_average"], "(1 min, start and end)")
        for network, shares in figures["warm_edit_networks"].items():
            report(
                results,
                f"{name}.warm_edit.{network}",
                f"{shares['wall_s']:.1f} s wall, {shares['cpu_s']:.1f} CPU s, {shares['calls']} calls",
            )
        if figures["compiled"]:
            report(results, f"{name}.compiled", figures["compiled"])
    for isa in ISA_LIMITS:
        torch_warm = results.get(f"backends.{isa}.torch.warm_edit_s")
        openvino_warm = results.get(f"backends.{isa}.openvino.warm_edit_s")
        if isinstance(torch_warm, float) and isinstance(openvino_warm, float):
            report(results, f"backends.{isa}.speedup_warm", torch_warm / openvino_warm, "x (target >= 2)")
            cpu = [results[f"backends.{isa}.{backend}.warm_edit_cpu_s"] for backend in ("torch", "openvino")]
            report(results, f"backends.{isa}.speedup_warm_cpu_time", cpu[0] / cpu[1], "x, in CPU time")
        edits = [folder / f"{isa}.{backend}.npz" for backend in ("torch", "openvino")]
        if all(path.is_file() for path in edits):
            ours, theirs = (np.load(path) for path in edits)
            report(
                results, f"backends.{isa}.masks_identical", bool(np.array_equal(ours["mask"], theirs["mask"]))
            )
            difference = np.abs(ours["edited"] - theirs["edited"])
            report(
                results,
                f"backends.{isa}.edited_max_abs_difference",
                float(difference.max()),
                "(intensity 0-1)",
            )
            report(results, f"backends.{isa}.edited_mean_abs_difference", float(difference.mean()))


UNET_FORMATS = ("f32", "int8-weights", "int8")
# the int8 UNet's calibration: guidance-batch inputs at each of the default sampler's timesteps,
# for these noise seeds; the timed call's noise seed is none of them
CALIBRATION_SEEDS = (0, 1)
TIMED_SEED = 99


def guidance_batch_inputs(pipe, seeds: tuple[int, ...]) -> list[list[np.ndarray]]:
    """One guidance-batch UNet call's inputs per seed and default-sampler timestep, built as
    the pipeline builds them (``InstructX2XPipeline.__call__``): the smooth film's latents
    noised to the timestep, with its posterior mode as the image latents, and the prompt's and
    the empty prompt's embeddings, from the model's own autoencoder and text encoder."""
    cpu = torch.device("cpu")
    scheduler = make_scheduler(default_scheduler(cpu))
    scheduler.set_timesteps(FEW_STEP_SOLVER_STEPS)
    pixels = (smooth_image(512) * 2 - 1).expand(1, 3, 512, 512)
    with torch.no_grad():
        states = pipe.encode_prompt(PROMPT, cpu).float().numpy()
        image_latents, source = pipe.prepare_image_latents(pixels, torch.Generator().manual_seed(0))
    image = torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)]).float()
    inputs = []
    for seed in seeds:
        noise = torch.randn(source.shape, generator=torch.Generator().manual_seed(seed))
        for timestep in scheduler.timesteps:
            latents = scheduler.add_noise(source, noise, timestep.reshape(1))
            sample = torch.cat(
                [scheduler.scale_model_input(torch.cat([latents] * 3), timestep), image], dim=1
            )
            inputs.append([sample.numpy(), np.array([float(timestep)], dtype=np.float32), states])
    return inputs


def quantized_unet(runtime, calibration: list[list[np.ndarray]], folder: Path | None, results: dict):
    """The UNet with int8 activations and weights in its convolutions and linear layers (NNCF's
    post-training quantization, ``nncf.quantize``, calibrated on ``calibration``; attention
    stays float), read from ``folder`` when it holds this entry's, else quantized (and kept
    there when ``folder`` is given)."""
    import nncf
    import openvino

    record = {"entry": runtime.entry.name, "nncf": nncf.__version__, "seeds": list(CALIBRATION_SEEDS)}
    if folder is not None and (folder / "unet-int8.json").is_file():
        kept = json.loads((folder / "unet-int8.json").read_text())
        if kept != record:
            raise SystemExit(
                f"{folder} holds an int8 UNet of other settings ({kept}); choose another folder."
            )
        return runtime.core.read_model(folder / "unet-int8.xml")
    model = runtime.core.read_model(runtime.entry / "unet.xml")
    model.reshape({index: openvino.PartialShape(list(x.shape)) for index, x in enumerate(calibration[0])})
    started, cpu_start = time.perf_counter(), cpu_seconds()
    model = nncf.quantize(
        model,
        nncf.Dataset(calibration),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(calibration),
        ignored_scope=nncf.IgnoredScope(types=["ScaledDotProductAttention"]),
    )
    report(
        results,
        "openvino_unet.int8.quantize_s",
        time.perf_counter() - started,
        f"s ({cpu_seconds() - cpu_start:.0f} CPU s, {len(calibration)} calibration calls)",
    )
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        openvino.save_model(model, folder / "unet-int8.xml", compress_to_fp16=False)
        (folder / "unet-int8.json").write_text(json.dumps(record))
    return model


def section_openvino_unet(
    results: dict,
    cache: Path | None,
    formats: tuple[str, ...] = UNET_FORMATS,
    int8_folder: Path | None = None,
) -> None:
    """One guidance-batch call of the SD-1.5-size UNet by OpenVINO, per precision (bf16 where
    the CPU plugin has it, f32) and format: float32; int8 weights (NNCF's INT8_ASYM weight
    compression); int8 activations and weights (``quantized_unet``). CPU time, the share of
    each kind of layer, and how far each int8 prediction is from float32's. The int8 formats
    need nncf (``pip install nncf==3.4.0 -c constraints.txt``)."""
    import openvino

    from instructx2x.openvino_runtime import OpenVINORuntime

    pipe = build_sd15_pipeline()
    runtime = OpenVINORuntime(pipe, SD15_INFO.sha256, 512, cache, name=SD15_INFO.name)
    inputs = guidance_batch_inputs(pipe, (TIMED_SEED,))[1]  # the middle timestep
    calibration = guidance_batch_inputs(pipe, CALIBRATION_SEEDS) if "int8" in formats else []
    del pipe
    if set(formats) - {"f32"}:
        try:
            import nncf
        except ImportError:
            raise SystemExit(
                f"the UNet formats {sorted(set(formats) - {'f32'})} need nncf: "
                "pip install nncf==3.4.0 -c constraints.txt (or --unet-formats f32)"
            ) from None
    quantized = quantized_unet(runtime, calibration, int8_folder, results) if "int8" in formats else None
    for precision in ("bf16", "f32") if runtime.bf16 else ("f32",):
        predictions = {}
        for weights in formats:
            name = f"openvino_unet.{precision}.{weights}"
            if weights == "int8":
                assert quantized is not None  # quantized above when int8 is a format
                model = quantized.clone()
            else:
                model = runtime.core.read_model(runtime.entry / "unet.xml")
            if weights == "int8-weights":
                started = time.perf_counter()
                model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
                report(results, f"{name}.compress_s", time.perf_counter() - started, "s")
            model.reshape({index: openvino.PartialShape(list(x.shape)) for index, x in enumerate(inputs)})
            started = time.perf_counter()
            config = {
                "INFERENCE_PRECISION_HINT": precision,
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": runtime.threads,
                "PERF_COUNT": True,
            }
            request = runtime.core.compile_model(model, "CPU", config).create_infer_request()
            report(results, f"{name}.compile_s", time.perf_counter() - started, "s")
            request.infer(inputs)  # warm-up
            start, cpu_start = time.perf_counter(), cpu_seconds()
            request.infer(inputs)
            report(results, f"{name}.call_s", time.perf_counter() - start, "s, one guidance-batch call")
            report(results, f"{name}.call_cpu_s", cpu_seconds() - cpu_start, "CPU s")
            report(results, f"{name}.load_average", os.getloadavg()[0], "(1 min)")
            layers: dict[str, float] = {}
            for layer in request.profiling_info:
                kind = f"{layer.node_type} ({layer.exec_type})"
                layers[kind] = layers.get(kind, 0.0) + layer.real_time.total_seconds()
            total = sum(layers.values())
            shares = sorted(layers.items(), key=lambda item: -item[1])[:6]
            report(
                results, f"{name}.layers", ", ".join(f"{kind} {100 * t / total:.0f} %" for kind, t in shares)
            )
            predictions[weights] = np.array(request.get_output_tensor(0).data, copy=True)
            del request, model
        for weights in set(predictions) - {"f32"}:
            if "f32" in predictions:
                difference = np.abs(predictions[weights] - predictions["f32"])
                report(
                    results,
                    f"openvino_unet.{precision}.{weights}_vs_f32",
                    f"max {difference.max():.4f}, mean {difference.mean():.4f} "
                    f"(mean |prediction| {np.abs(predictions['f32']).mean():.3f})",
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", default="overhead,preview,equivalence,batch,sd15,gpu")
    parser.add_argument(
        "--baseline-steps", type=int, default=2, help="UNet steps timed for the fp32 baseline (sd15 section)"
    )
    parser.add_argument(
        "--backends-runs",
        default=",".join(BACKEND_RUNS),
        help=f"the backends section's runs, some of {','.join(BACKEND_RUNS)}",
    )
    parser.add_argument(
        "--openvino-cache",
        type=Path,
        help="backends and openvino-unet sections: OpenVINO cache folder to convert into or take the model from "
        "(default: a fresh one per ISA, so the first OpenVINO run converts)",
    )
    parser.add_argument(
        "--unet-formats",
        default=",".join(UNET_FORMATS),
        help=f"openvino-unet section: the UNet formats to time, some of {','.join(UNET_FORMATS)} "
        "(the int8 ones need nncf)",
    )
    parser.add_argument(
        "--int8-unet",
        type=Path,
        help="openvino-unet section: folder to keep the int8 UNet in, or to take it from "
        "(default: quantized in every run)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)  # backend,dtype,cache,output: one run of backends
    args = parser.parse_args()
    runs = tuple(args.backends_runs.split(","))
    if set(runs) - set(BACKEND_RUNS):
        parser.error(
            f"unknown backends runs {sorted(set(runs) - set(BACKEND_RUNS))}; choose from {BACKEND_RUNS}"
        )
    formats = tuple(args.unet_formats.split(","))
    if set(formats) - set(UNET_FORMATS):
        parser.error(
            f"unknown UNet formats {sorted(set(formats) - set(UNET_FORMATS))}; choose from {UNET_FORMATS}"
        )
    if args.child:
        backend_child(*args.child.split(","))
        return
    results: dict = {"torch_threads": torch.get_num_threads(), "cpu": CPU}
    sections = {
        "overhead": section_overhead,
        "preview": section_preview,
        "equivalence": section_equivalence,
        "gpu": section_gpu,
        "batch": section_batch,
        "sd15": lambda r: section_sd15(r, args.baseline_steps),
        "backends": lambda r: section_backends(r, runs, args.openvino_cache),
        "openvino-unet": lambda r: section_openvino_unet(r, args.openvino_cache, formats, args.int8_unet),
    }
    for name in args.sections.split(","):
        sections[name](results)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
