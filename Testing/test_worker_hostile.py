"""The shared worker (``instructx2x serve --socket``) against hostile or broken clients, and the
panels' client against a worker it must not trust: every attack runs on a real worker process
with raw socket clients."""

import base64
import contextlib
import io
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from workers import poll_until

from instructx2x.serve import ACCEPT_BACKOFF_S, MAX_CLIENTS, MAX_LINE_BYTES
from InstructX2XModuleLib.worker import WorkerClient, WorkerError, WorkerState

LONG = 1000  # denoising steps: minutes on the CPU, so a job that is not cancelled shows
NOBODY = 65534  # another user, for the peer checks
as_another_user = pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")


class Peer:
    """A raw client: JSON lines over the worker's Unix socket."""

    def __init__(self, path, timeout: float = 30) -> None:
        self.socket = socket.socket(socket.AF_UNIX)
        self.socket.settimeout(timeout)
        self.socket.connect(str(path))
        self.reader = self.socket.makefile("rb")

    def send(self, request: dict) -> None:
        self.socket.sendall((json.dumps(request) + "\n").encode())

    def event_or_end(self) -> dict | None:
        """The next event, or None when the worker has closed the connection."""
        line = self.reader.readline()
        return json.loads(line) if line else None

    def event(self) -> dict:
        """The next event; the worker must not have closed the connection."""
        event = self.event_or_end()
        assert event is not None, "the worker closed the connection"
        return event

    def until(self, request_id: str, within: float = 30) -> list[dict]:
        """Events until ``request_id`` ends, which must happen ``within`` seconds."""
        events: list[dict] = []
        deadline = time.monotonic() + within
        while (
            not events
            or events[-1].get("id") != request_id
            or events[-1]["event"] not in ("done", "error", "cancelled")
        ):
            self.socket.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                event = self.event_or_end()
            except TimeoutError:
                raise AssertionError(f"{request_id} did not end within {within} s: {events}") from None
            assert event is not None, f"the worker closed the connection: {events}"
            events.append(event)
        return events

    def closed(self, within: float = 10) -> bool:
        """Whether the worker ends the connection within ``within`` seconds (what it sent before
        is read and dropped)."""
        self.socket.settimeout(within)
        try:
            while self.reader.read1(65536):
                pass
        except ConnectionResetError:
            pass
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self.reader.close()
        self.socket.close()


class SharedWorker:
    def __init__(self, process: subprocess.Popen, path, log) -> None:
        self.process, self.path, self.log = process, path, log

    def status(self, field: str) -> int:
        """A ``/proc/PID/status`` field in KiB (``VmRSS``, ``VmHWM``)."""
        with open(f"/proc/{self.process.pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(f"{field}:"))


@contextlib.contextmanager
def serving(folder: Path, prelude: str = ""):
    """A real worker in ``folder`` (its stderr in a file), with ``prelude`` run before its CLI;
    it must still serve at the end."""
    path, log = folder / "worker.sock", folder / "worker.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"{prelude}\nfrom instructx2x.cli import main\nraise SystemExit(main())",
                "serve",
                "--socket",
                str(path),
                "--model",
                "untrained-tiny",
                "--device",
                "cpu",
            ],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 120
        while not path.exists():
            assert process.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "the shared worker did not start within 120 s"
            time.sleep(0.05)
        yield SharedWorker(process, path, log)
        assert process.poll() is None, f"a test took the worker down: {log.read_text()[-2000:]}"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()[-2000:]
    assert "Traceback" not in log.read_text(), log.read_text()[-2000:]


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """One real worker for the module; every test leaves it serving."""
    with serving(tmp_path_factory.mktemp("shared")) as shared:
        yield shared


@pytest.fixture(scope="module")
def film(tmp_path_factory):
    yy, xx = np.mgrid[0:72, 0:64]
    path = tmp_path_factory.mktemp("input") / "film.png"
    Image.fromarray((127 + 90 * np.sin(yy / 7) * np.cos(xx / 5)).astype(np.uint8)).save(path)
    return path


def job(film, output, steps=2):
    return {
        "input": str(film),
        "output": str(output),
        "parameters": {
            "instruction": "Add the finding of left pleural effusion",
            "num_inference_steps": steps,
            "resolution": 64,
        },
    }


def ready(peer: Peer) -> Peer:
    assert peer.event()["event"] == "ready"
    return peer


def test_a_client_that_stops_reading_delays_no_one(worker, film, tmp_path):
    """A client that sends a job and floods requests but reads nothing fills its own queue and
    is disconnected; its job stops and the next client's preview runs at once."""
    other = ready(Peer(worker.path))
    stalled = Peer(worker.path)
    try:
        stalled.send({"type": "edit", "id": "s", "job": job(film, tmp_path / "stalled", LONG)})
        with pytest.raises((BrokenPipeError, ConnectionResetError)):  # cut off on the way
            for _ in range(50):
                stalled.socket.sendall(b"junk\n" * 4000)  # each line earns an error event
        other.send({"type": "preview", "id": "p", "job": job(film, tmp_path / "preview")})
        assert other.until("p")[-1]["event"] == "done"
        assert stalled.closed()
    finally:
        stalled.close()
        other.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preview"]


@pytest.mark.parametrize("leave", ["reset", "not utf-8", "end of input"])
def test_a_client_that_goes_mid_job_has_it_cancelled_and_nothing_written(worker, film, tmp_path, leave):
    """The job of a client whose connection breaks (reset: it closes with unread events),
    sends bytes that are not text, or closes its side stops at once: the next client's job
    runs, and neither the output folder nor a staging folder remains."""
    other = ready(Peer(worker.path))
    leaving = Peer(worker.path)
    try:
        leaving.send({"type": "edit", "id": "1", "job": job(film, tmp_path / "left", LONG)})
        seen = b""
        while b'"progress"' not in seen:  # peeked: the events stay unread
            seen = leaving.socket.recv(1 << 16, socket.MSG_PEEK)
        other.send({"type": "preview", "id": "next", "job": job(film, tmp_path / "next")})
        if leave == "reset":
            leaving.close()
        elif leave == "not utf-8":
            leaving.socket.sendall(b'{"type": "cancel", "id": "\xff"}\n')
            events = []
            while (event := leaving.event_or_end()) is not None:
                events.append(event)
            assert events[-1]["event"] == "error" and "not UTF-8" in events[-1]["message"], events
        else:
            leaving.socket.shutdown(socket.SHUT_WR)
        assert other.until("next")[-1]["event"] == "done"
    finally:
        leaving.close()
        other.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["next"]


def test_the_jobs_behind_a_client_that_goes_move_up_at_once(worker, film, tmp_path):
    """A client with two waiting jobs disconnects: they are dropped, and the job behind them
    hears its new place while the running job still runs."""
    running, leaving, behind = (ready(Peer(worker.path)) for _ in range(3))
    try:
        running.send({"type": "edit", "id": "run", "job": job(film, tmp_path / "run", LONG)})
        while running.event()["event"] != "started":
            pass
        for name in ("d1", "d2"):
            leaving.send({"type": "preview", "id": name, "job": job(film, tmp_path / name)})
            assert leaving.event()["event"] == "queued"
        behind.send({"type": "preview", "id": "b", "job": job(film, tmp_path / "b")})
        assert behind.event() == {"id": "b", "event": "queued", "position": 3}
        leaving.close()
        assert behind.event() == {"id": "b", "event": "queued", "position": 1}
    finally:
        for peer in (running, leaving, behind):
            peer.close()
    assert list(tmp_path.iterdir()) == []


def test_accept_survives_running_out_of_descriptors(worker, film, tmp_path):
    """With a few descriptors left, a flood of connections makes ``accept`` fail (EMFILE); the
    worker logs it by name, keeps accepting once descriptors are free, and serves a new client."""
    pid = worker.process.pid
    limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    flood = []
    try:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{pid}/fd")) + 3, limits[1]))
        for _ in range(40):
            connection = socket.socket(socket.AF_UNIX)
            connection.connect(str(worker.path))  # the listen backlog takes those not accepted
            flood.append(connection)
        deadline = time.monotonic() + 10
        while "accept failed (EMFILE)" not in worker.log.read_text():
            assert time.monotonic() < deadline, worker.log.read_text()[-2000:]
            time.sleep(0.05)
        time.sleep(5 * ACCEPT_BACKOFF_S)  # it retries meanwhile
    finally:  # descriptors back first: the backlog's connections are then accepted, not refused again
        resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
        for connection in flood:
            connection.close()
    late = ready(Peer(worker.path))
    try:
        late.send({"type": "preview", "id": "late", "job": job(film, tmp_path / "late")})
        assert late.until("late")[-1]["event"] == "done"
    finally:
        late.close()
    assert worker.log.read_text().count("accept failed (EMFILE)") == 1  # logged once, not per retry


def test_clients_that_reset_give_their_slots_back(worker):
    """Twice as many clients as the cap connect and reset (close with their ``ready`` unread):
    each frees its slot, and the next client is served."""
    for _ in range(2 * MAX_CLIENTS):
        peer = Peer(worker.path)
        peer.socket.recv(1, socket.MSG_PEEK)  # ``ready`` has arrived and stays unread
        peer.close()
    deadline = time.monotonic() + 10
    while True:
        peer = Peer(worker.path)
        event = peer.event()
        peer.close()
        if event["event"] == "ready":
            break
        assert time.monotonic() < deadline, f"the slots of reset clients were not freed: {event}"
        time.sleep(0.1)


def _fill(path) -> tuple[list[Peer], Peer | None, dict | None]:
    """Connect until one is refused (or one more than the limit is in)."""
    peers: list[Peer] = []
    for _ in range(MAX_CLIENTS + 1):
        peer = Peer(path)
        event = peer.event()
        if event["event"] != "ready":
            return peers, peer, event
        peers.append(peer)
    return peers, None, None


def test_one_client_over_the_cap_hears_the_limit_and_is_closed(worker):
    peers: list[Peer] = []
    refused: Peer | None = None
    event: dict | None = None
    try:
        for _attempt in range(20):  # clients of the tests before may still be leaving
            peers, refused, event = _fill(worker.path)
            if len(peers) >= MAX_CLIENTS:
                break
            assert refused is not None  # short of the limit: one was refused
            for peer in peers + [refused]:
                peer.close()
            time.sleep(0.25)
        assert len(peers) == MAX_CLIENTS == 16 and refused is not None
        assert event is not None
        assert event["event"] == "error" and event["kind"] == "ResourceError"
        assert "at most 16 clients" in event["message"]
        assert refused.closed()
        peers.pop().close()  # a slot frees: the next one is served
        deadline = time.monotonic() + 10
        while True:
            peer = Peer(worker.path)
            if peer.event()["event"] == "ready":
                peers.append(peer)
                break
            peer.close()
            assert time.monotonic() < deadline, "no slot freed within 10 s"
            time.sleep(0.1)
    finally:
        for peer in peers + ([refused] if refused is not None else []):
            peer.close()


def test_a_client_may_keep_only_so_many_jobs_waiting(worker, film, tmp_path):
    """With one job running, a client's ninth waiting job is refused: one client cannot fill the
    worker's memory with queued requests."""
    from instructx2x.serve import MAX_WAITING_PER_CLIENT

    greedy = ready(Peer(worker.path))
    try:
        greedy.send({"type": "edit", "id": "run", "job": job(film, tmp_path / "run", LONG)})
        while greedy.event()["event"] != "started":
            pass
        for index in range(MAX_WAITING_PER_CLIENT + 1):
            greedy.send({"type": "preview", "id": f"w{index}", "job": job(film, tmp_path / f"w{index}")})
        refused = greedy.until(f"w{MAX_WAITING_PER_CLIENT}")
        queued = [e["id"] for e in refused if e["event"] == "queued"]
        assert (
            queued == [f"w{index}" for index in range(MAX_WAITING_PER_CLIENT)] and MAX_WAITING_PER_CLIENT == 8
        )
        assert refused[-1]["event"] == "error" and refused[-1]["kind"] == "ResourceError"
        assert "8 of your jobs already wait" in refused[-1]["message"]
    finally:
        greedy.close()  # its running and waiting jobs go with it
    assert list(tmp_path.iterdir()) == []


def test_an_over_long_line_is_refused_with_bounded_memory(worker):
    """64 MiB with no newline: the worker reads at most the limit, answers with an error naming
    it and closes; its peak memory grows by far less than what was sent."""
    resident = worker.status("VmRSS")
    with open(f"/proc/{worker.process.pid}/clear_refs", "w") as refs:
        refs.write("5")  # restart the peak (VmHWM) from the resident size now
    peer = ready(Peer(worker.path))
    sent = []

    def flood():
        try:
            for _ in range(64):
                peer.socket.sendall(b"a" * (1 << 20))
                sent.append(1)
        except OSError:  # cut off
            pass

    sender = threading.Thread(target=flood)
    sender.start()
    try:
        event = peer.event()
        assert event["event"] == "error" and f"longer than {MAX_LINE_BYTES} bytes" in event["message"]
        assert peer.closed()
        sender.join(timeout=30)
        assert not sender.is_alive() and len(sent) < 64
    finally:
        peer.close()
    assert (worker.status("VmHWM") - resident) < 16 * 1024, (resident, worker.status("VmHWM"))


class FakeWorker:
    """A worker of our own user that sends ``done`` events naming the folders it chooses."""

    def __init__(self, path, outputs: list[str]) -> None:
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen()
        self.outputs = outputs
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        connection, _ = self.listener.accept()
        with connection, connection.makefile("rb") as requests:
            connection.sendall(b'{"event": "ready", "protocol": 1}\n')
            for output in self.outputs:
                request = json.loads(requests.readline())
                done = {"id": request["id"], "event": "done", "output": output, "files": ["edit_mask.npy"]}
                connection.sendall((json.dumps(done) + "\n").encode())
            requests.readline()


def test_the_client_refuses_a_done_outside_the_folder_it_asked_for(tmp_path):
    asked = tmp_path / "asked"
    fake = FakeWorker(
        tmp_path / "fake.sock", [str(tmp_path / "elsewhere"), str(asked / ".." / "elsewhere"), str(asked)]
    )
    client = WorkerClient("the worker's", socket_path=str(tmp_path / "fake.sock"), transfer=False)
    client.start()
    try:
        poll_until(client, lambda e: client.state is WorkerState.READY, timeout=10)
        for _ in range(2):
            request_id = client.submit("rethreshold", preview="1", tau=0.3, output=str(asked))
            events = poll_until(client, lambda e: client.state is WorkerState.READY, timeout=10)
            assert events[-1]["event"] == "error" and events[-1]["id"] == request_id
            assert client.last_error is not None and "outside the output folder" in client.last_error
        request_id = client.submit("rethreshold", preview="1", tau=0.3, output=str(asked))
        events = poll_until(client, lambda e: client.state is WorkerState.READY, timeout=10)
        assert events[-1] == {**events[-1], "id": request_id, "event": "done", "output": str(asked)}
    finally:
        client.shutdown()
        fake.listener.close()


FOREIGN_WORKER = """
import os, socket, sys, time
listener = socket.socket(socket.AF_UNIX)
listener.bind(sys.argv[1])
os.setgroups([]); os.setgid(NOBODY); os.setuid(NOBODY)
listener.listen()  # the peer credentials a client sees are those of the listen() call
print("listening", flush=True)
connection, _ = listener.accept()
connection.sendall(b'{"event": "ready", "protocol": 1}\\n')
time.sleep(30)
""".replace("NOBODY", str(NOBODY))


@as_another_user
def test_the_client_refuses_a_worker_of_another_user(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-c", FOREIGN_WORKER, str(tmp_path / "foreign.sock")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == "listening\n"
        client = WorkerClient("the worker's", socket_path=str(tmp_path / "foreign.sock"))
        with pytest.raises(WorkerError, match=f"runs as another user \\(uid {NOBODY}"):
            client.start()
        assert client.state is WorkerState.IDLE and client.connection is None
    finally:
        process.kill()
        process.wait(timeout=10)


FOREIGN_CLIENT = """
import os, socket, sys
os.chdir(sys.argv[1])
if sys.argv[2] == "other":
    os.setgroups([]); os.setgid(NOBODY); os.setuid(NOBODY)
connection = socket.socket(socket.AF_UNIX)
connection.settimeout(20)
connection.connect("worker.sock")
answer = b""
while not answer.endswith(b"\\n") and (chunk := connection.recv(65536)):
    answer += chunk
print(answer.decode().strip() or "closed")
""".replace("NOBODY", str(NOBODY))


@as_another_user
def test_the_worker_refuses_a_client_of_another_user(worker):
    """Even where the socket's mode lets another user connect, the worker closes the
    connection unanswered; our own user (here root) is served through the same path."""
    folder = worker.path.parent
    try:
        folder.chmod(0o711)
        worker.path.chmod(0o666)
        answers = {
            user: subprocess.run(
                [sys.executable, "-c", FOREIGN_CLIENT, str(folder), user],
                check=True,
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout.strip()
            for user in ("other", "ours")
        }
    finally:
        worker.path.chmod(0o600)
        folder.chmod(0o700)
    assert answers["other"] == "closed"
    assert json.loads(answers["ours"])["event"] == "ready"
    assert "refused a client of another user" in worker.log.read_text()


# -- files sent over the connection (``"transfer": true``) ------------------------------------


def client_folders() -> set[str]:
    """The shared workers' folders for their clients' files (in the temporary folder)."""
    return {
        str(path.relative_to(tempfile.gettempdir()))
        for path in Path(tempfile.gettempdir()).glob("instructx2x-worker-*/instructx2x-client-*")
    }


def upload(peer: Peer, request_id: str, name: str, data: bytes, offset: int = 0, final: bool = True) -> None:
    peer.send(
        {
            "type": "upload",
            "id": request_id,
            "name": name,
            "offset": offset,
            "data": base64.b64encode(data).decode(),
            "final": final,
        }
    )


def test_a_transferred_job_runs_on_the_uploaded_film_and_sends_its_results_back(worker, film, tmp_path):
    peer = ready(Peer(worker.path))
    before = client_folders()
    upload(peer, "u1", "input.png", film.read_bytes())
    assert peer.event() == {
        "id": "u1",
        "event": "uploaded",
        "name": "input.png",
        "bytes": film.stat().st_size,
    }
    request = job("input.png", "ignored")
    peer.send({"type": "preview", "id": "p", "job": request, "transfer": True})
    events = peer.until("p", within=120)
    done = events[-1]
    assert done["event"] == "done" and done["output"] == ""
    sent: dict[str, bytes] = {}
    for event in events:
        if event["event"] == "file":
            assert event["offset"] == len(sent.get(event["name"], b""))
            sent[event["name"]] = sent.get(event["name"], b"") + base64.b64decode(event["data"])
    assert set(sent) == set(done["files"]) and "edit_mask.npy" in sent
    mask = np.load(io.BytesIO(sent["edit_mask.npy"]))
    assert mask.shape == (72, 64) and mask.dtype == bool
    # a re-cut of the cached preview comes back the same way, nothing written at a client's path
    peer.send({"type": "rethreshold", "id": "r", "preview": "p", "tau": 0.5, "transfer": True})
    events = peer.until("r")
    assert [e["name"] for e in events if e["event"] == "file" and e["final"]] == [
        "edit_mask.npy",
        "edit_mask.png",
    ]
    assert not (tmp_path / "ignored").exists() and not Path("ignored").exists()
    (mine,) = client_folders() - before
    assert not (Path(tempfile.gettempdir()) / mine / "uploads" / "input.png").exists()  # the job's uploads go
    assert list((Path(tempfile.gettempdir()) / mine / "jobs").iterdir()) == []
    assert all(e.get("output") in (None, "") for e in events)  # the worker's folders are not told
    peer.close()
    deadline = time.monotonic() + 10
    while mine in client_folders() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mine not in client_folders()  # the client's folder goes with it


@pytest.mark.parametrize(
    "name, offset, data, message",
    [
        ("../escape.png", 0, "aGk=", "plain file name"),
        ("/etc/passwd", 0, "aGk=", "plain file name"),
        (".hidden", 0, "aGk=", "plain file name"),
        ("input.png", 5, "aGk=", "does not follow byte 0"),
        ("input.png", 0, "not base64!", "not base64"),
        ("input.png", 0, 7, "base64 text"),
    ],
)
def test_an_upload_out_of_shape_is_refused_and_the_connection_serves_on(worker, name, offset, data, message):
    peer = ready(Peer(worker.path))
    peer.send({"type": "upload", "id": "u", "name": name, "offset": offset, "data": data, "final": True})
    refused = peer.event()
    assert refused["event"] == "error" and refused["id"] == "u" and message in refused["message"]
    assert refused["kind"] == "ParameterError"
    assert not Path(tempfile.gettempdir(), "escape.png").exists()
    upload(peer, "ok", "input.png", b"x")
    assert peer.event()["event"] == "uploaded"
    peer.close()


def test_a_client_can_not_use_another_clients_upload_or_a_path(worker, film, tmp_path):
    owner, other = ready(Peer(worker.path)), ready(Peer(worker.path))
    upload(owner, "u", "input.png", film.read_bytes())
    assert owner.event()["event"] == "uploaded"
    for name in ("input.png", str(film)):
        other.send({"type": "edit", "id": "e", "job": job(name, "x"), "transfer": True})
        (refused,) = other.until("e")
        assert refused["event"] == "error"
    assert "was not uploaded" in refused["message"] or "plain file name" in refused["message"]
    other.send(
        {
            "type": "edit",
            "id": "push",
            "job": {**job("input.png", "x"), "push_stow": "http://pacs/"},
            "transfer": True,
        }
    )
    assert "push" in other.until("push")[-1]["message"]
    owner.close()
    other.close()


def test_a_waiting_job_runs_on_its_files_as_they_were_when_it_was_sent(worker, film, tmp_path):
    """A job takes its uploads when it is sent: the same name uploaded again while it waits (here
    not an image) is a new file for a later job. A waiting job that is cancelled, and the job
    that runs, leave none of the files they took."""
    blocker = ready(Peer(worker.path))
    blocker.send({"type": "edit", "id": "long", "job": job(film, tmp_path / "long", LONG)})
    while blocker.event()["event"] != "started":
        pass
    peer = ready(Peer(worker.path))
    before = client_folders()
    upload(peer, "u1", "input.png", film.read_bytes())
    assert peer.event()["event"] == "uploaded"
    peer.send({"type": "preview", "id": "kept", "job": job("input.png", "x"), "transfer": True})
    assert peer.event() == {"id": "kept", "event": "queued", "position": 1}
    upload(peer, "u2", "input.png", b"not an image")
    assert peer.event()["event"] == "uploaded"
    peer.send({"type": "preview", "id": "dropped", "job": job("input.png", "x"), "transfer": True})
    assert peer.event()["event"] == "queued"
    peer.send({"type": "cancel", "id": "dropped"})
    upload(peer, "u3", "input.png", b"not an image either")
    assert peer.event()["event"] == "uploaded"
    (mine,) = client_folders() - before
    folder = Path(tempfile.gettempdir()) / mine
    assert len(list((folder / "jobs").iterdir())) == 2  # each waiting job's own files
    blocker.send({"type": "cancel", "id": "long"})
    assert blocker.until("long")[-1]["event"] == "cancelled"
    events = peer.until("kept", within=120)
    assert events[-1]["event"] == "done", events[-1]
    mask = b"".join(
        base64.b64decode(e["data"]) for e in events if e["event"] == "file" and e["name"] == "edit_mask.npy"
    )
    assert np.load(io.BytesIO(mask)).shape == (72, 64)  # the film's, not the bytes sent after
    assert peer.until("dropped")[-1]["event"] == "cancelled"
    assert list((folder / "jobs").iterdir()) == []
    assert (folder / "uploads" / "input.png").read_bytes() == b"not an image either"  # a later job's
    blocker.close()
    peer.close()


def send_file(peer: Peer, request_id: str, name: str, data: bytes) -> dict:
    """Upload ``data`` in chunks as the panel does; the worker's answer."""
    from instructx2x.transfer import CHUNK_BYTES

    for offset in range(0, len(data), CHUNK_BYTES):
        upload(
            peer,
            request_id,
            name,
            data[offset : offset + CHUNK_BYTES],
            offset,
            offset + CHUNK_BYTES >= len(data),
        )
    return peer.event()


def test_the_uploads_of_all_clients_share_one_budget(tmp_path):
    """Two clients hold at most MAX_WORKER_BYTES of uploads together (1 MiB here): a chunk over
    it is refused with a ResourceError and its file removed; the bytes come back when a job that
    took its files ends and when a client goes; both clients keep working."""
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (800, 760), np.uint8)).save(noise, "PNG")
    film = noise.getvalue()
    assert 600_000 < len(film) < 650_000  # over half the budget
    with serving(tmp_path, "from instructx2x import transfer; transfer.MAX_WORKER_BYTES = 1 << 20") as shared:
        first, second = ready(Peer(shared.path)), ready(Peer(shared.path))
        assert send_file(first, "a", "input.png", film)["event"] == "uploaded"
        upload(second, "b", "input.png", b"y" * 300_000, final=False)
        upload(second, "b", "input.png", b"y" * 300_000, offset=300_000)
        refused = second.event()
        assert refused == {**refused, "id": "b", "event": "error", "kind": "ResourceError"}, refused
        assert "all its clients' together, would exceed 1 MiB" in refused["message"]
        uploads = Path(tempfile.gettempdir(), f"instructx2x-worker-{shared.process.pid}")
        assert [p.stat().st_size for p in uploads.glob("*/uploads/*")] == [len(film)]  # the partial file went
        assert send_file(second, "c", "tiny", b"z" * 100)["event"] == "uploaded"
        first.send({"type": "preview", "id": "p", "job": job("input.png", "x"), "transfer": True})
        assert first.until("p", within=120)[-1]["event"] == "done"
        assert (
            send_file(second, "d", "big", b"y" * 700_000)["event"] == "uploaded"
        )  # the job's bytes came back
        assert send_file(first, "e", "more", b"m" * 400_000)["kind"] == "ResourceError"
        second.close()
        deadline = time.monotonic() + 10
        while (answer := send_file(first, "f", "more", b"m" * 400_000))["event"] != "uploaded":
            assert time.monotonic() < deadline, answer  # the client that went gave its bytes back
            time.sleep(0.05)
        first.close()


def test_uploads_are_bounded_per_client(worker):
    from instructx2x.transfer import MAX_CLIENT_FILES

    peer = ready(Peer(worker.path))
    for index in range(MAX_CLIENT_FILES):
        upload(peer, f"u{index}", f"f{index}", b"x")
        assert peer.event()["event"] == "uploaded"
    upload(peer, "over", "one-more", b"x")
    refused = peer.event()
    assert refused["kind"] == "ResourceError" and f"at most {MAX_CLIENT_FILES}" in refused["message"]
    upload(peer, "again", "f0", b"yy")  # a name sent again replaces its file
    assert peer.event() == {"id": "again", "event": "uploaded", "name": "f0", "bytes": 2}
    peer.close()


class ScriptedWorker:
    """A worker of our own user (protocol 2) that answers each request with ``answer(request)``:
    raw lines, as a broken or hostile worker would send them."""

    def __init__(self, path, answer, ready: bytes = b'{"event": "ready", "protocol": 2}\n') -> None:
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen()
        self.answer, self.ready = answer, ready
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        connection, _ = self.listener.accept()
        with connection, connection.makefile("rb") as requests:
            connection.sendall(self.ready)
            while line := requests.readline():
                request = json.loads(line)
                if request.get("type") in ("edit", "preview", "rethreshold"):
                    with contextlib.suppress(OSError):
                        connection.sendall(self.answer(request))


def chunk(request_id, name, data: bytes, offset=0, final=True) -> dict:
    return {
        "id": request_id,
        "event": "file",
        "name": name,
        "offset": offset,
        "data": base64.b64encode(data).decode(),
        "final": final,
    }


def lines(*events) -> bytes:
    return b"".join((json.dumps(event) + "\n").encode() for event in events)


def against(tmp_path, answer, **options):
    path = tmp_path / "scripted.sock"
    fake = ScriptedWorker(path, answer, **options)
    client = WorkerClient("the worker's", socket_path=str(path))
    client.start()
    poll_until(client, lambda e: client.state is not WorkerState.STARTING, timeout=10)
    return client, fake


def test_the_client_takes_only_the_listed_result_files_of_its_own_job(tmp_path):
    def answer(request):
        rid = request["id"]
        return lines(
            chunk("999", "stray.png", b"x"),  # no job of ours
            chunk(rid, "edit_mask.npy", b"mask"),
            chunk(rid, "extra.html", b"<script>"),  # sent, not listed
            {"id": rid, "event": "done", "output": "", "files": ["edit_mask.npy"]},
        )

    client, fake = against(tmp_path, answer)
    try:
        output = tmp_path / "out"
        client.submit("rethreshold", preview="1", tau=0.3, output=str(output))
        events = poll_until(client, lambda e: client.state is WorkerState.READY, timeout=10)
        assert [e["event"] for e in events] == ["done"] and events[-1]["output"] == str(output)
        assert sorted(p.name for p in output.iterdir()) == ["edit_mask.npy"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "scripted.sock"]
    finally:
        client.shutdown()
        fake.listener.close()


@pytest.mark.parametrize(
    "done",
    [
        {"event": "done", "output": "", "files": [["edit_mask.npy"]]},  # not names
        {"event": "done", "output": "", "files": "edit_mask.npy"},
        {"event": "done", "output": "", "files": ["edit_mask.npy", "never-sent.png"]},
    ],
)
def test_a_malformed_done_is_the_jobs_error_and_leaves_nothing(tmp_path, done):
    def answer(request):
        return lines(chunk(request["id"], "edit_mask.npy", b"mask"), {"id": request["id"], **done})

    client, fake = against(tmp_path, answer)
    try:
        client.submit("rethreshold", preview="1", tau=0.3, output=str(tmp_path / "out"))
        events = poll_until(client, lambda e: client.state is WorkerState.READY, timeout=10)
        assert events[-1]["event"] == "error" and events[-1]["kind"] == "WorkerError"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["scripted.sock"]
        client.submit("rethreshold", preview="1", tau=0.3, output=str(tmp_path / "again"))  # still serving
        poll_until(client, lambda e: client.state is WorkerState.READY, timeout=10)
    finally:
        client.shutdown()
        fake.listener.close()


def test_results_over_the_cap_fail_the_job_and_leave_nothing(tmp_path, monkeypatch):
    from instructx2x import transfer

    monkeypatch.setattr(transfer, "MAX_RESULT_FILES", 3)

    def answer(request):
        names = [f"f{i}.png" for i in range(5)]
        return lines(
            *(chunk(request["id"], n, b"x") for n in names),
            {"id": request["id"], "event": "done", "output": "", "files": names},
        )

    client, fake = against(tmp_path, answer)
    try:
        client.submit("rethreshold", preview="1", tau=0.3, output=str(tmp_path / "out"))
        events = poll_until(client, lambda e: client.state is WorkerState.READY, timeout=10)
        assert events[-1]["event"] == "error" and "more than 3 result files" in events[-1]["message"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["scripted.sock"]
    finally:
        client.shutdown()
        fake.listener.close()


def test_an_over_long_line_from_a_worker_ends_the_connection_with_bounded_memory(tmp_path):
    from InstructX2XModuleLib import worker as client_layer

    def answer(request):
        return b"x" * (client_layer.MAX_EVENT_CHARS + 10)

    client, fake = against(tmp_path, answer)
    try:
        client.submit("rethreshold", preview="1", tau=0.3, output=str(tmp_path / "out"))
        poll_until(client, lambda e: client.state is WorkerState.STOPPED, timeout=20)
        assert "longer than any it sends" in client.last_error
        assert not (tmp_path / "out").exists()
    finally:
        client.shutdown()
        fake.listener.close()


@pytest.mark.parametrize("protocol", [b'"two"', b"null", b"[2]", b"true", b"1"])
def test_a_worker_that_cannot_take_files_is_said_before_the_job_leaves_the_queue(tmp_path, protocol):
    ready = b'{"event": "ready", "protocol": ' + protocol + b"}\n"
    client, fake = against(tmp_path, lambda request: b"", ready=ready)
    try:
        with pytest.raises(WorkerError, match="cannot receive files"):
            client.submit("rethreshold", preview="1", tau=0.3, output=str(tmp_path / "out"))
        assert client.state is WorkerState.READY
    finally:
        client.shutdown()
        fake.listener.close()


def test_an_over_long_or_odd_request_id_is_refused(worker):
    peer = ready(Peer(worker.path))
    for request_id in ("x" * 129, ["a"], {"a": 1}, True):
        peer.send({"type": "cancel", "id": request_id})
        refused = peer.event()
        assert refused["event"] == "error" and "id" not in refused
    peer.send({"type": "upload", "id": "ok", "name": "input.png", "offset": 0, "data": "", "final": True})
    assert peer.event()["event"] == "uploaded"
    peer.send({"type": "upload", "id": "f", "name": "a.png", "offset": 0, "data": "", "final": "true"})
    assert "final must be true or false" in peer.event()["message"]
    peer.send({"type": "upload", "id": "n", "name": "a.png\n", "offset": 0, "data": "", "final": True})
    assert "plain file name" in peer.event()["message"]
    peer.socket.sendall(b"[" * 200_000 + b"\n")  # nested too deeply for the JSON parser
    assert "nested too deeply" in peer.event()["message"]
    peer.close()


def test_a_slow_reader_of_large_results_delays_no_one(worker, tmp_path):
    """The results go from the slow client's own writer: another client's job runs and ends
    while the first client's results are still on their way."""
    big = tmp_path / "big.png"
    yy, xx = np.mgrid[0:1536, 0:1536]
    Image.fromarray((127 + 90 * np.sin(yy / 37) * np.cos(xx / 23)).astype(np.uint8)).save(big)
    slow = ready(Peer(worker.path))
    upload(slow, "u", "input.png", big.read_bytes())
    assert slow.event()["event"] == "uploaded"
    slow.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.send({"type": "preview", "id": "slow", "job": job("input.png", "x"), "transfer": True})
    other = ready(Peer(worker.path))
    time.sleep(1)  # the slow client's job runs first
    Image.fromarray(np.full((72, 64), 90, np.uint8)).save(tmp_path / "film.png")
    other.send({"type": "preview", "id": "quick", "job": job(str(tmp_path / "film.png"), tmp_path / "quick")})
    stop = threading.Event()

    def trickle():  # reads a little, often enough that the stall limit never cuts it off
        while not stop.is_set():
            with contextlib.suppress(OSError):
                slow.socket.recv(4096)
            time.sleep(0.5)

    reader = threading.Thread(target=trickle, daemon=True)
    reader.start()
    events = other.until("quick", within=120)
    assert events[-1]["event"] == "done"
    stop.set()
    reader.join()
    slow.close()
