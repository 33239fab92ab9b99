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
from dicomweb_proxy import FailingProxy
from orthanc import OrthancServer

PASSWORD = "s3cret-cohort-pw"


# the study dates of the cohorts that have a month of their own (queried with --dicomweb-dates)
PEOPLE, UNREADABLE, FAILING = "20250301-20250331", "20250401-20250430", "20250501-20250531"


class CohortOrthanc(OrthancServer):
    """The Orthanc the cohort is stored in; ``cr`` is its radiograph (beside a CT in its study),
    ``dx`` the two radiographs of a series in another study; ``people`` three radiographs of
    March 2025 that state a woman of 70 (PatientAge), a man of 35 (birth and study dates) and
    nothing; ``unreadable`` a radiograph and one without pixel data of April 2025; ``failing``
    two radiographs of May 2025; ``resuming`` the two radiographs of a study of their own."""

    cr: pydicom.Dataset
    dx: list[pydicom.Dataset]
    people: list[pydicom.Dataset]
    unreadable: list[pydicom.Dataset]
    failing: list[pydicom.Dataset]
    resuming: list[pydicom.Dataset]


def patient(number: int, study_date: str, **attributes) -> pydicom.Dataset:
    """A DX film of a patient of its own, in a study of its own on ``study_date``; the patient
    attributes in ``attributes`` (None: absent)."""
    dataset = make_radiograph("DX", pixels=phantom(72, 64)[:, :: (-1) ** number])
    dataset.PatientID, dataset.PatientName, dataset.StudyDate = (
        f"COHORT-{number}",
        f"Cohort^{number}",
        study_date,
    )
    for keyword, value in attributes.items():
        if value is None:
            delattr(dataset, keyword)
        else:
            setattr(dataset, keyword, value)
    return dataset


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
    people = [
        patient(1, "20250310", PatientAge="070Y", PatientSex="F", PatientBirthDate=None),
        patient(2, "20250311", PatientBirthDate="19900615", PatientSex="M"),
        patient(3, "20250312", PatientBirthDate=None, PatientSex=""),
    ]
    unreadable = [patient(4, "20250410"), patient(5, "20250411", PixelData=None)]
    failing = [patient(6, "20250510"), patient(7, "20250511")]
    resuming = [patient(8, "20250610"), patient(9, "20250610")]
    resuming[1].PatientID, resuming[1].PatientName = resuming[0].PatientID, resuming[0].PatientName
    resuming[1].StudyInstanceUID = resuming[0].StudyInstanceUID
    cohort = {"cr": cr, "ct": ct, "dx1": dx[0], "dx2": dx[1]}
    cohort |= {
        f"p{number}": dataset for number, dataset in enumerate(people + unreadable + failing + resuming)
    }
    for name, dataset in cohort.items():
        dataset.save_as(films / f"{name}.dcm", enforce_file_format=True)
        server.upload(films / f"{name}.dcm")
    server.cr, server.dx = cr, dx
    server.people, server.unreadable, server.failing, server.resuming = people, unreadable, failing, resuming
    yield server
    server.stop()


def edit(orthanc, output, *query, store=False, password=PASSWORD, url=None):
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
            url or f"{orthanc.url}/dicom-web",
            *query,
            *(["--dicomweb-store"] if store else []),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
    )


def everything_written(folder, but=()):
    """The names and contents of every file under ``folder``, but those in its subfolders ``but``."""
    paths = [path for path in folder.rglob("*") if not set(path.relative_to(folder).parts[:-1]) & set(but)]
    return "".join(
        str(path.relative_to(folder)) + (path.read_bytes().decode("latin-1") if path.is_file() else "")
        for path in paths
    )


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


def stress(
    orthanc, output, edits, *query, password=PASSWORD, model="untrained-tiny", credentials=None, url=None
):
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
            url or f"{orthanc.url}/dicom-web",
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


def assess(
    orthanc,
    output,
    *query,
    password=PASSWORD,
    model="untrained-tiny",
    store=False,
    modes="none,rse",
    url=None,
):
    """``evaluate`` of the films the query matches, each edited with "Add the finding of edema"
    in the region modes; the password from the environment; Orthanc's service root unless
    ``url`` names another."""
    environment = {**os.environ, "INSTRUCTX2X_DICOMWEB_USER": "radiology"}
    environment["INSTRUCTX2X_DICOMWEB_PASSWORD"] = password
    return subprocess.run(
        [
            console_script("instructx2x-train"),
            "evaluate",
            str(output),
            *("--model", model, "--modes", modes, "-i", "Add the finding of edema"),
            *("--steps", "2", "--resolution", "64", "--bootstrap", "20", "--no-progress"),
            "--dicomweb",
            url or f"{orthanc.url}/dicom-web",
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


def identifying(dataset: pydicom.Dataset) -> list[str]:
    """What of a film's patient must stay out of logs, names and the report's files."""
    values = (
        dataset.PatientName,
        dataset.PatientID,
        dataset.get("PatientBirthDate"),
        dataset.get("PatientAge"),
    )
    return [str(value) for value in values if value]


def test_a_stress_test_reports_the_subgroups_each_film_states(orthanc, tmp_path, edits):
    out = tmp_path / "stress"
    completed = stress(orthanc, out, edits, "--dicomweb-dates", PEOPLE)
    assert completed.returncode == 0, completed.stderr
    report = json.loads((out / "stress-test.json").read_text())
    instructed = [row for row in report["table"] if row["role"] == "instructed"]
    # the woman of 70, the man of 35; the film that states nothing is in "all" alone
    assert [(row["subgroup"], row["films"]) for row in instructed] == [
        ("all", 3),
        ("age <45", 1),
        ("age >=65", 1),
        ("sex F", 1),
        ("sex M", 1),
    ]
    assert "## Subgroups" in (out / "stress-test.md").read_text()
    names = sorted(path.name for path in (out / "films").iterdir())
    assert names == sorted(f"{ds.SOPInstanceUID}.dcm" for ds in orthanc.people)
    for text in (completed.stdout, completed.stderr, everything_written(out, but=("films",))):
        for value in (value for ds in orthanc.people for value in identifying(ds)):
            assert value not in text


def test_an_evaluation_reports_the_subgroups_each_film_states(orthanc, tmp_path):
    out = tmp_path / "evaluation"
    completed = assess(orthanc, out, "--dicomweb-dates", PEOPLE, modes="none")
    assert completed.returncode == 0, completed.stderr
    report = json.loads((out / "evaluation.json").read_text())
    groups = report["subgroups"]["none"]
    assert list(groups) == ["age <45", "age >=65", "sex F", "sex M"]  # never a guess for the third film
    assert all(group["pairs"] == 1 for group in groups.values())
    for group in groups.values():
        assert (
            0 <= group["pathology_accuracy"] <= 100 and group["age_preservation"] == "nan"
        )  # one pair: no correlation
    assert report["dicomweb"]["films"] == 3
    markdown = (out / "evaluation.md").read_text()
    assert "| none | age >=65 | 1 |" in markdown and "| none | sex M | 1 |" in markdown
    for text in (completed.stdout, completed.stderr, everything_written(out, but=("films",))):
        for value in (value for ds in orthanc.people for value in identifying(ds)):
            assert value not in text


@pytest.mark.parametrize("command", ["evaluate", "stress-test"])
def test_a_film_that_cannot_be_edited_stops_a_new_run_before_any_edit(orthanc, tmp_path, edits, command):
    """A radiograph without pixel data: found once fetched, before any edit or reading; the
    folder the run created is gone."""
    out = tmp_path / "refused"
    if command == "evaluate":
        completed = assess(orthanc, out, "--dicomweb-dates", UNREADABLE, modes="none")
    else:
        completed = stress(orthanc, out, edits, "--dicomweb-dates", UNREADABLE)
    assert completed.returncode == 2, completed.stderr
    film = f"{orthanc.unreadable[1].SOPInstanceUID}.dcm"
    assert f"cannot be edited: {film}: the dataset has no pixel data" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert not out.exists()


@pytest.fixture
def proxy(orthanc):
    server = FailingProxy(orthanc.url)
    yield server
    server.stop()


@pytest.mark.parametrize(
    "command, status, reason",
    [
        ("evaluate", 503, "HTTP 503 after 5 attempts"),  # dicomweb_client's retries, about 30 s
        ("stress-test", 500, "HTTP 500."),
    ],
)
def test_a_server_that_fails_while_the_films_are_fetched_leaves_nothing(
    orthanc, proxy, tmp_path, edits, command, status, reason
):
    """WADO-RS answers the first film and then an HTTP error: the new run's folder is gone."""
    out, url = tmp_path / "failed", f"{proxy.url}/dicom-web"
    proxy.fail_after("retrieve", 1, status)
    if command == "evaluate":
        completed = assess(orthanc, out, "--dicomweb-dates", PEOPLE, modes="none", url=url)
    else:
        completed = stress(orthanc, out, edits, "--dicomweb-dates", PEOPLE, url=url)
    assert completed.returncode == 5, completed.stderr
    assert f"WADO-RS retrieve on the DICOMweb server failed: {reason}" in completed.stderr
    assert "Traceback" not in completed.stderr and proxy.passed["retrieve"] == 1
    assert not out.exists()


def test_a_server_that_fails_mid_cohort_keeps_the_stored_edits_and_the_run_resumes(orthanc, proxy, tmp_path):
    """STOW-RS stores the first film's edit and then answers HTTP 500: the run stops with the
    first pair recorded and stored, the second written whole but not stored and not recorded;
    the same command, once the server answers again, edits and stores the second alone (the
    query now also matches the first edit's objects: the resumed run edits the films it started
    with, recorded in cohort.json, without asking again)."""
    out, url = tmp_path / "evaluation", f"{proxy.url}/dicom-web"
    proxy.fail_after("store", 1, 500)
    completed = assess(orthanc, out, "--dicomweb-dates", FAILING, modes="none", store=True, url=url)
    assert completed.returncode == 5, completed.stderr
    assert "dicom/0001-none written but not stored" in completed.stderr
    assert "rerun the same command to resume" in completed.stderr and "Traceback" not in completed.stderr
    assert (out / "INCOMPLETE").exists() and not (out / "evaluation.json").exists()
    # the films in the order of their study UIDs: pair 0 edits the first
    first, second = sorted(orthanc.failing, key=lambda ds: ds.StudyInstanceUID)
    recorded_films = json.loads((out / "cohort.json").read_text())
    assert [film["instance"] for film in recorded_films] == [first.SOPInstanceUID, second.SOPInstanceUID]
    recorded = [json.loads(line) for line in (out / "records" / "none.rank0.jsonl").read_text().splitlines()]
    assert [(row["pair"], row["stored"]) for row in recorded] == [(0, 3)]
    assert sorted(path.name for path in (out / "dicom").iterdir()) == ["0000-none", "0001-none"]
    assert len(orthanc.study_instances(first.StudyInstanceUID)) == 1 + 3
    assert orthanc.study_instances(second.StudyInstanceUID) == [second.SOPInstanceUID]

    proxy.heal()
    completed = assess(orthanc, out, "--dicomweb-dates", FAILING, modes="none", store=True, url=url)
    assert completed.returncode == 0, completed.stderr
    report = json.loads((out / "evaluation.json").read_text())
    assert report["resumed"] is True and report["dicomweb"]["stored"] == 6
    assert not (out / "INCOMPLETE").exists()
    # each film's edit stored once, in its own study
    assert len(orthanc.study_instances(first.StudyInstanceUID)) == 1 + 3
    assert len(orthanc.study_instances(second.StudyInstanceUID)) == 1 + 3


def test_an_edit_run_whose_store_fails_mid_cohort_resumes_with_the_films_it_started_with(
    orthanc, proxy, tmp_path
):
    """`instructx2x edit --dicomweb-study --dicomweb-store`: STOW-RS stores the first film's edit
    and then answers HTTP 500, so the run stops with the first row recorded and stored. The same
    command, once the server answers again, edits and stores the second film alone; it takes the
    films from cohort.json and does not ask the server again (the study now also holds the first
    edit's objects, which are not radiographs)."""
    out, url = tmp_path / "cohort", f"{proxy.url}/dicom-web"
    study = orthanc.resuming[0].StudyInstanceUID
    first, second = sorted(orthanc.resuming, key=lambda ds: (ds.SeriesInstanceUID, ds.SOPInstanceUID))
    proxy.fail_after("store", 1, 500)
    completed = edit(orthanc, out, "--dicomweb-study", study, store=True, url=url)
    assert completed.returncode == 5, completed.stderr
    assert f"0002-{second.SOPInstanceUID} written but not stored" in completed.stderr
    assert "rerun the same command to resume" in completed.stderr and "Traceback" not in completed.stderr
    assert (out / "INCOMPLETE").exists() and not (out / "results.csv").exists()
    recorded_films = json.loads((out / "cohort.json").read_text())
    assert [film["instance"] for film in recorded_films] == [first.SOPInstanceUID, second.SOPInstanceUID]
    assert len(orthanc.study_instances(study)) == 2 + 3  # the first edit's three objects
    searched = proxy.passed["search"]  # the query (dicomweb_client asks for more until none)
    assert searched >= 1 and proxy.passed["store"] == 1

    proxy.heal()
    completed = edit(orthanc, out, "--dicomweb-study", study, store=True, url=url)
    assert completed.returncode == 0, completed.stderr
    assert proxy.passed["search"] == searched  # not asked again
    assert proxy.passed["store"] == 2  # the second edit alone
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["image"], row["stored"]) for row in rows] == [
        (f"{first.SOPInstanceUID}.dcm", "3"),
        (f"{second.SOPInstanceUID}.dcm", "3"),
    ]
    assert not (out / "INCOMPLETE").exists()
    assert sorted(path.name for path in (out / "films").iterdir()) == sorted(row["image"] for row in rows)
    assert len(orthanc.study_instances(study)) == 2 + 3 + 3  # each film's edit stored once
