"""MRML in and out for the InstructX2X panels: imports slicer (MRML), never qt or slicer.app.

The scene is always an explicit argument, so the same code serves the desktop module, the
browser panel (trame-slicer) and the tests (PyPI's slicer-core). A radiograph is a
single-slice scalar volume; numpy arrays here are ``(rows, columns)``, the volume's
``(k=0, j, i)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

__all__ = [
    "SceneError",
    "prepare_scene",
    "volume_to_array",
    "array_to_volume",
    "segment_to_mask",
    "import_result",
    "import_series",
    "import_saved_edit",
    "build_job",
    "png_domain",
    "PA_DIRECTIONS",
    "EDITOR_SINGLETON_TAG",
    "segment_editor_node",
    "SEGMENT_EVENTS",
    "segment_choices",
    "SliceLayers",
    "result_layers",
]

# A PA film read from PNG has no geometry: show it as Slicer shows a DICOM CR (IJK-to-RAS
# directions diag(-1, -1, 1), patient's left on the image's right).
PA_DIRECTIONS = ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, 1.0))
GUIDANCE_OPAQUE_AT = 0.3  # guidance (in [0, 1]) from which the overlay colour is fully opaque
# The panel's own Segment Editor parameter node: a singleton, so that closing the scene keeps
# it (Slicer's Segment Editor module keeps its node, tagged "SegmentEditor", the same way).
EDITOR_SINGLETON_TAG = "InstructX2X"
# Segmentation node events after which the list of segments differs (added, removed, renamed)
SEGMENT_EVENTS = (
    slicer.vtkSegmentation.SegmentAdded,
    slicer.vtkSegmentation.SegmentRemoved,
    slicer.vtkSegmentation.SegmentModified,
)


class SceneError(ValueError):
    """The scene does not hold what an edit needs (the message says what to do)."""


_CONVERTERS_REGISTERED = False


def prepare_scene(scene) -> None:
    """Register the segmentation converters (once per process) and the segmentation logic
    on ``scene``; outside the Slicer application (PyPI's slicer-core) segments cannot
    otherwise be added or turned into labelmaps. The Slicer application has done both already.
    """
    global _CONVERTERS_REGISTERED
    if not _CONVERTERS_REGISTERED:
        factory = slicer.vtkSegmentationConverterFactory.GetInstance()
        for rule in (
            slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
            slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
            slicer.vtkClosedSurfaceToFractionalLabelmapConversionRule,
            slicer.vtkFractionalLabelmapToClosedSurfaceConversionRule,
        ):
            factory.RegisterConverterRule(rule())
        _CONVERTERS_REGISTERED = True
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    _LOGICS[id(scene)] = logic  # alive as long as the process: the scene holds no reference


_LOGICS: dict = {}


def segment_editor_node(scene):
    """The panel's Segment Editor parameter node in ``scene``: the one tagged
    ``EDITOR_SINGLETON_TAG``, added when there is none. A scene ``Clear`` keeps it (reset to
    its defaults), so the panel's editor never loses its node when the scene is closed."""
    node = scene.GetSingletonNode(EDITOR_SINGLETON_TAG, "vtkMRMLSegmentEditorNode")
    if node is None:
        node = slicer.vtkMRMLSegmentEditorNode()
        node.SetSingletonTag(EDITOR_SINGLETON_TAG)
        node = scene.AddNode(node)
    return node


def segment_choices(segmentation) -> list[tuple[str, str]]:
    """``(name, segment ID)`` of every segment of a segmentation node, in its order (none
    for no node): what the panel offers as the region never to edit."""
    if segmentation is None:
        return []
    segments = segmentation.GetSegmentation()
    return [
        (segments.GetSegment(segment_id).GetName(), segment_id)
        for segment_id in (segments.GetNthSegmentID(index) for index in range(segments.GetNumberOfSegments()))
    ]


def volume_to_array(volume) -> np.ndarray:
    """The pixels of a single-slice volume as ``(rows, columns)`` float32.

    Raises
    ------
    SceneError
        When there is no volume, no image data, or the volume has several slices.
    """
    if volume is None or not volume.IsA("vtkMRMLScalarVolumeNode"):
        raise SceneError("choose a radiograph: no scalar volume is selected.")
    image = volume.GetImageData()
    if image is None:
        raise SceneError(f"volume {volume.GetName()!r} has no image data.")
    columns, rows, slices = image.GetDimensions()
    if slices != 1:
        raise SceneError(
            f"volume {volume.GetName()!r} has {slices} slices; InstructX2X edits a "
            "single radiograph (one slice)."
        )
    if image.GetNumberOfScalarComponents() != 1:
        raise SceneError(f"volume {volume.GetName()!r} is not grayscale.")
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return values.reshape(rows, columns).astype(np.float32)


def array_to_volume(scene, pixels: np.ndarray, name: str, reference=None, labelmap: bool = False):
    """A new single-slice volume with ``pixels`` and the reference's geometry (else PA).

    The input node is never modified; ``labelmap`` makes a vtkMRMLLabelMapVolumeNode.
    """
    pixels = np.ascontiguousarray(pixels)
    if pixels.ndim != 2:
        raise SceneError(f"expected a 2-D array, got shape {pixels.shape}.")
    rows, columns = pixels.shape
    if reference is not None:
        reference_shape = volume_to_array(reference).shape
        if reference_shape != (rows, columns):
            raise SceneError(
                f"{name}: {rows}x{columns} does not match the radiograph's grid "
                f"{reference_shape[0]}x{reference_shape[1]}."
            )
    image = vtk.vtkImageData()
    image.SetDimensions(columns, rows, 1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(pixels.ravel(), deep=True))
    node = scene.AddNewNodeByClass(
        "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode", name
    )
    node.SetAndObserveImageData(image)
    if reference is not None:
        node.CopyOrientation(reference)
    else:
        node.SetIJKToRASDirections(*[v for row in PA_DIRECTIONS for v in row])
    node.CreateDefaultDisplayNodes()
    return node


def segment_to_mask(segmentation, segment_id: str, volume) -> np.ndarray:
    """A painted segment as a boolean ``(rows, columns)`` mask on the volume's grid.

    Raises
    ------
    SceneError
        When the segment does not exist, is empty, or lies off the radiograph.
    """
    if segmentation is None or segmentation.GetSegmentation().GetSegment(segment_id) is None:
        raise SceneError(f"segment {segment_id!r} does not exist; paint a region first.")
    scene = segmentation.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__instructx2x_export")
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation, ids, labelmap, volume
        ):
            raise SceneError(f"segment {segment_id!r} cannot be put on the radiograph's grid.")
        mask = volume_to_array(labelmap) > 0
    finally:
        scene.RemoveNode(labelmap)
    if not mask.any():
        name = segmentation.GetSegmentation().GetSegment(segment_id).GetName()
        raise SceneError(f"segment {name!r} is empty on the radiograph: paint inside the image.")
    return mask


def import_result(
    scene, volume, edited: np.ndarray, guidance: np.ndarray, edit_mask: np.ndarray, name: str
) -> dict:
    """Add an edit's outputs next to the input (which is never overwritten).

    Returns
    -------
    dict
        ``counterfactual`` (scalar volume, the input's geometry and window),
        ``guidance`` (scalar volume in [0, 1] with a heat colour table, for the foreground
        layer), ``mask`` (labelmap with a one-label colour table, shown as an outline).
    """
    return {
        **_edited_volumes(scene, volume, edited, name),
        "guidance": _guidance_volume(scene, guidance, name, volume),
        "mask": _edit_region_volume(scene, edit_mask, name, volume),
    }


def import_series(
    scene,
    volume,
    steps: list[np.ndarray],
    labels: list[str],
    guidance: np.ndarray,
    edit_mask: np.ndarray,
    name: str,
) -> tuple[dict, list[dict]]:
    """Add a progression series' outputs next to the input (which is never overwritten).

    Parameters
    ----------
    steps: list[np.ndarray]
        Each step's edited pixels, in step order, on the input's grid.
    labels: list[str]
        Each step's label (its level), named in its volumes.
    guidance, edit_mask: np.ndarray
        The guidance map and the edit region the steps share.

    Returns
    -------
    tuple[dict, list[dict]]
        The shared ``guidance`` and ``mask`` volumes (as ``import_result``'s), and per step its
        ``counterfactual`` and ``difference`` volumes.
    """
    shared = {
        "guidance": _guidance_volume(scene, guidance, name, volume),
        "mask": _edit_region_volume(scene, edit_mask, name, volume),
    }
    nodes = [
        _edited_volumes(scene, volume, edited, f"{name} step {number} {label}")
        for number, (edited, label) in enumerate(zip(steps, labels), start=1)
    ]
    return shared, nodes


def _edited_volumes(scene, volume, edited: np.ndarray, name: str) -> dict:
    """The counterfactual (the input's geometry and window) and its difference from the input
    (edited - input, 0 at mid-grey)."""
    counterfactual = array_to_volume(scene, edited.astype(np.float32), f"{name} (SYNTHETIC)", volume)
    source_display = volume.GetDisplayNode()
    if source_display is not None:
        counterfactual.GetDisplayNode().SetAutoWindowLevel(False)
        counterfactual.GetDisplayNode().SetWindowLevel(source_display.GetWindow(), source_display.GetLevel())
    difference = edited.astype(np.float32) - volume_to_array(volume)
    difference_node = array_to_volume(scene, difference, f"{name} difference", volume)
    spread = float(np.abs(difference).max()) or 1.0
    difference_node.GetDisplayNode().SetAutoWindowLevel(False)
    difference_node.GetDisplayNode().SetWindowLevelMinMax(-spread, spread)  # 0 = mid-gray
    return {"counterfactual": counterfactual, "difference": difference_node}


def _guidance_volume(scene, guidance: np.ndarray, name: str, reference):
    """The guidance map in [0, 1] as a volume shown through ``guidance_colors``."""
    node = array_to_volume(scene, guidance.astype(np.float32), f"{name} guidance", reference)
    colors = guidance_colors(scene, f"{name} guidance colors")
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(colors.GetID())
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(0.0, 1.0)
    return node


def _edit_region_volume(scene, edit_mask: np.ndarray, name: str, reference):
    """The edit region as a labelmap with a one-label (cyan) colour table."""
    node = array_to_volume(scene, edit_mask.astype(np.uint8), f"{name} edit region", reference, labelmap=True)
    labels = scene.AddNewNodeByClass("vtkMRMLColorTableNode", f"{name} edit region colors")
    labels.SetTypeToUser()
    labels.SetNumberOfColors(2)
    labels.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    labels.SetColor(1, "edit region", 0.0, 1.0, 1.0, 1.0)
    node.GetDisplayNode().SetAndObserveColorNodeID(labels.GetID())
    return node


def import_saved_edit(scene, folder: Path, name: str | None = None) -> dict:
    """Bring a saved edit's result folder (``saved_edit.read_saved_edit``) back as nodes.

    Parameters
    ----------
    scene: vtkMRMLScene
        Where the nodes go.
    folder: Path
        The folder an edit wrote: the worker's output, ``instructx2x edit --output``, or its
        DICOM files (counterfactual, guidance overlay, SEG).
    name: str | None
        The nodes' name stem (default: the folder's name).

    Returns
    -------
    dict
        The parts found: ``counterfactual`` (scalar volume, named SYNTHETIC, its DICOM window),
        ``guidance`` (the map in [0, 1] with the panels' heat colours; a vector volume of the
        RGB overlay picture when only that was saved) and ``mask`` (labelmap). All on one grid:
        PA directions, the files' pixel spacing.

    Raises
    ------
    SceneError
        When the folder holds no readable saved edit (``SavedEditError``'s message); nothing
        is added to the scene.
    """
    from .saved_edit import SavedEditError, read_saved_edit

    folder = Path(folder)
    try:
        edit = read_saved_edit(folder)
    except SavedEditError as error:
        raise SceneError(str(error)) from None
    name = name or folder.name
    nodes: dict = {}
    before = {scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes())}
    try:
        reference = None
        if edit.counterfactual is not None:
            reference = nodes["counterfactual"] = array_to_volume(
                scene, edit.counterfactual, f"{name} (SYNTHETIC)"
            )
            _set_spacing(reference, edit.spacing_mm)
            if edit.window is not None:
                display = reference.GetDisplayNode()
                display.SetAutoWindowLevel(False)
                display.SetWindowLevel(edit.window[1], edit.window[0])
        if edit.guidance is not None and edit.guidance.ndim == 3:
            nodes["guidance"] = _rgb_volume(scene, edit.guidance, f"{name} guidance overlay (RGB)", reference)
        elif edit.guidance is not None:
            nodes["guidance"] = _guidance_volume(scene, edit.guidance, name, reference)
        if reference is None and "guidance" in nodes:
            reference = nodes["guidance"]
            _set_spacing(reference, edit.spacing_mm)
        if edit.mask is not None:
            nodes["mask"] = _edit_region_volume(scene, edit.mask, name, reference)
            if reference is None:
                _set_spacing(nodes["mask"], edit.spacing_mm)
    except Exception:  # nothing half-imported stays behind
        for index in reversed(range(scene.GetNumberOfNodes())):
            node = scene.GetNthNode(index)
            if node is not None and node.GetID() not in before:
                scene.RemoveNode(node)
        raise
    return nodes


def _set_spacing(node, spacing_mm: tuple[float, float] | None) -> None:
    if spacing_mm is not None:
        node.SetSpacing(spacing_mm[1], spacing_mm[0], 1.0)  # (i: column, j: row, k)


def _rgb_volume(scene, pixels: np.ndarray, name: str, reference):
    """An 8-bit RGB ``(rows, columns, 3)`` picture as a vector volume (Slicer shows it as is)."""
    rows, columns, _ = pixels.shape
    image = vtk.vtkImageData()
    image.SetDimensions(columns, rows, 1)
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(pixels).reshape(-1, 3), deep=True)
    image.GetPointData().SetScalars(scalars)
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", name)
    node.SetAndObserveImageData(image)
    if reference is not None:
        node.CopyOrientation(reference)
    else:
        node.SetIJKToRASDirections(*[v for row in PA_DIRECTIONS for v in row])
    node.CreateDefaultDisplayNodes()
    return node


@dataclasses.dataclass(frozen=True)
class SliceLayers:
    """What the slice views show of a result: background, foreground (the guidance map, at
    ``foreground_opacity``) and label (the edit region) volume nodes."""

    background: object
    foreground: object
    label: object
    foreground_opacity: float


def result_layers(
    results: dict, volume, after: bool = True, difference: bool = False, opacity: float = 0.5
) -> SliceLayers | None:
    """The slice layers for ``results`` (``import_result``'s nodes; a preview has no
    counterfactual) over the radiograph ``volume``.

    Parameters
    ----------
    results: dict
        The result's nodes by kind; empty when there is no result (then None is returned).
    volume: vtkMRMLScalarVolumeNode
        The radiograph the result was made from (the "before" view).
    after: bool
        The counterfactual as background (else the radiograph).
    difference: bool
        The difference (edited - input) as background, where the result has one.
    opacity: float
        The guidance overlay's opacity, in [0, 1] (the panel's setting).

    Raises
    ------
    ValueError
        When ``opacity`` is outside [0, 1].
    """
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be within [0, 1], got {opacity}.")
    if not results:
        return None
    if difference and "difference" in results:
        background = results["difference"]
    elif after and "counterfactual" in results:
        background = results["counterfactual"]
    else:
        background = volume
    return SliceLayers(
        background=background,
        foreground=results.get("guidance"),
        label=results.get("mask"),
        foreground_opacity=float(opacity),
    )


def png_domain(pixels: np.ndarray) -> tuple[float, float]:
    """``(low, step)``: a volume without a DICOM file goes to the worker as a 16-bit PNG holding
    ``round((pixels - low) / step)``. Integer films within 0..65535 (every PNG a panel loads)
    are written as they are, so the edit comes back in the volume's own values, exactly.
    """
    low, high = float(pixels.min()), float(pixels.max())
    if low >= 0 and high <= 65535 and np.array_equal(pixels, np.round(pixels)):
        return 0.0, 1.0
    return low, ((high - low) or 1.0) / 65535


def guidance_colors(scene, name: str):
    """A heat scale (red to yellow) whose low end is transparent: blended over the film as the
    foreground layer, it tints only where the model edits, and the film stays readable
    elsewhere (an opaque scale would tint the whole image at any opacity)."""
    colors = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    colors.SetTypeToUser()
    colors.SetNumberOfColors(256)
    for index in range(256):
        value = index / 255
        red, green = float(np.clip(2 * value, 0, 1)), float(np.clip(2 * value - 1, 0, 1))
        colors.SetColor(index, str(index), red, green, 0.0, float(min(1.0, value / GUIDANCE_OPAQUE_AT)))
    return colors


def build_job(
    volume,
    kind: str,
    parameters: dict,
    folder: Path,
    edit_mask: np.ndarray | None = None,
    keep_mask: np.ndarray | None = None,
    dicom_file_for: Callable[[str], str | None] | None = None,
    verify: str | None = None,
    include_demographics: bool = False,
) -> dict:
    """The worker's job (``instructx2x.jobs.EditJob.to_dict`` form) for a radiograph volume.

    The input is the DICOM file the volume was loaded from (found through
    ``dicom_file_for(SOPInstanceUID)``, e.g. Slicer's DICOM database), so the result is
    exported into the same study; otherwise its pixels are written as a 16-bit PNG. Masks are
    written as ``.npy`` on the volume's grid. ``verify`` names the classifier set that checks
    an edit (``auto``: the one the model names), or None.

    Raises
    ------
    SceneError
        When the volume is not a single-slice radiograph or a mask does not match its grid.
    """
    from PIL import Image

    pixels = volume_to_array(volume)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source: str | Path | None = None
    uids = volume.GetAttribute("DICOM.instanceUIDs")
    if uids and dicom_file_for is not None:
        source = dicom_file_for(uids.split()[0])
    if not source or not Path(source).is_file():
        low, step = png_domain(pixels)
        source = folder / "input.png"
        Image.fromarray(((pixels - low) / step).round().astype(np.uint16)).save(source)
    job: dict[str, Any] = {"input": str(source), "output": str(folder / kind), "parameters": dict(parameters)}
    if verify is not None:
        job["verify"] = verify
        job["include_demographics"] = include_demographics
    for key, mask in (("mask", edit_mask), ("keep_mask", keep_mask)):
        if mask is None:
            continue
        if mask.shape != pixels.shape:
            raise SceneError(
                f"the {key.replace('_', ' ')} is {mask.shape[0]}x{mask.shape[1]} but the "
                f"radiograph is {pixels.shape[0]}x{pixels.shape[1]}."
            )
        np.save(folder / f"{key}.npy", mask.astype(bool))
        job[key] = str(folder / f"{key}.npy")
    return job
