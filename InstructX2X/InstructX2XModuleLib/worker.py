"""The panel's side of the worker service: a Qt-free client for ``instructx2x serve --stdio``.

The Slicer widget (and the browser panel) owns a timer that calls ``poll()``; everything else
lives here and imports neither qt nor slicer, so it is tested with real processes outside
Slicer. A reader thread moves the worker's JSON lines into a queue (SlicerMONAIAuto3DSeg's
pattern), and a small state machine says what the panel shows:

    IDLE -> STARTING -> READY -> RUNNING -> READY (done / failed / cancelled)
                                        \\-> CANCELLING -> READY
    any state -> STOPPED (shutdown, kill, or the process died)

Cancel first asks politely (a ``cancel`` message stops the job at its next step); ``kill``
ends the whole process tree when the worker does not answer. Slicer's ``PythonSlicer`` is a
launcher that runs the real Python as its child, so the worker starts in a process group of
its own (POSIX: a new session; Windows: a new process group) and ``kill`` ends the group
(``os.killpg``; Windows: ``taskkill /T /F``), with the standard library alone: Slicer's
Python has no psutil.

With ``socket_path`` the client connects to a shared worker (``instructx2x serve --socket``)
instead of starting one: the model is the worker's, other panels' jobs may run first (the
worker says how many with ``queued`` events), and stopping the client ends only the connection.
The client talks only to a worker that runs as its own user or root (``SO_PEERCRED``).
A shared worker may run on another machine (an SSH-forwarded socket), so the client sends it
each job's files over the connection and receives the results the same way
(``instructx2x.transfer``): the uploads go from a thread of their own, the results are written
by the reader thread into a hidden folder that becomes the job's output on ``done``; the
panel's timer sees only the small events.

Whichever worker answers, a ``done`` counts only when its ``output`` is the folder the job
asked for (or inside it); any other is turned into an ``error`` event, so that a panel never
loads results from a folder it did not choose.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import itertools
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

__all__ = ["WorkerState", "WorkerClient", "WorkerError", "kill_process_group"]

STDERR_LINES = 200  # the worker's last stderr lines kept for the exit message
MAX_EVENT_CHARS = 4 << 20  # the longest event line taken from a worker (a file chunk is ~0.7 MB)


_OWN_GROUP: dict[str, Any]  # Popen's arguments for a process group of the worker's own
if sys.platform == "win32":
    _OWN_GROUP = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
else:
    _OWN_GROUP = {"start_new_session": True}


def kill_process_group(pid: int) -> None:
    """Kill the process ``pid`` and every process it started, ``pid`` having been started in a
    group of its own (``start_new_session`` on POSIX, ``CREATE_NEW_PROCESS_GROUP`` on Windows).

    Parameters
    ----------
    pid : int
        The group leader (the worker's launcher).
    """
    if sys.platform == "win32":
        subprocess.run(
            ["taskkill", "/T", "/F", "/PID", str(pid)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
            creationflags=subprocess.CREATE_NO_WINDOW,
        )
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is gone already
        pass


class WorkerState(str, enum.Enum):
    IDLE = "idle"
    STARTING = "starting"
    READY = "ready"
    RUNNING = "running"
    CANCELLING = "cancelling"
    STOPPED = "stopped"


class WorkerError(RuntimeError):
    """The worker could not be started or has died; the message says why."""


class WorkerClient:
    """One warm worker process serving one job at a time.

    Parameters
    ----------
    model: str
        A model folder, checkpoint, ``demo`` or ``untrained-tiny``.
    device: str
        ``auto``, ``cpu``, ``cuda``...
    executable: list[str] | None
        The command that starts the worker; default: this Python running the library's CLI.
    environment: dict | None
        Extra environment variables (e.g. ``CUDA_VISIBLE_DEVICES=-1`` to force the CPU).
    scheduler, dtype: str
        The sampler and precision the model is loaded with (``auto``: the device's defaults).
    backend: str
        What runs the networks: ``auto``, ``torch`` or ``openvino`` (``instructx2x serve
        --backend``; ``auto``: what measured fastest on this CPU kind).
    socket_path: str | None
        Connect to this shared worker instead of starting one (model and device are its own).
    transfer: bool | None
        Send the job's files over the connection (default: with a shared worker, which may
        share no folder with the panel).
    """

    def __init__(
        self,
        model: str,
        device: str = "auto",
        executable: list[str] | None = None,
        environment: dict | None = None,
        scheduler: str = "auto",
        dtype: str = "auto",
        socket_path: str | None = None,
        transfer: bool | None = None,
        backend: str = "auto",
    ) -> None:
        self.command = [
            *(executable or [sys.executable, "-m", "instructx2x.cli"]),
            "serve",
            "--stdio",
            "--model",
            str(model),
            "--device",
            device,
            "--scheduler",
            scheduler,
            "--dtype",
            dtype,
            "--backend",
            backend,
        ]
        self.environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(environment or {})}
        self.state = WorkerState.IDLE
        self.process: subprocess.Popen | None = None
        self.socket_path = socket_path
        self.connection: socket.socket | None = None
        self._writer: IO[str] | None = None
        self.events: queue.Queue = queue.Queue()
        self.current: str | None = None
        self.current_output: str | None = None
        self.info: dict = {}
        self.last_error: str | None = None
        self._ids = itertools.count(1)
        from instructx2x.transfer import Downloads  # the library's source is on the path by now

        self.transfer = bool(socket_path) if transfer is None else transfer
        self.downloads = Downloads()
        self._send_lock = threading.Lock()
        self._abandoned: set[str] = set()  # transferred jobs cancelled while their files go

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Start the process (or connect to the shared worker); ``poll`` reports ``ready`` once
        the model is loaded."""
        if self.state not in (WorkerState.IDLE, WorkerState.STOPPED):
            raise WorkerError(f"the worker is already {self.state.value}.")
        reader: IO[str] | None  # the worker's events
        if self.socket_path:
            from instructx2x.serve import peer_uid, trusted_uid

            name = Path(self.socket_path).name
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                connection.connect(self.socket_path)
                uid = peer_uid(connection)
            except OSError as error:
                connection.close()
                raise WorkerError(
                    f"cannot reach the shared worker at {name} ({error.strerror}); "
                    "is instructx2x serve --socket running?"
                ) from None
            if not trusted_uid(uid):
                connection.close()
                raise WorkerError(
                    f"the shared worker at {name} runs as another user (uid {uid}, not "
                    f"{os.getuid()}); refusing to send it jobs."
                )
            self.connection = connection
            self._writer, reader = (self.connection.makefile(mode, encoding="utf-8") for mode in ("w", "r"))
        else:
            try:  # a process group of its own (``kill`` ends the launcher and its Python); no console window
                self.process = subprocess.Popen(
                    self.command,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=self.environment,
                    **_OWN_GROUP,
                )
            except OSError as error:
                raise WorkerError(f"cannot start the worker ({error.strerror}).") from None
            self._writer, reader = self.process.stdin, self.process.stdout
            # stderr read as it comes (a worker that logs more than a pipe holds never blocks); its
            # last lines are kept for the exit message
            self.stderr_tail: collections.deque = collections.deque(maxlen=STDERR_LINES)
            self._stderr_reader = threading.Thread(
                target=self._drain, args=(self.process.stderr,), daemon=True
            )
            self._stderr_reader.start()
        self.state = WorkerState.STARTING
        threading.Thread(target=self._read, args=(reader,), daemon=True).start()

    def submit(self, kind: str, job: dict | None = None, **fields) -> str:
        """Send a request (``edit``, ``preview``, ``rethreshold``); returns its id."""
        if self.state != WorkerState.READY:
            raise WorkerError(f"the worker is {self.state.value}, not ready for a job.")
        request_id = str(next(self._ids))
        output = (job or {}).get("output") or fields.get("output")
        request = {"type": kind, "id": request_id, **({"job": job} if job is not None else {}), **fields}
        if self.transfer:
            if not isinstance(output, str):
                raise WorkerError("a job sent with its files needs the output folder it is to arrive in.")
            uploads, request = self._transferred(request_id, request)
            self.downloads.expect(request_id, Path(output))
            threading.Thread(
                target=self._send_with_files, args=(request_id, uploads, request), daemon=True
            ).start()
        else:
            self._send(request)
        self.current = request_id
        self.current_output = output
        self.state = WorkerState.RUNNING
        return request_id

    def cancel(self) -> None:
        """Ask the running job to stop at its next step (nothing is written)."""
        if self.state == WorkerState.RUNNING and self.current is not None:
            self._abandoned.add(self.current)
            self._send({"type": "cancel", "id": self.current})
            self.state = WorkerState.CANCELLING

    def _transferred(self, request_id: str, request: dict) -> tuple[list[tuple[Path, str]], dict]:
        """The files a request names, and the request naming them by their upload names."""
        from instructx2x.transfer import JOB_FILE_FIELDS, upload_name

        protocol = self.info.get("protocol", 1)
        if isinstance(protocol, bool) or not isinstance(protocol, int) or protocol < 2:
            raise WorkerError(
                f"the shared worker cannot receive files (protocol {str(protocol)[:20]}); update "
                "InstructX2X where it runs."
            )
        request = {**request, "transfer": True}
        request.pop("output", None)
        uploads = []
        if "job" in request:
            job = {key: value for key, value in request["job"].items() if key != "output"}
            for field in JOB_FILE_FIELDS:
                if job.get(field) is not None:
                    path = Path(job[field])
                    if not path.is_file():
                        raise WorkerError(f"{path.name} is not a file; a shared worker takes files only.")
                    job[field] = upload_name(field, path)
                    uploads.append((path, job[field]))
            request["job"] = job
        return uploads, request

    def _send_with_files(self, request_id: str, uploads: list[tuple[Path, str]], request: dict) -> None:
        """Uploads, then the job (a thread of its own: a slow link never holds the panel)."""
        from instructx2x.transfer import upload_requests

        try:
            for path, name in uploads:
                for message in upload_requests(path, name, f"{request_id}:{name}"):
                    if not self._send(message, unless_cancelled=request_id):
                        return
            self._send(request, unless_cancelled=request_id)
        except (OSError, WorkerError) as error:
            reason = str(error) if isinstance(error, WorkerError) else f"cannot read {error.filename}"
            self.downloads.discard(request_id)
            self.events.put({"id": request_id, "event": "error", "kind": "WorkerError", "message": reason})

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the running job, ask the worker to exit, and kill its process tree if it does
        not within ``timeout`` seconds; a shared worker: hang up."""
        if self.connection is not None:
            self._hang_up(self.connection)
            return
        if self.process is None or self.process.poll() is not None:
            self.state = WorkerState.STOPPED
            return
        try:
            if self.state == WorkerState.RUNNING:  # a job between two steps ends at once
                self.cancel()
            self._send({"type": "shutdown"})
            self.process.wait(timeout=timeout)
        except (OSError, WorkerError, subprocess.TimeoutExpired):
            self.kill()
        self.state = WorkerState.STOPPED

    def kill(self) -> None:
        """End the worker and every process it started (its process group)."""
        if self.connection is not None:  # a shared worker is not ours to kill: its jobs for us stop
            self._hang_up(self.connection)
            return
        if self.process is None:
            return
        kill_process_group(self.process.pid)
        try:
            self.process.kill()  # the launcher itself, should the group have gone another way
        except OSError:
            pass
        self.process.wait(timeout=30)
        self.state = WorkerState.STOPPED
        if self.current_output:  # a kill during the second of writing leaves a staging folder
            from instructx2x.staging import remove_stale_staging

            remove_stale_staging(Path(self.current_output))

    # -- events --------------------------------------------------------------------------
    def poll(self) -> list[dict]:
        """Drain the events that arrived since the last call and update the state."""
        events = []
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                break
            kind = event.get("event")
            if kind == "done" and not self._ours(event.get("output")):
                event = {
                    "id": event.get("id"),
                    "event": "error",
                    "kind": "WorkerError",
                    "message": "the worker reported a result outside the output folder asked for; ignored.",
                }
                kind = "error"
            events.append(event)
            if kind == "ready":
                self.info = event
                self.state = WorkerState.READY
            elif (
                kind in ("done", "error", "cancelled")
                and self.current is not None
                and event.get("id") == self.current
            ):  # a start-up error has no id: not a job's end
                self.state, self.current = WorkerState.READY, None
                if kind == "error":
                    self.last_error = event.get("message")
            elif kind == "error" and self.state == WorkerState.STARTING:
                self.last_error = event.get("message")
            elif kind == "exit":
                self.state, self.current = WorkerState.STOPPED, None
                if self.last_error is None and event.get("message"):
                    self.last_error = event["message"]
                elif self.last_error is None and event.get("returncode") not in (0, None):
                    self.last_error = (
                        f"the worker stopped (exit code {event['returncode']}): "
                        f"{event.get('stderr', '')[-500:]}"
                    )
        return events

    def _ours(self, output) -> bool:
        """Whether ``output`` is the running job's output folder or inside it."""
        if not isinstance(output, str) or self.current_output is None:
            return False
        asked = Path(os.path.abspath(self.current_output))
        return Path(os.path.abspath(output)).is_relative_to(asked)

    def _send(self, request: dict, unless_cancelled: str | None = None) -> bool:
        """Write one request; with ``unless_cancelled``, nothing once that job was cancelled
        (then its ``cancelled`` event is ours to make). Returns whether it was written."""
        with self._send_lock:  # the upload thread and the panel's cancel write whole lines
            if unless_cancelled in self._abandoned:
                self.events.put({"id": unless_cancelled, "event": "cancelled"})
                self.downloads.discard(unless_cancelled)
                return False
            if self._writer is None or (self.process is not None and self.process.poll() is not None):
                raise WorkerError("the worker is not running.")
            try:
                self._writer.write(json.dumps(request) + "\n")
                self._writer.flush()
            except (OSError, ValueError):  # ValueError: the stream was closed by a hang-up
                raise WorkerError("the worker is not running.") from None
        return True

    def _hang_up(self, connection: socket.socket) -> None:
        try:
            connection.shutdown(socket.SHUT_RDWR)  # the worker cancels this connection's jobs
        except OSError:
            pass
        connection.close()
        self._writer = None
        self.state = WorkerState.STOPPED

    def _read(self, stream) -> None:
        """The reader thread: events into the queue until the worker is gone; a line longer
        than ``MAX_EVENT_CHARS`` (a broken or hostile worker) ends the connection."""
        message = None
        try:
            while line := stream.readline(MAX_EVENT_CHARS + 1):
                if len(line) > MAX_EVENT_CHARS:
                    message = "the worker sent an event longer than any it sends; disconnected."
                    break
                try:
                    event = json.loads(line)
                except (ValueError, RecursionError):
                    continue  # a library printed a stray line: not an event
                if isinstance(event, dict):
                    self._arrived(event)
        except (OSError, ValueError):  # our own hang-up closed the stream
            pass
        finally:
            self.downloads.discard()
            self._exited(message)

    def _exited(self, message: str | None) -> None:
        if self.process is None:  # a shared worker: gone unless we hung up
            if message is not None and self.connection is not None:
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
            self.events.put(
                {
                    "event": "exit",
                    "returncode": None,
                    "stderr": "",
                    "message": message
                    or (None if self._writer is None else "the shared worker closed the connection."),
                }
            )
            return
        if message is not None:
            self.last_error = message
            kill_process_group(self.process.pid)
        returncode = self.process.wait()
        self._stderr_reader.join(timeout=5)
        self.events.put({"event": "exit", "returncode": returncode, "stderr": "".join(self.stderr_tail)})

    def _arrived(self, event: dict) -> None:
        """A transferred job's files are written here, on the reader's thread; its end settles
        its folder (an upload the worker refused gives the job's error its reason); ``file``
        events of no job of ours are dropped; every other event goes to ``poll``."""
        request_id, kind = str(event.get("id")), event.get("event")
        job_id = request_id.split(":", 1)[0]
        try:
            if kind == "file":
                if request_id in self.downloads.outputs:
                    self.downloads.receive(event)
                return
            if kind == "error" and ":" in request_id and job_id in self.downloads.outputs:
                self.downloads.upload_failures[job_id] = str(event.get("message"))[:500]
                return
            if request_id in self.downloads.outputs:
                refused = self.downloads.upload_failures.get(request_id)
                if kind == "done":
                    event = self.downloads.finish(event)
                elif kind in ("error", "cancelled"):
                    self.downloads.discard(request_id)
                    if kind == "error" and refused is not None:
                        event = {**event, "message": f"the worker refused the job's file: {refused}"}
        except Exception as error:  # noqa: BLE001 - a worker's odd event ends its job, never this thread
            self.downloads.discard(request_id)
            event = {
                "id": request_id,
                "event": "error",
                "kind": "WorkerError",
                "message": f"the worker sent a malformed event ({type(error).__name__}).",
            }
        self.events.put(event)

    def _drain(self, stream) -> None:
        """The worker's stderr, line by line, into ``stderr_tail`` (lines cut to 1000 characters)."""
        try:
            for line in stream:
                self.stderr_tail.append(line[-1000:])
        except (OSError, ValueError):
            pass
