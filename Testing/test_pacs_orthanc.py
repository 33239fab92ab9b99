"""Push edits to a real Orthanc with C-STORE and STOW-RS; read them back over REST."""

import io
import json
import subprocess

import numpy as np
import pydicom
import pytest
from console import console_script
from dicom_factory import dciodvfy_errors, pydicom_data_file
from orthanc import OrthancServer, free_port

from instructx2x import EditParameters, InstructX2XEditor, read_dicom
from instructx2x.dicom import export_dicom_edit
from instructx2x.dicom.dicomweb import push_stow
from instructx2x.dicom.pacs import CStoreTarget, PacsError, echo, push_cstore
from instructx2x.loading import load_pipeline

RG1 = pydicom_data_file("RG1_UNCR.dcm")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = OrthancServer(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    editor = InstructX2XEditor(*load_pipeline("untrained-tiny"), device="cpu", dtype="fp32")
    image = read_dicom(RG1)

    def export(name):
        result = editor.edit(
            image, EditParameters("Add the finding of edema", num_inference_steps=2, resolution=64)
        )
        paths = export_dicom_edit(image, result, tmp_path_factory.mktemp("exports") / name)
        files = [paths[n] for n in ("counterfactual.dcm", "guidance_overlay.dcm", "edit_region_seg.dcm")]
        assert all(dciodvfy_errors(path) == [] for path in files)
        return files

    return export


def assert_round_trip(orthanc, paths):
    for path in paths:
        sent = pydicom.dcmread(path)
        stored = pydicom.dcmread(io.BytesIO(orthanc.instance_file(sent.SOPInstanceUID)))
        for keyword in (
            "SOPClassUID",
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SeriesDescription",
            "PatientID",
            "Rows",
            "Columns",
            "PhotometricInterpretation",
        ):
            assert stored.get(keyword) == sent.get(keyword), keyword
        assert np.array_equal(stored.pixel_array, sent.pixel_array)
        if sent.Modality != "SEG":
            assert stored.ConversionType == "SYN"


def test_cstore_round_trip(orthanc, exported):
    paths = exported("cstore")
    push_cstore(paths, CStoreTarget("127.0.0.1", orthanc.dicom_port, orthanc.aet))
    assert_round_trip(orthanc, paths)


def test_stow_rs_round_trip(orthanc, exported):
    if not orthanc.has_dicomweb:
        pytest.skip("Orthanc's DICOMweb plugin (Debian package orthanc-dicomweb) is not installed")
    paths = exported("stow")
    push_stow(paths, f"{orthanc.url}/dicom-web")
    assert_round_trip(orthanc, paths)


def test_refusals_are_errors(orthanc, exported):
    paths = exported("refused")
    before = orthanc.instance_count()
    with pytest.raises(PacsError, match="rejected or not answered"):
        push_cstore(paths, CStoreTarget("127.0.0.1", orthanc.dicom_port, "WRONGAET"), timeout=5)
    with pytest.raises(PacsError, match="rejected or not answered"):
        push_cstore(paths, CStoreTarget("127.0.0.1", free_port(), orthanc.aet), timeout=5)
    with pytest.raises(PacsError, match="STOW-RS"):
        push_stow(paths, f"{orthanc.url}/no-such-service")
    assert orthanc.instance_count() == before


def test_echo_tests_the_connection(orthanc):
    echo(CStoreTarget("127.0.0.1", orthanc.dicom_port, orthanc.aet))
    with pytest.raises(PacsError, match="rejected or not answered"):
        echo(CStoreTarget("127.0.0.1", orthanc.dicom_port, "WRONGAET"), timeout=5)
    with pytest.raises(PacsError, match="rejected or not answered"):
        echo(CStoreTarget("127.0.0.1", free_port(), orthanc.aet), timeout=5)


@pytest.mark.parametrize(
    "text,match",
    [
        ("host:port:AE", "HOST:PORT:AET"),
        (":104:AE", "host"),
        ("h:0:AE", "port"),
        ("h:104:" + "A" * 17, "AE title"),
        ("h:104:A\\B", "AE title"),
    ],
)
def test_bad_targets(text, match):
    with pytest.raises(ValueError, match=match):
        CStoreTarget.parse(text)


def test_cli_edit_and_push(orthanc, tmp_path):
    out = tmp_path / "out"
    completed = subprocess.run(
        [
            console_script("instructx2x"),
            "edit",
            RG1,
            "-i",
            "Remove the finding of pneumothorax",
            "-o",
            str(out),
            "--model",
            "untrained-tiny",
            "--steps",
            "2",
            "--resolution",
            "64",
            "--progress",
            "none",
            "--push-cstore",
            f"127.0.0.1:{orthanc.dicom_port}:{orthanc.aet}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    summary = json.loads(completed.stdout)
    assert summary["pushed_cstore"].endswith(orthanc.aet)
    assert_round_trip(orthanc, [out / name for name in summary["files"] if name.endswith(".dcm")])
    assert "Test" not in completed.stderr and "ward" not in completed.stderr
