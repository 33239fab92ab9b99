"""The InstructPix2Pix training objective exactly as SPEC section 6 states it.

Target latents are the scaled VAE *sample* of the current image; the conditioning is the
*mode* of the past image, unscaled. Conditioning dropout (the paper's classifier-free
guidance training, InstructPix2Pix section 3.2.1): one r ~ U(0, 1) per sample; the text is
replaced by emb("") when r < 2p, the image latent zeroed when p <= r < 3p, so a p share of
samples loses both. Epsilon MSE (v for v-prediction models) at t uniform in [0, 1000) on the
DDPM scaled_linear schedule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["conditioning_dropout", "training_loss"]


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


def training_loss(unet, vae, text_encoder, tokenizer, noise_scheduler, past: torch.Tensor,
                  current: torch.Tensor, instructions: list[str], generator: torch.Generator,
                  dropout_probability: float) -> torch.Tensor:
    """Epsilon-prediction MSE of one batch.

    Parameters
    ----------
    past, current: torch.Tensor
        ``(B, 1, H, W)`` images in [0, 1] (repeated to 3 channels for the VAE).
    instructions: list[str]
        One instruction per pair.
    generator: torch.Generator
        Every draw of the step: VAE sample, noise, timesteps, dropout (on CPU, so that a
        resumed run draws exactly what the uninterrupted one did).
    """
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    batch = past.shape[0]

    def pixels(images: torch.Tensor) -> torch.Tensor:
        return (images.expand(-1, 3, -1, -1) * 2 - 1).to(device, vae.dtype)

    with torch.no_grad() if not any(p.requires_grad for p in vae.parameters()) else torch.enable_grad():
        target_posterior = vae.encode(pixels(current)).latent_dist
        sample_noise = torch.randn(target_posterior.mean.shape, generator=generator).to(device)
        latents = (target_posterior.mean + target_posterior.std * sample_noise) * vae.config.scaling_factor
        condition = vae.encode(pixels(past)).latent_dist.mode()
    noise = torch.randn(latents.shape, generator=generator).to(device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,),
                              generator=generator).to(device)
    noisy = noise_scheduler.add_noise(latents.float(), noise, timesteps)

    drop_text, drop_image = conditioning_dropout(torch.rand(batch, generator=generator),
                                                 dropout_probability)
    texts = ["" if dropped else text for text, dropped in zip(instructions, drop_text.tolist())]
    tokens = tokenizer(texts, padding="max_length", truncation=True,
                       max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)
    embeddings = text_encoder(tokens)[0]
    condition = condition * (~drop_image).to(device, condition.dtype)[:, None, None, None]

    model_input = torch.cat([noisy, condition.float()], dim=1).to(dtype)
    prediction = unet(model_input, timesteps, encoder_hidden_states=embeddings.to(dtype),
                      return_dict=False)[0]
    target = noise if noise_scheduler.config.prediction_type == "epsilon" \
        else noise_scheduler.get_velocity(latents.float(), noise, timesteps)
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")
