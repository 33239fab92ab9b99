"""A panel's verification report holds the classifiers' age, sex and race estimates only when
the user ticks the box (the panels' settings -> the job -> the worker), on the demo model."""

import json
from pathlib import Path

from workers import poll_until

from InstructX2XModuleLib import scene as layer
from InstructX2XModuleLib.session import PanelSettings, dicom_pixels

SAMPLE = Path(__file__).resolve().parents[3] / "Resources" / "Samples" / "phantom_pa.dcm"


def test_demographic_estimates_reach_the_report_only_when_asked(session):
    volume = layer.array_to_volume(session.scene, dicom_pixels(SAMPLE), "chest")
    reports = {}
    for asked in (False, True):
        settings = PanelSettings(
            instruction="Add the finding of left pleural effusion",
            model="demo",
            device="cpu",
            steps=2,
            verify=True,
            include_demographics=asked,
        )
        session.submit("edit", volume, settings)
        poll_until(session, lambda e: any(x["event"] in ("done", "error") for x in e), timeout=300)
        reports[asked] = json.loads((session.output_folder / "verification.json").read_text())
    assert "demographic_estimates" not in reports[False] and "demographic_estimates" in reports[True]
    assert "estimate" in json.dumps(reports[True]["demographic_estimates"]).lower()
