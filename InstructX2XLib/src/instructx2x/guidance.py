"""Pure tensor functions of Region-Specific Editing (docs/method.md section 2, steps 3-5).

They call no model, so every step of the guidance computation can be unit-tested against
hand-computed values. Tensors are ``(batch, channels, height, width)`` unless stated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .parameters import RegionMode

__all__ = [
    "RegionMode",
    "relevance_map",
    "clip_outliers_iqr",
    "normalize_min_max",
    "resize_map",
    "guidance_map",
    "threshold_mask",
    "combine_masks",
]


def clip_outliers_iqr(values: torch.Tensor) -> torch.Tensor:
    """Clip each map to ``[0, Q3 + 1.5 (Q3 - Q1)]``, quartiles per batch item.

    Quartiles use midpoint interpolation, as the authors' numpy code does.

    Parameters
    ----------
    values: torch.Tensor
        Non-negative maps of shape ``(B, H, W)``.

    Returns
    -------
    torch.Tensor
        Clipped maps, same shape and dtype.
    """
    flat = values.flatten(1).float()
    q1 = torch.quantile(flat, 0.25, dim=1, interpolation="midpoint")
    q3 = torch.quantile(flat, 0.75, dim=1, interpolation="midpoint")
    upper = (q3 + 1.5 * (q3 - q1)).view(-1, 1, 1)
    return torch.minimum(values.float().clamp(min=0.0), upper).to(values.dtype)


def normalize_min_max(values: torch.Tensor) -> torch.Tensor:
    """Rescale each map of ``(B, H, W)`` to ``[0, 1]``; a constant map becomes all zeros."""
    flat = values.flatten(1).float()
    low = flat.min(dim=1).values.view(-1, 1, 1)
    span = flat.max(dim=1).values.view(-1, 1, 1) - low
    safe_span = torch.where(span > 0, span, torch.ones_like(span))
    return ((values.float() - low) / safe_span).to(values.dtype)


def relevance_map(noise_pred_text: torch.Tensor, noise_pred_image: torch.Tensor) -> torch.Tensor:
    """Relevance map of Watch Your Steps (the paper's Eq. 1) at latent size.

    ``R = sum_c |eps_text - eps_img|``, clipped at the upper IQR fence and min-max normalised.
    Predictions for several noise draws (a leading draws axis) give the mean of their maps,
    normalised again: a Monte Carlo estimate of the map's expectation over the noise draw, in
    which a cell ranks by how often and how strongly the draws mark it, so one draw's noise
    no longer decides where the maximum lies. (The mean of the raw sums would not do: its
    fence clips it to a plateau much as one draw's does.)

    Parameters
    ----------
    noise_pred_text: torch.Tensor
        Noise predicted with text and image conditioning, ``(B, 4, h, w)``, or
        ``(K, B, 4, h, w)`` for K noise draws.
    noise_pred_image: torch.Tensor
        Noise predicted with the image conditioning only, same shape.

    Returns
    -------
    torch.Tensor
        Float32 maps of shape ``(B, 1, h, w)`` in ``[0, 1]``.

    Raises
    ------
    ValueError
        When the two predictions differ in shape or have neither 4 nor 5 dimensions.
    """
    if noise_pred_text.shape != noise_pred_image.shape or noise_pred_text.dim() not in (4, 5):
        raise ValueError(
            f"noise_pred_text {tuple(noise_pred_text.shape)} and noise_pred_image "
            f"{tuple(noise_pred_image.shape)} must have the same shape, (B, C, h, w) or (K, B, C, h, w)."
        )
    raw = (noise_pred_text.float() - noise_pred_image.float()).abs().sum(dim=-3)
    if raw.dim() == 3:
        return normalize_min_max(clip_outliers_iqr(raw)).unsqueeze(1)
    maps = torch.stack([normalize_min_max(clip_outliers_iqr(draw)) for draw in raw])
    return normalize_min_max(maps.mean(dim=0)).unsqueeze(1)


def resize_map(values: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize ``(B, C, H, W)`` maps to ``size`` = (height, width): the library's one resizer.

    ``bilinear`` (antialiased whenever either side shrinks): downsampling a binary prior gives
    the fractional coverage of each latent cell (docs/method.md section 2, step 5),
    upsampling the relevance map gives its pixel-space version (step 3). ``nearest`` keeps
    binary masks binary.
    """
    if tuple(values.shape[-2:]) == tuple(size):
        return values
    if mode == "nearest":
        return F.interpolate(values, size=size, mode="nearest-exact")
    shrinking = size[0] < values.shape[-2] or size[1] < values.shape[-1]
    return F.interpolate(
        values.float(), size=size, mode="bilinear", align_corners=False, antialias=shrinking
    ).to(values.dtype)


def _needed(values: torch.Tensor | None, mode: RegionMode, what: str) -> torch.Tensor:
    """``values``, which ``mode`` needs: a clear error when they are missing."""
    if values is None:
        raise ValueError(f"mode {mode.value!r} needs {what}, got None.")
    return values


def guidance_map(
    relevance: torch.Tensor | None, prior: torch.Tensor | None, mode: RegionMode | str
) -> torch.Tensor:
    """Combine the relevance map and the prior as the region mode asks.

    Parameters
    ----------
    relevance: torch.Tensor | None
        Relevance map ``(B, 1, H, W)`` in ``[0, 1]``; needed by ``rse`` and ``relevance``.
    prior: torch.Tensor | None
        Prior (or user) mask ``(B, 1, H, W)`` in ``[0, 1]``, same size; needed by ``rse``
        and ``prior``.
    mode: RegionMode | str
        One of ``rse``, ``relevance``, ``prior``, ``none``.

    Returns
    -------
    torch.Tensor
        The guidance map ``G``; all ones for ``none``.

    Raises
    ------
    ValueError
        When a map that the mode needs is missing, or the maps differ in shape.
    """
    mode = RegionMode(mode)
    if mode is RegionMode.RSE:
        relevance = _needed(relevance, mode, "a relevance map")
        prior = _needed(prior, mode, "a prior mask")
        if relevance.shape != prior.shape:
            raise ValueError(
                f"relevance {tuple(relevance.shape)} and prior {tuple(prior.shape)} must have the same shape."
            )
        return relevance.float() * prior.float()
    if mode is RegionMode.RELEVANCE:
        return _needed(relevance, mode, "a relevance map").float()
    if mode is RegionMode.PRIOR:
        return _needed(prior, mode, "a prior mask").float()
    reference = relevance if relevance is not None else prior
    if reference is None:
        raise ValueError("mode 'none' needs either map to know the output shape.")
    return torch.ones_like(reference, dtype=torch.float32)


def threshold_mask(guidance: torch.Tensor, tau: float) -> torch.Tensor:
    """Binary edit mask ``1(G >= tau)`` as float32 (docs/method.md section 2, step 5).

    ``tau`` is checked where parameters enter (``parameters.check_sampling``).
    """
    return (guidance >= tau).to(torch.float32)


def combine_masks(edit_mask: torch.Tensor, keep_mask: torch.Tensor | None) -> torch.Tensor:
    """Remove the keep mask from the edit mask: what must never change wins over everything.

    Any non-zero keep value counts, so a latent cell that touches the keep region is kept.
    """
    if keep_mask is None:
        return edit_mask
    if keep_mask.shape != edit_mask.shape:
        raise ValueError(
            f"keep mask {tuple(keep_mask.shape)} must match the edit mask {tuple(edit_mask.shape)}."
        )
    return edit_mask * (1.0 - (keep_mask > 0).to(edit_mask.dtype))
