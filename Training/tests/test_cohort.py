import gzip
import hashlib
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from instructx2x_train.answers import parse_answer
from instructx2x_train.cohort import CHEXPERT_LABELS, CohortConfig, generate_cohort
from instructx2x_train.tables import COLUMNS, read_table


def digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)  # gzip headers carry a timestamp
        h.update(data)
    return h.hexdigest()


def test_same_seed_same_cohort_whatever_the_workers(tmp_path):
    config: dict[str, Any] = dict(patients=6, seed=11, rows=96, columns=80)
    generate_cohort(tmp_path / "a", CohortConfig(**config))
    generate_cohort(tmp_path / "b", CohortConfig(**config, workers=2))
    generate_cohort(tmp_path / "c", CohortConfig(**{**config, "seed": 12}))
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")


def test_tables_have_the_real_columns_and_formats(cohort):
    for kind, name in [
        ("metadata", "mimic-cxr-2.0.0-metadata.csv.gz"),
        ("split", "mimic-cxr-2.0.0-split.csv.gz"),
        ("chexpert", "mimic-cxr-2.0.0-chexpert.csv.gz"),
        ("pair_questions", "mimic_pair_questions.csv"),
        ("all", "mimic_all.csv"),
        ("ms_cxr", "MS_CXR_Local_Alignment_v1.1.0.csv"),
    ]:
        table = read_table(cohort / name, kind)
        assert set(COLUMNS[kind]) <= set(table.columns)
    chexpert = read_table(cohort / "mimic-cxr-2.0.0-chexpert.csv.gz", "chexpert")
    assert list(chexpert.columns) == ["subject_id", "study_id", *CHEXPERT_LABELS]
    metadata = read_table(cohort / "mimic-cxr-2.0.0-metadata.csv.gz", "metadata")
    assert {"age", "sex", "race"} <= set(metadata.columns)
    assert {"PA", "AP", "LL"} <= set(metadata.ViewPosition)
    split = read_table(cohort / "mimic-cxr-2.0.0-split.csv.gz", "split")
    assert set(split.split) <= {"train", "validate", "test"}


def test_tree_layout_and_masks(cohort):
    metadata = pd.read_csv(cohort / "mimic-cxr-2.0.0-metadata.csv.gz")
    for row in metadata.itertuples():
        folder = cohort / "files" / f"p{str(row.subject_id)[:2]}" / f"p{row.subject_id}" / f"s{row.study_id}"
        image = Image.open(folder / f"{row.dicom_id}.jpg")
        assert image.size == (256, 288) and image.mode == "L"
        masks = np.load(folder / f"{row.dicom_id}.masks.npz")
        assert row.ViewPosition != "LL" or not masks.files


def test_questions_use_the_answer_grammar_with_distractors(cohort):
    questions = pd.read_csv(cohort / "mimic_pair_questions.csv")
    difference = questions[questions.question_type == "difference"]
    parsed = [parse_answer(a) for a in difference.answer]  # every answer parses
    assert any(len(p) > 1 for p in parsed) and any(not p for p in parsed)
    assert any(a.startswith("the level of") for a in difference.answer)
    assert set(questions.question_type) - {"difference"}  # distractors


def test_findings_are_drawn_on_the_named_side(cohort):
    boxes = pd.read_csv(cohort / "MS_CXR_Local_Alignment_v1.1.0.csv")
    assert set(boxes.category_name) == {
        "Atelectasis",
        "Cardiomegaly",
        "Consolidation",
        "Edema",
        "Pleural Effusion",
        "Lung Opacity",
        "Pneumonia",
        "Pneumothorax",
    }
    effusions = boxes[boxes.category_name == "Pleural Effusion"]
    for row in effusions.itertuples():
        centre = row.x + row.w / 2
        # the patient's left is the image's right on a PA film
        assert (centre > row.image_width / 2) == (" left " in f" {row.label_text} ")


def test_lesion_masks_match_rendered_intensity(cohort):
    metadata = pd.read_csv(cohort / "mimic-cxr-2.0.0-metadata.csv.gz")
    row = next(r for r in metadata.itertuples() if r.ViewPosition == "PA")
    folder = cohort / "files" / f"p{str(row.subject_id)[:2]}" / f"p{row.subject_id}" / f"s{row.study_id}"
    masks = np.load(folder / f"{row.dicom_id}.masks.npz")
    for name in masks.files:
        assert masks[name].shape == (288, 256) and masks[name].dtype == bool


def test_dicom_option_writes_readable_radiographs(tmp_path):

    from dicom_factory import dciodvfy_errors

    from instructx2x.dicom import read_dicom

    generate_cohort(
        tmp_path / "d", CohortConfig(patients=1, rows=96, columns=80, write_dicom=True, gzip_tables=False)
    )
    files = sorted((tmp_path / "d").rglob("*.dcm"))
    assert files and (tmp_path / "d" / "mimic-cxr-2.0.0-metadata.csv").exists()
    image = read_dicom(files[0], allow_non_chest=False)
    assert image.pixels.shape == (96, 80)
    for path in files:
        assert dciodvfy_errors(path) == [], path.name


def test_bad_configs_and_existing_output(tmp_path):
    with pytest.raises(ValueError, match="patients"):
        CohortConfig(patients=0)
    with pytest.raises(ValueError, match="64x64"):
        CohortConfig(rows=10)
    (tmp_path / "x").mkdir()
    with pytest.raises(FileExistsError):
        generate_cohort(tmp_path / "x", CohortConfig(patients=1))
