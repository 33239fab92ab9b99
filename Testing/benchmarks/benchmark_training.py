"""Training throughput and memory on this machine, against nothing but itself.

Sections:
  small   the tiny model (untrained-tiny) at 64 px, batch 2, accumulation 1, the precision the
          CPU supports: samples/s over the timed steps and peak resident memory.
  sd15    an SD-1.5-size InstructPix2Pix (fresh random weights from the shipped configs:
          859.5 M UNet parameters, full VAE and CLIP text encoder) at 256 px, batch 1,
          gradient checkpointing: seconds per step, samples/s, peak resident memory.
  gpu     the SD-1.5 configuration at 512 px when CUDA is present: samples/s, peak VRAM and
          the projected wall time of the paper's run (4,500 steps x 576 samples on 8 GPUs).
  demo    the demo model's recipe (Training/configs/demo.yaml and demo-focal.yaml)
          timed stage by stage on a few pairs and steps, and projected to `make demo-model`'s
          counts (6,000 pairs, the config's autoencoder and UNet steps; the focal stage's 1,800
          pairs and UNet steps, which cost what the first's do): does this machine rebuild the demo model
          within the hour the recipe is sized to? A minute or two with --steps 8 (`make demo-model-estimate`)
          instead of the rebuild's hours; --steps N gives each of its two epochs N UNet steps.

Each section builds a small synthetic dataset first (seconds) and times steps after the
first (which pays one-time setup). Prints one line per figure with the CPU kind, then JSON.

Usage: python benchmark_training.py [--sections small,sd15,gpu,demo] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch

from instructx2x.devices import cpu_description
from instructx2x_train.cohort import CohortConfig, generate_cohort
from instructx2x_train.counterfactuals import PurePairsConfig, write_pure_pairs
from instructx2x_train.dataset import BuildConfig, build_dataset
from instructx2x_train.train import mixed_precision, train
from instructx2x_train.train_config import load_config

CPU = cpu_description()
CONFIGS = Path(__file__).resolve().parents[2] / "Training" / "configs"
SMOKE = CONFIGS / "smoke.yaml"
DEMO_PAIRS = 6000  # `make demo-model`'s pure-pairs count (Makefile)
FOCAL_PAIRS = 1800  # its focal stage's (Training/configs/demo-focal.yaml)


def report(results: dict, key: str, value, unit: str = "") -> None:
    results[key] = value
    shown = f"{value:.4g}" if isinstance(value, float) else value
    print(f"{key:<36} {shown} {unit} [{CPU}]", flush=True)


def dataset(root: Path, resolution: int) -> Path:
    generate_cohort(
        root / "cohort", CohortConfig(patients=8, seed=1, rows=resolution + 32, columns=resolution)
    )
    build_dataset(
        BuildConfig(mimic_cxr=root / "cohort", diff_vqa=root / "cohort", resolution=resolution),
        root / "dataset",
    )
    return root / "dataset"


def step_times(config) -> list[float]:
    """Seconds of each UNet step of a training run (the first pays one-time setup)."""
    times: list[float] = []
    last = [time.perf_counter()]

    def on_event(event: dict) -> None:
        if event["event"] == "step":
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

    train(config, events=on_event, progress_bar=False)
    return times


def timed_run(overrides: list[str], steps: int) -> tuple[float, float]:
    """Seconds per step after the first, and the peak resident memory (GiB)."""
    times = step_times(load_config(SMOKE, [*overrides, f"steps={steps}", f"checkpointing.every={steps}"]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return sum(times[1:]) / max(len(times) - 1, 1), peak


def section_small(results: dict, steps: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        data = dataset(Path(folder), 64)
        per_step, peak = timed_run(
            [
                f"data.dataset={data}",
                f"output={folder}/run",
                "batch.effective=null",
                "batch.gradient_accumulation_steps=1",
            ],
            steps,
        )
    report(results, "small.seconds_per_step", per_step, "s (batch 2, 64 px)")
    report(results, "small.samples_per_s", 2 / per_step, "samples/s")
    report(results, "small.peak_rss_gib", peak, "GiB (process peak so far)")


def sd15_overrides() -> list[str]:
    root = resources.files("instructx2x") / "resources" / "sd15_ip2p"
    configs = {
        name: json.loads((root / name / "config.json").read_text())
        for name in ("unet", "vae", "text_encoder")
    }
    keep = {k: v for k, v in configs["unet"].items() if not k.startswith("_")}
    vae = {k: v for k, v in configs["vae"].items() if not k.startswith("_")}
    text = {
        k: v
        for k, v in configs["text_encoder"].items()
        if not k.startswith("_") and k not in ("architectures", "transformers_version")
    }
    return [
        "model.base=fresh",
        f"model.fresh_unet={json.dumps(keep)}",
        f"model.fresh_vae={json.dumps(vae)}",
        f"model.fresh_text_encoder={json.dumps(text)}",
        "model.gradient_checkpointing=true",
        "batch.per_device=1",
        "batch.effective=null",
        "batch.gradient_accumulation_steps=1",
        "ema.enabled=false",
    ]


def section_sd15(results: dict, steps: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        data = dataset(Path(folder), 256)
        per_step, peak = timed_run(
            [f"data.dataset={data}", f"output={folder}/run", "data.resolution=256", *sd15_overrides()], steps
        )
    report(results, "sd15_256.seconds_per_step", per_step, "s (batch 1, gradient checkpointing)")
    report(results, "sd15_256.samples_per_s", 1 / per_step, "samples/s")
    report(results, "sd15_256.peak_rss_gib", peak, "GiB")


def section_gpu(results: dict, steps: int) -> None:
    if not torch.cuda.is_available():
        report(results, "gpu", "skipped: no CUDA device")
        return
    with tempfile.TemporaryDirectory() as folder:
        data = dataset(Path(folder), 512)
        torch.cuda.reset_peak_memory_stats()
        per_step, _ = timed_run(
            [
                f"data.dataset={data}",
                f"output={folder}/run",
                "data.resolution=512",
                *sd15_overrides(),
                "batch.per_device=8",
            ],
            steps,
        )
    report(results, "gpu.device", torch.cuda.get_device_name())
    report(results, "gpu.samples_per_s", 8 / per_step, "samples/s (batch 8, 512 px)")
    report(results, "gpu.peak_vram_gib", torch.cuda.max_memory_allocated() / 2**30, "GiB")
    report(
        results,
        "gpu.paper_run_hours_on_8",
        4500 * 576 / (8 * 8 / per_step) / 3600,
        "h projected (4,500 steps x 576 samples, 8 such GPUs, linear scaling)",
    )


def pair_seconds(folder: Path, count: int, resolution: int) -> float:
    """Seconds per pure pair on 2 workers: two runs of count and 2 x count pairs, so that
    starting the worker processes cancels out."""
    seconds = []
    for n in (count, 2 * count):
        started = time.perf_counter()
        write_pure_pairs(
            folder / f"pairs-{n}", PurePairsConfig(pairs=n, seed=0, workers=2, resolution=resolution)
        )
        seconds.append(time.perf_counter() - started)
    return (seconds[1] - seconds[0]) / count


def section_demo(results: dict, steps: int) -> None:
    """Each stage's time per unit on a small sample, multiplied out to the recipe's counts.

    The latent cache fills during the first epoch (each film encoded once), so the UNet steps
    of the first epoch cost more than the rest: the sample has two epochs and times both.
    """
    recipe = load_config(CONFIGS / "demo.yaml")
    focal = load_config(CONFIGS / "demo-focal.yaml")
    batch, epoch = recipe.batch.per_device, max(steps, 4)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        per_pair = pair_seconds(root, batch * epoch, recipe.data.resolution)
        config = load_config(
            CONFIGS / "demo.yaml",
            [
                f"data.dataset={root / f'pairs-{batch * epoch}'}",
                f"output={root / 'run'}",
                f"steps={2 * epoch}",
                f"checkpointing.every={2 * epoch}",
                f"vae_pretraining.steps={2 * epoch}",
            ],
        )
        times = step_times(config)
        log = json.loads((root / "run" / "pretrained-vae" / "vae_log.json").read_text())["log"]
    per_vae_step = (log[-1]["seconds"] - log[0]["seconds"]) / (log[-1]["step"] - log[0]["step"])
    filling = sum(times[1:epoch]) / (epoch - 1)
    cached = sum(times[epoch:]) / epoch

    def unet_minutes(pairs: int, total_steps: int) -> float:
        first_epoch = min(-(-pairs // batch), total_steps)
        return (first_epoch * filling + (total_steps - first_epoch) * cached) / 60

    minutes = {
        "pairs": DEMO_PAIRS * per_pair / 60,
        "autoencoder": recipe.vae_pretraining.steps * per_vae_step / 60,
        "unet": unet_minutes(DEMO_PAIRS, recipe.steps),
        "focal_pairs": FOCAL_PAIRS * per_pair / 60,
        "focal_unet": unet_minutes(FOCAL_PAIRS, focal.steps),
    }
    precision = mixed_precision(recipe.precision)  # what the recipe's precision trains in here
    report(results, "demo.precision", "fp32" if precision == "no" else precision)
    report(results, "demo.seconds_per_pair", per_pair, f"s ({recipe.data.resolution} px, 2 workers)")
    report(
        results,
        "demo.seconds_per_autoencoder_step",
        per_vae_step,
        f"s (batch {recipe.vae_pretraining.batch})",
    )
    report(results, "demo.seconds_per_unet_step_filling", filling, "s (first epoch: latent cache fills)")
    report(results, "demo.seconds_per_unet_step", cached, f"s (batch {batch}, latents cached)")
    for stage, value in minutes.items():
        report(results, f"demo.projected_{stage}_minutes", value, "min")
    report(
        results,
        "demo.projected_minutes",
        sum(minutes.values()),
        f"min for {DEMO_PAIRS} + {FOCAL_PAIRS} pairs, {recipe.vae_pretraining.steps} autoencoder and "
        f"{recipe.steps} + {focal.steps} UNet steps (goal: 60)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", default="small,sd15,gpu,demo")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    results: dict = {"cpu": CPU, "torch_threads": torch.get_num_threads()}
    sections = {"small": section_small, "sd15": section_sd15, "gpu": section_gpu, "demo": section_demo}
    for name in args.sections.split(","):
        sections[name](results, args.steps)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
