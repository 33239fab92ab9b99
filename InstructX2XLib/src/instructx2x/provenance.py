"""Manifests as strict JSON, and the reader of the provenance stored in our DICOM objects.

Light on purpose (no torch, no highdicom): a panel or a PACS-side script reads provenance
without loading the model stack.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import InputError

__all__ = ["to_json", "read_provenance", "PRIVATE_CREATOR", "PRIVATE_GROUP", "PROVENANCE_ELEMENT"]

PRIVATE_CREATOR = "INSTRUCTX2X"
PRIVATE_GROUP = 0x0071
PROVENANCE_ELEMENT = 0x01


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
