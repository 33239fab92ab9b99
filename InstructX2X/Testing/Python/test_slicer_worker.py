"""The Slicer panel's worker client against a real ``instructx2x serve`` process."""

import time
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image
from workers import poll_until

from InstructX2XModuleLib.worker import WorkerClient, WorkerError, WorkerState


@pytest.fixture
def film(tmp_path):
    yy, xx = np.mgrid[0:72, 0:64]
    path = tmp_path / "film.png"
    Image.fromarray((127 + 90 * np.sin(yy / 7) * np.cos(xx / 5)).astype(np.uint8)).save(path)
    return path


def state(client: WorkerClient) -> WorkerState:
    """``client``'s state, read at each call (an assert on ``client.state`` would narrow it for
    the type checker until the end of the test, across the calls that change it)."""
    return client.state


def reaches(client: WorkerClient, wanted: WorkerState) -> Callable[[list[dict]], bool]:
    """A ``poll_until`` condition: ``client`` is in the ``wanted`` state."""
    return lambda events: state(client) is wanted


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


def test_two_jobs_on_one_warm_worker_then_cancel_and_kill(film, tmp_path):
    client = WorkerClient("untrained-tiny", device="cpu", scheduler="dpm++", dtype="fp32")
    client.start()
    assert state(client) is WorkerState.STARTING
    with pytest.raises(WorkerError, match="not ready"):
        client.submit("edit", job(film, tmp_path / "early"))
    poll_until(client, reaches(client, WorkerState.READY))
    assert client.info["model"]["trained"] is False and client.info["precision"]["dtype"] == "float32"
    try:
        first = client.submit("preview", job(film, tmp_path / "preview"))
        events = poll_until(client, reaches(client, WorkerState.READY))
        assert events[-1] == {**events[-1], "id": first, "event": "done"}
        client.submit("edit", job(film, tmp_path / "edit"))
        events = poll_until(client, reaches(client, WorkerState.READY))
        progress = [e for e in events if e["event"] == "progress"]
        assert [e["step"] for e in progress] == [1, 2] and progress[-1]["eta_s"] == 0
        assert (tmp_path / "edit" / "edited.png").is_file()

        client.submit("edit", job(film, tmp_path / "long", steps=400))
        poll_until(client, lambda e: any(x["event"] == "progress" for x in e))
        started = time.monotonic()
        client.cancel()
        assert state(client) is WorkerState.CANCELLING
        events = poll_until(client, reaches(client, WorkerState.READY))
        assert events[-1]["event"] == "cancelled" and time.monotonic() - started < 5
        assert not (tmp_path / "long").exists()

        client.submit("edit", job(film, tmp_path / "killed", steps=400))
        poll_until(client, lambda e: any(x["event"] == "progress" for x in e))
        client.kill()
        assert state(client) is WorkerState.STOPPED
        assert client.process is not None and client.process.poll() is not None
    finally:
        client.shutdown()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit", "film.png", "preview"]


def test_a_worker_that_cannot_load_its_model_reports_why(tmp_path):
    client = WorkerClient(str(tmp_path / "no-model"), device="cpu")
    client.start()
    poll_until(client, reaches(client, WorkerState.STOPPED))
    assert client.last_error is not None and "model not found: no-model" in client.last_error


def test_the_panels_verified_edit_on_the_demo_model(tmp_path):
    """What the panel sends with "Verify the edit" on: the done event carries the verification
    and its readable text lies beside the result (classifiers named by the model's card)."""
    from pathlib import Path

    sample = Path(__file__).resolve().parents[3] / "Resources" / "Samples" / "phantom_pa.dcm"
    client = WorkerClient("demo", device="cpu")
    client.start()
    try:
        poll_until(client, reaches(client, WorkerState.READY))
        client.submit(
            "edit",
            {
                "input": str(sample),
                "output": str(tmp_path / "edit"),
                "verify": "auto",
                "parameters": {"instruction": "Add the finding of moderate left pleural effusion"},
            },
        )
        events = poll_until(client, reaches(client, WorkerState.READY))
    finally:
        client.shutdown()
    done = events[-1]
    assert done["event"] == "done" and done["verification"]["classifiers"]["name"] == "cohort-v2"
    assert done["verification"]["max_change_outside_mask"] == 0
    assert "Verification" in (tmp_path / "edit" / "verification.txt").read_text()
