"""Schedulers shipped with the code, so nothing is fetched from a model hub at run time.

The authors sample with DDIM configured as below (SPEC section 2); any diffusers scheduler
built from the same betas can replace it, e.g. DPM-Solver++ for fewer steps.
"""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

__all__ = ["DDIM_CONFIG", "SCHEDULERS", "make_scheduler"]

# Stable Diffusion 1.x betas with the authors' DDIM sampling settings.
DDIM_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "prediction_type": "epsilon",
}

SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "ddim": (DDIMScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": (UniPCMultistepScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "ddpm": (DDPMScheduler, {}),
}


def make_scheduler(name: str = "ddim") -> SchedulerMixin:
    """Build a scheduler by short name from the shipped DDIM configuration.

    Parameters
    ----------
    name: str
        One of ``SCHEDULERS`` (``ddim``, ``dpm++``, ``unipc``, ``euler``, ``euler-a``,
        ``pndm``, ``ddpm``).

    Returns
    -------
    diffusers.SchedulerMixin

    Raises
    ------
    ValueError
        When the name is unknown.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}.")
    scheduler_class, overrides = SCHEDULERS[name]
    return scheduler_class.from_config({**DDIM_CONFIG, **overrides})
