"""Reading radiographs: one front door, ``read_image``, over pluggable readers.

Each reader turns a file into a ``Radiograph``: display-ready grayscale in ``[0, 1]`` plus
what was done to get there. PNG and JPEG are built in (research use); the DICOM reader
registers itself the same way, so callers never care which format came in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InputError, InputNotFoundError, ParameterError
from .provenance import source_label

if TYPE_CHECKING:  # a type only: the DICOM reader imports this module
    from .dicom.read import DicomSource

__all__ = [
    "Radiograph",
    "ImageReadError",
    "register_reader",
    "read_image",
    "read_mask",
    "is_dicom_file",
    "looks_like_dicom",
    "MAX_PIXELS",
]

# Memory guard: 10^8 pixels is ~10k x 10k, larger than any detector.
MAX_PIXELS = 100_000_000


class ImageReadError(InputError):
    """A file exists but is not a readable 2-D radiograph."""


@dataclasses.dataclass
class Radiograph:
    """A radiograph ready for editing.

    Attributes
    ----------
    pixels: numpy.ndarray
        float32 ``(rows, columns)`` in ``[0, 1]``, brighter = more attenuation.
    source: str
        File name (no directories, so that logs never carry a patient's folder names).
    sha256: str
        Hash of the file's bytes: the input's identity in manifests.
    format: str
        ``png``, ``jpeg`` or ``dicom``.
    bits: int
        Bit depth of the stored values (8 or 16 for PNG).
    transforms: list[str]
        Every intensity change applied while reading, in order.
    dicom: DicomSource | None
        What the DICOM reader keeps of the file for the export (None for PNG and JPEG).
    """

    pixels: np.ndarray
    source: str
    sha256: str
    format: str
    bits: int
    transforms: list[str] = dataclasses.field(default_factory=list)
    dicom: DicomSource | None = None

    def dicom_source(self) -> DicomSource:
        """``dicom``, for a radiograph the DICOM reader returned.

        Raises
        ------
        ParameterError
            When it was read from another format.
        """
        if self.dicom is None:
            raise ParameterError(f"{self.source} was not read from DICOM.")
        return self.dicom

    def identity(self) -> dict:
        """What manifests record about the input (no pixel data, no patient data): a label
        from its hash (``provenance.source_label``), never its file name."""
        rows, columns = self.pixels.shape
        return {
            "label": source_label(self.sha256),
            "sha256": self.sha256,
            "format": self.format,
            "rows": rows,
            "columns": columns,
            "bits": self.bits,
            "transforms": list(self.transforms),
        }


Reader = Callable[[Path, bytes], Radiograph]
_READERS: list[tuple[str, Callable[[Path, bytes], bool], Reader]] = []


def register_reader(name: str, accepts: Callable[[Path, bytes], bool], reader: Reader) -> None:
    """Add a reader; ``accepts(path, head)`` sees the path and the file's first 132 bytes."""
    _READERS.append((name, accepts, reader))


def read_image(path: str | Path) -> Radiograph:
    """Read a radiograph with the first reader that accepts the file.

    Raises
    ------
    InputNotFoundError
        When the file does not exist.
    ImageReadError
        When no reader accepts it, or the accepting reader cannot decode it.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"input image not found: {path.name}")
    with open(path, "rb") as handle:
        head = handle.read(132)
    for _, accepts, reader in _READERS:
        if accepts(path, head):
            return reader(path, head)
    raise ImageReadError(
        f"{path.name}: not a supported image (PNG, JPEG"
        f"{', DICOM' if any(n == 'dicom' for n, _, _ in _READERS) else ''})."
    )


def looks_like_dicom(path: Path, head: bytes) -> bool:
    """True for the DICOM preamble ('DICM' at byte 128 of ``head``) or a .dcm suffix."""
    return head[128:132] == b"DICM" or path.suffix.lower() in (".dcm", ".dicom")


def is_dicom_file(path: str | Path) -> bool:
    """``looks_like_dicom`` for a file on disk."""
    path = Path(path)
    with open(path, "rb") as handle:
        return looks_like_dicom(path, handle.read(132))


def check_size(rows: int, columns: int, name: str) -> None:
    """Refuse images too small for the model or too large for memory."""
    if rows < 8 or columns < 8:
        raise ImageReadError(f"{name}: {rows}x{columns} pixels is too small (at least 8x8).")
    if rows * columns > MAX_PIXELS:
        raise ImageReadError(f"{name}: {rows}x{columns} pixels exceeds the limit of {MAX_PIXELS} pixels.")


def _read_raster(path: Path, head: bytes) -> Radiograph:
    """PNG / JPEG: 8- or 16-bit grayscale, or RGB(A) converted to luminance."""
    content = path.read_bytes()  # decoded from memory: PIL's messages then carry no folder names
    try:
        with Image.open(io.BytesIO(content)) as image:
            check_size(image.height, image.width, path.name)
            image.load()
            fmt = image.format.lower()
            mode = image.mode
            transforms: list[str] = []
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(image, dtype=np.float32)
                bits = 16
                scale = 65535.0
            elif mode in ("L", "1", "P", "LA"):
                array = np.asarray(image.convert("L"), dtype=np.float32)
                bits, scale = 8, 255.0
            elif mode in ("RGB", "RGBA"):
                rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
                if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
                    array = rgb[..., 0]
                else:
                    array = np.asarray(image.convert("L"), dtype=np.float32)
                    transforms.append("RGB converted to luminance (ITU-R 601-2)")
                bits, scale = 8, 255.0
            else:
                raise ImageReadError(f"{path.name}: image mode {mode!r} is not a 2-D grayscale or RGB image.")
    except Image.DecompressionBombError:
        raise ImageReadError(
            f"{path.name}: the header declares more than {MAX_PIXELS} pixels "
            "(a decompression bomb or a damaged file); refused unread."
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ImageReadError(f"{path.name}: cannot decode the image ({error}).") from error
    if array.ndim != 2:
        raise ImageReadError(f"{path.name}: expected a 2-D image, got shape {array.shape}.")
    return Radiograph(
        np.clip(array / scale, 0.0, 1.0).astype(np.float32),
        path.name,
        hashlib.sha256(content).hexdigest(),
        "jpeg" if fmt in ("jpeg", "mpo") else fmt,
        bits,
        transforms,
    )


def _is_raster(path: Path, head: bytes) -> bool:
    return head.startswith(b"\x89PNG\r\n\x1a\n") or head.startswith(b"\xff\xd8\xff")


register_reader("raster", _is_raster, _read_raster)


def read_mask(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """Read a binary mask (any non-zero pixel is inside) that must match ``shape``.

    PNG/JPEG images, ``.npy`` arrays, or ``.nrrd`` volumes of one slice (a Slicer labelmap
    or segment exported from the Segment Editor; rows x columns in C order).

    Raises
    ------
    InputNotFoundError
        When the file is missing.
    ImageReadError
        When it cannot be decoded, is not 2-D, or its size differs from ``shape``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".npy", ".nrrd"):
        if not path.is_file():
            raise InputNotFoundError(f"mask not found: {path.name}")
        pixels = _read_array_mask(path, suffix)
    else:
        pixels = read_image(path).pixels
    if pixels.shape != tuple(shape):
        raise ImageReadError(
            f"mask {path.name} is {pixels.shape[0]}x{pixels.shape[1]} but the image is {shape[0]}x{shape[1]}."
        )
    return pixels > 0


def _read_array_mask(path: Path, suffix: str) -> np.ndarray:
    """A 2-D numeric array from ``.npy`` or a single-slice ``.nrrd``."""
    try:
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            import nrrd

            array, _ = nrrd.read(str(path), index_order="C")  # (slices, rows, columns)
    except Exception as error:  # noqa: BLE001 - both readers raise many types on bad files
        raise ImageReadError(f"mask {path.name}: cannot read it ({type(error).__name__}).") from None
    if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
        array = array.squeeze(0 if array.shape[0] == 1 else -1)
    if array.ndim != 2 or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ImageReadError(
            f"mask {path.name}: expected a 2-D numeric array (or one slice), got {array.dtype} {array.shape}."
        )
    return array
