"""Put an edit back into the original stored values at the original resolution.

Every pixel outside the edit mask keeps its stored value bit for bit; inside, the edited
display value is mapped back through the inverse intensity chain. An optional feather
blends the edit in over a band *inside* the mask, so the guarantee outside is kept.
"""

from __future__ import annotations

import numpy as np

from .intensity import IntensityMapping

__all__ = ["feather_weights", "composite_stored"]


def _box_mean(values: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window with edge replication, by cumulative sums (separable)."""
    size = 2 * radius + 1
    padded = np.pad(values.astype(np.float32), radius, mode="edge")
    cumulative = np.cumsum(padded, axis=0)
    rows = np.concatenate([cumulative[size - 1:size], cumulative[size:] - cumulative[:-size]])
    cumulative = np.cumsum(rows, axis=1)
    return np.concatenate([cumulative[:, size - 1:size], cumulative[:, size:] - cumulative[:, :-size]],
                          axis=1) / (size * size)


def feather_weights(mask: np.ndarray, feather_px: int) -> np.ndarray:
    """Blend weights in [0, 1]: 0 outside the mask, rising to 1 over ``feather_px`` inside.

    Raises
    ------
    ValueError
        When ``feather_px`` is negative.
    """
    if feather_px < 0:
        raise ValueError(f"feather_px must be >= 0, got {feather_px}.")
    inside = mask.astype(bool)
    if feather_px == 0:
        return inside.astype(np.float64)
    local_mean = _box_mean(inside.astype(np.float64), feather_px)
    return np.where(inside, np.clip(2.0 * local_mean - 1.0, 0.0, 1.0), 0.0)


def composite_stored(original: np.ndarray, edited_display: np.ndarray, mask: np.ndarray,
                     mapping: IntensityMapping, feather_px: int = 0) -> np.ndarray:
    """Stored values of the counterfactual at the original grid.

    Parameters
    ----------
    original: numpy.ndarray
        The source's stored values (any integer dtype).
    edited_display: numpy.ndarray
        Edited display values in [0, 1], same shape.
    mask: numpy.ndarray
        Edit mask, same shape.
    mapping: IntensityMapping
        The display mapping the source was read with.
    feather_px: int
        Width of the blend band inside the mask (0: hard edge).

    Returns
    -------
    numpy.ndarray
        Same shape and dtype as ``original``; equal to it wherever ``mask`` is False.

    Raises
    ------
    ValueError
        When the shapes differ.
    """
    if not original.shape == edited_display.shape == mask.shape:
        raise ValueError(f"original {original.shape}, edited {edited_display.shape} and mask "
                         f"{mask.shape} must have the same shape.")
    weights = feather_weights(mask, feather_px)
    edited_stored = mapping.inverse(edited_display)
    blended = np.rint(original + weights * (edited_stored - original.astype(np.float64)))
    low, high = mapping.stored_range
    result = np.clip(blended, low, high).astype(original.dtype)
    outside = weights == 0
    result[outside] = original[outside]
    return result
