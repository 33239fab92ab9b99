"""What the page says when an action fails: the specific message, never a traceback."""

from __future__ import annotations

import logging

from instructx2x.errors import InternalError, error_event

from ..worker import WorkerError

__all__ = ["message", "logger"]

logger = logging.getLogger("instructx2x.web")


def message(error: Exception) -> str:
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
