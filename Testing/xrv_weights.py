"""torchxrayvision weight files built offline, where torchxrayvision looks for them.

The published weights can't be reached here. These files are of the same kind and name: a
pickled DenseNet-121, a DataParallel ResNet-34 race-model state dict, and a TorchScript age
model (a small module standing in for RIKEN's SENet-154), with random weights. They exercise
the real loading code; their predictions mean nothing. Not being the published files, they
load only with the digest file written beside them named in $INSTRUCTX2X_XRV_SHA256.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn


class StandInAge(nn.Module):
    """Age = 40 + 10 x the mean of the (normalised, 3-channel) input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 40 + 10 * x.mean(dim=(1, 2, 3))[:, None]


def write_xrv_weights(cache: Path, densenet: str = "densenet121-res224-all") -> Path:
    """Write the three files into ``cache`` (torchxrayvision's ``models_data`` layout).

    Returns the digest file that pins them (``sha256sum`` lines), beside ``cache``: the
    value for $INSTRUCTX2X_XRV_SHA256.
    """
    import torchvision
    import torchxrayvision as xrv

    from instructx2x.xrv_classifiers import AGE_WEIGHTS, RACE_WEIGHTS

    cache.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    urls = xrv.models.model_urls[densenet]
    torch.save(
        xrv.models.DenseNet(weights=None, num_classes=len(urls["labels"])),
        cache / os.path.basename(urls["weights_url"]),
    )
    race = torchvision.models.resnet34(weights=None)
    race.fc = nn.Sequential(nn.Linear(512, 3), nn.LogSoftmax(dim=1))
    torch.save(nn.DataParallel(race).state_dict(), cache / RACE_WEIGHTS)
    torch.jit.save(torch.jit.script(StandInAge()), str(cache / AGE_WEIGHTS))
    return write_digests(cache, cache.with_name(cache.name + ".sha256"))


def write_digests(cache: Path, digests: Path) -> Path:
    """Pin every file in ``cache`` as it is now, in ``digests`` (``sha256sum`` lines)."""
    lines = [
        f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n" for path in sorted(cache.iterdir())
    ]
    digests.write_text("".join(lines))
    return digests
