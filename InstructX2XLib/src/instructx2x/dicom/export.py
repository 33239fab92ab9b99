"""Export a DICOM edit or a progression series: composite at native resolution, build, validate,
write atomically."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ParameterError
from ..image_io import Radiograph
from ..outputs import atomic_output_dir
from ..overlay import guidance_overlay
from ..provenance import to_json
from .native import composite_stored, proposed_stored
from .write import EditObjects, SeriesObjects, build_edit_objects, build_series_objects

if TYPE_CHECKING:  # a type only: reading DICOM (``dicom.read``) must not import torch
    from ..editor import EditResult, SeriesResult
    from .read import DicomSource

__all__ = ["export_dicom_edit", "write_dicom_edit", "write_dicom_series"]


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
    dicom = _dicom(image)
    if result.edited is None:
        raise ParameterError("a guidance preview has no counterfactual image to export.")
    stored, provenance = _stored_with_provenance(dicom, result, feather_px)
    spacing = dicom.pixel_spacing
    overlay = guidance_overlay(image.pixels, result.guidance_map, result.edit_mask)
    objects: EditObjects = build_edit_objects(
        dicom.dataset,
        stored,
        overlay,
        result.edit_mask,
        provenance,
        None if spacing is None else (spacing.row_mm, spacing.column_mm),
    )
    return _save(directory, objects.named(), provenance)


def write_dicom_series(
    directory: Path, image: Radiograph, result: SeriesResult, *, feather_px: int = 0
) -> list[str]:
    """Write a progression series' objects and ``provenance.json`` into an existing folder.

    ``step-01.dcm``, ``step-02.dcm``, ...: each step's counterfactual, one series with instance
    numbers in step order, each with its own instruction and provenance; ``guidance_overlay.dcm``
    and ``edit_region_seg.dcm``: the edit region the steps share. Everything is built and
    validated before the first file is written. Returns the file names.

    Raises
    ------
    ParameterError
        When the image was not read from DICOM.
    """
    dicom = _dicom(image)
    composed = [_stored_with_provenance(dicom, step, feather_px) for step in result.steps]
    region = composed[result.series.region_step][1]
    region_provenance = {**region, "series": {**result.series.to_dict(), "steps": len(result.steps)}}
    spacing = dicom.pixel_spacing
    objects: SeriesObjects = build_series_objects(
        dicom.dataset,
        [stored for stored, _ in composed],
        guidance_overlay(image.pixels, result.guidance_map, result.edit_mask),
        result.edit_mask,
        [provenance for _, provenance in composed],
        region_provenance,
        None if spacing is None else (spacing.row_mm, spacing.column_mm),
    )
    record = {
        "kind": "edit_series",
        "series": region_provenance["series"],
        "steps": [provenance for _, provenance in composed],
    }
    return _save(directory, objects.named(), record)


def _dicom(image: Radiograph) -> DicomSource:
    if image.format != "dicom" or image.dicom is None:
        raise ParameterError(f"{image.source} was not read from DICOM; use the PNG writer.")
    return image.dicom


def _stored_with_provenance(dicom: DicomSource, result: EditResult, feather_px: int):
    """The counterfactual's stored values (the model's change composited into the source's
    stored values) and the provenance its objects carry."""
    source, original, mapping = dicom.dataset, dicom.stored, dicom.mapping
    spacing = dicom.pixel_spacing
    proposed = proposed_stored(
        original, mapping, result.edited_image(), result.model_output, result.reconstruction
    )
    stored, clipped = composite_stored(original, proposed, result.edit_mask, mapping.stored_range, feather_px)
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
    return stored, provenance


def _save(directory: Path, named: dict, provenance: dict) -> list[str]:
    """Write the datasets and ``provenance.json`` (with every object's UIDs)."""
    provenance["objects"] = {
        name: {"sop_instance_uid": str(ds.SOPInstanceUID), "series_instance_uid": str(ds.SeriesInstanceUID)}
        for name, ds in named.items()
    }
    directory = Path(directory)
    for name, dataset in named.items():
        dataset.save_as(directory / name, enforce_file_format=True)
    (directory / "provenance.json").write_text(to_json(provenance) + "\n")
    return [*named, "provenance.json"]
