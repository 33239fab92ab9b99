"""``instructx2x serve --stdio``: a long-lived worker that keeps the model warm.

The Slicer panel and the browser panel start it once and send jobs as JSON lines on stdin;
it answers with JSON lines on stdout. Protocol version ``PROTOCOL_VERSION``:

Requests (one JSON object per line; ``id`` is the caller's, echoed in every event)::

    {"type": "edit" | "preview", "id": "7", "job": {EditJob.to_dict() fields}}
    {"type": "rethreshold", "id": "8", "preview": "7", "tau": 0.3, "output": "DIR"}
    {"type": "cancel", "id": "7"}          # the running job stops at its next step; a queued
                                           # one is dropped before it starts (never lost)
    {"type": "shutdown"}

Events: ``loading`` (before the model loads) and ``ready`` (after: model, precision, protocol),
then per job ``started``, ``progress`` (step, total, eta_s), ``decode``, ``export``, ``done``
(output, files), or
``error`` (message, kind, exit_code) or ``cancelled``. Jobs run one at a time in arrival order.
A preview's float maps are kept in memory so that ``rethreshold`` writes the edit mask at a
new ``tau`` with no model call (``edit_mask.npy`` and ``edit_mask.png``), equal to the mask an
edit at that ``tau`` would use. Every job writes float maps (``*.npy`` + ``maps.json`` with the
geometry) beside its images. SIGTERM ends the worker as cleanly as ``shutdown``.
"""

from __future__ import annotations

import json
import queue
import signal
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

from .errors import EditCancelled, InstructX2XError, ParameterError, ResourceError
from .jobs import EditJob, edit_images, prepare, write_results
from .provenance import to_json

__all__ = ["serve", "PROTOCOL_VERSION"]

PROTOCOL_VERSION = 1
MAX_CACHED_PREVIEWS = 4


class _Cancelled(Exception):
    """Raised from the progress callback when the running job is cancelled."""


class Worker:
    """Reads requests on one thread, runs jobs on the caller's thread, writes events."""

    def __init__(self, editor, out: TextIO) -> None:
        self.editor = editor
        self.out = out
        self.lock = threading.Lock()
        self.requests: queue.Queue = queue.Queue()
        self.cancelled: set[str] = set()
        self.running: str | None = None
        self.previews: dict[str, tuple[Any, Any]] = {}  # id -> (EditResult, keep mask)

    def emit(self, event: dict) -> None:
        with self.lock:
            self.out.write(to_json(event, indent=None) + "\n")
            self.out.flush()

    def read(self, stream: TextIO) -> None:
        """Reader thread: cancels act at once, everything else is queued in order."""
        for line in stream:
            if not line.strip():
                continue
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("a request must be a JSON object")
            except ValueError as error:
                self.emit({"event": "error", "message": f"not a request: {error}", "kind": "ParameterError",
                           "exit_code": ParameterError.exit_code})
                continue
            if request.get("type") == "cancel":
                with self.lock:
                    self.cancelled.add(str(request.get("id")))
                if self.running == str(request.get("id")):
                    self.editor.pipeline._interrupt = True
                continue
            self.requests.put(request)
        self.requests.put({"type": "shutdown"})

    def loop(self) -> None:
        while True:
            request = self.requests.get()
            kind = request.get("type")
            if kind == "shutdown":
                return
            request_id = str(request.get("id"))
            if request_id in self.cancelled:
                self.emit({"id": request_id, "event": "cancelled"})
                continue
            self.running = request_id
            try:
                if kind in ("edit", "preview"):
                    self.run(request_id, kind, request.get("job"))
                elif kind == "rethreshold":
                    self.rethreshold(request_id, request)
                else:
                    raise ParameterError(f"unknown request type {kind!r}; known: edit, preview, "
                                         "rethreshold, cancel, shutdown.")
            except (EditCancelled, _Cancelled):
                self.emit({"id": request_id, "event": "cancelled"})
            except InstructX2XError as error:
                self.emit({"id": request_id, "event": "error", "message": str(error),
                           "kind": type(error).__name__, "exit_code": error.exit_code})
            except MemoryError:
                self.emit({"id": request_id, "event": "error", "kind": "ResourceError",
                           "exit_code": ResourceError.exit_code,
                           "message": "out of memory: use a smaller resolution or another device."})
            except Exception as error:  # noqa: BLE001 - a defect must not take the warm worker down
                self.emit({"id": request_id, "event": "error", "kind": type(error).__name__, "exit_code": 1,
                           "message": f"internal error, please report it ({type(error).__name__}: "
                                      f"{str(error).splitlines()[0] if str(error) else ''})"})
            finally:
                self.running = None
                self.editor.pipeline._interrupt = False

    def run(self, request_id: str, kind: str, job_data: Any) -> None:
        if not isinstance(job_data, dict):
            raise ParameterError("an edit or preview request needs a 'job' object.")
        job = EditJob.from_dict({**job_data, "command": kind})
        prepared = prepare(job)

        def emit(event: dict) -> None:
            if request_id in self.cancelled and event["event"] in ("started", "progress"):
                raise _Cancelled()  # from the step callback: the loop stops, nothing is written
            self.emit({"id": request_id, **event})

        results = edit_images(prepared, self.editor, emit)
        if request_id in self.cancelled:  # cancelled during the last step or the decode
            raise _Cancelled()
        write_results(prepared, results, emit, float_maps=True)
        if kind == "preview" and len(results) == 1:
            self.previews[request_id] = (results[0], prepared.keep_mask)
            while len(self.previews) > MAX_CACHED_PREVIEWS:
                self.previews.pop(next(iter(self.previews)))

    def rethreshold(self, request_id: str, request: dict) -> None:
        import numpy as np
        from PIL import Image

        from .outputs import atomic_output_dir

        cached = self.previews.get(str(request.get("preview")))
        if cached is None:
            raise ParameterError(f"no cached preview {request.get('preview')!r}; run a preview first "
                                 f"(the worker keeps the last {MAX_CACHED_PREVIEWS}).")
        if "output" not in request:
            raise ParameterError("rethreshold needs an 'output' folder.")
        result, keep = cached
        mask = result.mask_at(request.get("tau"), keep)
        output = Path(request["output"])
        with atomic_output_dir(output) as staging:
            np.save(staging / "edit_mask.npy", mask)
            Image.fromarray(mask.astype(np.uint8) * 255).save(staging / "edit_mask.png")
        self.emit({"id": request_id, "event": "done", "output": str(output),
                   "files": ["edit_mask.npy", "edit_mask.png"], "tau": request.get("tau"),
                   "edit_fraction": float(mask.mean())})


def serve(editor, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """Serve jobs until ``shutdown``, end of input or SIGTERM; returns the exit code."""
    worker = Worker(editor, stdout)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        worker.emit({"event": "ready", "protocol": PROTOCOL_VERSION, "model": editor.model_info.to_dict(),
                     "precision": editor.precision, "native_resolution": editor.native_resolution})
        threading.Thread(target=worker.read, args=(stdin,), daemon=True).start()
        worker.loop()
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _interrupt(signum, frame) -> None:
    """SIGTERM ends the worker like Ctrl-C: the running job stops, nothing is left behind."""
    raise KeyboardInterrupt
