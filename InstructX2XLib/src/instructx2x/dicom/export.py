"""Export one DICOM edit: composite at native resolution, build, validate, write atomically."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ParameterError
from ..image_io import Radiograph
from ..outputs import atomic_output_dir
from ..overlay import guidance_overlay
from ..provenance import to_json
from .native import composite_stored, proposed_stored
from .write import EditObjects, build_edit_objects

if TYPE_CHECKING:  # a type only: reading DICOM (``dicom.read``) must not import torch
    from ..editor import EditResult

__all__ = ["export_dicom_edit", "write_dicom_edit"]


def export_dicom_edit(
    image: Radiograph, result: EditResult, output: Path, *, feather_px: int = 0
) -> dict[str, Path]:
    """Write the edit of a DICOM radiograph as a new series in the same study, atomically.

    Parameters
    ----------
    image: Radiograph
        Read by ``read_dicom`` (its ``dicom`` holds the dataset, stored values and mapping).
    result: EditResult
        ``InstructX2XEditor.edit`` of that image.
    output: pathlib.Path
        Folder to create (must not exist): ``counterfactual.dcm``, ``guidance_overlay.dcm``,
        ``edit_region_seg.dcm`` and ``provenance.json`` appear there together or not at all.
    feather_px: int
        Blend band inside the mask, in original pixels.

    Returns
    -------
    dict[str, pathlib.Path]
        File name -> final path.

    Raises
    ------
    ValueError
        When the image is not DICOM, the result is a preview, or shapes disagree.
    FileExistsError
        When ``output`` exists.
    """
    with atomic_output_dir(output) as staging:
        names = write_dicom_edit(staging, image, result, feather_px=feather_px)
    return {name: Path(output) / name for name in names}


def write_dicom_edit(
    directory: Path, image: Radiograph, result: EditResult, *, feather_px: int = 0
) -> list[str]:
    """Build and write the edit's objects and ``provenance.json`` into an existing folder.

    Everything is built and validated before the first file is written. Returns the file
    names. Raises as ``export_dicom_edit``.
    """
    dicom = image.dicom
    if image.format != "dicom" or dicom is None:
        raise ParameterError(f"{image.source} was not read from DICOM; use the PNG writer.")
    if result.edited is None:
        raise ParameterError("a guidance preview has no counterfactual image to export.")
    source, original, mapping = dicom.dataset, dicom.stored, dicom.mapping
    proposed = proposed_stored(original, mapping, result.edited, result.model_output, result.reconstruction)
    stored, clipped = composite_stored(original, proposed, result.edit_mask, mapping.stored_range, feather_px)
    spacing = dicom.pixel_spacing
    provenance = dict(result.manifest)
    provenance["input"] = dict(
        provenance["input"],
        sop_instance_uid=dicom.sop_instance_uid,
        warnings=list(dicom.warnings),
    )
    provenance["native"] = {
        "rows": int(source.Rows),
        "columns": int(source.Columns),
        "bits_stored": int(source.BitsStored),
        "photometric_interpretation": str(source.PhotometricInterpretation),
        "feather_px": feather_px,
        "composite": "change" if result.reconstruction is not None else "replace",
        "clipped_fraction": round(clipped, 6),
        "pixel_spacing": None if spacing is None else spacing.to_dict(),
        "outside_mask": "stored values copied from the original",
    }
    overlay = guidance_overlay(image.pixels, result.guidance_map, result.edit_mask)
    objects: EditObjects = build_edit_objects(
        source,
        stored,
        overlay,
        result.edit_mask,
        provenance,
        None if spacing is None else (spacing.row_mm, spacing.column_mm),
    )
    named = objects.named()
    provenance["objects"] = {
        name: {"sop_instance_uid": str(ds.SOPInstanceUID), "series_instance_uid": str(ds.SeriesInstanceUID)}
        for name, ds in named.items()
    }
    directory = Path(directory)
    for name, dataset in named.items():
        dataset.save_as(directory / name, enforce_file_format=True)
    (directory / "provenance.json").write_text(to_json(provenance) + "\n")
    return [*named, "provenance.json"]
