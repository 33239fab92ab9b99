"""InstructX2X: counterfactual chest X-ray editing from a text instruction, inside 3D Slicer.

Four classes only (Module, Widget, Logic, Test). The Widget is a thin Qt panel; the Logic is
a thin MRML adapter over ``InstructX2XModuleLib.scene`` (MRML in and out, no Qt) and
``InstructX2XModuleLib.worker`` (the client of ``instructx2x serve``, no Qt, no Slicer). The
model runs in that worker process, never in Slicer's. Heavy dependencies (torch, diffusers)
are installed on first use, never at import.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any, cast

import qt
import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, Maximum, Minimum, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from InstructX2XModuleLib import packages

# the library's torch-free modules (instructions, parameters, errors) from its source shipped
# with the module; the worker's packages never enter Slicer's Python
packages.use_library_source(Path(__file__).resolve().parent)

from InstructX2XModuleLib import scene as mrml
from InstructX2XModuleLib.session import (
    GUIDANCE_SCALE,
    IMAGE_GUIDANCE_SCALE,
    MAX_GUIDANCE_SCALE,
    RELEVANCE_TIMESTEP,
    SIDES,
    TAU,
    Backend,
    EditSession,
    MaskSource,
    Operation,
    PanelSettings,
    Preset,
    SeriesView,
    WorkerMode,
    compose_instruction,
    describe_instruction,
    import_into_dicom_database,
    instruction_completions,
    shared_worker_available,
    worker_socket_setting,
)

# The bundled demonstration model (trained on synthetic phantoms; its card says so in every
# manifest). Users point the panel at their own InstructX2X weights in Advanced.
DEFAULT_MODEL = "demo"
TIMER_INTERVAL_MS = 200
# set to 1 to let the self-test install the worker's packages (1 to 5 GB) when they are not current
SELFTEST_INSTALL = "INSTRUCTX2X_SELFTEST_INSTALL"
# what the panel says where the worker's Python lacks OpenVINO (session.panel_message)
OPENVINO_HINT = (
    "InstructX2X adds it to its worker packages when you press Preview or Apply with Backend: "
    "OpenVINO; if they hold it and it still does not load, remove the folder {folder} and press "
    "Preview again to install them afresh"
)


class InstructX2X(ScriptedLoadableModule):
    """Module description for Slicer's module list."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("InstructX2X")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Radiology")]
        self.parent.dependencies = ["Segmentations", "DICOM"]
        self.parent.contributors = ["InstructX2X team"]
        self.parent.helpText = (
            _(
                "Counterfactual chest radiographs from a text instruction (InstructX2X, MICCAI 2025) "
                "with a guidance map showing where the model edits. Every result is SYNTHETIC and "
                "NOT FOR DIAGNOSIS."
            )
            + " "
            + _("Needs 3D Slicer {major}.{minor} or later.").format(
                major=packages.SUPPORTED_SLICER[0], minor=packages.SUPPORTED_SLICER[1]
            )
        )
        self.parent.acknowledgementText = _(
            "InstructX2X builds on InstructPix2Pix and Watch Your Steps; the panel follows "
            "SlicerMONAIAuto3DSeg's worker design."
        )


@parameterNodeWrapper
class InstructX2XParameterNode:
    """Every setting of the panel, saved with the scene."""

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    instruction: str = ""
    series: str = ""  # a progression series' levels or instructions (session.plan_series)
    # the choices by label (what scenes saved by every release hold); panelSettings maps them
    maskSource: Annotated[str, Choice(MaskSource.labels())] = MaskSource.PRIOR.label
    tau: Annotated[float, Minimum(0.0), Maximum(1.0)] = TAU
    overlayOpacity: Annotated[float, Minimum(0.0), Maximum(1.0)] = 0.5
    preset: Annotated[str, Choice(Preset.labels())] = Preset.FAST.label
    steps: Annotated[int, Minimum(0), Maximum(1000)] = 0
    modelGuidance: bool = True  # the model's s_T and s_I (its card's); off: the two boxes below
    guidanceScale: Annotated[float, Minimum(0.0), Maximum(MAX_GUIDANCE_SCALE)] = GUIDANCE_SCALE
    imageGuidanceScale: Annotated[float, Minimum(0.0), Maximum(MAX_GUIDANCE_SCALE)] = IMAGE_GUIDANCE_SCALE
    relevanceTimestep: Annotated[int, Minimum(0), Maximum(999)] = RELEVANCE_TIMESTEP
    seed: Annotated[int, Minimum(0)] = 0
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    scheduler: Annotated[str, Choice(["auto", "ddim", "dpm++", "unipc"])] = "auto"
    precision: Annotated[str, Choice(["auto", "fp32", "bf16", "fp16"])] = "auto"
    backend: Annotated[str, Choice(Backend.labels())] = Backend.AUTO.label
    model: str = DEFAULT_MODEL
    pacsTarget: str = ""
    verify: bool = True
    workerMode: Annotated[str, Choice(WorkerMode.labels())] = WorkerMode.LOCAL.label
    workerSocket: str = ""


class InstructX2XWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: binds widgets to the parameter node and drives the Logic from a timer."""

    # made by setup() (cleanup() stops them only where setup() got that far)
    logic: InstructX2XLogic
    timer: qt.QTimer

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self._parameterNode: InstructX2XParameterNode | None = None
        self._parameterNodeGuiTag = None
        self._observedSegmentation = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/InstructX2X.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        self.logic = InstructX2XLogic()
        # the editor's node before its scene, so that what setting the scene selects is kept in
        # the node (the order Slicer's Segment Editor module uses)
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(mrml.segment_editor_node(slicer.mrmlScene))
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.segmentEditorWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.segmentEditorWidget.setMaximumNumberOfUndoStates(10)  # as Slicer's Segment Editor: Undo works
        self._fillHelper()

        # signals by full signature: PythonQt's choice among overloads (currentNodeChanged has
        # a vtkMRMLNode* and a bool one) is not defined
        self.ui.inputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputChanged)
        self.ui.segmentEditorWidget.connect(
            "segmentationNodeChanged(vtkMRMLSegmentationNode*)", self.onSegmentationChanged
        )
        self.ui.instructionEdit.connect("textChanged(QString)", self.onInstructionChanged)
        self.ui.composeButton.connect("clicked(bool)", self.onCompose)
        self.ui.dicomButton.connect("clicked(bool)", lambda: slicer.util.selectModule("DICOM"))
        self.ui.loadFileButton.connect("clicked(bool)", lambda: slicer.util.openAddVolumeDialog())
        self.ui.previewButton.connect("clicked(bool)", self.onPreview)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.seriesButton.connect("clicked(bool)", self.onApplySeries)
        self.ui.seriesSlider.connect("valueChanged(double)", self.onSeriesStep)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.beforeAfterButton.connect("toggled(bool)", lambda after: self.showResults())
        self.ui.differenceButton.connect("toggled(bool)", lambda difference: self.showResults())
        self.ui.installModelButton.connect("clicked(bool)", self.onInstallModel)
        self.ui.workerModeCombo.connect("currentIndexChanged(int)", lambda index: self.onWorkerModeChanged())
        if not shared_worker_available():  # no Unix socket peer check (Windows)
            self.ui.workerModeCombo.enabled = False
            self.ui.workerModeCombo.toolTip = _(
                "A shared worker is reached from Linux and macOS; on Windows, open the GPU server's "
                "browser panel instead (README, Server mode)."
            )
        self.ui.openSavedButton.connect("clicked(bool)", self.onOpenSaved)
        self.ui.saveResultButton.connect("clicked(bool)", self.onSaveResult)
        self.ui.tauSlider.connect("valueChanged(double)", self.onTauChanged)
        self.ui.opacitySlider.connect("valueChanged(double)", self.logic.setOverlayOpacity)
        self.ui.modelGuidanceCheckBox.connect("toggled(bool)", self.onModelGuidanceToggled)

        self.timer = qt.QTimer()
        self.timer.setInterval(TIMER_INTERVAL_MS)
        self.timer.connect("timeout()", self.onTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.onSegmentationChanged(
            self.ui.segmentEditorWidget.segmentationNode()
        )  # one kept in the editor's node
        self.initializeParameterNode()
        unsupported = packages.unsupported_slicer(slicer.app.majorVersion, slicer.app.minorVersion)
        if unsupported:  # instructions still parse; the model cannot run on this Slicer's Python
            self.ui.statusLabel.text = unsupported
            self.ui.previewButton.enabled = False
            self.ui.applyButton.enabled = False
            self.ui.seriesButton.enabled = False
        if self.parent.isEntered:  # Reload while shown: Slicer calls setup() alone, not enter()
            self.enter()

    def cleanup(self) -> None:
        """The widget goes (application exit, or Reload, which hides it and builds a new one):
        its editor's effect, shortcuts and view observations, observers, timer, GUI binding,
        worker."""
        self._releaseEditor()
        self.removeObservers()
        if hasattr(self, "timer"):
            self.timer.stop()
        self.setParameterNode(None)
        if hasattr(self, "logic"):
            self.logic.stopWorker()

    def enter(self) -> None:
        """Each time the module is shown: the parameter node bound to the GUI, the editor on its
        node with its keyboard shortcuts (as Slicer's Segment Editor module does)."""
        self.initializeParameterNode()
        editor = self.ui.segmentEditorWidget
        editor.setMRMLSegmentEditorNode(mrml.segment_editor_node(slicer.mrmlScene))
        editor.installKeyboardShortcuts()
        editor.updateWidgetFromMRML()

    def exit(self) -> None:
        """Another module is shown: no editor effect left active, its shortcuts and view
        observations removed (as Slicer's Segment Editor module does), the GUI unbound. A job
        keeps running; the timer keeps polling it."""
        self._releaseEditor()
        if self._parameterNode is not None and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def _releaseEditor(self) -> None:
        editor = self.ui.segmentEditorWidget
        editor.setActiveEffect(None)
        editor.uninstallKeyboardShortcuts()
        editor.removeViewObservations()

    def onReload(self) -> None:
        """Reload the helper package's modules too (Slicer re-reads only this file): the session,
        which imports the others, last."""
        import importlib

        names = [
            name for name in sys.modules if name.startswith("InstructX2XModuleLib.") and name.count(".") == 1
        ]
        # the worker first (packages' PackageSetError subclasses its WorkerError), the session last
        for name in sorted(names, key=lambda name: (name.endswith(".session"), not name.endswith(".worker"))):
            importlib.reload(sys.modules[name])
        ScriptedLoadableModuleWidget.onReload(self)

    def onSceneStartClose(self, caller, event) -> None:
        """The scene is closing: the parameter node and the segmentation go with it (the Logic's
        session cancels its job and forgets its results on the same event)."""
        self.setParameterNode(None)
        self._observeSegmentation(None)
        editor = self.ui.segmentEditorWidget
        editor.setActiveEffect(None)
        editor.setSegmentationNode(None)
        editor.removeViewObservations()

    def onSceneEndClose(self, caller, event) -> None:
        """The scene is closed: a new parameter node at once when the module is shown, and the
        result widgets back to their empty state."""
        self.ui.beforeAfterButton.checked = True
        self.ui.differenceButton.checked = False
        self.ui.progressBar.value = 0
        # on a Slicer too old for the worker, why Preview and Apply stay off is said again
        self.ui.statusLabel.text = (
            packages.unsupported_slicer(slicer.app.majorVersion, slicer.app.minorVersion) or ""
        )
        self.ui.verificationText.setPlainText("")
        self.ui.verificationText.setVisible(False)
        self.showSeriesStep()
        if self.parent.isEntered:
            self.initializeParameterNode()
            self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(mrml.segment_editor_node(slicer.mrmlScene))
            self.ui.segmentEditorWidget.updateWidgetFromMRML()

    def initializeParameterNode(self) -> None:
        """The scene's parameter node (a new one when it has none), bound to the GUI."""
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, parameterNode) -> None:
        """Bind ``parameterNode`` to the GUI (None: unbind), releasing the one bound before."""
        if self._parameterNode is not None and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode, self._parameterNodeGuiTag = parameterNode, None
        if parameterNode is not None:
            self._parameterNodeGuiTag = parameterNode.connectGui(self.ui)
            self.onModelGuidanceToggled(parameterNode.modelGuidance)
            self.onWorkerModeChanged()
            self.ui.workerStatusLabel.text = self.logic.workerStatus

    # -- instruction ----------------------------------------------------------------------
    def _fillHelper(self) -> None:
        """Completion and the structured helper from the library's vocabulary (light import)."""
        from instructx2x.instructions import FINDINGS, LEVEL_WORDS, LUNG_ZONES

        # parented to the line edit, which setCompleter does not make its owner: without a parent
        # PythonQt deletes the completer with its Python wrapper
        completer = qt.QCompleter(instruction_completions(), self.ui.instructionEdit)
        completer.setCaseSensitivity(qt.Qt.CaseInsensitive)
        completer.setFilterMode(qt.Qt.MatchContains)
        self.ui.instructionEdit.setCompleter(completer)
        self.ui.operationCombo.addItems(Operation.labels())
        self.ui.findingCombo.addItems(list(FINDINGS))
        self.ui.sideCombo.addItems(list(SIDES))
        self.ui.zoneCombo.addItems(["", *LUNG_ZONES])
        for combo in (self.ui.fromLevelCombo, self.ui.toLevelCombo):
            combo.addItems(["", *LEVEL_WORDS])

    def onCompose(self) -> None:
        self.ui.instructionEdit.text = self.logic.composeInstruction(
            self.ui.operationCombo.currentText,
            self.ui.findingCombo.currentText,
            self.ui.sideCombo.currentText,
            self.ui.fromLevelCombo.currentText,
            self.ui.toLevelCombo.currentText,
            self.ui.zoneCombo.currentText,
        )

    def onInputChanged(self, volume) -> None:
        """Paint on the selected radiograph: it becomes the Segment Editor's source volume."""
        editor = self.ui.segmentEditorWidget
        if volume is not None and editor.segmentationNode() is None:
            segmentation = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", _("InstructX2X masks")
            )
            segmentation.CreateDefaultDisplayNodes()
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            editor.setSegmentationNode(segmentation)
        editor.setSourceVolumeNode(volume)

    def onSegmentationChanged(self, segmentation) -> None:
        """The editor shows another segmentation: offer its segments, and follow them."""
        self._observeSegmentation(segmentation)
        self.refreshKeepSegments()

    def _observeSegmentation(self, segmentation) -> None:
        """Refresh the never-edit list whenever a segment of ``segmentation`` is added, removed
        or renamed (None: stop following the one followed)."""
        if self._observedSegmentation is not None:
            for event in mrml.SEGMENT_EVENTS:
                self.removeObserver(self._observedSegmentation, event, self.onSegmentsChanged)
        self._observedSegmentation = segmentation
        if segmentation is not None:
            for event in mrml.SEGMENT_EVENTS:
                self.addObserver(segmentation, event, self.onSegmentsChanged)

    def onSegmentsChanged(self, caller, event) -> None:
        self.refreshKeepSegments()

    def onInstructionChanged(self, text: str) -> None:
        self.ui.parsedLabel.text = self.logic.describeInstruction(text)

    # -- actions --------------------------------------------------------------------------
    def refreshKeepSegments(self) -> None:
        """Offer every segment of the masks as the never-edit region (or none)."""
        combo, segmentation = self.ui.keepSegmentCombo, self._segmentation()
        current = combo.currentData
        combo.clear()
        combo.addItem(_("(none)"), "")
        for name, segmentId in mrml.segment_choices(segmentation):
            combo.addItem(name, segmentId)
        combo.setCurrentIndex(max(combo.findData(current), 0))

    def onPreview(self) -> None:
        self._submit("preview")

    def _submit(self, kind: str) -> None:
        """Queue the job (a preview, an edit or a series); Preview, Apply and Apply series stay
        disabled while it starts (a first use installs the worker's packages behind a modal
        dialog first)."""
        self.ui.previewButton.enabled = self.ui.applyButton.enabled = self.ui.seriesButton.enabled = False
        failed = {"preview": _("Preview failed."), "edit": _("Edit failed."), "series": _("Series failed.")}
        try:
            with slicer.util.tryWithErrorDisplay(failed[kind], waitCursor=True):
                self.logic.submit(
                    kind,
                    self._parameterNode,
                    self._segmentation(),
                    self._editSegmentId(),
                    self.ui.keepSegmentCombo.currentData or None,
                )
                self._running()
        finally:
            self.ui.applyButton.enabled = True  # Apply cancels a running job
            self.ui.previewButton.enabled = self.ui.seriesButton.enabled = not self.logic.busy

    def onApply(self) -> None:
        if self.logic.busy:
            self.logic.cancel()
            self.ui.statusLabel.text = _("Cancelling…")
            return
        self._submit("edit")

    def onApplySeries(self) -> None:
        """The Series field's steps as one job (Apply cancels it while it runs)."""
        if not self.logic.busy:
            self._submit("series")

    def onSeriesStep(self, value: float) -> None:
        """Show the slider's step of the series: its counterfactual over the shared region."""
        if self.logic.series is not None:
            with slicer.util.tryWithErrorDisplay(_("The series step could not be shown.")):
                self.ui.seriesStepLabel.text = self.logic.selectSeriesStep(round(value) - 1)
                self.showResults()

    def showSeriesStep(self) -> None:
        """The slider over the last result's series from its first step, or off when the last
        result is no series."""
        series = self.logic.series
        slider = self.ui.seriesSlider
        wasBlocked = slider.blockSignals(True)
        slider.maximum = len(series.steps) if series is not None else 1
        slider.value = series.index + 1 if series is not None else 1
        slider.blockSignals(wasBlocked)
        slider.enabled = series is not None
        self.ui.seriesStepLabel.text = series.step_text() if series is not None else _("Series step:")

    def onTauChanged(self, value: float) -> None:
        """Re-cut the preview at the released slider's value; while the worker is busy the
        last value waits and is applied when it is idle."""
        if self.logic.hasPreview:
            with slicer.util.tryWithErrorDisplay(_("Re-threshold failed.")):
                self.logic.rethreshold(value)
                self.timer.start()

    def onModelGuidanceToggled(self, useModel: bool) -> None:
        """The scale boxes count only when the model's own s_T and s_I are not used; meanwhile
        they show the model's values once its worker has reported them."""
        self.ui.textScaleSpinBox.enabled = not useModel
        self.ui.imageScaleSpinBox.enabled = not useModel
        defaults = self.logic.modelDefaults
        if useModel and defaults:
            self.ui.textScaleSpinBox.value = defaults.guidance_scale
            self.ui.imageScaleSpinBox.value = defaults.image_guidance_scale

    def onExport(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            assert self._parameterNode is not None, "enter() binds the parameter node"
            self.ui.statusLabel.text = self.logic.exportToDicom(self._parameterNode.pacsTarget)

    def showResults(self) -> None:
        """The result in the slice views as the Before / after and Difference buttons say, the
        guidance overlay at the panel's opacity."""
        if self._parameterNode is not None:
            self.logic.showResults(
                self.ui.beforeAfterButton.checked,
                self.ui.differenceButton.checked,
                self._parameterNode.overlayOpacity,
            )

    def onInstallModel(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(None, _("Model folder"))
        if folder:
            with slicer.util.tryWithErrorDisplay(_("The model could not be installed."), waitCursor=True):
                assert self._parameterNode is not None, "enter() binds the parameter node"
                self._parameterNode.model, digest = self.logic.installModel(folder)
                self.ui.statusLabel.text = _("Model installed; folder SHA-256 {digest}").format(digest=digest)

    def onWorkerModeChanged(self) -> None:
        """Local: the panel starts its own worker with the model and device set here. Shared
        socket: the next job goes to the worker at the socket, whose model and device count."""
        shared = self.ui.workerModeCombo.currentText == WorkerMode.SHARED.label
        if shared and not shared_worker_available():  # a scene saved on Linux or macOS, opened here
            self.ui.workerModeCombo.currentText = WorkerMode.LOCAL.label
            return  # the combo's change signal calls this again
        self.ui.workerSocketEdit.enabled = shared
        for widget in (
            self.ui.modelEdit,
            self.ui.installModelButton,
            self.ui.deviceCombo,
            self.ui.schedulerCombo,
            self.ui.precisionCombo,
            self.ui.backendCombo,
        ):
            widget.enabled = not shared
        if shared:
            self.ui.workerNoteLabel.text = _(
                "From the next job on, jobs go to the shared worker at this socket (instructx2x serve --socket); "
                "its model, device, sampler, precision and backend count, not the ones above. The job's files "
                "are sent to it over the connection, so it may run on another machine (README, Server mode)."
            )
        else:
            self.ui.workerNoteLabel.text = _(
                "The panel starts its own worker with the model, device, sampler, precision and backend above."
            )

    def onSaveResult(self) -> None:
        """Keep the last result's folder (the session's own is removed with the module)."""
        folder = qt.QFileDialog.getExistingDirectory(None, _("Folder to save the edit in"))
        if folder:
            with slicer.util.tryWithErrorDisplay(_("The edit could not be saved."), waitCursor=True):
                saved = self.logic.saveResult(Path(folder))
                self.ui.statusLabel.text = _("Saved in {folder}; Open saved edit reads it back.").format(
                    folder=saved
                )

    def onOpenSaved(self) -> None:
        """Show a saved edit again from its result folder (the worker's, or an exported one)."""
        folder = qt.QFileDialog.getExistingDirectory(None, _("Saved edit folder"))
        if folder:
            with slicer.util.tryWithErrorDisplay(_("The saved edit could not be opened."), waitCursor=True):
                assert self._parameterNode is not None, "enter() binds the parameter node"
                self.ui.statusLabel.text = self.logic.openSavedEdit(
                    folder, self._parameterNode.overlayOpacity
                )

    def onTimer(self) -> None:
        events, errors = self.logic.poll(), []
        self.ui.workerStatusLabel.text = self.logic.workerStatus
        if self.logic.resultArrived(events):
            # a new result opens on "after", without the difference (a series on its first step)
            for button, checked in ((self.ui.beforeAfterButton, True), (self.ui.differenceButton, False)):
                wasBlocked = button.blockSignals(True)
                button.checked = checked
                button.blockSignals(wasBlocked)
            self.showSeriesStep()
            self.showResults()
        for event in events:
            kind = event.get("event")
            if kind == "progress":
                self.ui.progressBar.maximum = event["total"]
                self.ui.progressBar.value = event["step"]
            elif kind == "ready":
                self.onModelGuidanceToggled(self.ui.modelGuidanceCheckBox.checked)
            elif kind == "error":
                errors.append(event)
            status = self.logic.statusText(event)
            if status is not None:
                self.ui.statusLabel.text = status
        if not self.logic.busy:
            self.timer.stop()
            self.ui.applyButton.text = _("Apply")
            self.ui.previewButton.enabled = self.ui.seriesButton.enabled = True
            if self.logic.lastResultText:
                self.ui.statusLabel.text = self.logic.lastResultText
            self.ui.verificationText.setPlainText(self.logic.lastVerificationText)
            self.ui.verificationText.setVisible(bool(self.logic.lastVerificationText))
        if errors:  # the timer waits while a modal dialog is open, so each error is shown once
            polling = self.timer.isActive()
            self.timer.stop()
            for event in errors:
                slicer.util.errorDisplay(event.get("message", ""), detailedText=str(event))
            if polling:
                self.timer.start()

    def _running(self) -> None:
        self.ui.applyButton.text = _("Cancel")
        self.ui.previewButton.enabled = self.ui.seriesButton.enabled = False
        self.ui.progressBar.value = 0
        self.timer.start()

    def _segmentation(self):
        return self.ui.segmentEditorWidget.segmentationNode()

    def _editSegmentId(self) -> str | None:
        return self.ui.segmentEditorWidget.currentSegmentID() or None


class InstructX2XLogic(ScriptedLoadableModuleLogic):
    """MRML adapter: the panel's settings and segments into the shared ``session.EditSession``
    (jobs, worker, result import), and Slicer's views and DICOM database for what comes back."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.session: EditSession | None = None

    def getParameterNode(self):
        # parameterNodeWrapper gives the class its __init__(parameterNode); Slicer has no type information
        return cast(Any, InstructX2XParameterNode)(super().getParameterNode())

    # -- instruction ----------------------------------------------------------------------
    @staticmethod
    def composeInstruction(
        operation: str, finding: str, side: str, before: str, after: str, zone: str = ""
    ) -> str:
        """``operation`` is an ``Operation`` label (the helper's combo box lists them)."""
        return compose_instruction(Operation.from_label(operation), finding, side, before, after, zone)

    @staticmethod
    def describeInstruction(text: str) -> str:
        return describe_instruction(text)

    # -- worker ---------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.session is not None and self.session.busy

    @property
    def hasPreview(self) -> bool:
        """A preview's guidance is cached in the worker, so tau can re-cut it."""
        return self.session is not None and self.session.preview_id is not None

    @property
    def results(self) -> dict:
        return self.session.results if self.session is not None else {}

    @property
    def series(self) -> SeriesView | None:
        """``session.SeriesView`` of the last result when it is a progression series, else None."""
        return self.session.series if self.session is not None else None

    def selectSeriesStep(self, index: int) -> str:
        """Make step ``index`` (from 0) of the series the result shown; returns what it is."""
        assert self.session is not None, "a series comes from a session"
        return self.session.select_series_step(index)

    @property
    def modelDefaults(self):
        """``session.SamplingDefaults``: steps, s_T, s_I and resolution the loaded model edits
        with by default (None before its worker is ready)."""
        return self.session.model_defaults if self.session is not None else None

    @property
    def workerStatus(self) -> str:
        """The worker's model, what runs it and why (``EditSession.worker_status``)."""
        if self.session is None:
            return _("No model loaded yet: the first Preview or Apply loads it.")
        return self.session.worker_status

    def statusText(self, event: dict) -> str | None:
        """The status line for a worker event (``session.status_text``; None: unchanged)."""
        return self.session.status_text(event) if self.session is not None else None

    @property
    def lastResultText(self) -> str:
        return self.session.result_text if self.session is not None else ""

    @property
    def lastVerificationText(self) -> str:
        return self.session.verification_text if self.session is not None else ""

    def stopWorker(self) -> None:
        if self.session is not None:
            self.session.stop()
            self.session = None

    def submit(
        self,
        kind: str,
        parameters,
        segmentation=None,
        segmentId: str | None = None,
        keepSegmentId: str | None = None,
    ) -> None:
        """Masks from the painted segments, then the job (``preview``, ``edit`` or ``series``:
        the parameter node's Series field) on the session's warm worker."""
        volume = parameters.inputVolume
        settings = panelSettings(parameters)
        editMask = keepMask = None
        if settings.mask_source is not MaskSource.PRIOR:
            if segmentId is None:
                raise ValueError(
                    _("Paint the region to edit in the Segment Editor, or choose the anatomical prior.")
                )
            editMask = mrml.segment_to_mask(segmentation, segmentId, volume)
        if keepSegmentId:
            keepMask = mrml.segment_to_mask(segmentation, keepSegmentId, volume)
        if self.session is None:  # the worker: Slicer's Python with the module's own package set first
            executable = packages.worker_command(packages.find_slicer_python(), workerPackagesFolder())
            self.session = EditSession(
                slicer.mrmlScene,
                executable=executable,
                prepare_worker=ensureDependencies,
                openvino_hint=OPENVINO_HINT.format(folder=workerPackagesFolder()),
            )
        database = slicer.dicomDatabase
        self.session.submit(
            kind,
            volume,
            settings,
            editMask,
            keepMask,
            dicom_file_for=database.fileForInstance if database is not None else None,
            series=parameters.series if kind == "series" else "",
        )

    def cancel(self) -> None:
        if self.session is not None:
            self.session.cancel()

    def rethreshold(self, tau: float) -> None:
        """Re-cut the preview at ``tau`` now, or when the worker is next idle (the last value
        asked for while it is busy)."""
        assert self.session is not None, "a preview to re-cut comes from a session"
        self.session.request_rethreshold(tau)

    def poll(self) -> list[dict]:
        return self.session.poll() if self.session is not None else []

    def resultArrived(self, events: list[dict]) -> bool:
        """Whether ``events`` (from ``poll``) brought the current job's result into the scene."""
        return (
            self.session is not None
            and bool(self.session.results)
            and any(self.session.is_current_result(event) for event in events)
        )

    # -- results --------------------------------------------------------------------------
    def setOverlayOpacity(self, opacity: float) -> None:
        slicer.util.setSliceViewerLayers(foregroundOpacity=opacity)

    def showResults(self, after: bool = True, difference: bool = False, opacity: float = 0.5) -> None:
        """The counterfactual (``after``), the radiograph or the difference as background, the
        guidance map as foreground at ``opacity``, the edit region as a label outline."""
        layers = mrml.result_layers(
            self.results,
            self.session.current.volume if self.session and self.session.current else None,
            after,
            difference,
            opacity,
        )
        if layers is None:
            return
        slicer.util.setSliceViewerLayers(
            background=layers.background,
            foreground=layers.foreground,
            label=layers.label,
            foregroundOpacity=layers.foreground_opacity,
        )
        for sliceNode in slicer.util.getNodesByClass("vtkMRMLSliceNode"):
            sliceNode.SetUseLabelOutline(True)

    def exportToDicom(self, pacsTarget: str = "") -> str:
        """Import the written series (SC + overlay SC + SEG) into Slicer's DICOM database, and
        push it to a PACS when a target is given (the only network traffic, on request)."""
        folder = self.session.output_folder if self.session is not None else None
        if folder is None or not any(folder.glob("*.dcm")):  # an edit's or a series' objects
            raise ValueError(
                _(
                    "Load the radiograph from DICOM and apply an edit first: the DICOM "
                    "series is written for DICOM inputs."
                )
            )
        from DICOMLib import DICOMUtils

        database = slicer.dicomDatabase
        # copied: the session's temporary folder is removed when the module closes; checked:
        # importDicom returns False on failure instead of raising
        import_into_dicom_database(
            folder, database, lambda path: DICOMUtils.importDicom(path, database, copyFiles=True)
        )
        message = _("Imported into the DICOM database, same study, marked SYNTHETIC.")
        assert self.session is not None, "a result to export comes from a session"
        if pacsTarget.strip() and self.session.uses_shared_worker:
            # the push runs from the worker's package set, which a shared worker's panel never installs
            message += " " + _(
                "Not sent to {target}: with a shared worker, send the series from Slicer's DICOM module "
                "(right-click the series, Send)."
            ).format(target=pacsTarget.strip())
        elif pacsTarget.strip():
            message += " " + self.pushToPacs(folder, pacsTarget.strip())
        return message

    def pushToPacs(self, folder: Path, target: str) -> str:
        """C-STORE the series in ``folder`` to ``target`` (HOST:PORT:AET) from the worker's package
        set (pynetdicom is not in Slicer's Python), on a thread behind a modal progress dialog."""
        ensureDependencies()
        command = packages.worker_command(packages.find_slicer_python(), workerPackagesFolder())
        runBehindModalDialog(
            _("Sending the series to {target}…").format(target=target),
            lambda: packages.push_series(command, folder, target),
        )
        return _("Sent to {target}.").format(target=target)

    def saveResult(self, parent: Path) -> Path:
        """The last result's folder copied into ``parent`` (``EditSession.save_result``)."""
        if self.session is None:
            raise ValueError(_("There is no result to save yet; preview or apply first."))
        return self.session.save_result(parent)

    def openSavedEdit(self, folder: str, opacity: float = 0.5) -> str:
        """Bring a saved edit's folder back as nodes (``scene.import_saved_edit``: the
        counterfactual, the guidance map over it, the edit region as a label outline) and show
        them; returns what was opened."""
        nodes = mrml.import_saved_edit(slicer.mrmlScene, Path(folder))
        layers = mrml.result_layers(nodes, None, opacity=opacity)
        assert layers is not None, "a saved edit has at least one part (read_saved_edit)"
        # a preview's folder has no counterfactual: the background stays ("keep-current")
        slicer.util.setSliceViewerLayers(
            background=layers.background if layers.background is not None else "keep-current",
            foreground=layers.foreground,
            label=layers.label,
            foregroundOpacity=layers.foreground_opacity,
            fit=True,
        )
        for sliceNode in slicer.util.getNodesByClass("vtkMRMLSliceNode"):
            sliceNode.SetUseLabelOutline(True)
        return _("Opened {folder}: {parts}.").format(folder=Path(folder).name, parts=", ".join(sorted(nodes)))

    def installModel(self, folder: str) -> tuple[str, str]:
        """Install a model folder under ~/.instructx2x/models, checked by its folder digest.

        ``InstructX2XModuleLib.model_install`` checks and copies it (standard library and the
        library's torch-free ``model_digest``: nothing to install first, no torch in Slicer's
        process; the worker checks that the model loads when it loads it) on a thread, behind
        a modal progress dialog that keeps the GUI alive. A folder without ``model.sha256`` is
        installed only once the user confirms its digest. Returns the installed path and the
        folder SHA-256 (``instructx2x info`` prints it as folder_sha256).
        """
        from InstructX2XModuleLib.model_install import UnpinnedModelError, install_model

        root = Path.home() / ".instructx2x" / "models"
        name = Path(folder).name

        def installOnThread(confirmedDigest):
            # no cancel button: a copy under way is finished or undone, never cut
            return runBehindModalDialog(
                _("Checking and copying {name}…").format(name=name),
                lambda: install_model(folder, root, confirmedDigest),
            )

        try:
            installed = installOnThread(None)
        except UnpinnedModelError as unpinned:
            if not slicer.util.confirmOkCancelDisplay(
                _(
                    "{name} has no model.sha256, so nothing shows that it is the model its publisher "
                    "released. Its folder SHA-256 is\n\n{digest}\n\nInstall it only if the publisher "
                    "gives this digest."
                ).format(name=name, digest=unpinned.digest),
                windowTitle=_("Confirm the model's digest"),
            ):
                raise RuntimeError(
                    _("{name} was not installed: its digest was not confirmed.").format(name=name)
                ) from None
            installed = installOnThread(unpinned.digest)
        if installed.already_installed:
            slicer.util.showStatusMessage(
                _("{name} is already installed (the same files).").format(name=name), 5000
            )
        logging.info(
            "Model %s at %s (folder sha256 %s)%s",
            name,
            installed.path,
            installed.digest[:16],
            ", already installed" if installed.already_installed else "",
        )
        return str(installed.path), installed.digest


def runBehindModalDialog(label: str, work):
    """``work()`` on a thread while an application-modal progress dialog (no cancel) keeps the
    GUI painting; its result, or its exception raised here on the GUI thread."""
    import threading

    outcome = {}

    def run():
        try:
            outcome["result"] = work()
        except BaseException as error:  # noqa: BLE001 - handed to the GUI thread, raised there
            outcome["error"] = error

    progress = slicer.util.createProgressDialog(
        labelText=label, maximum=0, windowModality=qt.Qt.ApplicationModal
    )
    progress.setCancelButton(None)
    thread = threading.Thread(target=run, name="instructx2x-work", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            slicer.app.processEvents()
            thread.join(0.05)
    finally:
        progress.close()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def panelSettings(parameters) -> PanelSettings:
    """The parameter node as the shared session's settings (one mapping, one place)."""
    return PanelSettings(
        instruction=parameters.instruction,
        mask_source=MaskSource.from_label(parameters.maskSource),
        tau=parameters.tau,
        preset=Preset.from_label(parameters.preset),
        steps=parameters.steps,
        guidance_scale=None if parameters.modelGuidance else parameters.guidanceScale,
        image_guidance_scale=None if parameters.modelGuidance else parameters.imageGuidanceScale,
        relevance_timestep=parameters.relevanceTimestep,
        seed=parameters.seed,
        device=parameters.device,
        scheduler=parameters.scheduler,
        precision=parameters.precision,
        backend=Backend.from_label(parameters.backend),
        model=parameters.model,
        verify=parameters.verify,
        worker_socket=worker_socket_setting(
            WorkerMode.from_label(parameters.workerMode), parameters.workerSocket
        ),
    )


def workerPackagesFolder() -> Path:
    """The worker's package set for this Slicer revision and its Python, beside Slicer's
    revision-specific settings."""
    return packages.package_set_folder(Path(slicer.app.slicerRevisionUserSettingsFilePath))


def workerPackagesStatus() -> str:
    """``packages.package_set_status`` of this Slicer's set (``current`` when nothing needs installing)."""
    moduleDir = Path(__file__).resolve().parent
    return packages.package_set_status(
        workerPackagesFolder(),
        packages.library_source(moduleDir),
        moduleDir / "Resources" / "requirements.txt",
        [moduleDir / "Resources" / "constraints.txt"],
        torch=packages.choose_torch,
        openvino=packages.choose_openvino,
    )


def ensureDependencies(settings: PanelSettings | None = None) -> None:
    """Build or update the worker's package set on first use, after asking (a self-test the user
    opted into with INSTRUCTX2X_SELFTEST_INSTALL=1 does not ask); Slicer's own Python is never
    changed. OpenVINO is in the set where ``auto`` takes it, and is added when ``settings``
    choose the OpenVINO backend (``packages.choose_openvino``).
    The work is ``packages.ensure_package_set``'s (one install at a time); here only its
    Qt parts: the question (asked with the normal cursor, though a Preview or Apply shows the
    wait cursor), an application-modal progress dialog with a Cancel button (no second Preview
    or Apply while it runs; the GUI is served every ``packages.CANCEL_POLL_S`` while pip runs)
    and Slicer's log."""
    problem = packages.unsupported_slicer(slicer.app.majorVersion, slicer.app.minorVersion)
    if problem:
        raise RuntimeError(problem)
    moduleDir = Path(__file__).resolve().parent
    backend = settings.backend if settings is not None else Backend.AUTO
    optedIn = slicer.app.commandOptions().testingEnabled and os.environ.get(SELFTEST_INSTALL) == "1"
    dialogs: list[qt.QProgressDialog] = []

    def report(stage: str) -> None:
        if not dialogs:
            dialogs.append(
                slicer.util.createProgressDialog(
                    labelText=stage, maximum=0, windowModality=qt.Qt.ApplicationModal
                )
            )
        if stage.startswith("Putting"):  # the last stage is a rename: finished or undone, never cut
            dialogs[0].setCancelButton(None)
        dialogs[0].labelText = stage
        slicer.app.processEvents()

    def log(line: str) -> None:
        logging.info(line)
        slicer.app.processEvents()

    def cancelled() -> bool:
        slicer.app.processEvents()
        return bool(dialogs) and dialogs[0].wasCanceled

    def confirm(question: str) -> bool:
        if optedIn:
            return True
        qt.QApplication.setOverrideCursor(qt.QCursor(qt.Qt.ArrowCursor))
        try:
            return slicer.util.confirmOkCancelDisplay(question)
        finally:
            qt.QApplication.restoreOverrideCursor()

    try:
        packages.ensure_package_set(
            workerPackagesFolder(),
            packages.find_slicer_python(),
            packages.library_source(moduleDir),
            moduleDir / "Resources" / "requirements.txt",
            constraints=[moduleDir / "Resources" / "constraints.txt"],
            progress=report,
            log=log,
            confirm=confirm,
            cancelled=cancelled,
            openvino=lambda build: packages.choose_openvino(build, backend.option),
        )
    finally:
        for dialog in dialogs:
            dialog.close()


class InstructX2XTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer: a generated DX through DICOMUtils, a painted mask, the worker
    on the small model, the outputs and the export (Reload and Test, or Slicer --testing)."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_edit_and_export()
        self.setUp()
        self.test_close_scene()

    def test_close_scene(self) -> None:
        """Close Scene with the panel shown: its editor node survives (a singleton), its
        parameter node is made again, and leaving the module deactivates the editor."""
        slicer.util.selectModule("InstructX2X")
        widget = slicer.modules.InstructX2XWidget
        editorNode = widget.ui.segmentEditorWidget.mrmlSegmentEditorNode()
        slicer.mrmlScene.Clear(0)
        self.assertTrue(slicer.mrmlScene.IsNodePresent(editorNode))
        self.assertIsNotNone(widget._parameterNode)
        self.assertEqual(widget.ui.keepSegmentCombo.count, 1)  # "(none)" only
        slicer.util.selectModule("Data")
        self.assertIsNone(widget.ui.segmentEditorWidget.activeEffect())

    def test_edit_and_export(self) -> None:
        """The worker part runs only when the worker's packages are current, or when
        INSTRUCTX2X_SELFTEST_INSTALL=1 lets it install them (1 to 5 GB): a self-test under
        --testing never downloads unasked."""
        status = workerPackagesStatus()
        if status != "current" and os.environ.get(SELFTEST_INSTALL) != "1":
            self.delayDisplay(
                f"Skipped the edit: the worker's packages are not installed ({status}); set "
                f"{SELFTEST_INSTALL}=1 to let the self-test install them (1 to 5 GB)."
            )
            return
        folder = Path(tempfile.mkdtemp(prefix="instructx2x-test-"))
        logic = InstructX2XLogic()
        parameters = logic.getParameterNode()
        names = ("inputVolume", "instruction", "model", "verify", "device", "steps", "maskSource")
        before = {name: getattr(parameters, name) for name in names}
        try:
            self._editAndExport(folder, logic, parameters)
        finally:
            logic.stopWorker()
            for name, value in before.items():
                setattr(parameters, name, value)
            shutil.rmtree(folder, ignore_errors=True)
        self.delayDisplay("Test passed")

    def _editAndExport(self, folder: Path, logic, parameters) -> None:
        import time

        import numpy as np
        from DICOMLib import DICOMUtils

        self.delayDisplay("Writing a generated DX")
        _writeTestRadiograph(folder / "dx.dcm")
        with DICOMUtils.TemporaryDICOMDatabase() as database:
            self.assertTrue(DICOMUtils.importDicom(str(folder), database))
            volume = slicer.util.getNode(DICOMUtils.loadPatientByUID(database.patients()[0])[0])
            parameters.inputVolume = volume
            parameters.instruction = "Add the finding of left pleural effusion"
            parameters.model = os.environ.get("INSTRUCTX2X_TEST_MODEL", "untrained-tiny")
            parameters.verify = parameters.model == "demo"  # the tiny model has no classifier set
            parameters.device = "cpu"
            parameters.steps = 2
            parameters.maskSource = MaskSource.PAINTED.label
            segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
            segmentation.CreateDefaultDisplayNodes()
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            segmentId = segmentation.GetSegmentation().AddEmptySegment("edit")
            painted = np.zeros(slicer.util.arrayFromVolume(volume).shape, np.uint8)
            painted[:, 20:60, 40:70] = 1
            slicer.util.updateSegmentBinaryLabelmapFromArray(painted, segmentation, segmentId, volume)
            self.delayDisplay("Editing")
            logic.submit("edit", parameters, segmentation, segmentId)
            deadline = time.monotonic() + 600
            while logic.busy:
                logic.poll()
                slicer.app.processEvents()
                self.assertLess(time.monotonic(), deadline)
                time.sleep(0.1)
            logic.poll()
            self.assertIn("counterfactual", logic.results)
            edited = slicer.util.arrayFromVolume(logic.results["counterfactual"])
            original = slicer.util.arrayFromVolume(volume)
            outside = painted == 0
            self.assertTrue(np.array_equal(edited[outside], original[outside]))
            if parameters.verify:
                self.assertIn("Verification", logic.lastVerificationText)
            logic.exportToDicom()


def _writeTestRadiograph(path: Path) -> None:
    """A small DX for the self-test (a smooth chest-like pattern, 12-bit)."""
    import numpy as np
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1.1")
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = (
        ds.file_meta.MediaStorageSOPClassUID,
        ds.file_meta.MediaStorageSOPInstanceUID,
    )
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "Test^Phantom", "PHANTOM-1"
    ds.SeriesDescription = "SYNTHETIC test radiograph - NOT FOR DIAGNOSIS"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType, ds.PresentationIntentType = ["ORIGINAL", "PRIMARY"], "FOR PRESENTATION"
    ds.ImagerPixelSpacing = [0.5, 0.5]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = 96, 88
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    yy, xx = np.mgrid[0:96, 0:88]
    ds.PixelData = (2048 + 1200 * np.sin(yy / 9) * np.cos(xx / 7)).astype(np.uint16).tobytes()
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:  # pydicom 2.4, bundled with Slicer 5.6 to 5.10, names it write_like_original=False
        ds.save_as(path, write_like_original=False)
