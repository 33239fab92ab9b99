import json

import numpy as np
import pandas as pd
import pytest

from instructx2x.instructions import PRIOR_CATEGORIES
from instructx2x.priors import PriorSet
from instructx2x_train.cli import main
from instructx2x_train.pseudo_masks import box_union_masks, build_pseudo_masks


def boxes_table(rows):
    columns = [
        "dicom_id",
        "category_name",
        "label_text",
        "path",
        "x",
        "y",
        "w",
        "h",
        "image_width",
        "image_height",
        "split",
    ]
    return pd.DataFrame([dict(zip(columns, r)) for r in rows], columns=columns)


def full_table(extra=()):
    rows = [(f"d{i}", c, "", "", 0, 0, 10, 10, 1024, 1024, "train") for i, c in enumerate(PRIOR_CATEGORIES)]
    return boxes_table(rows + list(extra))


def test_union_equals_hand_computed_boxes():
    table = full_table(
        [
            # 2048 x 1024 image: x scales by 1/4, y by 1/2 (anisotropic)
            ("a", "Edema", "", "", 100, 200, 400, 100, 2048, 1024, "train"),
            ("b", "Edema", "", "", 1900, 1000, 400, 100, 2048, 1024, "train"),  # clipped at the edge
        ]
    )
    masks = box_union_masks(table)
    expected = np.zeros((512, 512), np.uint8)
    expected[0:5, 0:5] = 1  # the 10x10 box on a 1024 image: rows/cols 0..4
    expected[100:150, 25:125] = 1  # floor(200/2)..ceil(300/2), floor(100/4)..ceil(500/4)
    expected[500:512, 475:512] = 1  # floor(1000/2).. clipped, floor(1900/4)=475 .. clipped
    assert np.array_equal(masks["Edema"], expected)


def test_errors():
    with pytest.raises(ValueError, match="no PA box for"):
        box_union_masks(boxes_table([("a", "Edema", "", "", 0, 0, 5, 5, 10, 10, "train")]))
    with pytest.raises(ValueError, match="unknown MS-CXR category"):
        box_union_masks(full_table([("a", "Nodule", "", "", 0, 0, 5, 5, 10, 10, "train")]))


def test_only_pa_boxes_count_and_the_library_loads_the_result(cohort, tmp_path):
    metadata = pd.read_csv(cohort / "mimic-cxr-2.0.0-metadata.csv.gz")
    boxes = pd.read_csv(cohort / "MS_CXR_Local_Alignment_v1.1.0.csv")
    not_pa = metadata[metadata.ViewPosition != "PA"].dicom_id.iloc[0]
    extra = boxes.iloc[:1].assign(dicom_id=not_pa, category_name="Edema", x=0, y=0, w=256, h=288)
    pd.concat([boxes, extra]).to_csv(tmp_path / "ms_cxr.csv", index=False)
    summary = build_pseudo_masks(
        tmp_path / "ms_cxr.csv", cohort / "mimic-cxr-2.0.0-metadata.csv.gz", tmp_path / "priors"
    )
    assert summary["boxes_read"] == len(boxes) + 1 and summary["pa_boxes"] == len(boxes)
    priors = PriorSet.from_directory(tmp_path / "priors")
    assert priors.version == "ms-cxr-v1.1.0" and set(priors.masks) == set(PRIOR_CATEGORIES)
    assert priors.masks["Edema"].mean() < 1.0  # the full-image non-PA box was left out
    pa_boxes = boxes_table(boxes.values.tolist())
    assert np.array_equal(priors.masks["Edema"], box_union_masks(pa_boxes)["Edema"].astype(np.float32))


def test_cli_end_to_end(cohort, tmp_path, capsys):
    assert (
        main(
            [
                "pseudo-masks",
                str(tmp_path / "p"),
                "--ms-cxr",
                str(cohort / "MS_CXR_Local_Alignment_v1.1.0.csv"),
                "--metadata",
                str(cohort / "mimic-cxr-2.0.0-metadata.csv.gz"),
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["pa_boxes"] > 0
    assert (
        main(
            [
                "pseudo-masks",
                str(tmp_path / "q"),
                "--ms-cxr",
                str(tmp_path / "missing.csv"),
                "--metadata",
                str(cohort / "mimic-cxr-2.0.0-metadata.csv.gz"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "q").exists()
