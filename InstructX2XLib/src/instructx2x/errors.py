"""One exception hierarchy for everything the library refuses or cannot finish.

Callers (the CLI, the worker, the Slicer and browser panels) catch ``InstructX2XError`` and
show its message; ``exit_code`` is the CLI's stable exit status for the family. A class
whose failure has a built-in kind also derives from that built-in (``ValueError``,
``FileNotFoundError``, ``FileExistsError``), so ``except`` clauses written for the built-ins
catch it too. Messages never carry patient attributes: they name files, never people.

``error_event`` turns any exception into the event the user sees (kind, message, exit
code), the same in the CLI, the worker and the browser panel.

Exit codes
----------
1  a defect in this software (``InternalError``)
2  bad input or parameters (``InputError``, ``ParameterError``)
3  the model cannot be loaded (``ModelLoadError``)
4  the machine could not finish: out of memory, disk full or read-only (``ResourceError``)
5  written, but the PACS refused the series (``PacsError``)
130 cancelled by the user (``EditCancelled``)
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

__all__ = [
    "InstructX2XError",
    "InputError",
    "InputNotFoundError",
    "ParameterError",
    "EmptyEditRegionError",
    "OutputExistsError",
    "ModelLoadError",
    "ResourceError",
    "PacsError",
    "EditCancelled",
    "InternalError",
    "ErrorEvent",
    "error_event",
]


class InstructX2XError(Exception):
    """Base class of every error the library raises on purpose."""

    exit_code = 2


class InputError(InstructX2XError, ValueError):
    """An input file (image, mask, job file) exists but cannot be used as it is."""


class InputNotFoundError(InputError, FileNotFoundError):
    """An input file or folder does not exist."""


class ParameterError(InstructX2XError, ValueError):
    """A setting is out of range, inconsistent with another, or with the input."""


class EmptyEditRegionError(ParameterError):
    """The edit mask is empty, so the edit would silently return the input."""


class OutputExistsError(InstructX2XError, FileExistsError):
    """The output folder exists (or appeared while working); it is never overwritten."""


class ModelLoadError(InstructX2XError, ValueError):
    """A model path exists but does not hold a usable InstructPix2Pix model."""

    exit_code = 3


class ResourceError(InstructX2XError):
    """The machine ran out of memory or disk, or the output file system refused a write."""

    exit_code = 4


class PacsError(InstructX2XError):
    """The PACS refused or did not answer; nothing is assumed stored."""

    exit_code = 5


class EditCancelled(InstructX2XError):
    """The caller cancelled the work; nothing was produced."""

    exit_code = 130


class InternalError(InstructX2XError):
    """A defect in this software (not the user's input): reported, never a bare traceback."""

    exit_code = 1


@dataclass(frozen=True)
class ErrorEvent:
    """What the user is told about a failure: the error's kind (a class name of this module
    for the library's own errors), its message and the CLI's exit status."""

    kind: str
    message: str
    exit_code: int

    def to_dict(self) -> dict:
        """The ``error`` event of the JSON-lines protocol (without a request id)."""
        return {"event": "error", **asdict(self)}


def error_event(error: BaseException) -> ErrorEvent:
    """The user-facing event for ``error``: the library's own errors as they are, running out
    of memory (host or GPU) as a ``ResourceError``, anything else as an ``InternalError``."""
    if isinstance(error, InstructX2XError):
        return ErrorEvent(type(error).__name__, str(error), error.exit_code)
    if isinstance(error, MemoryError):
        return _resource(
            "out of memory: use a smaller resolution, fewer images at once or a machine with more memory."
        )
    if _is_gpu_out_of_memory(error):
        return _resource(
            f"out of memory on the device ({_first_line(error)}): use a smaller resolution, "
            "fewer images at once or run on the CPU."
        )
    return ErrorEvent(
        InternalError.__name__,
        f"internal error, please report it ({type(error).__name__}: {_first_line(error)})",
        InternalError.exit_code,
    )


def _resource(message: str) -> ErrorEvent:
    return ErrorEvent(ResourceError.__name__, message, ResourceError.exit_code)


def _is_gpu_out_of_memory(error: BaseException) -> bool:
    """torch's out-of-memory error (looked up only if torch is loaded, so this module stays
    free of torch), or an allocator's RuntimeError that says so."""
    torch = sys.modules.get("torch")
    out_of_memory = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if isinstance(out_of_memory, type) and isinstance(error, out_of_memory):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def _first_line(error: BaseException) -> str:
    text = str(error)
    return text.splitlines()[0] if text else ""
