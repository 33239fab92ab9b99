"""One panel's editing session: settings -> job -> warm worker -> results in the scene.

Shared by the desktop module (``InstructX2X.py``) and the browser panel (``web``): both
hand it the MRML scene, the radiograph volume and the painted masks, poll it from a timer,
and show what it imports. It imports neither qt nor slicer.app/slicer.util, and the model
never runs in the panel's process (``worker.WorkerClient`` starts ``instructx2x serve``).

Jobs wait in a first-in-first-out queue while the worker is busy; ``queue_position`` says
where a job stands, so a panel can show "queued, 2nd" instead of a frozen button.

A progression series (``plan_series``: levels that fill the instruction's level, or several
instructions) is one job; its steps come back as one volume each over the edit region they
share, and ``select_series_step`` puts a step's counterfactual in the results a panel shows.

The session's files live in one private temporary folder: a job's inputs and outputs in
``job-NNN``, a re-thresholded mask in ``tau-NNN``. Once a result is in the scene, every folder
but the latest result's and those of jobs still queued or running is removed, and a job is
refused while the folder holds more than the session's quota.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from instructx2x.parameters import (
    GUIDANCE_SCALE,
    IMAGE_GUIDANCE_SCALE,
    MAX_GUIDANCE_SCALE,
    RELEVANCE_TIMESTEP,
    TAU,
)

from . import scene as mrml
from .saved_edit import modality_values
from .worker import WorkerClient, WorkerError, WorkerState

__all__ = [
    "DicomImportError",
    "import_into_dicom_database",
    "PAPER_SCHEDULER",
    "PAPER_STEPS",
    "DEFAULT_QUOTA_BYTES",
    "SHARED_READY_TIMEOUT_S",
    "PanelSettings",
    "EditSession",
    "edited_pixels",
    "dicom_pixels",
    "modality_values",
    "PanelChoice",
    "Backend",
    "MaskSource",
    "Preset",
    "Operation",
    "WorkerMode",
    "SIDES",
    "GUIDANCE_SCALE",
    "IMAGE_GUIDANCE_SCALE",
    "MAX_GUIDANCE_SCALE",
    "RELEVANCE_TIMESTEP",
    "TAU",
    "QueuedJob",
    "Rethreshold",
    "SeriesView",
    "plan_series",
    "SamplingDefaults",
    "WorkerModel",
    "status_text",
    "panel_message",
    "shared_worker_available",
    "worker_socket_setting",
    "describe_instruction",
    "compose_instruction",
    "instruction_completions",
]


Choice = TypeVar("Choice", bound="PanelChoice")


class PanelChoice(enum.Enum):
    """A choice both panels offer in a list; each member's value is the label they show (the
    desktop parameter node stores it, the browser state holds it)."""

    @property
    def label(self) -> str:
        return self.value

    @classmethod
    def labels(cls) -> list[str]:
        """The labels in the order the panels list them."""
        return [member.label for member in cls]

    @classmethod
    def from_label(cls: type[Choice], label: str) -> Choice:
        """The member a panel's label names.

        Raises
        ------
        scene.SceneError
            When no member has that label.
        """
        for member in cls:
            if member.label == label:
                return member
        raise mrml.SceneError(f"unknown choice {label!r}; choose one of {', '.join(cls.labels())}.")


class MaskSource(PanelChoice):
    """Which region an edit may change."""

    PRIOR = "anatomical prior"
    PAINTED = "painted segment"  # the painted region replaces the prior; no relevance cut
    PAINTED_AND_PRIOR = "painted segment and prior"


class Preset(PanelChoice):
    """Quality: the device's sampler and steps, or the paper's."""

    FAST = "fast (device default)"
    PAPER = "paper (DDIM 100 steps)"


class Operation(PanelChoice):
    """The structured helper's operations, in the training set's wording."""

    ADD = "Add"
    REMOVE = "Remove"
    CHANGE_LEVEL = "Change the level of"


class Backend(PanelChoice):
    """What runs the model's networks (``instructx2x serve --backend``): ``auto`` takes OpenVINO
    where it measured faster (a large model on an AMX CPU) and PyTorch elsewhere."""

    AUTO = "auto"
    TORCH = "PyTorch"
    OPENVINO = "OpenVINO"

    @property
    def option(self) -> str:
        """The worker's ``--backend`` value: ``auto``, ``torch`` or ``openvino``."""
        return self.name.lower()

    @classmethod
    def from_option(cls, option: str) -> Backend:
        """The member a ``--backend`` value (or a worker's ``ready``) names.

        Raises
        ------
        scene.SceneError
            When no member has that value.
        """
        for member in cls:
            if member.option == option:
                return member
        raise mrml.SceneError(f"unknown backend {option!r}; choose one of {', '.join(cls.labels())}.")


class WorkerMode(PanelChoice):
    """Where jobs run: a worker the panel starts, or a shared one at a Unix socket."""

    LOCAL = "local"
    SHARED = "shared socket"


# The paper preset: the authors' sampler and step count (docs/method.md section 2), whatever the device
PAPER_SCHEDULER, PAPER_STEPS = "ddim", 100
SIDES = ("", "left", "right", "bilateral")  # the structured helper's choices ("": no side)
DEFAULT_QUOTA_BYTES = 2 * 2**30  # an upload, one job's inputs and one result take well under 1 GB
# A shared worker says ``ready`` as soon as it accepts a connection (its model is loaded): a
# socket that accepts and stays silent this long is not a worker that will answer
SHARED_READY_TIMEOUT_S = 30.0
SOCKET_PATH_BYTES = 107  # sun_path holds 108 bytes on Linux, its last a NUL


@dataclasses.dataclass
class PanelSettings:
    """What a panel's controls say (the desktop parameter node and the web state map onto it)."""

    instruction: str = ""
    mask_source: MaskSource = MaskSource.PRIOR
    tau: float = TAU
    preset: Preset = Preset.FAST
    steps: int = 0  # 0: the sampler's default for the device
    # None: the model's default (its card's, else the library's GUIDANCE_SCALE, IMAGE_GUIDANCE_SCALE)
    guidance_scale: float | None = None
    image_guidance_scale: float | None = None
    relevance_timestep: int = RELEVANCE_TIMESTEP
    seed: int = 0
    device: str = "auto"
    scheduler: str = "auto"
    precision: str = "auto"
    backend: Backend = Backend.AUTO  # what runs the networks (instructx2x serve --backend)
    model: str = "demo"
    verify: bool = True
    include_demographics: bool = False  # the classifiers' age/sex/race estimates in the report (verify only)
    worker_socket: str = (
        ""  # a shared worker's Unix socket (model and device are then its own); "": a local worker
    )

    def edit_parameters(self) -> dict:
        """The library's ``EditParameters`` fields for this run."""
        values = {
            "instruction": self.instruction,
            "tau": self.tau,
            "relevance_timestep": self.relevance_timestep,
            "seed": self.seed,
        }
        for name in ("guidance_scale", "image_guidance_scale"):
            if getattr(self, name) is not None:
                values[name] = getattr(self, name)
        if self.steps:
            values["num_inference_steps"] = self.steps
        if self.preset is Preset.PAPER:
            values["num_inference_steps"] = PAPER_STEPS
        if self.mask_source is MaskSource.PAINTED:
            values["region_mode"] = "prior"  # the painted region replaces the prior; no relevance cut
        return values

    def sampler(self) -> str:
        """The scheduler the worker loads: DDIM under the paper preset (its steps are DDIM
        steps), else the one chosen (``auto``: the device's)."""
        return PAPER_SCHEDULER if self.preset is Preset.PAPER else self.scheduler

    def worker_key(self) -> tuple:
        return self.model, self.device, self.sampler(), self.precision, self.backend


@dataclasses.dataclass(frozen=True)
class SamplingDefaults:
    """What the loaded model edits with when a setting is not given (its card's, else the
    library's; ``instructx2x serve``'s ``ready`` event)."""

    num_inference_steps: int
    guidance_scale: float
    image_guidance_scale: float
    relevance_draws: int
    resolution: int


@dataclasses.dataclass(frozen=True)
class WorkerModel:
    """The model a worker has loaded, as its ``ready`` event says."""

    name: str
    dtype: str  # the precision it runs at
    defaults: SamplingDefaults | None
    backend: str = "torch"  # what runs its networks: torch or openvino
    backend_reason: str = ""  # why the worker chose it
    backend_cache: str = ""  # OpenVINO: where its converted networks came from (converted now, or the cache)

    @classmethod
    def from_ready(cls, event: dict) -> WorkerModel:
        model, precision, defaults, backend = (
            event.get("model") or {},
            event.get("precision") or {},
            event.get("defaults"),
            event.get("backend") or {},
        )
        return cls(
            name=str(model.get("name", "?")),
            dtype=str(precision.get("dtype", "?")),
            defaults=SamplingDefaults(
                **{field.name: defaults[field.name] for field in dataclasses.fields(SamplingDefaults)}
            )
            if defaults
            else None,
            backend=str(backend.get("name", "torch")),
            backend_reason=str(backend.get("reason", "")),
            backend_cache=str(backend.get("cache", "")),
        )

    def describe(self) -> str:
        """The panels' line about the loaded model: its name, precision, what runs it and why."""
        try:
            runtime = Backend.from_option(self.backend).label
        except mrml.SceneError:  # a worker of a later release may name another runtime
            runtime = self.backend
        reason = f": {self.backend_reason}" if self.backend_reason else ""
        cache = f" ({self.backend_cache})" if self.backend_cache else ""
        return f"Model {self.name} ({self.dtype}) runs on {runtime}{reason}{cache}."


@dataclasses.dataclass(frozen=True)
class Rethreshold:
    """A re-cut of a preview's relevance at another tau, with no model call (``instructx2x
    serve``'s ``rethreshold`` request)."""

    preview: str  # the preview's request id
    tau: float
    output: Path  # the folder the new edit mask goes to (``tau-NNN``)

    def fields(self) -> dict[str, str | float]:
        """The request's fields in the worker protocol."""
        return {"preview": self.preview, "tau": self.tau, "output": str(self.output)}


@dataclasses.dataclass(frozen=True)
class QueuedJob:
    """A job of the session's queue; once sent, ``id`` is the worker's request id."""

    ticket: int
    kind: str  # preview, edit or rethreshold
    volume: Any  # the radiograph's vtkMRMLScalarVolumeNode
    # a preview's or an edit's job (``scene.build_job``, the worker's job format), or a re-threshold
    job: dict | Rethreshold
    id: str | None = None
    # kind is also "series": an edit job with its "series" (the worker's "edit" request)

    @property
    def folder(self) -> Path:
        """The folder its files go to (``job-NNN`` or ``tau-NNN``)."""
        return self.job.output if isinstance(self.job, Rethreshold) else Path(self.job["output"]).parent


@dataclasses.dataclass
class SeriesView:
    """A progression series in the scene: each step's label (its level) and volumes
    (``counterfactual``, ``difference``), the shared ``guidance`` and ``mask``, and the step
    shown (``index``, from 0)."""

    labels: list[str]
    steps: list[dict]
    shared: dict
    index: int = 0

    def step_text(self) -> str:
        """What a panel says beside its slider: "Step 2 of 3: moderate"."""
        return f"Step {self.index + 1} of {len(self.steps)}: {self.labels[self.index]}"

    def nodes(self) -> list:
        """Every volume of the series."""
        return [*self.shared.values(), *(node for step in self.steps for node in step.values())]


PHASE_TEXT = {
    "loading": "Loading the model…",
    "started": "Working…",
    "decode": "Decoding…",
    "export": "Writing the results…",
}


def status_text(event: dict, shared_worker: bool = False) -> str | None:
    """What a panel's status line says for a worker event (``instructx2x serve``'s protocol,
    docs/cli.md), or None when the event is not said there: a ``done`` result is the session's
    ``result_text``, a ``queued`` place its ``queue_position``.

    Parameters
    ----------
    event: dict
        One event from ``EditSession.poll``.
    shared_worker: bool
        The worker is a shared one (its ``ready`` names the model it serves).
    """
    kind = event.get("event")
    if kind == "progress":
        eta = event.get("eta_s")
        return f"Step {event['step']} of {event['total']}" + (
            f", about {eta:.0f} s left" if eta is not None else ""
        )
    if kind in PHASE_TEXT:
        return PHASE_TEXT[kind]
    if kind == "ready" and shared_worker:
        model = WorkerModel.from_ready(event)
        return f"Shared worker ready: its model {model.name} ({model.dtype}, {model.backend})."
    if kind == "cancelled":
        return "Cancelled: nothing was written."
    if kind == "error":
        return f"Failed: {event.get('message') or 'the worker failed.'}"
    return None


# The library's advice names command-line options; a panel names its own controls.
_PANEL_WORDS = (
    ("give --device cpu", "choose Device: cpu"),
    ("--device cpu", "Device: cpu"),
    ("--backend torch", "Backend: PyTorch"),
    ("--backend openvino", "Backend: OpenVINO"),
)


def panel_message(message: str, openvino_hint: str | None = None) -> str:
    """A worker's message in a panel's words: its Advanced controls for the command line's
    options, and ``openvino_hint`` (how this panel gets the OpenVINO runtime) for the library's
    advice, ``backends.OPENVINO_EXTRA``.

    Parameters
    ----------
    message: str
        An ``error`` event's message, or why the worker stopped.
    openvino_hint: str | None
        What to do where the worker lacks OpenVINO; None keeps the library's pip command.
    """
    from instructx2x.backends import OPENVINO_EXTRA

    if openvino_hint is not None:
        message = message.replace(OPENVINO_EXTRA, openvino_hint)
    for option, control in _PANEL_WORDS:
        message = message.replace(option, control)
    return message


def shared_worker_available(platform: str | None = None) -> bool:
    """Whether this system reaches a shared worker: a Unix socket whose peer's user the kernel
    reports (Linux ``SO_PEERCRED``, macOS ``LOCAL_PEERCRED``). Windows has neither in Python."""
    platform = platform or sys.platform
    return platform.startswith("linux") or platform == "darwin"


def worker_socket_setting(mode: WorkerMode | str, path: str) -> str:
    """``PanelSettings.worker_socket`` from a panel's Worker choice and socket path field.

    Parameters
    ----------
    mode: WorkerMode | str
        Local or shared (a member or its label).
    path: str
        The shared worker's socket (``~`` is expanded); ignored for a local worker.

    Returns
    -------
    str
        "" for a local worker, else the socket's absolute path.

    Raises
    ------
    scene.SceneError
        When the choice is unknown, or a shared worker is chosen on Windows
        (``shared_worker_available``), with no path, a relative one or one too long for a Unix
        socket.
    """
    import os

    if not isinstance(mode, WorkerMode):
        mode = WorkerMode.from_label(mode)
    if mode is WorkerMode.LOCAL:
        return ""
    if not shared_worker_available():
        raise mrml.SceneError(
            "a shared worker is reached through a Unix socket whose peer is checked, which Linux and "
            "macOS offer and Windows does not; here the panel runs its own worker (Worker: local), "
            "or open the browser panel of the GPU server (README, Server mode)."
        )
    path = os.path.expanduser(path.strip())
    if not path:
        raise mrml.SceneError(
            "give the shared worker's socket path (e.g. /run/user/1000/ix2x.sock, forwarded by ssh -L), or choose a local worker."
        )
    if not os.path.isabs(path):
        raise mrml.SceneError(
            f"the worker socket {path} is not an absolute path; give the whole path (e.g. /run/user/1000/ix2x.sock)."
        )
    if len(os.fsencode(path)) > SOCKET_PATH_BYTES:
        raise mrml.SceneError(
            f"the worker socket path is {len(os.fsencode(path))} bytes long; a Unix socket "
            f"path holds at most {SOCKET_PATH_BYTES}."
        )
    return path


def describe_instruction(text: str) -> str:
    """The parsed instruction and the prior it selects, shown live before any run."""
    from instructx2x.errors import ParameterError
    from instructx2x.instructions import parse_instruction
    from instructx2x.priors import PriorSet

    if not text.strip():
        return "Type an instruction, e.g. Add the finding of left pleural effusion."
    try:
        parsed = parse_instruction(text)
    except ParameterError as error:
        return str(error)
    selection = PriorSet.default().select(parsed)
    findings = ", ".join(parsed.findings) or "no known finding"
    where = ([parsed.laterality.value] if parsed.laterality else []) + [
        f"{zone} zone" for zone in parsed.zones
    ]
    where_text = f" ({', '.join(where)})" if where else ""
    return f"{parsed.operation.value}: {findings}{where_text}. Region: {selection.reason}."


def compose_instruction(
    operation: Operation, finding: str, side: str = "", before: str = "", after: str = "", zone: str = ""
) -> str:
    """An instruction in the training set's wording from the structured helper's choices
    (``after`` is also the level of an added finding: "Add the finding of moderate left ...";
    ``zone`` names the lung zone of a focal opacity: "... left lower zone consolidation")."""
    where = " ".join(word for word in (side, f"{zone} zone" if zone else "", finding) if word)
    if operation is Operation.CHANGE_LEVEL:
        return f"{operation.label} {where} from {before or 'mild'} to {after or 'severe'}"
    if operation is Operation.ADD and after:
        where = f"{after} {where}"
    return f"{operation.label} the finding of {where}"


# the steps a panel's Series field holds: levels (mild, moderate, severe) or instructions, one
# after another, separated by commas, semicolons or new lines
SERIES_SEPARATORS = re.compile(r"[,;\n]")


def plan_series(instruction: str, series: str) -> tuple[str, tuple[str, ...]]:
    """A panel's Series field as a worker job's instruction and ``series``
    (``instructx2x.jobs.EditJob.series``), checked as the worker checks it.

    Parameters
    ----------
    instruction: str
        The instruction field. With levels, the instruction whose level they fill: one holding
        ``{level}``, "Change the level of X from A to B" (each level replaces B), "Add the
        finding of <level> X" (each replaces the level) or "Add the finding of X" (each goes
        before X). With instructions, unused.
    series: str
        The steps in order, separated by commas, semicolons or new lines: severity levels
        ("small, moderate, large") or instructions.

    Returns
    -------
    tuple[str, tuple[str, ...]]
        The job's instruction (the template holding ``{level}``, or the first step's
        instruction) and its steps.

    Raises
    ------
    instructx2x.errors.ParameterError
        An empty field, an instruction whose level cannot be filled, or a series that
        ``instructions.parse_series`` refuses (fewer than two steps, mixed findings, levels out
        of order, ...), naming the step.
    """
    from instructx2x.errors import ParameterError
    from instructx2x.instructions import LEVEL_GRADES, parse_series

    steps = tuple(step.strip() for step in SERIES_SEPARATORS.split(series) if step.strip())
    if not steps:
        raise ParameterError(
            "type the series' steps: levels such as small, moderate, large, or instructions separated by ;."
        )
    if not all(" ".join(step.lower().split()) in LEVEL_GRADES for step in steps):
        parse_series(steps)
        return steps[0], steps
    template = _level_template(instruction)
    parse_series(steps, template)
    return template, steps


def _level_template(instruction: str) -> str:
    """The instruction with ``{level}`` where a series' levels go."""
    from instructx2x.errors import ParameterError
    from instructx2x.instructions import LEVEL_PLACEHOLDER, parse_instruction
    from instructx2x.instructions import Operation as ParsedOperation

    text = " ".join(instruction.split())
    if LEVEL_PLACEHOLDER in text:
        return text
    if not text:
        raise ParameterError(
            "a series of levels fills the instruction's level: type the instruction first, e.g. "
            "Add the finding of left pleural effusion."
        )
    parsed = parse_instruction(text)
    if parsed.operation is ParsedOperation.CHANGE_LEVEL and len(parsed.levels) == 2:
        # the level it changes to, the last one named ("from A to B")
        found = list(re.finditer(rf"\b{re.escape(parsed.levels[1])}\b", text, re.IGNORECASE))
        if found:
            return text[: found[-1].start()] + LEVEL_PLACEHOLDER + text[found[-1].end() :]
    elif parsed.operation is ParsedOperation.ADD and parsed.levels:
        found = list(re.finditer(rf"\b{re.escape(parsed.levels[0])}\b", text, re.IGNORECASE))
        if found:
            return text[: found[0].start()] + LEVEL_PLACEHOLDER + text[found[0].end() :]
    elif parsed.operation is ParsedOperation.ADD:
        added = re.match(r"(?i)add the finding of\s+", text)
        if added:
            return text[: added.end()] + LEVEL_PLACEHOLDER + " " + text[added.end() :]
    raise ParameterError(
        f"a series of levels needs an instruction whose level they fill: 'Add the finding of X' or "
        f"'Change the level of X from A to B', not {text!r}; or give the steps as instructions."
    )


def instruction_completions() -> list[str]:
    """Every add/remove instruction the vocabulary knows (for completion lists)."""
    from instructx2x.instructions import FINDINGS

    return [
        f"{operation.label} the finding of {finding}"
        for operation in (Operation.ADD, Operation.REMOVE)
        for finding in FINDINGS
    ]


class EditSession:
    """Edits of one panel on one scene, one worker per model/device/sampler/precision/backend.

    Parameters
    ----------
    scene: vtkMRMLScene
        Where the results go (the input volume is never modified).
    executable: list[str] | None
        The command that runs the library's CLI (``PythonSlicer -m instructx2x.cli`` in Slicer).
    prepare_worker: Callable[[PanelSettings], None] | None
        Called with the job's settings before a local worker is started (the desktop module
        installs the worker's packages, OpenVINO among them for its backend); never for a
        shared one.
    worker_socket: str | None
        Use the shared worker on this Unix socket (``instructx2x serve --socket``) instead of
        starting one; the model and device are then the worker's. A job whose settings name a
        ``worker_socket`` uses that one.
    quota_bytes: int | None
        The most the session's folder may hold before a job is refused (default
        ``DEFAULT_QUOTA_BYTES``).
    openvino_hint: str | None
        How this panel gets the OpenVINO runtime, said in place of the library's pip command
        when the worker lacks it (``panel_message``).
    """

    def __init__(
        self,
        scene,
        executable: list[str] | None = None,
        prepare_worker: Callable[[PanelSettings], None] | None = None,
        worker_socket: str | None = None,
        quota_bytes: int | None = None,
        openvino_hint: str | None = None,
    ) -> None:
        self.scene = scene
        # closing the scene (Slicer's Close Scene, scene.Clear) ends what this session shows
        self._close_observer = scene.AddObserver(scene.StartCloseEvent, self._on_scene_close)
        self.quota_bytes = DEFAULT_QUOTA_BYTES if quota_bytes is None else quota_bytes
        self.worker_socket = worker_socket
        self.executable = executable or [sys.executable, "-m", "instructx2x.cli"]
        self.prepare_worker = prepare_worker
        self.openvino_hint = openvino_hint
        self.worker: WorkerClient | None = None
        self.worker_key: tuple | None = None
        self.shared_ready_timeout_s = SHARED_READY_TIMEOUT_S
        self._connected_at = 0.0  # when the shared worker was reached (monotonic clock)
        self.folder = Path(tempfile.mkdtemp(prefix="instructx2x-"))
        self.queue: list[QueuedJob] = []
        self.current: QueuedJob | None = None  # the job sent last
        self.preview_id: str | None = None
        self.results: dict = {}
        self.series: SeriesView | None = None  # the last result, when it is a series
        self.output_folder: Path | None = None
        self.result_text = ""
        self.verification_text = ""
        self.pending_tau: float | None = None  # a re-threshold asked for while busy: sent when idle
        self._tickets = itertools.count(1)

    # -- state ------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """A job is queued, starting, running or being cancelled."""
        return bool(self.queue) or (
            self.worker is not None
            and self.worker.state in (WorkerState.STARTING, WorkerState.RUNNING, WorkerState.CANCELLING)
        )

    @property
    def model(self) -> WorkerModel | None:
        """The worker's model once it is loaded, else None."""
        info = self.worker.info if self.worker is not None else None
        return WorkerModel.from_ready(info) if info else None

    @property
    def model_defaults(self) -> SamplingDefaults | None:
        """The worker's sampling defaults once its model is loaded, else None."""
        model = self.model
        return model.defaults if model is not None else None

    @property
    def worker_status(self) -> str:
        """What the panels say about the worker: none yet, loading, or its model and what runs
        it and why (``WorkerModel.describe``, in the panel's words: ``panel_message``)."""
        if self.worker is None:
            return "No model loaded yet: the first Preview or Apply loads it."
        if self.worker.state == WorkerState.STARTING:
            return "Loading the model…"
        model = self.model
        return self._words(model.describe()) if model is not None else "The worker has stopped."

    @property
    def uses_shared_worker(self) -> bool:
        """The worker is a shared one (``instructx2x serve --socket``)."""
        return self.worker is not None and bool(self.worker.socket_path)

    def is_current_result(self, event: dict) -> bool:
        """``event`` is the ``done`` of the job sent last."""
        return (
            event.get("event") == "done" and self.current is not None and event.get("id") == self.current.id
        )

    def status_text(self, event: dict) -> str | None:
        """``status_text`` of a worker event for this session's worker."""
        return status_text(event, self.uses_shared_worker)

    @property
    def has_preview(self) -> bool:
        return self.preview_id is not None and not self.busy

    def queue_position(self, ticket: int) -> int:
        """0 while the job runs (or is done), k when k jobs are ahead of it."""
        ahead = (
            1
            if self.worker is not None and self.worker.state in (WorkerState.RUNNING, WorkerState.CANCELLING)
            else 0
        )
        for index, request in enumerate(self.queue):
            if request.ticket == ticket:
                return index + ahead
        return 0

    # -- jobs -------------------------------------------------------------------------------
    def submit(
        self,
        kind: str,
        volume,
        settings: PanelSettings,
        edit_mask: np.ndarray | None = None,
        keep_mask: np.ndarray | None = None,
        dicom_file_for: Callable[[str], str | None] | None = None,
        series: str = "",
    ) -> int:
        """Check the inputs, write them to the session's folder and queue the job.

        ``kind`` is ``preview``, ``edit`` or ``series``: a progression series, whose steps
        ``series`` gives as a panel's Series field holds them (``plan_series``); it is not
        verified (verification checks one edit).

        Returns a ticket for ``queue_position``. Raises ``scene.SceneError`` or the library's
        ``ParameterError`` with a message for the user before anything is queued.
        """
        from instructx2x.parameters import EditParameters

        if kind not in ("preview", "edit", "series"):
            raise ValueError(f"a job is a preview, an edit or a series, not {kind!r}.")
        mrml.volume_to_array(volume)  # one slice, or a clear message
        parameters = settings.edit_parameters()
        steps: tuple[str, ...] = ()
        if kind == "series":
            parameters["instruction"], steps = plan_series(settings.instruction, series)
        EditParameters(
            **parameters
        )  # the instruction parsed, every setting in range, before any file is written
        if settings.mask_source is not MaskSource.PRIOR and edit_mask is None:
            raise mrml.SceneError("paint the region to edit, or choose the anatomical prior.")
        if settings.mask_source is MaskSource.PRIOR:
            edit_mask = None
        self.check_quota()
        ticket = next(self._tickets)
        folder = self.folder / f"job-{ticket:03d}"
        try:
            job = mrml.build_job(
                volume,
                kind,
                parameters,
                folder,
                edit_mask,
                keep_mask,
                dicom_file_for=dicom_file_for,
                verify="auto" if settings.verify and kind == "edit" else None,
                include_demographics=settings.include_demographics and settings.verify and kind == "edit",
            )
            if steps:
                job["series"] = list(steps)
            self._ensure_worker(settings)
        except Exception:  # a refused job leaves no folder behind
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self.queue.append(QueuedJob(ticket, kind, volume, job=job))
        self._send_next()
        return ticket

    def rethreshold(self, tau: float) -> int:
        """Re-cut the cached preview's relevance at ``tau`` (no model call)."""
        if self.preview_id is None or self.current is None:
            raise mrml.SceneError("preview the guidance first.")
        self.check_quota()
        ticket = next(self._tickets)
        self.queue.append(
            QueuedJob(
                ticket,
                "rethreshold",
                self.current.volume,
                job=Rethreshold(self.preview_id, tau, self.folder / f"tau-{ticket:03d}"),
            )
        )
        self._send_next()
        return ticket

    def request_rethreshold(self, tau: float) -> bool:
        """Re-cut the preview at ``tau`` now, or once the worker is idle when it is busy (a
        later request replaces a pending one: a dragged slider's last value wins).

        Returns True when sent now, False when pending. Raises ``scene.SceneError`` when there
        is no preview.
        """
        if self.preview_id is None:
            raise mrml.SceneError("preview the guidance first.")
        if self.busy:
            self.pending_tau = tau
            return False
        self.pending_tau = None
        self.rethreshold(tau)
        return True

    def forget_scene(self) -> None:
        """The scene is being closed: stop the running job, drop the queued ones and a pending
        re-threshold, and forget the results (their nodes go with the scene). The worker stays
        up, its model loaded, for the next radiograph."""
        self.cancel()
        self.pending_tau = None
        self.results, self.series, self.preview_id, self.output_folder = {}, None, None, None
        self.result_text = self.verification_text = ""

    def _on_scene_close(self, caller=None, event=None) -> None:
        self.forget_scene()

    def cancel(self) -> None:
        """Drop the queued jobs and stop the running one at its next step (nothing is written)."""
        self.queue.clear()
        if self.worker is not None:
            self.worker.cancel()

    def poll(self) -> list[dict]:
        """Worker events since the last call; imports results into the scene on ``done``."""
        if self.worker is None:
            return []
        events = [self._in_panel_words(event) for event in self.worker.poll()]
        self._check_shared_ready()
        for event in events:
            current = self.current
            if (
                current is not None
                and self.is_current_result(event)
                and self.scene.IsNodePresent(current.volume)
            ):  # not closed or removed
                self._import(event, current)
            if event.get("event") in ("done", "error", "cancelled"):
                self.prune()
        if self.worker.state == WorkerState.STOPPED:
            if self.worker.last_error:
                events.append({"event": "error", "message": self._words(self.worker.last_error)})
            self.worker, self.queue = None, []
            self.prune()  # the folders of the jobs that will not run
        self._send_next()
        if self.pending_tau is not None and not self.busy and self.preview_id is not None:
            self.request_rethreshold(self.pending_tau)
        return events

    # -- disk -------------------------------------------------------------------------------
    def disk_usage(self) -> int:
        """Bytes in the session's folder."""
        return sum(path.stat().st_size for path in self.folder.rglob("*") if path.is_file())

    def check_quota(self) -> None:
        """Raise ``scene.SceneError`` when the session's folder holds more than its quota."""
        used = self.disk_usage()
        if used > self.quota_bytes:
            raise mrml.SceneError(
                f"this session's files take {used / 2**20:.0f} MB, over its "
                f"{self.quota_bytes / 2**20:.0f} MB quota; open the radiograph again to start afresh."
            )

    def prune(self) -> None:
        """Remove the job and tau folders nothing needs: all but the shown result's and those
        of jobs still queued or running (a tau folder is read into the scene when it arrives)."""
        needed = {request.folder for request in self.queue if not isinstance(request.job, Rethreshold)}
        if (
            self.worker is not None
            and self.worker.state in (WorkerState.RUNNING, WorkerState.CANCELLING)
            and self.current is not None
        ):
            needed.add(self.current.folder)
        if self.output_folder is not None:
            needed.add(self.output_folder.parent)
        for folder in [*self.folder.glob("job-*"), *self.folder.glob("tau-*")]:
            if folder not in needed:
                shutil.rmtree(folder, ignore_errors=True)

    def stop(self) -> None:
        """End the worker, stop watching the scene and remove the session's files."""
        try:
            self.scene.RemoveObserver(self._close_observer)
            if self.worker is not None:
                worker, self.worker = self.worker, None
                worker.shutdown()
        finally:  # the radiograph's pixels never outlive the session, whatever stopping the worker did
            shutil.rmtree(self.folder, ignore_errors=True)

    def start_worker(self, settings: PanelSettings, timeout: float = 600) -> WorkerModel:
        """Start (or reach) the worker now and wait until its model is loaded, so that a bad
        model or an unreachable shared worker is said before anyone uses the panel.

        Returns the model the worker loaded (its ``ready`` event). Raises ``WorkerError`` with
        the worker's message.
        """
        worker = self._ensure_worker(settings)
        deadline = time.monotonic() + timeout
        while worker.state == WorkerState.STARTING and time.monotonic() < deadline:
            worker.poll()
            self._check_shared_ready()
            time.sleep(0.05)
        if worker.state != WorkerState.READY:
            message = worker.last_error or f"the model did not load within {timeout:.0f} s."
            worker.kill()
            self.worker = None
            raise WorkerError(self._words(message))
        return WorkerModel.from_ready(worker.info)

    def start_worker_soon(self, settings: PanelSettings) -> bool:
        """Start the worker for ``settings`` now unless a job is queued or running (a changed
        backend then counts from the next job), without waiting: ``poll`` reports its ``ready``
        or why it failed. Returns whether the worker for ``settings`` is the current one or
        starting."""
        if self.busy and self.worker_key != settings.worker_key():
            return False
        self._ensure_worker(settings)
        return True

    def _words(self, message: str) -> str:
        return panel_message(message, self.openvino_hint)

    def _in_panel_words(self, event: dict) -> dict:
        """An ``error`` event's message in the panel's words (``panel_message``)."""
        if event.get("event") == "error" and isinstance(event.get("message"), str):
            return {**event, "message": self._words(event["message"])}
        return event

    def _check_shared_ready(self) -> None:
        """Hang up on a shared worker that has not said ``ready`` within
        ``shared_ready_timeout_s`` of the connection (its state becomes STOPPED, with why)."""
        worker = self.worker
        if (
            worker is None
            or not worker.socket_path
            or worker.state != WorkerState.STARTING
            or time.monotonic() - self._connected_at < self.shared_ready_timeout_s
        ):
            return
        worker.kill()  # a shared worker: ends only our connection
        worker.last_error = (
            f"the shared worker at {Path(worker.socket_path).name} took the connection but did "
            f"not answer within {self.shared_ready_timeout_s:.0f} s; is instructx2x serve "
            "--socket running at the far end (of the SSH tunnel, if one)?"
        )

    def _ensure_worker(self, settings: PanelSettings) -> WorkerClient:
        """The worker for ``settings``: the current one when it serves them and is up, else a
        new one, started."""
        socket_path = settings.worker_socket or self.worker_socket
        key = ("shared", socket_path) if socket_path else settings.worker_key()
        if (
            self.worker is not None
            and self.worker_key == key
            and self.worker.state not in (WorkerState.STOPPED, WorkerState.IDLE)
        ):
            return self.worker
        if self.worker is not None:
            self.worker.shutdown()
            self.worker = None
        if self.prepare_worker is not None and not socket_path:  # a shared worker needs nothing here
            self.prepare_worker(settings)
        environment = {"CUDA_VISIBLE_DEVICES": "-1"} if settings.device == "cpu" else {}
        worker = WorkerClient(
            settings.model,
            device=settings.device,
            environment=environment,
            executable=self.executable,
            scheduler=settings.sampler(),
            dtype=settings.precision,
            backend=settings.backend.option,
            socket_path=socket_path or None,
        )
        worker.start()  # a WorkerError (e.g. no shared worker at the socket) keeps no client
        self.worker = worker
        self._connected_at = time.monotonic()
        self.worker_key, self.preview_id = key, None
        return worker

    def _send_next(self) -> None:
        if not self.queue or self.worker is None or self.worker.state != WorkerState.READY:
            return
        request = self.queue.pop(0)
        if isinstance(request.job, Rethreshold):
            request_id = self.worker.submit(request.kind, None, **request.job.fields())
        else:  # a series is an edit whose job carries its steps
            request_id = self.worker.submit("edit" if request.kind == "series" else request.kind, request.job)
        self.current = dataclasses.replace(request, id=request_id)

    def save_result(self, parent: Path) -> Path:
        """Copy the last result's folder (the session's is temporary) into a new folder in
        ``parent``, named after the radiograph and the time, whole or not at all; returns it.
        *Open saved edit* reads it back.

        Raises
        ------
        scene.SceneError
            When there is no result, or ``parent`` is not a folder or cannot be written.
        """
        if self.output_folder is None or self.current is None:
            raise mrml.SceneError("there is no result to save yet; preview or apply first.")
        parent = Path(parent)
        if not parent.is_dir():
            raise mrml.SceneError(f"{parent.name or parent} is not a folder.")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = "".join(c if c.isalnum() or c in "-_" else "_" for c in self.current.volume.GetName())[:40]
        target = parent / f"{name or 'radiograph'}-edit-{stamp}"
        staging = parent / f".{target.name}.partial"
        try:
            shutil.copytree(self.output_folder, staging)
            staging.rename(target)
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise mrml.SceneError(
                f"cannot save the edit in {parent.name}: {error.strerror or error}."
            ) from None
        return target

    # -- results ----------------------------------------------------------------------------
    def _import(self, event: dict, current: QueuedJob) -> None:
        kind, volume = current.kind, current.volume
        output = Path(event["output"])
        name = volume.GetName()
        if kind == "rethreshold":
            mask = np.load(output / "edit_mask.npy")
            self._replace(
                "mask",
                mrml.array_to_volume(
                    self.scene, mask.astype(np.uint8), f"{name} edit region", volume, labelmap=True
                ),
            )
            self.result_text = (
                f"Edit region at tau {event.get('tau')}: {event.get('edit_fraction', 0):.1%} of the image."
            )
            return
        guidance = np.load(output / "guidance_map.npy")
        mask = np.load(output / "edit_mask.npy")
        self.clear_results()
        self.preview_id = None  # an edit's region is its own: tau re-cuts only a preview shown
        self.verification_text = ""
        if kind == "series":
            self._import_series(event, volume, guidance, mask)
            self.output_folder = output
            return
        edited = edited_pixels(output, volume, mask) if kind == "edit" else mrml.volume_to_array(volume)
        self.results = mrml.import_result(self.scene, volume, edited, guidance, mask, name)
        self.output_folder = output
        if kind == "preview":
            self.preview_id = current.id
            for key in ("counterfactual", "difference"):  # a preview edits nothing
                self.scene.RemoveNode(self.results.pop(key))
        self.result_text = (
            f"Done: edit region {event.get('edit_fraction', 0):.1%} of the image "
            f"({(event.get('prior') or {}).get('reason', '')})."
        )
        report = output / "verification.txt"
        self.verification_text = report.read_text() if kind == "edit" and report.is_file() else ""

    def _import_series(self, event: dict, volume, guidance: np.ndarray, mask: np.ndarray) -> None:
        """Each step's counterfactual over the shared region; the first step shown."""
        output, plan = Path(event["output"]), event["series"]
        labels = plan["levels"]  # distinct: a series' levels rise or fall strictly
        steps = [step_pixels(output, files, volume, mask) for files in plan["step_files"]]
        shared, nodes = mrml.import_series(
            self.scene, volume, steps, labels, guidance, mask, volume.GetName()
        )
        self.series = SeriesView(list(labels), nodes, shared)
        self.select_series_step(0)
        self.result_text = (
            f"Done: a series of {len(steps)} steps ({', '.join(labels)}), one edit region of "
            f"{event.get('edit_fraction', 0):.1%} of the image ({(event.get('prior') or {}).get('reason', '')})."
        )

    def select_series_step(self, index: int) -> str:
        """Show step ``index`` (from 0) of the series: its counterfactual and difference become
        the results' ``counterfactual`` and ``difference``, over the shared guidance and edit
        region. Returns what the step is (``SeriesView.step_text``).

        Raises
        ------
        scene.SceneError
            When the last result is no series, or it has no such step.
        """
        series = self.series
        if series is None:
            raise mrml.SceneError("the last result is not a series; apply a series first.")
        if not 0 <= index < len(series.steps):
            raise mrml.SceneError(f"the series has steps 1 to {len(series.steps)}, not {index + 1}.")
        series.index = index
        self.results = {**series.shared, **series.steps[index]}
        return series.step_text()

    def result_nodes(self) -> list:
        """Every volume the session's last result put in the scene (a series' every step)."""
        nodes = list(self.results.values()) + (self.series.nodes() if self.series is not None else [])
        return list({id(node): node for node in nodes}.values())

    def clear_results(self) -> None:
        """Remove the last result's volumes from the scene and forget them."""
        for node in self.result_nodes():
            if self.scene.IsNodePresent(node):
                self.scene.RemoveNode(node)
        self.results, self.series = {}, None

    def _replace(self, key: str, node) -> None:
        if key in self.results:
            self.scene.RemoveNode(self.results[key])
        self.results[key] = node


def edited_pixels(
    output: Path,
    volume,
    edit_mask: np.ndarray,
    dicom_name: str | None = "counterfactual.dcm",
    png_name: str = "edited.png",
) -> np.ndarray:
    """The counterfactual's pixels in the input volume's own values (DICOM, ``dicom_name``:
    rescaled values; PNG, ``png_name``: mapped back through ``scene.png_domain``, and outside
    the edit mask the volume's own values, which the 16-bit transport of a float volume would
    otherwise round)."""
    if dicom_name is not None and (output / dicom_name).is_file():
        return dicom_pixels(output / dicom_name)
    from PIL import Image

    original = mrml.volume_to_array(volume)
    low, step = mrml.png_domain(original)
    with Image.open(output / png_name) as image:
        return np.where(edit_mask, np.asarray(image, dtype=np.float32) * step + low, original)


def step_pixels(output: Path, files: list[str], volume, edit_mask: np.ndarray) -> np.ndarray:
    """A series step's counterfactual (``edited_pixels``) from its files (``step-NN.dcm`` for a
    DICOM input, ``step-NN.png``), as the worker's ``done`` lists them."""
    by_suffix = {Path(name).suffix: name for name in files}
    if ".png" not in by_suffix:
        raise mrml.SceneError(f"the worker wrote no PNG for a series step ({', '.join(files) or 'nothing'}).")
    return edited_pixels(output, volume, edit_mask, by_suffix.get(".dcm"), by_suffix[".png"])


def dicom_pixels(path: Path) -> np.ndarray:
    """A DICOM file's modality values (what ``modality_values`` says)."""
    import pydicom

    dataset = pydicom.dcmread(path)
    return modality_values(dataset.pixel_array, dataset)


class DicomImportError(RuntimeError):
    """The written series did not get into the DICOM database; the message says why."""


def import_into_dicom_database(folder: Path, database, import_dicom: Callable[[str], bool]) -> list[str]:
    """Import a written series into a DICOM database and check that every file is indexed.

    Parameters
    ----------
    folder: Path
        The folder of the series' ``.dcm`` files.
    database: ctkDICOMDatabase | None
        Where they go (``slicer.dicomDatabase``); its ``fileForInstance`` finds them afterwards.
    import_dicom: Callable[[str], bool]
        Imports a folder into ``database`` and says whether it worked
        (``DICOMUtils.importDicom``, which returns False on any failure instead of raising).

    Returns
    -------
    list[str]
        The SOP instance UIDs imported, one a file.

    Raises
    ------
    DicomImportError
        When there is no database (checked before anything is imported), the folder holds no
        DICOM file, the import reports a failure, or a file is not in the database after it.
    """
    import pydicom

    folder = Path(folder)
    # Slicer always sets slicer.dicomDatabase; it is closed until the DICOM module makes one
    if database is None or not database.isOpen:
        raise DicomImportError(
            "Slicer has no DICOM database: open the DICOM module once to create one, then export again."
        )
    files = sorted(folder.glob("*.dcm"))
    if not files:
        raise DicomImportError(f"{folder.name} holds no DICOM file to import.")
    uids = [
        str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
        for path in files
    ]
    if not import_dicom(str(folder)):
        raise DicomImportError(
            "the DICOM database did not take the series (DICOMUtils.importDicom failed; "
            "the Python console has its log)."
        )
    missing = [path.name for path, uid in zip(files, uids) if not database.fileForInstance(uid)]
    if missing:
        raise DicomImportError(
            f"{', '.join(missing)} not in the DICOM database after the import; "
            "the Python console has the importer's log."
        )
    return uids
