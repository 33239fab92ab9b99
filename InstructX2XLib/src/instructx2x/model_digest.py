"""A model folder's SHA-256: one digest over every file in it, the one ``model.sha256`` pins.

Standard library only, so a panel can check a folder without torch. The digest is the SHA-256
of the folder's manifest: one line ``<file SHA-256>  <relative path>`` per file, in the
byte order of the paths (POSIX separators), the folder's own top-level ``model.sha256``
left out. That is what ``sha256sum`` prints, so a publisher can reproduce it without this
package::

    cd MODEL && find . -type f ! -path ./model.sha256 | sed 's|^\\./||' | LC_ALL=C sort \\
        | xargs -d '\\n' sha256sum | sha256sum

(``instructx2x info MODEL`` prints it as ``folder_sha256``.) Weights, configs, scheduler,
tokenizer and card are all covered: a changed tokenizer or card is a different model. A
linked file counts with the bytes it leads to; a link to a folder, a special file, or a
name with a newline, carriage return or backslash is refused.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from .errors import ModelLoadError

__all__ = ["CHECKSUM_NAME", "folder_files", "folder_digest", "file_sha256", "read_checksum"]

CHECKSUM_NAME = "model.sha256"
_DIGEST = re.compile(r"[0-9a-f]{64}")
_BLOCK = 1 << 20
_CHECKSUM_MAX_BYTES = 4096  # a digest and a file name; more is not a checksum file


def file_sha256(path: Path) -> str:
    """SHA-256 of one file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_files(folder: Path) -> list[tuple[str, Path]]:
    """Every file the digest covers: ``(relative POSIX path, path)`` in the digest's order.

    Parameters
    ----------
    folder: pathlib.Path
        The model folder.

    Returns
    -------
    list[tuple[str, pathlib.Path]]
        Sorted by the UTF-8 bytes of the relative path; the top-level ``model.sha256`` is not
        among them.

    Raises
    ------
    ModelLoadError
        When the folder holds a link to a folder, a broken link, a special file (FIFO, socket,
        device) or a name with a newline, carriage return or backslash.
    """
    found: list[tuple[str, Path]] = []
    pending = [(Path(folder), "")]
    while pending:
        directory, prefix = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                relative = prefix + entry.name
                if any(character in entry.name for character in "\n\r\\"):
                    raise ModelLoadError(
                        f"{relative!r} in {Path(folder).name}: file names with a newline, "
                        "carriage return or backslash are not supported in a model folder."
                    )
                path = Path(entry.path)
                if entry.is_dir(follow_symlinks=False):
                    pending.append((path, relative + "/"))
                elif entry.is_symlink() and path.is_dir():
                    raise ModelLoadError(
                        f"{relative} in {Path(folder).name} is a link to a folder; a model "
                        "folder holds its files and sub-folders themselves."
                    )
                elif entry.is_file():
                    if relative != CHECKSUM_NAME:
                        found.append((relative, path))
                else:
                    raise ModelLoadError(
                        f"{relative} in {Path(folder).name} is not a regular file (a broken "
                        "link, FIFO, socket or device)."
                    )
    return sorted(found, key=lambda item: os.fsencode(item[0]))


def folder_digest(folder: str | Path) -> str:
    """The folder's SHA-256 (module docstring: the manifest of every file but ``model.sha256``).

    Raises
    ------
    ModelLoadError
        When ``folder`` is not a folder, or holds what ``folder_files`` refuses.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is not a folder.")
    manifest = hashlib.sha256()
    for relative, path in folder_files(folder):
        manifest.update(f"{file_sha256(path)}  ".encode() + os.fsencode(relative) + b"\n")
    return manifest.hexdigest()


def read_checksum(folder: str | Path) -> str | None:
    """The digest the folder's ``model.sha256`` pins, or None when it has none.

    The file's first word is the digest (64 hexadecimal digits, either case); whatever
    follows it (``sha256sum``'s file name column) is ignored.

    Raises
    ------
    ModelLoadError
        When ``model.sha256`` exists but does not start with a SHA-256.
    """
    path = Path(folder) / CHECKSUM_NAME
    if not os.path.lexists(path):
        return None
    if not path.is_file():
        raise ModelLoadError(f"{Path(folder).name}/{CHECKSUM_NAME} is not a file.")
    with open(path, "rb") as handle:
        text = handle.read(_CHECKSUM_MAX_BYTES + 1)
    words = text.decode("ascii", errors="replace").split() if len(text) <= _CHECKSUM_MAX_BYTES else []
    if not words or not _DIGEST.fullmatch(words[0].lower()):
        raise ModelLoadError(
            f"{Path(folder).name}/{CHECKSUM_NAME} does not start with a SHA-256 (64 "
            "hexadecimal digits); `instructx2x info` prints the folder's digest as "
            "folder_sha256."
        )
    return words[0].lower()
