"""The panel's PACS push: ``instructx2x push`` run from the worker's package set, so that
Slicer's process (whose Python has no pynetdicom or highdicom) imports neither."""

import ast
import io
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pydicom
import pytest
from orthanc import OrthancServer, free_port

ROOT = Path(__file__).resolve().parents[3]
SAMPLE = ROOT / "Resources" / "Samples" / "phantom_pa.dcm"
CLI = [sys.executable, "-m", "instructx2x.cli"]  # the worker's command, as worker_command gives it in Slicer

# Slicer's process: pynetdicom and highdicom cannot be imported
SLICER_SIDE = textwrap.dedent("""\
    import json, sys
    for name in ("pynetdicom", "highdicom", "torch"):
        sys.modules[name] = None
    sys.path.insert(0, sys.argv[1])
    from InstructX2XModuleLib import packages
    from InstructX2XModuleLib.worker import WorkerError
    command, folder, target = json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
    try:
        print(json.dumps({"sent": packages.push_series(command, folder, target)}))
    except WorkerError as error:
        print(json.dumps({"error": str(error)}))
    """)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = OrthancServer(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()


@pytest.fixture
def series(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    shutil.copy(SAMPLE, folder / "counterfactual.dcm")
    return folder


def push_from_slicer(folder, target) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", SLICER_SIDE, str(ROOT / "InstructX2X"), json.dumps(CLI), str(folder), target],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_the_push_runs_in_the_workers_python_and_reaches_orthanc(orthanc, series):
    uid = pydicom.dcmread(series / "counterfactual.dcm", stop_before_pixels=True).SOPInstanceUID
    outcome = push_from_slicer(series, f"127.0.0.1:{orthanc.dicom_port}:{orthanc.aet}")
    assert outcome == {"sent": f"sent 1 files to {orthanc.aet} at 127.0.0.1:{orthanc.dicom_port}"}
    assert pydicom.dcmread(io.BytesIO(orthanc.instance_file(uid))).SOPInstanceUID == uid


def test_refused_pushes_say_why_with_the_clis_exit_status(orthanc, series, tmp_path):
    before = orthanc.instance_count()
    refused = push_from_slicer(series, f"127.0.0.1:{orthanc.dicom_port}:WRONGAET")
    assert "rejected or not answered" in refused["error"] and "exit status 5" in refused["error"]
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = push_from_slicer(empty, f"127.0.0.1:{free_port()}:{orthanc.aet}")
    assert nothing["error"] == "the series was not sent: empty holds no .dcm file to send. (exit status 2)"
    malformed = push_from_slicer(series, "127.0.0.1:104")
    assert "HOST:PORT:AET" in malformed["error"] and "exit status 2" in malformed["error"]
    assert orthanc.instance_count() == before


def test_the_module_file_imports_no_pacs_or_dicom_writing_code():
    """Slicer's process runs InstructX2X.py: the PACS and DICOM-writing modules need pynetdicom
    and highdicom, which Slicer does not ship."""
    tree = ast.parse((ROOT / "InstructX2X" / "InstructX2X.py").read_text())
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    } | {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {
        name
        for name in imported
        if name.split(".")[0] in ("pynetdicom", "highdicom") or name.startswith("instructx2x.dicom")
    }
