"""Tiny InstructPix2Pix components with random weights, built offline.

They exercise every code path (tests, CI, the main job before the demo model exists) in
about a second per edit. Their edits are noise: every result made with them is marked
untrained.
"""

from __future__ import annotations

from importlib import resources

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .pipeline import InstructX2XPipeline
from .schedulers import make_scheduler

__all__ = ["UNTRAINED_MODEL_NAME", "load_clip_tokenizer", "build_untrained_pipeline"]

UNTRAINED_MODEL_NAME = "untrained-tiny"


def load_clip_tokenizer() -> CLIPTokenizer:
    """Stable Diffusion's CLIP tokenizer from the files shipped in the package."""
    root = resources.files("instructx2x") / "resources" / "clip_tokenizer"
    with resources.as_file(root) as directory:
        return CLIPTokenizer.from_pretrained(directory, local_files_only=True)


def build_untrained_pipeline(seed: int = 0) -> InstructX2XPipeline:
    """A tiny InstructX2X pipeline with random weights drawn from ``seed``.

    Parameters
    ----------
    seed: int
        Seeds a local generator through ``torch.random.fork_rng``, so the caller's global RNG
        state is left as it was.

    Returns
    -------
    InstructX2XPipeline
        On CPU, float32, DDIM scheduler.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=32,
            in_channels=8,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
        )
        # Four blocks: a KL-f8 autoencoder like Stable Diffusion's, so latents are 1/8 size.
        vae = AutoencoderKL(
            block_out_channels=(16, 32, 32, 32),
            norm_num_groups=16,
            layers_per_block=1,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
                hidden_size=32,
                intermediate_size=37,
                layer_norm_eps=1e-05,
                num_attention_heads=4,
                num_hidden_layers=2,
                vocab_size=49408,
                max_position_embeddings=77,
            )
        )
    return InstructX2XPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=load_clip_tokenizer(),
        unet=unet.eval(),
        scheduler=make_scheduler("ddim"),
    )
