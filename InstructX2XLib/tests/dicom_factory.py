"""Write small but complete DICOM radiographs for the tests (every edge case on demand)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

SOP_CLASSES = {
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
    "DXP": "1.2.840.10008.5.1.4.1.1.1.1.1",
    "SC": "1.2.840.10008.5.1.4.1.1.7",
    "SR": "1.2.840.10008.5.1.4.1.1.88.11",
}


def pydicom_data_file(name: str) -> str:
    """The path of a file of pydicom's test data (pydicom-data)."""
    path = get_testdata_file(name)
    if not isinstance(path, str):  # None: not found (a Dataset only with read=True)
        raise FileNotFoundError(f"pydicom's test data has no {name}.")
    return path


def phantom(rows: int, columns: int, bits: int = 12) -> np.ndarray:
    """A smooth chest-like pattern over the full stored range."""
    yy, xx = np.mgrid[0:rows, 0:columns]
    values = 0.5 + 0.35 * np.sin(yy / 7.0) * np.cos(xx / 5.0) + 0.1 * (yy / rows)
    return np.clip(values * (2**bits - 1), 0, 2**bits - 1)


def make_radiograph(
    kind: str = "CR",
    rows: int = 72,
    columns: int = 64,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    signed: bool = False,
    window: tuple[float, float] | None = (2048.0, 4096.0),
    rescale: tuple[float, float] | None = None,
    body_part: str | None = "CHEST",
    view: str | None = "PA",
    pixels: np.ndarray | None = None,
) -> Dataset:
    """A minimal valid image of the given kind, with patient and study attributes."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(SOP_CLASSES[kind])
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SOP_CLASSES[kind]
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
        "Test^Phantom",
        "PHANTOM-1",
        "19700101",
        "O",
    )
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "120000", "A1", "1"
    ds.ReferringPhysicianName = "Ref^Doctor"
    ds.Modality = {"CR": "CR", "DX": "DX", "DXP": "DX", "SC": "OT", "SR": "SR"}[kind]
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Manufacturer = "Phantom"
    ds.PatientOrientation = ["L", "F"]
    if body_part:
        ds.BodyPartExamined = body_part
    if view:
        ds.ViewPosition = view
    if kind == "SR":
        return ds
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.RescaleType = "US"
    if kind in ("DX", "DXP"):
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PresentationIntentType = "FOR PRESENTATION" if kind == "DX" else "FOR PROCESSING"
        ds.ImagerPixelSpacing = [0.2, 0.2]
    values = phantom(rows, columns, bits_stored) if pixels is None else pixels
    if signed:
        values = values - 2 ** (bits_stored - 1)
    dtype = {(8, False): np.uint8, (16, False): np.uint16, (16, True): np.int16}[(ds.BitsAllocated, signed)]
    ds.PixelData = np.asarray(values).astype(dtype).tobytes()
    return ds


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


# CI sets this: a missing system tool is then a failure, never a silent skip.
REQUIRE_TOOLS = os.environ.get("INSTRUCTX2X_REQUIRE_SYSTEM_TOOLS") == "1"


def require_tool(name: str, package: str) -> str:
    """Path of a system tool; skips the test (fails it in CI) when it is not installed."""
    executable = shutil.which(name)
    if executable is None:
        message = f"{name} is not installed (Debian package {package})"
        if REQUIRE_TOOLS:
            pytest.fail(message)
        pytest.skip(message)
    return executable


def dcmtk_compress(source: Path, target: Path, tool: str, *options: str) -> Path:
    """Compress with a dcmtk tool (dcmcjpeg, dcmcjpls, dcmcrle)."""
    executable = require_tool(tool, "dcmtk")
    subprocess.run([executable, *options, str(source), str(target)], check=True, capture_output=True)
    return target


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's error lines for a file (the validator of Debian's dicom3tools)."""
    executable = require_tool("dciodvfy", "dicom3tools")
    completed = subprocess.run([executable, str(path)], capture_output=True, text=True)
    return [line for line in (completed.stdout + completed.stderr).splitlines() if line.startswith("Error")]
