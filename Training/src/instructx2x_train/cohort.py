"""A synthetic cohort written in the exact file formats of the credentialed sources.

MIMIC-CXR-JPG (tree, metadata, split and CheXpert tables), MIMIC-Diff-VQA
(mimic_pair_questions.csv, mimic_all.csv) and MS-CXR (boxes of the eight categories), for
patients with several studies whose findings appear, resolve and change level over time.
Each patient is drawn from ``numpy.random.default_rng([seed, patient])``, so the cohort is
the same for a seed whatever the number of worker processes.
"""

from __future__ import annotations

import dataclasses
import datetime
import gzip
import logging
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from instructx2x.dicom.read import PHANTOM_MANUFACTURER
from instructx2x.outputs import atomic_output_dir

from .answers import Change, ChangeKind, format_answer
from .phantom import (
    RACES,
    RENDERED_FINDINGS,
    Anatomy,
    FindingState,
    Pose,
    draw_finding,
    level_words,
    render_frontal,
    render_lateral,
)

__all__ = ["CohortConfig", "generate_cohort", "write_cr", "CHEXPERT_LABELS", "CHEXPERT_OF", "MS_CXR_CATEGORY"]

logger = logging.getLogger(__name__)

CHEXPERT_LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)
CHEXPERT_OF = {
    "pleural effusion": "Pleural Effusion",
    "cardiomegaly": "Cardiomegaly",
    "pneumothorax": "Pneumothorax",
    "edema": "Edema",
    "atelectasis": "Atelectasis",
    "consolidation": "Consolidation",
    "pneumonia": "Pneumonia",
    "lung opacity": "Lung Opacity",
}
MS_CXR_CATEGORY = CHEXPERT_OF  # MS-CXR uses the same eight category names
DISTRACTOR_TYPES = ("abnormality", "presence", "view", "location", "level", "type")


@dataclasses.dataclass(frozen=True)
class CohortConfig:
    """What to generate.

    Attributes
    ----------
    patients: int
        Number of patients (each gets 2-4 studies).
    seed: int
        Fixes every random draw.
    rows, columns: int
        Image size (MIMIC images are not square; 576 x 512 by default).
    write_dicom: bool
        Also write each image as a DICOM CR beside the JPG.
    gzip_tables: bool
        Write the MIMIC-CXR tables as ``.csv.gz``, as PhysioNet ships them.
    workers: int
        Worker processes.
    """

    patients: int = 20
    seed: int = 0
    rows: int = 576
    columns: int = 512
    write_dicom: bool = False
    gzip_tables: bool = True
    workers: int = 1

    def __post_init__(self) -> None:
        if self.patients < 1:
            raise ValueError(f"patients must be >= 1, got {self.patients}.")
        if self.rows < 64 or self.columns < 64:
            raise ValueError(f"images must be at least 64x64, got {self.rows}x{self.columns}.")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}.")


def _dicom_id(rng: np.random.Generator) -> str:
    return "-".join(f"{int(rng.integers(0, 2**32)):08x}" for _ in range(5))


def _new_finding(rng: np.random.Generator, present: dict[str, FindingState]) -> FindingState | None:
    candidates = [f for f in RENDERED_FINDINGS if f not in present]
    if not candidates:
        return None
    name = str(rng.choice(candidates))
    return draw_finding(rng, name, "left" if rng.random() < 0.5 else "right")


def _evolve(rng: np.random.Generator, present: dict[str, FindingState]) -> list[Change]:
    """Change the findings from one study to the next; returns what changed."""
    changes: list[Change] = []
    for _ in range(1 + int(rng.random() < 0.25)):  # a quarter of the steps change two things
        roll = rng.random()
        if roll < 0.2:
            continue  # nothing (for this draw)
        if roll < 0.55 or not present:
            finding = _new_finding(rng, present)
            if finding is not None:
                present[finding.name] = finding
                changes.append(Change(ChangeKind.ADD, finding.name))
        elif roll < 0.8:
            name = str(rng.choice(sorted(present)))
            if any(c.finding == name for c in changes):
                continue
            del present[name]
            changes.append(Change(ChangeKind.REMOVE, name))
        else:
            name = str(rng.choice(sorted(present)))
            old = present[name]
            others = [w for w in level_words(name) if w != old.level]
            if any(c.finding == name for c in changes):
                continue
            new = dataclasses.replace(old, level=str(rng.choice(others)))
            present[name] = new
            changes.append(Change(ChangeKind.LEVEL, name, old.level, new.level))
    return changes


def _patient(args: tuple[CohortConfig, int, Path]) -> dict[str, list[dict]]:
    """Generate one patient's studies; write images; return table rows."""
    config, index, root = args
    rng = np.random.default_rng([config.seed, index])
    subject = int(f"{10 + index % 10}{index:06d}")  # subjects p10 .. p19, p19 held out as test
    official = "test" if rng.random() < 0.1 else ("validate" if rng.random() < 0.08 else "train")
    age = int(rng.integers(25, 90))
    sex = "F" if rng.random() < 0.5 else "M"
    race = str(rng.choice(RACES))
    anatomy = Anatomy.draw(rng, age, sex, race)
    present: dict[str, FindingState] = {}
    for _ in range(int(rng.integers(0, 3))):
        finding = _new_finding(rng, present)
        if finding is not None:
            present[finding.name] = finding
    rows: dict[str, list[dict]] = {
        k: [] for k in ("metadata", "split", "chexpert", "questions", "all", "ms_cxr")
    }
    date = datetime.date(2150, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 3000)))
    previous_study = None
    for order in range(int(rng.integers(2, 5))):
        changes = [] if order == 0 else _evolve(rng, present)
        study = int(50_000_000 + index * 10 + order)
        date += datetime.timedelta(days=int(rng.integers(10, 400)))
        views = ["AP"] if rng.random() < 0.08 else ["PA"]
        if rng.random() < 0.35:
            views.append("LL")
        for view in views:
            dicom_id = _dicom_id(rng)
            pose = Pose(
                float(rng.normal(0, 2.0)),
                float(rng.uniform(0.96, 1.04)),
                float(rng.normal(0, 0.03)),
                float(rng.normal(0, 0.03)),
            )
            masks: dict[str, Any]  # finding name -> mask, saved as the arrays of an .npz
            if view == "LL":
                image, masks = render_lateral(config.rows, config.columns, pose, rng), {}
            else:
                image, masks = render_frontal(
                    config.rows, config.columns, list(present.values()), pose, rng, anatomy, view
                )
            relative = Path("files") / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}"
            folder = root / relative
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (image * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{dicom_id}.jpg", quality=95)
            # ground truth for evaluation, beside every image (empty when nothing is present)
            np.savez_compressed(folder / f"{dicom_id}.masks.npz", **masks)
            if config.write_dicom:
                write_cr(folder / f"{dicom_id}.dcm", pixels, subject, study, dicom_id, view, date, sex, age)
            rows["metadata"].append(
                {
                    "dicom_id": dicom_id,
                    "subject_id": subject,
                    "study_id": study,
                    "PerformedProcedureStepDescription": "CHEST (PA AND LAT)",
                    "ViewPosition": view,
                    "Rows": config.rows,
                    "Columns": config.columns,
                    "StudyDate": int(date.strftime("%Y%m%d")),
                    "StudyTime": 120000.0 + order,
                    "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
                    "ViewCodeSequence_CodeMeaning": {
                        "PA": "postero-anterior",
                        "AP": "antero-posterior",
                        "LL": "left lateral",
                    }[view],
                    "PatientOrientationCodeSequence_CodeMeaning": "Erect",
                    "age": age,
                    "sex": sex,
                    "race": race,
                }
            )
            rows["split"].append(
                {"dicom_id": dicom_id, "study_id": study, "subject_id": subject, "split": official}
            )
            rows["all"].append(
                {
                    "study_id": study,
                    "subject_id": subject,
                    "dicom_id": dicom_id,
                    "view": view,
                    "study_date": int(date.strftime("%Y%m%d")),
                    "study_order": order,
                }
            )
            if view == "PA":
                for name, mask in masks.items():
                    if not mask.any():
                        continue
                    ys, xs = np.nonzero(mask)
                    finding = present[name]
                    rows["ms_cxr"].append(
                        {
                            "dicom_id": dicom_id,
                            "category_name": MS_CXR_CATEGORY[name],
                            "label_text": f"{finding.level} {finding.side} {name}",
                            "path": str(relative / f"{dicom_id}.jpg"),
                            "x": int(xs.min()),
                            "y": int(ys.min()),
                            "w": int(xs.max() - xs.min() + 1),
                            "h": int(ys.max() - ys.min() + 1),
                            "image_width": config.columns,
                            "image_height": config.rows,
                            "split": official,
                        }
                    )
        labels = {label: np.nan for label in CHEXPERT_LABELS}
        for name in present:
            labels[CHEXPERT_OF[name]] = 1.0
        labels["No Finding"] = np.nan if present else 1.0
        rows["chexpert"].append({"subject_id": subject, "study_id": study, **labels})
        if previous_study is not None:
            question = {
                "study_id": study,
                "subject_id": subject,
                "ref_id": previous_study,
                "split": {"validate": "val"}.get(official, official),
            }
            rows["questions"].append(
                {
                    **question,
                    "question_type": "difference",
                    "question": "what has changed compared to the reference image?",
                    "answer": format_answer(changes),
                }
            )
            for kind in rng.choice(DISTRACTOR_TYPES, size=2, replace=False):
                rows["questions"].append(
                    {
                        **question,
                        "question_type": str(kind),
                        "question": f"synthetic {kind} question",
                        "answer": "yes" if present else "no",
                    }
                )
        previous_study = study
    return rows


def write_cr(
    path: Path,
    pixels: np.ndarray,
    subject: int | str,
    study: int,
    dicom_id: str,
    view: str,
    date: datetime.date,
    sex: str,
    age: int,
    spacing_mm: float | None = None,
) -> None:
    """A synthetic CR: 8-bit (uint8) or 12-bit (uint16 <= 4095) MONOCHROME2, UIDs derived
    from the ids so that a seed gives the same file."""
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1")
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[dicom_id])
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[str(study)])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(study), view])
    ds.PatientID, ds.PatientName = str(subject), f"Synthetic^{subject}"
    ds.PatientSex, ds.PatientAge, ds.PatientBirthDate = sex, f"{age:03d}Y", ""
    ds.Manufacturer = PHANTOM_MANUFACTURER
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = (
        date.strftime("%Y%m%d"),
        "120000",
        str(study),
        "",
    )
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CR", 1, 1
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", view
    ds.PatientOrientation = ["L", "F"] if view in ("PA", "AP") else ["A", "F"]
    ds.ReferringPhysicianName = ""
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    if pixels.dtype == np.uint16:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if spacing_mm is not None:
        ds.ImagerPixelSpacing = [spacing_mm, spacing_mm]
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


def _write_table(rows: list[dict], path: Path, gzip_it: bool) -> None:
    frame = pd.DataFrame(rows)
    if gzip_it:
        with gzip.open(path.with_name(path.name + ".gz"), "wt", newline="") as handle:
            frame.to_csv(handle, index=False)
    else:
        frame.to_csv(path, index=False)


def generate_cohort(output: str | Path, config: CohortConfig) -> dict[str, int]:
    """Write a synthetic cohort into ``output`` (created; must not exist).

    Returns
    -------
    dict[str, int]
        Counts: patients, studies, images, difference questions, MS-CXR boxes.

    Raises
    ------
    FileExistsError
        When ``output`` exists. A failed run leaves nothing behind.
    """
    tables: dict[str, list[dict]] = {}
    with atomic_output_dir(Path(output)) as staging:
        jobs = [(config, index, staging) for index in range(config.patients)]
        progress = dict(total=config.patients, desc="patients", unit="patient")
        with ProcessPoolExecutor(config.workers) if config.workers > 1 else nullcontext() as pool:
            results = pool.map(_patient, jobs, chunksize=4) if pool else map(_patient, jobs)
            for rows in tqdm(results, **progress):
                for key, value in rows.items():
                    tables.setdefault(key, []).extend(value)
        gz = config.gzip_tables
        _write_table(tables["metadata"], staging / "mimic-cxr-2.0.0-metadata.csv", gz)
        _write_table(tables["split"], staging / "mimic-cxr-2.0.0-split.csv", gz)
        _write_table(tables["chexpert"], staging / "mimic-cxr-2.0.0-chexpert.csv", gz)
        _write_table(tables["questions"], staging / "mimic_pair_questions.csv", False)
        _write_table(tables["all"], staging / "mimic_all.csv", False)
        _write_table(tables["ms_cxr"], staging / "MS_CXR_Local_Alignment_v1.1.0.csv", False)
    counts = {
        "patients": config.patients,
        "studies": len(tables["chexpert"]),
        "images": len(tables["metadata"]),
        "difference_questions": sum(q["question_type"] == "difference" for q in tables["questions"]),
        "ms_cxr_boxes": len(tables["ms_cxr"]),
    }
    logger.info("Synthetic cohort: %s", counts)
    return counts
