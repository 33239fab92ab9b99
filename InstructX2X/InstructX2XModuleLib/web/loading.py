"""The page's Open: an upload's chunks gathered per connection, then the radiograph checked,
read and shown (``uploads`` holds the checks and readers, which know nothing of trame)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

from .. import scene as mrml
from ..session import EditSession
from .display import RadiographDisplay
from .messages import logger, message
from .uploads import UploadBuffers, UploadError, read_radiograph, save_uploads

__all__ = ["RadiographLoader", "UPLOAD_TRIGGER"]

UPLOAD_TRIGGER = "upload_chunk"  # the trigger the page's upload script calls with each chunk


class RadiographLoader:
    """Receives uploads and opens the radiograph they hold.

    Parameters
    ----------
    state
        The page's trame state.
    session: EditSession
        Whose folder keeps the uploads (``upload-NNN``), and whose running job keeps its film.
    display: RadiographDisplay
        Where the radiograph is shown.
    max_upload_bytes: int
        The most one upload may hold.
    caller: Callable[[], object]
        The connection whose message is being handled (wslink's last active client).
    """

    def __init__(
        self,
        state: Any,
        session: EditSession,
        display: RadiographDisplay,
        max_upload_bytes: int,
        caller: Callable[[], object],
    ) -> None:
        self.state, self.session, self.display = state, session, display
        self.max_upload_bytes, self.caller = max_upload_bytes, caller
        self.buffers = UploadBuffers(max_upload_bytes)
        self.uploads = 0

    def receive_chunk(self, files: object) -> None:
        """One chunk of the browser's upload, a list of trame's file dicts as a page sends it
        (unchecked); an empty chunk ends it (trame-slicer's loader).

        Chunks are kept per connection and counted as they arrive: past the upload limit the
        connection's chunks are dropped at once and the end of its upload shows why."""
        from trame.app.file_upload import ClientFile

        client = self.caller()
        if files:
            if not isinstance(files, list):
                return
            received = [ClientFile(f) for f in files if isinstance(f, dict)]
            self.buffers.add(
                client, [(str(f.name), f.content if isinstance(f.content, bytes) else b"") for f in received]
            )
            return
        try:
            chunks = self.buffers.finish(client)
        except UploadError as error:
            with self.state:
                self.state.error = message(error)
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
            except Exception as error:  # noqa: BLE001 - every refusal is shown in the page (message)
                shutil.rmtree(folder, ignore_errors=True)
                self.state.error = message(error)
                return False
            if self.display.loaded is not None:
                shutil.rmtree(self.display.loaded.path.parent, ignore_errors=True)
            self.display.show(loaded)
            self.state.update(
                {
                    "loaded": True,
                    "description": loaded.description,
                    "error": "",
                    "has_dicom": loaded.sop_instance_uid is not None,
                    "has_result": False,
                    "has_preview": False,
                    "verification": "",
                    "series_count": 0,
                    "series_text": "",
                    "status": "Type an instruction, paint a region if you wish, then Preview or Apply.",
                }
            )
        logger.info("Loaded a radiograph (%s).", loaded.description)
        return True
