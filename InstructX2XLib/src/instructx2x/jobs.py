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
import time
from pathlib import Path
from typing import Any, Callable

from .errors import InputError, InputNotFoundError, OutputExistsError, PacsError, ParameterError
from .parameters import EditParameters, check_masks

__all__ = ["EditJob", "PreparedJob", "prepare", "run_job", "edit_images", "write_results", "JOB_SCHEMA_VERSION", "COMMANDS"]

JOB_SCHEMA_VERSION = 1
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

    def __post_init__(self) -> None:
        if self.command not in COMMANDS:
            raise ParameterError(f"command must be one of {COMMANDS}, got {self.command!r}.")
        if isinstance(self.feather_px, bool) or not isinstance(self.feather_px, int) or self.feather_px < 0:
            raise ParameterError(f"feather must be an integer >= 0, got {self.feather_px!r}.")
        if self.push_stow is not None and not self.push_stow.startswith(("http://", "https://")):
            raise ParameterError(f"push_stow must be an http(s) URL, got {self.push_stow!r}.")
        if (self.push_cstore or self.push_stow) and self.command != "edit":
            raise ParameterError("pushing to a PACS needs the edit command.")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EditJob":
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
        for key in ("input", "output", "mask", "keep_mask"):
            if values.get(key) is not None:
                values[key] = Path(values[key])
        try:
            return cls(**values)
        except TypeError as error:
            raise ParameterError(f"job: {error}.") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, the inverse of ``from_dict``."""
        data = dataclasses.asdict(self)
        for key in ("input", "output", "mask", "keep_mask"):
            if data[key] is not None:
                data[key] = str(data[key])
        return data


@dataclasses.dataclass
class PreparedJob:
    """A job whose inputs are read and checked; nothing has been written yet."""

    job: EditJob
    images: list  # list[Radiograph]
    mask: Any
    keep_mask: Any
    cstore_target: Any


def prepare(job: EditJob) -> PreparedJob:
    """Read and check every input of ``job`` before any model work or any file is written.

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

    if job.output.exists():
        raise OutputExistsError(f"output folder {job.output.name} already exists; choose a new one.")
    target = None if job.push_cstore is None else CStoreTarget.parse(job.push_cstore)
    paths = _input_files(job.input, is_dicom_file)
    if (job.mask or job.keep_mask) and len(paths) > 1:
        raise ParameterError("a mask and a keep mask apply to one image; the input is a folder.")
    images = []
    for path in paths:
        if is_dicom_file(path):
            image = read_dicom(path, voi=job.voi, allow_non_chest=job.allow_non_chest)
            if job.command == "edit":
                check_exportable(image.metadata["dataset"], image.source)
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
    return PreparedJob(job, images, mask, keep, target)


def run_job(prepared: PreparedJob, editor, emit: Events, progress_bar: bool = False,
            float_maps: bool = False) -> dict:
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
    parameters = editor.resolve(job.parameters)
    steps = parameters.num_inference_steps if job.command == "edit" else 0
    total = steps * len(prepared.images)
    emit({"event": "started", "command": job.command, "total": total,
          "images": len(prepared.images)})
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

            def report(step: int, _: int, offset: int = index * steps) -> None:
                if bar is not None:
                    bar.update(1)
                emit({"event": "progress", "step": offset + step, "total": total,
                      "eta_s": clock.eta(offset + step)})

            results.append(editor.edit(image, parameters, prepared.mask, prepared.keep_mask,
                                       progress=report))
    finally:
        if bar is not None:
            bar.close()
    return results


def write_results(prepared: PreparedJob, results: list, emit: Events, float_maps: bool = False) -> dict:
    """The output part of ``run_job``: files in one atomic folder, then the PACS push."""
    from .dicom.export import write_dicom_edit
    from .dicom.pacs import push_cstore, push_stow
    from .outputs import atomic_output_dir, write_float_maps, write_png_result

    job = prepared.job
    emit({"event": "export", "output": str(job.output)})
    written = []
    with atomic_output_dir(job.output) as staging:
        for index, (image, result) in enumerate(zip(prepared.images, results)):
            folder = staging if len(prepared.images) == 1 else staging / f"image-{index + 1:03d}"
            folder.mkdir(exist_ok=True)
            if image.format == "dicom" and result.edited is not None:
                names = write_dicom_edit(folder, image, result, feather_px=job.feather_px)
            else:
                names = [p.name for p in write_png_result(folder, image, result)]
            if float_maps:
                names += [p.name for p in write_float_maps(folder, image, result)]
            written += [str((folder / n).relative_to(staging)) for n in names]
    summary = {"event": "done", "output": str(job.output), "files": written,
               "prior": results[0].manifest["prior"],
               "edit_fraction": results[0].manifest["edit_fraction"],
               "untrained": results[0].untrained}
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


def _input_files(path: Path, is_dicom_file) -> list[Path]:
    """The file itself, or the DICOM files directly in a folder (sorted by name)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and is_dicom_file(p))
        if not files:
            raise InputError(f"no DICOM files in folder {path.name}.")
        return files
    if not path.is_file():
        raise InputNotFoundError(f"input image not found: {path.name}")
    return [path]


class _Eta:
    """Seconds left, from the mean time per step so far (None until a step is done)."""

    def __init__(self, total: int) -> None:
        self.total, self.started = total, time.monotonic()

    def eta(self, done: int) -> float | None:
        if done <= 0:
            return None
        per_step = (time.monotonic() - self.started) / done
        return round(per_step * (self.total - done), 1)
