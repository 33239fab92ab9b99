import numpy as np
import pytest

from instructx2x_train.phantom import Pose, render_frontal
from instructx2x_train.registration import normalized_cross_correlation, register


def test_recovers_a_known_similarity_transform():
    rng = np.random.default_rng(0)
    current, _ = render_frontal(512, 512, [], Pose(), rng)
    past, _ = render_frontal(512, 512, [], Pose(rotation=3.0, scale=1.04, shift_u=0.04, shift_v=-0.03), rng)
    result = register(past, current, seed=1)
    scale, angle = result.parameters[:2]  # Similarity2D: scale, angle, translation
    assert scale == pytest.approx(1.04, abs=0.01)
    assert np.rad2deg(angle) == pytest.approx(3.0, abs=0.5)
    assert result.score_before < 0.9 < 0.98 < result.score
    assert result.registered.shape == current.shape


def test_reproducible_with_a_seed():
    rng = np.random.default_rng(3)
    a, _ = render_frontal(256, 256, [], Pose(), rng)
    b, _ = render_frontal(256, 256, [], Pose(rotation=-2.0), rng)
    first, second = register(b, a, seed=7), register(b, a, seed=7)
    assert first.parameters == second.parameters and first.score == second.score


def test_ncc_and_shape_check():
    x = np.random.default_rng(0).random((10, 10))
    assert normalized_cross_correlation(x, x) == pytest.approx(1.0)
    assert normalized_cross_correlation(x, 1 - x) == pytest.approx(-1.0)
    assert normalized_cross_correlation(x, np.zeros_like(x)) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        register(x, x[:5])
