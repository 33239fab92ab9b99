"""Install a model folder under the user's models folder, checked by its folder digest.

Qt-free and torch-free (standard library and ``instructx2x.model_digest``), so the Slicer
panel installs a model without loading it; the worker checks that it loads when it loads it.

The rules:

* The source must be a diffusers model folder (``unet/``, ``vae/``, ``text_encoder/``).
* Its folder digest (``instructx2x.model_digest``: every file, configs, scheduler, tokenizer
  and card included) must equal the digest its ``model.sha256`` pins. A folder without
  ``model.sha256`` is refused with ``UnpinnedModelError``, which carries the digest: the
  caller shows it to the user, and installs only with ``confirmed_digest`` set to it once
  the user has checked it against what the model's publisher gave.
* A model of the same name already installed is kept: the same digest is reported as
  already installed, a different one refused.
* The copy goes to a staging folder beside the target, is checked again (so a source that
  changed while it was read is caught) and is then renamed into place in one step. On any
  failure the staging folder is removed, and a models folder this call created is removed
  again: nothing partial is ever left or seen.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

from instructx2x.errors import ModelLoadError, OutputExistsError, ResourceError
from instructx2x.model_digest import CHECKSUM_NAME, folder_digest, folder_files, read_checksum

__all__ = ["Installed", "UnpinnedModelError", "install_model", "MODEL_FOLDERS"]

# the sub-folders instructx2x.loading needs in a diffusers model folder (its COMPONENTS)
MODEL_FOLDERS = ("unet", "vae", "text_encoder")


@dataclasses.dataclass(frozen=True)
class Installed:
    """Where the model is, its folder digest, and whether it was there already."""

    path: Path
    digest: str
    already_installed: bool


class UnpinnedModelError(ModelLoadError):
    """The folder has no ``model.sha256``: ``digest`` is what the user must confirm."""

    def __init__(self, name: str, digest: str) -> None:
        super().__init__(
            f"{name} has no {CHECKSUM_NAME}, so nothing says it is the model its publisher "
            f"released. Its folder SHA-256 is {digest}: install it only if the publisher "
            "gives this digest."
        )
        self.digest = digest


def install_model(
    source: str | Path, models_root: str | Path, confirmed_digest: str | None = None
) -> Installed:
    """Copy the model folder ``source`` to ``models_root/<its name>`` once it is checked.

    Parameters
    ----------
    source: str | pathlib.Path
        The model folder to install.
    models_root: str | pathlib.Path
        The folder installed models live in (made when missing).
    confirmed_digest: str | None
        The folder digest the user accepted for a folder without ``model.sha256``
        (``UnpinnedModelError.digest``); None otherwise.

    Returns
    -------
    Installed
        The installed folder, its digest, and ``already_installed`` when the same model was
        there before (nothing copied).

    Raises
    ------
    UnpinnedModelError
        The folder has no ``model.sha256`` and no ``confirmed_digest`` was given.
    ModelLoadError
        ``source`` is not a model folder; its ``model.sha256`` is malformed or disagrees with
        ``confirmed_digest``; its files do not match the expected digest (before or after the
        copy).
    OutputExistsError
        A different model is installed under the same name.
    ResourceError
        The models folder's disk has too little room, or copying failed.
    """
    source = Path(source).expanduser().resolve()
    if not source.is_dir():
        raise ModelLoadError(f"{source} is not a folder.")
    missing = [name for name in MODEL_FOLDERS if not (source / name).is_dir()]
    if missing:
        raise ModelLoadError(
            f"{source.name} is not an InstructX2X model folder: it has no "
            f"{', '.join(name + '/' for name in missing)}."
        )
    pinned = read_checksum(source)
    confirmed = None if confirmed_digest is None else confirmed_digest.strip().lower()
    if pinned is not None and confirmed is not None and pinned != confirmed:
        raise ModelLoadError(f"{source.name}/{CHECKSUM_NAME} pins {pinned}, not the confirmed {confirmed}.")
    expected = pinned if pinned is not None else confirmed
    if expected is None:
        raise UnpinnedModelError(source.name, folder_digest(source))
    against = f"its {CHECKSUM_NAME}" if pinned else "the confirmed digest"
    _check_digest(source, expected, f"{source.name} do not match {against}")
    target = Path(models_root).expanduser() / source.name
    if os.path.lexists(target):
        return _existing(target, expected)
    files = folder_files(source) + ([(CHECKSUM_NAME, source / CHECKSUM_NAME)] if pinned else [])
    _check_room(Path(models_root).expanduser(), sum(path.stat().st_size for _, path in files))
    created = _make_folders(target.parent)
    staging = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{source.name}.", suffix=".staging", dir=target.parent))
        _copy(files, staging)
        _check_digest(
            staging,
            expected,
            f"{source.name} do not match {against} once copied (the folder changed while it was read)",
        )
        os.rename(staging, target)
    except OSError as error:
        if staging is not None and os.path.lexists(target) and staging.exists():
            shutil.rmtree(staging)
            return _existing(target, expected)  # installed by someone else meanwhile
        _undo(staging, created)
        raise ResourceError(f"installing {source.name} failed: {error}; nothing was installed.") from None
    except BaseException:
        _undo(staging, created)
        raise
    return Installed(target, expected, already_installed=False)


def _check_digest(folder: Path, expected: str, mismatch: str) -> None:
    found = folder_digest(folder)
    if found != expected:
        raise ModelLoadError(
            f"the files of {mismatch}: expected folder SHA-256 {expected}, found {found}. "
            "The copy is damaged or not the released model; nothing was installed."
        )


def _existing(target: Path, expected: str) -> Installed:
    try:
        same = target.is_dir() and not target.is_symlink() and folder_digest(target) == expected
    except (ModelLoadError, OSError):
        same = False
    if not same:
        raise OutputExistsError(
            f"{target} already holds a different model; remove it or rename the folder to install this one."
        )
    return Installed(target, expected, already_installed=True)


def _check_room(models_root: Path, needed: int) -> None:
    existing = models_root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise ResourceError(
            f"the model needs {needed / 2**20:.0f} MiB and {existing} has "
            f"{free / 2**20:.0f} MiB free; nothing was installed."
        )


def _make_folders(folder: Path) -> list[Path]:
    """Make ``folder`` and its missing parents; returns those made, deepest first."""
    made = []
    while not folder.exists():
        made.append(folder)
        folder = folder.parent
    for path in reversed(made):
        path.mkdir()
    return made


def _copy(files: list[tuple[str, Path]], staging: Path) -> None:
    for relative, path in files:
        destination = staging / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)


def _undo(staging: Path | None, created: list[Path]) -> None:
    if staging is not None:
        shutil.rmtree(staging, ignore_errors=True)
    for folder in created:
        try:
            folder.rmdir()
        except OSError:  # something else was put there meanwhile: not ours to remove
            break
