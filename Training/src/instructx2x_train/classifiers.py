"""Classifiers for the synthetic cohort: findings, age, sex and race as the phantoms render them.

The paper measures edits with torchxrayvision's classifiers (SPEC section 7); on phantoms those
mean nothing, so the same measurements run with small networks trained on cohort v2 films
(``instructx2x-train train-classifiers``). One network, four heads: the five evaluated
findings (multi-label), age (regression, years), sex and race; its pooled features are what
FID is computed on. Saved as safetensors with a JSON card that carries the held-out accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from instructx2x.outputs import atomic_output_dir

from .phantom import RACES, Anatomy, FindingState, Pose, form_film, level_words, render_attenuation

__all__ = ["EVALUATED_FINDINGS", "ClassifierConfig", "CohortClassifier", "train_classifiers",
           "load_classifiers", "draw_films"]

# The paper's five evaluated pathologies (SPEC section 7), in the phantoms' names.
EVALUATED_FINDINGS = ("atelectasis", "cardiomegaly", "edema", "pleural effusion", "pneumothorax")
CARD_NAME = "classifiers.json"
WEIGHTS_NAME = "classifiers.safetensors"


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """A classifier run: films drawn from the phantom, the schedule, and the held-out check."""

    films: int = 4000
    held_out: int = 500
    resolution: int = 128
    steps: int = 1500
    batch: int = 32
    learning_rate: float = 2e-3
    seed: int = 0
    finding_probability: float = 0.35  # each of the five, independently

    def __post_init__(self) -> None:
        if min(self.films, self.held_out, self.steps, self.batch) < 1:
            raise ValueError("films, held_out, steps and batch must be >= 1.")
        if self.resolution < 64 or self.resolution % 16:
            raise ValueError(f"resolution must be a multiple of 16 and >= 64, got {self.resolution}.")


class CohortClassifier(nn.Module):
    """Four convolution stages, global average pooling, four heads."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        layers, channels = [], 1
        for out in (width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.GroupNorm(8, out), nn.SiLU(),
                       nn.Conv2d(out, out, 3, padding=1, stride=2), nn.GroupNorm(8, out), nn.SiLU()]
            channels = out
        self.body = nn.Sequential(*layers)
        self.findings = nn.Linear(channels, len(EVALUATED_FINDINGS))
        self.age = nn.Linear(channels, 1)
        self.sex = nn.Linear(channels, 1)
        self.race = nn.Linear(channels, len(RACES))
        self.feature_size = channels

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``images``: ``(N, 1, H, W)`` in [0, 1]. Returns logits, age (years) and features."""
        features = self.body(images * 2 - 1).mean(dim=(2, 3))
        return {"findings": self.findings(features), "age": 55 + 20 * self.age(features)[:, 0],
                "sex": self.sex(features)[:, 0], "race": self.race(features), "features": features}

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch: int = 64) -> dict[str, np.ndarray]:
        """Probabilities and features for ``(N, H, W)`` films in [0, 1] at the trained size."""
        self.eval()
        parts: dict[str, list] = {}
        for start in range(0, len(images), batch):
            x = torch.from_numpy(np.asarray(images[start:start + batch], np.float32))[:, None]
            out = self(x)
            values = {"findings": torch.sigmoid(out["findings"]), "age": out["age"],
                      "sex_female": torch.sigmoid(out["sex"]), "race": out["race"].softmax(-1),
                      "features": out["features"]}
            for key, value in values.items():
                parts.setdefault(key, []).append(value.numpy())
        return {key: np.concatenate(value) for key, value in parts.items()}


def draw_films(count: int, resolution: int, seed: int, finding_probability: float = 0.35):
    """Films with random demographics and findings, and their labels (film i from
    ``default_rng([seed, i])``)."""
    films, labels = [], []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        age, sex, race = int(rng.integers(25, 90)), str(rng.choice(("F", "M"))), str(rng.choice(RACES))
        anatomy = Anatomy.draw(rng, age, sex, race)
        present = [FindingState(name, str(rng.choice(level_words(name))), str(rng.choice(("left", "right"))),
                                (float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1))), int(rng.integers(0, 2**31)))
                   for name in EVALUATED_FINDINGS if rng.random() < finding_probability]
        pose = Pose(float(rng.normal(0, 1.5)), float(rng.uniform(0.97, 1.03)), float(rng.normal(0, 0.02)),
                    float(rng.normal(0, 0.02)))
        noise = rng.standard_normal((resolution, resolution)).astype(np.float32)
        films.append(form_film(render_attenuation(resolution, resolution, anatomy, present, pose), noise,
                               0.0012 * resolution))
        labels.append({"findings": [float(any(f.name == name for f in present)) for name in EVALUATED_FINDINGS],
                       "age": float(age), "sex_female": float(sex == "F"), "race": RACES.index(race)})
    return np.stack(films), labels


def _targets(labels: list[dict]) -> dict[str, torch.Tensor]:
    return {"findings": torch.tensor([l["findings"] for l in labels]),
            "age": torch.tensor([l["age"] for l in labels]),
            "sex": torch.tensor([l["sex_female"] for l in labels]),
            "race": torch.tensor([l["race"] for l in labels])}


def _held_out_figures(model: CohortClassifier, films: np.ndarray, labels: list[dict]) -> dict:
    predicted = model.predict(films)
    truth = _targets(labels)
    findings = (predicted["findings"] >= 0.5) == truth["findings"].numpy().astype(bool)
    return {"finding_accuracy": {name: float(findings[:, i].mean()) for i, name in enumerate(EVALUATED_FINDINGS)},
            "age_mae_years": float(np.abs(predicted["age"] - truth["age"].numpy()).mean()),
            "age_pearson_r": float(np.corrcoef(predicted["age"], truth["age"].numpy())[0, 1]),
            "sex_accuracy": float(((predicted["sex_female"] >= 0.5) == truth["sex"].numpy().astype(bool)).mean()),
            "race_accuracy": float((predicted["race"].argmax(-1) == truth["race"].numpy()).mean())}


def train_classifiers(output: str | Path, config: ClassifierConfig, progress_bar: bool = True) -> dict:
    """Draw films, train, measure on held-out films (another seed stream), write the set.

    Raises
    ------
    FileExistsError
        When ``output`` exists (checked before any work).
    """
    from safetensors.torch import save_file

    output = Path(output)
    if output.exists():
        raise FileExistsError(f"output folder {output.name} already exists; choose a new one.")
    started = time.perf_counter()
    films, labels = draw_films(config.films, config.resolution, config.seed, config.finding_probability)
    test_films, test_labels = draw_films(config.held_out, config.resolution, config.seed + 1_000_003,
                                         config.finding_probability)
    targets = _targets(labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = CohortClassifier()
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.learning_rate, total_steps=config.steps)
    images = torch.from_numpy(films)[:, None]
    model.train()
    for _ in tqdm(range(config.steps), desc="classifiers", unit="step", disable=not progress_bar):
        index = torch.randint(0, len(images), (config.batch,), generator=generator)
        out = model(images[index])
        loss = (F.binary_cross_entropy_with_logits(out["findings"], targets["findings"][index])
                + F.smooth_l1_loss(out["age"] / 20, targets["age"][index] / 20)
                + F.binary_cross_entropy_with_logits(out["sex"], targets["sex"][index])
                + F.cross_entropy(out["race"], targets["race"][index]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    card = {"format": "instructx2x-cohort-classifiers/1", "config": dataclasses.asdict(config),
            "findings": list(EVALUATED_FINDINGS), "races": list(RACES),
            "held_out": _held_out_figures(model, test_films, test_labels),
            "seconds": round(time.perf_counter() - started, 1),
            "note": "trained on synthetic phantoms (cohort v2); meaningless on real films"}
    with atomic_output_dir(output) as staging:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, staging / WEIGHTS_NAME)
        (staging / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    return card


def load_classifiers(folder: str | Path) -> tuple[CohortClassifier, dict]:
    """A saved classifier set and its card.

    Raises
    ------
    FileNotFoundError
        Naming the missing file.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (CARD_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder.name}/{name} is missing: train the set with "
                                    "`instructx2x-train train-classifiers`.")
    card = json.loads((folder / CARD_NAME).read_text())
    model = CohortClassifier()
    model.load_state_dict(load_file(folder / WEIGHTS_NAME))
    return model.eval(), card
