"""Training pairs from a MIMIC-EDIT-INSTRUCTION folder, and their joint augmentation.

A pair is (past image, current image, instruction): the model learns to turn the past film
into the current one as the instruction says. Augmentation follows the authors' config
(rotation 2 degrees, crop, horizontal flip 0.5) applied with one draw to both images and any
mask, and it is laterality-aware: a flip also swaps "left" and "right" in the instruction,
since the patient's left moves to the other half of the film.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from instructx2x.guidance import resize_map
from instructx2x.instructions import swap_sides

from .train_config import ConfigError, DataConfig

__all__ = ["EditPairs", "augment_pair"]

COLUMNS = ["split", "past_dicom_id", "current_dicom_id", "instruction"]


class EditPairs:
    """The pairs of one split, loaded lazily; ``len`` and ``[i]`` like a torch Dataset.

    Raises
    ------
    ConfigError
        When the folder is not a finished dataset, its table has other columns, the split is
        empty, or images are missing (the message counts and names the first few).
    """

    def __init__(self, root: str | Path, split: str = "train", resolution: int | None = None) -> None:
        import pandas as pd

        self.root = Path(root)
        manifest_path = self.root / "manifest.json"
        table_path = self.root / "instructions.csv"
        if not manifest_path.is_file() or not table_path.is_file():
            raise ConfigError(
                f"{self.root.name} is not a MIMIC-EDIT-INSTRUCTION folder: it needs "
                "manifest.json and instructions.csv (instructx2x-train build-dataset)."
            )
        manifest = json.loads(manifest_path.read_text())
        if not manifest.get("complete"):
            raise ConfigError(f"{self.root.name}: the dataset build has not finished.")
        self.image_format = manifest.get("settings", {}).get("image_format", "jpg")
        table = pd.read_csv(table_path, dtype=str)
        if list(table.columns) != COLUMNS:
            raise ConfigError(f"{table_path.name} has columns {list(table.columns)}; expected {COLUMNS}.")
        table = table[table.split == split].reset_index(drop=True)
        if table.empty:
            raise ConfigError(f"{self.root.name} has no pairs in split {split!r}.")
        missing = [
            p
            for row in table.itertuples()
            for p in (self._path("past", row.past_dicom_id), self._path("current", row.current_dicom_id))
            if not p.is_file()
        ]
        if missing:
            raise ConfigError(
                f"{self.root.name}: {len(missing)} image(s) missing, e.g. "
                f"{', '.join(str(p.relative_to(self.root)) for p in missing[:3])}."
            )
        self.table = table
        self.resolution = resolution

    def _path(self, kind: str, dicom_id: str) -> Path:
        return self.root / kind / f"{dicom_id}.{self.image_format}"

    def __len__(self) -> int:
        return len(self.table)

    def paths(self, index: int) -> tuple[Path, Path]:
        """The past and current image files of pair ``index``."""
        row = self.table.iloc[index]
        return self._path("past", row.past_dicom_id), self._path("current", row.current_dicom_id)

    def _masks_paths(self, index: int) -> list[Path]:
        return [path.with_name(f"{path.stem}.masks.npz") for path in self.paths(index)]

    def require_masks(self) -> None:
        """Refuse, before training, a dataset without ground-truth masks beside every image.

        Raises
        ------
        ConfigError
            Counting the missing files and naming the first few.
        """
        missing = [p for index in range(len(self)) for p in self._masks_paths(index) if not p.is_file()]
        if missing:
            raise ConfigError(
                f"{self.root.name}: {len(missing)} masks file(s) missing, e.g. "
                f"{', '.join(str(p.relative_to(self.root)) for p in missing[:3])}; "
                "optim.change_region_weight and mirror_region_weight need a .masks.npz beside every image "
                "(instructx2x-train pure-pairs writes them)."
            )

    def change_region(self, index: int, shape: tuple[int, int]) -> torch.Tensor:
        """``(1, *shape)`` bool: where pair ``index``'s ground-truth masks say its films differ,
        on the grid of its loaded images (``shape``).

        A finding counts when its mask is not the same in both films; a finding present alike
        in both (a second, unchanged finding) does not.
        """
        stored = []
        for masks_path in self._masks_paths(index):
            with np.load(masks_path) as masks:
                stored.append({name: masks[name].astype(bool) for name in masks.files})
        past, current = stored
        changed = [
            mask
            for name in set(past) | set(current)
            if not _same(past.get(name), current.get(name))
            for mask in (past.get(name), current.get(name))
            if mask is not None
        ]
        if not changed:
            return torch.zeros((1, *shape), dtype=torch.bool)
        region = torch.from_numpy(np.logical_or.reduce(changed))[None, None].float()
        return resize_map(region, shape, mode="nearest")[0] > 0.5

    def __getitem__(self, index: int) -> dict:
        past, current = self.paths(index)
        return {
            "past": self._load(past),
            "current": self._load(current),
            "instruction": self.table.iloc[index].instruction,
        }

    def _load(self, path: Path) -> torch.Tensor:
        with Image.open(path) as image:
            array = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array)[None]
        if self.resolution is not None and min(tensor.shape[-2:]) < self.resolution:
            tensor = F.interpolate(
                tensor[None], size=(self.resolution,) * 2, mode="bilinear", align_corners=False
            )[0]
        return tensor


def _same(before: np.ndarray | None, after: np.ndarray | None) -> bool:
    """Whether a finding's mask is present and equal in both films (an unchanged finding)."""
    return before is not None and after is not None and np.array_equal(before, after)


def augment_pair(
    past: torch.Tensor,
    current: torch.Tensor,
    instruction: str,
    config: DataConfig,
    generator: torch.Generator,
    masks: torch.Tensor | None = None,
):
    """One random rotation, crop and flip, the same for both images (and masks).

    Parameters
    ----------
    past, current: torch.Tensor
        ``(1, H, W)`` images in [0, 1] of the same size, at least ``config.resolution``.
    instruction: str
        Swapped to the other side when the pair is flipped.
    config: DataConfig
        ``rotation_degrees``, ``resolution`` (the crop), ``flip_probability``.
    generator: torch.Generator
        The only source of randomness (checkpointed with the run).
    masks: torch.Tensor | None
        ``(K, H, W)`` masks that follow the images (nearest-neighbour rotation).

    Returns
    -------
    tuple
        ``(past, current, instruction, masks, flipped)``.
    """
    angle, top_fraction, left_fraction, flip = torch.rand(4, generator=generator).tolist()
    angle = (2 * angle - 1) * config.rotation_degrees
    stack = torch.cat([past, current])
    if angle:
        stack = _rotate(stack, angle, "bilinear")
        masks = None if masks is None else _rotate(masks.float(), angle, "nearest") > 0.5
    height, width = stack.shape[-2:]
    size = config.resolution
    if height < size or width < size:
        raise ValueError(f"images of {height}x{width} are smaller than the crop {size}.")
    top, left = int(top_fraction * (height - size + 1)), int(left_fraction * (width - size + 1))
    stack = stack[:, top : top + size, left : left + size]
    masks = None if masks is None else masks[:, top : top + size, left : left + size]
    flipped = flip < config.flip_probability
    if flipped:
        stack = stack.flip(-1)
        masks = None if masks is None else masks.flip(-1)
        instruction = swap_sides(instruction)
    return stack[:1], stack[1:], instruction, masks, flipped


def _rotate(images: torch.Tensor, degrees: float, mode: str) -> torch.Tensor:
    """Rotate ``(C, H, W)`` about the centre; corners filled with 0 (air)."""
    radians = math.radians(degrees)
    cos, sin = math.cos(radians), math.sin(radians)
    height, width = images.shape[-2:]
    aspect = width / height
    theta = torch.tensor([[cos, -sin / aspect, 0.0], [sin * aspect, cos, 0.0]], dtype=torch.float32)
    grid = F.affine_grid(theta[None], [1, images.shape[0], height, width], align_corners=False)
    return F.grid_sample(images[None].float(), grid, mode=mode, padding_mode="zeros", align_corners=False)[0]
