"""Edit a radiograph of any size: resize to the model's grid, run the pipeline, map back.

``InstructX2XEditor`` is what the CLI, the Slicer worker and Python users call. It owns the
geometry (the model sees ``resolution`` x ``resolution``, the result has the input's rows and
columns), the seed, timings and the manifest that makes a result reproducible.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .backends import check_backend, resolve_backend
from .devices import cpu_description, needs_attention_slicing, resolve_device, resolve_dtype
from .errors import EmptyEditRegionError, ParameterError
from .guidance import resize_map
from .image_io import Radiograph
from .instructions import LEVEL_PLACEHOLDER, ParsedSeries, parse_instruction
from .loading import ModelInfo, load_pipeline
from .openvino_runtime import OpenVINORuntime
from .parameters import (
    ASPECT_MODES,
    GUIDANCE_SCALE,
    IMAGE_GUIDANCE_SCALE,
    EditParameters,
    RegionMode,
    check_masks,
    check_sampling,
)
from .pipeline import InstructX2XPipeline
from .priors import PriorSet
from .schedulers import FEW_STEP_SOLVER_STEPS, default_scheduler, default_steps

__all__ = ["EditParameters", "EditResult", "SeriesResult", "InstructX2XEditor", "ASPECT_MODES"]

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
DECODE_CHOICES = ("auto", "mask", "full")


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
        software versions, composite and timings.
    model_output: numpy.ndarray | None
        float32 ``(rows, columns)``: the model's edited image upsampled to the input's grid
        (None for a preview). ``composite="replace"`` puts it inside the mask as it is.
    reconstruction: numpy.ndarray | None
        float32 ``(rows, columns)``: the model's reconstruction of the unedited input,
        upsampled alike; ``model_output - reconstruction`` is the model's change, which
        ``composite="change"`` adds to the native input (None for replace and previews).
    model_guidance: numpy.ndarray | None
        float32: the guidance map on the model's grid (what ``mask_at`` thresholds).
    canvas: tuple[int, int, int, int] | None
        The model-grid frame on the input's grid: rows, columns, top, left (padding offsets).
    model_grid_output: numpy.ndarray | None
        float32: the edited image on the model's own grid (e.g. 512x512, padded in pad mode),
        before any upsampling; what an evaluation classifier at a fixed size should see.
    """

    edited: np.ndarray | None
    edit_mask: np.ndarray
    guidance_map: np.ndarray
    relevance_map: np.ndarray | None
    prior_mask: np.ndarray | None
    manifest: dict
    model_output: np.ndarray | None = None
    reconstruction: np.ndarray | None = None
    model_guidance: np.ndarray | None = None
    canvas: tuple[int, int, int, int] | None = None
    model_grid_output: np.ndarray | None = None

    def edited_image(self) -> np.ndarray:
        """``edited``, which every edit has and a guidance preview lacks.

        Raises
        ------
        ParameterError
            For a guidance preview.
        """
        if self.edited is None:
            raise ParameterError("a guidance preview has no edited image.")
        return self.edited

    def mask_at(self, tau: float, keep_mask: np.ndarray | None = None) -> np.ndarray:
        """The edit mask this result would have at another ``tau``, with no model call.

        Thresholds the guidance map on the model's grid and maps it back exactly as the
        edit does (nearest neighbour, crop, keep mask), so it equals the mask of an edit
        run at that ``tau`` with the same image, instruction, seed and model.
        """
        check_sampling(
            tau=tau,
            relevance_timestep=0,
            num_inference_steps=None,
            guidance_scale=0.0,
            image_guidance_scale=0.0,
        )
        if self.canvas is None or self.model_guidance is None:
            raise ParameterError(
                "mask_at needs the model-grid guidance map and frame that InstructX2XEditor's "
                "results carry; this result has none."
            )
        side_rows, side_columns, top, left = self.canvas
        rows, columns = self.edit_mask.shape
        model_mask = torch.from_numpy((self.model_guidance >= tau).astype(np.float32))[None, None]
        canvas = resize_map(model_mask, (side_rows, side_columns), mode="nearest")[0, 0].numpy() > 0.5
        mask = canvas[top : top + rows, left : left + columns]
        return mask & ~(np.asarray(keep_mask) > 0) if keep_mask is not None else mask

    @property
    def untrained(self) -> bool:
        """True when a random-weight model made this result (its model card says so; a
        model without a card is not assumed untrained)."""
        return self.manifest["model"]["trained"] is False


@dataclasses.dataclass
class SeriesResult:
    """A progression series: one ``EditResult`` per step, all of one image, seed and edit region.

    Attributes
    ----------
    series: ParsedSeries
        The steps as parsed, with the step whose relevance map gave the region.
    steps: list[EditResult]
        One edit per step, in order; each manifest's ``series`` says which step it is. Their
        ``edit_mask``, ``guidance_map`` and ``relevance_map`` are the same arrays' values.
    """

    series: ParsedSeries
    steps: list[EditResult]

    @property
    def edit_mask(self) -> np.ndarray:
        """The edit region every step shares."""
        return self.steps[0].edit_mask

    @property
    def guidance_map(self) -> np.ndarray:
        """The guidance map every step shares."""
        return self.steps[0].guidance_map

    @property
    def untrained(self) -> bool:
        """True when a random-weight model made the series."""
        return self.steps[0].untrained


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
    decode: str
        ``full`` (``auto``) decodes the whole latent grid; ``mask`` only the latents over
        the edit masks' box, faster on CPU but approximate.
    backend: str
        ``auto``, ``torch`` or ``openvino``: what runs the networks (see
        ``backends.resolve_backend``); ``openvino`` runs on the CPU.
    openvino_cache: str | pathlib.Path | None
        The OpenVINO backend's cache folder (``backends.cache_folder``).
    """

    def __init__(
        self,
        pipeline: InstructX2XPipeline,
        model_info: ModelInfo,
        device: str = "auto",
        dtype: str = "auto",
        decode: str = "auto",
        backend: str = "auto",
        openvino_cache: str | Path | None = None,
    ) -> None:
        self.device = resolve_device("cpu" if backend == "openvino" and device == "auto" else device)
        if decode not in DECODE_CHOICES:
            raise ParameterError(f"decode must be one of {DECODE_CHOICES}, got {decode!r}.")
        # "mask" saves up to a quarter of a CPU edit but is not exact (the decoder's group
        # norms and attention see only the crop; docs/benchmarks.md), so it is opt-in.
        self.decode = "full" if decode == "auto" else decode
        parameters = sum(p.numel() for p in pipeline.unet.parameters())
        self.dtype, reason = resolve_dtype(dtype, self.device, parameters)
        self.backend, backend_reason = resolve_backend(backend, self.device.type, parameters, openvino_cache)
        self.precision = {
            "dtype": str(self.dtype).replace("torch.", ""),
            "reason": reason,
            "relevance_dtype": str(pipeline.relevance_dtype or self.dtype).replace("torch.", ""),
            "cpu": cpu_description() if self.device.type == "cpu" else None,
        }
        self.model_info = model_info
        self.runtime: OpenVINORuntime | None = None
        if self.backend == "openvino":
            native = int(pipeline.unet.config.sample_size) * pipeline.vae_scale_factor
            self.runtime = OpenVINORuntime(
                pipeline, model_info.sha256, native, openvino_cache, name=model_info.name
            )
            self.runtime.install(pipeline, self.dtype)  # the torch networks go; stand-ins call OpenVINO
        self.backend_info = {"name": self.backend, "reason": backend_reason}
        if self.runtime is not None:
            self.backend_info.update(self.runtime.describe())
        self.pipeline = pipeline.to(self.device, self.dtype)
        self.pipeline.set_progress_bar_config(disable=True)
        self.attention = "sdpa" if self.runtime is None else "openvino"
        if needs_attention_slicing(self.device):
            logger.warning("Little GPU memory is free: slicing attention (slower, smaller).")
            self.pipeline.unet.set_attention_slice("auto")
            self.attention = "sliced"
        self._guidance_cache: tuple | None = None  # (key, GuidanceState) of the last call
        if self.device.type == "cpu" and self.runtime is None:
            # oneDNN runs the VAE's large convolutions ~15 % faster channels-last (benchmarks).
            self.pipeline.vae.to(memory_format=torch.channels_last)

    @classmethod
    def from_model(
        cls,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        scheduler: str = "auto",
        allow_hub: bool = False,
        single_file_config: str | None = None,
        decode: str = "auto",
        backend: str = "auto",
        openvino_cache: str | Path | None = None,
    ) -> InstructX2XEditor:
        """Load weights (see ``loading.load_pipeline``) and place them on the device, their
        networks run by ``backend`` (checked before the weights load).

        ``scheduler="auto"`` takes ``schedulers.default_scheduler`` for the device.
        """
        check_backend(backend, device, openvino_cache)
        if backend == "openvino" and device == "auto":
            device = "cpu"
        if scheduler == "auto":
            scheduler = default_scheduler(resolve_device(device))
        pipeline, info = load_pipeline(
            model, allow_hub=allow_hub, scheduler=scheduler, single_file_config=single_file_config
        )
        if info.trained is False:
            logger.warning("Model %s has random weights: its edits are meaningless noise.", info.name)
        return cls(
            pipeline,
            info,
            device=device,
            dtype=dtype,
            decode=decode,
            backend=backend,
            openvino_cache=openvino_cache,
        )

    @property
    def native_resolution(self) -> int:
        """The model's own grid: UNet sample_size x VAE scale factor (512 for SD 1.x)."""
        return int(self.pipeline.unet.config.sample_size) * self.pipeline.vae_scale_factor

    def resolve(self, parameters: EditParameters) -> EditParameters:
        """``parameters`` with the step count (from the scheduler), the guidance scales and the
        relevance map's noise draws (the model card's, else the authors') and the resolution
        (the model's native size) filled in where they are None."""
        card = self.model_info.card or {}
        changes: dict[str, Any] = {}
        if parameters.num_inference_steps is None:
            changes["num_inference_steps"] = default_steps(
                self.pipeline.scheduler, card.get("few_step_solver_steps", FEW_STEP_SOLVER_STEPS)
            )
        if parameters.guidance_scale is None:
            changes["guidance_scale"] = float(card.get("guidance_scale", GUIDANCE_SCALE))
        if parameters.image_guidance_scale is None:
            changes["image_guidance_scale"] = float(card.get("image_guidance_scale", IMAGE_GUIDANCE_SCALE))
        if parameters.relevance_draws is None:
            changes["relevance_draws"] = int(card.get("relevance_draws", 1))
        if parameters.resolution is None:
            changes["resolution"] = self.native_resolution
        return dataclasses.replace(parameters, **changes) if changes else parameters

    def sampling(self, parameters: EditParameters | None = None) -> dict:
        """The steps, s_T, s_I, relevance draws and resolution an edit with ``parameters`` runs
        with (None: the defaults, as ``resolve`` fills them in from the model and the sampler),
        for reports."""
        resolved = self.resolve(parameters or EditParameters(instruction="-"))
        return {
            name: getattr(resolved, name)
            for name in (
                "num_inference_steps",
                "guidance_scale",
                "image_guidance_scale",
                "relevance_draws",
                "resolution",
            )
        }

    def preview(
        self,
        image: Radiograph,
        parameters: EditParameters,
        mask: np.ndarray | None = None,
        keep_mask: np.ndarray | None = None,
    ) -> EditResult:
        """Guidance maps and edit mask only: one UNet call per relevance draw and one VAE encode."""
        return self._run([image], [parameters], [mask], [keep_mask], None, guidance_only=True)[0]

    def edit(
        self,
        image: Radiograph,
        parameters: EditParameters,
        mask: np.ndarray | None = None,
        keep_mask: np.ndarray | None = None,
        progress: ProgressCallback | None = None,
    ) -> EditResult:
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
            Called with (step, total) after every denoising step. Raise from it (or call
            ``pipeline.cancel()``) to cancel; ``EditCancelled`` then propagates.

        Returns
        -------
        EditResult

        Raises
        ------
        ParameterError
            When a mask does not match the image, or a mask or mode leaves nothing to edit
            (``EmptyEditRegionError``); checked before any model call where the inputs tell.
        """
        return self._run([image], [parameters], [mask], [keep_mask], progress, guidance_only=False)[0]

    def edit_batch(
        self,
        images: list[Radiograph],
        parameters: list[EditParameters],
        masks: list[np.ndarray | None] | None = None,
        keep_masks: list[np.ndarray | None] | None = None,
        progress: ProgressCallback | None = None,
    ) -> list[EditResult]:
        """Edit several radiographs in one pipeline call (one UNet batch per step).

        The parameters may differ only in instruction and seed; every element gets its own
        generator, so each result equals the same edit run alone (up to the last bits of
        batched arithmetic). Masks are given for all elements or none; keep masks per element.

        Raises
        ------
        ParameterError
            When the lists differ in length or the parameters differ in another setting.
        """
        count = len(images)
        masks = [None] * count if masks is None else list(masks)
        keep_masks = [None] * count if keep_masks is None else list(keep_masks)
        if not count or not len(parameters) == len(masks) == len(keep_masks) == count:
            raise ParameterError(
                f"give one parameter set, mask and keep mask per image: {count} "
                f"images, {len(parameters)} parameter sets."
            )
        shared = [dataclasses.replace(self.resolve(p), instruction="-", seed=0) for p in parameters]
        if any(p != shared[0] for p in shared):
            raise ParameterError(
                "a batch shares every setting except instruction and seed; run the others separately."
            )
        if len({m is None for m in masks}) > 1:
            raise ParameterError("give an edit mask for every image of a batch or for none.")
        return self._run(images, parameters, masks, keep_masks, progress, guidance_only=False)

    def edit_series(
        self,
        image: Radiograph,
        series: ParsedSeries,
        parameters: EditParameters,
        mask: np.ndarray | None = None,
        keep_mask: np.ndarray | None = None,
        progress: ProgressCallback | None = None,
    ) -> SeriesResult:
        """Edit ``image`` once per step of a progression series, so that only the level varies.

        Every step has the seed of ``parameters`` (the same autoencoder sample, noise and
        relevance draws) and one edit region: the relevance map of the series' region step
        (``series.region_step``), computed once, times the pseudo mask the steps share (or
        ``mask``), less ``keep_mask`` (docs/method.md section 8.7). The steps run as one batch
        (one UNet call per denoising step), as ``edit_batch`` runs films.

        Parameters
        ----------
        image: Radiograph
            The radiograph every step edits.
        series: ParsedSeries
            From ``instructions.parse_series``.
        parameters: EditParameters
            The settings of every step. Its instruction is the series' template (holding
            ``{level}``) or one of its steps; each step's instruction takes its place.
        mask, keep_mask, progress
            As for ``edit``; the masks apply to every step.

        Returns
        -------
        SeriesResult

        Raises
        ------
        ParameterError
            When the instruction of ``parameters`` is not the series' (checked before any
            model call), or as ``edit``.
        """
        if (
            LEVEL_PLACEHOLDER not in parameters.instruction
            and parameters.instruction not in series.instructions
        ):
            raise ParameterError(
                f"the series' settings name the instruction {parameters.instruction!r}, which is "
                f"neither a template holding {LEVEL_PLACEHOLDER} nor one of its steps."
            )
        steps = [dataclasses.replace(parameters, instruction=text) for text in series.instructions]
        count = len(steps)
        results = self._run(
            [image] * count,
            steps,
            [mask] * count,
            [keep_mask] * count,
            progress,
            guidance_only=False,
            relevance_from=series.region_step,
        )
        for number, (result, level) in enumerate(zip(results, series.levels), start=1):
            result.manifest["series"] = {
                "step": number,
                "steps": count,
                "level": level,
                "direction": series.direction,
                "region_instruction": series.instructions[series.region_step],
            }
        return SeriesResult(series, results)

    def _run(
        self,
        images: list[Radiograph],
        given: list[EditParameters],
        masks: list[np.ndarray | None],
        keep_masks: list[np.ndarray | None],
        progress: ProgressCallback | None,
        guidance_only: bool,
        relevance_from: int | None = None,
    ) -> list[EditResult]:
        parameters_list = [self.resolve(p) for p in given]
        parameters = parameters_list[0]
        if self.runtime is not None and parameters.resolution != self.runtime.resolution:
            raise ParameterError(
                f"the OpenVINO backend runs this model at its own {self.runtime.resolution} px (its "
                f"networks are converted for that grid); a {parameters.resolution} px edit needs "
                "--backend torch."
            )
        steps, resolution = parameters.num_inference_steps, parameters.resolution
        assert steps is not None and resolution is not None  # resolve() fills both in
        for image, element, mask, keep_mask in zip(images, parameters_list, masks, keep_masks):
            check_masks(image.pixels.shape, element, mask, keep_mask)
        size = (resolution, resolution)
        started = time.perf_counter()
        frames = [
            self._frame(image, element, mask, keep_mask, size)
            for image, element, mask, keep_mask in zip(images, parameters_list, masks, keep_masks)
        ]

        def stack(name):
            tensors = [getattr(frame, name) for frame in frames]
            if all(t is None for t in tensors):
                return None
            return torch.cat([torch.zeros_like(frames[0].model_input) if t is None else t for t in tensors])

        model_input = stack("model_input")
        generators = [torch.Generator(device="cpu").manual_seed(p.seed) for p in parameters_list]
        # A preview followed by the edit (same model input, instruction, seed and relevance draws)
        # shares the text encoding, VAE encode, noise draws and relevance map: reuse them.
        key = (
            hashlib.sha256(model_input.numpy().tobytes()).hexdigest(),
            tuple(p.instruction for p in parameters_list),
            tuple(p.seed for p in parameters_list),
            parameters.relevance_draws,
            relevance_from,
        )
        cached = self._guidance_cache
        reused = cached is not None and cached[0] == key

        change = parameters.composite == "change"
        output = self.pipeline(
            [p.instruction for p in parameters_list],
            model_input,
            mask_image=stack("model_mask"),
            keep_mask_image=stack("model_keep"),
            prior_mask=stack("model_prior"),
            region_mode=parameters.region_mode,
            tau=parameters.tau,
            lateralize_prior=parameters.lateralize_prior,
            relevance_timestep=parameters.relevance_timestep,
            relevance_draws=parameters.relevance_draws,
            relevance_from=relevance_from,
            num_inference_steps=parameters.num_inference_steps,
            guidance_scale=parameters.guidance_scale,
            image_guidance_scale=parameters.image_guidance_scale,
            eta=parameters.eta,
            generator=generators,
            guidance_only=guidance_only,
            output_type="pt",
            return_reconstruction=change,
            callback_on_step_end=(None if progress is None else _step_callback(progress, steps)),
            decode_mask_region=self.decode == "mask",
            guidance_state=cached[1] if cached is not None and reused else None,
        )
        self._guidance_cache = (key, output.guidance_state)
        model_seconds = time.perf_counter() - started
        results = [
            self._result(i, frame, image, element, output, guidance_only, reused, model_seconds, started)
            for i, (frame, image, element) in enumerate(zip(frames, images, parameters_list))
        ]
        return results

    def _frame(
        self, image: Radiograph, parameters: EditParameters, mask, keep_mask, size: tuple[int, int]
    ) -> _Frame:
        """One image (and its masks) on the model's grid, and how to map back."""
        rows, columns = image.pixels.shape
        source = torch.from_numpy(np.ascontiguousarray(image.pixels, dtype=np.float32))[None, None]
        user = None if mask is None else _as_float(mask)
        keep = None if keep_mask is None else _as_float(keep_mask)
        crop = (slice(None), slice(None), slice(0, rows), slice(0, columns))
        canvas, canvas_keep, canvas_user, canvas_prior, selection = source, keep, user, None, None
        if parameters.aspect == "pad":  # a square image pads to itself
            canvas, crop = _pad_square(source, 0.0)
            canvas_user = None if user is None else _pad_square(user, 0.0)[0]
            canvas_keep = _pad_square(torch.zeros_like(source) if keep is None else keep, 1.0)[0]
            if user is None and RegionMode(parameters.region_mode) in (RegionMode.RSE, RegionMode.PRIOR):
                # The priors describe a PA film squashed to a square: put them on the image's
                # own grid first, then pad them with the image, so they land where it lands.
                selection = self.prior_set.select(
                    parse_instruction(parameters.instruction), lateralize=parameters.lateralize_prior
                )
                prior = resize_map(
                    torch.from_numpy(selection.mask)[None, None], (rows, columns), mode="nearest"
                )
                canvas_prior = _pad_square(prior, 0.0)[0]
        model_mask = None if canvas_user is None else (resize_map(canvas_user, size) >= 0.5).float()
        if model_mask is not None and not model_mask.any():
            raise EmptyEditRegionError(
                f"{image.source}: the mask vanishes at the model's resolution: paint a larger region."
            )
        return _Frame(
            model_input=resize_map(canvas, size).clamp(0, 1),
            model_mask=model_mask,
            model_keep=None if canvas_keep is None else (resize_map(canvas_keep, size) > 0).float(),
            model_prior=None if canvas_prior is None else resize_map(canvas_prior, size, mode="nearest"),
            keep=keep,
            grid=(canvas.shape[-2], canvas.shape[-1]),
            crop=crop,
            selection=selection,
        )

    def _result(
        self,
        index: int,
        frame: _Frame,
        image: Radiograph,
        parameters: EditParameters,
        output,
        guidance_only: bool,
        reused: bool,
        model_seconds: float,
        started: float,
    ) -> EditResult:
        """Batch element ``index`` back on its input's grid. The mask is upsampled by nearest
        neighbour and the keep mask re-applied at full resolution, so every pixel outside it
        is the input's value."""
        grid, crop = frame.grid, frame.crop
        element = slice(index, index + 1)

        def back(maps):
            return None if maps is None else _to_input_grid(maps[element], grid, crop)

        edit_mask = (resize_map(output.edit_masks[element].float().cpu(), grid, mode="nearest") > 0.5)[crop]
        if frame.keep is not None:
            edit_mask &= ~(frame.keep > 0)
        inside = edit_mask[0, 0].numpy()
        edited = model_output = reconstruction = composite = None
        if output.images is not None:
            if not inside.any():
                raise EmptyEditRegionError(
                    f"{image.source}: the edit region vanishes on the input's "
                    "grid (the keep mask covers all of it)."
                )
            model_output = back(output.images)
            if parameters.composite == "change":
                reconstruction = back(output.reconstructions)
                composed = image.pixels + (model_output - reconstruction)
            else:
                composed = model_output
            clipped = float(((composed < 0) | (composed > 1))[inside].mean())
            edited = np.where(inside, np.clip(composed, 0, 1), image.pixels).astype(np.float32)
            composite = {"mode": parameters.composite, "clipped_fraction": round(clipped, 6)}
        prior = output.prior[index] if isinstance(output.prior, list) else output.prior
        manifest = self._manifest(
            image,
            parameters,
            frame.selection or prior,
            composite,
            guidance_only,
            float(output.edit_masks[element].float().mean()),
            model_seconds,
            time.perf_counter() - started,
        )
        manifest["reused_guidance"] = reused
        return EditResult(
            edited=edited,
            edit_mask=inside,
            guidance_map=back(output.guidance_maps),
            relevance_map=back(output.relevance_maps),
            prior_mask=back(output.prior_masks),
            manifest=manifest,
            model_output=model_output,
            reconstruction=reconstruction,
            model_guidance=output.guidance_maps[index, 0].float().cpu().numpy(),
            canvas=(*grid, crop[2].start, crop[3].start),
            model_grid_output=None
            if output.images is None
            else output.images[index, 0].float().cpu().numpy(),
        )

    @property
    def prior_set(self) -> PriorSet:
        """The anatomical priors in use (the shipped set unless one was assigned)."""
        if self.pipeline.prior_set is None:
            self.pipeline.prior_set = PriorSet.default()
        return self.pipeline.prior_set

    def _manifest(
        self,
        image: Radiograph,
        parameters: EditParameters,
        prior,
        composite: dict | None,
        preview: bool,
        edit_fraction: float,
        model_seconds: float,
        total_seconds: float,
    ) -> dict:
        import diffusers

        scheduler = self.pipeline.scheduler
        software = {
            "instructx2x": __version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
        }
        if self.runtime is not None:
            software["openvino"] = self.runtime.version
        return {
            "software": software,
            "model": self.model_info.to_dict(),
            "kind": "guidance_preview" if preview else "edit",
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "precision": self.precision,
            "backend": self.backend_info,
            "attention": self.attention,
            "decode": self.decode,
            "scheduler": {"class": type(scheduler).__name__, "config": dict(scheduler.config)},
            "parameters": parameters.to_dict(),
            "instruction": parse_instruction(parameters.instruction).to_dict(),
            "prior": None if prior is None else prior.to_dict(),
            "input": image.identity(),
            "geometry": {
                "model_size": [parameters.resolution] * 2,
                "model_native_size": self.native_resolution,
                "aspect_ratio": parameters.aspect,
                "mask_upsampling": "nearest",
            },
            "composite": composite,
            "edit_fraction": edit_fraction,
            "timings_s": {"model": round(model_seconds, 3), "total": round(total_seconds, 3)},
        }


@dataclasses.dataclass
class _Frame:
    """One batch element on the model's grid, and the geometry that maps it back."""

    model_input: torch.Tensor
    model_mask: torch.Tensor | None
    model_keep: torch.Tensor | None
    model_prior: torch.Tensor | None
    keep: torch.Tensor | None
    grid: tuple[int, int]
    crop: tuple
    selection: object | None  # PriorSelection made on the image's own grid (pad mode)


def _step_callback(progress: ProgressCallback, total: int) -> Callable:
    """The pipeline's step-end callback: ``progress(step, total)`` after each denoising step."""

    def callback(pipe, step, timestep, tensors):
        progress(step + 1, total)
        return {}

    return callback


def _as_float(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array, dtype=np.float32))[None, None]


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
    return resize_map(maps.float().cpu(), grid)[crop][0, 0].clamp(0, 1).numpy()
