"""Write an edit's files all at once: a temporary folder, then one rename.

A run that fails or is cancelled leaves nothing behind, and an existing output folder is
never overwritten.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from .editor import EditResult
from .image_io import Radiograph
from .overlay import guidance_overlay

__all__ = ["atomic_output_dir", "write_png_result", "UNTRAINED_NOTICE"]

UNTRAINED_NOTICE = ("UNTRAINED MODEL: random weights, for testing the software only; "
                    "this image shows no real edit.")


@contextlib.contextmanager
def atomic_output_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder that becomes ``target`` only if the block succeeds.

    Raises
    ------
    FileExistsError
        When ``target`` already exists (checked before and after the work).
    """
    target = Path(target)
    if target.exists():
        raise FileExistsError(f"output folder {target} already exists; choose a new one.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        if target.exists():
            raise FileExistsError(f"output folder {target} appeared while working; nothing written.")
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _save_gray(array: np.ndarray, bits: int, path: Path) -> None:
    if bits > 8:
        Image.fromarray((np.clip(array, 0, 1) * 65535).round().astype(np.uint16)).save(path)
    else:
        Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)).save(path)


def write_png_result(directory: Path, image: Radiograph, result: EditResult) -> list[Path]:
    """Write the edit as PNGs plus ``manifest.json`` into ``directory``.

    Files: ``edited.png`` (the input's bit depth; absent for a preview), ``guidance.png``
    (the map, 8-bit), ``guidance_overlay.png`` (RGB), ``edit_mask.png`` (0/255) and
    ``manifest.json``.
    """
    images = ["guidance.png", "guidance_overlay.png", "edit_mask.png"]
    if result.edited is not None:
        _save_gray(result.edited, image.bits, directory / "edited.png")
        images.insert(0, "edited.png")
    _save_gray(result.guidance_map, 8, directory / "guidance.png")
    overlay = guidance_overlay(image.pixels, result.guidance_map, result.edit_mask)
    Image.fromarray(overlay).save(directory / "guidance_overlay.png")
    Image.fromarray(result.edit_mask.astype(np.uint8) * 255).save(directory / "edit_mask.png")
    manifest = dict(result.manifest)
    if result.untrained:
        manifest["notice"] = UNTRAINED_NOTICE
    manifest["files"] = images
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return [directory / name for name in [*images, "manifest.json"]]
