"""Manifests as strict JSON, and the reader of the provenance stored in our DICOM objects.

Light on purpose (no torch, no highdicom): a panel or a PACS-side script reads provenance
without loading the model stack.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import InputError

__all__ = [
    "to_json",
    "read_provenance",
    "source_label",
    "PRIVATE_CREATOR",
    "PRIVATE_GROUP",
    "PROVENANCE_ELEMENT",
]

PRIVATE_CREATOR = "INSTRUCTX2X"
PRIVATE_GROUP = 0x0071
PROVENANCE_ELEMENT = 0x01
SOURCE_LABEL_HEX = 12


def source_label(sha256: str) -> str:
    """The input's name in manifests: ``source-`` and the first 12 hex digits of its SHA-256.

    A file name may be a patient's name ("patient_smith.dcm"), so manifests and the objects
    written from them never record it; the label tells inputs apart and is matched to a file
    by hashing the file.

    Parameters
    ----------
    sha256: str
        Hex digest of the input file's bytes.

    Raises
    ------
    ValueError
        When ``sha256`` is not 64 hex digits.
    """
    digest = str(sha256).lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"sha256 must be 64 hex digits, got {len(digest)} characters.")
    return f"source-{digest[:SOURCE_LABEL_HEX]}"


def _strict(value: Any) -> Any:
    """JSON-ready copy: non-finite floats become strings, other objects their str()."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # "inf", "-inf", "nan"
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return _strict(value.item())
    return str(value)


def to_json(data: Any, *, indent: int | None = 2, sort_keys: bool = False) -> str:
    """Strict JSON (RFC 8259): no NaN or Infinity tokens, which strict parsers reject.

    A scheduler config holds ``-inf`` (DPM-Solver's ``lambda_min_clipped``); it is written as
    the string ``"-inf"``.
    """
    return json.dumps(_strict(data), indent=indent, sort_keys=sort_keys, allow_nan=False)


def read_provenance(dataset) -> dict:
    """The provenance manifest stored in an object written by ``instructx2x.dicom.write``.

    Parameters
    ----------
    dataset: pydicom.Dataset
        A counterfactual, overlay or SEG object.

    Raises
    ------
    InputError
        When the dataset has no InstructX2X provenance block.
    """
    try:
        block = dataset.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        return json.loads(block[PROVENANCE_ELEMENT].value)
    except KeyError as error:
        raise InputError("the dataset carries no InstructX2X provenance.") from error
