"""The evaluation's numbers against closed forms and independent computations."""

import math

import numpy as np
import pytest

from instructx2x.classifiers import PATHOLOGIES
from instructx2x.verification import expected_labels
from instructx2x_train.metrics import (
    auroc,
    bootstrap_intervals,
    cmig,
    frechet_distance,
    geometric_mean,
    kl_divergence,
    label_kl,
    pathology_accuracy,
    pearson,
)


def test_frechet_distance_of_known_gaussians():
    """N(0, I) against N(mu, diag(s)): the closed form |mu|^2 + sum(1 + s - 2 sqrt(s))."""
    rng = np.random.default_rng(0)
    mu, s = np.array([1.0, -0.5, 0.25]), np.array([4.0, 0.25, 1.0])
    a = rng.standard_normal((200_000, 3))
    b = mu + rng.standard_normal((200_000, 3)) * np.sqrt(s)
    expected = (mu**2).sum() + (1 + s - 2 * np.sqrt(s)).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(a, b[:, :2])


def test_frechet_distance_with_correlated_covariances_matches_the_eigen_route():
    """Tr((S_a S_b)^(1/2)) computed independently: the square roots of the eigenvalues of
    S_a^(1/2) S_b S_a^(1/2) (a symmetric matrix, numpy only)."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((5000, 4)) @ rng.standard_normal((4, 4))
    b = rng.standard_normal((5000, 4)) @ rng.standard_normal((4, 4)) + 0.3
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(ca)
    root_a = vectors @ np.diag(np.sqrt(values)) @ vectors.T
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cb @ root_a), 0, None)).sum()
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb) - 2 * trace_root
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_kl_on_known_distributions():
    assert kl_divergence([0.5, 0.5], [0.25, 0.75], epsilon=0) == pytest.approx(
        0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    )
    assert kl_divergence([0.2, 0.8], [0.2, 0.8]) == pytest.approx(0.0, abs=1e-12)
    real = np.array([[1, 0], [1, 0], [0, 0], [0, 1]], bool)
    assert label_kl(real, real) == pytest.approx(0.0, abs=1e-9)
    assert label_kl(real, ~real) > 10


def test_geometric_mean_and_pearson():
    assert geometric_mean([2, 8]) == pytest.approx(4.0)
    assert geometric_mean([3, 0, 5]) == 0.0
    x = np.array([1.0, 2.0, 4.0, 7.0, 11.0])
    y = np.array([2.0, 1.0, 5.0, 8.0, 9.0])
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    with pytest.raises(ValueError, match="constant"):
        pearson(x, np.ones(5))


def test_cmig_is_the_geometric_mean_of_the_three_scores():
    assert cmig(64.0, 100.0, 0.25 * 100) == pytest.approx((64 * 100 * 25) ** (1 / 3))
    assert cmig(90, 90, -0.2) == 0.0  # a negative age correlation preserves nothing


def test_auroc_counts_every_positive_negative_pair_a_tie_half():
    # positives 0.9, 0.4, 0.2 against negatives 0.1, 0.4: 0.9 wins twice, 0.4 wins once and
    # ties once, 0.2 wins once and loses once: 4.5 of 6 pairs
    assert auroc([1, 0, 1, 0, 1], [0.9, 0.1, 0.4, 0.4, 0.2]) == pytest.approx(0.75)
    assert auroc([1, 1, 0, 0], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.5)
    rng = np.random.default_rng(4)
    labels, scores = rng.random(200) < 0.3, rng.integers(0, 12, 200).astype(float)  # many ties
    wins = (scores[labels][:, None] > scores[~labels][None, :]).mean()
    ties = (scores[labels][:, None] == scores[~labels][None, :]).mean()
    assert auroc(labels, scores) == pytest.approx(wins + ties / 2)
    assert auroc(labels, -scores) == pytest.approx(1 - auroc(labels, scores))
    assert math.isnan(auroc([1, 1], [0.2, 0.3]))
    with pytest.raises(ValueError, match="equally long"):
        auroc([1, 0, 1], [0.2, 0.3])


def test_bootstrap_interval_covers_a_known_mean():
    """95 % intervals of a normal sample's mean cover the true mean in about 95 % of trials."""
    rng = np.random.default_rng(2)
    covered = 0
    trials = 200
    for trial in range(trials):
        sample = rng.normal(3.0, 2.0, 60)

        def mean(index: np.ndarray, sample: np.ndarray = sample) -> dict[str, float]:
            return {"mean": float(sample[index].mean())}

        low, high = bootstrap_intervals(
            mean,
            len(sample),
            resamples=400,
            seed=trial,
        )["mean"]
        covered += low <= 3.0 <= high
    assert 0.88 <= covered / trials <= 0.99


@pytest.mark.parametrize(
    "instruction,change",
    [
        ("Add the finding of left pleural effusion", {"Effusion": True}),
        ("Remove the finding of pneumothorax", {"Pneumothorax": False}),
        ("Change the level of edema from mild to severe", {"Edema": True}),
        ("Add the finding of fracture", {}),
        ("Remove the finding of enlargement of the cardiac silhouette", {"Cardiomegaly": False}),
    ],
)
def test_expected_labels_follow_the_instruction(instruction, change):
    source = {
        "Atelectasis": True,
        "Cardiomegaly": True,
        "Edema": False,
        "Effusion": False,
        "Pneumothorax": True,
    }
    assert expected_labels(source, instruction) == {**source, **change}


def test_pathology_accuracy_counts_every_decision():
    predicted = np.array([[1, 0, 0, 1, 0], [0, 0, 1, 1, 1]], bool)
    expected = np.array([[1, 0, 0, 0, 0], [0, 1, 1, 1, 1]], bool)
    assert pathology_accuracy(predicted, expected) == pytest.approx(80.0)
    assert len(PATHOLOGIES) == predicted.shape[1]
