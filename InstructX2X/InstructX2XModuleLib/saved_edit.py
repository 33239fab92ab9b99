"""Read a saved edit's result folder back: numpy, pydicom and Pillow only (no slicer, no qt).

A folder an edit wrote (the worker's output folder, ``instructx2x edit --output``, or a copy of
its DICOM files) holds some of: ``counterfactual.dcm`` / ``edited.png``, ``guidance_map.npy`` /
``guidance.png`` / ``guidance_overlay.dcm`` / ``guidance_overlay.png``, and ``edit_mask.npy`` /
``edit_region_seg.dcm`` / ``edit_mask.png``. Each part is read from the first of its files
present. DICOM is read with pydicom alone, with calls that pydicom 2.4 (Slicer 5.10's) and 3.0
share: the SEG's pixel data directly, since Slicer's SEG reader (dcmqi) does not take a
segmentation of a radiograph, which has no frame of reference.

Every file is checked (readable, the kind of object its name says, one image, one grid, one
study) before any pixel array is returned, so a damaged or mixed folder is refused whole.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

__all__ = ["SavedEditError", "SavedEdit", "read_saved_edit", "modality_values", "PART_FILES", "MAX_PIXELS"]

# Where each part is read from, in order of preference (the float maps keep full precision)
PART_FILES = {
    "counterfactual": ("counterfactual.dcm", "edited.png"),
    "guidance": ("guidance_map.npy", "guidance.png", "guidance_overlay.dcm", "guidance_overlay.png"),
    "mask": ("edit_mask.npy", "edit_region_seg.dcm", "edit_mask.png"),
}
MAX_PIXELS = 50_000_000  # rows x columns: several times the largest detector a radiograph comes from
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


class SavedEditError(ValueError):
    """A folder that does not hold a readable saved edit; the message names the file and why."""


@dataclasses.dataclass
class SavedEdit:
    """The parts of a saved edit, on one ``(rows, columns)`` grid.

    ``counterfactual``: float32 modality values (DICOM) or the PNG's values; ``guidance``:
    float32 in [0, 1], or uint8 RGB ``(rows, columns, 3)`` when only the overlay picture was
    saved; ``mask``: bool. ``files`` says which file each part came from; ``spacing_mm`` is
    ``(row, column)`` when a file gives it; ``window`` is the counterfactual's DICOM
    ``(center, width)``.
    """

    counterfactual: np.ndarray | None
    guidance: np.ndarray | None
    mask: np.ndarray | None
    files: dict[str, str]
    spacing_mm: tuple[float, float] | None = None
    window: tuple[float, float] | None = None


def modality_values(stored: np.ndarray, dataset) -> np.ndarray:
    """Stored values x slope + intercept, as Slicer's DICOM reader puts them in a volume: the
    domain of a panel's radiograph and of its counterfactual."""
    slope = float(dataset.get("RescaleSlope", 1) or 1)
    intercept = float(dataset.get("RescaleIntercept", 0) or 0)
    return stored.astype(np.float32) * slope + intercept


def read_saved_edit(folder: Path) -> SavedEdit:
    """Read the counterfactual, the guidance and the edit region of a saved edit.

    Parameters
    ----------
    folder: Path
        The edit's result folder.

    Returns
    -------
    SavedEdit
        At least one part; the parts whose files are absent are None.

    Raises
    ------
    SavedEditError
        When ``folder`` is not a folder or holds none of ``PART_FILES``, or a file is
        unreadable, not what its name says, too large, on another grid than the others, or of
        another study.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SavedEditError(f"{folder.name} is not a folder.")
    found = {
        part: next((folder / name for name in names if (folder / name).is_file()), None)
        for part, names in PART_FILES.items()
    }
    chosen = {part: path for part, path in found.items() if path is not None}
    if not chosen:
        known = ", ".join(name for names in PART_FILES.values() for name in names)
        raise SavedEditError(f"{folder.name} holds no saved edit (none of {known}).")
    headers = {part: _header(path) for part, path in chosen.items() if path.suffix == ".dcm"}
    _check_one_study(headers, chosen)
    shapes = {part: _shape(path, headers.get(part)) for part, path in chosen.items()}
    first = next(iter(shapes))
    for part, shape in shapes.items():
        if shape[:2] != shapes[first][:2]:
            raise SavedEditError(
                f"{chosen[part].name} is {shape[0]}x{shape[1]} but {chosen[first].name} is "
                f"{shapes[first][0]}x{shapes[first][1]}: they are not of one edit."
            )
    arrays = {part: _read(path, headers.get(part)) for part, path in chosen.items()}
    for part, array in arrays.items():
        if array.shape != shapes[part]:
            raise SavedEditError(
                f"{chosen[part].name}: its pixel data is {'x'.join(map(str, array.shape))}, "
                f"its header says {'x'.join(map(str, shapes[part]))}."
            )
    spacing = next(
        (s for s in (_spacing(h) for h in headers.values()) if s is not None), None
    ) or _maps_spacing(folder / "maps.json")
    counterfactual_header = headers.get("counterfactual")
    return SavedEdit(
        counterfactual=arrays.get("counterfactual"),
        guidance=arrays.get("guidance"),
        mask=arrays.get("mask"),
        files={part: path.name for part, path in chosen.items()},
        spacing_mm=spacing,
        window=_window(counterfactual_header),
    )


# -- checks before any pixel is read ----------------------------------------------------------
def _header(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError, KeyError, TypeError) as error:
        raise SavedEditError(f"{path.name} is not a readable DICOM file ({type(error).__name__}).") from None


def _check_one_study(headers: dict, chosen: dict) -> None:
    studies = {str(header.get("StudyInstanceUID", "")) for header in headers.values()}
    if len(studies) > 1:
        names = ", ".join(chosen[part].name for part in headers)
        raise SavedEditError(f"{names} are of different studies: they are not of one edit.")


def _shape(path: Path, header) -> tuple[int, ...]:
    """The file's array shape, from its header alone; refuses what its name does not promise."""
    if header is not None:
        shape = _dicom_shape(path, header)
    elif path.suffix == ".npy":
        try:
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        except (OSError, ValueError, EOFError) as error:
            raise SavedEditError(
                f"{path.name} is not a readable .npy array ({type(error).__name__})."
            ) from None
        if len(shape) != 2:
            raise SavedEditError(f"{path.name} holds a {len(shape)}-D array; a map is 2-D.")
    else:
        shape = _png_shape(path)
    if shape[0] * shape[1] > MAX_PIXELS:
        raise SavedEditError(
            f"{path.name} is {shape[0]}x{shape[1]}, over the {MAX_PIXELS} pixels a saved edit can have."
        )
    return shape


def _dicom_shape(path: Path, header) -> tuple[int, ...]:
    if "Rows" not in header or "Columns" not in header:
        raise SavedEditError(f"{path.name} holds no image.")
    rows, columns = int(header.Rows), int(header.Columns)
    samples, frames = int(header.get("SamplesPerPixel", 1) or 1), int(header.get("NumberOfFrames", 1) or 1)
    if path.name == "edit_region_seg.dcm":
        if str(header.get("SOPClassUID", "")) != SEG_SOP_CLASS:
            raise SavedEditError(f"{path.name} is not a DICOM Segmentation.")
        if frames != 1:
            raise SavedEditError(
                f"{path.name} holds {frames} frames; an edit region is one segment of one image."
            )
        if str(header.get("SegmentationType", "")) not in ("BINARY", "FRACTIONAL"):
            raise SavedEditError(f"{path.name} has an unknown SegmentationType.")
    elif frames != 1:
        raise SavedEditError(f"{path.name} holds {frames} frames; a saved edit's image is one frame.")
    elif path.name == "guidance_overlay.dcm" and samples != 3:
        raise SavedEditError(f"{path.name} is not an RGB picture.")
    elif path.name == "counterfactual.dcm" and samples != 1:
        raise SavedEditError(f"{path.name} is not a grayscale image.")
    return (rows, columns, 3) if samples == 3 else (rows, columns)


def _png_shape(path: Path) -> tuple[int, ...]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            columns, rows = image.size
            bands = len(image.getbands())
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise SavedEditError(f"{path.name} is not a readable PNG ({type(error).__name__}).") from None
    expected = 3 if path.name == "guidance_overlay.png" else 1
    if bands != expected:
        raise SavedEditError(f"{path.name} has {bands} channels; {expected} expected.")
    return (rows, columns, 3) if bands == 3 else (rows, columns)


# -- reading ----------------------------------------------------------------------------------
def _read(path: Path, header) -> np.ndarray:
    if header is not None:
        return _read_dicom(path)
    if path.suffix == ".npy":
        array = np.load(path, allow_pickle=False)
        return array.astype(bool) if path.stem == "edit_mask" else np.clip(array.astype(np.float32), 0.0, 1.0)
    from PIL import Image

    try:
        with Image.open(path) as image:
            array = np.asarray(image)
    except (OSError, ValueError) as error:
        raise SavedEditError(f"{path.name} cannot be decoded ({type(error).__name__}).") from None
    if path.name == "guidance.png":
        return array.astype(np.float32) / 255.0
    if path.name == "edit_mask.png":
        return array > 127
    return array.astype(np.uint8) if array.ndim == 3 else array.astype(np.float32)


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom

    try:
        dataset = pydicom.dcmread(path)
        pixels = dataset.pixel_array
    except Exception as error:  # noqa: BLE001 - pydicom's pixel handlers raise many kinds; the file is what fails
        raise SavedEditError(
            f"{path.name}: its pixel data cannot be decoded ({type(error).__name__})."
        ) from None
    if path.name == "edit_region_seg.dcm":
        if str(dataset.SegmentationType) == "FRACTIONAL":
            return pixels >= int(dataset.get("MaximumFractionalValue", 255) or 255) / 2
        return pixels > 0
    if path.name == "guidance_overlay.dcm":
        return pixels.astype(np.uint8)
    return modality_values(pixels, dataset)


def _spacing(header) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        values = header.get(keyword)
        if values is not None and len(values) == 2 and all(float(v) > 0 for v in values):
            return float(values[0]), float(values[1])
    return None


def _maps_spacing(path: Path) -> tuple[float, float] | None:
    """``maps.json``'s pixel spacing (the worker writes it beside the float maps)."""
    try:
        spacing = json.loads(path.read_text()).get("pixel_spacing") or {}
        row, column = float(spacing["row_mm"]), float(spacing["column_mm"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return (row, column) if row > 0 and column > 0 else None


def _window(header) -> tuple[float, float] | None:
    if header is None or "WindowCenter" not in header or "WindowWidth" not in header:
        return None
    center, width = header.WindowCenter, header.WindowWidth
    first = [
        value[0] if hasattr(value, "__len__") and not isinstance(value, str) else value
        for value in (center, width)
    ]
    try:
        return float(first[0]), float(first[1])
    except (TypeError, ValueError):
        return None
