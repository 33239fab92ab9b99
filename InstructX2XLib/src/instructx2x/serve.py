"""``instructx2x serve``: a long-lived worker that keeps the model warm.

The Slicer panel and the browser panel start it once and send jobs as JSON lines; it answers
with JSON lines. Two transports, one protocol (version ``PROTOCOL_VERSION``):

- ``--stdio``: one client, the process that started it (stdin / stdout);
- ``--socket PATH``: a shared worker on a Unix socket (mode 0600: its user only). Several
  clients (e.g. one browser panel per reader on a GPU server) connect; their jobs run one at a
  time, in arrival order, on the one warm model.

Requests (one JSON object per line; ``id`` is the caller's, echoed in every event; ids of
different clients never collide)::

    {"type": "edit" | "preview", "id": "7", "job": {EditJob.to_dict() fields}}
    {"type": "rethreshold", "id": "8", "preview": "7", "tau": 0.3, "output": "DIR"}
    {"type": "cancel", "id": "7"}          # the running job stops at its next step; a queued
                                           # one is dropped before it starts (never lost)
    {"type": "shutdown"}                   # stdio: ends the worker; socket: ends this connection

Events: ``loading`` (before the model loads) and ``ready`` (after: model, precision, protocol;
a socket client gets ``ready`` when it connects), ``queued`` (position: how many jobs run or
wait ahead of it; sent on arrival and whenever it moves up), then per job ``started``,
``progress`` (step, total, eta_s), ``decode``, ``export``, ``done`` (output, files), or
``error`` (message, kind, exit_code) or ``cancelled``. A preview's float maps are kept in
memory so that ``rethreshold`` writes the edit mask at a new ``tau`` with no model call
(``edit_mask.npy`` and ``edit_mask.png``), equal to the mask an edit at that ``tau`` would use.
Every job writes float maps (``*.npy`` + ``maps.json`` with the geometry) beside its images.
SIGTERM ends the worker as cleanly as ``shutdown``; a socket client that disconnects has its
jobs cancelled.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

from .errors import EditCancelled, InstructX2XError, ParameterError, ResourceError
from .jobs import EditJob, edit_images, prepare, write_results
from .provenance import to_json

__all__ = ["serve", "serve_socket", "check_socket_path", "PROTOCOL_VERSION"]

PROTOCOL_VERSION = 1
MAX_CACHED_PREVIEWS = 4


class _Cancelled(Exception):
    """Raised from the progress callback when the running job is cancelled."""


class Client:
    """One connection: where its events go. ``key`` keeps its request ids apart from others'."""

    _keys = itertools.count()

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.key = next(self._keys)
        self.lock = threading.Lock()
        self.connected = True

    def emit(self, event: dict) -> None:
        if not self.connected:
            return
        with self.lock:
            try:
                self.out.write(to_json(event, indent=None) + "\n")
                self.out.flush()
            except (OSError, ValueError):  # the client went away: its jobs are cancelled
                self.connected = False


class Worker:
    """Reads requests on one thread per client, runs jobs one at a time on the caller's
    thread, and sends each client its own events."""

    def __init__(self, editor) -> None:
        self.editor = editor
        self.condition = threading.Condition()
        self.waiting: collections.deque = collections.deque()  # (client, request), arrival order
        self.cancelled: set[tuple[int, str]] = set()
        self.running: tuple[int, str] | None = None
        self.stopping = False
        self.previews: dict[tuple[int, str], tuple[Any, Any]] = {}  # -> (EditResult, keep mask)

    def read(self, stream: TextIO, client: Client, shared: bool = False) -> None:
        """Reader thread: cancels act at once, everything else waits its turn. At the end of
        the stream a stdio worker stops; a shared one cancels that client's jobs."""
        for line in stream:
            if not line.strip():
                continue
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("a request must be a JSON object")
            except ValueError as error:
                client.emit({"event": "error", "message": f"not a request: {error}", "kind": "ParameterError",
                             "exit_code": ParameterError.exit_code})
                continue
            kind = request.get("type")
            if kind == "cancel":
                self.cancel(client, str(request.get("id")))
            elif kind == "shutdown" and shared:
                break
            else:
                self.put(client, request)
        if shared:
            client.connected = False
            with self.condition:
                for other, request in list(self.waiting):
                    if other is client:
                        self.cancelled.add((client.key, str(request.get("id"))))
            if self.running is not None and self.running[0] == client.key:
                self.cancel(client, self.running[1])
        else:
            self.put(client, {"type": "shutdown"})

    def cancel(self, client: Client, request_id: str) -> None:
        with self.condition:
            self.cancelled.add((client.key, request_id))
            if self.running == (client.key, request_id):
                self.editor.pipeline._interrupt = True

    def put(self, client: Client, request: dict) -> None:
        with self.condition:
            self.waiting.append((client, request))
            ahead = len(self.waiting) - 1 + (self.running is not None)
            self.condition.notify()
        if ahead and request.get("type") != "shutdown":
            client.emit({"id": str(request.get("id")), "event": "queued", "position": ahead})

    def next(self) -> tuple[Client, dict]:
        """The next request; every job still waiting hears its new position."""
        with self.condition:
            while not self.waiting:
                self.condition.wait()
            client, request = self.waiting.popleft()
            waiting = list(self.waiting)
        for position, (other, queued) in enumerate(waiting, start=1):
            if queued.get("type") != "shutdown":
                other.emit({"id": str(queued.get("id")), "event": "queued", "position": position})
        return client, request

    def loop(self) -> None:
        while True:
            client, request = self.next()
            kind = request.get("type")
            if kind == "shutdown":
                return
            request_id = str(request.get("id"))
            key = (client.key, request_id)
            if key in self.cancelled:
                client.emit({"id": request_id, "event": "cancelled"})
                continue
            self.running = key
            try:
                if kind in ("edit", "preview"):
                    self.run(client, request_id, kind, request.get("job"))
                elif kind == "rethreshold":
                    self.rethreshold(client, request_id, request)
                else:
                    raise ParameterError(f"unknown request type {kind!r}; known: edit, preview, "
                                         "rethreshold, cancel, shutdown.")
            except (EditCancelled, _Cancelled):
                client.emit({"id": request_id, "event": "cancelled"})
            except InstructX2XError as error:
                client.emit({"id": request_id, "event": "error", "message": str(error),
                             "kind": type(error).__name__, "exit_code": error.exit_code})
            except MemoryError:
                client.emit({"id": request_id, "event": "error", "kind": "ResourceError",
                             "exit_code": ResourceError.exit_code,
                             "message": "out of memory: use a smaller resolution or another device."})
            except Exception as error:  # noqa: BLE001 - a defect must not take the warm worker down
                client.emit({"id": request_id, "event": "error", "kind": type(error).__name__, "exit_code": 1,
                             "message": f"internal error, please report it ({type(error).__name__}: "
                                        f"{str(error).splitlines()[0] if str(error) else ''})"})
            finally:
                with self.condition:
                    self.running = None
                    self.editor.pipeline._interrupt = False

    def run(self, client: Client, request_id: str, kind: str, job_data: Any) -> None:
        if not isinstance(job_data, dict):
            raise ParameterError("an edit or preview request needs a 'job' object.")
        job = EditJob.from_dict({**job_data, "command": kind})
        prepared = prepare(job)

        key = (client.key, request_id)

        def emit(event: dict) -> None:
            if key in self.cancelled and event["event"] in ("started", "progress"):
                raise _Cancelled()  # from the step callback: the loop stops, nothing is written
            client.emit({"id": request_id, **event})

        results = edit_images(prepared, self.editor, emit)
        if key in self.cancelled:  # cancelled during the last step or the decode
            raise _Cancelled()
        write_results(prepared, results, emit, float_maps=True)
        if kind == "preview" and len(results) == 1:
            self.previews[key] = (results[0], prepared.keep_mask)
            while len(self.previews) > MAX_CACHED_PREVIEWS:
                self.previews.pop(next(iter(self.previews)))

    def rethreshold(self, client: Client, request_id: str, request: dict) -> None:
        import numpy as np
        from PIL import Image

        from .outputs import atomic_output_dir

        cached = self.previews.get((client.key, str(request.get("preview"))))
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
        client.emit({"id": request_id, "event": "done", "output": str(output),
                   "files": ["edit_mask.npy", "edit_mask.png"], "tau": request.get("tau"),
                   "edit_fraction": float(mask.mean())})


def ready_event(editor) -> dict:
    """The model, precision and sampling defaults (steps, s_T, s_I, relevance draws, resolution:
    the model card's where it sets them), so that a panel shows the values an edit runs with when
    none are given."""
    return {"event": "ready", "protocol": PROTOCOL_VERSION, "model": editor.model_info.to_dict(),
            "precision": editor.precision, "native_resolution": editor.native_resolution,
            "defaults": editor.sampling()}


def serve(editor, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """Serve one client on stdin/stdout until ``shutdown``, end of input or SIGTERM."""
    worker, client = Worker(editor), Client(stdout)
    with _sigterm_interrupts():
        client.emit(ready_event(editor))
        threading.Thread(target=worker.read, args=(stdin, client), daemon=True).start()
        worker.loop()
    return 0


def check_socket_path(path: Path) -> None:
    """A socket path must be new and its folder must exist (checked before the model loads)."""
    if path.exists():
        raise ParameterError(f"{path.name} exists: another worker may be serving it; remove it if not.")
    if not path.parent.is_dir():
        raise ParameterError(f"the folder for the socket {path.name} does not exist.")
    if len(os.fsencode(path)) > 100:  # sun_path holds 108 bytes on Linux
        raise ParameterError(f"the socket path is {len(os.fsencode(path))} bytes long; use one under 100.")


def serve_socket(editor, path: str | Path) -> int:
    """Serve every client that connects to the Unix socket ``path`` (created with mode 0600,
    removed at exit) until SIGTERM or Ctrl-C; their jobs share the one warm model."""
    path = Path(path)
    check_socket_path(path)
    worker = Worker(editor)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous_mask = os.umask(0o177)  # the socket is born 0600: no window where others can connect
    try:
        listener.bind(str(path))
    finally:
        os.umask(previous_mask)
    listener.listen()

    def accept() -> None:
        while True:
            try:
                connection, _address = listener.accept()
            except OSError:
                return
            client = Client(connection.makefile("w", encoding="utf-8"))
            client.emit(ready_event(editor))
            threading.Thread(target=worker.read, args=(connection.makefile("r", encoding="utf-8"), client, True),
                             daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        with _sigterm_interrupts():
            worker.loop()
    except KeyboardInterrupt:
        pass  # SIGTERM or Ctrl-C: how a shared worker is stopped (a running job leaves nothing)
    finally:
        listener.close()
        path.unlink(missing_ok=True)
    return 0


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM ends the worker like Ctrl-C: the running job stops, nothing is left behind."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
