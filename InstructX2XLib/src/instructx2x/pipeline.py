"""InstructX2X: InstructPix2Pix with Region-Specific Editing (docs/method.md section 2).

The whole sampler lives in this file, readable top to bottom: relevance map, prior, guidance
map, threshold, denoising from the noised input latent with same-noise re-noising outside the
mask, decode and pixel composite. The numeric helpers are pure functions in ``guidance.py``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput, logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from . import guidance
from .errors import EditCancelled, EmptyEditRegionError, ParameterError
from .instructions import parse_instruction
from .parameters import GUIDANCE_SCALE, IMAGE_GUIDANCE_SCALE, RegionMode, check_sampling, is_integer
from .priors import PriorSelection, PriorSet

__all__ = ["InstructX2XPipeline", "InstructX2XPipelineOutput", "GuidanceState", "EditCancelled"]

logger = logging.get_logger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from PIL import Image
        >>> from instructx2x import InstructX2XPipeline

        >>> pipe = InstructX2XPipeline.from_pretrained("path/to/Ix2x_V1_4500")
        >>> xray = Image.open("chest_pa.png").convert("RGB").resize((512, 512))
        >>> out = pipe("Add the finding of pleural effusion", image=xray,
        ...            generator=torch.Generator().manual_seed(0))
        >>> out.images[0].save("edited.png")
        >>> out.prior.reason
        'pseudo mask of Pleural Effusion'
        ```
"""

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor
# Full scale of the PIL modes a radiograph or mask may come in; "F" is taken as [0, 1] already.
_PIL_FULL_SCALE = {
    "1": 1.0,
    "L": 255.0,
    "LA": 255.0,
    "P": 255.0,
    "RGB": 255.0,
    "RGBA": 255.0,
    "I;16": 65535.0,
    "I;16B": 65535.0,
    "I;16L": 65535.0,
    "F": 1.0,
}


@dataclasses.dataclass
class GuidanceState:
    """What the guidance computation drew and computed, for an edit to reuse.

    A preview and the edit that follows it (same image, instruction, seed and model) share
    the text embeddings, the VAE encode, the noise draws and the relevance map; passing this
    back as ``guidance_state`` skips them and gives bit-identical results, because the
    generator is restored to the state it had after the noise draws.
    """

    prompt_embeds: torch.Tensor
    image_latents: torch.Tensor
    source_latents: torch.Tensor
    noise: torch.Tensor
    relevance_noise: list[torch.Tensor]  # the relevance map's further draws (relevance_draws - 1)
    relevance: torch.Tensor | None
    relevance_timestep: int
    generator_state: torch.Tensor | list[torch.Tensor] | None  # one per generator of a batch


@dataclasses.dataclass
class InstructX2XPipelineOutput(BaseOutput):
    """Output of `InstructX2XPipeline`.

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray`, `torch.Tensor` or `None`):
            The edited images at the input's size, `None` when `guidance_only=True`.
        edit_masks (`torch.Tensor`):
            Binary pixel-space edit masks `m_px`, `(B, 1, H, W)`; pixels where it is 0 equal the input.
        latent_edit_masks (`torch.Tensor`):
            Binary latent-space edit masks `m`, `(B, 1, H/8, W/8)`.
        guidance_maps (`torch.Tensor`):
            Guidance maps `G` in pixel space, `(B, 1, H, W)` in `[0, 1]`.
        relevance_maps (`torch.Tensor` or `None`):
            Relevance maps `R` in pixel space; `None` in the `prior` and `none` modes.
        prior_masks (`torch.Tensor` or `None`):
            The prior (or user) masks `M` in pixel space; `None` in the `relevance` and `none` modes.
        prior (`PriorSelection`, `list[PriorSelection]` or `None`):
            Which prior was used and why (categories, full-image fallback reason); one per prompt
            for a list of prompts.
        reconstructions (`torch.Tensor` or `None`):
            The VAE's reconstruction of the input (decode of its latent mode), same layout as
            `images` in `"pt"`; only with `return_reconstruction=True`. `images - reconstructions`
            is the model's own change, free of the autoencoder's blur.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None
    edit_masks: torch.Tensor
    latent_edit_masks: torch.Tensor
    guidance_maps: torch.Tensor
    relevance_maps: torch.Tensor | None
    prior_masks: torch.Tensor | None
    prior: PriorSelection | list[PriorSelection] | None
    reconstructions: torch.Tensor | None = None
    guidance_state: GuidanceState | None = None


class InstructX2XPipeline(DiffusionPipeline):
    r"""
    Pipeline for local, instruction-driven editing of chest radiographs (InstructX2X).

    Args:
        vae ([`AutoencoderKL`]):
            KL-f8 autoencoder; its latent mode conditions the UNet, its samples are the start point.
        text_encoder ([`~transformers.CLIPTextModel`]):
            Frozen CLIP ViT-L/14 text encoder.
        tokenizer ([`~transformers.CLIPTokenizer`]):
            The CLIP tokenizer.
        unet ([`UNet2DConditionModel`]):
            InstructPix2Pix UNet with 8 input channels (4 noisy latent + 4 image latent).
        scheduler ([`SchedulerMixin`]):
            Any diffusers scheduler with `add_noise`; the authors use DDIM (`make_scheduler("ddim")`).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components: list[str] = []
    # "source_latents" and "noise" let a callback check the re-noising outside the mask.
    _callback_tensor_inputs = ["latents", "prompt_embeds", "image_latents", "mask", "source_latents", "noise"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
    ):
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.prior_set: PriorSet | None = None  # loaded on first use; assign to swap sets
        # Precision of the relevance call (None: the UNet's own); see compute_relevance.
        self.relevance_dtype: torch.dtype | None = torch.float32
        self._interrupt = False

    @property
    def interrupt(self) -> bool:
        """Whether the running call stops before its next step (see `cancel`)."""
        return self._interrupt

    def cancel(self) -> None:
        """Stop the running call before its next denoising step: it raises `EditCancelled` and
        returns nothing. Safe from another thread or a step callback; a call that starts later
        runs in full."""
        self._interrupt = True

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str],
        image: ImageInput | list[ImageInput],
        mask_image: ImageInput | None = None,
        keep_mask_image: ImageInput | None = None,
        prior_mask: ImageInput | None = None,
        region_mode: RegionMode | str = RegionMode.RSE,
        tau: float = 0.1,
        lateralize_prior: bool = True,
        relevance_timestep: int = 800,
        relevance_draws: int = 1,
        relevance_from: int | None = None,
        num_inference_steps: int = 100,
        guidance_scale: float = GUIDANCE_SCALE,
        image_guidance_scale: float = IMAGE_GUIDANCE_SCALE,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        guidance_only: bool = False,
        return_reconstruction: bool = False,
        guidance_state: GuidanceState | None = None,
        decode_mask_region: bool = False,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> InstructX2XPipelineOutput | tuple:
        r"""
        Edit one radiograph as the instruction says, only inside the guidance mask.

        Args:
            prompt (`str` or `list[str]`):
                The edit instruction, e.g. "Add the finding of pleural effusion"; a list edits a
                batch (one instruction per image).
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                The radiograph(s), values in `[0, 1]` (tensor `(B, C, H, W)` or `(H, W)`, C in {1, 3}),
                height and width multiples of 8, one per prompt. Grayscale is repeated to 3 channels
                for the VAE.
            mask_image (*optional*):
                A user edit mask of the image's size (one per image for a batch); replaces the
                anatomical prior `M`.
            keep_mask_image (*optional*):
                A mask of what must never change; it wins over every other mask.
            prior_mask (*optional*):
                An explicit prior `M`; by default the union of the priors of the findings in `prompt`.
            region_mode (`str`, defaults to `"rse"`):
                `"rse"` (relevance x prior), `"relevance"`, `"prior"` or `"none"` (whole image).
            tau (`float`, defaults to 0.1):
                Threshold on the guidance map, in `[0, 1]`.
            lateralize_prior (`bool`, defaults to `True`):
                Narrow lung priors to the side the instruction names (patient's left = image right on PA).
            relevance_timestep (`int`, defaults to 800):
                Timestep `t_rel` at which the relevance map is computed.
            relevance_draws (`int`, defaults to 1):
                Noise draws whose relevance maps (each clipped and normalised) are averaged; the authors
                take one. The first is the noise of the start point and the re-noising, the others
                are drawn right after it, so the generator's later draws depend on this number.
            relevance_from (`int`, *optional*):
                The batch element whose relevance map every element uses: computed once, from that
                element's instruction, image and noise. A progression series (one image and seed at
                several levels) so shares one edit region; the other elements' maps are not computed.
            num_inference_steps (`int`, defaults to 100):
                Denoising steps.
            guidance_scale (`float`, defaults to 7.5):
                Text guidance `s_T`.
            image_guidance_scale (`float`, defaults to 1.5):
                Image guidance `s_I`.
            eta (`float`, defaults to 0.0):
                DDIM eta; other schedulers ignore it.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                The one source of randomness (VAE sample, noise, stochastic schedulers); a list gives
                each batch element its own, so that element equals the same edit run alone.
            latents (`torch.Tensor`, *optional*):
                Start latents `(B, 4, H/8, W/8)` replacing the noised input latent (as in diffusers'
                InstructPix2Pix); the noise for the relevance map and the re-noising is still drawn.
            guidance_only (`bool`, defaults to `False`):
                Stop after the guidance map (a UNet call per relevance draw, one VAE encode): a cheap
                preview for tuning `tau`.
            guidance_state (`GuidanceState`, *optional*):
                The `guidance_state` of an earlier call on the same image, prompt, seed and model
                (e.g. a preview) with the same `relevance_draws` and `relevance_from`: its embeddings,
                latents, noise and relevance map are reused.
            decode_mask_region (`bool`, defaults to `False`):
                Decode only the latents over the edit masks' bounding box (plus a margin of
                `DECODE_MARGIN` latent cells) instead of the whole grid: the decoder's cost falls
                with the area, and pixels outside the masks are the input's anyway. The decoder's
                group norms and mid-block attention then see only the crop, so pixels inside the
                mask differ from a full decode (docs/benchmarks.md measures by how much).
            return_reconstruction (`bool`, defaults to `False`):
                Also decode the input's latent mode (in the same VAE call as the edit), for
                compositing the model's change onto a higher-resolution original.
            output_type (`str`, defaults to `"pil"`):
                `"pil"`, `"np"` (`(B, H, W, C)` float) or `"pt"` (`(B, C, H, W)` float).
            return_dict (`bool`, defaults to `True`):
                Return an [`InstructX2XPipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, *optional*):
                Called as `callback(pipe, step, timestep, callback_kwargs)` after every step; it may return
                modified tensors and call `pipe.cancel()` to stop.
            callback_on_step_end_tensor_inputs (`Sequence[str]`):
                Tensors passed to the callback, from `_callback_tensor_inputs`.

        Examples:

        Returns:
            [`InstructX2XPipelineOutput`] or `tuple`: with `return_dict=False`, the output's fields in order.

        Raises:
            ParameterError: an argument is out of range or masks do not match the image.
            TypeError: an argument has the wrong type.
            EmptyEditRegionError: the edit mask is empty, so the edit would return the input.
            EditCancelled: the loop was interrupted.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 0. Check inputs
        region_mode, prompts = self.check_inputs(
            prompt,
            image,
            region_mode,
            tau,
            relevance_timestep,
            num_inference_steps,
            guidance_scale,
            image_guidance_scale,
            output_type,
            callback_on_step_end_tensor_inputs,
            generator,
            relevance_draws,
        )
        batch_size = len(prompts)
        if relevance_from is not None and (
            not is_integer(relevance_from) or not 0 <= relevance_from < batch_size
        ):
            raise ParameterError(
                f"`relevance_from` must be a batch element, 0 to {batch_size - 1}, got {relevance_from!r}."
            )
        if (mask_image is not None or prior_mask is not None) and region_mode in (
            RegionMode.RELEVANCE,
            RegionMode.NONE,
        ):
            raise ParameterError(
                f"`mask_image` and `prior_mask` replace the prior, which region_mode "
                f"{region_mode.value!r} does not use; choose 'rse' or 'prior'."
            )
        self._interrupt = False

        # 1. Batch size and device
        device = self._execution_device
        model_dtype = self.unet.dtype

        # 2. Preprocess and check the image and the masks (all at the image's size), before any
        # model call.
        source = self._to_batch(image, "image", None, batch_size).to(device)
        height, width = source.shape[-2:]
        pixels = self.image_processor.normalize(source.expand(-1, 3, -1, -1).to(model_dtype))
        user_mask = self._load_mask(mask_image, "mask_image", (height, width), device, batch_size)
        keep_mask = self._load_mask(keep_mask_image, "keep_mask_image", (height, width), device, batch_size)
        if user_mask is not None and not user_mask.flatten(1).any(dim=1).all():
            raise EmptyEditRegionError("mask_image is empty: paint the region to edit, or pass no mask.")
        if keep_mask is not None and keep_mask.flatten(1).all(dim=1).any():
            raise EmptyEditRegionError("the keep mask covers the whole image: nothing may be edited.")
        if latents is not None and not isinstance(latents, torch.Tensor):
            raise TypeError(f"`latents` must be a torch.Tensor, got {type(latents).__name__}.")

        state = guidance_state
        if state is not None and not isinstance(state, GuidanceState):
            raise TypeError(f"`guidance_state` must be a GuidanceState, got {type(state).__name__}.")
        if state is not None and len(state.relevance_noise) != relevance_draws - 1:
            raise ParameterError(
                f"`guidance_state` was drawn for {len(state.relevance_noise) + 1} "
                f"relevance draws, not {relevance_draws}."
            )
        if state is not None and tuple(state.source_latents.shape[-2:]) != (
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        ):
            raise ParameterError("`guidance_state` comes from an image of another size.")

        # 3. Encode the instruction. CFG batch order: (text+image, image only, nothing).
        prompt_embeds = self.encode_prompt(prompts, device) if state is None else state.prompt_embeds

        # 4. Timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps

        # 5. Image latents: mode for conditioning (unscaled), a scaled sample for the start point.
        if state is None:
            image_latents, source_latents = self.prepare_image_latents(pixels, generator)
            # One noise draw serves the relevance map, the start point and every re-noising; the
            # relevance map's further draws come right after it, whatever the region mode.
            noise, *relevance_noise = [
                randn_tensor(source_latents.shape, generator=generator, device=device, dtype=torch.float32)
                for _ in range(relevance_draws)
            ]
        else:
            image_latents, source_latents, noise = state.image_latents, state.source_latents, state.noise
            relevance_noise = state.relevance_noise
            if generator is not None and state.generator_state is not None:
                _set_generator_states(
                    generator, state.generator_state
                )  # later draws as if nothing was skipped
        generator_state = None if generator is None else _generator_states(generator)
        # Image-conditioning batch [c, c, 0], matching the text batch [emb(T), emb(""), emb("")].
        image_latents_cfg = torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])
        latent_size = tuple(source_latents.shape[-2:])

        # 6. Relevance map R (one UNet call at t_rel per noise draw), prior M, guidance map G, masks m.
        relevance = None
        if region_mode in (RegionMode.RSE, RegionMode.RELEVANCE):
            if (
                state is not None
                and state.relevance is not None
                and state.relevance_timestep == int(relevance_timestep)
            ):
                relevance = state.relevance
            elif relevance_from is None:
                relevance = self.compute_relevance(
                    source_latents,
                    [noise, *relevance_noise],
                    image_latents_cfg,
                    prompt_embeds,
                    relevance_timestep,
                )
            else:  # one element's map for all: its (text + image, image only) members
                one = slice(relevance_from, relevance_from + 1)
                members = [relevance_from, batch_size + relevance_from]
                relevance = self.compute_relevance(
                    source_latents[one],
                    [draw[one] for draw in (noise, *relevance_noise)],
                    image_latents_cfg[members],
                    prompt_embeds[members],
                    relevance_timestep,
                ).repeat(batch_size, 1, 1, 1)
        state = GuidanceState(
            prompt_embeds,
            image_latents,
            source_latents,
            noise,
            relevance_noise,
            relevance,
            int(relevance_timestep),
            generator_state,
        )
        prior = None
        selection: PriorSelection | list[PriorSelection] | None = None
        if region_mode in (RegionMode.RSE, RegionMode.PRIOR):
            explicit = None if prior_mask is None else self._to_batch(prior_mask, "prior_mask", 1, batch_size)
            resolved = [
                self.resolve_prior(
                    text,
                    None if user_mask is None else user_mask[i : i + 1],
                    None if explicit is None else explicit[i : i + 1],
                    (height, width),
                    device,
                    lateralize_prior,
                )
                for i, text in enumerate(prompts)
            ]
            prior = torch.cat([mask for mask, _ in resolved])
            chosen = [selection for _, selection in resolved]
            selection = chosen[0] if isinstance(prompt, str) else chosen
        relevance_px = None if relevance is None else guidance.resize_map(relevance, (height, width))
        prior_latent = None if prior is None else guidance.resize_map(prior, latent_size)
        guidance_latent = (
            guidance.guidance_map(relevance, prior_latent, region_mode)
            if region_mode is not RegionMode.NONE
            else torch.ones(batch_size, 1, *latent_size, device=device)
        )
        guidance_px = (
            guidance.guidance_map(relevance_px, prior, region_mode)
            if region_mode is not RegionMode.NONE
            else torch.ones(batch_size, 1, height, width, device=device)
        )
        keep_latent = None if keep_mask is None else guidance.resize_map(keep_mask, latent_size)
        mask = guidance.combine_masks(guidance.threshold_mask(guidance_latent, tau), keep_latent)
        mask_px = guidance.combine_masks(guidance.threshold_mask(guidance_px, tau), keep_mask)

        if guidance_only:
            self.maybe_free_model_hooks()
            preview = (None, mask_px, mask, guidance_px, relevance_px, prior, selection, None, state)
            return InstructX2XPipelineOutput(*preview) if return_dict else preview
        for i in range(batch_size):
            if not (mask[i].any() and mask_px[i].any()):
                raise EmptyEditRegionError(
                    ("" if batch_size == 1 else f"batch element {i}: ")
                    + _empty_region_reason(
                        None if relevance is None else relevance[i],
                        guidance_latent[i],
                        None if keep_latent is None else keep_latent[i],
                        tau,
                    )
                )

        # 7. Start from the input latent noised to the first timestep (not from pure noise).
        if latents is None:
            latents = self.scheduler.add_noise(source_latents, noise, timesteps[:1])
        elif tuple(latents.shape) != tuple(source_latents.shape):
            raise ParameterError(
                f"`latents` must have shape {tuple(source_latents.shape)}, got {tuple(latents.shape)}."
            )
        else:
            latents = latents.to(device, torch.float32) * self.scheduler.init_noise_sigma
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        blend = not bool(mask.all())

        # 8. Denoising loop
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    raise EditCancelled(f"edit cancelled before step {i + 1} of {len(timesteps)}")
                latent_model_input = self.scheduler.scale_model_input(torch.cat([latents] * 3), t)
                latent_model_input = torch.cat([latent_model_input, image_latents_cfg.float()], dim=1)
                noise_pred = self.unet(
                    latent_model_input.to(model_dtype),
                    t,
                    encoder_hidden_states=prompt_embeds,
                    return_dict=False,
                )[0].float()
                noise_pred_text, noise_pred_image, noise_pred_uncond = noise_pred.chunk(3)
                # eps = eps_u + s_T (eps_text - eps_img) + s_I (eps_img - eps_u)
                noise_pred = (
                    noise_pred_uncond
                    + guidance_scale * (noise_pred_text - noise_pred_image)
                    + image_guidance_scale * (noise_pred_image - noise_pred_uncond)
                )
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[
                    0
                ]

                # Outside the mask, the latents are the input re-noised with the same noise to the
                # level the latents now have (the next timestep; the clean input after the last).
                # Adapted from diffusers StableDiffusionInpaintPipeline.__call__ (4-channel branch).
                if blend:
                    if i < len(timesteps) - 1:
                        background = self.scheduler.add_noise(source_latents, noise, timesteps[i + 1 : i + 2])
                    else:
                        background = source_latents
                    latents = mask * latents + (1.0 - mask) * background

                if callback_on_step_end is not None:
                    step_locals = locals()
                    callback_kwargs = {name: step_locals[name] for name in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    image_latents = callback_outputs.pop("image_latents", image_latents)
                    mask = callback_outputs.pop("mask", mask)
                progress_bar.update()
        if self.interrupt:
            raise EditCancelled("edit cancelled after the last step")

        # 9. Decode (with the input's reconstruction in the same call when asked), then
        # composite: pixels outside the mask are the input, bit for bit.
        to_decode = latents / self.vae.config.scaling_factor
        if return_reconstruction:
            to_decode = torch.cat([to_decode, image_latents.float()])
        rows, columns = _decode_window(mask_px, self.vae_scale_factor, decode_mask_region)
        window = to_decode[..., rows, columns]
        decoded_window = self.vae.decode(window.to(self.vae.dtype), return_dict=False)[0]
        decoded_window = self.image_processor.denormalize(decoded_window.float()).clamp(0, 1)
        if source.shape[1] == 1:
            decoded_window = decoded_window.mean(dim=1, keepdim=True)
        # Outside the window nothing is decoded: those pixels are outside every mask, where
        # the output is the input anyway.
        decoded = source.float().repeat(to_decode.shape[0] // batch_size, 1, 1, 1)
        scale = self.vae_scale_factor
        decoded[..., rows.start * scale : rows.stop * scale, columns.start * scale : columns.stop * scale] = (
            decoded_window
        )
        reconstruction = decoded[batch_size:] if return_reconstruction else None
        edited = torch.where(mask_px > 0, decoded[:batch_size], source.float())
        images = (
            edited
            if output_type == "pt"
            else self.image_processor.postprocess(edited, output_type=output_type, do_denormalize=[False])
        )

        # 10. Offload all models
        self.maybe_free_model_hooks()

        fields = (images, mask_px, mask, guidance_px, relevance_px, prior, selection, reconstruction, state)
        return InstructX2XPipelineOutput(*fields) if return_dict else fields

    def check_inputs(
        self,
        prompt,
        image,
        region_mode,
        tau,
        relevance_timestep,
        num_inference_steps,
        guidance_scale,
        image_guidance_scale,
        output_type,
        callback_on_step_end_tensor_inputs,
        generator=None,
        relevance_draws: int = 1,
    ) -> tuple[RegionMode, list[str]]:
        """Validate every argument before any model runs; returns the region mode as an enum
        and the prompts as a list (the batch)."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"`prompt` must be a str or a non-empty list of str, got {prompt!r:.80}.")
        for text in prompts:
            parse_instruction(text)  # empty or absurdly long instructions fail here
        if isinstance(generator, list) and len(generator) != len(prompts):
            raise ParameterError(
                f"`generator` is a list of {len(generator)} but the batch has "
                f"{len(prompts)} prompts; give one generator per prompt."
            )
        if image is None:
            raise TypeError("`image` is required.")
        try:
            mode = RegionMode(region_mode)
        except ValueError:
            raise ParameterError(
                f"`region_mode` must be one of {[m.value for m in RegionMode]}, got {region_mode!r}."
            ) from None
        if None in (num_inference_steps, guidance_scale, image_guidance_scale):
            raise ParameterError(
                "the pipeline needs the step count and both guidance scales; "
                "InstructX2XEditor.resolve fills in a model's defaults."
            )
        check_sampling(
            tau=tau,
            relevance_timestep=relevance_timestep,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            image_guidance_scale=image_guidance_scale,
            relevance_draws=relevance_draws,
            train_timesteps=self.scheduler.config.num_train_timesteps,
        )
        if output_type not in ("pil", "np", "pt"):
            raise ParameterError(f"`output_type` must be 'pil', 'np' or 'pt', got {output_type!r}.")
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ParameterError(
                f"`callback_on_step_end_tensor_inputs` has {unknown}; allowed: "
                f"{self._callback_tensor_inputs}."
            )
        if self.unet.config.in_channels != 2 * self.vae.config.latent_channels:
            raise ParameterError(
                f"the UNet takes {self.unet.config.in_channels} input channels; InstructPix2Pix "
                f"needs {2 * self.vae.config.latent_channels} (noisy + image latents)."
            )
        return mode, prompts

    def encode_prompt(self, prompt: str | list[str], device: torch.device) -> torch.Tensor:
        """Text embeddings in CFG order ``[emb(prompts), emb("") x B, emb("") x B]``."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        tokens = self.tokenizer(
            [*prompts, ""],
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        )
        if any(len(ids) > self.tokenizer.model_max_length for ids in self.tokenizer(prompts).input_ids):
            logger.warning(
                "An instruction is longer than %d tokens and was truncated.", self.tokenizer.model_max_length
            )
        embeds = self.text_encoder(tokens.input_ids.to(device))[0].to(self.unet.dtype)
        empty = embeds[-1:].expand(len(prompts), -1, -1)
        return torch.cat([embeds[:-1], empty, empty])

    def prepare_image_latents(
        self, pixels: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None
    ):
        """Encode once: the posterior mode conditions the UNet, a scaled sample is ``z0``."""
        posterior = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        image_latents = posterior.mode().to(self.unet.dtype)
        source_latents = posterior.sample(generator).float() * self.vae.config.scaling_factor
        return image_latents, source_latents

    def compute_relevance(
        self,
        source_latents,
        noises: list[torch.Tensor],
        image_latents_cfg,
        prompt_embeds,
        relevance_timestep: int,
    ) -> torch.Tensor:
        """One UNet call at ``t_rel`` per noise draw; ``R`` at latent size (docs/method.md
        section 2, step 3, which takes one draw: ``guidance.relevance_map`` averages several).

        ``R`` needs only the (text+image) and (image only) members of the CFG batch, so each
        call runs on those two: a third less work than the full batch, the same values.
        The noising uses the training schedule directly (``alphas_cumprod``), so it is the same
        whichever sampler runs the denoising loop.

        R is the difference of two close noise predictions, which half-precision activations
        round away; the calls run in ``relevance_dtype`` (fp32 unless set to None), the UNet
        cast up for them and back (exact: a bf16/fp16 weight is an fp32 value).
        """
        alphas_cumprod = self.scheduler.alphas_cumprod.to(source_latents.device, torch.float32)
        alpha = alphas_cumprod[int(relevance_timestep)]
        members = 2 * source_latents.shape[0]  # (text+image, image only) of every batch element
        timestep = torch.tensor(int(relevance_timestep), device=source_latents.device)
        model_dtype = self.unet.dtype
        dtype = self.relevance_dtype or model_dtype
        predictions = []
        # torch's own Module.to: diffusers' override logs a dtype notice on every cast.
        try:
            if dtype != model_dtype:
                torch.nn.Module.to(self.unet, dtype)
            for noise in noises:
                noisy = alpha.sqrt() * source_latents + (1 - alpha).sqrt() * noise
                model_input = torch.cat([torch.cat([noisy] * 2), image_latents_cfg[:members].float()], dim=1)
                predictions.append(
                    self.unet(
                        model_input.to(dtype),
                        timestep,
                        encoder_hidden_states=prompt_embeds[:members].to(dtype),
                        return_dict=False,
                    )[0].chunk(2)
                )
        finally:
            if self.unet.dtype != model_dtype:
                torch.nn.Module.to(self.unet, model_dtype)
        noise_pred_text, noise_pred_image = (torch.stack(draws) for draws in zip(*predictions))
        return guidance.relevance_map(noise_pred_text, noise_pred_image)

    def resolve_prior(self, prompt: str, user_mask, prior_mask, size, device, lateralize: bool = True):
        """``M``: the user's mask, else an explicit prior, else the instruction's pseudo masks."""
        if user_mask is not None:
            selection = PriorSelection(
                user_mask[0, 0].cpu().numpy(), (), False, "user-defined edit mask", "user"
            )
            return user_mask, selection
        if prior_mask is not None:
            mask = self._to_tensor(prior_mask, "prior_mask", channels=1).to(device)
            mask = guidance.resize_map((mask > 0.5).float(), size, mode="nearest")
            return mask, PriorSelection(
                mask[0, 0].cpu().numpy(), (), False, "explicit prior mask", "explicit"
            )
        if self.prior_set is None:
            self.prior_set = PriorSet.default()
        selection = self.prior_set.select(parse_instruction(prompt), lateralize=lateralize)
        if selection.full_image:
            logger.warning(
                "No anatomical prior applies (%s): editing with the full-image prior.", selection.reason
            )
        mask = torch.from_numpy(selection.mask)[None, None].to(device)
        return guidance.resize_map(mask, size, mode="nearest"), selection  # binary: the side stays exact

    def prepare_extra_step_kwargs(
        self, generator: torch.Generator | list[torch.Generator] | None, eta: float
    ) -> dict[str, Any]:
        """Pass ``eta`` and ``generator`` only to schedulers whose ``step`` takes them."""
        parameters = set(inspect.signature(self.scheduler.step).parameters)
        kwargs: dict[str, Any] = {}
        if "eta" in parameters:
            kwargs["eta"] = eta
        if "generator" in parameters:
            kwargs["generator"] = generator
        return kwargs

    def _load_mask(
        self, mask, name: str, size: tuple[int, int], device, batch_size: int = 1
    ) -> torch.Tensor | None:
        if mask is None:
            return None
        tensor = self._to_batch(mask, name, 1, batch_size)
        if tuple(tensor.shape[-2:]) != tuple(size):
            raise ParameterError(
                f"`{name}` is {tuple(tensor.shape[-2:])} but the image is {tuple(size)}; "
                "masks must have the image's size."
            )
        return (tensor > 0.5).float().to(device)

    def _to_batch(self, value, name: str, channels: int | None, batch_size: int) -> torch.Tensor:
        """Images or masks as a float tensor ``(batch_size, C, H, W)`` in ``[0, 1]``."""
        items = value if isinstance(value, list) else [value]
        tensors = [t for item in items for t in self._to_tensor(item, name, channels).split(1)]
        if len(tensors) != batch_size or len({tuple(t.shape) for t in tensors}) != 1:
            raise ParameterError(
                f"`{name}` must give {batch_size} image(s) of one size (one per "
                f"prompt), got {[tuple(t.shape[-2:]) for t in tensors]}."
            )
        return torch.cat(tensors)

    # Not VaeImageProcessor.preprocess: it reads PIL images through 8 bits (a 16-bit film would
    # clip) and silently resizes to multiples of 8, where a wrong size must be an error.
    @staticmethod
    def _to_tensor(value, name: str, channels: int | None) -> torch.Tensor:
        """An image or mask (or a batch tensor) as a float tensor ``(B, C, H, W)`` in ``[0, 1]``."""
        if isinstance(value, PIL.Image.Image):
            value = _pil_to_unit_array(value, name)
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
            if value.ndim == 3:
                value = value.permute(2, 0, 1)
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"`{name}` must be a PIL image, numpy array or torch tensor, got {type(value).__name__}."
            )
        tensor = value.float()
        while tensor.ndim < 4:
            tensor = tensor.unsqueeze(0)
        if tensor.ndim != 4 or tensor.shape[1] not in (1, 3):
            raise ParameterError(
                f"`{name}` must be 2-D grayscale or RGB image(s), got shape {tuple(value.shape)}."
            )
        if channels == 1 and tensor.shape[1] == 3:
            tensor = tensor.mean(dim=1, keepdim=True)
        if not torch.isfinite(tensor).all() or tensor.min() < 0 or tensor.max() > 1:
            raise ParameterError(f"`{name}` values must be finite and lie in [0, 1].")
        height, width = tensor.shape[-2:]
        if name == "image" and (height % 8 or width % 8 or height < 8 or width < 8):
            raise ParameterError(
                f"`image` height and width must be multiples of 8, got {height}x{width}; "
                "resize it first (InstructX2XEditor does)."
            )
        return tensor


DECODE_MARGIN = 4  # latent cells (32 px for a KL-f8 VAE) of context around the masks' box


def _decode_window(mask_px: torch.Tensor, scale: int, partial: bool) -> tuple[slice, slice]:
    """Latent rows and columns to decode: all, or the masks' bounding box plus a margin."""
    height, width = mask_px.shape[-2] // scale, mask_px.shape[-1] // scale
    if not partial:
        return slice(0, height), slice(0, width)
    union = mask_px.flatten(0, 1).amax(dim=0) > 0
    rows = torch.nonzero(union.any(dim=1)).flatten()
    columns = torch.nonzero(union.any(dim=0)).flatten()
    top = max(int(rows[0]) // scale - DECODE_MARGIN, 0)
    bottom = min(int(rows[-1]) // scale + 1 + DECODE_MARGIN, height)
    left = max(int(columns[0]) // scale - DECODE_MARGIN, 0)
    right = min(int(columns[-1]) // scale + 1 + DECODE_MARGIN, width)
    return slice(top, bottom), slice(left, right)


def _generator_states(generator):
    return [g.get_state() for g in generator] if isinstance(generator, list) else generator.get_state()


def _set_generator_states(generator, states) -> None:
    for g, state in zip(generator, states) if isinstance(generator, list) else [(generator, states)]:
        g.set_state(state)


def _pil_to_unit_array(image: PIL.Image.Image, name: str) -> np.ndarray:
    """A PIL image as float32 in [0, 1] at its full bit depth (never through 8-bit "L").

    Raises:
        ParameterError: for modes whose full scale is unknown (32-bit integer "I", CMYK, ...).
    """
    if image.mode not in _PIL_FULL_SCALE:
        raise ParameterError(
            f"`{name}` has PIL mode {image.mode!r}; give 8- or 16-bit grayscale, "
            "RGB, or float ('F', values in [0, 1])."
        )
    scale = _PIL_FULL_SCALE[image.mode]
    if image.mode in ("LA", "P", "RGBA"):
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.float32) / scale


def _empty_region_reason(relevance, guidance_latent, keep_latent, tau: float) -> str:
    """Why the edit mask came out empty, in words a user can act on."""
    if relevance is not None and not relevance.any():
        return (
            "the relevance map is constant: the instruction does not change the model's noise "
            "prediction anywhere, so no region can be chosen; use region mode 'prior' or a "
            "painted mask, or check that the model reads the instruction."
        )
    if keep_latent is not None and (keep_latent > 0).all():
        return "the keep mask covers the whole image: nothing may be edited."
    return (
        f"no guidance value reaches tau={tau:g} (the largest is "
        f"{float(guidance_latent.max()):.3g}): lower tau."
    )
