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
    {"type": "edit", "id": "9", "job": {..., "series": ["mild", "severe"]}}   # a progression
        # series (EditJob.series): its "started" says how many steps, its "done" carries
        # "series" (levels, instructions, region step, each step's files in "step_files")
    {"type": "rethreshold", "id": "8", "preview": "7", "tau": 0.3, "output": "DIR"}
    {"type": "cancel", "id": "7"}          # the running job stops at its next step; a queued
                                           # one is dropped before it starts (never lost)
    {"type": "upload", "id": "7:input", "name": "input.dcm", "offset": 0, "data": "<base64>",
     "final": true}                        # a file for a job sent with "transfer": true
    {"type": "shutdown"}                   # stdio: ends the worker; socket: ends this connection

Events: ``loading`` (before the model loads) and ``ready`` (after: model, precision, backend, protocol;
a socket client gets ``ready`` when it connects), ``queued`` (position: how many jobs run or
wait ahead of it; sent on arrival and whenever it moves up), then per job ``started``,
``progress`` (step, total, eta_s), ``decode``, ``export``, ``done`` (output, files), or
``error`` (message, kind, exit_code) or ``cancelled``. A preview's float maps are kept in
memory so that ``rethreshold`` writes the edit mask at a new ``tau`` with no model call
(``edit_mask.npy`` and ``edit_mask.png``), equal to the mask an edit at that ``tau`` would use.
Every job writes float maps (``*.npy`` + ``maps.json`` with the geometry) beside its images.
A job's folder appears whole, in one rename: a job cancelled (or whose client goes) before it
starts writing, its ``export`` event, writes nothing; one cancelled while it writes finishes.

A client that shares no folder with the worker (a panel on another machine, through an
SSH-forwarded socket) sends ``"transfer": true`` with an ``edit``, ``preview`` or
``rethreshold``: its files come as ``upload`` requests (handled as they arrive, beside a
running job) and the job names them, and its results go back as ``file`` events before
``done`` (``instructx2x.transfer``: formats and limits). Its files live in a folder of its own
on the worker, removed when it goes.
SIGTERM ends the worker as cleanly as ``shutdown``.

A shared worker answers only its own user and root (the peer's uid as the kernel reports it,
``peer_uid``; others are closed with no answer) and bounds what one client can take from the
others:

- at most ``MAX_CLIENTS`` (16) connections at a time; one more hears an ``error`` naming the
  limit and is closed;
- a request line holds at most ``MAX_LINE_BYTES`` (1 MiB, newline included), read with no
  more than that buffered; a longer line, or one that is not UTF-8, is answered with an
  ``error`` and the connection is closed;
- at most ``MAX_WAITING_PER_CLIENT`` (8) of a client's jobs wait at a time; one more is refused
  with an ``error``;
- a request's ``id`` is a string or number of at most ``MAX_ID_CHARS`` (128) characters;
- a client's uploaded files hold at most ``transfer.MAX_CLIENT_FILES`` (8) files and
  ``transfer.MAX_CLIENT_BYTES`` (256 MiB) at a time, in its own folder (0700), removed when it
  goes, and all clients' together at most ``transfer.MAX_WORKER_BYTES`` (1 GiB): a chunk over
  either is refused with an ``error`` and its file removed; a job takes its uploads when it is
  sent (it runs on them as they were then) and they go when it ends; its results are read from
  disk and sent by the client's own writer thread, so a client that reads slowly delays only
  itself; at most ``MAX_RESULTS_SENDING`` (2) of its jobs' results wait to be sent before its
  next job runs;
- each client's events wait in their own queue, written by their own thread, so a client that
  stops reading delays nobody: when ``MAX_PENDING_EVENTS`` (1000) or ``MAX_PENDING_BYTES``
  (16 MiB) wait, or a write makes no progress for ``SEND_STALL_S`` (10) seconds, it is
  disconnected;
- a client that disconnects, is disconnected or whose connection fails (reset, end of input)
  has its queued jobs dropped and its running job stopped: nothing of theirs is written;
- a failing ``accept`` (out of descriptors, an aborted connection) is logged by its error
  name, once per run of failures, and retried every ``ACCEPT_BACKOFF_S`` (0.1) seconds: the
  worker keeps serving;
- at SIGTERM every client is disconnected and the threads that serve them end before the
  worker exits.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import itertools
import json
import logging
import os
import queue
import select
import shutil
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from .errors import (
    EditCancelled,
    ErrorEvent,
    InputNotFoundError,
    InstructX2XError,
    ParameterError,
    ResourceError,
    error_event,
)
from .jobs import EditJob, edit_images, prepare, write_results
from .provenance import to_json
from .transfer import Inbox, UploadBudget, file_events, localize_job, worker_folder

__all__ = [
    "MAX_CLIENTS",
    "MAX_LINE_BYTES",
    "MAX_PENDING_EVENTS",
    "MAX_WAITING_PER_CLIENT",
    "MAX_ID_CHARS",
    "MAX_PENDING_BYTES",
    "PROTOCOL_VERSION",
    "check_socket_path",
    "peer_uid",
    "read_lines",
    "serve",
    "serve_socket",
    "trusted_uid",
]

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 2
MAX_CACHED_PREVIEWS = 4
MAX_CLIENTS = 16
MAX_LINE_BYTES = 1 << 20
MAX_PENDING_EVENTS = 1000
MAX_WAITING_PER_CLIENT = 8
SEND_STALL_S = 10.0
ACCEPT_BACKOFF_S = 0.1
SIGNAL_CHECK_S = 0.5
SHUTDOWN_JOIN_S = 5.0
MAX_PENDING_BYTES = 16 << 20  # what one client's unsent events may hold
MAX_ID_CHARS = 128
MAX_RESULTS_SENDING = 2  # a client's transferred results not yet sent, before its next job

_END = object()  # the last item of a client's event queue
_SOL_LOCAL, _LOCAL_PEERCRED = 0, 1  # <sys/un.h> on macOS and the BSDs; Python names neither


class _Cancelled(Exception):
    """Raised from the progress callback when the running job is cancelled."""


class _Refused(Exception):
    """A client's input that ends its connection; the message is what it hears."""


def peer_uid(connection: socket.socket) -> int:
    """The user id of the process at the other end of a connected Unix socket.

    Parameters
    ----------
    connection: socket.socket
        A connected ``AF_UNIX`` stream socket.

    Returns
    -------
    int
        The peer's uid as the kernel recorded it when the connection was made (Linux:
        ``SO_PEERCRED``; macOS and the BSDs: ``LOCAL_PEERCRED``, whose ``struct xucred`` starts
        with its version and the uid).
    """
    if hasattr(socket, "SO_PEERCRED"):
        credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", credentials)
        return uid
    credentials = connection.getsockopt(_SOL_LOCAL, _LOCAL_PEERCRED, 128)
    _version, uid = struct.unpack_from("=2I", credentials)
    return uid


def trusted_uid(uid: int) -> bool:
    """Whether a peer with ``uid`` may talk to us: our own user or root."""
    return uid in (os.getuid(), 0)


@dataclasses.dataclass
class _Results:
    """A transferred job's result files (``folder``), sent as ``file`` events and then its
    ``done``; the folder is removed once sent, or once the client is gone."""

    folder: Path
    request_id: str
    done: dict

    def events(self) -> Iterator[dict]:
        yield from file_events(self.folder, list(self.done["files"]), self.request_id)
        yield {"id": self.request_id, **self.done, "output": ""}

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class Client:
    """One client's events, written at once (the stdio worker's only client). ``key`` keeps
    its request ids apart from other clients'."""

    _keys = itertools.count()

    def __init__(self, out: TextIO | None) -> None:
        self.out = out
        self.key = next(self._keys)
        self.lock = threading.Lock()
        self.connected = True
        self.results_sending = 0  # transferred jobs' results not yet sent

    def emit(self, event: dict) -> None:
        if not self.connected or self.out is None:
            return
        with self.lock:
            try:
                self.out.write(to_json(event, indent=None) + "\n")
                self.out.flush()
            except (OSError, ValueError):  # the client went away: its jobs are cancelled
                self.connected = False

    def send_results(self, results: _Results) -> None:
        """A transferred job's files and ``done`` (here, at once)."""
        try:
            for event in results.events():
                self.emit(event)
        except OSError:  # the files went with the client's folder
            self.connected = False
        finally:
            results.discard()

    def close(self, flush: bool = True) -> None:
        """Send nothing more."""
        self.connected = False


class SocketClient(Client):
    """A socket connection: events wait in a bounded queue that the client's own writer thread
    drains, so that ``emit`` never blocks. A client that stops reading is disconnected when its
    queue is full (``MAX_PENDING_EVENTS`` events or ``MAX_PENDING_BYTES``) or a write stalls;
    its reader then sees the end of input. Result files are read from disk by the writer as it
    sends them."""

    def __init__(self, connection: socket.socket) -> None:
        super().__init__(out=None)
        self.connection = connection
        self.pending: queue.Queue = queue.Queue(MAX_PENDING_EVENTS)
        self.pending_bytes = 0
        threading.Thread(target=self._write, daemon=True).start()

    def emit(self, event: dict) -> None:
        if not self.connected:
            return
        data = (to_json(event, indent=None) + "\n").encode()
        with self.lock:
            full = self.pending_bytes + len(data) > MAX_PENDING_BYTES
            if not full:
                self.pending_bytes += len(data)
        try:
            if full:
                raise queue.Full
            self.pending.put_nowait(data)
        except queue.Full:  # it stopped reading: it gets nothing more and its jobs stop
            self.close(flush=False)

    def send_results(self, results: _Results) -> None:
        """Queue a transferred job's results for the writer (which reads the files as it sends)."""
        with self.lock:
            self.results_sending += 1
        try:
            if not self.connected:
                raise queue.Full
            self.pending.put_nowait(results)
        except queue.Full:
            self._sent(results)
            self.close(flush=False)

    def close(self, flush: bool = True) -> None:
        """Stop sending; with ``flush``, what is queued goes out first (within the stall limit)."""
        self.connected = False
        try:
            self.pending.put_nowait(_END)
        except queue.Full:
            flush = False
        with contextlib.suppress(OSError):  # wakes the reader (end of input) and, without flush, the writer
            self.connection.shutdown(socket.SHUT_RD if flush else socket.SHUT_RDWR)

    def _write(self) -> None:
        try:
            while (item := self.pending.get()) is not _END:
                if isinstance(item, _Results):
                    try:
                        for event in item.events():
                            self._send((to_json(event, indent=None) + "\n").encode())
                    finally:
                        self._sent(item)
                else:
                    with self.lock:
                        self.pending_bytes -= len(item)
                    self._send(item)
        except OSError:  # gone, or not reading (or its files went with it)
            pass
        finally:
            self.connected = False
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            self.connection.close()  # the descriptor goes once the reader's file is closed too
            while True:  # results never sent: their folders go
                try:
                    item = self.pending.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Results):
                    self._sent(item)

    def _sent(self, results: _Results) -> None:
        results.discard()
        with self.lock:
            self.results_sending -= 1

    def _send(self, data: bytes) -> None:
        poller = select.poll()
        poller.register(self.connection, select.POLLOUT)
        view = memoryview(data)
        while view:
            if not poller.poll(SEND_STALL_S * 1000):
                raise TimeoutError("the client takes no data")
            with contextlib.suppress(BlockingIOError):
                view = view[self.connection.send(view, socket.MSG_DONTWAIT) :]


def read_lines(stream: BinaryIO, limit: int = MAX_LINE_BYTES) -> Iterator[str]:
    """The lines of ``stream`` as text, each read with at most ``limit`` bytes buffered.

    Raises
    ------
    _Refused
        When a line is longer than ``limit`` bytes (newline included) or is not UTF-8.
    """
    while line := stream.readline(limit + 1):
        if len(line) > limit:
            raise _Refused(f"a request line is longer than {limit} bytes; connection closed.")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise _Refused("a request line is not UTF-8 text; connection closed.") from None
        yield text


class Worker:
    """Reads requests on one thread per client, runs jobs one at a time on the caller's
    thread, and sends each client its own events."""

    def __init__(self, editor) -> None:
        self.editor = editor
        self.condition = threading.Condition()
        self.waiting: collections.deque = collections.deque()  # (client, request), arrival order
        self.cancelled: set[tuple[int, str]] = set()  # of jobs that wait or run
        self.running: tuple[int, str] | None = None
        self.clients: set[Client] = set()  # the socket clients connected now
        self.readers: set[threading.Thread] = set()  # their reader threads
        self.previews: dict[tuple[int, str], tuple[Any, Any]] = {}  # -> (EditResult, keep mask)
        self.inboxes: dict[int, Inbox] = {}  # client key -> its transferred files
        self.budget = UploadBudget()  # the bytes of all the inboxes' uploads
        self.folder: Path | None = None  # for the inboxes (transfer.worker_folder), made when needed

    def close(self) -> None:
        """The worker ends: its clients' files go."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def read(self, lines: Iterable[str], client: Client, shared: bool = False) -> None:
        """Reader thread: cancels act at once, everything else waits its turn. At the end of
        the input, or on any error reading it, a stdio worker stops; a shared one drops that
        client (its jobs are cancelled)."""
        try:
            for line in lines:
                if not client.connected:  # disconnected while its lines were read
                    break
                if not line.strip():
                    continue
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("a request must be a JSON object")
                except (ValueError, RecursionError) as error:
                    reason = "nested too deeply" if isinstance(error, RecursionError) else error
                    client.emit(_error(f"not a request: {reason}"))
                    continue
                request_id = request.get("id")
                if isinstance(request_id, bool) or not isinstance(request_id, (str, int, type(None))):
                    client.emit(_error("a request's id must be a string or a number."))
                    continue
                if len(str(request_id)) > MAX_ID_CHARS:
                    client.emit(_error(f"a request's id has at most {MAX_ID_CHARS} characters."))
                    continue
                kind = request.get("type")
                if kind == "cancel":
                    self.cancel(client, str(request.get("id")))
                elif kind == "upload":
                    self.upload(client, request)
                elif kind == "shutdown":
                    break
                else:
                    self.put(client, request)
        except _Refused as error:
            client.emit(_error(str(error)))
        except (OSError, ValueError):  # reset, closed: the same as the end of the input
            pass
        finally:
            if shared:
                self.drop(client)
            else:
                self.put(client, {"type": "shutdown"})

    def admit(self, client: Client) -> bool:
        """Count a new socket client in, unless ``MAX_CLIENTS`` are connected."""
        with self.condition:
            if len(self.clients) >= MAX_CLIENTS:
                return False
            self.clients.add(client)
            return True

    def hang_up(self) -> None:
        """Disconnect every socket client (the worker stops): their readers end."""
        with self.condition:
            clients = list(self.clients)
        for client in clients:
            client.close(flush=False)

    def drop(self, client: Client) -> None:
        """A client that is gone: its slot is freed, its queued jobs and cached previews are
        dropped, and its running job stops before its next step (nothing of it is written: a
        job of a client that is not connected stops at its next event, see ``_stopped``)."""
        client.close()
        with self.condition:
            self.clients.discard(client)
            first = next(
                (i for i, (c, _request) in enumerate(self.waiting) if c is client), len(self.waiting)
            )
            self.waiting = collections.deque((c, r) for c, r in self.waiting if c is not client)
            moved, ahead = list(self.waiting)[first:], first + (self.running is not None)
            self.cancelled = {key for key in self.cancelled if key[0] != client.key}
            for key in [key for key in self.previews if key[0] == client.key]:
                del self.previews[key]
            if self.running is not None and self.running[0] == client.key:
                self.editor.pipeline.cancel()
            inbox = self.inboxes.pop(client.key, None)
        _announce(moved, ahead)  # the jobs that waited behind its jobs move up
        if inbox is not None:  # its files go (a job of it still running fails to write, unheard)
            inbox.close()

    def upload(self, client: Client, request: dict) -> None:
        """Store one chunk of a client's file (on the reader's thread, beside a running job)."""
        request_id = str(request.get("id"))
        try:
            event = self.inbox(client).receive(request)
        except InstructX2XError as error:
            client.emit({"id": request_id, **error_event(error).to_dict()})
            return
        if event is not None:
            client.emit({"id": request_id, **event})

    def inbox(self, client: Client) -> Inbox:
        """The client's folder for transferred files (made when first needed, never for a
        client that is gone: ``drop`` removes it).

        Raises
        ------
        InputNotFoundError
            The client is gone.
        """
        with self.condition:
            if not client.connected:
                raise InputNotFoundError("the client is gone; its files went with it.")
            if client.key not in self.inboxes:
                if self.folder is None:
                    self.folder = worker_folder()
                self.inboxes[client.key] = Inbox(self.folder, self.budget)
            return self.inboxes[client.key]

    def cancel(self, client: Client, request_id: str) -> None:
        key = (client.key, request_id)
        with self.condition:
            if self.running == key:
                self.cancelled.add(key)
                self.editor.pipeline.cancel()
            elif any(c is client and str(r.get("id")) == request_id for c, r in self.waiting):
                self.cancelled.add(key)

    def put(self, client: Client, request: dict) -> None:
        request_id = str(request.get("id"))
        if _takes_files(request):  # the job runs on its files as they are now
            try:
                request = {**request, "job": localize_job(request["job"], self.inbox(client), request_id)}
            except InstructX2XError as error:
                client.emit({"id": request_id, **error_event(error).to_dict()})
                return
        with self.condition:
            mine = sum(c is client for c, _request in self.waiting)
            if mine >= MAX_WAITING_PER_CLIENT and request.get("type") != "shutdown":
                refused = True
            else:
                refused = False
                self.waiting.append((client, request))
                ahead = len(self.waiting) - 1 + (self.running is not None)
                self.condition.notify()
        if refused:
            self._release(client, request)
            client.emit(
                {
                    "id": request_id,
                    **_error(
                        f"{MAX_WAITING_PER_CLIENT} of your jobs already wait; send more when one ends.",
                        ResourceError,
                    ),
                }
            )
        elif ahead and request.get("type") != "shutdown":
            client.emit({"id": request_id, "event": "queued", "position": ahead})

    def next(self) -> tuple[Client, dict]:
        """The next request, marked running; every job still waiting hears its new position."""
        with self.condition:
            while not self.waiting:
                # Timed: a SIGTERM that another thread receives is handled when the wait ends.
                self.condition.wait(SIGNAL_CHECK_S)
            client, request = self.waiting.popleft()
            if request.get("type") != "shutdown":
                self.running = (client.key, str(request.get("id")))
            waiting = list(self.waiting)
        _announce(waiting, ahead=1)
        return client, request

    def loop(self) -> None:
        while True:
            client, request = self.next()
            kind = request.get("type")
            if kind == "shutdown":
                return
            request_id = str(request.get("id"))
            key = (client.key, request_id)
            try:
                if self._stopped(client, key):
                    raise _Cancelled()
                if kind in ("edit", "preview"):
                    self.run(client, request_id, kind, request.get("job"), request.get("transfer") is True)
                elif kind == "rethreshold":
                    self.rethreshold(client, request_id, request)
                else:
                    raise ParameterError(
                        f"unknown request type {kind!r}; known: edit, preview, rethreshold, upload, cancel, "
                        "shutdown."
                    )
            except (EditCancelled, _Cancelled):
                client.emit({"id": request_id, "event": "cancelled"})
            except Exception as error:  # noqa: BLE001 - a defect must not take the warm worker down
                client.emit({"id": request_id, **error_event(error).to_dict()})
            finally:
                self._release(client, request)
                with self.condition:
                    self.running = None
                    self.cancelled.discard(key)

    def _release(self, client: Client, request: dict) -> None:
        """Remove the files a transferred job took when it was sent (it ended, or never runs)."""
        with self.condition:
            inbox = self.inboxes.get(client.key)
        if inbox is not None and _takes_files(request):
            inbox.release(request["job"])

    def _stopped(self, client: Client, key: tuple[int, str]) -> bool:
        """Whether the job ``key`` was cancelled or its client is gone."""
        return key in self.cancelled or not client.connected

    def run(self, client: Client, request_id: str, kind: str, job_data: Any, transfer: bool = False) -> None:
        if not isinstance(job_data, dict):
            raise ParameterError("an edit or preview request needs a 'job' object.")
        if not transfer:
            self._run(client, request_id, kind, job_data, False)
            return
        if client.results_sending >= MAX_RESULTS_SENDING:
            raise ResourceError(
                f"{client.results_sending} of your jobs' results are still being sent; "
                "send the next job when they have arrived."
            )
        output = self.inbox(client).results(request_id)
        self._run(client, request_id, kind, {**job_data, "output": str(output)}, True)

    def _run(self, client: Client, request_id: str, kind: str, job_data: dict, transfer: bool) -> None:
        job = EditJob.from_dict({**job_data, "command": kind})
        prepared = prepare(job)

        key = (client.key, request_id)

        def emit(event: dict) -> None:
            # Every event before ``done`` comes before the output folder is created: a cancel
            # raised here stops the loop and nothing is written.
            if event["event"] != "done" and self._stopped(client, key):
                raise _Cancelled()
            if transfer and event["event"] == "done":
                client.send_results(_Results(Path(event["output"]), request_id, event))
                return
            if transfer and "output" in event:  # the worker's folders are not the client's business
                event = {**event, "output": ""}
            client.emit({"id": request_id, **event})

        results = edit_images(prepared, self.editor, emit)
        write_results(prepared, results, emit, float_maps=True)
        if kind == "preview" and len(results) == 1:
            with self.condition:  # each client's last MAX_CACHED_PREVIEWS
                self.previews[key] = (results[0], prepared.keep_mask)
                mine = [other for other in self.previews if other[0] == client.key]
                for other in mine[:-MAX_CACHED_PREVIEWS]:
                    del self.previews[other]

    def rethreshold(self, client: Client, request_id: str, request: dict) -> None:
        import numpy as np
        from PIL import Image

        from .outputs import atomic_output_dir

        with self.condition:
            cached = self.previews.get((client.key, str(request.get("preview"))))
        if cached is None:
            raise ParameterError(
                f"no cached preview {request.get('preview')!r}; run a preview first "
                f"(the worker keeps the last {MAX_CACHED_PREVIEWS})."
            )
        if "output" not in request and request.get("transfer") is not True:
            raise ParameterError("rethreshold needs an 'output' folder.")
        result, keep = cached
        mask = result.mask_at(request.get("tau"), keep)
        transfer = request.get("transfer") is True
        output = self.inbox(client).results(request_id) if transfer else Path(request["output"])
        with atomic_output_dir(output) as staging:
            np.save(staging / "edit_mask.npy", mask)
            Image.fromarray(mask.astype(np.uint8) * 255).save(staging / "edit_mask.png")
        done = {
            "event": "done",
            "output": str(output),
            "files": ["edit_mask.npy", "edit_mask.png"],
            "tau": request.get("tau"),
            "edit_fraction": float(mask.mean()),
        }
        if transfer:
            client.send_results(_Results(output, request_id, done))
        else:
            client.emit({"id": request_id, **done})


def _takes_files(request: dict) -> bool:
    """Whether a request is a transferred job, which takes the uploads it names (``localize_job``)."""
    return (
        request.get("type") in ("edit", "preview")
        and request.get("transfer") is True
        and isinstance(request.get("job"), dict)
    )


def _announce(waiting: list[tuple[Client, dict]], ahead: int) -> None:
    """Tell each waiting job its position: ``ahead`` jobs run or wait before the first."""
    for position, (client, request) in enumerate(waiting, start=ahead):
        if request.get("type") != "shutdown":
            client.emit({"id": str(request.get("id")), "event": "queued", "position": position})


def _error(message: str, kind: type[InstructX2XError] = ParameterError) -> dict:
    return ErrorEvent(kind.__name__, message, kind.exit_code).to_dict()


def ready_event(editor) -> dict:
    """The model, precision, backend and sampling defaults (steps, s_T, s_I, relevance draws, resolution:
    the model card's where it sets them), so that a panel shows the values an edit runs with when
    none are given."""
    return {
        "event": "ready",
        "protocol": PROTOCOL_VERSION,
        "model": editor.model_info.to_dict(),
        "precision": editor.precision,
        "backend": editor.backend_info,
        "native_resolution": editor.native_resolution,
        "defaults": editor.sampling(),
    }


def serve(editor, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """Serve one client on stdin/stdout until ``shutdown``, end of input or SIGTERM."""
    worker, client = Worker(editor), Client(stdout)
    try:
        with _sigterm_interrupts():
            client.emit(ready_event(editor))
            threading.Thread(target=worker.read, args=(stdin, client), daemon=True).start()
            worker.loop()
    finally:
        worker.close()
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
    listener = _listen(path)
    stopping = threading.Event()
    accepting = threading.Thread(target=_accept, args=(listener, worker, stopping), daemon=True)
    accepting.start()
    try:
        with _sigterm_interrupts():
            worker.loop()
    except KeyboardInterrupt:
        pass  # SIGTERM or Ctrl-C: how a shared worker is stopped (a running job leaves nothing)
    finally:
        stopping.set()
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept thread
        listener.close()
        path.unlink(missing_ok=True)
        # The threads that hold the worker end before this one returns: the model is freed by
        # this thread, never by a daemon thread cut off in the middle as the interpreter exits.
        accepting.join(SHUTDOWN_JOIN_S)
        worker.hang_up()
        with worker.condition:
            readers = list(worker.readers)
        for reader in readers:
            reader.join(SHUTDOWN_JOIN_S)
        worker.close()
    return 0


def _listen(path: Path) -> socket.socket:
    """A socket that listens at ``path``: born 0600 (no window where others can connect), and
    linked under its name only once it listens, so that a client never finds it refusing."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = path.with_name(f"{path.name}~")
    bound = False
    previous_mask = os.umask(0o177)
    try:
        listener.bind(str(staging))
        bound = True
        listener.listen()
        os.link(staging, path)
    except OSError as error:
        listener.close()
        raise ParameterError(
            f"cannot serve at {path.name} ({error.strerror}); another worker may be starting there."
        ) from None
    finally:
        os.umask(previous_mask)
        if bound:
            staging.unlink(missing_ok=True)
    return listener


def _error_name(error: Exception) -> str:
    """The error number's name (``EMFILE``), else the exception's class name."""
    number = getattr(error, "errno", None)
    return (
        errno.errorcode[number]
        if isinstance(number, int) and number in errno.errorcode
        else type(error).__name__
    )


def _accept(listener: socket.socket, worker: Worker, stopping: threading.Event) -> None:
    """Accept thread: survives every failing ``accept`` (out of descriptors, an aborted
    connection), logging each run of one error once, by its name."""
    failing = None
    while not stopping.is_set():
        try:
            connection, _address = listener.accept()
        except OSError as error:
            if stopping.is_set():
                return
            name = _error_name(error)
            if name != failing:
                logger.warning("accept failed (%s); retrying every %.1f s", name, ACCEPT_BACKOFF_S)
                failing = name
            time.sleep(ACCEPT_BACKOFF_S)
            continue
        failing = None
        try:
            _welcome(connection, worker)
        except (OSError, RuntimeError) as error:  # RuntimeError: no thread could be started
            logger.warning(
                "could not serve a new client (%s)",
                _error_name(error),
            )
            connection.close()


def _welcome(connection: socket.socket, worker: Worker) -> None:
    """A new connection: refused unless its user is ours (or root) and a client slot is free;
    otherwise it hears ``ready`` and gets its own reader and writer threads."""
    if not trusted_uid(peer_uid(connection)):
        logger.warning("refused a client of another user")
        connection.close()
        return
    client = SocketClient(connection)
    if not worker.admit(client):
        client.emit(
            _error(
                f"the shared worker serves at most {MAX_CLIENTS} clients at a time; "
                "try again when one has closed.",
                ResourceError,
            )
        )
        client.close()
        return
    client.emit(ready_event(worker.editor))
    reader = connection.makefile("rb")
    thread = threading.Thread(target=_read_client, args=(worker, reader, client), daemon=True)
    with worker.condition:
        worker.readers.add(thread)
    try:
        thread.start()
    except RuntimeError:
        with worker.condition:
            worker.readers.discard(thread)
        reader.close()
        worker.drop(client)
        raise


def _read_client(worker: Worker, reader: BinaryIO, client: SocketClient) -> None:
    try:
        with reader:
            worker.read(read_lines(reader), client, shared=True)
    finally:
        with worker.condition:
            worker.readers.discard(threading.current_thread())


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
