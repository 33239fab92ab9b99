"""Shared fixtures: one tiny random-weight pipeline per test session (built offline)."""

import numpy as np
import pytest
import torch
from PIL import Image

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


@pytest.fixture
def png(tmp_path):
    """A 72x60 8-bit grayscale PNG, chest.png, in the test's folder."""
    yy, xx = np.mgrid[0:72, 0:60]
    pixels = (127 + 100 * np.sin(yy / 8) * np.cos(xx / 6)).astype(np.uint8)
    path = tmp_path / "chest.png"
    Image.fromarray(pixels).save(path)
    return path
