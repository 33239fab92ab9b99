"""Shared fixtures: one tiny random-weight pipeline per test session (built offline)."""

import pytest
import torch

from instructx2x.untrained import build_untrained_pipeline


@pytest.fixture(scope="session")
def tiny_pipe():
    pipe = build_untrained_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def xray():
    """A smooth 64x64 grayscale image in [0, 1], shape (1, 1, 64, 64)."""
    g = torch.Generator().manual_seed(1)
    base = torch.rand(1, 1, 8, 8, generator=g)
    return torch.nn.functional.interpolate(base, size=(64, 64), mode="bilinear").clamp(0, 1)
