"""Anatomical pseudo masks (docs/method.md section 3): where each finding may appear on a PA film.

A prior set is a directory with ``priors.json`` and one 512x512 PNG per MS-CXR category
(0 = outside, any other value = inside). The package ships an approximate set built without
MS-CXR; the training package rebuilds the exact set from MS-CXR in the same format, and
``PriorSet.from_directory`` loads either.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError, InputNotFoundError
from .instructions import FINDING_TO_PRIOR, PRIOR_CATEGORIES, Laterality, ParsedInstruction

__all__ = [
    "PRIOR_SIZE",
    "PUBLISHED_MASK_EXTENTS",
    "PriorSet",
    "PriorSelection",
    "approximate_prior",
    "category_file_name",
    "write_prior_set",
]

logger = logging.getLogger(__name__)

PRIOR_SIZE = 512
MANIFEST_NAME = "priors.json"
DEFAULT_PRIOR_DIR = "approx-v1"

# Coverage (fraction of the 512x512 image) and extents (inclusive rows, inclusive columns)
# of the authors' published masks.
PUBLISHED_MASK_EXTENTS: dict[str, tuple[float, tuple[int, int], tuple[int, int]]] = {
    "Atelectasis": (0.670, (31, 471), (12, 511)),
    "Cardiomegaly": (0.588, (143, 511), (61, 511)),
    "Consolidation": (0.826, (14, 494), (0, 511)),
    "Edema": (0.793, (44, 480), (5, 511)),
    "Pleural Effusion": (0.722, (37, 509), (3, 511)),
    "Lung Opacity": (0.770, (21, 480), (8, 499)),
    "Pneumonia": (0.770, (24, 510), (0, 509)),
    "Pneumothorax": (0.822, (1, 510), (4, 495)),
}

# Categories that straddle the midline: a side named in the instruction does not narrow them.
_MIDLINE_CATEGORIES = frozenset({"Cardiomegaly"})


def category_file_name(category: str) -> str:
    """File name of a category's mask, e.g. 'pleural_effusion.png'."""
    if category not in PRIOR_CATEGORIES:
        raise ValueError(f"unknown prior category {category!r}; known: {', '.join(PRIOR_CATEGORIES)}.")
    return category.lower().replace(" ", "_") + ".png"


def _superellipse_fraction(exponent: float) -> float:
    """Area of |x|^p + |y|^p <= 1 as a fraction of its bounding box."""
    return math.gamma(1 + 1 / exponent) ** 2 / math.gamma(1 + 2 / exponent)


def approximate_prior(
    coverage: float, rows: tuple[int, int], cols: tuple[int, int], size: int = PRIOR_SIZE
) -> np.ndarray:
    """A mask with the published extent and (approximately) the published coverage.

    The union of MS-CXR boxes is a rounded blob; a superellipse inscribed in the published
    bounding box, its exponent chosen by bisection so that its area matches the published
    coverage, reproduces both numbers without the credentialed boxes. Where even the full
    box is smaller than the coverage, the box itself is returned.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of shape ``(size, size)`` with values in {0, 1}.
    """
    height, width = rows[1] - rows[0] + 1, cols[1] - cols[0] + 1
    target = coverage * size * size / (height * width)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    inside_box = (yy >= rows[0]) & (yy <= rows[1]) & (xx >= cols[0]) & (xx <= cols[1])
    if target >= 1.0:
        return inside_box.astype(np.uint8)
    low, high = 0.5, 64.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if _superellipse_fraction(mid) < target else (low, mid)
    exponent = (low + high) / 2
    cy, cx = (rows[0] + rows[1]) / 2, (cols[0] + cols[1]) / 2
    ry, rx = height / 2, width / 2
    inside = np.abs((yy - cy) / ry) ** exponent + np.abs((xx - cx) / rx) ** exponent <= 1.0
    return (inside & inside_box).astype(np.uint8)


def write_prior_set(directory: Path, masks: dict[str, np.ndarray], *, version: str, source: str) -> Path:
    """Write a prior set in the format ``PriorSet.from_directory`` reads.

    Parameters
    ----------
    directory: pathlib.Path
        Target directory; created if needed. Existing prior files are never overwritten.
    masks: dict[str, numpy.ndarray]
        One ``(512, 512)`` array in {0, 1} per category (all eight).
    version: str
        Version string recorded in results that use the set.
    source: str
        How the masks were made (recorded in ``priors.json``).

    Raises
    ------
    ValueError
        When a category is missing or unknown, or a mask has the wrong shape or values.
    FileExistsError
        When the directory already holds a prior set.
    """
    if set(masks) != set(PRIOR_CATEGORIES):
        raise ValueError(f"masks must cover exactly the categories {PRIOR_CATEGORIES}, got {sorted(masks)}.")
    for category, mask in masks.items():
        _check_mask(np.asarray(mask), category)
    directory = Path(directory)
    if (directory / MANIFEST_NAME).exists():
        raise FileExistsError(f"{directory} already holds a prior set; choose an empty directory.")
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for category in PRIOR_CATEGORIES:
        name = category_file_name(category)
        Image.fromarray((np.asarray(masks[category]) > 0).astype(np.uint8) * 255).save(directory / name)
        files[category] = name
    manifest = {
        "format": "instructx2x-priors/1",
        "version": version,
        "source": source,
        "size": [PRIOR_SIZE, PRIOR_SIZE],
        "files": files,
    }
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


def _check_mask(mask: np.ndarray, category: str) -> None:
    if mask.shape != (PRIOR_SIZE, PRIOR_SIZE):
        raise ValueError(
            f"prior mask {category!r} has shape {mask.shape}, expected ({PRIOR_SIZE}, {PRIOR_SIZE})."
        )
    if not np.isin(np.unique(mask), (0, 1, 255)).all():
        raise ValueError(f"prior mask {category!r} must be binary (0 and 1, or 0 and 255).")


@dataclasses.dataclass(frozen=True)
class PriorSelection:
    """The prior that an edit actually used, and why.

    Attributes
    ----------
    mask: numpy.ndarray
        float32 ``(512, 512)`` in {0, 1}.
    categories: tuple[str, ...]
        Categories whose masks form the union (empty for the full image).
    full_image: bool
        True when no category applied and the whole image is allowed.
    reason: str
        One sentence a user can read, e.g. "no finding of the instruction has a prior".
    version: str
        The prior set's version.
    laterality: str | None
        The side the masks were narrowed to, if any.
    """

    mask: np.ndarray
    categories: tuple[str, ...]
    full_image: bool
    reason: str
    version: str
    laterality: str | None = None

    def to_dict(self) -> dict:
        """JSON-ready description (without the mask itself)."""
        return {
            "categories": list(self.categories),
            "full_image": self.full_image,
            "reason": self.reason,
            "version": self.version,
            "laterality": self.laterality,
        }


class PriorSet:
    """The eight anatomical pseudo masks, loaded once.

    Parameters
    ----------
    masks: dict[str, numpy.ndarray]
        Category -> ``(512, 512)`` binary mask.
    version: str
        Recorded in every result that uses the set.
    source: str
        Where the masks came from.
    """

    def __init__(self, masks: dict[str, np.ndarray], version: str, source: str) -> None:
        for category, mask in masks.items():
            if category not in PRIOR_CATEGORIES:
                raise ValueError(f"unknown prior category {category!r}.")
            _check_mask(mask, category)
        self.masks = {c: (np.asarray(m) > 0).astype(np.float32) for c, m in masks.items()}
        self.version = version
        self.source = source

    def __repr__(self) -> str:
        return f"PriorSet(version={self.version!r}, categories={len(self.masks)})"

    @classmethod
    def from_directory(cls, directory: str | Path) -> PriorSet:
        """Load a prior set written by ``write_prior_set`` (or the training package).

        Raises
        ------
        InputNotFoundError
            When ``priors.json`` or a mask file is missing.
        InputError
            When the manifest is malformed (a malformed mask raises ``ValueError``).
        """
        directory = Path(directory)
        manifest_path = directory / MANIFEST_NAME
        if not manifest_path.is_file():
            raise InputNotFoundError(f"no {MANIFEST_NAME} in prior directory {directory.name}.")
        try:
            manifest = json.loads(manifest_path.read_text())
            files = manifest["files"]
            version = str(manifest["version"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise InputError(f"{directory.name}/{MANIFEST_NAME} is not a prior manifest: {error}") from error
        masks = {}
        for category, name in files.items():
            path = directory / name
            if not path.is_file():
                raise InputNotFoundError(f"prior mask file {name} for {category!r} is missing.")
            masks[category] = np.asarray(Image.open(path).convert("L"))
        return cls(masks, version=version, source=str(manifest.get("source", directory)))

    @classmethod
    def default(cls) -> PriorSet:
        """The approximate prior set shipped with the package (no MS-CXR needed)."""
        root = resources.files("instructx2x") / "resources" / "priors" / DEFAULT_PRIOR_DIR
        with resources.as_file(root) as directory:
            return cls.from_directory(directory)

    def select(self, instruction: ParsedInstruction, *, lateralize: bool = True) -> PriorSelection:
        """The union of the masks of every finding named in the instruction (docs/method.md
        section 2, step 4).

        Parameters
        ----------
        instruction: ParsedInstruction
            The parsed instruction.
        lateralize: bool
            Narrow lung masks to the named side. The patient's left is the image's right on
            a PA film, so 'left' keeps the right half of the image.

        Returns
        -------
        PriorSelection
            Never silent: a full-image selection carries the reason.
        """
        full = np.ones((PRIOR_SIZE, PRIOR_SIZE), dtype=np.float32)
        if not instruction.findings:
            return PriorSelection(full, (), True, "the instruction names no known finding", self.version)
        # docs/method.md section 2, step 4: a named finding without a prior may appear
        # anywhere, so the union with it is the full image ("effusion and fracture" must not
        # edit the effusion region only).
        uncovered = [f for f in instruction.findings if f not in FINDING_TO_PRIOR]
        if uncovered:
            return PriorSelection(
                full, (), True, f"no prior covers the finding(s) {', '.join(uncovered)}", self.version
            )
        missing = [c for c in instruction.prior_categories if c not in self.masks]
        if missing:
            return PriorSelection(
                full, (), True, f"prior set {self.version} has no mask for {', '.join(missing)}", self.version
            )
        union = np.zeros_like(full)
        side = instruction.laterality if lateralize else None
        for category in instruction.prior_categories:
            mask = self.masks[category]
            if side in (Laterality.LEFT, Laterality.RIGHT) and category not in _MIDLINE_CATEGORIES:
                mask = _keep_patient_side(mask, side)
            union = np.maximum(union, mask)
        reason = f"pseudo mask of {', '.join(instruction.prior_categories)}"
        lateral = side.value if side in (Laterality.LEFT, Laterality.RIGHT) else None
        if lateral:
            reason += f", narrowed to the patient's {lateral} side"
        return PriorSelection(union, instruction.prior_categories, False, reason, self.version, lateral)


def _keep_patient_side(mask: np.ndarray, side: Laterality) -> np.ndarray:
    """Zero the half of a PA image that shows the other side of the patient."""
    narrowed = mask.copy()
    half = mask.shape[1] // 2
    if side is Laterality.LEFT:  # patient's left = image right
        narrowed[:, :half] = 0
    else:
        narrowed[:, half:] = 0
    return narrowed
