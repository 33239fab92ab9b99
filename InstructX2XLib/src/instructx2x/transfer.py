"""Files carried over the worker's own connection, for a shared worker on another machine.

A panel that talks to ``instructx2x serve --socket`` through an SSH-forwarded socket shares
no folder with the worker. With ``"transfer": true`` on a job, the files travel inside the
protocol instead of by path:

1. the client sends each input file (radiograph, edit mask, keep mask, reference mask) as
   ``upload`` requests of at most ``CHUNK_BYTES`` each (base64, so that a line stays under
   the worker's line limit)::

       {"type": "upload", "id": "7:input", "name": "input.dcm", "offset": 0,
        "data": "<base64>", "final": false}

   The worker appends each chunk to a file of that name in the client's private folder
   (``Inbox``), answers ``uploaded`` once the final chunk is in, and refuses a name that is
   not a plain file name, a chunk that does not continue the file (``offset`` an integer,
   ``final`` a boolean), data that is not base64, more than ``MAX_CLIENT_FILES`` files or more
   than ``MAX_CLIENT_BYTES`` at once, and any chunk that would take the uploaded files of all
   the worker's clients together over ``MAX_WORKER_BYTES`` (``UploadBudget``); a refused
   file is removed;
2. the job names those files instead of paths (``localize_job``). When it is sent, the worker
   moves them out of the uploads into a folder of the job's own (``Inbox.take``): the job runs
   on the bytes uploaded before it was sent, whatever is uploaded under those names while it
   waits (a later job sends its files again). Its results are written in the client's folder on
   the worker, then sent back as ``file`` events of the same shape (``file_events``) before
   ``done``, and removed from the worker; the job's own files go when it ends, or is dropped
   before it starts;
3. the client writes them into a staging folder beside the output it asked for
   (``Downloads``: at most ``MAX_RESULT_FILES`` files and ``MAX_CLIENT_BYTES``, the files
   ``done`` lists and no others) and renames it to that output when ``done`` arrives: the
   results appear whole, at the path the panel chose, or not at all.

Every client's folder lies in the worker's own folder (``worker_folder``:
``instructx2x-worker-<pid>`` in the temporary folder, mode 0700), removed when the client
goes; a worker's folder left by one that was killed is removed when the next one starts. A
transferred job cannot push to a PACS or name a classifier folder (both would be the worker's,
not the panel's). Standard library only: the panels import it in Slicer's own Python.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from .errors import InputNotFoundError, ParameterError, ResourceError
from .staging import process_alive, staging_prefix

__all__ = [
    "CHUNK_BYTES",
    "MAX_CLIENT_BYTES",
    "MAX_CLIENT_FILES",
    "MAX_WORKER_BYTES",
    "MAX_RESULT_FILES",
    "JOB_FILE_FIELDS",
    "UPLOAD_SUFFIXES",
    "check_file_name",
    "upload_name",
    "worker_folder",
    "chunk_messages",
    "upload_requests",
    "file_events",
    "UploadBudget",
    "Inbox",
    "localize_job",
    "Downloads",
]

CHUNK_BYTES = 512 * 1024  # ~700 KB once in base64: a message stays under serve.MAX_LINE_BYTES
MAX_CLIENT_BYTES = 256 * 1024 * 1024  # what one client's uploaded files may hold at once
MAX_CLIENT_FILES = 8
MAX_WORKER_BYTES = 1024 * 1024 * 1024  # what the uploaded files of all a worker's clients may hold at once
MAX_RESULT_FILES = 64  # what one job's results may hold on the panel's side
JOB_FILE_FIELDS = ("input", "mask", "keep_mask", "reference_mask")
# the suffixes the library reads by (a mask's format); any other file goes by its content
UPLOAD_SUFFIXES = (".dcm", ".png", ".jpg", ".jpeg", ".npy", ".nrrd")
WORKER_FOLDER_PREFIX = "instructx2x-worker-"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_CLASSIFIER_SETS = (None, "auto", "cohort-v2", "torchxrayvision")


def check_file_name(name: object) -> str:
    """A plain file name (letters, digits, ``._-``, at most 64, not starting with a dot).

    Raises
    ------
    ParameterError
        For anything else: a path, an empty or hidden name, another type.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ParameterError(f"a transferred file needs a plain file name, got {str(name)[:80]!r}.")
    return name


def upload_name(field: str, path: Path) -> str:
    """The name a job's file travels under: its field, and its suffix where the library reads
    by it (``input.dcm``, ``keep_mask.npy``; ``input`` for a DICOM file named by its UID)."""
    suffix = Path(path).suffix.lower()
    return field + (suffix if suffix in UPLOAD_SUFFIXES else "")


def worker_folder(root: Path | None = None) -> Path:
    """This worker's folder for its clients' files (``instructx2x-worker-<pid>``, 0700), made
    after removing those of workers that no longer run."""
    root = Path(root or tempfile.gettempdir())
    for stale in root.glob(f"{WORKER_FOLDER_PREFIX}*"):
        pid = stale.name[len(WORKER_FOLDER_PREFIX) :]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)) and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    folder = root / f"{WORKER_FOLDER_PREFIX}{os.getpid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def chunk_messages(path: Path, name: str, fields: dict) -> Iterator[dict]:
    """``path`` as messages of ``fields`` plus name, offset, base64 data and final (one message
    for an empty file)."""
    check_file_name(name)
    size = path.stat().st_size
    with path.open("rb") as stream:
        offset = 0
        while True:
            data = stream.read(CHUNK_BYTES)
            final = offset + len(data) >= size
            yield {
                **fields,
                "name": name,
                "offset": offset,
                "data": base64.b64encode(data).decode("ascii"),
                "final": final,
            }
            offset += len(data)
            if final:
                return


def upload_requests(path: Path, name: str, request_id: str) -> Iterator[dict]:
    """The ``upload`` requests that send ``path`` to the worker as ``name``."""
    return chunk_messages(path, name, {"type": "upload", "id": request_id})


def file_events(folder: Path, names: list[str], request_id: str) -> Iterator[dict]:
    """The ``file`` events that send a job's result files back to its client."""
    for name in names:
        yield from chunk_messages(folder / name, name, {"id": request_id, "event": "file"})


def _chunk(message: dict, written: int) -> tuple[str, bytes, bool]:
    """The checked name, data and final flag of an upload or file message."""
    name = check_file_name(message.get("name"))
    offset = message.get("offset")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset != written:
        raise ParameterError(
            f"{name}: a chunk at offset {str(offset)[:20]!r} does not follow byte {written}."
        )
    if not isinstance(message.get("final"), bool):
        raise ParameterError(f"{name}: a chunk's final must be true or false.")
    text = message.get("data")
    if not isinstance(text, str):
        raise ParameterError(f"{name}: a chunk's data must be base64 text.")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ParameterError(f"{name}: a chunk's data is not base64.") from None
    if len(data) > CHUNK_BYTES:
        raise ParameterError(f"{name}: a chunk holds at most {CHUNK_BYTES} bytes.")
    return name, data, message["final"]


class UploadBudget:
    """The bytes that the uploaded files of all a worker's clients hold together, at most
    ``MAX_WORKER_BYTES``; their inboxes count them in and out. Thread-safe: each client uploads
    on a thread of its own."""

    def __init__(self) -> None:
        self.used = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> bool:
        """Count ``size`` more bytes in; False, counting nothing, when that would pass
        ``MAX_WORKER_BYTES``."""
        with self._lock:
            if self.used + size > MAX_WORKER_BYTES:
                return False
            self.used += size
            return True

    def give_back(self, size: int) -> None:
        """Count ``size`` bytes out (their files are removed)."""
        with self._lock:
            self.used -= size


class Inbox:
    """One client's private folder on the worker (mode 0700): its uploaded files, the files its
    jobs took (``take``) and its jobs' results until they are sent. Uploaded and taken files
    count against ``MAX_CLIENT_BYTES`` and the worker's ``budget`` until they are removed;
    ``close`` removes everything. Thread-safe: the client's reader stores uploads and sends jobs
    while the worker runs one of them."""

    def __init__(self, root: Path | None = None, budget: UploadBudget | None = None) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="instructx2x-client-", dir=root))
        self.budget = budget or UploadBudget()
        self.files: dict[str, int] = {}  # name -> bytes received
        self.complete: set[str] = set()
        self.jobs: dict[Path, int] = {}  # a job's folder of files (``take``) -> their bytes
        self._lock = threading.Lock()

    def receive(self, request: dict) -> dict | None:
        """Store one ``upload`` chunk; the ``uploaded`` event once the file is whole.

        Raises
        ------
        ParameterError
            A bad name, offset or data (the file so far is removed).
        ResourceError
            Over ``MAX_CLIENT_FILES`` files or ``MAX_CLIENT_BYTES`` bytes, or over the worker's
            ``MAX_WORKER_BYTES`` for all its clients (the file so far is removed).
        """
        name = check_file_name(request.get("name"))
        uploads = self.folder / "uploads"
        with self._lock:
            if request.get("offset") == 0:  # a new file, or a name sent again: it starts over
                self._forget(name)
                if len(self.files) >= MAX_CLIENT_FILES:
                    raise ResourceError(f"at most {MAX_CLIENT_FILES} uploaded files at a time.")
            try:
                name, data, final = _chunk(request, self.files.get(name, 0))
                if name in self.complete:
                    raise ParameterError(f"{name} is complete; send it again from offset 0.")
                if self._held() + len(data) > MAX_CLIENT_BYTES:
                    raise ResourceError(
                        f"{name}: the uploaded files would exceed {MAX_CLIENT_BYTES // (1024 * 1024)} MiB."
                    )
                if not self.budget.take(len(data)):
                    raise ResourceError(
                        f"{name}: the worker's uploaded files, all its clients' together, would exceed "
                        f"{MAX_WORKER_BYTES // (1024 * 1024)} MiB; send it again when other jobs have ended."
                    )
                self.files[name] = self.files.get(name, 0) + len(data)
                uploads.mkdir(exist_ok=True)
                with (uploads / name).open("ab") as stream:
                    stream.write(data)
            except (ParameterError, ResourceError):
                self._forget(name)
                raise
            except OSError as error:
                self._forget(name)
                raise ResourceError(
                    f"cannot store {name} on the worker: {error.strerror or error}."
                ) from None
            if not final:
                return None
            self.complete.add(name)
            return {"event": "uploaded", "name": name, "bytes": self.files[name]}

    def take(self, names: list[str], request_id: str) -> Path:
        """Move the whole uploaded files ``names`` into a new folder of one job's own, returned:
        the job keeps the bytes it was sent with, and the names are free for new uploads. The
        files count until ``release``.

        Raises
        ------
        InputNotFoundError
            When a name is not a whole uploaded file (nothing is moved).
        ResourceError
            When a file cannot be moved (the job's folder is removed).
        """
        with self._lock:
            for name in names:
                if name not in self.complete:
                    raise InputNotFoundError(
                        f"{name} was not uploaded (or not completely); upload it before the job."
                    )
            folder = _unused(self.folder / "jobs", request_id)
            self.jobs[folder] = 0
            try:
                folder.mkdir(parents=True)
                for name in dict.fromkeys(names):
                    (self.folder / "uploads" / name).rename(folder / name)
                    self.complete.discard(name)
                    self.jobs[folder] += self.files.pop(name)
            except OSError as error:
                self._release(folder)
                raise ResourceError(
                    f"cannot keep the job's files on the worker: {error.strerror or error}."
                ) from None
            return folder

    def release(self, job: dict) -> None:
        """Remove the files a job took (``localize_job``'s job: the folder its files lie in,
        when that is one of this inbox's): the job ended, or will never run."""
        folders = {Path(job[field]).parent for field in JOB_FILE_FIELDS if isinstance(job.get(field), str)}
        with self._lock:
            for folder in folders:
                self._release(folder)

    def results(self, request_id: str) -> Path:
        """A new folder name, not yet made, for one job's results."""
        (self.folder / "results").mkdir(exist_ok=True)
        return _unused(self.folder / "results", request_id)

    def close(self) -> None:
        """Remove the folder and everything in it (the client is gone)."""
        with self._lock:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.budget.give_back(self._held())
            self.files.clear()
            self.complete.clear()
            self.jobs.clear()

    def _held(self) -> int:
        return sum(self.files.values()) + sum(self.jobs.values())

    def _forget(self, name: str) -> None:
        (self.folder / "uploads" / name).unlink(missing_ok=True)
        self.budget.give_back(self.files.pop(name, 0))
        self.complete.discard(name)

    def _release(self, folder: Path) -> None:
        size = self.jobs.pop(folder, None)
        if size is not None:
            shutil.rmtree(folder, ignore_errors=True)
            self.budget.give_back(size)


def _unused(parent: Path, request_id: str) -> Path:
    """A name in ``parent``, not yet taken, for one job's folder."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", request_id)[:64]
    index = 0
    while (parent / f"{safe}-{index}").exists():
        index += 1
    return parent / f"{safe}-{index}"


def localize_job(job: dict, inbox: Inbox, request_id: str) -> dict:
    """A transferred job's fields as it is sent: the uploads it names taken into a folder of its
    own (``Inbox.take``) and named by their paths there, and no output (``Inbox.results`` gives
    it one when it runs). ``Inbox.release`` removes its files.

    Raises
    ------
    ParameterError
        A PACS push or a classifier folder asked of a transferred job, or a file name that is
        not a plain one.
    InputNotFoundError
        A file it names was not uploaded.
    """
    if job.get("push_cstore") or job.get("push_stow"):
        raise ParameterError(
            "a job sent with its files cannot push to a PACS from the worker; push from the panel."
        )
    if job.get("verify") not in _CLASSIFIER_SETS:
        raise ParameterError(
            "a job sent with its files verifies with a built-in classifier set (auto, cohort-v2 or torchxrayvision), not a folder."
        )
    names = {field: check_file_name(job[field]) for field in JOB_FILE_FIELDS if job.get(field) is not None}
    local = {key: value for key, value in job.items() if key != "output"}
    if names:
        folder = inbox.take(list(names.values()), request_id)
        local.update({field: str(folder / name) for field, name in names.items()})
    return local


class Downloads:
    """The client's side of a transferred job's results: each job's files go into a staging
    folder beside the output it asked for (``staging.staging_prefix``: a later writer of that
    output removes one left by a killed process), which becomes the output when the job is
    done."""

    def __init__(self) -> None:
        self.outputs: dict[str, Path] = {}
        self.staging: dict[str, Path] = {}
        self.sizes: dict[str, dict[str, int]] = {}
        self.failures: dict[str, str] = {}
        self.upload_failures: dict[str, str] = {}  # an upload the worker refused, by job

    def expect(self, request_id: str, output: Path) -> None:
        """Results of ``request_id`` go to ``output`` (which must not exist)."""
        output = Path(os.path.abspath(output))
        if os.path.lexists(output):
            raise ParameterError(f"output folder {output.name} already exists; choose a new one.")
        self.outputs[request_id] = output

    def receive(self, event: dict) -> None:
        """Write one ``file`` chunk; a bad one marks the job failed (said at ``done``)."""
        request_id = str(event.get("id"))
        if request_id not in self.outputs or request_id in self.failures:
            return
        try:
            folder = self.staging.get(request_id)
            if folder is None:
                output = self.outputs[request_id]
                output.parent.mkdir(parents=True, exist_ok=True)
                folder = Path(tempfile.mkdtemp(prefix=staging_prefix(output), dir=output.parent))
                self.staging[request_id] = folder
            sizes = self.sizes.setdefault(request_id, {})
            name, data, _final = _chunk(event, sizes.get(str(event.get("name")), 0))
            if name not in sizes and len(sizes) >= MAX_RESULT_FILES:
                raise ParameterError(f"more than {MAX_RESULT_FILES} result files")
            if sum(sizes.values()) + len(data) > MAX_CLIENT_BYTES:
                raise ParameterError(f"results over {MAX_CLIENT_BYTES // (1024 * 1024)} MiB")
            with (folder / name).open("ab") as stream:
                stream.write(data)
            sizes[name] = sizes.get(name, 0) + len(data)
        except ParameterError as error:
            self.failures[request_id] = f"the worker sent a damaged result file ({error})"
        except OSError as error:
            self.failures[request_id] = f"cannot write the results here: {error.strerror or error}"

    def finish(self, event: dict) -> dict:
        """The ``done`` event with ``output`` the folder the job asked for, now holding every
        file the event lists; an ``error`` event if any is missing or was damaged."""
        request_id = str(event.get("id"))
        output, folder = self.outputs.pop(request_id), self.staging.pop(request_id, None)
        sizes, failure = self.sizes.pop(request_id, {}), self.failures.pop(request_id, None)
        self.upload_failures.pop(request_id, None)
        listed = event.get("files")
        files: list[str] = []
        if isinstance(listed, list) and all(isinstance(name, str) for name in listed):
            files = listed
        elif failure is None:
            failure = "the worker's done event does not list its files"
        missing = [name for name in files if name not in sizes]
        if failure is None and missing:
            failure = f"the worker did not send {', '.join(missing[:3])}"
        if failure is None:
            try:
                if folder is None:  # a job with no files
                    output.mkdir(parents=True)
                else:
                    for name in set(sizes) - set(files):  # sent, but not the job's
                        (folder / name).unlink()
                    folder.rename(output)
                    folder = None
            except OSError as error:
                failure = f"cannot write the output folder {output.name}: {error.strerror or error}"
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        if failure is not None:
            return {"id": request_id, "event": "error", "kind": "WorkerError", "message": failure + "."}
        return {**event, "output": str(output)}

    def discard(self, request_id: str | None = None) -> None:
        """Drop what arrived for one job (all jobs with None): it failed, was cancelled, or the
        worker is gone."""
        for key in [request_id] if request_id is not None else list(self.outputs):
            self.outputs.pop(key, None)
            self.upload_failures.pop(key, None)
            self.sizes.pop(key, None)
            self.failures.pop(key, None)
            folder = self.staging.pop(key, None)
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
