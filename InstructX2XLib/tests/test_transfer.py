"""Files carried over the worker's connection: the worker's inbox and the client's downloads."""

import base64
import os
from pathlib import Path

import pytest

from instructx2x import transfer
from instructx2x.errors import InputNotFoundError, ParameterError, ResourceError
from instructx2x.transfer import Downloads, Inbox, file_events, localize_job, upload_requests


@pytest.fixture
def inbox(tmp_path):
    inbox = Inbox(tmp_path)
    yield inbox
    inbox.close()
    assert not inbox.folder.exists()


def test_a_file_in_chunks_arrives_whole(inbox, tmp_path, monkeypatch):
    monkeypatch.setattr(transfer, "CHUNK_BYTES", 1000)
    source = tmp_path / "film.dcm"
    source.write_bytes(os.urandom(2500))
    messages = list(upload_requests(source, "input.dcm", "1:input"))
    assert [m["offset"] for m in messages] == [0, 1000, 2000] and [m["final"] for m in messages] == [0, 0, 1]
    events = [inbox.receive(m) for m in messages]
    assert events[:2] == [None, None] and events[2] == {
        "event": "uploaded",
        "name": "input.dcm",
        "bytes": 2500,
    }
    assert (inbox.take(["input.dcm"], "1") / "input.dcm").read_bytes() == source.read_bytes()
    assert oct(inbox.folder.stat().st_mode & 0o777) == "0o700"


def test_an_empty_file_is_one_final_message(inbox, tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    (message,) = upload_requests(tmp_path / "empty", "empty", "x")
    assert message["final"] and message["data"] == ""
    assert inbox.receive(message)["bytes"] == 0


def test_a_half_sent_file_can_not_be_used(inbox):
    inbox.receive(
        {"name": "input.png", "offset": 0, "data": base64.b64encode(b"abc").decode(), "final": False}
    )
    with pytest.raises(InputNotFoundError, match="not uploaded"):
        inbox.take(["input.png"], "1")


def test_the_bytes_a_client_holds_are_bounded(inbox, monkeypatch):
    monkeypatch.setattr(transfer, "MAX_CLIENT_BYTES", 10)
    chunk = base64.b64encode(b"123456").decode()
    inbox.receive({"name": "a", "offset": 0, "data": chunk, "final": True})
    with pytest.raises(ResourceError, match="exceed"):
        inbox.receive({"name": "b", "offset": 0, "data": chunk, "final": True})
    assert not (inbox.folder / "uploads" / "b").exists() and "b" not in inbox.files
    inbox.receive({"name": "a", "offset": 0, "data": chunk, "final": True})  # replacing frees its bytes


def test_all_clients_uploads_share_one_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(transfer, "MAX_WORKER_BYTES", 10)
    budget = transfer.UploadBudget()
    first, second = Inbox(tmp_path, budget), Inbox(tmp_path, budget)
    chunk = base64.b64encode(b"123456").decode()
    first.receive({"name": "a", "offset": 0, "data": chunk, "final": True})
    second.receive({"name": "b", "offset": 0, "data": chunk[:4], "final": False})  # 3 bytes
    with pytest.raises(ResourceError, match="all its clients' together, would exceed"):
        second.receive({"name": "b", "offset": 3, "data": chunk[:4], "final": True})
    assert not (second.folder / "uploads" / "b").exists() and budget.used == 6
    first.close()
    second.receive({"name": "b", "offset": 0, "data": chunk, "final": True})
    assert budget.used == 6
    second.close()
    assert budget.used == 0


def test_a_job_names_only_its_own_uploads_and_takes_them(inbox):
    inbox.receive({"name": "input.png", "offset": 0, "data": "", "final": True})
    local = localize_job({"input": "input.png", "output": "/anywhere", "mask": None}, inbox, "7")
    assert Path(local["input"]).parent.parent == inbox.folder / "jobs" and local["mask"] is None
    assert "output" not in local and not (inbox.folder / "uploads" / "input.png").exists()
    with pytest.raises(InputNotFoundError, match="not uploaded"):  # taken: a next job sends it again
        localize_job({"input": "input.png"}, inbox, "8")
    inbox.release(local)
    assert not Path(local["input"]).parent.exists()
    with pytest.raises(ParameterError, match="plain file name"):
        localize_job({"input": "/etc/passwd", "output": "o"}, inbox, "7")
    with pytest.raises(ParameterError, match="classifier"):
        localize_job({"input": "input.png", "output": "o", "verify": "/models/mine"}, inbox, "7")


def sent(tmp_path, files: dict[str, bytes], request_id="3"):
    folder = tmp_path / "worker-results"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return list(file_events(folder, list(files), request_id))


def test_results_appear_whole_at_the_output_asked_for(tmp_path):
    downloads, output = Downloads(), tmp_path / "panel" / "job-001" / "edit"
    downloads.expect("3", output)
    for event in sent(tmp_path, {"edit_mask.npy": b"mask", "counterfactual.dcm": os.urandom(3000)}):
        downloads.receive(event)
        assert not output.exists()
    done = downloads.finish(
        {"id": "3", "event": "done", "output": "", "files": ["edit_mask.npy", "counterfactual.dcm"]}
    )
    assert done["output"] == str(output) and (output / "edit_mask.npy").read_bytes() == b"mask"
    assert os.listdir(output.parent) == ["edit"]


@pytest.mark.parametrize("damage", ["missing", "gap", "path"])
def test_a_damaged_result_is_an_error_and_leaves_nothing(tmp_path, damage):
    downloads, output = Downloads(), tmp_path / "out"
    downloads.expect("3", output)
    events = sent(tmp_path, {"a.png": b"1234", "b.npy": b"5678"})
    if damage == "gap":
        events[1]["offset"] = 2
    if damage == "path":
        events[1]["name"] = "../b.npy"
    for event in events[: 1 if damage == "missing" else 2]:
        downloads.receive(event)
    done = downloads.finish({"id": "3", "event": "done", "output": "", "files": ["a.png", "b.npy"]})
    assert done["event"] == "error" and done["kind"] == "WorkerError"
    assert os.listdir(tmp_path) == ["worker-results"]


def test_an_output_that_exists_is_refused_before_anything_is_sent(tmp_path):
    with pytest.raises(ParameterError, match="already exists"):
        Downloads().expect("1", tmp_path)
