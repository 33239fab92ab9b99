"""The slice view: the radiograph shown, its Edit and Keep segments with the tools that paint
them, and the results layered over it (counterfactual or input, guidance map, edit region)."""

from __future__ import annotations

from typing import Any

import numpy as np
import slicer
from trame_slicer.segmentation import (
    BrushDiameterMode,
    ScissorsEffectFillMode,
    SegmentationEffectErase,
    SegmentationEffectNoTool,
    SegmentationEffectPaint,
    SegmentationEffectScissors,
)

from .. import scene as mrml
from ..session import EditSession
from .uploads import LoadedRadiograph

__all__ = ["RadiographDisplay", "TOOLS", "SEGMENTS"]

TOOLS = {
    "none": SegmentationEffectNoTool,
    "paint": SegmentationEffectPaint,
    "erase": SegmentationEffectErase,
    "scissors": SegmentationEffectScissors,
}
SEGMENTS = {"edit": ("Edit region", [0.1, 0.85, 0.3]), "keep": ("Keep region", [0.2, 0.5, 1.0])}


class RadiographDisplay:
    """What the slice view shows, and the segments painted on it.

    Parameters
    ----------
    state
        The page's trame state (the tool, the overlay's opacity, before/after).
    slicer_app: trame_slicer.core.SlicerApp
        The scene, its views and its segmentation editor.
    session: EditSession
        Whose results are layered over the radiograph.

    Attributes
    ----------
    loaded: uploads.LoadedRadiograph | None
        The radiograph shown, as read from its upload.
    volume, segmentation, outline
        Its volume node, the painted segments' node, and the outline of the model's edit region.
    """

    def __init__(self, state: Any, slicer_app: Any, session: EditSession) -> None:
        self.state, self.slicer_app, self.session = state, slicer_app, session
        self.scene = slicer_app.scene
        self.editor = slicer_app.segmentation_editor
        self.loaded: LoadedRadiograph | None = None
        self.volume: Any = None
        self.segmentation: Any = None
        self.outline: Any = None

    def show(self, loaded: LoadedRadiograph) -> None:
        """Replace what is shown (radiograph, segments, results) by ``loaded``, with empty Edit
        and Keep segments and the chosen tool."""
        self.session.clear_results()
        for node in [self.volume, self.segmentation, self.outline]:
            if node is not None and self.scene.IsNodePresent(node):
                self.scene.RemoveNode(node)
        self.session.preview_id, self.outline = None, None
        self.loaded = loaded
        volume = self.volume = mrml.array_to_volume(self.scene, loaded.pixels, "Radiograph")
        if loaded.spacing:
            volume.SetSpacing(loaded.spacing[1], loaded.spacing[0], 1.0)
        if loaded.sop_instance_uid:
            volume.SetAttribute("DICOM.instanceUIDs", loaded.sop_instance_uid)
        display = volume.GetDisplayNode()
        if loaded.inverted:
            display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeInvertedGrey")
        low, high = np.percentile(loaded.pixels, [0.5, 99.5])
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(float(low), float(high))
        self.segmentation = self.editor.create_empty_segmentation_node()
        self.segmentation.SetName("InstructX2X masks")
        self.editor.set_active_segmentation(self.segmentation, volume)
        for segment_id, (name, color) in SEGMENTS.items():
            self.editor.add_empty_segment(segment_id=segment_id, segment_name=name, segment_color=color)
        self.editor.set_active_segment_id("edit")
        self.on_tool(**self.state.to_dict())  # the chosen tool goes on with the new film
        self.on_layers()
        self.slicer_app.display_manager.reset_views()

    def dicom_file_for(self, sop_instance_uid: str) -> str | None:
        """The uploaded DICOM file of the instance shown, for a job's input (its study is kept
        in the export); None for any other instance."""
        if self.loaded is not None and self.loaded.sop_instance_uid == sop_instance_uid:
            return str(self.loaded.path)
        return None

    # -- painting --------------------------------------------------------------------------
    def on_tool(
        self,
        tool: str = "none",
        segment: str = "edit",
        brush_mm: float = 20.0,
        scissors_fill: bool = False,
        **_: Any,
    ) -> None:
        """Paint and Erase with a brush sized in mm (trame-slicer's default is screen-relative);
        Scissors erases inside the drawn outline, or fills it."""
        if self.segmentation is None:
            return
        self.editor.set_active_segment_id(segment)
        # filled while painting; outlined otherwise, so that the edit and its guidance show through
        self.segmentation.GetDisplayNode().SetVisibility2DFill(tool != "none")
        effect = self.editor.set_active_effect_type(TOOLS.get(tool, SegmentationEffectNoTool))
        if tool in ("paint", "erase"):
            effect.set_brush_diameter(float(brush_mm), BrushDiameterMode.Absolute)
        elif tool == "scissors":
            effect.set_fill_mode(
                ScissorsEffectFillMode.FILL_INSIDE if scissors_fill else ScissorsEffectFillMode.ERASE_INSIDE
            )

    def painted(self, segment: str) -> np.ndarray | None:
        """A painted segment as a mask on the radiograph's grid; None when nothing is painted."""
        try:
            return mrml.segment_to_mask(self.segmentation, segment, self.volume)
        except mrml.SceneError:
            return None

    # -- results ---------------------------------------------------------------------------
    def on_layers(self, **_: Any) -> None:
        """Background: the counterfactual (after) or the input (before); foreground: the
        guidance map; the edit region's outline as a segmentation."""
        if self.volume is None:
            return
        results = self.session.results
        after = self.state.show_after and "counterfactual" in results
        background = results["counterfactual"] if after else self.volume
        guidance = results.get("guidance")
        for view in self.slicer_app.view_manager.get_slice_views():
            view.set_background_volume_id(background.GetID())
            view.set_foreground_volume_id(guidance.GetID() if guidance is not None else None)
            view.set_foreground_opacity(float(self.state.opacity))
        self._show_outline(results.get("mask"))

    def _show_outline(self, labelmap: Any) -> None:
        if self.outline is not None:
            self.scene.RemoveNode(self.outline)
            self.outline = None
        if labelmap is None:
            return
        outline = self.outline = self.scene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", "Edit region (model)"
        )
        outline.CreateDefaultDisplayNodes()
        slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, outline)
        display = outline.GetDisplayNode()
        display.SetVisibility2DFill(False)
        display.SetVisibility2DOutline(True)
        display.SetSliceIntersectionThickness(2)
