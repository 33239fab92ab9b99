"""The page's inputs: the state keys a page may write (and their types), the starting state of
the whole page, and the controls read as the shared session's settings.

The instruction is parsed live (``describe_instruction``) and the structured helper's choices
are composed into one (``compose_instruction``), both in the library's vocabulary.
"""

from __future__ import annotations

from typing import Any, TypeVar

from instructx2x.errors import ParameterError
from instructx2x.parameters import GUIDANCE_SCALE, IMAGE_GUIDANCE_SCALE

from .. import scene as mrml
from ..session import (
    SIDES,
    Backend,
    MaskSource,
    Operation,
    PanelSettings,
    Preset,
    compose_instruction,
    describe_instruction,
    instruction_completions,
)
from .messages import message
from .pacs_targets import PacsTargets

__all__ = ["Controls", "WRITABLE_STATE", "initial_state"]

Number = TypeVar("Number", int, float)

# The state keys a page may write (its inputs) and the types their values may have; every other
# key, trame's own (trame__*) included, is the server's to set.
NUMBER: tuple[type, ...] = (int, float)
WRITABLE_STATE: dict[str, tuple[type, ...]] = {
    "instruction": (str,),
    "series": (str,),
    "compose_operation": (str,),
    "compose_finding": (str,),
    "compose_side": (str,),
    "compose_zone": (str,),
    "compose_from": (str,),
    "compose_to": (str,),
    "mask_source": (str,),
    "tool": (str,),
    "segment": (str,),
    "brush_mm": NUMBER,
    "scissors_fill": (bool,),
    "tau": NUMBER,
    "opacity": NUMBER,
    "show_after": (bool,),
    "series_step": NUMBER,
    "steps": (*NUMBER, str),
    "seed": (*NUMBER, str),
    "model_guidance": (bool,),
    "guidance_scale": (*NUMBER, str),
    "image_guidance_scale": (*NUMBER, str),
    "preset": (str,),
    "backend": (str,),
    "verify": (bool,),
    "include_demographics": (bool,),
    "pacs_target": (str,),
    "error": (str,),
}


def initial_state(
    model: str, device: str, pacs_targets: PacsTargets, max_upload_bytes: int, shared_worker: bool = False
) -> dict[str, Any]:
    """The page's state before anything is opened: the session's default settings, the lists
    the page offers, and nothing loaded, running or shown (``shared_worker``: the server uses a
    shared worker, whose backend is its own)."""
    defaults = PanelSettings(model=model, device=device)
    return {
        "trame__title": "InstructX2X",
        "loaded": False,
        "description": "",
        "error": "",
        "status": "Open a DICOM radiograph (file or folder) or a PNG.",
        "instruction": "",
        "parsed": describe_instruction(""),
        "series": "",  # a progression series' levels or instructions (session.plan_series)
        "series_count": 0,  # the steps of the series shown (0: the result is no series)
        "series_step": 1,
        "series_text": "",
        "completions": instruction_completions(),
        **_helper_state(),
        "mask_source": defaults.mask_source.label,
        "mask_sources": MaskSource.labels(),
        "tool": "none",
        "segment": "edit",
        "brush_mm": 20.0,
        "scissors_fill": False,
        "tau": defaults.tau,
        "opacity": 0.5,
        "show_after": True,
        "has_result": False,
        "has_preview": False,
        "has_dicom": False,
        "running": False,
        "progress": 0,
        "progress_text": "",
        "queue_text": "",
        "steps": defaults.steps,
        "seed": defaults.seed,
        "model_guidance": True,
        "guidance_scale": GUIDANCE_SCALE,
        "image_guidance_scale": IMAGE_GUIDANCE_SCALE,
        "preset": defaults.preset.label,
        "presets": Preset.labels(),
        "backend": defaults.backend.label,
        "backends": Backend.labels(),
        "shared_worker": shared_worker,
        "worker_status": "",
        "verify": defaults.verify,
        "include_demographics": False,
        "verification": "",
        "pacs_target": pacs_targets.default,
        "pacs_names": pacs_targets.names,
        "pacs_message": "",
        "max_upload_mb": max_upload_bytes // 2**20,
    }


def _helper_state() -> dict[str, Any]:
    """The structured helper's choices, from the library's vocabulary."""
    from instructx2x.instructions import FINDINGS, LEVEL_WORDS, LUNG_ZONES

    return {
        "operations": Operation.labels(),
        "findings": list(FINDINGS),
        "sides": list(SIDES),
        "zones": ["", *LUNG_ZONES],
        "levels": ["", *LEVEL_WORDS],
        "compose_operation": Operation.ADD.label,
        "compose_finding": "pleural effusion",
        "compose_side": "",
        "compose_zone": "",
        "compose_from": "",
        "compose_to": "",
    }


class Controls:
    """The page's controls, read and written through trame's state.

    Parameters
    ----------
    state
        The page's trame state.
    model, device: str
        What the server was started with (the worker's model and device).
    """

    def __init__(self, state: Any, model: str, device: str) -> None:
        self.state, self.model, self.device = state, model, device

    def on_instruction(self, instruction: str = "", **_: Any) -> None:
        """The typed instruction as the library parses it, shown under the field."""
        self.state.parsed = describe_instruction(instruction or "")

    def compose(self) -> None:
        """The helper's choices as an instruction in the training set's wording."""
        state = self.state
        with state:
            try:
                operation = Operation.from_label(state.compose_operation)
            except mrml.SceneError as error:
                state.error = message(error)
                return
            state.instruction = compose_instruction(
                operation,
                state.compose_finding,
                state.compose_side or "",
                state.compose_from or "",
                state.compose_to or "",
                state.compose_zone or "",
            )

    def settings(self) -> PanelSettings:
        """The page's controls as the shared session's settings (the session checks ranges).

        Raises
        ------
        instructx2x.errors.ParameterError
            When a number field holds no number (the message names the field).
        scene.SceneError
            When a list holds a label that is not one of its choices.
        """
        state = self.state
        return PanelSettings(
            instruction=state.instruction or "",
            mask_source=MaskSource.from_label(state.mask_source),
            tau=_number(state.tau, "tau", float),
            preset=Preset.from_label(state.preset),
            steps=_number(state.steps or 0, "Steps", int),
            seed=_number(state.seed or 0, "Seed", int),
            guidance_scale=None
            if state.model_guidance
            else _number(state.guidance_scale, "Text guidance s_T", float),
            image_guidance_scale=None
            if state.model_guidance
            else _number(state.image_guidance_scale, "Image guidance s_I", float),
            model=self.model,
            device=self.device,
            backend=Backend.from_label(state.backend),
            verify=bool(state.verify),
            include_demographics=bool(state.include_demographics),
        )


def _number(value: Any, label: str, kind: type[Number]) -> Number:
    """A number typed in the page, or the error that names the field."""
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ParameterError(
            f"{label} must be a{'n integer' if kind is int else ' number'}, got {value!r}."
        ) from None
