"""Send an edit's objects to a DICOM node with DIMSE: C-ECHO and C-STORE (pynetdicom).
DICOMweb (STOW-RS) lives in ``dicomweb``.

The only network traffic the library makes, and only when the user asks for it.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import pydicom

from ..errors import PacsError, ParameterError

__all__ = ["PacsError", "CStoreTarget", "echo", "push_cstore"]

logger = logging.getLogger(__name__)

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default repertoire, no backslash


@dataclasses.dataclass(frozen=True)
class CStoreTarget:
    """A DICOM node: host, port and called AE title.

    Raises
    ------
    ParameterError
        On an empty host, a port outside 1-65535 or an invalid AE title.
    """

    host: str
    port: int
    called_ae_title: str
    calling_ae_title: str = "INSTRUCTX2X"

    def __post_init__(self) -> None:
        if not self.host:
            raise ParameterError("C-STORE host is empty.")
        if not 0 < int(self.port) < 65536:
            raise ParameterError(f"C-STORE port must lie in 1-65535, got {self.port}.")
        for name in ("called_ae_title", "calling_ae_title"):
            value = getattr(self, name)
            if not _AE_TITLE.match(value) or not value.strip():
                raise ParameterError(
                    f"{name} {value!r} is not a valid AE title (1-16 characters, no backslash)."
                )

    @classmethod
    def parse(cls, text: str) -> CStoreTarget:
        """Parse ``HOST:PORT:AET`` (the CLI's ``--push-cstore``)."""
        parts = text.rsplit(":", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            raise ParameterError(f"C-STORE target must read HOST:PORT:AET, got {text!r}.")
        return cls(parts[0], int(parts[1]), parts[2])


def echo(target: CStoreTarget, timeout: float = 10.0) -> None:
    """C-ECHO: does the node answer and accept us (the panels' "Test connection")?

    Raises
    ------
    PacsError
        When the association is refused or the echo does not return Success.
    """
    from pynetdicom import AE

    ae = AE(ae_title=target.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    association = ae.associate(target.host, target.port, ae_title=target.called_ae_title)
    if not association.is_established:
        raise PacsError(
            f"association with {target.called_ae_title} at {target.host}:{target.port} "
            "was rejected or not answered."
        )
    try:
        status = association.send_c_echo()
    finally:
        association.release()
    if getattr(status, "Status", None) != 0x0000:
        raise PacsError(f"C-ECHO to {target.called_ae_title} did not succeed.")


def push_cstore(paths: list[Path], target: CStoreTarget, timeout: float = 30.0) -> None:
    """Store every file with C-STORE over one association.

    Raises
    ------
    PacsError
        When the association is refused or any store does not return Success (0x0000).
    """
    from pynetdicom import AE

    datasets = [pydicom.dcmread(path) for path in paths]
    ae = AE(ae_title=target.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(
            sop_class,
            [str(ds.file_meta.TransferSyntaxUID) for ds in datasets if str(ds.SOPClassUID) == sop_class][:1]
            + ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"],
        )
    association = ae.associate(target.host, target.port, ae_title=target.called_ae_title)
    if not association.is_established:
        raise PacsError(
            f"association with {target.called_ae_title} at {target.host}:{target.port} "
            "was rejected or not answered."
        )
    try:
        for path, dataset in zip(paths, datasets):
            status = association.send_c_store(dataset)
            code = getattr(status, "Status", None)
            if code != 0x0000:
                shown = "no response" if code is None else f"0x{code:04X}"
                raise PacsError(f"C-STORE of {Path(path).name} failed: status {shown}.")
            logger.info("Stored %s on %s.", Path(path).name, target.called_ae_title)
    finally:
        association.release()
