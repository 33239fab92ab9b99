"""Server mode: the panel's settings name a shared worker's socket (``instructx2x serve
--socket``), as a GPU server reached through an SSH-forwarded socket is used."""

import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import slicer
from workers import poll_until, radiograph, shared_worker

from InstructX2XModuleLib import scene as layer
from InstructX2XModuleLib.session import (
    EditSession,
    MaskSource,
    PanelSettings,
    WorkerMode,
    worker_socket_setting,
)
from InstructX2XModuleLib.worker import WorkerError


class RecordingSession(EditSession):
    """An edit session that records each install of a local worker's dependencies (a shared
    worker needs none)."""

    def __init__(self, scene) -> None:
        self.installs: list[str] = []
        super().__init__(scene, prepare_worker=lambda settings: self.installs.append("local"))


@pytest.fixture
def session():
    scene = slicer.vtkMRMLScene()
    layer.prepare_scene(scene)
    session = RecordingSession(scene)
    yield session
    session.stop()
    assert not session.folder.exists()


def settings(**overrides):
    values = dict(
        instruction="Add the finding of left pleural effusion",
        model="no-such-model: the worker's counts",
        device="cpu",
        steps=2,
        verify=False,
    )
    return PanelSettings(**{**values, **overrides})


@pytest.fixture
def silent_listener(tmp_path):
    """A Unix socket that accepts connections and never says a word (what a wrong socket, or
    a tunnel to a stuck process, looks like)."""
    path = tmp_path / "silent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    accepted = []

    def accept():
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield path, accepted
    listener.shutdown(socket.SHUT_RDWR)
    listener.close()
    for connection in accepted:
        connection.close()


@pytest.fixture
def panel_folder(tmp_path, monkeypatch):
    """The panel's temporary folder (its session's files) in a folder of its own."""
    folder = tmp_path / "panel"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.mark.skipif(os.geteuid() != 0, reason="hiding the panel's files from the worker needs root")
def test_the_settings_socket_reaches_the_shared_worker_and_results_land_in_the_scene(
    panel_folder, session, tmp_path
):
    """The worker runs where the panel's files do not exist (a mount namespace that covers
    them, as on another machine): the job's files and results travel over the socket."""
    assert session.folder.parent == panel_folder
    path = tmp_path / "ix2x.sock"
    volume = radiograph(session.scene)
    before = layer.volume_to_array(volume).copy()
    mask = np.zeros((72, 64), bool)
    mask[30:60, 34:60] = True
    with shared_worker(path, hidden=panel_folder) as server:
        shared = settings(worker_socket=str(path))
        assert session.start_worker(shared).name == "untrained-tiny"  # the worker's, not the panel's
        session.submit("preview", volume, shared)
        poll_until(session, lambda e: any(x["event"] == "done" for x in e))
        assert session.has_preview and {"guidance", "mask"} <= set(session.results)
        assert session.request_rethreshold(0.5)  # the cached preview re-cut, its mask sent back
        poll_until(session, lambda e: any(x["event"] == "done" for x in e))
        assert "tau 0.5" in session.result_text
        session.submit(
            "edit", volume, settings(worker_socket=str(path), mask_source=MaskSource.PAINTED), edit_mask=mask
        )
        poll_until(session, lambda e: any(x["event"] == "done" for x in e))
        edited = layer.volume_to_array(session.results["counterfactual"])
        assert np.array_equal(edited[~mask], before[~mask]) and not np.array_equal(edited[mask], before[mask])
        assert session.worker.socket_path == str(path) and session.worker.process is None  # no local worker
        session.stop()  # hangs up; the shared worker serves on
        assert server.poll() is None
    assert session.installs == []


def test_a_socket_with_no_listener_is_said_at_once_and_nothing_is_left(session, tmp_path):
    volume = radiograph(session.scene)
    dead = tmp_path / "dead.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(dead))  # the file of a worker that has gone: bound, nobody listening
    listener.close()
    for path, reason in (
        (dead, "Connection refused"),
        (tmp_path / "absent.sock", "No such file or directory"),
    ):
        started = time.monotonic()
        with pytest.raises(
            WorkerError, match=f"cannot reach the shared worker at {path.name} \\({reason}\\)"
        ):
            session.submit("edit", volume, settings(worker_socket=str(path)))
        assert time.monotonic() - started < 5
        assert not session.busy and session.queue == [] and list(session.folder.iterdir()) == []
    with pytest.raises(WorkerError, match="cannot reach the shared worker at dead.sock"):
        session.start_worker(settings(worker_socket=str(dead)))
    assert session.worker is None


def test_a_listener_that_never_says_ready_is_given_up_within_the_timeout(session, silent_listener, tmp_path):
    path, accepted = silent_listener
    session.shared_ready_timeout_s = 2.0
    volume = radiograph(session.scene)
    session.submit("edit", volume, settings(worker_socket=str(path)))
    assert session.busy and len(list(session.folder.iterdir())) == 1  # queued, its inputs written
    started = time.monotonic()
    events = poll_until(session, lambda e: any(x["event"] == "error" for x in e), timeout=20)
    assert time.monotonic() - started < 6
    message = next(x["message"] for x in events if x["event"] == "error")
    assert message.startswith(
        "the shared worker at silent.sock took the connection but did not answer within 2 s"
    )
    assert not session.busy and session.worker is None and session.queue == []
    assert list(session.folder.iterdir()) == []  # the job that will not run leaves no folder
    started = time.monotonic()
    with pytest.raises(WorkerError, match="silent.sock took the connection but did not answer"):
        session.start_worker(settings(worker_socket=str(path)))
    assert time.monotonic() - started < 6 and session.worker is None
    # the next try, at a worker that answers, runs
    good = tmp_path / "good.sock"
    with shared_worker(good):
        session.submit("edit", volume, settings(worker_socket=str(good)))
        poll_until(session, lambda e: any(x["event"] == "done" for x in e))
        assert "counterfactual" in session.results
        session.stop()


def test_a_change_of_the_setting_takes_effect_on_the_next_job(session, tmp_path, silent_listener):
    """A shared worker, then back to a local one: each job uses the worker its settings name."""
    path, accepted = silent_listener
    session.shared_ready_timeout_s = 60
    volume = radiograph(session.scene)
    session.submit("preview", volume, settings(worker_socket=str(path)))
    poll_until(session, lambda e: len(accepted) == 1 and session.worker.state.value == "starting", timeout=10)
    assert session.worker.socket_path == str(path) and session.installs == []
    session.cancel()
    session.submit("preview", volume, settings(model="untrained-tiny", scheduler="dpm++", precision="fp32"))
    assert (
        session.worker.socket_path is None
        and session.worker.process is not None
        and session.installs == ["local"]
    )
    poll_until(session, lambda e: any(x["event"] == "done" for x in e))
    assert "guidance" in session.results


def test_the_panels_worker_choice_becomes_the_settings_socket(tmp_path):
    assert worker_socket_setting(WorkerMode.LOCAL, "/ignored.sock") == ""
    assert worker_socket_setting(WorkerMode.SHARED, " /tmp/ix2x.sock ") == "/tmp/ix2x.sock"
    assert worker_socket_setting(WorkerMode.SHARED, "~/ix2x.sock") == str(Path.home() / "ix2x.sock")
    with pytest.raises(layer.SceneError, match="give the shared worker's socket path"):
        worker_socket_setting(WorkerMode.SHARED, "  ")
    with pytest.raises(layer.SceneError, match="ix2x.sock is not an absolute path"):
        worker_socket_setting(WorkerMode.SHARED, "ix2x.sock")
    with pytest.raises(layer.SceneError, match="108 bytes long; a Unix socket path holds at most 107"):
        worker_socket_setting(WorkerMode.SHARED, "/" + "s" * 107)
    assert worker_socket_setting(WorkerMode.SHARED, "/" + "s" * 106) == "/" + "s" * 106
    with pytest.raises(layer.SceneError, match="unknown choice 'remote'"):
        worker_socket_setting("remote", "/tmp/ix2x.sock")
    assert worker_socket_setting(WorkerMode.SHARED.label, "/tmp/ix2x.sock") == "/tmp/ix2x.sock"


def test_a_shared_worker_is_refused_where_peer_credentials_are_not_checked(monkeypatch):
    from InstructX2XModuleLib import session as session_layer

    monkeypatch.setattr(session_layer.sys, "platform", "win32")
    with pytest.raises(layer.SceneError, match="Windows does not; here the panel runs its own worker"):
        worker_socket_setting(WorkerMode.SHARED, "/tmp/ix2x.sock")
    assert worker_socket_setting(WorkerMode.LOCAL, "/tmp/ix2x.sock") == ""
    monkeypatch.setattr(session_layer.sys, "platform", "darwin")  # LOCAL_PEERCRED (serve.peer_uid)
    assert worker_socket_setting(WorkerMode.SHARED, "/tmp/ix2x.sock") == "/tmp/ix2x.sock"
