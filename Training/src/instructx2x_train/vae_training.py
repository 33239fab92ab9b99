"""Train a small KL autoencoder on a dataset's films, for a model trained from scratch.

InstructPix2Pix keeps its VAE frozen (docs/method.md section 6), so a model built from nothing needs an
autoencoder first. This one learns to reconstruct the films of a MIMIC-EDIT-INSTRUCTION folder
(L1 plus an image-gradient term, so thin lines survive, and a small KL term); its latent scale
is then set so that scaled latents have unit variance, as Stable Diffusion's 0.18215 does.
``instructx2x-train train`` runs it first for ``model.base: fresh`` with
``vae_pretraining.steps`` > 0, into OUTPUT/pretrained-vae (kept, so a resumed run reuses it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from instructx2x.outputs import atomic_output_dir

from .pairs import EditPairs
from .train_config import ConfigError, VAEPretrainingConfig

__all__ = ["train_vae"]

logger = logging.getLogger(__name__)


def _gradients(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return images[..., 1:, :] - images[..., :-1, :], images[..., :, 1:] - images[..., :, :-1]


def _films(data: EditPairs) -> torch.Tensor:
    """Every distinct film of the split as one ``(N, 1, H, W)`` tensor in [0, 1]."""
    films = []
    for index in range(len(data)):
        pair = data[index]
        films += [pair["past"], pair["current"]]
    return torch.stack(films)


def train_vae(
    data: EditPairs,
    architecture: dict,
    settings: VAEPretrainingConfig,
    seed: int,
    output: Path,
    progress_bar: bool = True,
) -> Path:
    """Train the autoencoder on the films of ``data``; write ``output`` (a diffusers VAE folder
    with ``vae_log.json``) atomically and return it.

    Raises
    ------
    ConfigError
        For an architecture diffusers cannot build, before any training.
    """
    from diffusers import AutoencoderKL

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoencoderKL(**architecture)
    except TypeError as error:
        raise ConfigError(f"model.fresh_vae: {error}") from None
    config = settings
    films = _films(data)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    log, started = [], time.perf_counter()
    vae.train()
    bar = tqdm(range(config.steps), desc="vae", unit="step", disable=not progress_bar)
    for step in bar:
        index = torch.randint(0, len(films), (config.batch,), generator=generator)
        images = films[index] * 2 - 1
        if config.crop < images.shape[-1]:  # the autoencoder is convolutional: crops train it faster
            top, left = torch.randint(
                0, images.shape[-1] - config.crop + 1, (2,), generator=generator
            ).tolist()
            images = images[..., top : top + config.crop, left : left + config.crop]
        flip = torch.rand(config.batch, generator=generator) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images).repeat(1, 3, 1, 1)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss_l1 = F.l1_loss(reconstruction, images)
        (rows, columns), (true_rows, true_columns) = _gradients(reconstruction), _gradients(images)
        loss_gradient = F.l1_loss(rows, true_rows) + F.l1_loss(columns, true_columns)
        loss = loss_l1 + config.gradient_weight * loss_gradient + config.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == config.steps - 1:
            l1 = loss_l1.item()  # .item(): float() of a tensor that needs gradients warns
            log.append(
                {
                    "step": step + 1,
                    "l1": l1,
                    "gradient": loss_gradient.item(),
                    "seconds": time.perf_counter() - started,
                }
            )
            bar.set_postfix(l1=f"{l1:.4f}")
    vae.eval()
    with torch.no_grad():  # latent scale: unit variance of scaled latents, like SD's 0.18215
        sample = films[torch.randperm(len(films), generator=generator)[:64]] * 2 - 1
        posterior = vae.encode(sample.repeat(1, 3, 1, 1)).latent_dist
        scale = float(1.0 / posterior.sample(generator).std())
        reconstruction = vae.decode(posterior.mode()).sample
        mae = float((reconstruction.mean(1, keepdim=True) - sample).abs().mean() / 2)
    vae.register_to_config(scaling_factor=scale)
    with atomic_output_dir(output) as staging:
        vae.save_pretrained(staging, safe_serialization=True)
        (staging / "vae_log.json").write_text(
            json.dumps(
                {
                    "settings": dataclasses.asdict(config),
                    "architecture": architecture,
                    "scaling_factor": scale,
                    "reconstruction_mae": mae,
                    "log": log,
                    "films": int(len(films)),
                    "parameters": int(sum(p.numel() for p in vae.parameters())),
                    "seconds": time.perf_counter() - started,
                },
                indent=2,
            )
            + "\n"
        )
    logger.info("VAE: reconstruction MAE %.4f (of [0, 1]), scale %.4f", mae, scale)
    return output
