"""One exception hierarchy for everything the library refuses or cannot finish.

Callers (the CLI, the worker, the Slicer and browser panels) catch ``InstructX2XError`` and
show its message; ``exit_code`` is the CLI's stable exit status for the family. A class
whose failure has a built-in kind also derives from that built-in (``ValueError``,
``FileNotFoundError``, ``FileExistsError``), so ``except`` clauses written for the built-ins
catch it too. Messages never carry patient attributes: they name files, never people.

Exit codes
----------
2  bad input or parameters (``InputError``, ``ParameterError``)
3  the model cannot be loaded (``ModelLoadError``)
4  the machine could not finish: out of memory, disk full or read-only (``ResourceError``)
5  written, but the PACS refused the series (``PacsError``)
130 cancelled by the user (``EditCancelled``)
"""

from __future__ import annotations

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
