"""Edit settings and their checks, in one place and without torch.

``EditParameters`` is what a user, a job file or a panel sets; every range check of the
library lives here (``check_sampling``), and the pipeline calls the same function, so a
value that one entry point refuses is refused by all of them before any model runs.
"""

from __future__ import annotations

import dataclasses
import enum
import math

import numpy as np

from .errors import EmptyEditRegionError, ParameterError
from .instructions import parse_instruction

__all__ = [
    "DEMO_MODEL_NAME",
    "RegionMode",
    "EditParameters",
    "ASPECT_MODES",
    "COMPOSITE_MODES",
    "SCHEDULER_NAMES",
    "MAX_RESOLUTION",
    "MAX_RELEVANCE_DRAWS",
    "GUIDANCE_SCALE",
    "IMAGE_GUIDANCE_SCALE",
    "TAU",
    "RELEVANCE_TIMESTEP",
    "check_sampling",
    "check_masks",
    "is_integer",
    "is_number",
]

# the model an edit runs when none is named: the bundled one, trained on synthetic phantoms
# (Training/configs/demo.yaml); light to import, so that a command checks its input first
DEMO_MODEL_NAME = "demo"

# squash: resize to the square grid as the authors trained; pad: keep the aspect ratio by
# padding to a square with black (air), never edited, and cropping the result back.
ASPECT_MODES = ("squash", "pad")
# change: the input at native resolution plus the model's change (edited - reconstructed input)
# inside the mask, so native detail survives; replace: the model's upsampled output inside it.
COMPOSITE_MODES = ("change", "replace")
# The samplers a user may name (``schedulers.SCHEDULERS`` builds them; kept here so that the
# CLI's choices need no diffusers import; a test keeps the two equal).
SCHEDULER_NAMES = ("ddim", "dpm++", "unipc", "euler", "euler-a", "pndm", "ddpm")
# 2048 px is four times the authors' grid; an SD-1.5 UNet there needs ~40 GB of activations.
MAX_RESOLUTION = 2048
MAX_GUIDANCE_SCALE = 100.0
# The authors' s_T and s_I (docs/method.md section 2): used where the model's card names none.
GUIDANCE_SCALE = 7.5
IMAGE_GUIDANCE_SCALE = 1.5
# The authors' relevance threshold tau and relevance timestep t_rel (docs/method.md section 2).
TAU = 0.1
RELEVANCE_TIMESTEP = 800
# Noise draws averaged into the relevance map: the authors take one (docs/method.md section 2, step 3);
# each more costs one UNet call on two members of the CFG batch.
MAX_RELEVANCE_DRAWS = 16


def is_integer(value: object) -> bool:
    """An int and not a bool (JSON's and YAML's ``true`` is no count); ``value`` may be anything a
    file or a client sent, whatever the field's annotation says."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int or a float and not a bool; ``value`` may be anything a file or a client sent."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class RegionMode(str, enum.Enum):
    """Which maps decide the edit region: the four rows of the paper's Table 2."""

    RSE = "rse"  # relevance map x pseudo mask (the paper's method)
    RELEVANCE = "relevance"  # relevance map alone (ablation b)
    PRIOR = "prior"  # pseudo mask alone (ablation c)
    NONE = "none"  # whole image, plain InstructPix2Pix (ablation a)


def check_sampling(
    *,
    tau: float,
    relevance_timestep: int,
    num_inference_steps: int | None,
    guidance_scale: float | None,
    image_guidance_scale: float | None,
    eta: float = 0.0,
    relevance_draws: int | None = None,
    train_timesteps: int = 1000,
) -> None:
    """Refuse out-of-range or non-finite sampling settings (None: the model's default, unchecked).

    Raises
    ------
    ParameterError
        Naming the setting and the value received.
    """
    scales = {
        name: value
        for name, value in (
            ("guidance_scale", guidance_scale),
            ("image_guidance_scale", image_guidance_scale),
        )
        if value is not None
    }
    for name, value in (("tau", tau), *scales.items(), ("eta", eta)):
        if not is_number(value) or not math.isfinite(value):
            raise ParameterError(f"{name} must be a finite number, got {value!r}.")
    if not 0.0 <= tau <= 1.0:
        raise ParameterError(f"tau must lie in [0, 1], got {tau}.")
    for name, value in scales.items():
        if not 0.0 <= value <= MAX_GUIDANCE_SCALE:
            raise ParameterError(f"{name} must lie in [0, {MAX_GUIDANCE_SCALE:g}], got {value}.")
    if not 0.0 <= eta <= 1.0:
        raise ParameterError(f"eta must lie in [0, 1], got {eta}.")
    if not is_integer(relevance_timestep) or not 0 <= relevance_timestep < train_timesteps:
        raise ParameterError(
            f"relevance_timestep must be an integer in [0, {train_timesteps}), got {relevance_timestep!r}."
        )
    if relevance_draws is not None and (
        not is_integer(relevance_draws) or not 1 <= relevance_draws <= MAX_RELEVANCE_DRAWS
    ):
        raise ParameterError(
            f"relevance_draws must be an integer in [1, {MAX_RELEVANCE_DRAWS}], got {relevance_draws!r}."
        )
    if num_inference_steps is not None and (
        not is_integer(num_inference_steps) or not 1 <= num_inference_steps <= train_timesteps
    ):
        raise ParameterError(
            f"num_inference_steps must be an integer in [1, {train_timesteps}], got {num_inference_steps!r}."
        )


@dataclasses.dataclass(frozen=True)
class EditParameters:
    """Every setting that changes an edit; recorded in full in the manifest.

    Defaults are the authors' (docs/method.md section 2), except those that follow the model and the
    device, left ``None`` here: the step count (the sampler's default, or the model card's
    ``few_step_solver_steps``), the guidance scales s_T and s_I (the model card's
    ``guidance_scale`` / ``image_guidance_scale``, else the authors' 7.5 and 1.5), the noise
    draws averaged into the relevance map (the card's ``relevance_draws``, else the authors'
    one) and the resolution (the model's native size, UNet sample_size x VAE scale factor).
    ``InstructX2XEditor.resolve`` fills them in, and the manifest records the resolved values.
    The instruction is stored whitespace-normalised, which is what the model sees and what
    provenance records.

    Raises
    ------
    ParameterError
        For any out-of-range value (see ``check_sampling``), an unknown mode, or an
        instruction that is empty, too long or holds control characters.
    """

    instruction: str
    region_mode: str = RegionMode.RSE.value
    tau: float = TAU
    relevance_timestep: int = RELEVANCE_TIMESTEP
    relevance_draws: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    image_guidance_scale: float | None = None
    eta: float = 0.0
    seed: int = 0
    resolution: int | None = None
    lateralize_prior: bool = True
    aspect: str = "squash"
    composite: str = "change"

    def __post_init__(self) -> None:
        object.__setattr__(self, "instruction", parse_instruction(self.instruction).text)
        try:
            RegionMode(self.region_mode)
        except ValueError:
            raise ParameterError(
                f"region_mode must be one of {[m.value for m in RegionMode]}, got {self.region_mode!r}."
            ) from None
        check_sampling(
            tau=self.tau,
            relevance_timestep=self.relevance_timestep,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            image_guidance_scale=self.image_guidance_scale,
            eta=self.eta,
            relevance_draws=self.relevance_draws,
        )
        if self.resolution is not None and (
            not is_integer(self.resolution)
            or self.resolution % 8
            or not 64 <= self.resolution <= MAX_RESOLUTION
        ):
            raise ParameterError(
                f"resolution must be a multiple of 8 in [64, {MAX_RESOLUTION}], got {self.resolution!r}."
            )
        if not is_integer(self.seed) or not 0 <= self.seed < 2**63:
            raise ParameterError(f"seed must be an integer in [0, 2**63), got {self.seed!r}.")
        if self.aspect not in ASPECT_MODES:
            raise ParameterError(f"aspect must be one of {ASPECT_MODES}, got {self.aspect!r}.")
        if self.composite not in COMPOSITE_MODES:
            raise ParameterError(f"composite must be one of {COMPOSITE_MODES}, got {self.composite!r}.")

    def to_dict(self) -> dict:
        """JSON-ready form (the manifest's ``parameters``)."""
        return dataclasses.asdict(self)


def check_masks(
    shape: tuple[int, int], parameters: EditParameters, mask: np.ndarray | None, keep_mask: np.ndarray | None
) -> None:
    """Refuse masks that cannot work with this image and mode, before any model call.

    Raises
    ------
    ParameterError
        A mask of another size, or a painted mask in a mode without a prior.
    EmptyEditRegionError
        An empty edit mask, or a keep mask that covers the whole image.
    """
    for name, array in (("mask", mask), ("keep_mask", keep_mask)):
        if array is not None and np.asarray(array).shape != tuple(shape):
            raise ParameterError(f"{name} is {np.asarray(array).shape} but the image is {tuple(shape)}.")
    if mask is not None and RegionMode(parameters.region_mode) in (RegionMode.RELEVANCE, RegionMode.NONE):
        raise ParameterError(
            f"a painted mask replaces the prior, which region mode "
            f"{parameters.region_mode!r} does not use; choose 'rse' or 'prior'."
        )
    if mask is not None and not np.asarray(mask).any():
        raise EmptyEditRegionError("mask is empty: paint the region to edit, or pass no mask.")
    if keep_mask is not None and np.asarray(keep_mask).all():
        raise EmptyEditRegionError("the keep mask covers the whole image: nothing may be edited.")
