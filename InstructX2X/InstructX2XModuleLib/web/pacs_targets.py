"""The PACS a browser panel may send to: named by the server's operator, chosen by name.

A page never sends an address: it picks one of the names configured with ``--pacs
NAME=AET@HOST:PORT`` (repeatable) or a JSON file ``{"NAME": "AET@HOST:PORT", ...}``
(``--pacs-config``), so a client cannot make the server open a connection of its choosing or
push a study to a PACS the operator did not name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from instructx2x.dicom.pacs import CStoreTarget
from instructx2x.errors import ParameterError

__all__ = ["PacsTargets"]

_NAME = re.compile(r"^[\w .-]{1,40}$")
_TARGET = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:@]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})$")


class PacsTargets:
    """Named C-STORE targets.

    Parameters
    ----------
    targets: dict[str, CStoreTarget]
        Name -> target, in the order the page lists them.
    """

    def __init__(self, targets: dict[str, CStoreTarget]) -> None:
        self.targets = dict(targets)

    @property
    def names(self) -> list[str]:
        return list(self.targets)

    @property
    def default(self) -> str:
        """The first name, or "" when none is configured."""
        return next(iter(self.targets), "")

    def get(self, name: object) -> CStoreTarget:
        """The target of a name the page chose.

        Raises
        ------
        ParameterError
            When no target is configured, or the name is not one of them.
        """
        if not self.targets:
            raise ParameterError("this server names no PACS; start it with --pacs NAME=AET@HOST:PORT.")
        if not isinstance(name, str) or name not in self.targets:
            raise ParameterError("choose one of the PACS this server names.")
        return self.targets[name]

    @classmethod
    def from_arguments(cls, entries: list[str], config: str | None = None) -> PacsTargets:
        """From ``--pacs`` entries and an optional ``--pacs-config`` file.

        Raises
        ------
        ParameterError
            On an entry that does not read NAME=AET@HOST:PORT, a file that is not a JSON object
            of such targets, an invalid AE title, host or port, or a name given twice.
        """
        pairs: list[tuple[str, str]] = []
        if config:
            try:
                loaded = json.loads(Path(config).read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                raise ParameterError(
                    f"cannot read the PACS configuration {Path(config).name} "
                    f"({getattr(error, 'strerror', None) or type(error).__name__})."
                ) from None
            if not isinstance(loaded, dict) or not all(isinstance(v, str) for v in loaded.values()):
                raise ParameterError(f'{Path(config).name} must hold a JSON object of NAME: "AET@HOST:PORT".')
            pairs += list(loaded.items())
        for entry in entries:
            name, separator, target = entry.partition("=")
            if not separator:
                raise ParameterError(f"--pacs must read NAME=AET@HOST:PORT, got {entry!r}.")
            pairs.append((name, target))
        targets: dict[str, CStoreTarget] = {}
        for name, text in pairs:
            if not _NAME.match(name):
                raise ParameterError(
                    f"a PACS name has 1-40 letters, digits, spaces, '.', '_' or '-', got {name!r}."
                )
            if name in targets:
                raise ParameterError(f"the PACS name {name!r} is given twice.")
            match = _TARGET.match(text.strip())
            if not match:
                raise ParameterError(f"the PACS {name!r} must read AET@HOST:PORT, got {text!r}.")
            targets[name] = CStoreTarget(match["host"].strip("[]"), int(match["port"]), match["aet"])
        return cls(targets)
