"""Guidance-map overlays: the map in colour over the radiograph, the edit mask outlined."""

from __future__ import annotations

import numpy as np

__all__ = ["colorize", "guidance_overlay", "outline", "side_by_side", "series_strip"]

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


def guidance_overlay(
    image: np.ndarray, guidance: np.ndarray, mask: np.ndarray, opacity: float = 0.6
) -> np.ndarray:
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
        raise ValueError(
            f"image {image.shape}, guidance {guidance.shape} and mask {mask.shape} must have the same shape."
        )
    gray = np.clip(image, 0, 1).astype(np.float32)[..., None]
    alpha = (opacity * np.clip(guidance, 0, 1)).astype(np.float32)[..., None]
    rgb = gray * (1 - alpha) + colorize(guidance) * alpha
    rgb[outline(mask)] = (0.0, 1.0, 1.0)
    return (rgb * 255).round().astype(np.uint8)


def outline(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a binary mask (inside, with a 4-neighbour outside)."""
    inside = np.asarray(mask).astype(bool)
    interior = inside.copy()
    interior[1:, :] &= inside[:-1, :]
    interior[:-1, :] &= inside[1:, :]
    interior[:, 1:] &= inside[:, :-1]
    interior[:, :-1] &= inside[:, 1:]
    return inside & ~interior


def side_by_side(
    image: np.ndarray,
    edited: np.ndarray,
    guidance: np.ndarray,
    mask: np.ndarray,
    reference: np.ndarray | None = None,
    height: int = 512,
) -> np.ndarray:
    """One picture of an edit: input | edit | guidance overlay, each labelled, for a report.

    ``reference`` (a known lesion, e.g. a phantom's ground truth) is outlined in green on the
    edit. Panels are resized to ``height`` rows (aspect kept). Returns uint8 RGB.
    """
    after = _gray(edited)
    if reference is not None:
        after[outline(reference)] = (0.1, 1.0, 0.2)
    panels = [
        ("input", _gray(image)),
        ("edit" + (" (green: true lesion)" if reference is not None else ""), after),
        ("guidance map, edit mask in cyan", guidance_overlay(image, guidance, mask) / 255.0),
    ]
    return _labelled(panels, height)


def series_strip(
    image: np.ndarray,
    steps: list[np.ndarray],
    labels: list[str],
    mask: np.ndarray,
    reference: np.ndarray | None = None,
    height: int = 384,
) -> np.ndarray:
    """One picture of a progression series: the input, then each step, each labelled.

    The edit region the steps share is outlined in cyan on every step, ``reference`` (a known
    lesion) in green. Panels are resized to ``height`` rows (aspect kept). Returns uint8 RGB.
    """
    if len(steps) != len(labels):
        raise ValueError(f"{len(steps)} steps and {len(labels)} labels: give one label a step.")
    panels = [("input", _gray(image))]
    for label, edited in zip(labels, steps):
        picture = _gray(edited)
        picture[outline(mask)] = (0.0, 1.0, 1.0)
        if reference is not None:
            picture[outline(reference)] = (0.1, 1.0, 0.2)
        panels.append((label, picture))
    return _labelled(panels, height)


def _gray(array: np.ndarray) -> np.ndarray:
    return np.repeat(np.clip(array, 0, 1)[..., None], 3, -1).astype(np.float32)


def _labelled(panels: list[tuple[str, np.ndarray]], height: int) -> np.ndarray:
    """Float RGB panels in [0, 1], each resized to ``height`` rows with its label in a black box
    at the top left, side by side."""
    from PIL import Image, ImageDraw

    pictures = []
    for label, panel in panels:
        picture = Image.fromarray((np.clip(panel, 0, 1) * 255).round().astype(np.uint8))
        width = max(1, round(picture.width * height / picture.height))
        picture = picture.resize((width, height), Image.Resampling.LANCZOS)
        draw = ImageDraw.Draw(picture)
        draw.rectangle((0, 0, 8 + 6 * len(label), 16), fill=(0, 0, 0))
        draw.text((4, 3), label, fill=(255, 255, 255))
        pictures.append(np.asarray(picture))
    return np.concatenate(pictures, axis=1)
