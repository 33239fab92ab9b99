"""`instructx2x edit --dicomweb`: a cohort queried (QIDO-RS), fetched (WADO-RS), edited and stored
back (STOW-RS) against a real Orthanc with its DICOMweb plugin and HTTP basic authentication;
`instructx2x-train stress-test --dicomweb`: the films of a stress test from the same query;
`instructx2x-train evaluate --dicomweb`: an evaluation of a series of two films, its edits stored
back and read again."""

import csv
import io
import json
import os
import subprocess

import pydicom
import pytest
from console import console_script
from dicom_factory import make_radiograph, phantom
from orthanc import OrthancServer

PASSWORD = "s3cret-cohort-pw"


class CohortOrthanc(OrthancServer):
    """The Orthanc the cohort is stored in; ``cr`` is its radiograph (beside a CT in its study),
    ``dx`` the two radiographs of a series in another study."""

    cr: pydicom.Dataset
    dx: list[pydicom.Dataset]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = CohortOrthanc(tmp_path_factory.mktemp("orthanc"), users={"radiology": PASSWORD})
    server.start()
    if not server.has_dicomweb:
        server.stop()
        pytest.skip("Orthanc's DICOMweb plugin (Debian package orthanc-dicomweb) is not installed")
    films = tmp_path_factory.mktemp("films")
    cr, ct = make_radiograph("CR"), make_radiograph("CR")
    ct.Modality = "CT"  # a film of another modality in the same study: not a radiograph
    ct.StudyInstanceUID = cr.StudyInstanceUID
    # a series of two different radiographs in a study of their own
    dx = [make_radiograph("DX"), make_radiograph("DX", pixels=phantom(72, 64)[:, ::-1] * 3 // 4)]
    dx[1].StudyInstanceUID, dx[1].SeriesInstanceUID = dx[0].StudyInstanceUID, dx[0].SeriesInstanceUID
    dx[1].InstanceNumber = 2
    for name, dataset in (("cr.dcm", cr), ("ct.dcm", ct), ("dx1.dcm", dx[0]), ("dx2.dcm", dx[1])):
        dataset.save_as(films / name, enforce_file_format=True)
        server.upload(films / name)
    server.cr, server.dx = cr, dx
    yield server
    server.stop()


def edit(orthanc, output, *query, store=False, password=PASSWORD):
    environment = {**os.environ, "INSTRUCTX2X_DICOMWEB_USER": "radiology"}
    environment["INSTRUCTX2X_DICOMWEB_PASSWORD"] = password
    return subprocess.run(
        [
            console_script("instructx2x"),
            "edit",
            "-i",
            "Add the finding of edema",
            "-o",
            str(output),
            "--model",
            "untrained-tiny",
            "--steps",
            "2",
            "--resolution",
            "64",
            "--progress",
            "none",
            "--dicomweb",
            f"{orthanc.url}/dicom-web",
            *query,
            *(["--dicomweb-store"] if store else []),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
    )


def everything_written(folder):
    return "".join(path.read_bytes().decode("latin-1") for path in folder.rglob("*") if path.is_file())


def test_a_cohort_is_fetched_edited_and_stored_back_in_its_study(orthanc, tmp_path):
    out = tmp_path / "cohort"
    completed = edit(orthanc, out, "--dicomweb-modality", "CR", store=True)
    assert completed.returncode == 0, completed.stderr
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 1
    stored = [
        pydicom.dcmread(io.BytesIO(orthanc.instance_file(uid)))
        for uid in orthanc.study_instances(orthanc.cr.StudyInstanceUID)
        if uid not in (orthanc.cr.SOPInstanceUID,)
    ]
    synthetic = [ds for ds in stored if ds.get("ConversionType") == "SYN" or ds.Modality == "SEG"]
    assert len(synthetic) == 3  # counterfactual, overlay, SEG in the source's study
    assert {ds.StudyInstanceUID for ds in synthetic} == {orthanc.cr.StudyInstanceUID}
    for text in (completed.stdout, completed.stderr, everything_written(out)):
        assert PASSWORD not in text


@pytest.mark.parametrize(
    "query, password, message",
    [
        (["--dicomweb-dates", "19000101-19000102"], PASSWORD, "matched no film"),
        ([], PASSWORD, "CT"),
        (["--dicomweb-modality", "CR"], "wrong-password", "401"),
    ],
)
def test_a_cohort_that_cannot_be_edited_is_refused_before_any_folder(
    orthanc, tmp_path, query, password, message
):
    out = tmp_path / "refused"
    completed = edit(orthanc, out, *query, password=password)
    assert completed.returncode == 2 or completed.returncode == 5, completed.stderr
    assert message in completed.stderr
    assert "Traceback" not in completed.stderr and password not in completed.stderr
    assert not out.exists()


def stress(orthanc, output, edits, *query, password=PASSWORD, model="untrained-tiny", credentials=None):
    """``stress-test`` on the films the query matches; the password from the environment, or
    from a credentials file when ``credentials`` names one."""
    environment = {**os.environ, "INSTRUCTX2X_DICOMWEB_USER": "radiology"}
    environment["INSTRUCTX2X_DICOMWEB_PASSWORD"] = password
    if credentials is not None:
        credentials.write_text(json.dumps({"username": "radiology", "password": password}))
        environment = {k: v for k, v in environment.items() if not k.startswith("INSTRUCTX2X_DICOMWEB")}
        query = (*query, "--dicomweb-credentials", str(credentials))
    return subprocess.run(
        [
            console_script("instructx2x-train"),
            "stress-test",
            str(output),
            "--edits",
            str(edits),
            *("--model", model, "--steps", "2", "--resolution", "64", "--bootstrap", "20", "--no-progress"),
            "--dicomweb",
            f"{orthanc.url}/dicom-web",
            *query,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
    )


@pytest.fixture
def edits(tmp_path):
    path = tmp_path / "edits.json"
    path.write_text(json.dumps([{"instruction": "Add the finding of edema"}]))
    return path


def test_a_stress_test_reads_the_films_a_query_matches(orthanc, tmp_path, edits):
    out = tmp_path / "stress"
    completed = stress(orthanc, out, edits, "--dicomweb-modality", "CR", credentials=tmp_path / "login.json")
    assert completed.returncode == 0, completed.stderr
    film = f"{orthanc.cr.SOPInstanceUID}.dcm"
    assert [path.name for path in (out / "films").iterdir()] == [film]  # fetched with WADO-RS
    assert pydicom.dcmread(out / "films" / film).SOPInstanceUID == orthanc.cr.SOPInstanceUID
    with (out / "rows.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["classifier"], row["film"]) for row in rows] == [("cohort-v2", film)]
    report = json.loads((out / "stress-test.json").read_text())
    assert report["films"] == {"count": 1, "source": f"{orthanc.url}/dicom-web"}
    assert report["settings"]["dicomweb"]["modality"] == "CR"
    for text in (completed.stdout, completed.stderr, everything_written(out)):
        assert PASSWORD not in text


@pytest.mark.parametrize(
    "query, password, message, code",
    [
        (["--dicomweb-dates", "19000101-19000102"], PASSWORD, "matched no film", 2),
        ([], PASSWORD, "are not radiographs", 2),
        (["--dicomweb-modality", "CR"], "wrong-password", "HTTP 401", 5),
    ],
)
def test_a_stress_test_query_that_gives_no_films_is_refused_before_the_model(
    orthanc, tmp_path, edits, query, password, message, code
):
    """A model that does not exist: the query's error comes first, so it was asked first."""
    out = tmp_path / "refused"
    completed = stress(orthanc, out, edits, *query, password=password, model=str(tmp_path / "no-model"))
    assert completed.returncode == code, completed.stderr
    assert message in completed.stderr and "no-model" not in completed.stderr
    assert "Traceback" not in completed.stderr and password not in completed.stderr
    assert not out.exists()


def assess(orthanc, output, *query, password=PASSWORD, model="untrained-tiny", store=False):
    """``evaluate`` of the films the query matches, each edited with "Add the finding of edema"
    in two region modes; the password from the environment."""
    environment = {**os.environ, "INSTRUCTX2X_DICOMWEB_USER": "radiology"}
    environment["INSTRUCTX2X_DICOMWEB_PASSWORD"] = password
    return subprocess.run(
        [
            console_script("instructx2x-train"),
            "evaluate",
            str(output),
            *("--model", model, "--modes", "none,rse", "-i", "Add the finding of edema"),
            *("--steps", "2", "--resolution", "64", "--bootstrap", "20", "--no-progress"),
            "--dicomweb",
            f"{orthanc.url}/dicom-web",
            *query,
            *(["--dicomweb-store"] if store else []),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
    )


def test_an_evaluation_of_a_query_stores_its_edits_in_each_study(orthanc, tmp_path):
    out = tmp_path / "evaluation"
    completed = assess(orthanc, out, "--dicomweb-series", orthanc.dx[0].SeriesInstanceUID, store=True)
    assert completed.returncode == 0, completed.stderr
    films = sorted(f"{ds.SOPInstanceUID}.dcm" for ds in orthanc.dx)
    assert sorted(path.name for path in (out / "films").iterdir()) == films  # fetched with WADO-RS
    report = json.loads((out / "evaluation.json").read_text())
    assert report["dicomweb"] == {
        "url": f"{orthanc.url}/dicom-web",
        "films": 2,
        "instructions": 1,
        "pairs": 2,
        "stored": 12,  # 2 films x 2 modes x (counterfactual, overlay, SEG)
    }
    assert report["settings"]["dicomweb"]["series"] == orthanc.dx[0].SeriesInstanceUID
    assert list(report["rows"]) == ["none", "rse"]  # no real-image row: there is no true counterfactual
    assert set(report["not_measured"]) == {"real images", "kl", "fid"}
    assert report["source_labels"] == {"truth": 0, "classifier": 2}
    for row in report["rows"].values():
        assert "kl" not in row and "fid" not in row
        assert 0 <= row["pathology_accuracy"] <= 100 and 0 <= row["race_preservation"] <= 100
    assert "Not measured on DICOMweb films" in (out / "evaluation.md").read_text()
    with (out / "pairs.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(f"{row['pair_id']}.dcm" for row in rows if row["mode"] == "none") == films
    assert not (out / "INCOMPLETE").exists()
    # read back: each edit's objects are in the study of the film it edits
    study = orthanc.dx[0].StudyInstanceUID
    originals = {ds.SOPInstanceUID for ds in orthanc.dx}
    stored = [
        pydicom.dcmread(io.BytesIO(orthanc.instance_file(uid)))
        for uid in orthanc.study_instances(study)
        if uid not in originals
    ]
    assert len(stored) == 12 and {ds.StudyInstanceUID for ds in stored} == {study}
    written = {
        json.loads(path.read_text())["objects"]["counterfactual.dcm"]["sop_instance_uid"]
        for path in (out / "dicom").glob("*/provenance.json")
    }
    assert len(written) == 4 and written <= {ds.SOPInstanceUID for ds in stored}
    for text in (completed.stdout, completed.stderr, everything_written(out)):
        assert PASSWORD not in text


@pytest.mark.parametrize(
    "query, password, message, code",
    [
        (["--dicomweb-dates", "19000101-19000102"], PASSWORD, "matched no film", 2),
        ([], PASSWORD, "are not radiographs", 2),
        (["--dicomweb-study", "1.2.3.4.5"], PASSWORD, "matched no film", 2),
        (["--dicomweb-modality", "CR"], PASSWORD, "matched 1 film(s): 1 pair(s)", 2),
        (["--dicomweb-modality", "DX"], "wrong-password", "HTTP 401", 5),
    ],
)
def test_an_evaluation_query_that_gives_no_pairs_is_refused_before_the_model(
    orthanc, tmp_path, query, password, message, code
):
    """A model that does not exist: the query's error comes first, so it was asked first."""
    out = tmp_path / "refused"
    completed = assess(orthanc, out, *query, password=password, model=str(tmp_path / "no-model"), store=True)
    assert completed.returncode == code, completed.stderr
    assert message in completed.stderr and "no-model" not in completed.stderr
    assert "Traceback" not in completed.stderr and password not in completed.stderr
    assert not out.exists()
