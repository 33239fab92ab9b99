"""Classifiers that measure an edit: five findings, age, sex and race, and pooled features.

The paper measures counterfactuals with torchxrayvision's published classifiers
(docs/method.md section 7); those mean something on real films only. Phantoms are measured
with small networks trained on the synthetic cohort (``instructx2x-train train-classifiers``).
Both sit behind ``ClassifierSet.predict``, so the evaluation and the per-edit verification
never ask which one they hold; each set says what it is and where its figures mean nothing.

``load_classifiers`` picks a set by name: ``cohort-v2`` (bundled, trained on cohort v2
phantoms), ``torchxrayvision`` (``xrv_classifiers``; weights from its cache, never
downloaded), or a folder written by ``train-classifiers``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .classifier_set import FINDING_TO_PATHOLOGY, PATHOLOGIES, RACES, ClassifierSet, Predictions
from .errors import ModelLoadError

__all__ = [
    "PATHOLOGIES",
    "FINDING_TO_PATHOLOGY",
    "RACES",
    "COHORT_SET_NAME",
    "Predictions",
    "resize_films",
    "ClassifierSet",
    "CohortNetwork",
    "CohortClassifiers",
    "load_classifiers",
    "save_cohort_classifiers",
]

COHORT_SET_NAME = "cohort-v2"
CARD_NAME = "classifiers.json"
WEIGHTS_NAME = "classifiers.safetensors"
CARD_FORMAT = "instructx2x-cohort-classifiers/1"


class CohortNetwork(nn.Module):
    """A strided stem, four convolution stages, global average pooling, four heads (findings,
    age, sex, race): small enough to train on two CPU cores in minutes."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        layers = [nn.Conv2d(1, width, 5, padding=2, stride=2), nn.BatchNorm2d(width), nn.SiLU()]
        channels = width
        for out in (width, 2 * width, 4 * width, 4 * width):
            layers += [
                nn.Conv2d(channels, out, 3, padding=1),
                nn.BatchNorm2d(out),
                nn.SiLU(),
                nn.Conv2d(out, out, 3, padding=1, stride=2),
                nn.BatchNorm2d(out),
                nn.SiLU(),
            ]
            channels = out
        self.body = nn.Sequential(*layers)
        self.findings = nn.Linear(channels, len(PATHOLOGIES))
        self.age = nn.Linear(channels, 1)
        self.sex = nn.Linear(channels, 1)
        self.race = nn.Linear(channels, len(RACES))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``images``: ``(N, 1, H, W)`` in [0, 1]. Returns logits, age (years) and features.

        Each film is first stretched so that its 1st and 99th percentiles span [-1, 1]: the same
        film read through another display window (a DICOM reader's min-max or VOI window, a PNG
        export) then reads the same.
        """
        flat = images.flatten(1)
        low, high = torch.quantile(flat, flat.new_tensor([0.01, 0.99]), dim=1)
        scale = (high - low).clamp_min(1e-3)[:, None, None, None]
        normalised = (images - low[:, None, None, None]) / scale * 2 - 1
        features = self.body(normalised).mean(dim=(2, 3))
        return {
            "findings": self.findings(features),
            "age": 55 + 20 * self.age(features)[:, 0],
            "sex": self.sex(features)[:, 0],
            "race": self.race(features),
            "features": features,
        }


def resize_films(images: list[np.ndarray] | np.ndarray, side: int) -> torch.Tensor:
    """``(N, 1, side, side)`` float32: each film squashed to a square with area averaging (the
    editor's default aspect handling), so a film and its edit are resampled alike."""
    tensors = []
    for image in images:
        tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
        if tensor.shape[-2:] != (side, side):
            tensor = F.interpolate(tensor, size=(side, side), mode="area")
        tensors.append(tensor)
    return torch.cat(tensors)


class CohortClassifiers(ClassifierSet):
    """Networks trained on cohort v2 phantoms; their card carries the held-out accuracy."""

    caveat = "trained on synthetic phantoms (cohort v2): its figures mean nothing on a real film"

    def __init__(self, network: CohortNetwork, card: dict, name: str) -> None:
        self.network = network.eval()
        self.card = card
        self.name = name
        self.resolution = int(card["resolution"])

    @classmethod
    def from_folder(cls, folder: str | Path, name: str | None = None) -> CohortClassifiers:
        """A folder written by ``save_cohort_classifiers``.

        Raises
        ------
        ModelLoadError
            Naming the missing or unreadable file.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        for file_name in (CARD_NAME, WEIGHTS_NAME):
            if not (folder / file_name).is_file():
                raise ModelLoadError(
                    f"classifier set {folder.name}: {file_name} is missing (train one "
                    "with `instructx2x-train train-classifiers`)."
                )
        try:
            card = json.loads((folder / CARD_NAME).read_text())
            if card.get("format") != CARD_FORMAT:
                raise ValueError(f"format {card.get('format')!r} is not {CARD_FORMAT}")
            network = CohortNetwork(int(card["width"]))
            weights = load_file(folder / WEIGHTS_NAME)
            _check_fit(network, weights, int(card["width"]))
            network.load_state_dict(weights)
        except (ValueError, KeyError, RuntimeError, OSError, SafetensorError) as error:
            raise ModelLoadError(f"classifier set {folder.name} cannot be read: {error}") from None
        return cls(network, card, name or folder.name)

    @torch.no_grad()
    def predict(self, images: list[np.ndarray] | np.ndarray, batch_size: int = 32) -> Predictions:
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(images), batch_size):
            out = self.network(resize_films(images[start : start + batch_size], self.resolution))
            values = {
                "findings": torch.sigmoid(out["findings"]),
                "age": out["age"],
                "sex_female": torch.sigmoid(out["sex"]),
                "race": out["race"].softmax(-1),
                "features": out["features"],
            }
            for key, value in values.items():
                parts.setdefault(key, []).append(value.numpy())
        return Predictions(**{key: np.concatenate(value) for key, value in parts.items()})

    def describe(self) -> dict:
        return {**super().describe(), "held_out": self.card.get("held_out")}


def _check_fit(network: torch.nn.Module, weights: dict[str, torch.Tensor], width: int) -> None:
    """Raise ValueError, in one line, when the weights are not the network's tensors."""
    expected = network.state_dict()
    misfits = [
        f"{key} {tuple(weights[key].shape)} for {tuple(value.shape)}"
        for key, value in expected.items()
        if key in weights and weights[key].shape != value.shape
    ]
    missing = [key for key in expected if key not in weights]
    unexpected = [key for key in weights if key not in expected]
    if misfits or missing or unexpected:
        example = (misfits or missing or unexpected)[0]
        raise ValueError(
            f"its weights do not fit the network of width {width} its card describes: "
            f"{len(misfits)} tensor(s) of another shape, {len(missing)} missing, {len(unexpected)} "
            f"unexpected (first: {example})"
        )


def save_cohort_classifiers(network: CohortNetwork, card: dict, folder: Path) -> None:
    """Write a set (weights in safetensors, the card as JSON) into an existing empty folder."""
    from safetensors.torch import save_file

    save_file({key: value.contiguous() for key, value in network.state_dict().items()}, folder / WEIGHTS_NAME)
    (folder / CARD_NAME).write_text(json.dumps({"format": CARD_FORMAT, **card}, indent=2) + "\n")


def load_classifiers(spec: str, weights_dir: str | Path | None = None) -> ClassifierSet:
    """A classifier set by name (``cohort-v2``, ``torchxrayvision``) or folder.

    ``weights_dir`` is where torchxrayvision's weight files lie (default: its own cache);
    nothing is ever downloaded.

    Raises
    ------
    ModelLoadError
        An unknown name, a folder that is not a set, or missing weight files (the message
        says which files go where).
    """
    if spec == COHORT_SET_NAME:
        with resources.as_file(resources.files("instructx2x") / "resources" / "cohort_classifiers") as folder:
            return CohortClassifiers.from_folder(folder, name=COHORT_SET_NAME)
    if spec == "torchxrayvision":
        from .xrv_classifiers import TorchXRayVisionClassifiers

        return TorchXRayVisionClassifiers.from_weights(weights_dir)
    if Path(spec).is_dir():
        return CohortClassifiers.from_folder(spec)
    raise ModelLoadError(
        f"unknown classifier set {spec!r}: use {COHORT_SET_NAME}, torchxrayvision "
        "or a folder written by `instructx2x-train train-classifiers`."
    )
