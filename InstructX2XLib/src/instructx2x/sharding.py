"""Work shared over the processes of ``accelerate launch``, recorded so that a rerun resumes.

One process (a plain command) is a shard of one. Under ``accelerate launch`` every process
takes every ``count``-th item from its ``index`` (``Shard.mine``), appends one JSON line per
finished item to its own record file (``open_record``: ``<name>.rank<index>.jsonl``), and the
main process reads all of them back (``read_records``) once every process is done
(``Shard.wait``). A line cut short by an interruption is ignored, so that item runs again.
``instructx2x edit --jobs``, ``instructx2x-train evaluate`` and ``stress-test`` share items this way.

Their output folder holds ``INCOMPLETE`` and the run's settings until the run ends; a rerun with
the same settings resumes it (``open_run_folder``), one with other settings is refused with the
settings that differ (``changed_settings``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

from .errors import OutputExistsError
from .provenance import to_json

__all__ = [
    "INCOMPLETE",
    "RECORDS",
    "Shard",
    "current_shard",
    "open_record",
    "read_records",
    "changed_settings",
    "open_run_folder",
]

INCOMPLETE = "INCOMPLETE"  # in a run's folder until its results are written
RECORDS = "records"  # the folder of the processes' record files

Item = TypeVar("Item")


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's place among the processes sharing the work.

    Attributes
    ----------
    index, count: int
        This process's rank and the number of processes (0 and 1 for a plain command).
    device: str
        Where this process should run the model: ``auto`` for a plain command, else the
        device ``accelerate`` gave it (``cpu``, ``cuda:N``).
    """

    index: int = 0
    count: int = 1
    device: str = "auto"
    state: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def is_main(self) -> bool:
        """The process that prepares shared folders and assembles the results."""
        return self.index == 0

    def mine(self, items: Sequence[Item]) -> list[Item]:
        """This process's share: every ``count``-th item from ``index`` (order kept)."""
        return list(items[self.index :: self.count])

    def wait(self) -> None:
        """Return once every process has reached this point (at once for one process)."""
        if self.state is not None and self.count > 1:
            self.state.wait_for_everyone()


def current_shard() -> Shard:
    """This process's shard: from ``accelerate``'s process state under ``accelerate launch``,
    else a shard of one.

    ``accelerate launch`` on CPUs sets ``ACCELERATE_USE_CPU``; without passing it on (as
    ``Accelerator`` does) every process would take itself for the only one.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if state.num_processes == 1:
        return Shard(state=state)
    device = "cpu" if state.device.type == "cpu" else str(state.device)
    return Shard(state.process_index, state.num_processes, device, state)


def open_record(folder: Path, name: str, shard: Shard) -> IO[str]:
    """Open this process's record file ``folder/<name>.rank<index>.jsonl`` for appending.

    A last line an interruption cut short is closed first; ``read_records`` skips it and its
    item runs again. Write one ``json.dumps(...) + "\\n"`` per item and flush after each.
    """
    path = folder / f"{name}.rank{shard.index}.jsonl"
    with path.open("a+b") as sink:
        if sink.tell():  # appending: the position is the end
            sink.seek(-1, 2)
            if sink.read(1) != b"\n":
                sink.write(b"\n")
    return path.open("a", encoding="utf-8")


def read_records(folder: Path, name: str, key: str) -> dict[Any, dict]:
    """Every complete line of every process's ``<name>.rank*.jsonl`` in ``folder``, by ``key``."""
    records = {}
    for path in sorted(folder.glob(f"{name}.rank*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                item = json.loads(line)
            except json.JSONDecodeError:  # a line cut by an interruption: that item runs again
                continue
            records[item[key]] = item
    return records


def changed_settings(stored: dict, current: dict) -> list[str]:
    """The top-level settings whose values differ between a stored run and this one, sorted."""
    return sorted(key for key in stored.keys() | current.keys() if stored.get(key) != current.get(key))


def open_run_folder(output: Path, settings_file: str, settings: dict, run: str) -> bool:
    """Create a resumable run's folder (``records/``, ``INCOMPLETE`` and ``settings`` as
    ``settings_file``), or accept an unfinished ``run`` there with the same settings; True when
    it resumes one.

    Raises
    ------
    OutputExistsError
        When ``output`` exists and is not an unfinished ``run``, or holds one with other
        settings (they are named).
    """
    current = json.loads(to_json(settings))
    stored = output / settings_file
    if output.exists():
        if not (output / INCOMPLETE).exists():
            raise OutputExistsError(
                f"output folder {output.name} already exists and is not an unfinished {run} to resume; "
                "choose a new one."
            )
        previous = json.loads(stored.read_text(encoding="utf-8")) if stored.is_file() else {}
        if previous != current:
            raise OutputExistsError(
                f"output folder {output.name} holds an unfinished {run} with other settings "
                f"({', '.join(changed_settings(previous, current))}); resume it with the same settings "
                "or choose a new folder."
            )
        return True
    (output / RECORDS).mkdir(parents=True)
    (output / INCOMPLETE).write_text(f"{run} running or interrupted: rerun the same command to resume\n")
    stored.write_text(to_json(settings) + "\n", encoding="utf-8")
    return False
