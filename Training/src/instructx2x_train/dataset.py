"""Build MIMIC-EDIT-INSTRUCTION from MIMIC-CXR-JPG and MIMIC-Diff-VQA (docs/method.md section 5).

Pairs come from Diff-VQA difference questions (reference = past = input, main = current =
target). Each pair is checked, registered and written by a worker; its outcome is saved as a
small record, so a rerun skips finished pairs and memory does not grow with the dataset.
``instructions.csv``, ``manifest.json`` (counts at every stage) and ``report.md`` are
assembled at the end; until then the folder holds an ``INCOMPLETE`` marker.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from .answers import MULTI_FINDING_MODES, AnswerParseError, parse_answer, to_instructions
from .registration import register
from .tables import read_table

__all__ = ["BuildConfig", "build_dataset", "KNOWN_QUESTION_TYPES", "INCOMPLETE_MARKER"]

logger = logging.getLogger(__name__)

KNOWN_QUESTION_TYPES = ("abnormality", "presence", "view", "location", "level", "type", "difference")
INCOMPLETE_MARKER = "INCOMPLETE"
SPLIT_NAMES = {
    "train": "train",
    "validate": "validation",
    "val": "validation",
    "validation": "validation",
    "test": "test",
}


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Inputs and choices of a build; all of them go into the manifest.

    Attributes
    ----------
    mimic_cxr: Path
        MIMIC-CXR-JPG root (``files/`` and the ``mimic-cxr-2.0.0-*.csv[.gz]`` tables).
    diff_vqa: Path
        Folder with ``mimic_pair_questions.csv`` and ``mimic_all.csv``.
    resolution: int
        Output side (the paper resizes to 512).
    registration_threshold: float
        Minimum NCC after registration; pairs below it are discarded.
    no_finding_ratio: float
        Fraction of pairs whose current study is CheXpert "No Finding" that are kept.
    multi_finding: str
        ``combined``, ``per-finding`` or ``single-only`` (see ``answers.to_instructions``).
    held_out_prefix: str
        Subjects whose id starts with it form the test split (the paper holds out p19).
    workers: int
        Worker processes.
    seed: int
        Seeds the undersampling and the registration's metric sampling.
    image_format: str
        ``jpg`` (as MIMIC-CXR-JPG) or ``png``.
    """

    mimic_cxr: Path
    diff_vqa: Path
    resolution: int = 512
    registration_threshold: float = 0.6
    no_finding_ratio: float = 0.3
    multi_finding: str = "combined"
    held_out_prefix: str = "19"
    workers: int = 1
    seed: int = 0
    image_format: str = "jpg"

    def __post_init__(self) -> None:
        if self.multi_finding not in MULTI_FINDING_MODES:
            raise ValueError(
                f"multi_finding must be one of {MULTI_FINDING_MODES}, got {self.multi_finding!r}."
            )
        if not -1.0 <= self.registration_threshold <= 1.0:
            raise ValueError(
                f"registration_threshold must lie in [-1, 1], got {self.registration_threshold}."
            )
        if not 0.0 <= self.no_finding_ratio <= 1.0:
            raise ValueError(f"no_finding_ratio must lie in [0, 1], got {self.no_finding_ratio}.")
        if self.resolution < 64:
            raise ValueError(f"resolution must be >= 64, got {self.resolution}.")
        if self.image_format not in ("jpg", "png"):
            raise ValueError(f"image_format must be 'jpg' or 'png', got {self.image_format!r}.")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}.")

    def identity(self) -> dict:
        """The settings that decide the output (paths and workers excluded)."""
        return {
            k: v for k, v in dataclasses.asdict(self).items() if k not in ("mimic_cxr", "diff_vqa", "workers")
        }


@dataclasses.dataclass(frozen=True)
class PairJob:
    """One image pair for a worker."""

    past_id: str
    current_id: str
    past_path: str
    current_path: str
    split: str
    subject_id: int
    instructions: tuple[str, ...]
    operations: tuple[str, ...]
    findings: tuple[str, ...]
    output: str
    resolution: int
    threshold: float
    seed: int
    image_format: str


def _table(root: Path, stem: str, kind: str) -> pd.DataFrame:
    for name in (f"{stem}.csv.gz", f"{stem}.csv"):
        if (root / name).is_file():
            return read_table(root / name, kind)
    raise FileNotFoundError(f"{stem}.csv(.gz) not found in {root}.")


def _stable_fraction(*parts: object) -> float:
    """A number in [0, 1) fixed by its arguments (restart-safe sampling)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _plan(config: BuildConfig, output: Path, counts: collections.Counter) -> list[PairJob]:
    """Read the tables, apply every filter that needs no image, and list the pairs."""
    metadata = _table(config.mimic_cxr, "mimic-cxr-2.0.0-metadata", "metadata")
    split = _table(config.mimic_cxr, "mimic-cxr-2.0.0-split", "split")
    chexpert = _table(config.mimic_cxr, "mimic-cxr-2.0.0-chexpert", "chexpert")
    questions = read_table(config.diff_vqa / "mimic_pair_questions.csv", "pair_questions")
    read_table(config.diff_vqa / "mimic_all.csv", "all")  # checked: it must be present and valid

    counts["questions_read"] = len(questions)
    unknown = questions[~questions.question_type.isin(KNOWN_QUESTION_TYPES)]
    for kind, number in unknown.question_type.value_counts().items():
        logger.warning("Skipping %d question(s) of unknown type %r.", number, kind)
        counts[f"skipped_unknown_question_type:{kind}"] = int(number)
    difference = questions[questions.question_type == "difference"]
    counts["difference_questions"] = len(difference)

    pa = metadata[metadata.ViewPosition == "PA"].sort_values("dicom_id")
    pa_of_study = pa.groupby("study_id").dicom_id.first().to_dict()
    official = split.set_index("dicom_id").split.to_dict()
    no_finding = set(chexpert.loc[chexpert["No Finding"] == 1, "study_id"])
    subject_split: dict[int, str] = {}
    used_pasts: set[str] = set()
    jobs = []
    for row in difference.itertuples(index=False):
        try:
            changes = parse_answer(row.answer)
        except AnswerParseError as error:
            counts["skipped_unparseable_answer"] += 1
            logger.warning("Skipping a pair: %s", error)
            continue
        if not changes:
            counts["dropped_nothing_changed"] += 1
            continue
        current_id, past_id = pa_of_study.get(row.study_id), pa_of_study.get(row.ref_id)
        if current_id is None or past_id is None:
            counts["skipped_no_pa_view"] += 1
            continue
        if (
            row.study_id in no_finding
            and _stable_fraction(config.seed, current_id) >= config.no_finding_ratio
        ):
            counts["dropped_no_finding_undersampling"] += 1
            continue
        instructions = to_instructions(changes, config.multi_finding)
        if not instructions:
            counts["skipped_multi_finding"] += 1
            continue
        if past_id in used_pasts:
            # past/{past_dicom_id} holds the past image registered onto one current image; a
            # second pair with the same past image would overwrite it.
            counts["skipped_past_image_already_used"] += 1
            logger.warning("Skipping a pair whose past image is the past of an earlier pair.")
            continue
        used_pasts.add(past_id)
        subject = int(row.subject_id)
        if subject not in subject_split:  # one split per subject, decided by its first pair
            subject_split[subject] = (
                "test"
                if str(subject).startswith(config.held_out_prefix)
                else SPLIT_NAMES.get(str(official.get(current_id, "train")), "train")
            )
        jobs.append(
            PairJob(
                past_id,
                current_id,
                str(_image_path(config.mimic_cxr, subject, row.ref_id, past_id)),
                str(_image_path(config.mimic_cxr, subject, row.study_id, current_id)),
                subject_split[subject],
                subject,
                tuple(instructions),
                tuple(c.kind.value for c in changes),
                tuple(c.finding for c in changes),
                str(output),
                config.resolution,
                config.registration_threshold,
                int(_stable_fraction(config.seed, past_id, current_id) * 2**31),
                config.image_format,
            )
        )
    counts["pairs_planned"] = len(jobs)
    return jobs


def _image_path(root: Path, subject: int, study: int, dicom_id: str) -> Path:
    return root / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom_id}.jpg"


def _load(path: str, size: int) -> np.ndarray:
    with Image.open(path) as image:
        gray = image.convert("L").resize((size, size), Image.Resampling.BILINEAR)  # squash, as the paper
    return np.asarray(gray, dtype=np.float32) / 255.0


def _record_path(output: Path, current_id: str, past_id: str) -> Path:
    return output / ".work" / "records" / f"{current_id}__{past_id}.json"


def _write_atomic(path: Path, write) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(temporary)
    os.replace(temporary, path)


def _process_pair(job: PairJob) -> dict:
    """Check, register and write one pair; returns (and saves) its record."""
    output = Path(job.output)
    record_path = _record_path(output, job.current_id, job.past_id)
    if record_path.is_file():
        return json.loads(record_path.read_text())
    record = {
        "past_id": job.past_id,
        "current_id": job.current_id,
        "split": job.split,
        "subject_id": job.subject_id,
        "instructions": list(job.instructions),
        "operations": list(job.operations),
        "findings": list(job.findings),
    }
    try:
        past, current = _load(job.past_path, job.resolution), _load(job.current_path, job.resolution)
    except FileNotFoundError:
        record["status"] = "skipped_missing_image"
    except (UnidentifiedImageError, OSError, SyntaxError):
        record["status"] = "skipped_corrupt_image"
    else:
        result = register(past, current, seed=job.seed)
        record.update(score=round(result.score, 5), score_before=round(result.score_before, 5))
        if result.score < job.threshold:
            record["status"] = "dropped_low_registration_score"
        else:
            record["status"] = "kept"
            suffix = "jpg" if job.image_format == "jpg" else "png"
            options = {"quality": 95} if suffix == "jpg" else {}
            for folder, name, array in (
                ("past", job.past_id, result.registered),
                ("current", job.current_id, current),
            ):
                target = output / folder / f"{name}.{suffix}"
                pixels = Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8))
                _write_atomic(
                    target,
                    lambda p, image=pixels: image.save(p, format=suffix.replace("jpg", "jpeg"), **options),
                )
    _write_atomic(record_path, lambda p: p.write_text(json.dumps(record)))
    return record


def build_dataset(config: BuildConfig, output: str | Path) -> dict:
    """Build the dataset into ``output``; rerunning resumes (finished pairs are skipped).

    Returns
    -------
    dict
        The manifest (also written to ``output/manifest.json``).

    Raises
    ------
    FileNotFoundError, TableError
        When a table is missing or lacks columns (nothing is written).
    FileExistsError
        When ``output`` holds something other than a build with the same settings.
    """
    output = Path(output)
    counts: collections.Counter = collections.Counter()
    jobs = _plan(config, output, counts)  # fails on bad tables before anything is written
    settings = output / ".work" / "config.json"
    if output.exists():
        if not settings.is_file() or json.loads(settings.read_text()) != config.identity():
            raise FileExistsError(
                f"{output} exists and is not a build with these settings; choose a new folder."
            )
    for folder in (".work/records", "past", "current"):
        (output / folder).mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps(config.identity()))
    (output / INCOMPLETE_MARKER).write_text("This build has not finished; rerun to resume.\n")

    records: list[dict] = []  # small dicts; the images stay on disk
    progress = dict(total=len(jobs), desc="pairs", unit="pair")
    with ProcessPoolExecutor(config.workers) if config.workers > 1 else nullcontext() as pool:
        results = pool.map(_process_pair, jobs, chunksize=8) if pool else map(_process_pair, jobs)
        records.extend(tqdm(results, **progress))
    manifest = _assemble(config, output, records, counts)
    (output / INCOMPLETE_MARKER).unlink()
    return manifest


def _assemble(config: BuildConfig, output: Path, records: list[dict], counts: collections.Counter) -> dict:
    rows, scores = [], []
    per_operation: collections.Counter = collections.Counter()
    per_finding: collections.Counter = collections.Counter()
    per_split: collections.Counter = collections.Counter()
    for record in sorted(records, key=lambda r: (r["current_id"], r["past_id"])):
        counts[record["status"]] += 1
        if "score" in record:
            scores.append(record["score"])
        if record["status"] != "kept":
            continue
        per_split[record["split"]] += 1
        for operation, finding in zip(record["operations"], record["findings"]):
            per_operation[operation] += 1
            per_finding[finding] += 1
        rows += [
            {
                "split": record["split"],
                "past_dicom_id": record["past_id"],
                "current_dicom_id": record["current_id"],
                "instruction": text,
            }
            for text in record["instructions"]
        ]
    table = pd.DataFrame(rows, columns=["split", "past_dicom_id", "current_dicom_id", "instruction"])
    _write_atomic(output / "instructions.csv", lambda p: table.to_csv(p, index=False))
    manifest = {
        "format": "mimic-edit-instruction/1",
        "complete": True,
        "settings": config.identity(),
        "counts": dict(sorted(counts.items())),
        "kept_pairs": counts["kept"],
        "instructions": len(rows),
        "per_operation": dict(sorted(per_operation.items())),
        "per_finding": dict(sorted(per_finding.items())),
        "per_split": dict(sorted(per_split.items())),
        "registration_score": {"min": min(scores), "median": float(np.median(scores)), "max": max(scores)}
        if scores
        else None,
    }
    _write_atomic(output / "manifest.json", lambda p: p.write_text(json.dumps(manifest, indent=2) + "\n"))
    _write_atomic(output / "report.md", lambda p: p.write_text(_report(manifest)))
    return manifest


def _report(manifest: dict) -> str:
    lines = [
        "# MIMIC-EDIT-INSTRUCTION build report",
        "",
        f"Kept pairs: {manifest['kept_pairs']}; instructions: {manifest['instructions']}.",
        "",
        "| stage | count |",
        "|---|---|",
    ]
    lines += [f"| {name} | {value} |" for name, value in manifest["counts"].items()]
    for title in ("per_split", "per_operation", "per_finding"):
        lines += ["", f"| {title.replace('_', ' ')} | pairs |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in manifest[title].items()]
    if manifest["registration_score"]:
        score = manifest["registration_score"]
        lines += [
            "",
            f"Registration NCC: min {score['min']:.3f}, median {score['median']:.3f}, "
            f"max {score['max']:.3f} (threshold {manifest['settings']['registration_threshold']}).",
        ]
    return "\n".join(lines) + "\n"
