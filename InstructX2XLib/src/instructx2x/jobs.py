"""One edit job, from a typed spec to files on disk: read -> validate -> edit -> write -> push.

The CLI parses arguments into an ``EditJob``; a worker or a panel builds the same spec from
JSON (``EditJob.from_dict``). ``prepare`` reads and checks everything that can be checked
without the model (inputs, masks, output path, PACS targets, what DICOM export will need),
so a bad input costs no model load; ``run_job`` then edits with a loaded editor and reports
through one event callback (``started``, ``progress`` with an ETA, ``export``, ``done``).
This module imports no torch: the model stack is imported by ``run_job``'s caller.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError, InputNotFoundError, InstructX2XError, PacsError, ParameterError
from .instructions import LEVEL_PLACEHOLDER, ParsedSeries, parse_series
from .parameters import EditParameters, check_masks, is_integer
from .provenance import to_json
from .sharding import INCOMPLETE, RECORDS, Shard, changed_settings, open_record, read_records

if TYPE_CHECKING:  # a type only: this module imports no torch
    from .classifier_set import ClassifierSet

__all__ = [
    "EditJob",
    "PreparedJob",
    "prepare",
    "run_job",
    "edit_images",
    "write_results",
    "write_into",
    "read_jobs_file",
    "prepare_jobs",
    "run_jobs_file",
    "jobs_settings",
    "check_jobs_output",
    "open_jobs_output",
    "cohort_jobs",
    "COMMANDS",
]

COMMANDS = ("edit", "preview")
Events = Callable[[dict], None]


@dataclasses.dataclass(frozen=True)
class EditJob:
    """Everything one edit or preview needs, as a user or a panel states it.

    Attributes
    ----------
    command: str
        ``edit`` or ``preview``.
    input: pathlib.Path
        A radiograph (DICOM, PNG, JPEG) or a folder of DICOM files.
    output: pathlib.Path
        Folder to create; must not exist.
    parameters: EditParameters
        The edit settings (validated on construction).
    mask, keep_mask: pathlib.Path | None
        Edit mask (replaces the prior) and never-edit mask: PNG or ``.npy``.
    voi: str | int
        DICOM display transform (``first``, a window index, ``minmax``, ``percentile``).
    allow_non_chest: bool
        Accept DICOM images of other body parts.
    feather_px: int
        Blend band inside the mask at native resolution.
    push_cstore, push_stow: str | None
        PACS targets (``HOST:PORT:AET``, an http(s) URL); the only network traffic.
    reference_mask: pathlib.Path | None
        A known lesion (e.g. a phantom's ground truth), outlined on ``figure.png``.
    verify: str | None
        Check the edit with a classifier set (``verification.verify_edit``) and write
        ``verification.json`` and ``verification.txt``: ``auto`` (the set that fits each input,
        ``verification.choose_classifiers``), ``cohort-v2``, ``torchxrayvision`` or a folder.
    include_demographics: bool
        Also write the classifiers' age, sex and race estimates into the verification report,
        labelled as model estimates (needs ``verify``). Off: the report names which estimates
        moved, without their values.
    series: tuple[str, ...]
        A progression series (``instructions.parse_series``): its steps as instructions, or as
        levels that fill the ``{level}`` of ``parameters.instruction``. Empty for one edit. With
        instructions, ``parameters.instruction`` is one of them. Every step edits the one input
        with the job's seed and one edit region (``InstructX2XEditor.edit_series``).
    """

    command: str
    input: Path
    output: Path
    parameters: EditParameters
    mask: Path | None = None
    keep_mask: Path | None = None
    voi: str | int = "first"
    allow_non_chest: bool = False
    feather_px: int = 0
    push_cstore: str | None = None
    push_stow: str | None = None
    reference_mask: Path | None = None
    verify: str | None = None
    include_demographics: bool = False
    series: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.command not in COMMANDS:
            raise ParameterError(f"command must be one of {COMMANDS}, got {self.command!r}.")
        if not is_integer(self.feather_px) or self.feather_px < 0:
            raise ParameterError(f"feather must be an integer >= 0, got {self.feather_px!r}.")
        if self.push_stow is not None and not self.push_stow.startswith(("http://", "https://")):
            raise ParameterError(f"push_stow must be an http(s) URL, got {self.push_stow!r}.")
        if (self.push_cstore or self.push_stow) and self.command != "edit":
            raise ParameterError("pushing to a PACS needs the edit command.")
        if self.verify is not None and self.command != "edit":
            raise ParameterError("verification needs the edit command (a preview has no edited image).")
        if not isinstance(self.include_demographics, bool):
            raise ParameterError(
                f"include_demographics must be true or false, got {self.include_demographics!r}."
            )
        if self.include_demographics and self.verify is None:
            raise ParameterError(
                "include_demographics needs verify: only the verification report has "
                "age, sex and race estimates."
            )
        if not isinstance(self.series, (list, tuple)):
            raise ParameterError(f"series must be a list of instructions or levels, got {self.series!r:.80}.")
        object.__setattr__(self, "series", tuple(self.series))
        if self.series:
            self.series_plan()  # refused here, before anything is read
        elif LEVEL_PLACEHOLDER in self.parameters.instruction:
            raise ParameterError(
                f"the instruction holds {LEVEL_PLACEHOLDER}, a series' template: give the series' levels."
            )

    def series_plan(self) -> ParsedSeries | None:
        """The series as parsed (None for one edit).

        Raises
        ------
        ParameterError
            As ``instructions.parse_series``; or when the job is not an edit, verifies, or names an
            instruction that is neither the series' template nor one of its steps.
        """
        if not self.series:
            return None
        if self.command != "edit":
            raise ParameterError(
                "a series needs the edit command: preview its region with the preview of one step."
            )
        if self.verify is not None:
            raise ParameterError("verification checks one edit; run a series without it.")
        instruction = self.parameters.instruction
        template = instruction if LEVEL_PLACEHOLDER in instruction else None
        plan = parse_series(self.series, template)
        if template is None and instruction not in plan.instructions:
            raise ParameterError(
                f"the series' instruction {instruction!r} is neither a template holding "
                f"{LEVEL_PLACEHOLDER} nor one of its steps."
            )
        return plan

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditJob:
        """Build from JSON (the worker protocol): unknown keys are an error, not ignored."""
        if not isinstance(data, dict):
            raise ParameterError(f"a job must be a JSON object, got {type(data).__name__}.")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ParameterError(f"unknown job field(s) {unknown}; known: {sorted(fields)}.")
        values = dict(data)
        try:
            values["parameters"] = EditParameters(**values.get("parameters", {}))
        except TypeError as error:
            raise ParameterError(f"job parameters: {error}.") from None
        for key in ("input", "output", "mask", "keep_mask", "reference_mask"):
            if values.get(key) is not None:
                values[key] = Path(values[key])
        try:
            return cls(**values)
        except TypeError as error:
            raise ParameterError(f"job: {error}.") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, the inverse of ``from_dict``."""
        data = dataclasses.asdict(self)
        for key in ("input", "output", "mask", "keep_mask", "reference_mask"):
            if data[key] is not None:
                data[key] = str(data[key])
        data["series"] = list(self.series)
        return data


@dataclasses.dataclass
class PreparedJob:
    """A job whose inputs are read and checked; nothing has been written yet."""

    job: EditJob
    images: list  # list[Radiograph]
    mask: Any
    keep_mask: Any
    cstore_target: Any
    reference_mask: Any = None
    # per image: the classifiers and why they were chosen, loaded before the model works
    verifiers: list[tuple[ClassifierSet, str]] | None = None


def prepare(job: EditJob, new_output: bool = True) -> PreparedJob:
    """Read and check every input of ``job`` before any model work or any file is written.

    ``new_output``: the output folder must not exist (a row of a jobs run is not checked: the
    run's own folder is, and a rerun replaces a row's folder that was never recorded).

    Raises
    ------
    InstructX2XError
        The specific error of the first problem found (``InputError``, ``ParameterError``,
        ``OutputExistsError``, ...).
    """
    from .dicom.pacs import CStoreTarget
    from .dicom.read import read_dicom
    from .dicom.write import check_exportable
    from .image_io import is_dicom_file, read_image, read_mask
    from .outputs import check_new_output_folder

    if new_output:
        check_new_output_folder(job.output)
    target = None if job.push_cstore is None else CStoreTarget.parse(job.push_cstore)
    paths = _input_files(job.input, is_dicom_file)
    if (job.mask or job.keep_mask or job.reference_mask) and len(paths) > 1:
        raise ParameterError("masks apply to one image; the input is a folder.")
    if job.series and len(paths) > 1:
        raise ParameterError(f"a series edits one radiograph; the input folder holds {len(paths)}.")
    images = []
    for path, dicom in paths:
        if dicom:
            image = read_dicom(path, voi=job.voi, allow_non_chest=job.allow_non_chest)
            if job.command == "edit":
                check_exportable(image.dicom_source().dataset, image.source)
        else:
            image = read_image(path)
        images.append(image)
    if (target or job.push_stow) and images[0].format != "dicom":
        raise ParameterError("pushing to a PACS needs a DICOM input.")
    shape = images[0].pixels.shape
    mask = None if job.mask is None else read_mask(job.mask, shape)
    keep = None if job.keep_mask is None else read_mask(job.keep_mask, shape)
    for image in images:
        check_masks(image.pixels.shape, job.parameters, mask, keep)
    reference = None if job.reference_mask is None else read_mask(job.reference_mask, shape)
    return PreparedJob(job, images, mask, keep, target, reference)


def run_job(
    prepared: PreparedJob, editor, emit: Events, progress_bar: bool = False, float_maps: bool = False
) -> dict:
    """Edit (or preview) every image of a prepared job, write the outputs atomically, push.

    Parameters
    ----------
    prepared: PreparedJob
        From ``prepare``.
    editor: InstructX2XEditor
        A loaded editor (the model stays warm across jobs).
    emit: Callable[[dict], None]
        Receives every event (``started``, ``progress``, ``export``, ``done``).
    progress_bar: bool
        Also show a tqdm bar on stderr (the CLI's default).
    float_maps: bool
        Also write the float maps as ``.npy`` with ``maps.json`` (what the panels overlay).

    Returns
    -------
    dict
        The ``done`` event: output folder, files, prior, edit fraction, push results.

    Raises
    ------
    InstructX2XError
        ``EmptyEditRegionError``, ``EditCancelled`` (nothing written), ``PacsError`` (written,
        not pushed), ``ResourceError`` (disk), ...
    """
    results = edit_images(prepared, editor, emit, progress_bar)
    return write_results(prepared, results, emit, float_maps)


def edit_images(prepared: PreparedJob, editor, emit: Events, progress_bar: bool = False) -> list:
    """The model part of ``run_job``: one ``EditResult`` per image, nothing written."""
    job = prepared.job
    load_verifier(prepared, editor)
    parameters = editor.resolve(job.parameters)
    steps = parameters.num_inference_steps if job.command == "edit" else 0
    total = steps * len(prepared.images)
    started = {"event": "started", "command": job.command, "total": total, "images": len(prepared.images)}
    series = job.series_plan()
    if series is not None:
        started["series"] = len(series.steps)
    emit(started)
    clock = _Eta(total)
    bar = None
    if progress_bar and total:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="denoising", unit="step")
    results = []
    try:
        for index, image in enumerate(prepared.images):
            if job.command == "preview":
                results.append(editor.preview(image, parameters, prepared.mask, prepared.keep_mask))
                continue

            def report(step: int, _: int, offset: int = index * steps, image_number: int = index + 1) -> None:
                if bar is not None:
                    bar.update(1)
                emit(
                    {
                        "event": "progress",
                        "step": offset + step,
                        "total": total,
                        "eta_s": clock.eta(offset + step),
                    }
                )
                if step == steps:
                    emit({"event": "decode", "image": image_number})

            if series is not None:  # one batch: its steps share every denoising step
                results.append(
                    editor.edit_series(image, series, parameters, prepared.mask, prepared.keep_mask, report)
                )
                continue
            results.append(editor.edit(image, parameters, prepared.mask, prepared.keep_mask, progress=report))
    finally:
        if bar is not None:
            bar.close()
    return results


def load_verifier(prepared: PreparedJob, editor) -> None:
    """Load the job's verification classifiers (once per process) before any model call, so a
    missing weight file is refused before the edit runs."""
    if prepared.job.verify is not None and prepared.verifiers is None:
        from .verification import choose_classifiers

        prepared.verifiers = [
            choose_classifiers(prepared.job.verify, editor.model_info, image) for image in prepared.images
        ]


def write_results(prepared: PreparedJob, results: list, emit: Events, float_maps: bool = False) -> dict:
    """The output part of ``run_job``: files in one atomic folder, then the PACS push."""
    from .dicom.dicomweb import push_stow
    from .dicom.pacs import push_cstore
    from .outputs import atomic_output_dir

    job = prepared.job
    emit({"event": "export", "output": str(job.output)})
    with atomic_output_dir(job.output) as staging:
        written = write_into(staging, prepared, results, float_maps)
    series = job.series_plan()
    first = results[0] if series is None else results[0].steps[series.region_step]
    summary = {
        "event": "done",
        "output": str(job.output),
        "files": written,
        "prior": first.manifest["prior"],
        "edit_fraction": first.manifest["edit_fraction"],
        "untrained": first.untrained,
    }
    if series is not None:  # what a panel's slider steps through
        summary["series"] = {
            **series.to_dict(),
            "step_files": [
                [name for name in written if name.startswith(f"step-{number:02d}.")]
                for number in range(1, len(series.steps) + 1)
            ],
        }
    if prepared.verifiers is not None:  # what the panels show beside the result
        first = next(name for name in written if name.endswith("verification.json"))
        summary["verification"] = json.loads((job.output / first).read_text())
    dicom_files = [job.output / name for name in written if name.endswith(".dcm")]
    try:
        if prepared.cstore_target is not None:
            push_cstore(dicom_files, prepared.cstore_target)
            target = prepared.cstore_target
            summary["pushed_cstore"] = f"{target.host}:{target.port}:{target.called_ae_title}"
        if job.push_stow is not None:
            push_stow(dicom_files, job.push_stow)
            summary["pushed_stow"] = True
    except PacsError as error:
        raise PacsError(f"written to {job.output}, but not pushed: {error}") from error
    emit(summary)
    return summary


def write_into(folder: Path, prepared: PreparedJob, results: list, float_maps: bool = False) -> list[str]:
    """Write a job's results into an existing (staging) folder; returns the relative names."""
    from .dicom.export import write_dicom_edit, write_dicom_series
    from .outputs import (
        write_figure,
        write_float_maps,
        write_png_result,
        write_series_result,
        write_verification,
    )

    if prepared.job.series:  # one image, one SeriesResult
        image, result = prepared.images[0], results[0]
        names = []
        if image.format == "dicom":
            names += write_dicom_series(folder, image, result, feather_px=prepared.job.feather_px)
        names += [p.name for p in write_series_result(folder, image, result, prepared.reference_mask)]
        if float_maps:  # the maps the steps share
            names += [p.name for p in write_float_maps(folder, image, result.steps[0])]
        return names
    written = []
    for index, (image, result) in enumerate(zip(prepared.images, results)):
        target = folder if len(prepared.images) == 1 else folder / f"image-{index + 1:03d}"
        target.mkdir(exist_ok=True)
        names = []
        if image.format == "dicom" and result.edited is not None:
            names += write_dicom_edit(target, image, result, feather_px=prepared.job.feather_px)
        names += [p.name for p in write_png_result(target, image, result)]
        if result.edited is not None:
            names += [write_figure(target, image, result, prepared.reference_mask).name]
        if prepared.verifiers is not None and result.edited is not None:
            names += [
                p.name
                for p in write_verification(
                    target,
                    image,
                    result,
                    *prepared.verifiers[index],
                    include_demographics=prepared.job.include_demographics,
                )
            ]
        if float_maps:
            names += [p.name for p in write_float_maps(target, image, result)]
        written += [str((target / n).relative_to(folder)) for n in names]
    return written


JOBS_COLUMNS = ("image", "instruction", "mask", "keep_mask", "seed")


def read_jobs_file(path: Path, template: EditJob) -> list[EditJob]:
    """One ``EditJob`` per row of a jobs CSV, each a copy of ``template`` with the row's values.

    Columns: ``image`` and ``instruction`` (required), ``mask``, ``keep_mask``, ``seed``
    (optional, empty = the template's). Relative paths are relative to the CSV's folder.
    Row ``n`` writes to ``OUTPUT/NNNN-<image stem>/``.

    Raises
    ------
    InputError
        A missing file, unknown or missing columns, or no rows.
    ParameterError
        A row whose values are invalid (the message names the row).
    """
    import csv

    if not path.is_file():
        raise InputNotFoundError(f"jobs file not found: {path.name}")
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"{path.name}: not a UTF-8 CSV file ({error}).") from None
    unknown = sorted(set(columns) - set(JOBS_COLUMNS))
    missing = [c for c in ("image", "instruction") if c not in columns]
    if unknown or missing:
        raise InputError(
            f"{path.name}: columns must be {', '.join(JOBS_COLUMNS)} (image and "
            f"instruction required); unknown {unknown}, missing {missing}."
        )
    if not rows:
        raise InputError(f"{path.name}: no jobs (the file has a header only).")
    jobs = []
    for number, row in enumerate(rows, start=1):
        try:
            image = path.parent / (row["image"] or "").strip()
            seed = (row.get("seed") or "").strip()
            parameters = dataclasses.replace(
                template.parameters,
                instruction=row["instruction"] or "",
                seed=int(seed) if seed else template.parameters.seed,
            )
            mask = (row.get("mask") or "").strip()
            keep_mask = (row.get("keep_mask") or "").strip()
            jobs.append(
                dataclasses.replace(
                    template,
                    input=image,
                    output=template.output / f"{number:04d}-{image.stem}",
                    parameters=parameters,
                    mask=path.parent / mask if mask else template.mask,
                    keep_mask=path.parent / keep_mask if keep_mask else template.keep_mask,
                )
            )
        except (ParameterError, ValueError) as error:
            raise ParameterError(f"{path.name}, row {number}: {error}") from None
    return jobs


def cohort_jobs(films: list[Path], template: EditJob) -> list[EditJob]:
    """One ``EditJob`` per film, each a copy of ``template`` (its instruction and seed) writing
    to ``OUTPUT/NNNN-<film stem>/``: the rows of a cohort (e.g. from ``dicom.dicomweb``)."""
    return [
        dataclasses.replace(template, input=film, output=template.output / f"{number:04d}-{film.stem}")
        for number, film in enumerate(films, start=1)
    ]


def prepare_jobs(jobs: list[EditJob]) -> list[PreparedJob]:
    """``prepare`` every row of a jobs file; the first bad row's error names its number."""
    prepared = []
    for number, job in enumerate(jobs, start=1):
        try:
            prepared.append(prepare(job, new_output=False))
        except InstructX2XError as error:
            raise type(error)(f"job {number}: {error}") from None
    return prepared


JOBS_SETTINGS = "jobs-settings.json"
AfterRow = Callable[[PreparedJob, Path], dict]


def jobs_settings(jobs: list[EditJob], batch_size: int, **extra: Any) -> dict:
    """What a jobs run must keep to be resumed: every row, the batch size and ``extra`` (the
    model and sampler the caller names); stored in ``OUTPUT/jobs-settings.json``."""
    return json.loads(
        to_json({"rows": [job.to_dict() for job in jobs], "batch_size": batch_size, **extra}, indent=None)
    )


def check_jobs_output(output: Path, settings: dict) -> bool:
    """Check, creating nothing, that a jobs run can write to ``output``; True when it resumes
    an unfinished run there (one with ``INCOMPLETE`` and the same settings).

    Raises
    ------
    OutputExistsError
        When ``output`` exists and is not an unfinished run, or holds one with other settings.
    InputError
        When no folder can be made there (``outputs.check_new_output_folder``).
    """
    from .errors import OutputExistsError
    from .outputs import check_new_output_folder

    if not output.is_dir() or not (output / INCOMPLETE).is_file():
        check_new_output_folder(output)
        return False
    stored = output / JOBS_SETTINGS
    previous = json.loads(stored.read_text(encoding="utf-8")) if stored.is_file() else {}
    if previous != settings:
        raise OutputExistsError(
            f"output folder {output.name} holds an unfinished jobs run with other rows or "
            f"settings ({', '.join(changed_settings(previous, settings))}); resume it with the same "
            "command or choose a new folder."
        )
    return True


def open_jobs_output(output: Path, settings: dict) -> bool:
    """Create the folder of a jobs run (with ``INCOMPLETE``, the settings and ``records/``), or
    accept an unfinished one with the same settings; True when it resumes one.

    Raises
    ------
    OutputExistsError, InputError
        As ``check_jobs_output``.
    """
    if check_jobs_output(output, settings):
        return True
    (output / RECORDS).mkdir(parents=True)
    (output / JOBS_SETTINGS).write_text(to_json(settings) + "\n", encoding="utf-8")
    (output / INCOMPLETE).write_text("jobs running or interrupted: rerun the same command to resume\n")
    return False


def run_jobs_file(
    prepared: list[PreparedJob],
    output: Path,
    editor,
    emit: Events,
    progress_bar: bool = False,
    batch_size: int = 1,
    shard: Shard | None = None,
    settings: dict | None = None,
    after_row: AfterRow | None = None,
) -> dict:
    """Run many prepared jobs on one warm editor into ``output``, row by row, with ``results.csv``.

    Each row's folder is written atomically and recorded in ``OUTPUT/records/`` as soon as it
    exists, so an interrupted run resumes with the rows not yet recorded (rerun the same
    command); until ``results.csv`` is written the folder holds ``INCOMPLETE``. Under
    ``accelerate launch`` (``shard``) every process edits its share of the rows and the main
    process assembles ``results.csv``. Up to ``batch_size`` single-image rows share a pipeline
    call (``InstructX2XEditor.edit_batch``). ``after_row(prepared_row, folder)`` runs once a
    row is written (e.g. a PACS store) and returns extra columns; a row counts as done only
    after it.

    Returns
    -------
    dict
        The ``done`` event on the main process; ``{}`` on the others.
    """
    import csv
    import os
    import shutil

    from .outputs import atomic_output_dir

    if not is_integer(batch_size) or batch_size < 1:
        raise ParameterError(f"batch size must be an integer >= 1, got {batch_size!r}.")
    shard = shard or Shard()
    settings = settings if settings is not None else jobs_settings([p.job for p in prepared], batch_size)
    if shard.is_main:
        open_jobs_output(output, settings)
    shard.wait()
    records = output / RECORDS
    done = read_records(records, "rows", key="job")
    todo = [(n, item) for n, item in shard.mine(list(enumerate(prepared, start=1))) if n not in done]
    emit({"event": "jobs", "count": len(prepared), "done": len(done), "todo": len(todo)})
    for _, item in todo:
        load_verifier(item, editor)
    with open_record(records, "rows", shard) as sink:
        for group in _batches(todo, batch_size):
            numbers = [number for number, _ in group]
            items = [item for _, item in group]
            if len(items) == 1:
                results = [edit_images(items[0], editor, _with_job(emit, numbers[0]), progress_bar)]
            else:
                emit({"event": "batch", "jobs": numbers})
                size = len(items)
                results = [
                    [r]
                    for r in editor.edit_batch(
                        [item.images[0] for item in items],
                        [item.job.parameters for item in items],
                        None if items[0].mask is None else [item.mask for item in items],
                        [item.keep_mask for item in items],
                        progress=lambda step, total, jobs=size: emit(
                            {"event": "progress", "step": step, "total": total, "jobs": jobs}
                        ),
                    )
                ]
            for number, item, item_results in zip(numbers, items, results):
                folder = output / item.job.output.name
                if os.path.lexists(folder):  # written by an interrupted run, never recorded
                    shutil.rmtree(folder)
                with atomic_output_dir(folder) as staging:
                    write_into(staging, item, item_results)
                manifest = item_results[0].manifest
                row = {
                    "job": number,
                    "image": item.job.input.name,
                    "instruction": item.job.parameters.instruction,
                    "seed": item.job.parameters.seed,
                    "output": folder.name,
                    "edit_fraction": round(manifest["edit_fraction"], 6),
                    "prior": ";".join(manifest["prior"]["categories"]) if manifest["prior"] else "",
                    "seconds": manifest["timings_s"]["total"],
                    "batch": len(items),
                }
                if after_row is not None:
                    row.update(after_row(item, folder))
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                emit({"event": "row", "job": number, "output": folder.name})
    shard.wait()
    if not shard.is_main:
        return {}
    rows = read_records(records, "rows", key="job")
    ordered = [rows[number] for number in range(1, len(prepared) + 1)]
    staged = output / ".results.csv.partial"
    with open(staged, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(ordered[0]))
        writer.writeheader()
        writer.writerows(ordered)
    staged.replace(output / "results.csv")
    (output / INCOMPLETE).unlink()
    summary = {
        "event": "done",
        "output": str(output),
        "jobs": len(ordered),
        "resumed_after": len(done),
        "results": "results.csv",
    }
    emit(summary)
    return summary


def _with_job(emit: Events, number: int) -> Events:
    """``emit`` with the job's row number added to each event."""
    return lambda event: emit({**event, "job": number})


def _batches(rows: list[tuple[int, PreparedJob]], size: int):
    """Consecutive (number, row) pairs that can share a pipeline call: one image each, edits,
    the same presence of an edit mask; at most ``size``."""
    group: list[tuple[int, PreparedJob]] = []
    for number, item in rows:
        fits = (
            len(item.images) == 1
            and item.job.command == "edit"
            and (not group or (item.mask is None) == (group[0][1].mask is None))
        )
        if group and (not fits or len(group) == size):
            yield group
            group = []
        if not fits:
            yield [(number, item)]
            continue
        group.append((number, item))
    if group:
        yield group


def _input_files(path: Path, is_dicom_file) -> list[tuple[Path, bool]]:
    """(file, is it DICOM) for the file itself, or for the DICOM files directly in a folder
    (sorted by name); each file's head is read once."""
    if path.is_dir():
        files = [(p, True) for p in sorted(path.iterdir()) if p.is_file() and is_dicom_file(p)]
        if not files:
            raise InputError(f"no DICOM files in folder {path.name}.")
        return files
    if not path.is_file():
        raise InputNotFoundError(f"input image not found: {path.name}")
    return [(path, is_dicom_file(path))]


class _Eta:
    """Seconds left, from the mean time per step so far (None until a step is done)."""

    def __init__(self, total: int) -> None:
        self.total, self.started = total, time.monotonic()

    def eta(self, done: int) -> float | None:
        if done <= 0:
            return None
        per_step = (time.monotonic() - self.started) / done
        return round(per_step * (self.total - done), 1)
