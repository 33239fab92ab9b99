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
import tempfile
from pathlib import Path
from typing import Annotated

import qt
import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, Minimum, Maximum, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from InstructX2XModuleLib import scene as mrml
from InstructX2XModuleLib.worker import WorkerClient, WorkerState

MASK_SOURCES = ("anatomical prior", "painted segment", "painted segment and prior")
PRESETS = ("fast (device default)", "paper (DDIM 100 steps)")
# The bundled demonstration model (trained on synthetic phantoms; its card says so in every
# manifest). Users point the panel at their own InstructX2X weights in Advanced.
DEFAULT_MODEL = "demo"
TIMER_INTERVAL_MS = 200


class InstructX2X(ScriptedLoadableModule):
    """Module description for Slicer's module list."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("InstructX2X")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Radiology")]
        self.parent.dependencies = ["Segmentations", "DICOM"]
        self.parent.contributors = ["InstructX2X team"]
        self.parent.helpText = _(
            "Counterfactual chest radiographs from a text instruction (InstructX2X, MICCAI 2025) "
            "with a guidance map showing where the model edits. Every result is SYNTHETIC and "
            "NOT FOR DIAGNOSIS.")
        self.parent.acknowledgementText = _(
            "InstructX2X builds on InstructPix2Pix and Watch Your Steps; the panel follows "
            "SlicerMONAIAuto3DSeg's worker design.")


@parameterNodeWrapper
class InstructX2XParameterNode:
    """Every setting of the panel, saved with the scene."""

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    instruction: str = ""
    maskSource: Annotated[str, Choice(list(MASK_SOURCES))] = MASK_SOURCES[0]
    tau: Annotated[float, Minimum(0.0), Maximum(1.0)] = 0.1
    overlayOpacity: Annotated[float, Minimum(0.0), Maximum(1.0)] = 0.5
    preset: Annotated[str, Choice(list(PRESETS))] = PRESETS[0]
    steps: Annotated[int, Minimum(0), Maximum(1000)] = 0
    guidanceScale: Annotated[float, Minimum(0.0), Maximum(100.0)] = 7.5
    imageGuidanceScale: Annotated[float, Minimum(0.0), Maximum(100.0)] = 1.5
    relevanceTimestep: Annotated[int, Minimum(0), Maximum(999)] = 800
    seed: Annotated[int, Minimum(0)] = 0
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    scheduler: Annotated[str, Choice(["auto", "ddim", "dpm++", "unipc"])] = "auto"
    precision: Annotated[str, Choice(["auto", "fp32", "bf16", "fp16"])] = "auto"
    model: str = DEFAULT_MODEL
    pacsTarget: str = ""
    verify: bool = True


class InstructX2XWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: binds widgets to the parameter node and drives the Logic from a timer."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/InstructX2X.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = InstructX2XLogic()

        self.ui.segmentEditorWidget.setMRMLScene(slicer.mrmlScene)
        editorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(editorNode)
        self._fillHelper()

        self.ui.inputSelector.currentNodeChanged.connect(self.onInputChanged)
        self.ui.instructionEdit.textChanged.connect(self.onInstructionChanged)
        self.ui.composeButton.clicked.connect(self.onCompose)
        self.ui.maskCollapsibleButton.contentsCollapsed.connect(lambda collapsed: self.refreshKeepSegments())
        self.ui.dicomButton.clicked.connect(lambda: slicer.util.selectModule("DICOM"))
        self.ui.loadFileButton.clicked.connect(lambda: slicer.util.openAddVolumeDialog())
        self.ui.previewButton.clicked.connect(self.onPreview)
        self.ui.applyButton.clicked.connect(self.onApply)
        self.ui.exportButton.clicked.connect(self.onExport)
        self.ui.beforeAfterButton.toggled.connect(self.onBeforeAfter)
        self.ui.differenceButton.toggled.connect(self.logic.showDifference)
        self.ui.installModelButton.clicked.connect(self.onInstallModel)
        self.ui.tauSlider.valueChanged.connect(self.onTauChanged)
        self.ui.opacitySlider.valueChanged.connect(self.logic.setOverlayOpacity)

        self.timer = qt.QTimer()
        self.timer.setInterval(TIMER_INTERVAL_MS)
        self.timer.connect("timeout()", self.onTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        if self.timer is not None:
            self.timer.stop()
        if self.logic is not None:
            self.logic.stopWorker()

    def onSceneStartClose(self, caller, event) -> None:
        self._parameterNode = None

    def initializeParameterNode(self) -> None:
        self._parameterNode = self.logic.getParameterNode()
        if self._parameterNodeGuiTag:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    # -- instruction ----------------------------------------------------------------------
    def _fillHelper(self) -> None:
        """Completion and the structured helper from the library's vocabulary (light import)."""
        from instructx2x.instructions import FINDINGS, LEVEL_WORDS

        completer = qt.QCompleter([f"Add the finding of {f}" for f in FINDINGS]
                                  + [f"Remove the finding of {f}" for f in FINDINGS])
        completer.setCaseSensitivity(qt.Qt.CaseInsensitive)
        completer.setFilterMode(qt.Qt.MatchContains)
        self.ui.instructionEdit.setCompleter(completer)
        self.ui.operationCombo.addItems([_("Add"), _("Remove"), _("Change the level of")])
        self.ui.findingCombo.addItems(list(FINDINGS))
        self.ui.sideCombo.addItems(["", "left", "right", "bilateral"])
        for combo in (self.ui.fromLevelCombo, self.ui.toLevelCombo):
            combo.addItems(["", *LEVEL_WORDS])

    def onCompose(self) -> None:
        self.ui.instructionEdit.text = self.logic.composeInstruction(
            self.ui.operationCombo.currentIndex, self.ui.findingCombo.currentText,
            self.ui.sideCombo.currentText, self.ui.fromLevelCombo.currentText,
            self.ui.toLevelCombo.currentText)

    def onInputChanged(self, volume) -> None:
        """Paint on the selected radiograph: it becomes the Segment Editor's source volume."""
        editor = self.ui.segmentEditorWidget
        if volume is not None and editor.segmentationNode() is None:
            segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", _("InstructX2X masks"))
            segmentation.CreateDefaultDisplayNodes()
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            editor.setSegmentationNode(segmentation)
        editor.setSourceVolumeNode(volume)
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
        if segmentation is not None:
            for index in range(segmentation.GetSegmentation().GetNumberOfSegments()):
                segmentId = segmentation.GetSegmentation().GetNthSegmentID(index)
                combo.addItem(segmentation.GetSegmentation().GetSegment(segmentId).GetName(), segmentId)
        combo.setCurrentIndex(max(combo.findData(current), 0))

    def onPreview(self) -> None:
        self._submit("preview")

    def _submit(self, kind: str) -> None:
        with slicer.util.tryWithErrorDisplay(_("Preview failed.") if kind == "preview" else _("Edit failed."),
                                             waitCursor=True):
            self.logic.submit(kind, self._parameterNode, self._segmentation(), self._editSegmentId(),
                              self.ui.keepSegmentCombo.currentData or None)
            self._running()

    def onApply(self) -> None:
        if self.logic.busy:
            self.logic.cancel()
            self.ui.statusLabel.text = _("Cancelling…")
            return
        self._submit("edit")

    def onTauChanged(self, value: float) -> None:
        if self.logic.hasPreview:
            with slicer.util.tryWithErrorDisplay(_("Re-threshold failed.")):
                self.logic.rethreshold(value)
                self.timer.start()

    def onExport(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            self.ui.statusLabel.text = self.logic.exportToDicom(self._parameterNode.pacsTarget)

    def onBeforeAfter(self, after: bool) -> None:
        self.logic.showBeforeAfter(after)

    def onInstallModel(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(None, _("Model folder"))
        if folder:
            with slicer.util.tryWithErrorDisplay(_("The model could not be installed."), waitCursor=True):
                self._parameterNode.model, digest = self.logic.installModel(folder)
                self.ui.statusLabel.text = _("Model installed; weights SHA-256 {digest}").format(digest=digest)

    def onTimer(self) -> None:
        for event in self.logic.poll():
            kind = event.get("event")
            if kind == "progress":
                self.ui.progressBar.maximum = event["total"]
                self.ui.progressBar.value = event["step"]
                eta = event.get("eta_s")
                self.ui.statusLabel.text = _("Step {step} of {total}").format(**event) + (
                    _(", about {seconds:.0f} s left").format(seconds=eta) if eta is not None else "")
            elif kind in ("loading", "decode", "export", "started"):
                self.ui.statusLabel.text = {"loading": _("Loading the model…"), "decode": _("Decoding…"),
                                            "export": _("Writing the results…"),
                                            "started": _("Working…")}[kind]
            elif kind == "error":
                self.ui.statusLabel.text = _("Error: {message}").format(message=event.get("message", ""))
                slicer.util.errorDisplay(event.get("message", ""), detailedText=str(event))
        if not self.logic.busy:
            self.timer.stop()
            self.ui.applyButton.text = _("Apply")
            self.ui.previewButton.enabled = True
            if self.logic.lastResultText:
                self.ui.statusLabel.text = self.logic.lastResultText
            self.ui.verificationText.setPlainText(self.logic.lastVerificationText)
            self.ui.verificationText.setVisible(bool(self.logic.lastVerificationText))

    def _running(self) -> None:
        self.ui.applyButton.text = _("Cancel")
        self.ui.previewButton.enabled = False
        self.ui.progressBar.value = 0
        self.timer.start()

    def _segmentation(self):
        return self.ui.segmentEditorWidget.segmentationNode()

    def _editSegmentId(self) -> str | None:
        return self.ui.segmentEditorWidget.currentSegmentID() or None


class InstructX2XLogic(ScriptedLoadableModuleLogic):
    """MRML adapter: a job from the scene, the worker for the work, the results into the scene."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.worker: WorkerClient | None = None
        self.workerSettings: tuple | None = None
        self.folder: Path | None = None
        self.pending: dict | None = None
        self.previewId: str | None = None
        self.results: dict = {}
        self.current: dict = {}
        self.lastResultText = ""
        self.lastVerificationText = ""  # verification.txt of the last edit, when verified

    def getParameterNode(self):
        return InstructX2XParameterNode(super().getParameterNode())

    # -- instruction ----------------------------------------------------------------------
    @staticmethod
    def composeInstruction(operation: int, finding: str, side: str, before: str, after: str) -> str:
        where = f"{side} {finding}".strip()
        if operation == 2:
            return f"Change the level of {where} from {before or 'mild'} to {after or 'severe'}"
        return f"{'Add' if operation == 0 else 'Remove'} the finding of {where}"

    @staticmethod
    def describeInstruction(text: str) -> str:
        """The parsed instruction and the prior it selects, shown before any run."""
        from instructx2x.errors import ParameterError
        from instructx2x.instructions import parse_instruction
        from instructx2x.priors import PriorSet

        if not text.strip():
            return _("Type an instruction, e.g. Add the finding of left pleural effusion.")
        try:
            parsed = parse_instruction(text)
        except ParameterError as error:
            return str(error)
        selection = PriorSet.default().select(parsed)
        findings = ", ".join(parsed.findings) or _("no known finding")
        side = f" ({parsed.laterality.value})" if parsed.laterality else ""
        return f"{parsed.operation.value}: {findings}{side}. {_('Region')}: {selection.reason}."

    # -- worker ---------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.worker is not None and self.worker.state in (WorkerState.STARTING, WorkerState.RUNNING,
                                                                 WorkerState.CANCELLING)

    @property
    def hasPreview(self) -> bool:
        return self.previewId is not None and not self.busy

    def ensureWorker(self, parameters) -> WorkerClient:
        """Start (or reuse) the warm worker for this model, device, sampler and precision;
        install the dependencies on first use."""
        settings = (parameters.model, parameters.device, parameters.scheduler, parameters.precision)
        if self.worker is not None and self.workerSettings == settings \
                and self.worker.state not in (WorkerState.STOPPED, WorkerState.IDLE):
            return self.worker
        self.stopWorker()
        ensureDependencies()
        python = shutil.which("PythonSlicer") or shutil.which("python3")
        environment = {"CUDA_VISIBLE_DEVICES": "-1"} if parameters.device == "cpu" else {}
        self.worker = WorkerClient(parameters.model, device=parameters.device, environment=environment,
                                   executable=[python, "-m", "instructx2x.cli"],
                                   scheduler=parameters.scheduler, dtype=parameters.precision)
        self.worker.start()
        self.workerSettings = settings
        return self.worker

    def stopWorker(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
            self.worker = None

    def submit(self, kind: str, parameters, segmentation=None, segmentId: str | None = None,
               keepSegmentId: str | None = None) -> None:
        """Write the inputs to a temporary folder and queue the job on the worker."""
        from instructx2x.instructions import parse_instruction

        volume = parameters.inputVolume
        mrml.volume_to_array(volume)  # a volume with one slice, or a clear message
        parse_instruction(parameters.instruction)  # empty or unreadable: a clear error now
        editParameters = self._editParameters(parameters)
        editMask = keepMask = None
        if parameters.maskSource != MASK_SOURCES[0]:
            if segmentId is None:
                raise ValueError(_("Paint the region to edit in the Segment Editor, or choose the anatomical prior."))
            editMask = mrml.segment_to_mask(segmentation, segmentId, volume)
            if parameters.maskSource == MASK_SOURCES[1]:
                editParameters["region_mode"] = "prior"
        if keepSegmentId:
            keepMask = mrml.segment_to_mask(segmentation, keepSegmentId, volume)
        self.folder = Path(tempfile.mkdtemp(prefix="instructx2x-"))
        database = slicer.dicomDatabase
        job = mrml.build_job(volume, kind, editParameters, self.folder, editMask, keepMask,
                             dicom_file_for=database.fileForInstance if database is not None else None,
                             verify="auto" if parameters.verify and kind == "edit" else None)
        worker = self.ensureWorker(parameters)
        self.pending = {"kind": kind, "job": job, "volume": volume}
        if worker.state == WorkerState.READY:
            self._send()

    def _send(self) -> None:
        request = self.pending
        self.pending = None
        requestId = self.worker.submit(request["kind"], request["job"])
        self.current = {**request, "id": requestId}

    def cancel(self) -> None:
        if self.pending is not None:
            self.pending = None
        if self.worker is not None:
            self.worker.cancel()

    def rethreshold(self, tau: float) -> None:
        self.worker.submit("rethreshold", preview=self.previewId, tau=tau,
                           output=str(self.folder / f"tau-{tau:.3f}"))
        self.current = {"kind": "rethreshold", "volume": self.current["volume"], "id": self.worker.current}

    def poll(self) -> list[dict]:
        if self.worker is None:
            return []
        events = self.worker.poll()
        if self.pending is not None and self.worker.state == WorkerState.READY:
            self._send()
        for event in events:
            if event.get("event") == "done" and event.get("id") == self.current.get("id"):
                self._importResults(event)
        if self.worker.state == WorkerState.STOPPED and self.worker.last_error:
            events.append({"event": "error", "message": self.worker.last_error})
            self.worker = None
        return events

    # -- results --------------------------------------------------------------------------
    def _importResults(self, event: dict) -> None:
        import numpy as np

        kind, volume = self.current["kind"], self.current["volume"]
        output = Path(event["output"])
        name = volume.GetName()
        if kind == "rethreshold":
            mask = np.load(output / "edit_mask.npy")
            self._replace("mask", mrml.array_to_volume(slicer.mrmlScene, mask.astype(np.uint8),
                                                       f"{name} edit region", volume, labelmap=True))
            self.lastResultText = _("Edit region at tau {tau}: {fraction:.1%} of the image.").format(
                tau=event.get("tau"), fraction=event.get("edit_fraction", 0))
            return
        guidance = np.load(output / "guidance_map.npy")
        mask = np.load(output / "edit_mask.npy")
        edited = self._editedPixels(output, volume) if kind == "edit" else mrml.volume_to_array(volume)
        for old in self.results.values():
            slicer.mrmlScene.RemoveNode(old)
        self.results = mrml.import_result(slicer.mrmlScene, volume, edited, guidance, mask, name)
        if kind == "preview":
            self.previewId = self.current["id"]
            slicer.mrmlScene.RemoveNode(self.results.pop("counterfactual"))
        self.outputFolder = output
        self.lastResultText = _("Done: edit region {fraction:.1%} of the image ({prior}).").format(
            fraction=event.get("edit_fraction", 0), prior=(event.get("prior") or {}).get("reason", ""))
        report = output / "verification.txt"
        self.lastVerificationText = report.read_text() if kind == "edit" and report.is_file() else ""
        self.showBeforeAfter(True)

    def _editedPixels(self, output: Path, volume):
        """The counterfactual's pixels in the volume's own value domain."""
        import numpy as np

        if (output / "counterfactual.dcm").is_file():
            import pydicom

            dataset = pydicom.dcmread(output / "counterfactual.dcm")
            slope = float(dataset.get("RescaleSlope", 1) or 1)
            intercept = float(dataset.get("RescaleIntercept", 0) or 0)
            return dataset.pixel_array.astype(np.float32) * slope + intercept
        from PIL import Image

        with Image.open(output / "edited.png") as image:
            return np.asarray(image, dtype=np.float32)

    def _replace(self, key: str, node) -> None:
        if key in self.results:
            slicer.mrmlScene.RemoveNode(self.results[key])
        self.results[key] = node

    def setOverlayOpacity(self, opacity: float) -> None:
        slicer.util.setSliceViewerLayers(foregroundOpacity=opacity)

    def showDifference(self, show: bool) -> None:
        """The difference (edited - input) as background, or back to the counterfactual."""
        if "difference" in self.results:
            slicer.util.setSliceViewerLayers(
                background=self.results["difference"] if show else self.results.get("counterfactual"))

    def showBeforeAfter(self, after: bool) -> None:
        """Counterfactual (after) or input (before) as background, guidance as foreground,
        the edit region as a label outline."""
        if not self.results:
            return
        background = self.results.get("counterfactual") if after else None
        slicer.util.setSliceViewerLayers(
            background=background or self.current["volume"], foreground=self.results.get("guidance"),
            label=self.results.get("mask"), foregroundOpacity=0.5)
        for sliceNode in slicer.util.getNodesByClass("vtkMRMLSliceNode"):
            sliceNode.SetUseLabelOutline(True)

    def exportToDicom(self, pacsTarget: str = "") -> str:
        """Import the written series (SC + overlay SC + SEG) into Slicer's DICOM database, and
        push it to a PACS when a target is given (the only network traffic, on request)."""
        folder = getattr(self, "outputFolder", None)
        if folder is None or not (folder / "counterfactual.dcm").is_file():
            raise ValueError(_("Load the radiograph from DICOM and apply an edit first: the DICOM "
                               "series is written for DICOM inputs."))
        from DICOMLib import DICOMUtils

        DICOMUtils.importDicom(str(folder))
        message = _("Imported into the DICOM database, same study, marked SYNTHETIC.")
        if pacsTarget.strip():
            from instructx2x.dicom.pacs import CStoreTarget, push_cstore

            target = CStoreTarget.parse(pacsTarget.strip())
            push_cstore(sorted(folder.glob("*.dcm")), target)
            message += " " + _("Sent to {aet} at {host}:{port}.").format(
                aet=target.called_ae_title, host=target.host, port=target.port)
        return message

    def installModel(self, folder: str) -> tuple[str, str]:
        """Copy a model folder under the user's home after checking it (no network).

        The folder must load as an InstructX2X model; when it carries ``model.sha256`` (the
        weights' hash as ``instructx2x info`` prints it), the weights must match it.
        Returns the installed path and the weights' SHA-256.
        """
        from instructx2x.loading import load_pipeline

        source = Path(folder)
        _pipeline, info = load_pipeline(source)  # refuses what would fail later; hashes the weights
        expected = source / "model.sha256"
        if expected.is_file() and expected.read_text().split()[0] != info.sha256:
            raise ValueError(_("The weights in {name} do not match model.sha256: the copy is damaged "
                               "or not the released model.").format(name=source.name))
        target = Path.home() / ".instructx2x" / "models" / source.name
        if not target.exists():
            shutil.copytree(source, target)
        logging.info("Installed model %s (sha256 %s)", source.name, info.sha256[:16])
        return str(target), info.sha256

    # -- helpers --------------------------------------------------------------------------
    @staticmethod
    def _editParameters(parameters) -> dict:
        values = {"instruction": parameters.instruction, "tau": parameters.tau,
                  "relevance_timestep": parameters.relevanceTimestep, "seed": parameters.seed,
                  "guidance_scale": parameters.guidanceScale,
                  "image_guidance_scale": parameters.imageGuidanceScale}
        if parameters.steps:
            values["num_inference_steps"] = parameters.steps
        if parameters.preset == PRESETS[1]:
            values["num_inference_steps"] = 100
        return values


def ensureDependencies() -> None:
    """Install what the worker needs on first use (asks first), torch through PyTorchUtils."""
    import importlib.util

    if all(importlib.util.find_spec(name) for name in ("instructx2x", "diffusers", "torch")):
        return
    if not slicer.util.confirmOkCancelDisplay(_("InstructX2X needs PyTorch, diffusers and the "
                                                "InstructX2X library (about 2 GB). Install now?")):
        raise RuntimeError(_("InstructX2X cannot run without its Python dependencies."))
    import PyTorchUtils

    progress = slicer.util.createProgressDialog(labelText=_("Installing PyTorch…"), maximum=0)
    try:
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
            raise RuntimeError(_("PyTorch could not be installed; see the Python console for the log."))
        progress.labelText = _("Installing diffusers, transformers and the InstructX2X library…")
        slicer.app.processEvents()
        requirements = Path(__file__).parent / "Resources" / "requirements.txt"
        if hasattr(slicer, "packaging"):  # Slicer >= 5.11: pinned, torch left to PyTorchUtils
            slicer.packaging.pip_ensure(slicer.packaging.load_requirements(str(requirements)),
                                        skip_packages=["torch"])
        else:
            slicer.util.pip_install(["-r", str(requirements)])
        library = Path(__file__).resolve().parents[1] / "InstructX2XLib"
        if library.is_dir():
            slicer.util.pip_install(["--no-deps", str(library)])
    except Exception as error:
        raise RuntimeError(_("Installing the dependencies failed: {error}. The log is in the Python "
                             "console (View > Python Console).").format(error=error)) from error
    finally:
        progress.close()


class InstructX2XTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer: a generated DX through DICOMUtils, a painted mask, the worker
    on the small model, the outputs and the export (Reload and Test, or Slicer --testing)."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_edit_and_export()

    def test_edit_and_export(self) -> None:
        import time

        import numpy as np
        from DICOMLib import DICOMUtils

        self.delayDisplay("Writing a generated DX")
        folder = Path(tempfile.mkdtemp(prefix="instructx2x-test-"))
        _writeTestRadiograph(folder / "dx.dcm")
        with DICOMUtils.TemporaryDICOMDatabase() as database:
            DICOMUtils.importDicom(str(folder), database)
            volume = slicer.util.getNode(DICOMUtils.loadPatientByUID(database.patients()[0])[0])
            logic = InstructX2XLogic()
            parameters = logic.getParameterNode()
            parameters.inputVolume = volume
            parameters.instruction = "Add the finding of left pleural effusion"
            parameters.model = os.environ.get("INSTRUCTX2X_TEST_MODEL", "untrained-tiny")
            parameters.verify = parameters.model == "demo"  # the tiny model has no classifier set
            parameters.device = "cpu"
            parameters.steps = 2
            parameters.maskSource = MASK_SOURCES[1]
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
            while logic.busy or logic.pending is not None:
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
            logic.stopWorker()
        self.delayDisplay("Test passed")


def _writeTestRadiograph(path: Path) -> None:
    """A small DX for the self-test (a smooth chest-like pattern, 12-bit)."""
    import numpy as np
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "Test^Phantom", "PHANTOM-1"
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
    ds.save_as(path, enforce_file_format=True)
