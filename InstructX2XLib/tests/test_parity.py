"""Our sampler against diffusers' own InstructPix2Pix: with tau = 0 (edit everywhere, no
blending) and the same start latents and generator, the two must give the same image. This
is what catches a broken classifier-free guidance: swapped scales, a text embedding in the
wrong batch member, a wrong image-conditioning latent."""

import pytest
import torch
from diffusers import StableDiffusionInstructPix2PixPipeline

PROMPT = "Add the finding of pleural effusion"


@pytest.fixture(scope="module")
def reference(tiny_pipe):
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=tiny_pipe.vae,
        text_encoder=tiny_pipe.text_encoder,
        tokenizer=tiny_pipe.tokenizer,
        unet=tiny_pipe.unet,
        scheduler=tiny_pipe.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def both(tiny_pipe, reference, image, guidance_scale=7.5, image_guidance_scale=1.5, steps=4):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    ours = tiny_pipe(
        PROMPT,
        image,
        region_mode="rse",
        tau=0.0,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        image_guidance_scale=image_guidance_scale,
        latents=latents.clone(),
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    theirs = reference(
        PROMPT,
        image=image,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        image_guidance_scale=image_guidance_scale,
        latents=latents.clone(),
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    return ours, theirs


def test_tau_zero_equals_diffusers_instruct_pix2pix(tiny_pipe, reference):
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    ours, theirs = both(tiny_pipe, reference, image)
    assert ours.shape == theirs.shape == (1, 3, 64, 64)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_parity_depends_on_each_guidance_scale(tiny_pipe, reference):
    """The comparison above can fail: different scales give visibly different images, so a
    sampler that swapped s_T and s_I would not match."""
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    ours, _ = both(tiny_pipe, reference, image, 7.5, 1.5)
    _, swapped = both(tiny_pipe, reference, image, 1.5, 7.5)
    assert (ours - swapped).abs().max() > 1e-3
