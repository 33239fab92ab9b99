"""The page's jobs: Preview, Apply, Apply series and Cancel through the shared session, tau
re-cuts of the preview, the step of a series shown, and the worker's events (progress, place in
the queue, results) moved into the page."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from instructx2x.parameters import TAU

from .. import scene as mrml
from ..session import EditSession, MaskSource, PanelSettings
from .display import RadiographDisplay
from .messages import message

__all__ = ["PageJobs"]

STARTED_TEXT = {
    "preview": "Computing the guidance…",
    "edit": "Editing…",
    "series": "Editing the series…",
}


class PageJobs:
    """The jobs sent from the page, and what the page says about them.

    Parameters
    ----------
    state
        The page's trame state.
    session: EditSession
        The shared session: queue, worker and results.
    display: RadiographDisplay
        The radiograph and painted masks a job takes, and the view its results go to.
    settings: Callable[[], PanelSettings]
        The page's controls as the session's settings.

    Attributes
    ----------
    ticket: int | None
        The last job sent from this page.
    shared_ahead: int
        Jobs ahead of it in a shared worker's queue (its ``queued`` events).
    pending_tau: float | None
        A tau chosen while the worker is busy, sent once it is idle.
    """

    def __init__(
        self,
        state: Any,
        session: EditSession,
        display: RadiographDisplay,
        settings: Callable[[], PanelSettings],
    ) -> None:
        self.state, self.session, self.display, self.settings = state, session, display, settings
        self.started_at: float | None = None
        self.pending_tau: float | None = None
        self.ticket: int | None = None
        self.shared_ahead = 0

    def submit(self, kind: str) -> bool:
        """Preview, Apply or Apply series (the Series field's steps: ``session.plan_series``)
        with the page's settings and painted masks."""
        with self.state:
            try:
                if self.display.volume is None:
                    raise mrml.SceneError("open a radiograph first.")
                settings = self.settings()
                edit_mask = (
                    self.display.painted("edit") if settings.mask_source is not MaskSource.PRIOR else None
                )
                ticket = self.session.submit(
                    kind,
                    self.display.volume,
                    settings,
                    edit_mask,
                    self.display.painted("keep"),
                    dicom_file_for=self.display.dicom_file_for,
                    series=(self.state.series or "") if kind == "series" else "",
                )
            except Exception as error:  # noqa: BLE001 - every refusal is shown in the page (message)
                self.state.error = message(error)
                return False
            self.ticket, self.shared_ahead = ticket, 0
            self.started_at = time.monotonic()
            self.state.update(
                {
                    "error": "",
                    "running": True,
                    "progress": 0,
                    "progress_text": "",
                    "queue_text": self.queue_text(),
                    "status": STARTED_TEXT[kind],
                }
            )
        return True

    def apply_or_cancel(self) -> None:
        """The Apply button, which reads Cancel while a job runs."""
        if self.state.running:
            self.cancel()
        else:
            self.submit("edit")

    def cancel(self) -> None:
        self.session.cancel()
        with self.state:
            self.state.status = "Cancelling…"

    def on_series_step(self, series_step: float = 1, **_: Any) -> None:
        """Show the slider's step of the series (from 1): its counterfactual over the shared
        guidance and edit region."""
        if self.session.series is None:
            return
        with self.state:
            try:
                self.state.series_text = self.session.select_series_step(round(float(series_step)) - 1)
            except Exception as error:  # noqa: BLE001 - shown in the page (message)
                self.state.error = message(error)
                return
            self.display.on_layers()

    def on_tau(self, tau: float = TAU, **_: Any) -> None:
        """Re-cut the preview at the slider's tau: now, or once the worker is idle."""
        if self.session.preview_id is None:
            return
        if self.session.busy:
            self.pending_tau = float(tau)
        else:
            self.session.rethreshold(float(tau))

    def on_backend(self, backend: str = "", **_: Any) -> None:
        """Advanced > Backend: the worker for it starts now (its ``ready``, or why it failed,
        comes through ``poll``), or with the next job while one is queued or running."""
        with self.state:
            try:
                started = self.session.start_worker_soon(self.settings())
            except Exception as error:  # noqa: BLE001 - every refusal is shown in the page (message)
                self.state.error = message(error)
                return
            if not started:
                self.state.status = f"Backend {backend}: from the next Preview or Apply."
            self.show_worker()

    def show_worker(self) -> None:
        """The worker's model, what runs it and why, in the page (``EditSession.worker_status``)."""
        text = self.session.worker_status
        if self.state.worker_status != text:
            self.state.worker_status = text

    def poll(self) -> list[dict]:
        """Move the worker's events into the page (the page's timer calls this)."""
        events = self.session.poll()
        if not events and not self.session.busy and self.pending_tau is None:
            return events
        with self.state:
            self.show_worker()
            for event in events:
                self._show_event(event)
            if not self.session.busy and self.pending_tau is not None:
                tau, self.pending_tau = self.pending_tau, None
                self.session.rethreshold(tau)
            self.state.running = self.session.busy
            self.state.queue_text = self.queue_text()
        return events

    def queue_text(self) -> str:
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
        current = self.session.current
        if kind == "ready":
            self.show_model_defaults()
        elif self.session.is_current_result(event) and current is not None:
            self.state.progress = 100
            self.state.status = self.session.result_text
            self.state.has_preview = self.session.preview_id is not None
            if current.kind != "rethreshold":
                self.state.has_result = "counterfactual" in self.session.results
                self.state.verification = self.session.verification_text
                series = self.session.series  # shown from its first step
                self.state.update(
                    {
                        "series_count": len(series.steps) if series is not None else 0,
                        "series_step": 1,
                        "series_text": series.step_text() if series is not None else "",
                    }
                )
                if self.started_at is not None:
                    self.state.status += f" ({time.monotonic() - self.started_at:.1f} s)"
            self.display.on_layers()
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
