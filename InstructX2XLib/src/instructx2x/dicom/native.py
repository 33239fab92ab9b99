"""Put an edit back into the original stored values at the original resolution.

Every pixel outside the edit mask keeps its stored value bit for bit; inside, either the
model's change is added to the original stored values (composite ``change``, the default) or
the edited display value is mapped back through the inverse intensity chain (``replace``). An optional feather
blends the edit in over a band *inside* the mask, so the guarantee outside is kept.
"""

from __future__ import annotations

import numpy as np

from .intensity import IntensityMapping

__all__ = ["feather_weights", "composite_stored", "proposed_stored"]


def _box_mean(values: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window with edge replication, by cumulative sums (separable)."""
    size = 2 * radius + 1
    padded = np.pad(values.astype(np.float32), radius, mode="edge")
    cumulative = np.cumsum(padded, axis=0)
    rows = np.concatenate([cumulative[size - 1 : size], cumulative[size:] - cumulative[:-size]])
    cumulative = np.cumsum(rows, axis=1)
    return np.concatenate(
        [cumulative[:, size - 1 : size], cumulative[:, size:] - cumulative[:, :-size]], axis=1
    ) / (size * size)


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


def composite_stored(
    original: np.ndarray,
    proposed: np.ndarray,
    mask: np.ndarray,
    stored_range: tuple[int, int],
    feather_px: int = 0,
) -> tuple[np.ndarray, float]:
    """Stored values of the counterfactual at the original grid.

    Parameters
    ----------
    original: numpy.ndarray
        The source's stored values (any integer dtype).
    proposed: numpy.ndarray
        Float stored values the edit proposes, same shape (see ``proposed_stored``).
    mask: numpy.ndarray
        Edit mask, same shape.
    stored_range: tuple[int, int]
        Lowest and highest representable stored value.
    feather_px: int
        Width of the blend band inside the mask (0: hard edge).

    Returns
    -------
    tuple[numpy.ndarray, float]
        Same shape and dtype as ``original``, equal to it wherever ``mask`` is False; and
        the fraction of the mask's pixels whose value had to be clipped to the stored range.

    Raises
    ------
    ValueError
        When the shapes differ or ``feather_px`` is negative.
    """
    if not original.shape == proposed.shape == mask.shape:
        raise ValueError(
            f"original {original.shape}, proposed {proposed.shape} and mask "
            f"{mask.shape} must have the same shape."
        )
    weights = feather_weights(mask, feather_px)
    blended = np.rint(original + weights * (proposed - original.astype(np.float64)))
    low, high = stored_range
    inside = mask.astype(bool)
    clipped = float(((blended < low) | (blended > high))[inside].mean()) if inside.any() else 0.0
    result = np.clip(blended, low, high).astype(original.dtype)
    outside = weights == 0
    result[outside] = original[outside]
    return result, clipped


def proposed_stored(
    original: np.ndarray,
    mapping: IntensityMapping,
    edited: np.ndarray,
    model_output: np.ndarray | None,
    reconstruction: np.ndarray | None,
) -> np.ndarray:
    """Float stored values an edit proposes, before clipping and blending.

    With the model's output and its reconstruction of the input (composite ``change``): the
    original stored values plus the model's change, carried into the stored domain through
    the inverse display chain. Native detail, and values the VOI window flattens to black or
    white, survive. Otherwise (``replace``): the edited display values mapped back.
    """
    if model_output is None or reconstruction is None:
        return mapping.to_stored(edited)
    return original.astype(np.float64) + mapping.to_stored(model_output) - mapping.to_stored(reconstruction)
