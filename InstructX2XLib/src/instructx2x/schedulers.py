"""Schedulers shipped with the code, so nothing is fetched from a model hub at run time.

The authors sample with DDIM configured as below (docs/method.md section 2); any diffusers scheduler
built from the same betas can replace it. Defaults follow the device: on CUDA the authors'
DDIM with 100 steps, elsewhere DPM-Solver++ with 3 steps, which keeps an SD-1.5-size edit on
a 2-core CPU without AMX under a minute and stays closer to the 100-step DDIM edit than DDIM with 10
steps does (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import cast

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .errors import ParameterError

__all__ = [
    "DDIM_CONFIG",
    "TRAINING_KEYS",
    "SCHEDULERS",
    "PAPER_STEPS",
    "FEW_STEP_SOLVER_STEPS",
    "make_scheduler",
    "default_scheduler",
    "default_steps",
]

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

# Each class is a SchedulerMixin (the sampler) and a ConfigMixin (``from_config``).
SCHEDULERS: dict[str, tuple[type[ConfigMixin], dict]] = {
    "ddim": (DDIMScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": (UniPCMultistepScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "ddpm": (DDPMScheduler, {}),
}

PAPER_STEPS = 100  # the authors' DDIM step count
FEW_STEP_SOLVER_STEPS = 3  # DPM-Solver++ and UniPC: multistep solvers that converge in few steps
_FEW_STEP_SOLVERS = (DPMSolverMultistepScheduler, UniPCMultistepScheduler)


def default_scheduler(device: torch.device) -> str:
    """The sampler ``auto`` means: the authors' DDIM on CUDA, DPM-Solver++ elsewhere."""
    return "ddim" if device.type == "cuda" else "dpm++"


def default_steps(scheduler: SchedulerMixin, few_step_solver_steps: int = FEW_STEP_SOLVER_STEPS) -> int:
    """Denoising steps when none are given: ``few_step_solver_steps`` (3, or what the model's
    card asks) for the few-step solvers, else the authors' 100."""
    return few_step_solver_steps if isinstance(scheduler, _FEW_STEP_SOLVERS) else PAPER_STEPS


# What a model's own scheduler/ folder may set: how it was trained. How to sample (steps
# offset, alpha-to-one, clipping) stays the authors'.
TRAINING_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
)


def make_scheduler(name: str = "ddim", model_config: dict | None = None) -> SchedulerMixin:
    """Build a scheduler by short name from the shipped DDIM configuration.

    Parameters
    ----------
    name: str
        One of ``SCHEDULERS`` (``ddim``, ``dpm++``, ``unipc``, ``euler``, ``euler-a``,
        ``pndm``, ``ddpm``).
    model_config: dict | None
        A model's saved ``scheduler_config.json``; its training keys (``TRAINING_KEYS``:
        betas, prediction type) replace the shipped Stable Diffusion ones.

    Returns
    -------
    diffusers.SchedulerMixin

    Raises
    ------
    ParameterError
        When the name is unknown.
    """
    if name not in SCHEDULERS:
        raise ParameterError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}.")
    scheduler_class, overrides = SCHEDULERS[name]
    trained = {k: v for k, v in (model_config or {}).items() if k in TRAINING_KEYS and v is not None}
    # from_config returns the scheduler alone (a tuple only with return_unused_kwargs=True)
    return cast(SchedulerMixin, scheduler_class.from_config({**DDIM_CONFIG, **trained, **overrides}))
