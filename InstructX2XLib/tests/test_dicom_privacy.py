"""What the written objects say about the patient and the source: only what is true and asked for.

BurnedInAnnotation follows the source; one patient/study policy for the SC, the overlay SC and
the SEG; a coded derivation; the source named by a hash label, never its file name; inferred
age, sex and race in the outputs only when asked for.
"""

import hashlib
import json

import numpy as np
import pydicom
import pytest
from dicom_factory import dciodvfy_errors, make_radiograph, write
from pydicom import Dataset
from pydicom.sr.codedict import codes

from instructx2x import EditParameters, InstructX2XEditor
from instructx2x.classifiers import RACES, ClassifierSet, Predictions
from instructx2x.dicom.patient import patient_and_study_keywords
from instructx2x.dicom.write import LOCAL_SCHEME, build_edit_objects, read_provenance
from instructx2x.errors import ParameterError
from instructx2x.jobs import EditJob, prepare, run_job
from instructx2x.loading import ModelInfo
from instructx2x.provenance import source_label
from instructx2x.verification import DEMOGRAPHIC_FIELDS, DEMOGRAPHICS_LABEL, verify_edit

NAMES = ("counterfactual.dcm", "guidance_overlay.dcm", "edit_region_seg.dcm")
# Patient and Study module attributes a source may hold that no derived object may carry.
NEVER_COPIED = (
    "PatientComments",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientAge",
    "PatientWeight",
    "PatientSize",
    "AdditionalPatientHistory",
    "MedicalAlerts",
    "Occupation",
    "ClinicalTrialSponsorName",
    "ConsultingPhysicianName",
    "AdmissionID",
    "ResponsiblePerson",
)
DEIDENTIFICATION = ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence")


def write_objects(source: Dataset, folder) -> dict:
    """The three objects of an edit of ``source`` (blank counterfactual, one-pixel-border mask),
    written to ``folder`` and read back; each checked by dciodvfy."""
    rows, columns = int(source.Rows), int(source.Columns)
    mask = np.zeros((rows, columns), bool)
    mask[10:30, 10:30] = True
    objects = build_edit_objects(
        source,
        np.zeros((rows, columns), np.uint16),
        np.zeros((rows, columns, 3), np.uint8),
        mask,
        {"input": {"label": "x"}},
    )
    folder.mkdir()
    read = {}
    for name, dataset in objects.named().items():
        dataset.save_as(folder / name, enforce_file_format=True)
        assert dciodvfy_errors(folder / name) == [], name
        read[name] = pydicom.dcmread(folder / name)
    return read


def rich_source() -> Dataset:
    """A radiograph whose Patient and Study modules hold far more than the objects may carry."""
    ds = make_radiograph()
    ds.PatientComments = "lives at 12 Elm Street"
    other = Dataset()
    other.PatientID, other.IssuerOfPatientID, other.TypeOfPatientID = "OTHER-77", "Other Hospital", "TEXT"
    ds.OtherPatientIDsSequence = [other]
    ds.OtherPatientNames = "Smith^Janet"
    ds.PatientAge, ds.PatientWeight, ds.PatientSize = "051Y", 71.5, 1.68
    ds.AdditionalPatientHistory, ds.MedicalAlerts, ds.Occupation = "smoker", "penicillin", "miner"
    ds.ClinicalTrialSponsorName, ds.ConsultingPhysicianName = "Sponsor", "Consult^Ant"
    ds.AdmissionID, ds.ResponsiblePerson = "ADM-1", "Guardian^Gus"
    ds.IssuerOfPatientID, ds.StudyDescription = "Main Hospital", "CHEST PA"
    return ds


def patient_module(ds: Dataset) -> dict:
    """Every Patient and Study module attribute present, with its value."""
    keywords = patient_and_study_keywords() | set(NEVER_COPIED) | set(DEIDENTIFICATION)
    return {k: ds[k].to_json_dict(None, 1024) for k in ds.dir() if k in keywords}


def test_patient_module_is_one_policy_across_all_three_objects(tmp_path):
    source = rich_source()
    source.PatientIdentityRemoved, source.DeidentificationMethod = "YES", "pseudonymised by the site"
    before = source.to_json_dict()
    read = write_objects(source, tmp_path / "rich")
    assert source.to_json_dict() == before  # the source's header is not changed
    modules = [patient_module(read[name]) for name in NAMES]
    assert modules[0] == modules[1] == modules[2]
    expected = {
        k: source[k].to_json_dict(None, 1024)
        for k in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "PatientSex",
            "StudyDate",
            "StudyTime",
            "ReferringPhysicianName",
            "StudyID",
            "AccessionNumber",
            "StudyInstanceUID",
            "IssuerOfPatientID",
            "StudyDescription",
            "PatientIdentityRemoved",
            "DeidentificationMethod",
        )
    }
    assert modules[0] == expected
    for name in NAMES:
        assert not [k for k in NEVER_COPIED if k in read[name]], name
        assert b"Elm Street" not in (tmp_path / "rich" / name).read_bytes()


@pytest.mark.parametrize("removed,method", [("NO", None), ("YES", None), (None, None)])
def test_deidentification_is_claimed_only_when_the_source_says_so_with_its_method(tmp_path, removed, method):
    source = make_radiograph()
    if removed is not None:
        source.PatientIdentityRemoved = removed
    read = write_objects(source, tmp_path / "objects")
    for name in NAMES:
        assert not [k for k in DEIDENTIFICATION if k in read[name]], name


def test_type_2_patient_attributes_stay_present_and_empty_when_the_source_lacks_them(tmp_path):
    source = make_radiograph()
    del source.PatientBirthDate, source.ReferringPhysicianName, source.AccessionNumber
    read = write_objects(source, tmp_path / "objects")
    modules = [patient_module(read[name]) for name in NAMES]
    assert modules[0] == modules[1] == modules[2]
    for keyword in ("PatientBirthDate", "ReferringPhysicianName", "AccessionNumber"):
        assert keyword in read["edit_region_seg.dcm"] and read["edit_region_seg.dcm"][keyword].value in (
            "",
            None,
        )


@pytest.mark.parametrize("said,written", [("YES", "YES"), ("NO", "NO"), (None, "YES"), ("", "YES")])
def test_burned_in_annotation_follows_the_source_and_never_claims_no_unasked(tmp_path, said, written):
    source = make_radiograph()
    if said is not None:
        source.BurnedInAnnotation = said
    read = write_objects(source, tmp_path / "objects")
    for name in ("counterfactual.dcm", "guidance_overlay.dcm"):  # both show the source's pixels
        assert read[name].BurnedInAnnotation == written, name


def coded(item) -> tuple:
    return item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning


def test_derivation_is_coded_and_its_local_scheme_declared(tmp_path):
    read = write_objects(make_radiograph(), tmp_path / "objects")
    mask_code = codes.cid7203.PixelByPixelMask  # CID 7203 "Image Derivation"
    assert (mask_code.value, mask_code.scheme_designator, mask_code.meaning) == (
        "113047",
        "DCM",
        "Pixel by pixel mask",
    )
    counterfactual = [coded(item) for item in read["counterfactual.dcm"].DerivationCodeSequence]
    assert counterfactual == [
        ("IX2X-GEN", LOCAL_SCHEME, "Synthesized by a generative model from the source image"),
        ("113047", "DCM", "Pixel by pixel mask"),
    ]
    overlay = [coded(item) for item in read["guidance_overlay.dcm"].DerivationCodeSequence]
    assert overlay == [("IX2X-OVERLAY", LOCAL_SCHEME, "Guidance map blended over the source image")]
    for name in ("counterfactual.dcm", "guidance_overlay.dcm"):
        schemes = [item.CodingSchemeDesignator for item in read[name].CodingSchemeIdentificationSequence]
        assert schemes == [LOCAL_SCHEME], name
    frame = read["edit_region_seg.dcm"].PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert [coded(item) for item in frame.DerivationCodeSequence] == [("113076", "DCM", "Segmentation")]


def test_source_label_is_a_hash_prefix():
    digest = hashlib.sha256(b"film").hexdigest()
    assert source_label(digest) == "source-" + digest[:12]
    assert source_label(digest.upper()) == "source-" + digest[:12]
    for bad in ("patient_smith.dcm", digest[:-1], "g" * 64):
        with pytest.raises(ValueError, match="64 hex digits"):
            source_label(bad)


class FixedReader(ClassifierSet):
    """Fixed findings; age, sex and race that move between the source and the edit."""

    name, caveat = "fixed reader", "test double"

    def predict(self, images, batch_size=32):
        count = len(images)
        assert count == 2
        findings = np.array([[0.1, 0.2, 0.1, 0.2, 0.1], [0.1, 0.2, 0.1, 0.9, 0.1]])
        race = np.array([[0.71234, 0.2, 0.08766], [0.1, 0.83456, 0.06544]])
        return Predictions(
            findings=findings,
            age=np.array([61.2345, 73.4567]),
            race=race,
            features=np.zeros((2, 4)),
            sex_female=np.array([0.31234, 0.64321]),
        )


def test_verification_report_holds_demographics_only_when_asked_and_labelled():
    film = np.full((64, 64), 0.3, np.float32)
    mask = np.zeros(film.shape, bool)
    mask[40:, 40:] = True
    report = verify_edit(film, film, mask, "Add the finding of left pleural effusion", FixedReader())
    assert not report.passed and len(report.collateral) == 3  # age, race and sex moved
    plain = report.to_dict()
    text = json.dumps(plain) + report.summary()
    assert not set(DEMOGRAPHIC_FIELDS) & set(plain) and "demographic_estimates" not in plain
    for secret in ("61.2", "73.4", "71.2", "0.31", "0.64", "0.83", *RACES):
        assert secret not in text, secret
    assert "age estimate moved by more than 5 years" in plain["collateral"]
    assert "values not shown" in report.summary()
    shown = report.to_dict(include_demographics=True)
    estimates = shown["demographic_estimates"]
    assert estimates["label"] == DEMOGRAPHICS_LABEL and "model estimates" in estimates["label"]
    assert estimates["age_before"] == 61.2345 and estimates["sex_female_after"] == 0.64321
    assert estimates["race_after"] == dict(zip(RACES, [0.1, 0.83456, 0.06544]))
    summary = report.summary(include_demographics=True)
    assert f"{DEMOGRAPHICS_LABEL}: age 61.2 -> 73.5 years; race {RACES[0]} -> {RACES[1]}" in summary


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"include_demographics": "yes", "verify": "cohort-v2"}, "true or false"),
        ({"include_demographics": True}, "needs verify"),
    ],
)
def test_include_demographics_is_checked_before_anything_runs(tmp_path, fields, message):
    with pytest.raises(ParameterError, match=message):
        EditJob.from_dict(
            {
                "command": "edit",
                "input": str(tmp_path / "a.dcm"),
                "output": str(tmp_path / "out"),
                "parameters": {"instruction": "Add edema"},
                **fields,
            }
        )
    assert list(tmp_path.iterdir()) == []


INFO = ModelInfo("untrained-tiny", "untrained", "a" * 64, False)


@pytest.fixture(scope="module")
def named_after_a_patient(tiny_pipe, tmp_path_factory):
    """One DICOM film in a file named after its patient, edited and verified twice: without
    and with the demographic estimates."""
    editor = InstructX2XEditor(tiny_pipe, INFO, device="cpu", dtype="fp32")
    folder = tmp_path_factory.mktemp("privacy")
    path = write(make_radiograph(rows=96, columns=80), folder / "patient_smith.dcm")
    runs = {}
    for include in (False, True):
        job = EditJob(
            "edit",
            path,
            folder / f"out-{include}",
            EditParameters("Add the finding of left pleural effusion", num_inference_steps=2, resolution=64),
            verify="cohort-v2",
            include_demographics=include,
        )
        events: list[dict] = []
        done = run_job(prepare(job), editor, events.append)
        runs[include] = (job.output, done)
    return path, runs


def every_file(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_source_file_name_appears_in_no_written_file(named_after_a_patient):
    path, runs = named_after_a_patient
    label = "source-" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    for output, _ in runs.values():
        files = every_file(output)
        assert {*NAMES, "provenance.json", "manifest.json", "verification.json"} <= set(files)
        for name, content in files.items():
            assert b"patient_smith" not in content.lower(), name
        assert json.loads(files["provenance.json"])["input"]["label"] == label
        assert json.loads(files["manifest.json"])["input"]["label"] == label
        for name in NAMES:
            assert read_provenance(pydicom.dcmread(output / name))["input"]["label"] == label


def test_demographic_estimates_are_written_only_when_asked(named_after_a_patient):
    _, runs = named_after_a_patient
    (plain, plain_done), (asked, asked_done) = runs[False], runs[True]
    shown = json.loads((asked / "verification.json").read_text())
    estimates = shown["demographic_estimates"]
    assert estimates["label"] == DEMOGRAPHICS_LABEL and asked_done["verification"] == shown
    assert DEMOGRAPHICS_LABEL in (asked / "verification.txt").read_text()
    values = [
        estimates["age_before"],
        estimates["age_after"],
        estimates["sex_female_before"],
        *estimates["race_before"].values(),
    ]
    reprs = [json.dumps(v).encode() for v in values]  # as the JSON files would write them
    plain_report = json.loads((plain / "verification.json").read_text())
    assert plain_done["verification"] == plain_report
    assert not set(DEMOGRAPHIC_FIELDS) & set(plain_report) and "demographic_estimates" not in plain_report
    for folder, reports in ((plain, True), (asked, False)):
        for name, content in every_file(folder).items():
            if name.startswith("verification") and not reports:
                continue  # asked for: the report holds them, nothing else does
            for value in reprs:
                assert value not in content, (folder.name, name, value)
            if name.endswith((".json", ".txt")):
                for race in RACES:
                    assert race.encode() not in content, (folder.name, name, race)


def cli_args(png, out, *extra):
    return [
        "edit",
        str(png),
        "-i",
        "Add the finding of right pleural effusion",
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
        *extra,
    ]


def test_the_cli_asks_for_demographics_with_a_flag_that_needs_verify(png, tmp_path, capsys):
    from instructx2x.cli import main

    assert main(cli_args(png, tmp_path / "refused", "--include-demographics")) == 2
    assert "include_demographics needs verify" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    for flags, shown in (([], False), (["--include-demographics"], True)):
        out = tmp_path / f"out-{shown}"
        assert main(cli_args(png, out, "--verify", "cohort-v2", *flags)) == 0
        report = json.loads((out / "verification.json").read_text())
        assert ("demographic_estimates" in report) is shown
        assert (DEMOGRAPHICS_LABEL in (out / "verification.txt").read_text()) is shown
