"""Staging folders: where a result is written before it is renamed into place.

A staging folder is a hidden sibling of its target named ``.<name>.<pid>.<random>``
(``staging_prefix``), so that a writer killed in the middle (SIGKILL: no clean-up) leaves a
folder the next writer of the same target recognises and removes (``remove_stale_staging``).
Standard library only: the panels use it in Slicer's own Python.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["staging_prefix", "remove_stale_staging", "process_alive"]


def staging_prefix(target: Path) -> str:
    """The name a staging folder of ``target`` starts with (``tempfile.mkdtemp``'s prefix)."""
    return f".{Path(target).name}.{os.getpid()}."


def remove_stale_staging(target: Path) -> list[Path]:
    """Remove staging folders of ``target`` left by a process that no longer runs.

    A process killed with SIGKILL while it writes (the export's second or so) cannot clean
    up; its staging folder carries its PID (``.<name>.<pid>.<random>``), so the next writer
    of the same output, or a panel after killing its worker, removes it. Folders of live
    processes are left alone.

    Returns
    -------
    list[pathlib.Path]
        The folders removed.
    """
    target = Path(os.path.abspath(target))
    prefix = f".{target.name}."
    removed: list[Path] = []
    if not target.parent.is_dir():
        return removed
    for candidate in target.parent.iterdir():
        pid = candidate.name[len(prefix) :].split(".", 1)[0]
        if not (candidate.name.startswith(prefix) and pid.isdigit() and candidate.is_dir()):
            continue
        if int(pid) != os.getpid() and not process_alive(int(pid)):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
