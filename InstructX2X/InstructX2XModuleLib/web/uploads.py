"""Files a browser sends: limited in number, size and type, then read with the library's own
readers (a bad file gets the library's specific error) before anything enters the scene.

Nothing here knows trame: uploads arrive as ``(name, bytes)`` pairs.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from instructx2x.errors import InputError

__all__ = [
    "UploadError",
    "LoadedRadiograph",
    "UploadBuffers",
    "save_uploads",
    "read_radiograph",
    "MAX_UPLOAD_BYTES",
    "MAX_FILES",
    "ACCEPTED_SUFFIXES",
]

MAX_UPLOAD_BYTES = 64 * 1024 * 1024  # a CR is 5-20 MB; a folder of a few films fits
MAX_FILES = 64
ACCEPTED_SUFFIXES = ("", ".dcm", ".dicom", ".png", ".jpg", ".jpeg")  # DICOM files often have no suffix
_SAFE_NAME = re.compile(r"^[\w .()+-]{1,128}$")


class UploadError(InputError):
    """An upload is refused before it is read (too large, too many files, wrong type)."""


@dataclasses.dataclass(frozen=True)
class LoadedRadiograph:
    """A radiograph read from an upload, ready to become a volume.

    Attributes
    ----------
    path: pathlib.Path
        The file a job sends to the worker (a DICOM input keeps its study for the export).
    pixels: numpy.ndarray
        The volume's values: DICOM modality values, or a raster's stored integers.
    spacing: tuple[float, float] | None
        Row and column spacing in mm, as the library reads it (None for a raster).
    sop_instance_uid: str | None
        The DICOM instance (the volume's ``DICOM.instanceUIDs``).
    inverted: bool
        MONOCHROME1: shown with an inverted grey scale, as Slicer shows it.
    description: str
        What the page says about it (format, size, spacing; never a patient identifier).
    """

    path: Path
    pixels: np.ndarray
    spacing: tuple[float, float] | None
    sop_instance_uid: str | None
    inverted: bool
    description: str


class UploadBuffers:
    """The chunks of unfinished uploads, one buffer per connection, counted as they arrive.

    An upload that passes ``max_bytes`` or ``MAX_FILES`` is dropped at that chunk (its memory
    freed at once); the rest of its chunks are ignored and its end raises the reason, so one
    connection can neither hold more than the limit nor add to another's upload.

    Parameters
    ----------
    max_bytes: int
        The most one upload may hold.
    """

    def __init__(self, max_bytes: int = MAX_UPLOAD_BYTES) -> None:
        self.max_bytes = max_bytes
        self.buffers: dict[object, list[tuple[str, bytes]]] = {}
        self.refused: dict[object, str] = {}

    def add(self, connection: object, files: list[tuple[str, bytes]]) -> None:
        """One chunk of ``connection``'s upload."""
        if connection in self.refused:
            return
        buffer = self.buffers.setdefault(connection, [])
        buffer += files
        total = sum(len(content) for _name, content in buffer)
        if total > self.max_bytes:
            reason = f"the upload is over {self.max_bytes / 2**20:.0f} MB, the limit; nothing was kept."
        elif len(buffer) > MAX_FILES:
            reason = f"the upload has over {MAX_FILES} files; open at most {MAX_FILES} at a time."
        else:
            return
        del self.buffers[connection]
        self.refused[connection] = reason

    def finish(self, connection: object) -> list[tuple[str, bytes]]:
        """The end of ``connection``'s upload: its files.

        Raises
        ------
        UploadError
            When the upload was refused on the way (the reason), or nothing came.
        """
        reason = self.refused.pop(connection, None)
        files = self.buffers.pop(connection, [])
        if reason is not None:
            raise UploadError(reason)
        return files

    def discard(self, connection: object) -> None:
        """Forget ``connection``'s unfinished upload (it closed)."""
        self.buffers.pop(connection, None)
        self.refused.pop(connection, None)

    @property
    def held_bytes(self) -> int:
        return sum(len(content) for buffer in self.buffers.values() for _name, content in buffer)


def save_uploads(
    files: list[tuple[str, bytes]], folder: Path, max_bytes: int = MAX_UPLOAD_BYTES
) -> list[Path]:
    """Check every upload, then write them into ``folder`` (created; nothing written on refusal)."""
    if not files:
        raise UploadError("no file was received.")
    if len(files) > MAX_FILES:
        raise UploadError(f"{len(files)} files: open at most {MAX_FILES} at a time.")
    total = sum(len(content) for _name, content in files)
    if total > max_bytes:
        raise UploadError(f"the upload is {total / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB.")
    names = []
    for name, _content in files:
        base = Path(name.replace("\\", "/")).name
        if not _SAFE_NAME.match(base) or base.startswith("."):
            raise UploadError("a file name has characters that are not accepted; rename the file.")
        if Path(base).suffix.lower() not in ACCEPTED_SUFFIXES:
            raise UploadError(f"{Path(base).suffix} files are not radiographs; open DICOM, PNG or JPEG.")
        names.append(base)
    if len(set(names)) != len(names):
        raise UploadError("two files have the same name; open them from one folder.")
    folder.mkdir(parents=True, exist_ok=False)
    paths = []
    for base, (_name, content) in zip(names, files):
        (folder / base).write_bytes(content)
        paths.append(folder / base)
    return paths


def read_radiograph(paths: list[Path]) -> LoadedRadiograph:
    """The first radiograph among ``paths`` (one file, or the DICOM files of a folder).

    Raises
    ------
    InputError
        The library's specific error for the file (not DICOM or raster, not a chest film,
        unsupported encoding, ...); for a folder, the first file's error when none reads.
    """
    from instructx2x.dicom.read import read_dicom
    from instructx2x.dicom.write import check_exportable
    from instructx2x.image_io import is_dicom_file, read_image

    dicom = [path for path in sorted(paths) if is_dicom_file(path)]
    if len(paths) > 1 and not dicom:
        raise UploadError("a folder must hold DICOM files; open a PNG or JPEG on its own.")
    first_error = None
    for path in dicom:
        try:
            _refuse_deflated(path)
            image = read_dicom(path)
            check_exportable(image.dicom_source().dataset, image.source)
        except InputError as error:
            first_error = first_error or error
            continue
        return _from_dicom(path, image)
    if first_error is not None:
        raise first_error
    image = read_image(paths[0])
    scale = 65535 if image.bits > 8 else 255
    rows, columns = image.pixels.shape
    return LoadedRadiograph(
        paths[0],
        np.round(image.pixels * scale).astype(np.float32),
        None,
        None,
        False,
        f"{image.format.upper()} {columns} x {rows}, {image.bits}-bit",
    )


DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian


def _refuse_deflated(path: Path) -> None:
    """A deflated data set inflates without bound when read (a 2 MB file to gigabytes): refused
    from its file meta, before any of it is inflated."""
    from pydicom.filereader import read_file_meta_info

    try:
        syntax = str(read_file_meta_info(path).get("TransferSyntaxUID", ""))
    except Exception:  # noqa: BLE001 - the library's reader says what is wrong with the file
        return
    if syntax == DEFLATED:
        raise UploadError(
            "deflated DICOM files are not accepted here; send the film uncompressed or JPEG-compressed."
        )


def _from_dicom(path: Path, image) -> LoadedRadiograph:
    from ..session import modality_values

    source = image.dicom_source()
    dataset, spacing = source.dataset, source.pixel_spacing
    rows, columns = image.pixels.shape
    described = f"{dataset.get('Modality', 'DICOM')} {columns} x {rows}"
    if spacing is not None:
        described += f", {spacing.row_mm:.3g} mm ({spacing.attribute})"
    return LoadedRadiograph(
        path,
        modality_values(source.stored, dataset),
        None if spacing is None else (spacing.row_mm, spacing.column_mm),
        str(dataset.SOPInstanceUID),
        str(dataset.get("PhotometricInterpretation", "")) == "MONOCHROME1",
        described,
    )
