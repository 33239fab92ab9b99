"""Read radiographs from DICOM: tolerant decoding, explicit refusals.

Accepted: CR, DX (for presentation and for processing) and single-frame grayscale Secondary
Capture / OT exports. Everything else is refused with the reason, before any pixel is decoded
where possible. Error and log messages name the file, never patient attributes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from ..errors import InputNotFoundError
from ..image_io import MAX_PIXELS, ImageReadError, Radiograph, looks_like_dicom, register_reader
from .intensity import IntensityMapping, mapping_from_dataset

__all__ = [
    "DicomReadError",
    "DicomSource",
    "PixelSpacing",
    "read_dicom",
    "pixel_spacing",
    "SUPPORTED_SOP_CLASSES",
    "CHEST_BODY_PARTS",
    "PHANTOM_MANUFACTURER",
]

logger = logging.getLogger(__name__)

SUPPORTED_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
}
CHEST_BODY_PARTS = {"CHEST", "THORAX", "LUNG", "HEART", "RIB", "RIBS", "MEDIASTINUM", "TORSO"}
LATERAL_VIEWS = {"LL", "RL", "LLD", "RLD", "LAT", "LATERAL"}
# the Manufacturer the synthetic cohort writes: such a film is a phantom, not a patient's
PHANTOM_MANUFACTURER = "InstructX2X synthetic cohort"
REQUIRED = (
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
)


class DicomReadError(ImageReadError):
    """A DICOM file that cannot be edited, with the reason."""


def read_dicom(path: str | Path, *, voi: str | int = "first", allow_non_chest: bool = False) -> Radiograph:
    """Read a chest radiograph from a DICOM file.

    Parameters
    ----------
    path: str | pathlib.Path
        The file.
    voi: str | int
        Which VOI transform gives the display values (see ``intensity.mapping_from_dataset``).
    allow_non_chest: bool
        Accept images whose BodyPartExamined is not a chest part (the model and its priors
        are for PA chest films).

    Returns
    -------
    Radiograph
        ``pixels`` are display values in [0, 1]; ``dicom`` is what the export needs of the
        file (``DicomSource``: the attributes without pixel data, the stored values, the
        mapping display <-> stored, the reader's warnings, the pixel spacing).

    Raises
    ------
    FileNotFoundError
        When the file does not exist.
    DicomReadError
        For every file that cannot be edited; the message says why.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"input image not found: {path.name}")
    name = path.name
    content = path.read_bytes()  # read once: parsed below and hashed for the manifest
    try:
        ds = pydicom.dcmread(io.BytesIO(content))
    except InvalidDicomError as error:
        raise DicomReadError(f"{name}: not a DICOM file ({error}).") from error
    except Exception as error:  # pydicom raises many types on damaged files
        raise DicomReadError(f"{name}: cannot parse the DICOM file ({error}).") from error

    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in SUPPORTED_SOP_CLASSES:
        label = UID(sop_class).name if sop_class else "missing SOPClassUID"
        raise DicomReadError(
            f"{name}: {label} is not a radiograph this tool edits (supported: CR, "
            "DX, grayscale Secondary Capture)."
        )
    if "PixelData" not in ds:
        raise DicomReadError(f"{name}: the dataset has no pixel data.")
    missing = [keyword for keyword in REQUIRED if keyword not in ds]
    if missing:
        raise DicomReadError(f"{name}: required attribute(s) missing: {', '.join(missing)}.")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise DicomReadError(
            f"{name}: multi-frame images ({frames} frames) are not supported; "
            "export the radiograph as a single frame."
        )
    photometric = str(ds.PhotometricInterpretation)
    if int(ds.SamplesPerPixel) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomReadError(
            f"{name}: photometric interpretation {photometric} with "
            f"{ds.SamplesPerPixel} sample(s) per pixel; a grayscale radiograph "
            "(MONOCHROME1 or MONOCHROME2) is expected."
        )
    rows, columns = int(ds.Rows), int(ds.Columns)
    if rows < 8 or columns < 8 or rows * columns > MAX_PIXELS:
        raise DicomReadError(
            f"{name}: {rows}x{columns} pixels is outside the supported size (8x8 to {MAX_PIXELS} pixels)."
        )
    warnings = _check_view(ds, name, allow_non_chest)
    stored = _decode(ds, name)
    try:
        mapping = mapping_from_dataset(ds, stored, voi)
    except (ValueError, NotImplementedError) as error:
        raise DicomReadError(f"{name}: {error}") from error
    header = ds.copy()
    del header.PixelData
    return Radiograph(
        pixels=mapping.forward(stored),
        source=name,
        sha256=hashlib.sha256(content).hexdigest(),
        format="dicom",
        bits=int(ds.BitsStored),
        transforms=list(mapping.description),
        dicom=DicomSource(
            dataset=header,
            stored=stored,
            mapping=mapping,
            warnings=tuple(warnings),
            pixel_spacing=pixel_spacing(ds),
            transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")),
            sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        ),
    )


@dataclasses.dataclass(frozen=True)
class PixelSpacing:
    """Row and column spacing in mm, and the attribute that gave it: ``PixelSpacing``
    (calibrated to the patient) or ``ImagerPixelSpacing`` (at the detector)."""

    attribute: str
    row_mm: float
    column_mm: float

    def to_dict(self) -> dict[str, str | float]:
        """As manifests record it."""
        return {"attribute": self.attribute, "row_mm": self.row_mm, "column_mm": self.column_mm}


@dataclasses.dataclass(frozen=True)
class DicomSource:
    """What a radiograph read from DICOM keeps of its file, for the export into its study.

    Attributes
    ----------
    dataset: pydicom.Dataset
        The file's attributes without its pixel data (patient, study, series, geometry).
    stored: numpy.ndarray
        The stored pixel values, which the export composites the edit into.
    mapping: IntensityMapping
        Stored values <-> the display values of ``Radiograph.pixels``.
    warnings: tuple[str, ...]
        What the reader accepted with a warning (an AP or lateral view, another body part).
    pixel_spacing: PixelSpacing | None
        None when the file gives no valid spacing.
    transfer_syntax: str
        The file's transfer syntax UID.
    sop_instance_uid: str
        The file's instance.
    """

    dataset: Dataset
    stored: np.ndarray
    mapping: IntensityMapping
    warnings: tuple[str, ...]
    pixel_spacing: PixelSpacing | None
    transfer_syntax: str
    sop_instance_uid: str


def pixel_spacing(ds: Dataset) -> PixelSpacing | None:
    """Row and column spacing in mm, and which attribute gave it.

    PixelSpacing (calibrated to the patient) wins when it is valid; a projection radiograph
    often has only ImagerPixelSpacing (at the detector, magnification not corrected). Zero or
    malformed values (some CR writers store 0\\0) count as absent.
    """
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        try:
            spacing = [float(v) for v in value] if value is not None else []
        except (TypeError, ValueError):
            continue
        if len(spacing) == 2 and all(v > 0 for v in spacing):
            return PixelSpacing(keyword, spacing[0], spacing[1])
    return None


def _check_view(ds: Dataset, name: str, allow_non_chest: bool) -> list[str]:
    warnings = []
    body_part = str(ds.get("BodyPartExamined", "") or "").upper()
    if body_part and body_part not in CHEST_BODY_PARTS:
        if not allow_non_chest:
            raise DicomReadError(
                f"{name}: BodyPartExamined is {body_part!r}, not a chest; the "
                "model and its priors are for chest films (override: "
                "allow_non_chest / --allow-non-chest)."
            )
        warnings.append(f"body part {body_part} is not a chest (override given)")
    view = str(ds.get("ViewPosition", "") or "").upper()
    if view == "AP":
        warnings.append("AP view: the anatomical priors were built from PA films")
    elif view in LATERAL_VIEWS:
        warnings.append(f"lateral view ({view}): the model and priors are for frontal PA films")
    for message in warnings:
        logger.warning("%s.", message)  # never the file's name: it may be a patient's
    return warnings


def _decode(ds: Dataset, name: str) -> np.ndarray:
    from pydicom.pixels import get_decoder

    transfer_syntax = ds.file_meta.get("TransferSyntaxUID")
    if transfer_syntax is None:
        raise DicomReadError(f"{name}: the file meta information has no TransferSyntaxUID.")
    transfer_syntax = UID(transfer_syntax)
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError as error:
        raise DicomReadError(
            f"{name}: transfer syntax {transfer_syntax.name} ({transfer_syntax}) cannot be decoded: {error}"
        ) from error
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise DicomReadError(
            f"{name}: no installed decoder for {transfer_syntax.name}; install one of: {missing}."
        )
    try:
        stored = ds.pixel_array
    except Exception as error:  # truncated or corrupt pixel data
        raise DicomReadError(f"{name}: cannot decode the pixel data ({error}).") from error
    if stored.shape != (int(ds.Rows), int(ds.Columns)):
        raise DicomReadError(
            f"{name}: decoded pixel data has shape {stored.shape}, expected {int(ds.Rows)}x{int(ds.Columns)}."
        )
    return stored


register_reader("dicom", looks_like_dicom, lambda path, head: read_dicom(path))
