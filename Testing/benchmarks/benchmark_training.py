"""Training throughput and memory on this machine (issue 9), against nothing but itself.

Sections:
  small   the tiny model (untrained-tiny) at 64 px, batch 2, accumulation 1, the precision the
          CPU supports: samples/s over the timed steps and peak resident memory.
  sd15    an SD-1.5-size InstructPix2Pix (fresh random weights from the shipped configs:
          859.5 M UNet parameters, full VAE and CLIP text encoder) at 256 px, batch 1,
          gradient checkpointing: seconds per step, samples/s, peak resident memory.
  gpu     the SD-1.5 configuration at 512 px when CUDA is present: samples/s, peak VRAM and
          the projected wall time of the paper's run (4,500 steps x 576 samples on 8 GPUs).

Each section builds a small synthetic dataset first (seconds) and times steps after the
first (which pays one-time setup). Prints one line per figure with the CPU kind, then JSON.

Usage: python benchmark_training.py [--sections small,sd15,gpu] [--steps 3]
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
from instructx2x_train.dataset import BuildConfig, build_dataset
from instructx2x_train.train import train
from instructx2x_train.train_config import load_config

CPU = cpu_description()
SMOKE = Path(__file__).resolve().parents[2] / "Training" / "configs" / "smoke.yaml"


def report(results: dict, key: str, value, unit: str = "") -> None:
    results[key] = value
    shown = f"{value:.4g}" if isinstance(value, float) else value
    print(f"{key:<36} {shown} {unit} [{CPU}]", flush=True)


def dataset(root: Path, resolution: int) -> Path:
    generate_cohort(root / "cohort", CohortConfig(patients=8, seed=1, rows=resolution + 32,
                                                  columns=resolution))
    build_dataset(BuildConfig(mimic_cxr=root / "cohort", diff_vqa=root / "cohort",
                              resolution=resolution), root / "dataset")
    return root / "dataset"


def timed_run(overrides: list[str], steps: int) -> tuple[float, float]:
    """Seconds per step after the first, and the peak resident memory (GiB)."""
    times: list[float] = []
    last = [time.perf_counter()]

    def on_event(event: dict) -> None:
        if event["event"] == "step":
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

    train(load_config(SMOKE, [*overrides, f"steps={steps}", f"checkpointing.every={steps}"]),
          events=on_event, progress_bar=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return sum(times[1:]) / max(len(times) - 1, 1), peak


def section_small(results: dict, steps: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        data = dataset(Path(folder), 64)
        per_step, peak = timed_run([f"data.dataset={data}", f"output={folder}/run",
                                    "batch.effective=null", "batch.gradient_accumulation_steps=1"], steps)
    report(results, "small.seconds_per_step", per_step, "s (batch 2, 64 px)")
    report(results, "small.samples_per_s", 2 / per_step, "samples/s")
    report(results, "small.peak_rss_gib", peak, "GiB (process peak so far)")


def sd15_overrides() -> list[str]:
    root = resources.files("instructx2x") / "resources" / "sd15_ip2p"
    configs = {name: json.loads((root / name / "config.json").read_text())
               for name in ("unet", "vae", "text_encoder")}
    keep = {k: v for k, v in configs["unet"].items() if not k.startswith("_")}
    vae = {k: v for k, v in configs["vae"].items() if not k.startswith("_")}
    text = {k: v for k, v in configs["text_encoder"].items()
            if not k.startswith("_") and k not in ("architectures", "transformers_version")}
    return ["model.base=fresh", f"model.fresh_unet={json.dumps(keep)}",
            f"model.fresh_vae={json.dumps(vae)}", f"model.fresh_text_encoder={json.dumps(text)}",
            "model.gradient_checkpointing=true", "batch.per_device=1", "batch.effective=null",
            "batch.gradient_accumulation_steps=1", "ema.enabled=false"]


def section_sd15(results: dict, steps: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        data = dataset(Path(folder), 256)
        per_step, peak = timed_run([f"data.dataset={data}", f"output={folder}/run",
                                    "data.resolution=256", *sd15_overrides()], steps)
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
        per_step, _ = timed_run([f"data.dataset={data}", f"output={folder}/run", "data.resolution=512",
                                 *sd15_overrides(), "batch.per_device=8"], steps)
    report(results, "gpu.device", torch.cuda.get_device_name())
    report(results, "gpu.samples_per_s", 8 / per_step, "samples/s (batch 8, 512 px)")
    report(results, "gpu.peak_vram_gib", torch.cuda.max_memory_allocated() / 2**30, "GiB")
    report(results, "gpu.paper_run_hours_on_8", 4500 * 576 / (8 * 8 / per_step) / 3600,
           "h projected (4,500 steps x 576 samples, 8 such GPUs, linear scaling)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", default="small,sd15,gpu")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    results: dict = {"cpu": CPU, "torch_threads": torch.get_num_threads()}
    sections = {"small": section_small, "sd15": section_sd15, "gpu": section_gpu}
    for name in args.sections.split(","):
        sections[name](results, args.steps)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
