"""The InstructPix2Pix training objective exactly as docs/method.md section 6 states it.

Target latents are the scaled VAE *sample* of the current image; the conditioning is the
*mode* of the past image, unscaled. Conditioning dropout (the paper's classifier-free
guidance training, InstructPix2Pix section 3.2.1): one r ~ U(0, 1) per sample; the text is
replaced by emb("") when r < 2p, the image latent zeroed when p <= r < 3p, so a p share of
samples loses both. Epsilon MSE (v for v-prediction models) at t uniform in [0, 1000) on the
DDPM scaled_linear schedule.

Optionally (``optim.change_region_weight``, not in the paper) the squared error is weighted up
on the latent cells where a pure counterfactual pair's films differ, so that a small model
spends its few steps on the edit rather than on copying the rest of the film; and
(``optim.mirror_region_weight``) on the mirror image of those cells, so that it learns as
keenly to leave the side the instruction does not name untouched.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

__all__ = ["conditioning_dropout", "change_weights", "encode_pair", "training_loss", "PairLatents"]


def conditioning_dropout(r: torch.Tensor, probability: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Which samples lose their text and which their image conditioning.

    Parameters
    ----------
    r: torch.Tensor
        One U(0, 1) draw per sample, shape ``(B,)``.
    probability: float
        ``p`` (0.05 in the paper).

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        Boolean ``drop_text`` (r < 2p) and ``drop_image`` (p <= r < 3p).
    """
    drop_text = r < 2 * probability
    drop_image = (r >= probability) & (r < 3 * probability)
    return drop_text, drop_image


@dataclasses.dataclass
class PairLatents:
    """The VAE's view of a batch: the current image's posterior (mean, std) and the past
    image's mode, all unscaled ``(B, 4, h, w)``."""

    target_mean: torch.Tensor
    target_std: torch.Tensor
    condition: torch.Tensor

    @classmethod
    def stack(cls, items: list[PairLatents]) -> PairLatents:
        return cls(*(torch.cat([getattr(i, f.name) for i in items]) for f in dataclasses.fields(cls)))


def change_weights(
    regions: torch.Tensor, latent_size: tuple[int, int], weight: float, mirror_weight: float = 0.0
) -> torch.Tensor:
    """Per-cell loss weights ``(B, 1, h, w)``: 1 + ``weight`` on every latent cell that any
    pixel of the change region ``(B, 1, H, W)`` falls in, and 1 + ``mirror_weight`` on the
    cells of its mirror image across the film's vertical midline that the region itself does
    not touch: the other side, which an edit of the named side must leave as it is."""
    touched = F.adaptive_max_pool2d(regions.float(), latent_size)
    mirrored = touched.flip(-1) * (1 - touched)
    return 1.0 + weight * touched + mirror_weight * mirrored


def encode_pair(vae, past: torch.Tensor, current: torch.Tensor) -> PairLatents:
    """Encode ``(B, 1, H, W)`` images in [0, 1] (repeated to 3 channels)."""
    device = next(vae.parameters()).device

    def pixels(images: torch.Tensor) -> torch.Tensor:
        return (images.expand(-1, 3, -1, -1) * 2 - 1).to(device, vae.dtype)

    with torch.no_grad():  # the VAE is frozen (docs/method.md section 6)
        target = vae.encode(pixels(current)).latent_dist
        condition = vae.encode(pixels(past)).latent_dist.mode()
    return PairLatents(target.mean, target.std, condition)


def training_loss(
    unet,
    text_encoder,
    tokenizer,
    noise_scheduler,
    latents: PairLatents,
    scaling_factor: float,
    instructions: list[str],
    generator: torch.Generator,
    dropout_probability: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Epsilon-prediction MSE of one batch.

    Parameters
    ----------
    latents: PairLatents
        From ``encode_pair`` or the latent cache.
    scaling_factor: float
        The VAE's latent scale (0.18215 for Stable Diffusion).
    instructions: list[str]
        One instruction per pair.
    generator: torch.Generator
        Every draw of the step: VAE sample, noise, timesteps, dropout (on CPU, so that a
        resumed run draws exactly what the uninterrupted one did).
    weights: torch.Tensor | None
        ``(B, 1, h, w)`` per-cell weights (``change_weights``); None is the plain mean.
    """
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    batch = latents.condition.shape[0]
    sample_noise = torch.randn(latents.target_mean.shape, generator=generator).to(device)
    target = (latents.target_mean.to(device) + latents.target_std.to(device) * sample_noise) * scaling_factor
    condition = latents.condition.to(device)
    noise = torch.randn(target.shape, generator=generator).to(device)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator
    ).to(device)
    noisy = noise_scheduler.add_noise(target.float(), noise, timesteps)

    drop_text, drop_image = conditioning_dropout(torch.rand(batch, generator=generator), dropout_probability)
    texts = ["" if dropped else text for text, dropped in zip(instructions, drop_text.tolist())]
    tokens = tokenizer(
        texts,
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids.to(device)
    embeddings = text_encoder(tokens)[0]
    condition = condition * (~drop_image).to(device, condition.dtype)[:, None, None, None]

    model_input = torch.cat([noisy, condition.float()], dim=1).to(dtype)
    prediction = unet(model_input, timesteps, encoder_hidden_states=embeddings.to(dtype), return_dict=False)[
        0
    ]
    goal = (
        noise
        if noise_scheduler.config.prediction_type == "epsilon"
        else noise_scheduler.get_velocity(target.float(), noise, timesteps)
    )
    if weights is None:
        return F.mse_loss(prediction.float(), goal.float(), reduction="mean")
    squared = F.mse_loss(prediction.float(), goal.float(), reduction="none")
    return (squared * weights.to(device)).mean()
