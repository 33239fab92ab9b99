"""The eight anatomical pseudo masks from MS-CXR, exactly as docs/method.md section 3 describes.

Keep the boxes of PA images (ViewPosition 'PA' in the MIMIC-CXR metadata), rescale each box
anisotropically to 512 x 512 (x * 512 / image_width, y * 512 / image_height), clip, and take
the union of all boxes of a category. A box covers pixel columns
floor(x * 512 / W) .. ceil((x + w) * 512 / W) - 1, rows alike.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from instructx2x.instructions import PRIOR_CATEGORIES
from instructx2x.priors import PRIOR_SIZE, write_prior_set

from .tables import read_table

__all__ = ["box_union_masks", "build_pseudo_masks"]


def box_union_masks(boxes, size: int = PRIOR_SIZE) -> dict[str, np.ndarray]:
    """Union of rescaled boxes per category.

    Parameters
    ----------
    boxes: pandas.DataFrame
        MS-CXR rows (category_name, x, y, w, h, image_width, image_height).
    size: int
        Mask side.

    Raises
    ------
    ValueError
        For a category outside the eight, a non-positive image size, or a category with no box.
    """
    masks = {category: np.zeros((size, size), np.uint8) for category in PRIOR_CATEGORIES}
    for row in boxes.itertuples(index=False):
        if row.category_name not in masks:
            raise ValueError(
                f"unknown MS-CXR category {row.category_name!r}; expected one of "
                f"{', '.join(PRIOR_CATEGORIES)}."
            )
        if row.image_width <= 0 or row.image_height <= 0:
            raise ValueError(f"image size must be positive, got {row.image_width}x{row.image_height}.")
        sx, sy = size / row.image_width, size / row.image_height
        x0, x1 = max(0, math.floor(row.x * sx)), min(size, math.ceil((row.x + row.w) * sx))
        y0, y1 = max(0, math.floor(row.y * sy)), min(size, math.ceil((row.y + row.h) * sy))
        masks[row.category_name][y0:y1, x0:x1] = 1
    empty = [c for c, m in masks.items() if not m.any()]
    if empty:
        raise ValueError(f"no PA box for {', '.join(empty)}: cannot build their masks.")
    return masks


def build_pseudo_masks(
    ms_cxr_csv: str | Path, metadata_csv: str | Path, output: str | Path, version: str = "ms-cxr-v1.1.0"
) -> dict:
    """Build the prior set from MS-CXR into ``output`` (the format ``--priors`` loads).

    Returns
    -------
    dict
        Counts: boxes read, PA boxes used, per category, and coverage per category.
    """
    boxes = read_table(ms_cxr_csv, "ms_cxr")
    metadata = read_table(metadata_csv, "metadata")
    pa_ids = set(metadata.loc[metadata.ViewPosition == "PA", "dicom_id"])
    pa_boxes = boxes[boxes.dicom_id.isin(pa_ids)]
    masks = box_union_masks(pa_boxes)
    write_prior_set(
        Path(output),
        masks,
        version=version,
        source=f"union of {len(pa_boxes)} PA boxes of {Path(ms_cxr_csv).name}",
    )
    return {
        "boxes_read": len(boxes),
        "pa_boxes": len(pa_boxes),
        "per_category": pa_boxes.category_name.value_counts().sort_index().to_dict(),
        "coverage": {c: round(float(m.mean()), 4) for c, m in masks.items()},
    }
