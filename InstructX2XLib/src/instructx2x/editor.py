"""Edit a radiograph of any size: resize to the model's grid, run the pipeline, map back.

``InstructX2XEditor`` is what the CLI, the Slicer worker and Python users call. It owns the
geometry (the model sees ``resolution`` x ``resolution``, the result has the input's rows and
columns), the seed, timings and the manifest that makes a result reproducible.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .devices import needs_attention_slicing, resolve_device, resolve_dtype
from .guidance import RegionMode
from .image_io import Radiograph
from .instructions import parse_instruction
from .loading import ModelInfo, load_pipeline
from .pipeline import InstructX2XPipeline
from .schedulers import default_scheduler, default_steps

__all__ = ["EditParameters", "EditResult", "InstructX2XEditor"]

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
# squash: resize to the square grid as the authors trained; pad: keep the aspect ratio by
# padding to a square with black (air), never edited, and cropping the result back.
ASPECT_MODES = ("squash", "pad")


@dataclasses.dataclass(frozen=True)
class EditParameters:
    """Every setting that changes an edit; recorded in full in the manifest.

    Defaults are the authors' (SPEC section 2), except the step count, which follows the
    sampler (``InstructX2XEditor.resolve`` fills it in).
    """

    instruction: str
    region_mode: str = RegionMode.RSE.value
    tau: float = 0.1
    relevance_timestep: int = 800
    num_inference_steps: int | None = None  # None: the scheduler's default (schedulers.default_steps)
    guidance_scale: float = 7.5
    image_guidance_scale: float = 1.5
    eta: float = 0.0
    seed: int = 0
    resolution: int = 512
    lateralize_prior: bool = True
    aspect: str = "squash"

    def __post_init__(self) -> None:
        parse_instruction(self.instruction)
        RegionMode(self.region_mode)
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"tau must lie in [0, 1], got {self.tau}.")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}.")
        if self.guidance_scale < 0 or self.image_guidance_scale < 0:
            raise ValueError("guidance scales must be >= 0, got "
                             f"{self.guidance_scale} and {self.image_guidance_scale}.")
        if self.resolution < 64 or self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 and >= 64, got {self.resolution}.")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must lie in [0, 2**63), got {self.seed}.")
        if self.aspect not in ASPECT_MODES:
            raise ValueError(f"aspect must be one of {ASPECT_MODES}, got {self.aspect!r}.")


@dataclasses.dataclass
class EditResult:
    """An edit (or a guidance preview) at the input's size, with its provenance.

    Attributes
    ----------
    edited: numpy.ndarray | None
        float32 ``(rows, columns)`` in ``[0, 1]``; None for a preview. Where ``edit_mask`` is
        False it equals the input exactly.
    edit_mask: numpy.ndarray
        bool ``(rows, columns)``: where the model was allowed to change the image.
    guidance_map: numpy.ndarray
        float32 ``(rows, columns)`` in ``[0, 1]``.
    relevance_map: numpy.ndarray | None
        float32 ``(rows, columns)``; None when the mode does not compute it.
    prior_mask: numpy.ndarray | None
        float32 ``(rows, columns)``; None when the mode does not use it.
    manifest: dict
        Model identity, parameters, instruction as parsed, prior used, input identity,
        software versions and timings.
    """

    edited: np.ndarray | None
    edit_mask: np.ndarray
    guidance_map: np.ndarray
    relevance_map: np.ndarray | None
    prior_mask: np.ndarray | None
    manifest: dict

    @property
    def untrained(self) -> bool:
        """True when a random-weight model made this result."""
        return not self.manifest["model"]["trained"]


class InstructX2XEditor:
    """The InstructX2X pipeline on a device, with the geometry and provenance around it.

    Parameters
    ----------
    pipeline: InstructX2XPipeline
        Any pipeline instance (``load_pipeline`` builds one).
    model_info: ModelInfo
        Identity of its weights.
    device: str
        ``auto`` (CUDA, MPS, CPU), or an explicit torch device.
    dtype: str
        ``auto``, ``fp32``, ``bf16`` or ``fp16`` (see ``devices.resolve_dtype``).
    """

    def __init__(self, pipeline: InstructX2XPipeline, model_info: ModelInfo,
                 device: str = "auto", dtype: str = "auto") -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model_info = model_info
        self.pipeline = pipeline.to(self.device, self.dtype)
        self.pipeline.set_progress_bar_config(disable=True)
        self.attention = "sdpa"
        if needs_attention_slicing(self.device):
            logger.warning("Little GPU memory is free: slicing attention (slower, smaller).")
            self.pipeline.unet.set_attention_slice("auto")
            self.attention = "sliced"
        if self.device.type == "cpu":
            # oneDNN runs the VAE's large convolutions ~15 % faster channels-last (benchmarks).
            self.pipeline.vae.to(memory_format=torch.channels_last)

    @classmethod
    def from_model(cls, model: str, *, device: str = "auto", dtype: str = "auto",
                   scheduler: str = "auto", allow_hub: bool = False,
                   single_file_config: str | None = None) -> "InstructX2XEditor":
        """Load weights (see ``loading.load_pipeline``) and place them on the device.

        ``scheduler="auto"`` takes ``schedulers.default_scheduler`` for the device.
        """
        if scheduler == "auto":
            scheduler = default_scheduler(resolve_device(device))
        pipeline, info = load_pipeline(model, allow_hub=allow_hub, scheduler=scheduler,
                                       single_file_config=single_file_config)
        if not info.trained:
            logger.warning("Model %s has random weights: its edits are meaningless noise.",
                           info.name)
        return cls(pipeline, info, device=device, dtype=dtype)

    def resolve(self, parameters: EditParameters) -> EditParameters:
        """``parameters`` with the step count filled in from the scheduler when it is None."""
        if parameters.num_inference_steps is not None:
            return parameters
        return dataclasses.replace(parameters,
                                   num_inference_steps=default_steps(self.pipeline.scheduler))

    def preview(self, image: Radiograph, parameters: EditParameters,
                mask: np.ndarray | None = None, keep_mask: np.ndarray | None = None) -> EditResult:
        """Guidance maps and edit mask only: one UNet call and one VAE encode."""
        return self._run(image, parameters, mask, keep_mask, None, guidance_only=True)

    def edit(self, image: Radiograph, parameters: EditParameters, mask: np.ndarray | None = None,
             keep_mask: np.ndarray | None = None,
             progress: ProgressCallback | None = None) -> EditResult:
        """Edit ``image`` as ``parameters.instruction`` says.

        Parameters
        ----------
        image: Radiograph
            From ``image_io.read_image`` (any size).
        parameters: EditParameters
            Instruction, region mode, guidance and sampling settings, seed.
        mask: numpy.ndarray | None
            Optional user edit mask at the image's size; replaces the anatomical prior.
        keep_mask: numpy.ndarray | None
            Optional mask at the image's size that is never edited.
        progress: Callable[[int, int], None] | None
            Called with (step, total) after every denoising step. Raise from it (or set
            ``pipeline._interrupt``) to cancel; ``EditCancelled`` then propagates.

        Returns
        -------
        EditResult

        Raises
        ------
        ValueError
            When a mask does not match the image or is empty.
        """
        return self._run(image, parameters, mask, keep_mask, progress, guidance_only=False)

    def _run(self, image: Radiograph, parameters: EditParameters, mask, keep_mask,
             progress: ProgressCallback | None, guidance_only: bool) -> EditResult:
        parameters = self.resolve(parameters)
        rows, columns = image.pixels.shape
        for name, array in (("mask", mask), ("keep_mask", keep_mask)):
            if array is not None and np.asarray(array).shape != (rows, columns):
                raise ValueError(f"{name} is {np.asarray(array).shape} but the image is "
                                 f"({rows}, {columns}).")
        if mask is not None and not np.asarray(mask).any():
            raise ValueError("mask is empty: paint the region to edit, or pass no mask.")
        size = (parameters.resolution, parameters.resolution)
        started = time.perf_counter()
        source = torch.from_numpy(np.ascontiguousarray(image.pixels, dtype=np.float32))[None, None]
        user = None if mask is None else _as_float(mask)
        keep = None if keep_mask is None else _as_float(keep_mask)
        crop = (slice(None), slice(None), slice(0, rows), slice(0, columns))
        canvas, canvas_keep, canvas_user = source, keep, user
        if parameters.aspect == "pad" and rows != columns:
            canvas, crop = _pad_square(source, 0.0)
            canvas_user = None if user is None else _pad_square(user, 0.0)[0]
            canvas_keep = _pad_square(torch.zeros_like(source) if keep is None else keep, 1.0)[0]
        model_input = _resize(canvas, size).clamp(0, 1)
        model_mask = None if canvas_user is None else (_resize(canvas_user, size) >= 0.5).float()
        model_keep = None if canvas_keep is None else (_resize(canvas_keep, size) > 0).float()
        if model_mask is not None and not model_mask.any():
            raise ValueError("mask vanishes at the model's resolution: paint a larger region.")
        generator = torch.Generator(device="cpu").manual_seed(parameters.seed)
        callback = None
        if progress is not None:
            def callback(pipe, step, timestep, tensors):
                progress(step + 1, parameters.num_inference_steps)
                return {}
        output = self.pipeline(
            parameters.instruction, model_input, mask_image=model_mask, keep_mask_image=model_keep,
            region_mode=parameters.region_mode, tau=parameters.tau,
            lateralize_prior=parameters.lateralize_prior,
            relevance_timestep=parameters.relevance_timestep,
            num_inference_steps=parameters.num_inference_steps,
            guidance_scale=parameters.guidance_scale,
            image_guidance_scale=parameters.image_guidance_scale, eta=parameters.eta,
            generator=generator, guidance_only=guidance_only, output_type="pt",
            callback_on_step_end=callback)
        model_seconds = time.perf_counter() - started

        # Back to the input's grid. The mask is upsampled by nearest neighbour and the keep
        # mask re-applied at full resolution, so every pixel outside it is the input's value.
        grid = tuple(canvas.shape[-2:])
        edit_mask = (_resize(output.edit_masks.float().cpu(), grid, mode="nearest") > 0.5)[crop]
        if keep is not None:
            edit_mask &= ~(keep > 0)
        edited = None
        if output.images is not None:
            upsampled = _resize(output.images.float().cpu(), grid).clamp(0, 1)[crop]
            edited = torch.where(edit_mask, upsampled, source)[0, 0].numpy()
        manifest = self._manifest(image, parameters, output, guidance_only, model_seconds,
                                  time.perf_counter() - started)
        return EditResult(
            edited=edited,
            edit_mask=edit_mask[0, 0].numpy(),
            guidance_map=_to_input_grid(output.guidance_maps, grid, crop),
            relevance_map=_to_input_grid(output.relevance_maps, grid, crop),
            prior_mask=_to_input_grid(output.prior_masks, grid, crop),
            manifest=manifest)

    def _manifest(self, image: Radiograph, parameters: EditParameters, output, preview: bool,
                  model_seconds: float, total_seconds: float) -> dict:
        import diffusers

        scheduler = self.pipeline.scheduler
        return {
            "software": {"instructx2x": __version__, "torch": torch.__version__,
                         "diffusers": diffusers.__version__, "python": platform.python_version()},
            "model": self.model_info.to_dict(),
            "kind": "guidance_preview" if preview else "edit",
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "attention": self.attention,
            "scheduler": {"class": type(scheduler).__name__, "config": dict(scheduler.config)},
            "parameters": dataclasses.asdict(parameters),
            "instruction": parse_instruction(parameters.instruction).to_dict(),
            "prior": None if output.prior is None else output.prior.to_dict(),
            "input": image.identity(),
            "geometry": {"model_size": [parameters.resolution] * 2,
                         "aspect_ratio": parameters.aspect, "mask_upsampling": "nearest"},
            "edit_fraction": float(output.edit_masks.float().mean()),
            "timings_s": {"model": round(model_seconds, 3), "total": round(total_seconds, 3)},
        }


def _as_float(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array, dtype=np.float32))[None, None]


def _resize(tensor: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    if tuple(tensor.shape[-2:]) == tuple(size):
        return tensor
    if mode == "nearest":
        return F.interpolate(tensor, size=size, mode="nearest-exact")
    shrinking = size[0] < tensor.shape[-2] or size[1] < tensor.shape[-1]
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


def _pad_square(tensor: torch.Tensor, value: float) -> tuple[torch.Tensor, tuple]:
    """Centre ``tensor`` on a square canvas; returns it and the slices that crop it back."""
    rows, columns = tensor.shape[-2:]
    side = max(rows, columns)
    top, left = (side - rows) // 2, (side - columns) // 2
    canvas = torch.full((*tensor.shape[:-2], side, side), value, dtype=tensor.dtype)
    crop = (slice(None), slice(None), slice(top, top + rows), slice(left, left + columns))
    canvas[crop] = tensor
    return canvas, crop


def _to_input_grid(maps: torch.Tensor | None, grid: tuple[int, int], crop: tuple) -> np.ndarray | None:
    if maps is None:
        return None
    return _resize(maps.float().cpu(), grid)[crop][0, 0].clamp(0, 1).numpy()
