"""``WebPanel``: the browser panel put together from its parts, on one trame server and one
trame-slicer application.

- ``controls``: the page's inputs, its starting state and the session's settings;
- ``display``: the slice view (radiograph, painted segments and their tools, result layers);
- ``loading``: the Open button's uploads;
- ``jobs``: Preview, Apply, Apply series, Cancel, tau, the series' step, and the worker's events in the page;
- ``exports``: downloads and the PACS box;
- ``layout``: the page's widgets; ``connections``: the access policy and bounded sends.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from trame.app import get_server
from trame_slicer import module as trame_slicer_module
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

from .. import scene as mrml
from ..session import EditSession
from .access import AccessPolicy
from .connections import BoundedConnections, guard_server
from .controls import Controls, initial_state
from .display import RadiographDisplay
from .exports import ResultExports
from .jobs import PageJobs
from .layout import build_page
from .loading import RadiographLoader
from .messages import logger, message
from .pacs_targets import PacsTargets
from .uploads import MAX_UPLOAD_BYTES

__all__ = ["WebPanel", "POLL_INTERVAL_S"]

POLL_INTERVAL_S = 0.2
LAYOUT = "radiograph"
# what the page says where the worker's Python lacks OpenVINO (session.panel_message)
OPENVINO_HINT = (
    "install it into the Python environment this server runs in (from a clone: pip install -c "
    "constraints.txt -e './InstructX2XLib[openvino]') "
    "and start the server again"
)


class WebPanel:
    """The page's state and parts; every action is a method of its part (``controls``,
    ``display``, ``loader``, ``jobs``, ``exports``), so the tests can drive the workflow without
    a browser (``jobs.poll`` then stands in for the page's timer)."""

    def __init__(
        self,
        server: Any = None,
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
        mrml.prepare_scene(self.slicer_app.scene)
        register_rca_factories(self.slicer_app.view_manager, self.server, slice_view_ui_f=_no_view_gutter)
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
        self.layout_manager.register_layout(
            LAYOUT, Layout(LayoutDirection.Vertical, [ViewLayoutDefinition.axial_view(label="Radiograph")])
        )
        self.layout_manager.set_layout(LAYOUT)
        self.session = EditSession(
            self.slicer_app.scene,
            worker_socket=worker_socket,
            quota_bytes=quota_bytes,
            openvino_hint=OPENVINO_HINT,
        )
        self.access, self.max_upload_bytes = access, max_upload_bytes
        self.wslink: Any = None  # the web server, once bound (its last_active_client_id names a caller)
        pacs_targets = pacs_targets or PacsTargets({})
        self.controls = Controls(self.state, model, device)
        self.display = RadiographDisplay(self.state, self.slicer_app, self.session)
        self.loader = RadiographLoader(
            self.state, self.session, self.display, max_upload_bytes, caller=self._caller
        )
        self.jobs = PageJobs(self.state, self.session, self.display, self.controls.settings)
        self.exports = ResultExports(self.state, self.session, pacs_targets)
        self._poller: asyncio.Task | None = None
        self.state.update(
            initial_state(model, device, pacs_targets, max_upload_bytes, shared_worker=bool(worker_socket))
        )
        self.state.change("instruction")(self.controls.on_instruction)
        self.state.change("backend")(self.jobs.on_backend)
        self.state.change("tool", "segment", "brush_mm", "scissors_fill")(self.display.on_tool)
        self.state.change("tau")(self.jobs.on_tau)
        self.state.change("series_step")(self.jobs.on_series_step)
        self.state.change("opacity", "show_after")(self.display.on_layers)
        self.ui = build_page(
            self.server, self.layout_manager, self.controls, self.loader, self.jobs, self.exports
        )
        self.ctrl.on_server_ready.add(self._start_polling)
        self.ctrl.on_server_exited.add(self.close)
        self.ctrl.on_server_bind.add(self._bind)
        self.ctrl.on_error.add(_script_error)
        self.server.add_protocol_to_configure(
            lambda protocol: protocol.registerLinkProtocol(
                BoundedConnections(lambda: self.wslink, self.loader.buffers.discard)
            )
        )

    def _caller(self) -> object:
        """The connection whose message is being handled (None before the server is bound)."""
        return self.wslink.last_active_client_id if self.wslink is not None else None

    def _bind(self, wslink_server: Any) -> None:
        """The web server exists, not yet listening: put the access policy in front of it."""
        self.wslink = wslink_server
        if self.access is not None:
            guard_server(wslink_server, self.server.protocol, self.access, self.max_upload_bytes)

    def _start_polling(self, **_: Any) -> None:
        self._poller = asyncio.get_event_loop().create_task(self._poll_forever())

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL_S)
            try:
                self.jobs.poll()
            except Exception as error:  # noqa: BLE001 - the page must keep answering
                with self.state:
                    self.state.error = message(error)

    def close(self, **_: Any) -> None:
        """Stop the worker and remove every temporary file (uploads, jobs, results)."""
        if self._poller is not None:
            self._poller.cancel()
        self.session.stop()


def _script_error(*_args: Any, **_kwargs: Any) -> None:
    """A page's script error: logged by kind only (its text may quote page content)."""
    logger.warning("a page reported a script error")


def _no_view_gutter(*_args: Any) -> None:
    """A radiograph is one slice: no slice slider or 3-D buttons beside the view."""
