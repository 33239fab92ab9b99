"""The worker service as the panels use it: a real process, JSON lines in and out."""

import io
import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from instructx2x.parameters import EditParameters
from instructx2x.serve import PROTOCOL_VERSION


@pytest.fixture
def worker():
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "instructx2x.cli",
            "serve",
            "--stdio",
            "--model",
            "untrained-tiny",
            "--device",
            "cpu",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    yield process
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


def ready(process) -> dict:
    loading = json.loads(process.stdout.readline())
    assert loading == {"event": "loading", "model": "untrained-tiny"}
    return json.loads(process.stdout.readline())


def send(process, request):
    process.stdin.write(json.dumps(request) + "\n")
    process.stdin.flush()


def events_until(process, request_id, last=("done", "error", "cancelled")):
    events = []
    for line in process.stdout:
        event = json.loads(line)
        events.append(event)
        if event.get("id") == request_id and event["event"] in last:
            return events
    raise AssertionError(f"worker ended early: {events} {process.stderr.read()}")


def job(png, out, steps=2, **parameters):
    return {
        "input": str(png),
        "output": str(out),
        "parameters": {
            "instruction": "Add the finding of right pleural effusion",
            "num_inference_steps": steps,
            "resolution": 64,
            **parameters,
        },
    }


def test_preview_rethreshold_and_two_edits_on_one_warm_worker(worker, png, tmp_path):
    event = ready(worker)
    assert (
        event["event"] == "ready"
        and event["protocol"] == PROTOCOL_VERSION == 2
        and event["model"]["trained"] is False
    )
    send(worker, {"type": "preview", "id": "p", "job": job(png, tmp_path / "preview")})
    done = events_until(worker, "p")[-1]
    assert done["event"] == "done" and "guidance_map.npy" in done["files"]
    guidance = np.load(tmp_path / "preview" / "guidance_map.npy")
    assert guidance.dtype == np.float32 and guidance.shape == (72, 60)
    geometry = json.loads((tmp_path / "preview" / "maps.json").read_text())
    assert (geometry["rows"], geometry["columns"]) == (72, 60)

    send(
        worker,
        {"type": "rethreshold", "id": "r", "preview": "p", "tau": 0.4, "output": str(tmp_path / "tau04")},
    )
    assert events_until(worker, "r")[-1]["event"] == "done"
    send(worker, {"type": "edit", "id": "e", "job": job(png, tmp_path / "edit", tau=0.4)})
    # a request that arrives while the worker still closes the previous one hears "queued" first
    events = [e for e in events_until(worker, "e") if e["event"] != "queued"]
    assert [e["event"] for e in events] == ["started", "progress", "progress", "decode", "export", "done"]
    assert events[2]["step"] == 2 and events[2]["eta_s"] == 0
    # the re-thresholded mask is the mask of an edit at that tau, with no model call
    assert np.array_equal(
        np.load(tmp_path / "tau04" / "edit_mask.npy"), np.load(tmp_path / "edit" / "edit_mask.npy")
    )
    send(worker, {"type": "edit", "id": "bad", "job": job(png, tmp_path / "edit")})
    error = events_until(worker, "bad")[-1]
    assert error["event"] == "error" and error["exit_code"] == 2 and "already exists" in error["message"]
    send(worker, {"type": "shutdown"})
    assert worker.wait(timeout=30) == 0


def test_cancel_mid_run_and_queued_cancel_leave_nothing(worker, png, tmp_path):
    assert ready(worker)["event"] == "ready"
    send(worker, {"type": "edit", "id": "long", "job": job(png, tmp_path / "long", steps=400)})
    send(worker, {"type": "edit", "id": "queued", "job": job(png, tmp_path / "queued")})
    send(worker, {"type": "cancel", "id": "queued"})  # before it starts: must not be lost
    for line in worker.stdout:
        if json.loads(line)["event"] == "progress":
            break
    send(worker, {"type": "cancel", "id": "long"})
    events = events_until(worker, "long")
    assert events[-1]["event"] == "cancelled"
    assert events_until(worker, "queued")[-1]["event"] == "cancelled"
    send(worker, {"type": "edit", "id": "after", "job": job(png, tmp_path / "after")})
    assert events_until(worker, "after")[-1]["event"] == "done"  # ready for the next job
    assert sorted(p.name for p in tmp_path.iterdir()) == ["after", "chest.png"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killing_the_worker_mid_run_leaves_nothing(worker, png, tmp_path, sig):
    assert ready(worker)["event"] == "ready"
    send(worker, {"type": "edit", "id": "k", "job": job(png, tmp_path / "k", steps=400)})
    for line in worker.stdout:
        if json.loads(line)["event"] == "progress":
            break
    worker.send_signal(sig)
    worker.wait(timeout=30)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chest.png"]


def test_job_round_trips_through_json(tmp_path):
    from instructx2x.jobs import EditJob

    spec = EditJob("edit", tmp_path / "in.png", tmp_path / "out", EditParameters("Add edema", seed=3))
    assert EditJob.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    series = EditJob(
        "edit",
        tmp_path / "in.png",
        tmp_path / "out",
        EditParameters("Add the finding of {level} edema"),
        series=("mild", "severe"),
    )
    assert EditJob.from_dict(json.loads(json.dumps(series.to_dict()))) == series
    with pytest.raises(ValueError, match="unknown job field"):
        EditJob.from_dict({**spec.to_dict(), "colour": "red"})


def test_a_series_request_on_the_warm_worker(worker, png, tmp_path):
    """An edit request whose job carries a series: one warm worker, progress over the batch's
    steps, the steps' files named in the done event for a panel's slider, the shared maps as
    float arrays; a bad series is an error event (exit code 2) and writes nothing."""
    assert ready(worker)["event"] == "ready"
    series_job = {
        **job(
            png, tmp_path / "series", instruction="Add the finding of {level} right pleural effusion", tau=0.2
        ),
        "series": ["small", "moderate", "large"],
    }
    send(worker, {"type": "edit", "id": "s", "job": series_job})
    events = [e for e in events_until(worker, "s") if e["event"] != "queued"]
    assert [e["event"] for e in events] == ["started", "progress", "progress", "decode", "export", "done"]
    assert events[0]["series"] == 3 and events[0]["total"] == 2
    done = events[-1]
    assert done["series"]["levels"] == ["small", "moderate", "large"]
    assert done["series"]["step_files"] == [["step-01.png"], ["step-02.png"], ["step-03.png"]]
    assert {"strip.png", "manifest.json", "edit_mask.npy", "guidance_map.npy"} <= set(done["files"])
    mask = np.load(tmp_path / "series" / "edit_mask.npy")
    manifest = json.loads((tmp_path / "series" / "manifest.json").read_text())
    assert manifest["edit_region"]["edit_fraction"] > 0 and mask.shape == (72, 60)
    bad = {**series_job, "output": str(tmp_path / "bad"), "series": ["large", "small", "moderate"]}
    send(worker, {"type": "edit", "id": "b", "job": bad})
    error = events_until(worker, "b")[-1]
    assert error["event"] == "error" and error["exit_code"] == 2
    assert "series levels out of order: large, small, moderate" in error["message"]
    assert not (tmp_path / "bad").exists()
    send(worker, {"type": "shutdown"})
    assert worker.wait(timeout=30) == 0


def test_a_defect_in_one_job_does_not_take_the_warm_worker_down(png, tmp_path, monkeypatch):
    """In process: a job that hits an unexpected exception answers with an error event and
    the next job still runs."""
    import io

    from instructx2x import InstructX2XEditor
    from instructx2x.serve import serve

    editor = InstructX2XEditor.from_model("untrained-tiny", device="cpu")
    calls = {"n": 0}
    real_edit = editor.edit

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real_edit(*args, **kwargs)

    monkeypatch.setattr(editor, "edit", flaky)
    requests = (
        "\n".join(
            json.dumps(r)
            for r in [
                {"type": "edit", "id": "1", "job": job(png, tmp_path / "one")},
                {"type": "edit", "id": "2", "job": job(png, tmp_path / "two")},
                {"type": "shutdown"},
            ]
        )
        + "\n"
    )
    out = io.StringIO()
    assert serve(editor, io.StringIO(requests), out) == 0
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    first = [e for e in events if e.get("id") == "1"][-1]
    assert first["event"] == "error" and "internal error" in first["message"] and "boom" in first["message"]
    assert [e for e in events if e.get("id") == "2"][-1]["event"] == "done"
    assert not (tmp_path / "one").exists() and (tmp_path / "two").is_dir()


@pytest.mark.parametrize("stop", ["cancel", "disconnect"])
def test_a_cancel_stops_the_model_before_its_next_step(png, tmp_path, monkeypatch, stop):
    """In process: a cancel, or the client's disconnection (the client's reader acts on them;
    here its own step event does), reaches the pipeline (``pipeline.cancel``), so no UNet call
    follows and nothing is written."""
    from instructx2x import InstructX2XEditor
    from instructx2x.serve import Client, Worker

    editor = InstructX2XEditor.from_model("untrained-tiny", device="cpu")
    unet_calls: list[int] = []
    at_cancel: list[int] = []
    forward = editor.pipeline.unet.forward

    def counted(*args, **kwargs):
        unet_calls.append(1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(editor.pipeline.unet, "forward", counted)
    worker = Worker(editor)

    class Reader(io.StringIO):
        """The client: cancels when it hears the first step."""

        def write(self, text):
            if json.loads(text)["event"] == "progress" and not at_cancel:
                at_cancel.append(len(unet_calls))
                worker.cancel(client, "1") if stop == "cancel" else worker.drop(client)
            return super().write(text)

    reader = Reader()
    client = Client(reader)
    worker.put(client, {"type": "edit", "id": "1", "job": job(png, tmp_path / "edit", steps=20)})
    worker.put(Client(io.StringIO()), {"type": "shutdown"})  # a disconnected client's requests go
    worker.loop()
    events = [json.loads(line) for line in reader.getvalue().splitlines()]
    assert [e["step"] for e in events if e["event"] == "progress"] == [1]
    assert events[-1] == {"id": "1", "event": "cancelled"} or stop == "disconnect"  # it hears nothing more
    assert len(unet_calls) == at_cancel[0]  # no model call after the cancel
    assert not (tmp_path / "edit").exists()


def test_request_lines_are_read_within_the_limit_and_must_be_text():
    from instructx2x.serve import _Refused, read_lines

    stream = io.BytesIO(b'{"a": 1}\n' + b"x" * 15 + b"\n" + b"y" * 40 + b"\n")
    lines = read_lines(stream, limit=16)
    assert next(lines) == '{"a": 1}\n' and next(lines) == "x" * 15 + "\n"  # 16 bytes: the limit
    with pytest.raises(_Refused, match="longer than 16 bytes"):
        next(lines)
    assert stream.tell() == 9 + 16 + 17  # no more than the limit and one byte was read
    with pytest.raises(_Refused, match="not UTF-8"):
        next(read_lines(io.BytesIO(b'{"id": "\xff"}\n')))


def test_a_client_that_stops_reading_is_cut_off_without_blocking_the_worker():
    """Its events queue up to ``MAX_PENDING_EVENTS`` beyond what the socket holds; then it is
    disconnected. ``emit`` returns at once throughout."""
    import socket

    from instructx2x.serve import MAX_PENDING_EVENTS, SocketClient

    ours, theirs = socket.socketpair()
    theirs.settimeout(10)
    client = SocketClient(ours)
    reader = theirs.makefile("rb")
    for step in range(3):  # a client that reads hears its events
        client.emit({"id": "1", "event": "progress", "step": step})
        assert json.loads(reader.readline())["step"] == step
    sent = 20 * MAX_PENDING_EVENTS  # then it stops reading

    def emit_the_rest() -> None:
        for step in range(3, sent):
            client.emit({"id": "1", "event": "progress", "step": step})

    emitting = threading.Thread(
        target=emit_the_rest,
        daemon=True,
    )
    emitting.start()
    emitting.join(timeout=10)
    assert not emitting.is_alive() and not client.connected
    rest = reader.read()  # what it was sent before it was cut off, then the end
    steps = [json.loads(line)["step"] for line in rest.split(b"\n")[:-1]]
    assert len(steps) < sent and steps == list(range(3, 3 + len(steps)))
    reader.close()
    theirs.close()


def test_a_client_whose_socket_stays_full_is_cut_off_after_the_stall_limit(monkeypatch):
    """Fewer events than the queue holds, but the socket stays full: the writer gives up after
    ``SEND_STALL_S`` and the client is disconnected."""
    import socket
    import time

    from instructx2x import serve
    from instructx2x.serve import MAX_PENDING_EVENTS, SocketClient

    monkeypatch.setattr(serve, "SEND_STALL_S", 0.2)
    ours, theirs = socket.socketpair()
    client = SocketClient(ours)
    for step in range(MAX_PENDING_EVENTS // 2):  # until the socket is full and events wait
        client.emit({"id": "1", "event": "progress", "step": step, "padding": "x" * 2000})
        time.sleep(0.001)
        if client.pending.qsize() >= 10:
            break
    assert 10 <= client.pending.qsize() < MAX_PENDING_EVENTS and client.connected

    def connected() -> bool:  # the client's writer thread disconnects it
        return client.connected

    deadline = time.monotonic() + 5
    while connected() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not connected()
    theirs.close()


def test_a_shared_worker_serves_several_clients_one_job_at_a_time(png, tmp_path):
    """``serve --socket``: two clients, one model; the second waits with its position, the ids
    of different clients do not collide, a client that hangs up has its job cancelled."""
    import socket
    import time

    path = tmp_path / "worker.sock"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "instructx2x.cli",
            "serve",
            "--socket",
            str(path),
            "--model",
            "untrained-tiny",
            "--device",
            "cpu",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    try:
        deadline = time.monotonic() + 120
        while not path.exists():
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.05)
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        clients = []
        for _ in range(2):
            connection = socket.socket(socket.AF_UNIX)
            connection.connect(str(path))
            reader, writer = connection.makefile("r"), connection.makefile("w")
            assert json.loads(reader.readline())["event"] == "ready"
            clients.append((connection, reader, writer))
        (first, first_in, first_out), (_second, second_in, second_out) = clients
        send(
            process_like(first_out),
            {"type": "edit", "id": "1", "job": job(png, tmp_path / "first", steps=400)},
        )
        assert json.loads(first_in.readline())["event"] == "started"
        send(process_like(second_out), {"type": "edit", "id": "1", "job": job(png, tmp_path / "second")})
        assert json.loads(second_in.readline()) == {"id": "1", "event": "queued", "position": 1}
        first.shutdown(socket.SHUT_RDWR)  # hangs up mid-run: its job stops, the next one starts
        first.close()
        events = []
        for line in second_in:
            events.append(json.loads(line))
            if events[-1]["event"] in ("done", "error", "cancelled"):
                break
        assert events[0]["event"] == "started" and events[-1]["event"] == "done", events
        assert sorted(p.name for p in tmp_path.iterdir()) == ["chest.png", "second", "worker.sock"]
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    assert not path.exists()


def test_a_socket_that_exists_is_refused_before_the_model_loads(tmp_path):
    (tmp_path / "busy.sock").write_text("")
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "instructx2x.cli",
            "serve",
            "--socket",
            str(tmp_path / "busy.sock"),
            "--model",
            "untrained-tiny",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2 and "busy.sock exists" in completed.stdout + completed.stderr
    assert "loading" not in completed.stdout


class process_like:
    """``send`` writes to ``process.stdin``: a socket's writer in its place."""

    def __init__(self, writer):
        self.stdin = writer


OUT_OF_MEMORY_WORKER = """
import sys

import torch

from instructx2x.cli import main
from instructx2x.pipeline import InstructX2XPipeline


def out_of_memory(*_args, **_kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0)")


InstructX2XPipeline.__call__ = out_of_memory
sys.exit(main(sys.argv[1:]))
"""


def test_gpu_out_of_memory_is_a_resource_error_and_the_worker_stays_up(png, tmp_path):
    """The real worker over stdio, its pipeline made to fail as a full GPU does."""
    process = subprocess.Popen(
        [sys.executable, "-c", OUT_OF_MEMORY_WORKER, "serve", "--stdio", "--model", "untrained-tiny"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert ready(process)["event"] == "ready"
        send(process, {"type": "edit", "id": "oom", "job": job(png, tmp_path / "out")})
        error = events_until(process, "oom")[-1]
        assert (error["event"], error["kind"], error["exit_code"]) == ("error", "ResourceError", 4)
        assert error["message"].startswith("out of memory on the device (CUDA out of memory.")
        assert "smaller resolution" in error["message"] and "internal error" not in error["message"]
        assert not (tmp_path / "out").exists()
        send(process, {"type": "shutdown"})
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
