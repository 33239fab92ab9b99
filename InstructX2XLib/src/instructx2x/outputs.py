"""Write an edit's files all at once: a temporary folder, then one rename.

A run that fails or is cancelled leaves nothing behind, and an existing output folder is
never overwritten.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .errors import InputError, InstructX2XError, OutputExistsError, ResourceError
from .image_io import Radiograph
from .overlay import guidance_overlay, series_strip, side_by_side
from .provenance import to_json
from .staging import remove_stale_staging, staging_prefix

if TYPE_CHECKING:  # types only: the panels use atomic_output_dir without torch
    from .classifier_set import ClassifierSet
    from .editor import EditResult, SeriesResult

__all__ = [
    "check_new_output_folder",
    "atomic_output_dir",
    "write_png_result",
    "write_float_maps",
    "write_figure",
    "write_series_result",
    "series_manifest",
    "UNTRAINED_NOTICE",
    "SYNTHETIC_PNG_TEXT",
]

# Every PNG we write says what it is in its text chunk, as every DICOM object does.
SYNTHETIC_PNG_TEXT = "SYNTHETIC - made by InstructX2X - NOT FOR DIAGNOSIS"
UNTRAINED_NOTICE = (
    "UNTRAINED MODEL: random weights, for testing the software only; this image shows no real edit."
)


def _umask() -> int:
    """The process umask (read by setting and restoring it; there is no getter)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def check_new_output_folder(target: Path) -> Path:
    """Check that a new output folder can be made at ``target``, before any work is done.

    Nothing is created. The path is normalised first (``a/../out`` is ``out``).

    Parameters
    ----------
    target : pathlib.Path
        The output folder the user named.

    Returns
    -------
    pathlib.Path
        ``target``, absolute and normalised.

    Raises
    ------
    OutputExistsError
        When something (a folder, a file, a link) already has that name.
    InputError
        When the nearest existing entry on the way to it is not a folder (``-o afile/out``
        with ``afile`` a file), so no folder can be made there.
    """
    target = Path(os.path.abspath(target))
    if os.path.lexists(target):
        raise OutputExistsError(f"output folder {target.name} already exists; choose a new one.")
    existing = next(parent for parent in target.parents if os.path.lexists(parent))
    if not existing.is_dir():
        raise InputError(f"cannot make the output folder {target.name}: {existing.name} is not a folder.")
    return target


@contextlib.contextmanager
def atomic_output_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder that becomes ``target`` only if the block succeeds.

    The path is normalised first (``a/../out`` is ``out``), so no folder named on the way is
    created; the result gets the permissions the umask gives a new folder (a temporary
    folder alone would be 0700). A block that fails or is interrupted leaves nothing.

    Raises
    ------
    OutputExistsError
        When ``target`` already exists (checked before and after the work).
    InputError
        When a file stands where a folder on the way to ``target`` would be.
    ResourceError
        When the file system refuses the writes (read-only, full, no permission).
    """
    target = check_new_output_folder(target)
    staging = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(target)
        staging = Path(tempfile.mkdtemp(prefix=staging_prefix(target), dir=target.parent))
        staging.chmod(0o777 & ~_umask())
        yield staging
        if target.exists():
            raise OutputExistsError(f"output folder {target.name} appeared while working; nothing written.")
        staging.rename(target)
    except OSError as error:
        if isinstance(error, InstructX2XError):
            raise
        raise ResourceError(
            f"cannot write the output folder {target.name}: {error.strerror or error}."
        ) from error
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _png_info():
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Description", SYNTHETIC_PNG_TEXT)
    return info


def _save_gray(array: np.ndarray, bits: int, path: Path) -> None:
    if bits > 8:
        picture = Image.fromarray((np.clip(array, 0, 1) * 65535).round().astype(np.uint16))
    else:
        picture = Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8))
    picture.save(path, pnginfo=_png_info())


def write_png_result(directory: Path, image: Radiograph, result: EditResult) -> list[Path]:
    """Write the edit as PNGs plus ``manifest.json`` into ``directory``.

    Files: ``edited.png`` (the input's bit depth; absent for a preview), ``guidance.png``
    (the map, 8-bit), ``guidance_overlay.png`` (RGB), ``edit_mask.png`` (0/255) and
    ``manifest.json``.
    """
    images = ["guidance.png", "guidance_overlay.png", "edit_mask.png"]
    if result.edited is not None:
        _save_gray(result.edited, image.bits, directory / "edited.png")
        images.insert(0, "edited.png")
    _save_gray(result.guidance_map, 8, directory / "guidance.png")
    overlay = guidance_overlay(image.pixels, result.guidance_map, result.edit_mask)
    Image.fromarray(overlay).save(directory / "guidance_overlay.png", pnginfo=_png_info())
    Image.fromarray(result.edit_mask.astype(np.uint8) * 255).save(directory / "edit_mask.png")
    manifest = dict(result.manifest)
    if result.untrained:
        manifest["notice"] = UNTRAINED_NOTICE
    manifest["files"] = images
    (directory / "manifest.json").write_text(to_json(manifest) + "\n")
    return [directory / name for name in [*images, "manifest.json"]]


def write_figure(
    directory: Path, image: Radiograph, result: EditResult, reference: np.ndarray | None = None
) -> Path:
    """``figure.png``: input, edit and guidance overlay side by side (``reference`` outlined)."""
    picture = side_by_side(
        image.pixels, result.edited_image(), result.guidance_map, result.edit_mask, reference
    )
    Image.fromarray(picture).save(directory / "figure.png", pnginfo=_png_info())
    return directory / "figure.png"


def write_verification(
    directory: Path,
    image: Radiograph,
    result: EditResult,
    classifiers: ClassifierSet,
    chosen_because: str,
    include_demographics: bool = False,
) -> list[Path]:
    """``verification.json`` and its readable ``verification.txt`` (``verification.verify_edit``);
    the classifiers' age, sex and race estimates only with ``include_demographics``, labelled
    as model estimates."""
    from .verification import verify_edit

    report = verify_edit(
        image.pixels,
        result.edited_image(),
        result.edit_mask,
        result.manifest["instruction"]["text"],
        classifiers,
        chosen_because=chosen_because,
    )
    (directory / "verification.json").write_text(to_json(report.to_dict(include_demographics)) + "\n")
    (directory / "verification.txt").write_text(report.summary(include_demographics))
    return [directory / "verification.json", directory / "verification.txt"]


def write_float_maps(directory: Path, image: Radiograph, result: EditResult) -> list[Path]:
    """The maps at full precision on the input's grid, for overlays that keep their values.

    ``guidance_map.npy``, ``relevance_map.npy`` and ``prior_mask.npy`` (float32, where the
    mode computes them), ``edit_mask.npy`` (bool), and ``maps.json`` with the geometry
    (rows, columns, pixel spacing when the input has one) and each file's meaning.
    """
    maps = {
        "guidance_map": result.guidance_map,
        "relevance_map": result.relevance_map,
        "prior_mask": result.prior_mask,
        "edit_mask": result.edit_mask,
    }
    written = []
    for name, array in maps.items():
        if array is not None:
            np.save(directory / f"{name}.npy", array)
            written.append(directory / f"{name}.npy")
    rows, columns = image.pixels.shape
    spacing = image.dicom.pixel_spacing if image.dicom is not None else None
    geometry = {
        "rows": rows,
        "columns": columns,
        "pixel_spacing": None if spacing is None else spacing.to_dict(),
        "files": {p.stem: ("bool" if p.stem == "edit_mask" else "float32 in [0, 1]") for p in written},
    }
    (directory / "maps.json").write_text(to_json(geometry) + "\n")
    return [*written, directory / "maps.json"]


def series_manifest(result: SeriesResult, files: list[str], step_files: list[list[str]]) -> dict:
    """The manifest of a progression series: the series as parsed, the edit region the steps
    share, and each step's own manifest with its files."""
    region = result.steps[result.series.region_step].manifest
    manifest = {
        "kind": "edit_series",
        "series": {**result.series.to_dict(), "steps": len(result.steps)},
        "edit_region": {
            "shared": True,
            "from_instruction": result.series.instructions[result.series.region_step],
            "edit_fraction": region["edit_fraction"],
            "prior": region["prior"],
        },
        "files": files,
        "steps": [{**step.manifest, "files": names} for step, names in zip(result.steps, step_files)],
    }
    if result.untrained:
        manifest["notice"] = UNTRAINED_NOTICE
    return manifest


def write_series_result(
    directory: Path, image: Radiograph, result: SeriesResult, reference: np.ndarray | None = None
) -> list[Path]:
    """Write a progression series as PNGs, its strip figure and ``manifest.json``.

    Files: ``step-01.png``, ``step-02.png``, ... (each step's edit at the input's bit depth),
    the edit region the steps share as ``guidance.png``, ``guidance_overlay.png`` and
    ``edit_mask.png``, ``strip.png`` (the input, then each step, labelled; ``reference``
    outlined in green) and ``manifest.json`` (``series_manifest``, strict JSON).
    """
    steps = [f"step-{number:02d}.png" for number in range(1, len(result.steps) + 1)]
    for name, step in zip(steps, result.steps):
        _save_gray(step.edited_image(), image.bits, directory / name)
    _save_gray(result.guidance_map, 8, directory / "guidance.png")
    overlay = guidance_overlay(image.pixels, result.guidance_map, result.edit_mask)
    Image.fromarray(overlay).save(directory / "guidance_overlay.png", pnginfo=_png_info())
    Image.fromarray(result.edit_mask.astype(np.uint8) * 255).save(directory / "edit_mask.png")
    labels = [f"{number}: {level}" for number, level in enumerate(result.series.levels, start=1)]
    strip = series_strip(
        image.pixels, [step.edited_image() for step in result.steps], labels, result.edit_mask, reference
    )
    Image.fromarray(strip).save(directory / "strip.png", pnginfo=_png_info())
    files = [*steps, "guidance.png", "guidance_overlay.png", "edit_mask.png", "strip.png"]
    manifest = series_manifest(result, files, [[name] for name in steps])
    (directory / "manifest.json").write_text(to_json(manifest) + "\n")
    return [directory / name for name in [*files, "manifest.json"]]
