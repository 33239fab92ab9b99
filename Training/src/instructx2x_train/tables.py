"""Read the credentialed datasets' CSV tables (plain or gzipped) and check their columns."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

__all__ = ["TableError", "read_table", "COLUMNS"]

# Columns each table must have (more are allowed), as the datasets publish them.
COLUMNS: dict[str, tuple[str, ...]] = {
    "metadata": (
        "dicom_id",
        "subject_id",
        "study_id",
        "ViewPosition",
        "Rows",
        "Columns",
        "StudyDate",
        "StudyTime",
    ),
    "split": ("dicom_id", "study_id", "subject_id", "split"),
    "chexpert": ("subject_id", "study_id", "No Finding"),
    "pair_questions": ("study_id", "subject_id", "ref_id", "question_type", "question", "answer", "split"),
    "all": ("study_id", "subject_id", "dicom_id", "view", "study_date", "study_order"),
    "ms_cxr": (
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
    ),
}


class TableError(ValueError):
    """A table is missing, unreadable, or lacks columns."""


def read_table(path: str | Path, kind: str) -> pd.DataFrame:
    """Read one table (``.csv`` or ``.csv.gz``) and check it has the columns of ``kind``.

    Raises
    ------
    FileNotFoundError
        When the file does not exist.
    TableError
        When it cannot be parsed or a required column is missing (the message lists them).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} table not found: {path}")
    try:
        table = pd.read_csv(path, compression="infer", low_memory=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as error:
        raise TableError(f"{path.name}: cannot read the {kind} table ({error}).") from error
    missing = [c for c in COLUMNS[kind] if c not in table.columns]
    if missing:
        raise TableError(
            f"{path.name}: the {kind} table lacks column(s) {', '.join(missing)}; "
            f"it has {', '.join(map(str, table.columns))}; expected at least "
            f"{', '.join(COLUMNS[kind])}."
        )
    return table
