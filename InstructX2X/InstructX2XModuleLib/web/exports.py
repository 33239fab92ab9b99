"""The last edit's files out of the page: the downloads' zips, and the PACS box (C-ECHO and
C-STORE to a target the server names, never an address the page sends)."""

from __future__ import annotations

import asyncio
import io
import zipfile
from typing import Any

from .. import scene as mrml
from ..session import EditSession
from .messages import message
from .pacs_targets import PacsTargets

__all__ = ["ResultExports"]


class ResultExports:
    """Downloads and PACS sends of the session's last result.

    Parameters
    ----------
    state
        The page's trame state (whether there is a result, the chosen PACS, its message).
    session: EditSession
        Whose output folder holds the result.
    pacs_targets: PacsTargets
        The PACS the server's configuration names (``--pacs``, ``--pacs-config``).
    """

    def __init__(self, state: Any, session: EditSession, pacs_targets: PacsTargets) -> None:
        self.state, self.session, self.pacs_targets = state, session, pacs_targets

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
                text = f"{target.called_ae_title} at {target.host}:{target.port} answers."
            else:
                folder = self.session.output_folder
                if folder is None or not self.state.has_dicom or not self.state.has_result:
                    raise mrml.SceneError("apply an edit to a DICOM radiograph first.")
                files = sorted(folder.glob("*.dcm"))
                await asyncio.get_running_loop().run_in_executor(None, push_cstore, files, target)
                text = f"Sent {len(files)} objects (marked SYNTHETIC) to {target.called_ae_title}."
        except Exception as error:  # noqa: BLE001 - shown in the page (message)
            text = f"Error: {message(error)}"
        with self.state:
            self.state.pacs_message = text
