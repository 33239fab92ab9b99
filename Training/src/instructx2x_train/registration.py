"""Register a past image onto the current one (2-D similarity transform, SimpleITK).

The score is the normalised cross-correlation of the two images after registration, over
the region both cover: 1 is a perfect match. Pairs below the builder's threshold are
discarded (their past and current films are too different to learn a local edit from).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import SimpleITK as sitk

__all__ = ["RegistrationResult", "register", "normalized_cross_correlation"]


@dataclasses.dataclass(frozen=True)
class RegistrationResult:
    """The past image resampled onto the current image's grid, and how well they match."""

    registered: np.ndarray
    score: float
    score_before: float
    parameters: tuple[float, ...]  # angle (rad), scale, translation x, y (pixels)


def normalized_cross_correlation(a: np.ndarray, b: np.ndarray, valid: np.ndarray | None = None) -> float:
    """NCC of two images over ``valid`` (all pixels by default); 0 for constant images."""
    if valid is None:
        valid = np.ones(a.shape, bool)
    x, y = a[valid].astype(np.float64), b[valid].astype(np.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else 0.0


def register(
    past: np.ndarray, current: np.ndarray, *, seed: int = 0, working_size: int = 128, iterations: int = 60
) -> RegistrationResult:
    """Align ``past`` to ``current`` with a similarity transform.

    The transform is estimated on ``working_size`` copies (fast, and enough for a global
    pose change) and applied at full resolution.

    Parameters
    ----------
    past, current: numpy.ndarray
        float32 images of the same shape, values in [0, 1].
    seed: int
        Seeds SimpleITK's metric sampling, so the result is reproducible.
    working_size: int
        Side of the images the transform is estimated on.
    iterations: int
        Optimizer iterations per resolution level.

    Raises
    ------
    ValueError
        When the images differ in shape.
    """
    if past.shape != current.shape:
        raise ValueError(f"past {past.shape} and current {current.shape} must have the same shape.")
    rows, columns = current.shape
    fixed_full = sitk.GetImageFromArray(current.astype(np.float32))
    moving_full = sitk.GetImageFromArray(past.astype(np.float32))
    spacing = (columns / working_size, rows / working_size)
    fixed = _shrink(fixed_full, working_size, spacing)
    moving = _shrink(moving_full, working_size, spacing)

    transform = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Similarity2DTransform(), sitk.CenteredTransformInitializerFilter.GEOMETRY
    )
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsCorrelation()
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.5, seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-4, numberOfIterations=iterations, relaxationFactor=0.6
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1.0, 0.0])
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed, moving)

    registered = sitk.GetArrayFromImage(
        sitk.Resample(moving_full, fixed_full, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    )
    coverage = (
        sitk.GetArrayFromImage(
            sitk.Resample(
                sitk.Image(moving_full.GetSize(), sitk.sitkUInt8) + 1,
                fixed_full,
                transform,
                sitk.sitkNearestNeighbor,
                0,
            )
        )
        > 0
    )
    return RegistrationResult(
        registered=registered.astype(np.float32),
        score=normalized_cross_correlation(registered, current, coverage),
        score_before=normalized_cross_correlation(past, current),
        parameters=tuple(float(p) for p in transform.GetParameters()),
    )


def _shrink(image: sitk.Image, size: int, spacing: tuple[float, float]) -> sitk.Image:
    """Resample to size x size on the same physical extent (pixel units of the original)."""
    reference = sitk.Image([size, size], sitk.sitkFloat32)
    reference.SetSpacing(spacing)
    reference.SetOrigin([(s - 1) / 2 for s in spacing])
    smoothed = sitk.SmoothingRecursiveGaussian(image, max(spacing) / 2)
    return sitk.Resample(smoothed, reference, sitk.Transform(), sitk.sitkLinear, 0.0)
