"""``instructx2x-web``: the InstructX2X panel in a browser, over trame-slicer.

The page is the desktop panel's workflow on the same layers: MRML in and out through
``scene``, jobs, queue, worker and result import through ``session.EditSession`` (the model
stays warm in ``instructx2x serve``, one job at a time). This module only binds trame state
and buttons to them and chooses what the slice view shows.

One server process is one workspace: every browser tab connected to it sees the same
radiograph and results. Several readers each run their own server (own port) and share one
warm model through ``--worker-socket`` (``instructx2x serve --socket``); their jobs then run
one at a time and the page shows its place in the queue. It listens on loopback unless
``--host`` says otherwise, and answers only those who hold the launch's token
(``access``; docs/security.md): the address it prints carries it.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import shutil
import signal
import sys
import time
import zipfile
from pathlib import Path

# Before any VTK window exists: render offscreen through EGL (Mesa llvmpipe on a server with no
# GPU), never through X, which a server does not have.
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

import numpy as np
import slicer
from trame.app import get_server
from trame.widgets import html
from trame.widgets import vuetify3 as v3
from trame_slicer import module as trame_slicer_module
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.segmentation import (
    BrushDiameterMode,
    ScissorsEffectFillMode,
    SegmentationEffectErase,
    SegmentationEffectNoTool,
    SegmentationEffectPaint,
    SegmentationEffectScissors,
)
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition
from trame_vuetify.ui.vuetify3 import SinglePageWithDrawerLayout
from wslink.websocket import LinkProtocol

from instructx2x.errors import InstructX2XError, InternalError, error_event
from instructx2x.parameters import GUIDANCE_SCALE, IMAGE_GUIDANCE_SCALE, TAU

from .. import scene as mrml
from ..session import (
    DEFAULT_QUOTA_BYTES,
    SIDES,
    EditSession,
    MaskSource,
    Operation,
    PanelSettings,
    Preset,
    WorkerModel,
    compose_instruction,
    describe_instruction,
    instruction_completions,
)
from ..worker import WorkerError
from .access import AccessPolicy, guard_http, guard_rpc, install_message_limit, new_token, read_token_file
from .pacs_targets import PacsTargets
from .uploads import MAX_UPLOAD_BYTES, UploadBuffers, UploadError, read_radiograph, save_uploads

__all__ = ["WebPanel", "main", "TOOLS", "POLL_INTERVAL_S"]

logger = logging.getLogger("instructx2x.web")

TOOLS = {
    "none": SegmentationEffectNoTool,
    "paint": SegmentationEffectPaint,
    "erase": SegmentationEffectErase,
    "scissors": SegmentationEffectScissors,
}
SEGMENTS = {"edit": ("Edit region", [0.1, 0.85, 0.3]), "keep": ("Keep region", [0.2, 0.5, 1.0])}
POLL_INTERVAL_S = 0.2
LAYOUT = "radiograph"
UPLOAD_TRIGGER = "upload_chunk"
SEND_TIMEOUT_S = 10.0  # a page that takes no bytes for this long is cut off
MESSAGE_OVERHEAD_BYTES = 2**20  # a message's room beyond an upload's bytes: names, msgpack framing
# The state keys a page may write (its inputs) and the types their values may have; every other
# key, trame's own (trame__*) included, is the server's to set.
NUMBER = (int, float)
WRITABLE_STATE = {
    "instruction": (str,),
    "compose_operation": (str,),
    "compose_finding": (str,),
    "compose_side": (str,),
    "compose_zone": (str,),
    "compose_from": (str,),
    "compose_to": (str,),
    "mask_source": (str,),
    "tool": (str,),
    "segment": (str,),
    "brush_mm": NUMBER,
    "scissors_fill": (bool,),
    "tau": NUMBER,
    "opacity": NUMBER,
    "show_after": (bool,),
    "steps": (*NUMBER, str),
    "seed": (*NUMBER, str),
    "model_guidance": (bool,),
    "guidance_scale": (*NUMBER, str),
    "image_guidance_scale": (*NUMBER, str),
    "preset": (str,),
    "verify": (bool,),
    "include_demographics": (bool,),
    "pacs_target": (str,),
    "error": (str,),
}


class WebPanel:
    """The page's state and actions; every action is also a method, so the tests can drive the
    workflow without a browser (``poll`` then stands in for the page's timer)."""

    def __init__(
        self,
        server=None,
        model: str = "demo",
        device: str = "auto",
        max_upload_bytes: int = MAX_UPLOAD_BYTES,
        worker_socket: str | None = None,
        access: AccessPolicy | None = None,
        pacs_targets: PacsTargets | None = None,
        quota_bytes: int | None = None,
    ) -> None:
        self.server = get_server(server, client_type="vue3")
        self.server.enable_module(trame_slicer_module)
        self.server.enable_module(
            {
                "serve": {"instructx2x": str(Path(__file__).with_name("serve"))},
                "scripts": ["instructx2x/upload.js"],
            }
        )
        self.state, self.ctrl = self.server.state, self.server.controller
        self.slicer_app = SlicerApp()
        self.scene = self.slicer_app.scene
        mrml.prepare_scene(self.scene)
        register_rca_factories(self.slicer_app.view_manager, self.server, slice_view_ui_f=_no_view_gutter)
        self.layout_manager = LayoutManager(self.scene, self.slicer_app.view_manager, self.server)
        self.layout_manager.register_layout(
            LAYOUT, Layout(LayoutDirection.Vertical, [ViewLayoutDefinition.axial_view(label="Radiograph")])
        )
        self.layout_manager.set_layout(LAYOUT)
        self.editor = self.slicer_app.segmentation_editor
        self.session = EditSession(self.scene, worker_socket=worker_socket, quota_bytes=quota_bytes)
        self.model, self.device, self.max_upload_bytes = model, device, max_upload_bytes
        self.access, self.pacs_targets = access, pacs_targets or PacsTargets({})
        self.wslink = None  # the web server, once bound (its last_active_client_id names a caller)
        self.volume = None
        self.segmentation = None
        self.outline = None
        self.loaded = None  # uploads.LoadedRadiograph
        self.upload_buffers = UploadBuffers(max_upload_bytes)
        self.uploads = 0
        self.started_at: float | None = None
        self.pending_tau: float | None = None
        self.ticket: int | None = None  # the last job sent from this page
        self.shared_ahead = 0  # jobs ahead of it in a shared worker's queue
        self._poller: asyncio.Task | None = None
        self._initial_state()
        self._build_ui()
        self.ctrl.on_server_ready.add(self._start_polling)
        self.ctrl.on_server_exited.add(self.close)
        self.ctrl.on_server_bind.add(self._bind)
        self.ctrl.on_error.add(_script_error)
        self.server.add_protocol_to_configure(
            lambda protocol: protocol.registerLinkProtocol(_Connections(self))
        )

    # -- state -----------------------------------------------------------------------------
    def _initial_state(self) -> None:
        defaults = PanelSettings(model=self.model, device=self.device)
        self.state.update(
            {
                "trame__title": "InstructX2X",
                "loaded": False,
                "description": "",
                "error": "",
                "status": "Open a DICOM radiograph (file or folder) or a PNG.",
                "instruction": "",
                "parsed": describe_instruction(""),
                "completions": instruction_completions(),
                **self._helper_state(),
                "mask_source": defaults.mask_source.label,
                "mask_sources": MaskSource.labels(),
                "tool": "none",
                "segment": "edit",
                "brush_mm": 20.0,
                "scissors_fill": False,
                "tau": defaults.tau,
                "opacity": 0.5,
                "show_after": True,
                "has_result": False,
                "has_preview": False,
                "has_dicom": False,
                "running": False,
                "progress": 0,
                "progress_text": "",
                "queue_text": "",
                "steps": defaults.steps,
                "seed": defaults.seed,
                "model_guidance": True,
                "guidance_scale": GUIDANCE_SCALE,
                "image_guidance_scale": IMAGE_GUIDANCE_SCALE,
                "preset": defaults.preset.label,
                "presets": Preset.labels(),
                "verify": defaults.verify,
                "include_demographics": False,
                "verification": "",
                "pacs_target": self.pacs_targets.default,
                "pacs_names": self.pacs_targets.names,
                "pacs_message": "",
                "max_upload_mb": self.max_upload_bytes // 2**20,
            }
        )
        self.state.change("instruction")(self._on_instruction)
        self.state.change("tool", "segment", "brush_mm", "scissors_fill")(self._on_tool)
        self.state.change("tau")(self._on_tau)
        self.state.change("opacity", "show_after")(self._on_layers)

    @staticmethod
    def _helper_state() -> dict:
        """The structured helper's choices, from the library's vocabulary."""
        from instructx2x.instructions import FINDINGS, LEVEL_WORDS, LUNG_ZONES

        return {
            "operations": Operation.labels(),
            "findings": list(FINDINGS),
            "sides": list(SIDES),
            "zones": ["", *LUNG_ZONES],
            "levels": ["", *LEVEL_WORDS],
            "compose_operation": Operation.ADD.label,
            "compose_finding": "pleural effusion",
            "compose_side": "",
            "compose_zone": "",
            "compose_from": "",
            "compose_to": "",
        }

    def compose(self) -> None:
        """The helper's choices as an instruction in the training set's wording."""
        state = self.state
        with state:
            try:
                operation = Operation.from_label(state.compose_operation)
            except mrml.SceneError as error:
                state.error = _message(error)
                return
            state.instruction = compose_instruction(
                operation,
                state.compose_finding,
                state.compose_side or "",
                state.compose_from or "",
                state.compose_to or "",
                state.compose_zone or "",
            )

    def settings(self) -> PanelSettings:
        """The page's controls as the shared session's settings (the session checks ranges)."""
        state = self.state
        return PanelSettings(
            instruction=state.instruction or "",
            mask_source=MaskSource.from_label(state.mask_source),
            tau=_number(state.tau, "tau", float),
            preset=Preset.from_label(state.preset),
            steps=_number(state.steps or 0, "Steps", int),
            seed=_number(state.seed or 0, "Seed", int),
            guidance_scale=None
            if state.model_guidance
            else _number(state.guidance_scale, "Text guidance s_T", float),
            image_guidance_scale=None
            if state.model_guidance
            else _number(state.image_guidance_scale, "Image guidance s_I", float),
            model=self.model,
            device=self.device,
            verify=bool(state.verify),
            include_demographics=bool(state.include_demographics),
        )

    # -- loading ---------------------------------------------------------------------------
    def receive_chunk(self, files: list[dict]) -> None:
        """One chunk of the browser's upload; an empty chunk ends it (trame-slicer's loader).

        Chunks are kept per connection and counted as they arrive: past the upload limit the
        connection's chunks are dropped at once and the end of its upload shows why."""
        from trame.app.file_upload import ClientFile

        client = self.wslink.last_active_client_id if self.wslink is not None else None
        if files:
            if not isinstance(files, list):
                return
            received = [ClientFile(f) for f in files if isinstance(f, dict)]
            self.upload_buffers.add(
                client, [(str(f.name), f.content if isinstance(f.content, bytes) else b"") for f in received]
            )
            return
        try:
            chunks = self.upload_buffers.finish(client)
        except UploadError as error:
            with self.state:
                self.state.error = _message(error)
            return
        self.load(chunks)

    def load(self, files: list[tuple[str, bytes]]) -> bool:
        """Check, read and show an upload; a refused one changes nothing but the message."""
        self.uploads += 1
        folder = self.session.folder / f"upload-{self.uploads:03d}"
        with self.state:
            try:
                if self.session.busy:
                    raise mrml.SceneError(
                        "a job is running on this radiograph: wait for it or cancel it first."
                    )
                paths = save_uploads(files, folder, self.max_upload_bytes)
                loaded = read_radiograph(paths)
            except Exception as error:  # noqa: BLE001 - every refusal is shown in the page (_message)
                shutil.rmtree(folder, ignore_errors=True)
                self.state.error = _message(error)
                return False
            if self.loaded is not None:
                shutil.rmtree(self.loaded.path.parent, ignore_errors=True)
            self._show_radiograph(loaded)
            self.state.update(
                {
                    "loaded": True,
                    "description": loaded.description,
                    "error": "",
                    "has_dicom": loaded.sop_instance_uid is not None,
                    "has_result": False,
                    "has_preview": False,
                    "verification": "",
                    "status": "Type an instruction, paint a region if you wish, then Preview or Apply.",
                }
            )
        logger.info("Loaded a radiograph (%s).", loaded.description)
        return True

    def _show_radiograph(self, loaded) -> None:
        for node in [self.volume, self.segmentation, self.outline, *self.session.results.values()]:
            if node is not None and self.scene.IsNodePresent(node):
                self.scene.RemoveNode(node)
        self.session.results, self.session.preview_id, self.outline = {}, None, None
        self.loaded = loaded
        self.volume = mrml.array_to_volume(self.scene, loaded.pixels, "Radiograph")
        if loaded.spacing:
            self.volume.SetSpacing(loaded.spacing[1], loaded.spacing[0], 1.0)
        if loaded.sop_instance_uid:
            self.volume.SetAttribute("DICOM.instanceUIDs", loaded.sop_instance_uid)
        display = self.volume.GetDisplayNode()
        if loaded.inverted:
            display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeInvertedGrey")
        low, high = np.percentile(loaded.pixels, [0.5, 99.5])
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(float(low), float(high))
        self.segmentation = self.editor.create_empty_segmentation_node()
        self.segmentation.SetName("InstructX2X masks")
        self.editor.set_active_segmentation(self.segmentation, self.volume)
        for segment_id, (name, color) in SEGMENTS.items():
            self.editor.add_empty_segment(segment_id=segment_id, segment_name=name, segment_color=color)
        self.editor.set_active_segment_id("edit")
        self._on_tool(**self.state.to_dict())  # the chosen tool goes on with the new film
        self._on_layers()
        self.slicer_app.display_manager.reset_views()

    # -- painting --------------------------------------------------------------------------
    def _on_tool(self, tool="none", segment="edit", brush_mm=20.0, scissors_fill=False, **_):
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

    # -- instruction -----------------------------------------------------------------------
    def _on_instruction(self, instruction="", **_):
        self.state.parsed = describe_instruction(instruction or "")

    # -- jobs ------------------------------------------------------------------------------
    def submit(self, kind: str) -> bool:
        """Preview or Apply with the page's settings and painted masks."""
        with self.state:
            try:
                if self.volume is None:
                    raise mrml.SceneError("open a radiograph first.")
                settings = self.settings()
                edit_mask = self.painted("edit") if settings.mask_source is not MaskSource.PRIOR else None
                ticket = self.session.submit(
                    kind,
                    self.volume,
                    settings,
                    edit_mask,
                    self.painted("keep"),
                    dicom_file_for=self._dicom_file_for,
                )
            except Exception as error:  # noqa: BLE001 - every refusal is shown in the page (_message)
                self.state.error = _message(error)
                return False
            self.ticket, self.shared_ahead = ticket, 0
            self.started_at = time.monotonic()
            self.state.update(
                {
                    "error": "",
                    "running": True,
                    "progress": 0,
                    "progress_text": "",
                    "queue_text": self._queue_text(),
                    "status": "Editing…" if kind == "edit" else "Computing the guidance…",
                }
            )
        return True

    def apply_or_cancel(self) -> None:
        if self.state.running:
            self.cancel()
        else:
            self.submit("edit")

    def cancel(self) -> None:
        self.session.cancel()
        with self.state:
            self.state.status = "Cancelling…"

    def _on_tau(self, tau=TAU, **_):
        if self.session.preview_id is None:
            return
        if self.session.busy:
            self.pending_tau = float(tau)
        else:
            self.session.rethreshold(float(tau))

    def _dicom_file_for(self, sop_instance_uid: str) -> str | None:
        if self.loaded is not None and self.loaded.sop_instance_uid == sop_instance_uid:
            return str(self.loaded.path)
        return None

    def poll(self) -> list[dict]:
        """Move the worker's events into the page (the page's timer calls this)."""
        events = self.session.poll()
        if not events and not self.session.busy and self.pending_tau is None:
            return events
        with self.state:
            for event in events:
                self._show_event(event)
            if not self.session.busy and self.pending_tau is not None:
                tau, self.pending_tau = self.pending_tau, None
                self.session.rethreshold(tau)
            self.state.running = self.session.busy
            self.state.queue_text = self._queue_text()
        return events

    def _queue_text(self) -> str:
        """How many jobs run or wait before the last one sent from this page: this page's own
        queue while the worker is busy or starting, then the shared worker's ``queued`` count."""
        ahead = (
            self.session.queue_position(self.ticket) if self.ticket is not None else 0
        ) or self.shared_ahead
        return f"Queued: {ahead} job(s) ahead." if ahead else ""

    def _show_event(self, event: dict) -> None:
        kind, text = event.get("event"), self.session.status_text(event)
        if kind in ("queued", "started", "done", "cancelled", "error"):
            self.shared_ahead = event.get("position", 0)
        if kind == "progress":
            self.state.progress = round(100 * event["step"] / event["total"])
            self.state.progress_text = text
            return
        if text is not None:
            self.state.status = text
        if kind == "ready":
            self.show_model_defaults()
        elif self.session.is_current_result(event):
            self.state.progress = 100
            self.state.status = self.session.result_text
            self.state.has_preview = self.session.preview_id is not None
            if self.session.current.kind != "rethreshold":
                self.state.has_result = "counterfactual" in self.session.results
                self.state.verification = self.session.verification_text
                if self.started_at is not None:
                    self.state.status += f" ({time.monotonic() - self.started_at:.1f} s)"
            self._on_layers()
        elif kind in ("cancelled", "error"):
            self.state.update({"progress": 0, "progress_text": ""})
            if kind == "error":
                self.state.error = event.get("message", "the worker failed.")

    def show_model_defaults(self, model_guidance: bool | None = None) -> None:
        """While the model's guidance scales are used, the (disabled) fields show the values the
        worker reported, the model card's, not the panel's starting ones or what the user typed
        (at start-up, on the worker's ready event, and when the box is ticked: its new value comes
        with the event, before the state has it)."""
        defaults = self.session.model_defaults
        if model_guidance is None:
            model_guidance = self.state.model_guidance
        if model_guidance and defaults:
            self.state.update(
                {
                    "guidance_scale": defaults.guidance_scale,
                    "image_guidance_scale": defaults.image_guidance_scale,
                }
            )

    # -- display ---------------------------------------------------------------------------
    def _on_layers(self, **_):
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

    def _show_outline(self, labelmap) -> None:
        if self.outline is not None:
            self.scene.RemoveNode(self.outline)
            self.outline = None
        if labelmap is None:
            return
        self.outline = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Edit region (model)")
        self.outline.CreateDefaultDisplayNodes()
        slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, self.outline)
        display = self.outline.GetDisplayNode()
        display.SetVisibility2DFill(False)
        display.SetVisibility2DOutline(True)
        display.SetSliceIntersectionThickness(2)

    # -- results out -----------------------------------------------------------------------
    def result_archive(self, what: str) -> bytes:
        """The last edit's files as a zip: ``dicom`` (SC + overlay SC + SEG) or ``png``."""
        folder = self.session.output_folder
        if folder is None or not self.state.has_result:
            raise mrml.SceneError("apply an edit first.")
        patterns = ("*.dcm",) if what == "dicom" else ("*.png", "*.json")
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for pattern in patterns:
                for path in sorted(folder.glob(pattern)):
                    archive.write(path, path.name)
        return buffer.getvalue()

    async def pacs(self, action: str) -> None:
        """``echo`` (Test connection) or ``send`` (C-STORE of the series) to the PACS the page
        names among the server's configured targets (``--pacs``): the only network traffic, on
        the user's request, off the page's event loop. A page can never set an address."""
        from instructx2x.dicom.pacs import echo, push_cstore

        try:
            target = self.pacs_targets.get(self.state.pacs_target)
            if action == "echo":
                await asyncio.get_running_loop().run_in_executor(None, echo, target)
                message = f"{target.called_ae_title} at {target.host}:{target.port} answers."
            else:
                folder = self.session.output_folder
                if folder is None or not self.state.has_dicom or not self.state.has_result:
                    raise mrml.SceneError("apply an edit to a DICOM radiograph first.")
                files = sorted(folder.glob("*.dcm"))
                await asyncio.get_running_loop().run_in_executor(None, push_cstore, files, target)
                message = f"Sent {len(files)} objects (marked SYNTHETIC) to {target.called_ae_title}."
        except Exception as error:  # noqa: BLE001 - shown in the page (_message)
            message = f"Error: {_message(error)}"
        with self.state:
            self.state.pacs_message = message

    # -- life cycle ------------------------------------------------------------------------
    def _bind(self, wslink_server) -> None:
        """The web server exists, not yet listening: put the access policy in front of it."""
        self.wslink = wslink_server
        if self.access is None:
            return
        install_message_limit(self.max_upload_bytes + MESSAGE_OVERHEAD_BYTES)
        wslink_server.app.middlewares.append(
            guard_http(
                self.access, cookie_secure=any(origin.startswith("https:") for origin in self.access.origins)
            )
        )
        protocol = self.server.protocol
        protocol.updateSecret(self.access.token)

        async def validate(secret, _client_id):
            return self.access.token_matches(secret)

        protocol.validateToken = validate  # wslink asks the protocol first, in place of its plain ==
        for handler in wslink_server._ws_handlers:
            guard_rpc(handler.functionMap, WRITABLE_STATE)

    def _start_polling(self, **_):
        self._poller = asyncio.get_event_loop().create_task(self._poll_forever())

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL_S)
            try:
                self.poll()
            except Exception as error:  # noqa: BLE001 - the page must keep answering
                with self.state:
                    self.state.error = _message(error)

    def close(self, **_) -> None:
        """Stop the worker and remove every temporary file (uploads, jobs, results)."""
        if self._poller is not None:
            self._poller.cancel()
        self.session.stop()

    # -- page ------------------------------------------------------------------------------
    def _build_ui(self) -> None:
        self.server.trigger(UPLOAD_TRIGGER)(self.receive_chunk)
        self.server.trigger("download_dicom")(
            lambda: self.server.protocol.addAttachment(self.result_archive("dicom"))
        )
        self.server.trigger("download_png")(
            lambda: self.server.protocol.addAttachment(self.result_archive("png"))
        )
        upload = f"error = window.instructx2x_upload($event, '{UPLOAD_TRIGGER}', max_upload_mb)"
        with SinglePageWithDrawerLayout(self.server, full_height=True) as layout:
            layout.title.set_text("InstructX2X")
            with layout.toolbar:
                v3.VSpacer()
                v3.VChip(
                    "SYNTHETIC counterfactual - NOT FOR DIAGNOSIS",
                    color="error",
                    variant="flat",
                    v_show="has_result && show_after",
                    raw_attrs=['data-testid="synthetic-banner"'],
                    classes="mr-2",
                )
                html.Span("{{ description }}", classes="text-caption mr-4")
            with layout.drawer as drawer:
                drawer.width = 400
                with v3.VContainer(classes="pa-3"):
                    self._inputs_ui(upload)
                    self._mask_ui()
                    self._run_ui()
                    self._results_ui()
            with layout.content:
                with html.Div(
                    style="position: relative; width: 100%; height: calc(100vh - 64px);",
                    raw_attrs=['data-testid="slice-view"'],
                ):
                    self.layout_manager.initialize_layout_grid(layout)
        self.ui = layout

    def _inputs_ui(self, upload: str) -> None:
        v3.VAlert(
            "{{ error }}",
            v_if="error",
            type="error",
            density="compact",
            closable=True,
            raw_attrs=['data-testid="error"'],
            classes="mb-2",
            click_close="error = ''",
        )
        with v3.VRow(dense=True):
            with v3.VCol():
                v3.VFileInput(
                    label="Open radiograph (DICOM, PNG)",
                    multiple=True,
                    density="compact",
                    prepend_icon="mdi-file-upload",
                    change=upload,
                    hide_details=True,
                    accept=".dcm,.dicom,.png,.jpg,.jpeg,application/dicom,image/png,image/jpeg",
                    raw_attrs=['data-testid="open-file"'],
                )
            with v3.VCol(cols="auto"):
                v3.VFileInput(
                    label="Folder",
                    density="compact",
                    prepend_icon="mdi-folder-upload",
                    change=upload,
                    hide_input=True,
                    hide_details=True,
                    raw_attrs=["webkitdirectory", 'data-testid="open-folder"'],
                )
        v3.VCombobox(
            v_model=("instruction",),
            items=("completions",),
            label="Instruction",
            density="compact",
            hide_details=True,
            classes="mt-3",
            raw_attrs=['data-testid="instruction"'],
        )
        html.Div("{{ parsed }}", classes="text-caption mt-1 mb-2", raw_attrs=['data-testid="parsed"'])
        with v3.VExpansionPanels(classes="mb-2"):
            with v3.VExpansionPanel(title="Compose an instruction"):
                with v3.VExpansionPanelText():
                    for key, label, items in (
                        ("compose_operation", "Operation", "operations"),
                        ("compose_finding", "Finding", "findings"),
                        ("compose_side", "Side", "sides"),
                        ("compose_zone", "Lung zone (focal opacity)", "zones"),
                        ("compose_from", "From level (change)", "levels"),
                        ("compose_to", "To level (change; add: level)", "levels"),
                    ):
                        v3.VSelect(
                            v_model=(key,),
                            items=(items,),
                            label=label,
                            density="compact",
                            hide_details=True,
                            classes="mb-1",
                        )
                    v3.VBtn(
                        "Use this instruction",
                        click=self.compose,
                        block=True,
                        raw_attrs=['data-testid="compose"'],
                    )

    def _mask_ui(self) -> None:
        v3.VSelect(
            v_model=("mask_source",),
            items=("mask_sources",),
            label="Region to edit",
            density="compact",
            hide_details=True,
            raw_attrs=['data-testid="mask-source"'],
        )
        with v3.VBtnToggle(
            v_model=("tool",), mandatory=True, density="compact", classes="mt-2", disabled=("!loaded",)
        ):
            v3.VBtn(icon="mdi-cursor-default", value="none", raw_attrs=['data-testid="tool-none"'])
            v3.VBtn(icon="mdi-brush", value="paint", raw_attrs=['data-testid="tool-paint"'])
            v3.VBtn(icon="mdi-eraser", value="erase", raw_attrs=['data-testid="tool-erase"'])
            v3.VBtn(icon="mdi-content-cut", value="scissors", raw_attrs=['data-testid="tool-scissors"'])
        with v3.VBtnToggle(v_model=("segment",), mandatory=True, density="compact", classes="mt-2 ml-2"):
            v3.VBtn("Edit", value="edit", raw_attrs=['data-testid="segment-edit"'])
            v3.VBtn("Keep", value="keep", raw_attrs=['data-testid="segment-keep"'])
        v3.VSlider(
            v_model=("brush_mm",),
            min=2,
            max=80,
            step=1,
            label="Brush (mm)",
            density="compact",
            hide_details=True,
            thumb_label=True,
            classes="mt-2",
            raw_attrs=['data-testid="brush"'],
        )
        v3.VCheckbox(
            v_model=("scissors_fill",),
            label="Scissors fill inside (else erase inside)",
            density="compact",
            hide_details=True,
        )

    def _run_ui(self) -> None:
        with v3.VRow(dense=True, classes="mt-2"):
            with v3.VCol():
                v3.VBtn(
                    "Preview guidance",
                    block=True,
                    click=lambda: self.submit("preview"),
                    disabled=("!loaded || running",),
                    raw_attrs=['data-testid="preview"'],
                )
            with v3.VCol():
                v3.VBtn(
                    "{{ running ? 'Cancel' : 'Apply' }}",
                    block=True,
                    color="primary",
                    click=self.apply_or_cancel,
                    disabled=("!loaded",),
                    raw_attrs=['data-testid="apply"'],
                )
        v3.VSlider(
            v_model=("tau",),
            min=0,
            max=1,
            step=0.01,
            label="tau",
            thumb_label=True,
            density="compact",
            hide_details=True,
            classes="mt-2",
            raw_attrs=['data-testid="tau"'],
        )
        v3.VProgressLinear(
            model_value=("progress",),
            height=18,
            color="primary",
            classes="mt-1",
            raw_attrs=['data-testid="progress"'],
        )
        html.Div(
            "{{ progress }} % {{ progress_text }}",
            classes="text-caption",
            raw_attrs=['data-testid="progress-text"'],
        )
        html.Div("{{ queue_text }}", classes="text-caption", raw_attrs=['data-testid="queue"'])
        html.Div("{{ status }}", classes="text-body-2 mt-1", raw_attrs=['data-testid="status"'])
        with v3.VExpansionPanels(classes="mt-2"):
            with v3.VExpansionPanel(title="Advanced"):
                with v3.VExpansionPanelText():
                    v3.VSelect(v_model=("preset",), items=("presets",), label="Quality", density="compact")
                    v3.VTextField(
                        v_model_number=("steps",),
                        type="number",
                        label="Steps (0: default)",
                        density="compact",
                    )
                    v3.VTextField(v_model_number=("seed",), type="number", label="Seed", density="compact")
                    v3.VCheckbox(
                        v_model=("model_guidance",),
                        label="Model's guidance scales (its card's s_T, s_I)",
                        density="compact",
                        update_modelValue=(self.show_model_defaults, "[$event]"),
                        raw_attrs=['data-testid="model-guidance"'],
                    )
                    v3.VTextField(
                        v_model_number=("guidance_scale",),
                        type="number",
                        label="Text guidance s_T",
                        density="compact",
                        disabled=("model_guidance",),
                        raw_attrs=['data-testid="guidance-scale"'],
                    )
                    v3.VTextField(
                        v_model_number=("image_guidance_scale",),
                        type="number",
                        label="Image guidance s_I",
                        density="compact",
                        disabled=("model_guidance",),
                        raw_attrs=['data-testid="image-guidance-scale"'],
                    )
                    v3.VCheckbox(
                        v_model=("verify",), label="Verify the edit with classifiers", density="compact"
                    )
                    v3.VCheckbox(
                        v_model=("include_demographics",),
                        disabled=("!verify",),
                        density="compact",
                        label="Include the classifiers' age, sex and race estimates in the report "
                        "(model estimates, not the patient's data)",
                        raw_attrs=['data-testid="include-demographics"'],
                    )

    def _results_ui(self) -> None:
        v3.VSlider(
            v_model=("opacity",),
            min=0,
            max=1,
            step=0.05,
            label="Guidance overlay",
            density="compact",
            hide_details=True,
            classes="mt-3",
            raw_attrs=['data-testid="opacity"'],
        )
        v3.VSwitch(
            v_model=("show_after",),
            label="After (counterfactual) / before (input)",
            density="compact",
            hide_details=True,
            disabled=("!has_result",),
            raw_attrs=['data-testid="before-after"'],
        )
        with v3.VRow(dense=True):
            with v3.VCol():
                v3.VBtn(
                    "DICOM series",
                    block=True,
                    prepend_icon="mdi-download",
                    disabled=("!has_result || !has_dicom",),
                    raw_attrs=['data-testid="download-dicom"'],
                    click="utils.download('instructx2x-dicom.zip', trigger('download_dicom'), 'application/zip')",
                )
            with v3.VCol():
                v3.VBtn(
                    "PNGs",
                    block=True,
                    prepend_icon="mdi-download",
                    disabled=("!has_result",),
                    raw_attrs=['data-testid="download-png"'],
                    click="utils.download('instructx2x-png.zip', trigger('download_png'), 'application/zip')",
                )
        html.Pre(
            "{{ verification }}",
            v_if="verification",
            classes="text-caption mt-2",
            style="white-space: pre-wrap;",
            raw_attrs=['data-testid="verification"'],
        )
        with v3.VExpansionPanels(classes="mt-2"):
            with v3.VExpansionPanel(title="Send to PACS (C-STORE)"):
                with v3.VExpansionPanelText():
                    v3.VSelect(
                        v_model=("pacs_target",),
                        items=("pacs_names",),
                        label="PACS (the server's list)",
                        density="compact",
                        no_data_text="The server names no PACS (--pacs).",
                        raw_attrs=['data-testid="pacs-target"'],
                    )
                    v3.VBtn(
                        "Test connection",
                        click=lambda: self.pacs("echo"),
                        classes="mr-2",
                        raw_attrs=['data-testid="pacs-echo"'],
                    )
                    v3.VBtn(
                        "Send",
                        click=lambda: self.pacs("send"),
                        disabled=("!has_result || !has_dicom",),
                        raw_attrs=['data-testid="pacs-send"'],
                    )
                    html.Div(
                        "{{ pacs_message }}",
                        classes="text-caption mt-1",
                        raw_attrs=['data-testid="pacs-message"'],
                    )


class _Connections(LinkProtocol):
    """wslink's connections: each one's sends are bounded in time, and a closed one's unfinished
    upload is freed.

    wslink sends every reply and broadcast under one lock shared by all connections, waiting on
    each socket in turn: a page that stops reading would hold every other page. A send that makes
    no progress for ``SEND_TIMEOUT_S`` cuts that connection off instead, and the others go on."""

    def __init__(self, panel: WebPanel) -> None:
        super().__init__()
        self.panel = panel

    def onConnect(self, request, client_id) -> None:
        sockets = [
            handler.connections.get(client_id) for handler in getattr(self.panel.wslink, "_ws_handlers", [])
        ]
        socket = next((s for s in sockets if s is not None), None)
        if socket is None:
            return
        send = socket.send_bytes

        async def bounded_send(data, *args, **kwargs):
            try:
                await asyncio.wait_for(send(data, *args, **kwargs), SEND_TIMEOUT_S)
            except (asyncio.TimeoutError, ConnectionError):
                if request.transport is not None:
                    request.transport.abort()  # its reader ends, wslink forgets it

        socket.send_bytes = bounded_send

    def onClose(self, client_id) -> None:
        self.panel.upload_buffers.discard(client_id)


def _script_error(*_args, **_kwargs) -> None:
    """A page's script error: logged by kind only (its text may quote page content)."""
    logger.warning("a page reported a script error")


def _no_view_gutter(*_args) -> None:
    """A radiograph is one slice: no slice slider or 3-D buttons beside the view."""


def _number(value, label: str, kind: type):
    """A number typed in the page, or the error that names the field."""
    from instructx2x.errors import ParameterError

    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ParameterError(
            f"{label} must be a{'n integer' if kind is int else ' number'}, got {value!r}."
        ) from None


def _message(error: Exception) -> str:
    """What the page shows: the specific message of the library, the scene layer, the worker
    client or the file system, never a traceback; running out of memory as the library says it
    (``error_event``); anything else is a defect, said as such."""
    if isinstance(error, (WorkerError, ValueError, OSError)):
        return str(error).strip() or type(error).__name__
    event = error_event(error)
    if event.kind != InternalError.__name__:
        return event.message.strip() or event.kind
    logger.error("internal error (%s)", type(error).__name__)  # the type only: messages may quote data
    return f"internal error, please report it ({type(error).__name__})"


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of MB >= 1, got {text!r}")
    return int(text)


def _unusable_address(host: str, port: int) -> str | None:
    """Why the server could not listen on ``host:port`` (None when it can)."""
    import socket

    try:
        with socket.create_server((host, port)):
            return None
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        return f"cannot listen on {host}:{port} ({reason}); choose another --port or --host."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instructx2x-web",
        description=(
            "The InstructX2X panel in a browser (trame-slicer). Images it writes are SYNTHETIC, "
            "not for diagnosis. The address it prints carries a token that every page must show."
        ),
    )
    parser.add_argument("--model", default="demo", help="model folder, demo (default) or untrained-tiny")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to listen on (default loopback; anything else exposes the page: put a "
        "reverse proxy with TLS and a login in front, docs/security.md)",
    )
    parser.add_argument(
        "--origin",
        action="append",
        default=[],
        metavar="URL",
        help="an address the page is served under besides this server's own, e.g. "
        "https://xray.example.org behind a reverse proxy (repeatable)",
    )
    parser.add_argument(
        "--token-file",
        metavar="PATH",
        help="read the access token from this file (first line, at least 32 characters) "
        "instead of drawing a new one",
    )
    parser.add_argument(
        "--max-upload-mb",
        type=_positive,
        default=MAX_UPLOAD_BYTES // 2**20,
        help="largest upload in MB (default %(default)s)",
    )
    parser.add_argument(
        "--quota-mb",
        type=_positive,
        default=DEFAULT_QUOTA_BYTES // 2**20,
        help="the most disk the session's uploads, jobs and results may take, in MB (default %(default)s)",
    )
    parser.add_argument(
        "--max-connections", type=_positive, default=8, help="pages open at once (default %(default)s)"
    )
    parser.add_argument(
        "--pacs",
        action="append",
        default=[],
        metavar="NAME=AET@HOST:PORT",
        help="a PACS the page may send results to (repeatable); the page chooses by name",
    )
    parser.add_argument(
        "--pacs-config",
        metavar="PATH",
        help='a JSON file {NAME: "AET@HOST:PORT", ...} of PACS targets, beside --pacs',
    )
    parser.add_argument(
        "--worker-socket",
        metavar="PATH",
        help="use the shared worker of instructx2x serve --socket PATH (one warm model for "
        "several servers; --model and --device are then the worker's)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)  # our own lines only: the frameworks' INFO echoes page content
    for framework in ("wslink", "trame_server", "trame", "aiohttp", "asyncio"):
        # their lines quote what clients send (text frames, call arguments, malformed requests)
        # and a flood of them would fill the disk: refusals are logged by access, by kind
        logging.getLogger(framework).setLevel(logging.CRITICAL + 1)
    try:  # every setting checked before the model loads
        token = read_token_file(arguments.token_file) if arguments.token_file else new_token()
        access = AccessPolicy(
            token,
            host=arguments.host,
            origins=tuple(arguments.origin),
            max_connections=arguments.max_connections,
        )
        pacs_targets = PacsTargets.from_arguments(arguments.pacs, arguments.pacs_config)
    except InstructX2XError as error:
        print(f"instructx2x-web: {error}", file=sys.stderr)
        return 2
    if arguments.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"WARNING: listening on {arguments.host}: whoever reaches this machine and learns the token can open "
            "the page and its radiographs, over plain HTTP. Put a reverse proxy with TLS and a login in front "
            "(docs/security.md), and name its address with --origin.",
            file=sys.stderr,
        )
    problem = _unusable_address(arguments.host, arguments.port)  # before the model loads
    if problem:
        print(f"instructx2x-web: {problem}", file=sys.stderr)
        return 2
    # SIGTERM (a service manager, a test) ends the server like Ctrl-C, so that the worker stops
    # and the session's temporary files are removed, at any moment from here on.
    signal.signal(signal.SIGTERM, _interrupt)
    panel = WebPanel(
        model=arguments.model,
        device=arguments.device,
        max_upload_bytes=arguments.max_upload_mb * 2**20,
        worker_socket=arguments.worker_socket,
        access=access,
        pacs_targets=pacs_targets,
        quota_bytes=arguments.quota_mb * 2**20,
    )
    try:
        ready = panel.session.start_worker(panel.settings())  # the model loads before the page is served
        panel.show_model_defaults()
        model = WorkerModel.from_ready(ready)
        logger.info("Model %s ready (%s).", model.name, model.dtype)
        panel.ctrl.on_server_ready.add(
            lambda **_: print(
                f"InstructX2X web panel: {_announced_address(arguments.host, panel.server.port, token)}"
                + "".join(
                    f"\n  through {origin}: {origin.rstrip('/')}/?token={token}"
                    for origin in arguments.origin
                ),
                flush=True,
            )
        )
        panel.server.start(
            host=arguments.host,
            port=arguments.port,
            open_browser=False,
            show_connection_info=False,
            disable_logging=True,
            timeout=0,
        )  # timeout 0: no shutdown when the last tab closes
    except WorkerError as error:
        print(f"instructx2x-web: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    finally:
        panel.close()
    return 0


def _announced_address(host: str, port: int, token: str) -> str:
    """The address to open, token included (loopback for a server on every interface)."""
    name = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    name = f"[{name}]" if ":" in name else name
    return f"http://{name}:{port}/?token={token}"


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
