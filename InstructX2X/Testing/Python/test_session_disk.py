"""The session's disk: superseded job and tau folders go, a quota refuses new jobs, on a real
MRML scene with a real worker (untrained-tiny)."""

import numpy as np
import pytest
from workers import poll_until, radiograph

from InstructX2XModuleLib import scene as layer
from InstructX2XModuleLib.session import PanelSettings

SETTINGS = PanelSettings(
    instruction="Add the finding of left pleural effusion",
    model="untrained-tiny",
    device="cpu",
    scheduler="dpm++",
    precision="fp32",
    steps=2,
    verify=False,
)


def folders(session):
    return sorted(p.name for p in session.folder.iterdir())


def test_superseded_job_and_tau_folders_are_removed(session):
    volume = radiograph(session.scene)
    session.submit("preview", volume, SETTINGS)
    poll_until(session, lambda e: any(x["event"] == "done" for x in e))
    assert folders(session) == ["job-001"]
    for tau in np.linspace(0.05, 0.95, 12):
        session.rethreshold(float(tau))
        poll_until(session, lambda e: any(x["event"] == "done" for x in e))
    assert folders(session) == ["job-001"]  # each mask is in the scene; its folder went
    assert "tau 0.95" in session.result_text
    session.submit("edit", volume, SETTINGS)
    poll_until(session, lambda e: any(x["event"] == "done" for x in e))
    assert folders(session) == ["job-014"] and session.output_folder.parent.name == "job-014"
    assert (session.output_folder / "edited.png").is_file()  # the shown result stays for its downloads
    session.submit("edit", volume, PanelSettings(**{**SETTINGS.__dict__, "steps": 400}))
    poll_until(session, lambda e: any(x["event"] == "progress" for x in e))
    session.cancel()
    poll_until(session, lambda e: any(x["event"] == "cancelled" for x in e))
    assert folders(session) == ["job-014"]  # the cancelled job's inputs went too


def test_a_session_over_its_quota_refuses_new_jobs(session):
    volume = radiograph(session.scene)
    session.quota_bytes = 1000
    session.submit("preview", volume, SETTINGS)  # an empty folder is under any quota
    poll_until(session, lambda e: any(x["event"] == "done" for x in e))
    used = session.disk_usage()
    assert used > 1000
    with pytest.raises(layer.SceneError, match="over its 0 MB quota"):
        session.submit("edit", volume, SETTINGS)
    with pytest.raises(layer.SceneError, match="quota"):
        session.rethreshold(0.5)
    assert folders(session) == ["job-001"] and session.disk_usage() == used  # nothing written
