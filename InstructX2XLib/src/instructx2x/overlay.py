"""Guidance-map overlays: the map in colour over the radiograph, the edit mask outlined."""

from __future__ import annotations

import numpy as np

__all__ = ["colorize", "guidance_overlay"]

# Anchors of a perceptually ordered black-red-yellow-white ramp ("hot"), value -> RGB.
_RAMP = np.array([[0.0, 0.0, 0.0], [0.85, 0.1, 0.05], [1.0, 0.8, 0.1], [1.0, 1.0, 1.0]])


def _ramp_table(levels: int = 256) -> np.ndarray:
    position = np.linspace(0.0, len(_RAMP) - 1, levels)
    low = np.minimum(np.floor(position).astype(int), len(_RAMP) - 2)
    weight = (position - low)[:, None]
    return (_RAMP[low] * (1 - weight) + _RAMP[low + 1] * weight).astype(np.float32)


_TABLE = _ramp_table()


def colorize(values: np.ndarray) -> np.ndarray:
    """Map ``(H, W)`` values in ``[0, 1]`` to float32 RGB ``(H, W, 3)`` along the ramp.

    Values are quantised to 256 levels (the output is 8-bit anyway) and looked up in a table.
    """
    index = np.rint(np.clip(values, 0.0, 1.0) * (len(_TABLE) - 1)).astype(np.uint8)
    return _TABLE[index]


def guidance_overlay(image: np.ndarray, guidance: np.ndarray, mask: np.ndarray,
                     opacity: float = 0.6) -> np.ndarray:
    """An 8-bit RGB picture of where the model edits.

    Parameters
    ----------
    image: numpy.ndarray
        Grayscale ``(H, W)`` in ``[0, 1]``.
    guidance: numpy.ndarray
        Guidance map ``(H, W)`` in ``[0, 1]``; its colour is blended in proportion to its value.
    mask: numpy.ndarray
        Binary edit mask ``(H, W)``; its boundary is drawn in cyan.
    opacity: float
        Blend weight of the map where it is 1.

    Returns
    -------
    numpy.ndarray
        uint8 ``(H, W, 3)``.
    """
    if not image.shape == guidance.shape == mask.shape:
        raise ValueError(f"image {image.shape}, guidance {guidance.shape} and mask {mask.shape} "
                         "must have the same shape.")
    gray = np.clip(image, 0, 1).astype(np.float32)[..., None]
    alpha = (opacity * np.clip(guidance, 0, 1)).astype(np.float32)[..., None]
    rgb = gray * (1 - alpha) + colorize(guidance) * alpha
    inside = mask.astype(bool)
    interior = inside.copy()
    interior[1:, :] &= inside[:-1, :]
    interior[:-1, :] &= inside[1:, :]
    interior[:, 1:] &= inside[:, :-1]
    interior[:, :-1] &= inside[:, 1:]
    rgb[inside & ~interior] = (0.0, 1.0, 1.0)
    return (rgb * 255).round().astype(np.uint8)
