"""What a training run shows of itself: validation grids made with the product's own editor
path (the RSE pipeline, EMA weights) and a loss plot, drawn with Pillow alone."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from instructx2x.overlay import guidance_overlay
from instructx2x.pipeline import InstructX2XPipeline
from instructx2x.schedulers import default_scheduler, default_steps, make_scheduler

from .pairs import EditPairs
from .train_config import ConfigError, TrainConfig

__all__ = ["validation_pairs", "validation_grid", "plot_loss"]

COLUMNS = ("input (past)", "edited", "guidance", "target (current)")


def validation_pairs(config: TrainConfig) -> list[dict]:
    """The first ``validation.pairs`` pairs of the validation split (of train if it has none)."""
    try:
        data = EditPairs(config.data.dataset, config.validation.split, config.data.resolution)
    except ConfigError:
        data = EditPairs(config.data.dataset, config.data.split, config.data.resolution)
    size = config.data.resolution
    pairs = []
    for index in range(min(config.validation.pairs, len(data))):
        item = data[index]
        pairs.append(
            {key: item[key][..., :size, :size] if key != "instruction" else item[key] for key in item}
        )
    return pairs


@torch.no_grad()
def validation_grid(pipe: InstructX2XPipeline, pairs: list[dict], path: Path, seed: int) -> Path:
    """Edit each pair's past image as its instruction says; save one row per pair.

    Uses the sampler the product uses on this device (DPM-Solver++ 3 steps on CPU), so a
    grid shows what a user would get from the checkpoint.
    """
    device = next(pipe.unet.parameters()).device
    scheduler = pipe.scheduler
    pipe.scheduler = make_scheduler(default_scheduler(device), dict(scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    rows = []
    try:
        for index, pair in enumerate(pairs):
            out = pipe(
                pair["instruction"],
                pair["past"][None],
                output_type="pt",
                num_inference_steps=default_steps(pipe.scheduler),
                generator=torch.Generator().manual_seed(seed + index),
            )
            past = pair["past"][0].numpy()
            edited = out.images[0, 0].float().cpu().numpy()
            overlay = guidance_overlay(
                past, out.guidance_maps[0, 0].float().cpu().numpy(), out.edit_masks[0, 0].bool().cpu().numpy()
            )
            gray = [
                np.repeat((np.clip(a, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)
                for a in (past, edited, pair["current"][0].numpy())
            ]
            rows.append(np.concatenate([gray[0], gray[1], overlay, gray[2]], axis=1))
    finally:
        pipe.scheduler = scheduler
    header = 14
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    canvas = Image.new("RGB", (grid.width, grid.height + header), "black")
    canvas.paste(grid, (0, header))
    draw = ImageDraw.Draw(canvas)
    width = grid.width // len(COLUMNS)
    for column, title in enumerate(COLUMNS):
        draw.text((column * width + 2, 1), title, fill="white")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def plot_loss(log_csv: Path, path: Path, size: tuple[int, int] = (640, 360)) -> Path:
    """The loss curve of ``log.csv`` as a PNG (axes, min/max labels), without matplotlib."""
    with open(log_csv, newline="") as handle:
        rows = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(handle)]
    width, height = size
    margin = 48
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.line([(margin, margin // 2), (margin, height - margin), (width - 10, height - margin)], fill="black")
    if rows:
        steps, losses = zip(*rows)
        low, high = min(losses), max(losses)
        span_loss = (high - low) or 1.0
        span_step = (max(steps) - min(steps)) or 1

        def point(step: int, loss: float) -> tuple[float, float]:
            x = margin + (step - min(steps)) / span_step * (width - margin - 20)
            y = height - margin - (loss - low) / span_loss * (height - 1.5 * margin)
            return x, y

        draw.line(
            [point(s, v) for s, v in rows] if len(rows) > 1 else [point(*rows[0])] * 2, fill="navy", width=2
        )
        draw.text((4, margin // 2 - 6), f"{high:.4f}", fill="black")
        draw.text((4, height - margin - 6), f"{low:.4f}", fill="black")
        draw.text((margin, height - margin + 6), f"step {min(steps)}", fill="black")
        draw.text((width - 90, height - margin + 6), f"step {max(steps)}", fill="black")
    draw.text((width // 2 - 40, 4), "training loss", fill="black")
    image.save(path)
    return path
