import dataclasses
import gzip
import shutil

import pandas as pd
import pytest

from instructx2x_train.dataset import INCOMPLETE_MARKER, BuildConfig, build_dataset
from instructx2x_train.tables import TableError


def test_stage_counts_add_up(built, cohort):
    _, output, manifest = built
    counts = manifest["counts"]
    questions = pd.read_csv(cohort / "mimic_pair_questions.csv")
    assert counts["questions_read"] == len(questions)
    assert counts["difference_questions"] == (questions.question_type == "difference").sum()
    dropped = sum(
        counts.get(k, 0)
        for k in (
            "dropped_nothing_changed",
            "skipped_no_pa_view",
            "skipped_past_image_already_used",
            "dropped_no_finding_undersampling",
            "skipped_multi_finding",
            "skipped_unparseable_answer",
        )
    )
    assert counts["pairs_planned"] + dropped == counts["difference_questions"]
    assert counts["skipped_no_pa_view"] > 0  # AP-only studies are in the cohort
    after_images = sum(
        counts.get(k, 0)
        for k in ("kept", "dropped_low_registration_score", "skipped_missing_image", "skipped_corrupt_image")
    )
    assert after_images == counts["pairs_planned"]
    table = pd.read_csv(output / "instructions.csv")
    assert list(table.columns) == ["split", "past_dicom_id", "current_dicom_id", "instruction"]
    assert len(table) == manifest["instructions"] and manifest["kept_pairs"] == counts["kept"] > 0
    assert sum(manifest["per_split"].values()) == counts["kept"]
    assert not (output / INCOMPLETE_MARKER).exists() and manifest["complete"]
    for row in table.itertuples():
        assert (output / "past" / f"{row.past_dicom_id}.jpg").is_file()
        assert (output / "current" / f"{row.current_dicom_id}.jpg").is_file()
    assert "Kept pairs" in (output / "report.md").read_text()


def test_split_integrity(built, cohort):
    _, output, _ = built
    table = pd.read_csv(output / "instructions.csv")
    metadata = pd.read_csv(cohort / "mimic-cxr-2.0.0-metadata.csv.gz")
    subject = metadata.set_index("dicom_id").subject_id
    table["subject"] = table.current_dicom_id.map(subject).astype(str)
    assert (table.groupby("subject").split.nunique() == 1).all()  # no subject in two splits
    assert set(table[table.subject.str.startswith("19")].split) <= {"test"}
    assert (table.split == "test").any() and (table.split == "train").any()
    assert set(table.split) <= {"train", "validation", "test"}
    assert (table.past_dicom_id.map(subject) == table.current_dicom_id.map(subject)).all()


def test_rerun_is_idempotent_and_resumes(built, tmp_path):
    config, output, manifest = built
    copy = tmp_path / "dataset"
    shutil.copytree(output, copy)
    before = {name: (copy / name).read_bytes() for name in ("instructions.csv", "manifest.json")}
    image = next((copy / "current").iterdir())
    stamp = image.stat().st_mtime_ns
    assert build_dataset(config, copy) == manifest
    assert {name: (copy / name).read_bytes() for name in before} == before
    assert image.stat().st_mtime_ns == stamp  # finished pairs were skipped, not redone
    # an interrupted build: half the records and images gone, manifest not yet written
    records = sorted((copy / ".work" / "records").iterdir())
    for record in records[::2]:
        record.unlink()
    (copy / "manifest.json").unlink()
    assert build_dataset(config, copy) == manifest
    assert (copy / "instructions.csv").read_bytes() == before["instructions.csv"]


def test_registration_threshold_discards_pairs(cohort, tmp_path):
    manifest = build_dataset(
        BuildConfig(cohort, cohort, resolution=64, registration_threshold=1.0), tmp_path / "strict"
    )
    assert manifest["kept_pairs"] == 0
    assert manifest["counts"]["dropped_low_registration_score"] == manifest["counts"]["pairs_planned"]
    assert pd.read_csv(tmp_path / "strict" / "instructions.csv").empty


def test_no_finding_undersampling_and_multi_finding_modes(cohort, tmp_path):
    all_kept = build_dataset(BuildConfig(cohort, cohort, resolution=64, no_finding_ratio=1.0), tmp_path / "a")
    none_kept = build_dataset(
        BuildConfig(cohort, cohort, resolution=64, no_finding_ratio=0.0), tmp_path / "b"
    )
    assert all_kept["counts"].get("dropped_no_finding_undersampling", 0) == 0
    assert none_kept["counts"]["dropped_no_finding_undersampling"] > 0
    per = build_dataset(
        BuildConfig(cohort, cohort, resolution=64, multi_finding="per-finding"), tmp_path / "c"
    )
    single = build_dataset(
        BuildConfig(cohort, cohort, resolution=64, multi_finding="single-only"), tmp_path / "d"
    )
    assert (
        per["instructions"]
        > per["kept_pairs"]
        == single["kept_pairs"] + single["counts"]["skipped_multi_finding"]
    )


def _copy_cohort(cohort, tmp_path):
    copy = tmp_path / "cohort"
    shutil.copytree(cohort, copy)
    return copy


def test_missing_and_corrupt_images_are_counted(cohort, tmp_path, built):
    copy = _copy_cohort(cohort, tmp_path)
    table = pd.read_csv(built[1] / "instructions.csv")
    only_current = [d for d in table.current_dicom_id if d not in set(table.past_dicom_id)]
    images = {p.stem: p for p in copy.rglob("*.jpg")}
    images[only_current[0]].unlink()
    images[only_current[1]].write_bytes(b"\xff\xd8\xff broken")
    manifest = build_dataset(BuildConfig(copy, copy, resolution=64), tmp_path / "out")
    assert manifest["counts"]["skipped_missing_image"] == 1
    assert manifest["counts"]["skipped_corrupt_image"] == 1


def test_unknown_question_types_are_counted(cohort, tmp_path, caplog):
    copy = _copy_cohort(cohort, tmp_path)
    questions = pd.read_csv(copy / "mimic_pair_questions.csv")
    questions.loc[questions.question_type == "view", "question_type"] = "mystery"
    questions.to_csv(copy / "mimic_pair_questions.csv", index=False)
    manifest = build_dataset(BuildConfig(copy, copy, resolution=64), tmp_path / "out")
    assert manifest["counts"]["skipped_unknown_question_type:mystery"] > 0
    assert "unknown type 'mystery'" in caplog.text


def test_renamed_column_fails_before_writing(cohort, tmp_path):
    copy = _copy_cohort(cohort, tmp_path)
    path = copy / "mimic-cxr-2.0.0-metadata.csv.gz"
    table = pd.read_csv(path).rename(columns={"ViewPosition": "view_position"})
    with gzip.open(path, "wt") as handle:
        table.to_csv(handle, index=False)
    with pytest.raises(TableError, match="lacks column\\(s\\) ViewPosition.*expected at least"):
        build_dataset(BuildConfig(copy, copy), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    fresh = tmp_path / "fresh"
    shutil.copytree(cohort, fresh)
    (fresh / "mimic_all.csv").unlink()
    with pytest.raises(FileNotFoundError, match="mimic_all.csv"):
        build_dataset(BuildConfig(fresh, fresh), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_foreign_folder_and_changed_settings_are_refused(built, cohort, tmp_path):
    (tmp_path / "mine").mkdir()
    with pytest.raises(FileExistsError):
        build_dataset(BuildConfig(cohort, cohort, resolution=64), tmp_path / "mine")
    config, output, _ = built
    with pytest.raises(FileExistsError):
        build_dataset(BuildConfig(cohort, cohort, resolution=96), output)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"multi_finding": "x"}, "multi_finding"),
        ({"registration_threshold": 2}, "registration"),
        ({"no_finding_ratio": -1}, "no_finding"),
        ({"resolution": 8}, "resolution"),
        ({"image_format": "tif"}, "image_format"),
    ],
)
def test_bad_settings(cohort, kwargs, match):
    with pytest.raises(ValueError, match=match):
        BuildConfig(cohort, cohort, **kwargs)


def test_a_past_image_shared_by_two_pairs_is_used_once(cohort, tmp_path, built):
    config, output, _ = built
    copy = _copy_cohort(cohort, tmp_path)
    kept = pd.read_csv(output / "instructions.csv")
    metadata = pd.read_csv(copy / "mimic-cxr-2.0.0-metadata.csv.gz").set_index("dicom_id")
    kept["subject"] = kept.current_dicom_id.map(metadata.subject_id)
    kept["current_study"] = kept.current_dicom_id.map(metadata.study_id)
    kept["past_study"] = kept.past_dicom_id.map(metadata.study_id)
    subject = kept.subject.value_counts().index[0]
    first, second = kept[kept.subject == subject].sort_values("current_study").iloc[:2].itertuples()
    questions = pd.read_csv(copy / "mimic_pair_questions.csv")
    row = (questions.question_type == "difference") & (questions.study_id == second.current_study)
    questions.loc[row, "ref_id"] = first.past_study  # both pairs now start from one past image
    questions.to_csv(copy / "mimic_pair_questions.csv", index=False)
    manifest = build_dataset(dataclasses.replace(config, mimic_cxr=copy, diff_vqa=copy), tmp_path / "out")
    assert manifest["counts"]["skipped_past_image_already_used"] == 1
    assert pd.read_csv(tmp_path / "out" / "instructions.csv").past_dicom_id.is_unique
