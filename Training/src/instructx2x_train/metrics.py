"""The numbers of the paper's Tables 1-2 as pure functions (docs/method.md section 7).

CMIG is the geometric mean of pathology accuracy, race preservation and age preservation;
KL compares the classifier's predicted-label distributions on generated and real target
images; FID compares the classifier's pooled features. Every figure can carry a bootstrap
95 % interval. docs/evaluation.md writes down each definition and what is unverified.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "frechet_distance",
    "kl_divergence",
    "label_distribution",
    "label_kl",
    "geometric_mean",
    "pearson",
    "auroc",
    "bootstrap_intervals",
    "pathology_accuracy",
    "cmig",
]


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N, D)``.

    ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``, the square root by
    ``scipy.linalg.sqrtm``; a numerically complex root with a negligible imaginary part is
    taken as real, a larger one is an error.

    Raises
    ------
    ValueError
        When the feature sets differ in dimension, have fewer than 2 rows, or the root is
        not real.
    """
    from scipy import linalg

    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"features must be (N, D) with the same D and N >= 2, got {a.shape} and {b.shape}.")
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # singular product: regularise as the reference FID code does
        offset = np.eye(len(cov_a)) * 1e-6
        root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    if np.iscomplexobj(root):
        if np.abs(root.imag).max() > 1e-3 * max(np.abs(root.real).max(), 1.0):
            raise ValueError("the covariance product has no real square root (too few samples?).")
        root = root.real
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def kl_divergence(p: ArrayLike, q: ArrayLike, epsilon: float = 1e-6) -> float:
    """KL(p || q) of two discrete distributions (renormalised; ``epsilon`` keeps empty bins finite)."""
    p_bins = np.asarray(p, dtype=np.float64) + epsilon
    q_bins = np.asarray(q, dtype=np.float64) + epsilon
    if p_bins.shape != q_bins.shape:
        raise ValueError(f"distributions must have the same support, got {p_bins.shape} and {q_bins.shape}.")
    p_bins, q_bins = p_bins / p_bins.sum(), q_bins / q_bins.sum()
    return float((p_bins * np.log(p_bins / q_bins)).sum())


def label_distribution(positive: np.ndarray) -> np.ndarray:
    """Frequencies of the joint label patterns of ``(N, K)`` boolean predictions (2^K bins)."""
    positive = np.asarray(positive, dtype=bool)
    codes = (positive * (1 << np.arange(positive.shape[1]))).sum(axis=1)
    return np.bincount(codes, minlength=1 << positive.shape[1]) / len(positive)


def label_kl(real_positive: np.ndarray, generated_positive: np.ndarray) -> float:
    """KL(real || generated) of the predicted-label distributions, x100 as the paper reports."""
    return 100.0 * kl_divergence(label_distribution(real_positive), label_distribution(generated_positive))


def geometric_mean(values: ArrayLike) -> float:
    """Geometric mean of non-negative values (0 if any is 0)."""
    array = np.asarray(values, dtype=np.float64)
    if (array < 0).any():
        raise ValueError(f"a geometric mean needs non-negative values, got {array.tolist()}.")
    if (array == 0).any():
        return 0.0
    return float(np.exp(np.log(array).mean()))


def pearson(x: ArrayLike, y: ArrayLike) -> float:
    """Pearson correlation coefficient (age preservation: predicted ages, edited vs source)."""
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xs.shape != ys.shape or len(xs) < 2:
        raise ValueError(
            f"two equally long series of at least 2 values are needed, got {xs.shape}, {ys.shape}."
        )
    dx, dy = xs - xs.mean(), ys - ys.mean()
    denominator = math.sqrt(float((dx**2).sum() * (dy**2).sum()))
    if denominator == 0:
        raise ValueError("a constant series has no correlation.")
    return float((dx * dy).sum() / denominator)


def auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve: the chance that a positive scores above a negative, a tie
    counted half (the Mann-Whitney U over both counts); NaN without a positive or a negative."""
    from scipy.stats import rankdata

    positive = np.asarray(labels).astype(bool)
    values = np.asarray(scores, dtype=np.float64)
    if positive.shape != values.shape or positive.ndim != 1:
        raise ValueError(
            f"labels and scores must be equally long 1-D series, got {positive.shape}, {values.shape}."
        )
    positives, negatives = int(positive.sum()), int((~positive).sum())
    if not positives or not negatives:
        return float("nan")
    ranks = rankdata(values)  # tied scores share their mean rank: half a win each way
    return float((ranks[positive].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def bootstrap_intervals(
    statistic: Callable[[np.ndarray], dict[str, float]],
    count: int,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of every figure ``statistic(index)`` returns.

    ``statistic`` receives an index array into the ``count`` test pairs; the rows of a pair
    (source, target, edit) are resampled together, and one set of seeded draws serves all
    figures. A draw whose figure is undefined (NaN) is left out of that figure's interval.
    """
    if count < 1 or resamples < 1:
        raise ValueError(f"count and resamples must be >= 1, got {count}, {resamples}.")
    draws = np.random.default_rng(seed).integers(0, count, (resamples, count))
    values = [statistic(index) for index in draws]
    tail = (1 - level) / 2 * 100
    intervals = {}
    for key in values[0]:
        low, high = np.nanpercentile([value[key] for value in values], [tail, 100 - tail])
        intervals[key] = (float(low), float(high))
    return intervals


def pathology_accuracy(predicted: np.ndarray, expected: np.ndarray) -> float:
    """Percentage of (image, pathology) decisions that match the expected labels."""
    predicted, expected = np.asarray(predicted, dtype=bool), np.asarray(expected, dtype=bool)
    if predicted.shape != expected.shape:
        raise ValueError(f"shapes differ: {predicted.shape} vs {expected.shape}.")
    return float((predicted == expected).mean() * 100)


def cmig(pathology: float, race: float, age: float) -> float:
    """CMIG in percent: the geometric mean of pathology accuracy (%), race agreement (%) and
    age preservation (Pearson r, as a percentage; a negative r counts as 0)."""
    return geometric_mean([pathology, race, max(age, 0.0)])
