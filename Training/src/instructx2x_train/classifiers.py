"""``instructx2x-train train-classifiers``: classifiers for the synthetic cohort.

The paper measures edits with torchxrayvision's classifiers (docs/method.md section 7); on phantoms those
mean nothing, so the same measurements run with a small network trained here on cohort v2
films: the five evaluated findings (multi-label), age (years), sex and race, as the phantoms
render them. Films are drawn fresh from the phantom (film i from ``default_rng([seed, i])``);
the held-out films come from another seed stream, and their accuracy and AUROC (with bootstrap
95 % intervals) go into the set's card (``classifiers.json``) and ``classifiers.md``, twice: on
films whose devices are drawn as in training, and on the same films with each device drawn
independently of the findings, where a classifier that reads a drain for a pneumothorax it
learned on a confounded split loses what the drain gave it.
The network and its loader live in the inference library (``instructx2x.classifiers``), which
the evaluation and the per-edit verification use.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from instructx2x.classifiers import (
    FINDING_TO_PATHOLOGY,
    PATHOLOGIES,
    RACES,
    CohortClassifiers,
    CohortNetwork,
    resize_films,
    save_cohort_classifiers,
)
from instructx2x.errors import OutputExistsError
from instructx2x.outputs import atomic_output_dir

from . import metrics
from .phantom import (
    DEVICES,
    Anatomy,
    DeviceState,
    FindingState,
    Pose,
    device_masks,
    form_film,
    level_words,
    render_attenuation,
)

__all__ = [
    "EVALUATED_FINDINGS",
    "ClassifierConfig",
    "DeviceDraw",
    "PhantomDraw",
    "draw_phantom",
    "train_classifiers",
    "draw_films",
    "held_out_figures",
    "held_out_markdown",
    "held_out_splits",
]

# The five pathologies in the phantoms' finding names (the instruction vocabulary), PATHOLOGIES' order.
EVALUATED_FINDINGS = tuple(
    next(finding for finding, pathology in FINDING_TO_PATHOLOGY.items() if pathology == name)
    for name in PATHOLOGIES
)
AUROC_RESAMPLES = 1000
MARKDOWN_NAME = "classifiers.md"
HELD_OUT_STREAM = 1_000_003  # added to the seed: held-out films never repeat a training film
DEVICE_STREAM = 29  # a film's devices come from their own stream: films without devices stay as they were


@dataclasses.dataclass(frozen=True)
class DeviceDraw:
    """How often films carry devices: a chest drain with probability ``drain_with_pneumothorax``
    on films with a pneumothorax (on its side) and ``drain_without_pneumothorax`` on the others
    (the two equal: a clean split; far apart: a split where the drain stands in for the finding);
    a pacemaker, an ECG lead and a text marker each with probability ``others``."""

    drain_with_pneumothorax: float = 0.0
    drain_without_pneumothorax: float = 0.0
    others: float = 0.0

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if not 0 <= value <= 1:
                raise ValueError(f"{name.replace('_', ' ')} is a probability in [0, 1], got {value}.")

    def draw(self, rng: np.random.Generator, present: list[FindingState]) -> tuple[DeviceState, ...]:
        """The devices of one film, given its findings."""
        pneumothorax = next((finding for finding in present if finding.name == "pneumothorax"), None)
        drain = self.drain_with_pneumothorax if pneumothorax else self.drain_without_pneumothorax
        draws = rng.random(len(DEVICES))
        sides = [str(side) for side in rng.choice(("left", "right"), len(DEVICES))]
        if pneumothorax:
            sides[0] = pneumothorax.side
        chances = (drain,) + (self.others,) * (len(DEVICES) - 1)
        return tuple(
            DeviceState(name, side, int(seed))
            for name, side, chance, draw, seed in zip(
                DEVICES, sides, chances, draws, rng.integers(0, 2**31, len(DEVICES))
            )
            if draw < chance
        )

    def independent(self, finding_probability: float) -> DeviceDraw:
        """The same devices as often, each drawn independently of the findings: a chest drain on
        the share of films this draw gives one when each film has a pneumothorax with probability
        ``finding_probability`` (the drain on the pneumothorax's side where there is one). A draw
        whose drain does not depend on the pneumothorax is its own independent draw."""
        if self.drain_with_pneumothorax == self.drain_without_pneumothorax:
            return self
        drain = self.drain_with_pneumothorax * finding_probability + self.drain_without_pneumothorax * (
            1 - finding_probability
        )
        return DeviceDraw(drain, drain, self.others)


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """A classifier run: films drawn from the phantom, the schedule, and the held-out check."""

    films: int = 4000
    held_out: int = 500
    resolution: int = 128  # what the network sees
    render_resolution: int = 256  # films are drawn at the test sets' size, then resized
    steps: int = 2000
    batch: int = 32
    learning_rate: float = 2e-3
    width: int = 32
    seed: int = 0
    finding_probability: float = 0.35  # each of the five, independently
    workers: int = 1
    devices: DeviceDraw = DeviceDraw()

    def __post_init__(self) -> None:
        if min(self.films, self.held_out, self.steps, self.batch, self.width, self.workers) < 1:
            raise ValueError("films, held_out, steps, batch, width and workers must be >= 1.")
        if self.resolution < 64 or self.resolution % 16:
            raise ValueError(f"resolution must be a multiple of 16 and >= 64, got {self.resolution}.")
        if self.render_resolution < self.resolution:
            raise ValueError(f"render_resolution must be >= resolution, got {self.render_resolution}.")
        if not 0 < self.finding_probability < 1:
            raise ValueError(f"finding_probability must lie in (0, 1), got {self.finding_probability}.")


@dataclasses.dataclass(frozen=True)
class PhantomDraw:
    """One film's phantom as ``draw_films`` draws it: the body (with its demographics), the
    findings present, the pose, the devices and the quantum noise field (the film's own stream).
    ``render`` films it with these findings or others, everything else the same."""

    anatomy: Anatomy
    findings: tuple[FindingState, ...]
    pose: Pose
    devices: tuple[DeviceState, ...]
    noise: np.ndarray = dataclasses.field(repr=False, compare=False)

    def render(self, findings: tuple[FindingState, ...] | None = None) -> np.ndarray:
        """The film (float32 in [0, 1], at the noise field's size) with ``findings`` (default:
        its own)."""
        size = self.noise.shape[0]
        attenuation = render_attenuation(
            size,
            size,
            self.anatomy,
            list(self.findings if findings is None else findings),
            self.pose,
            devices=self.devices,
        )
        return form_film(attenuation, self.noise, 0.0012 * size)

    def record(self) -> dict:
        """The phantom's parameters as JSON values (the noise field is the film's stream's)."""
        return json.loads(
            json.dumps(
                {
                    "anatomy": dataclasses.asdict(self.anatomy),
                    "findings": [dataclasses.asdict(finding) for finding in self.findings],
                    "pose": dataclasses.asdict(self.pose),
                    "devices": [dataclasses.asdict(device) for device in self.devices],
                }
            )
        )


def draw_phantom(
    seed: int, index: int, resolution: int, finding_probability: float, device_draw: DeviceDraw
) -> PhantomDraw:
    """Film ``index`` of the stream ``seed``: its phantom from ``default_rng([seed, index])``, its
    devices from their own stream."""
    rng = np.random.default_rng([seed, index])
    age, sex, race = int(rng.integers(25, 90)), str(rng.choice(("F", "M"))), str(rng.choice(RACES))
    anatomy = Anatomy.draw(rng, age, sex, race)
    present = tuple(
        FindingState(
            name,
            str(rng.choice(level_words(name))),
            str(rng.choice(("left", "right"))),
            (float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1))),
            int(rng.integers(0, 2**31)),
        )
        for name in EVALUATED_FINDINGS
        if rng.random() < finding_probability
    )
    pose = Pose(
        float(rng.normal(0, 1.5)),
        float(rng.uniform(0.97, 1.03)),
        float(rng.normal(0, 0.02)),
        float(rng.normal(0, 0.02)),
    )
    noise = rng.standard_normal((resolution, resolution)).astype(np.float32)
    devices = device_draw.draw(np.random.default_rng([seed, index, DEVICE_STREAM]), list(present))
    return PhantomDraw(anatomy, present, pose, devices, noise)


def _film(args: tuple[int, int, int, float, int, DeviceDraw, bool]) -> tuple[np.ndarray, dict]:
    seed, index, resolution, finding_probability, size, device_draw, with_masks = args
    phantom = draw_phantom(seed, index, resolution, finding_probability, device_draw)
    anatomy, present, pose, devices = phantom.anatomy, phantom.findings, phantom.pose, phantom.devices
    age, sex, race = anatomy.age, anatomy.sex, anatomy.race
    film = phantom.render()
    if size != resolution:
        film = resize_films([film], size)[0, 0].numpy()
    names = {finding.name for finding in present}
    labels = {
        "findings": [float(name in names) for name in EVALUATED_FINDINGS],
        "age": float(age),
        "sex_female": float(sex == "F"),
        "race": RACES.index(race),
        "devices": [device.name for device in devices],
    }
    if with_masks:  # at the film's size: what a keep region of a stress test needs
        masks = device_masks(resolution, resolution, anatomy, list(devices), pose)
        if size != resolution:
            masks = {
                name: resize_films([mask.astype(np.float32)], size)[0, 0].numpy() > 0
                for name, mask in masks.items()
            }
        labels["device_masks"] = masks
        labels["present"] = list(present)
    return film, labels


def draw_films(
    count: int,
    resolution: int,
    seed: int,
    finding_probability: float = 0.35,
    workers: int = 1,
    size: int | None = None,
    progress_bar: bool = False,
    devices: DeviceDraw = DeviceDraw(),
    with_masks: bool = False,
) -> tuple[np.ndarray, list[dict]]:
    """Films drawn at ``resolution`` (resized to ``size`` when given) with random demographics,
    findings and ``devices``, and their labels (with each device's mask and the findings drawn
    when ``with_masks``); the same bytes for any number of workers."""
    tasks = [
        (seed, index, resolution, finding_probability, size or resolution, devices, with_masks)
        for index in range(count)
    ]
    with ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        drawn = list(
            tqdm(
                pool.map(_film, tasks, chunksize=32) if pool else map(_film, tasks),
                total=count,
                desc="films",
                unit="film",
                disable=not progress_bar,
            )
        )
    return np.stack([film for film, _ in drawn]), [labels for _, labels in drawn]


def _targets(labels: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "findings": torch.tensor([item["findings"] for item in labels]),
        "age": torch.tensor([item["age"] for item in labels]),
        "sex": torch.tensor([item["sex_female"] for item in labels]),
        "race": torch.tensor([item["race"] for item in labels]),
    }


def held_out_figures(
    classifiers: CohortClassifiers, films: np.ndarray, labels: list[dict], seed: int = 0
) -> dict:
    """Accuracy and AUROC per finding (the AUROC with a percentile bootstrap 95 % interval over
    the films, ``AUROC_RESAMPLES`` draws seeded with ``seed``; None where the films lack a
    positive or a negative), sex and race accuracy, age error and correlation, on labelled films."""
    predicted = classifiers.predict(films)
    assert predicted.sex_female is not None  # the cohort's classifiers estimate sex
    truth = {key: value.numpy() for key, value in _targets(labels).items()}
    correct = (predicted.findings >= 0.5) == truth["findings"].astype(bool)
    positive = truth["findings"].astype(bool)

    def aurocs(index: np.ndarray) -> dict[str, float]:
        return {
            name: metrics.auroc(positive[index, i], predicted.findings[index, i])
            for i, name in enumerate(PATHOLOGIES)
        }

    with warnings.catch_warnings():  # a draw without a positive or a negative has no AUROC
        warnings.simplefilter("ignore", RuntimeWarning)
        intervals = metrics.bootstrap_intervals(aurocs, len(films), AUROC_RESAMPLES, seed=seed)
    return {
        "films": len(films),
        "finding_accuracy": {name: float(correct[:, i].mean()) for i, name in enumerate(PATHOLOGIES)},
        "finding_auroc": {name: _defined(value) for name, value in aurocs(np.arange(len(films))).items()},
        "finding_auroc_95": {
            name: [_defined(low), _defined(high)] for name, (low, high) in intervals.items()
        },
        "auroc_bootstrap": {"resamples": AUROC_RESAMPLES, "seed": seed},
        "age_mae_years": float(np.abs(predicted.age - truth["age"]).mean()),
        "age_pearson_r": float(np.corrcoef(predicted.age, truth["age"])[0, 1]),
        "sex_accuracy": float(((predicted.sex_female >= 0.5) == truth["sex"].astype(bool)).mean()),
        "race_accuracy": float((predicted.race.argmax(-1) == truth["race"]).mean()),
    }


def _defined(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def held_out_markdown(card: dict) -> str:
    """The set's held-out figures as a markdown card: the films, then per finding its accuracy
    and AUROC with the 95 % interval on the held-out split and on the same films with devices
    independent of the findings, then sex, race and age."""
    figures, independent = card["held_out"], card["held_out_devices_independent"]
    devices = card["config"]["devices"]
    bootstrap = figures["auroc_bootstrap"]
    if devices == independent["devices"]:
        independence = (
            "Its devices are drawn independently of the findings already: the two columns are the same films."
        )
    else:
        independence = (
            f"The last two columns: the same films with each device drawn independently of the findings (a chest "
            f"drain on {independent['devices']['drain_with_pneumothorax'] * 100:.0f} % of all films, as many as "
            "the training split has); a classifier that reads the drain for the pneumothorax scores lower there "
            "than on its own split."
        )
    lines = [
        "# Classifier set: held-out figures",
        "",
        f"{figures['films']} held-out films (seed {card['config']['seed'] + HELD_OUT_STREAM}, never used in "
        f"training), drawn like the {card['config']['films']} training films: each finding with probability "
        f"{card['config']['finding_probability']}; a chest drain on {devices['drain_with_pneumothorax'] * 100:.0f} % "
        f"of the films with a pneumothorax and {devices['drain_without_pneumothorax'] * 100:.0f} % of the others; "
        f"a pacemaker, an ECG lead and a text marker each on {devices['others'] * 100:.0f} %. {independence} "
        f"AUROC intervals: percentile bootstrap over the films, {bootstrap['resamples']} resamples, "
        f"seed {bootstrap['seed']}. Trained on synthetic phantoms: meaningless on real films.",
        "",
        "| finding | accuracy (0.5) | AUROC [95 % interval] | accuracy, devices independent | "
        "AUROC, devices independent |",
        "|---|---|---|---|---|",
    ]
    for name in card["pathologies"]:
        cells = [
            f"{split['finding_accuracy'][name]:.3f} | {_auroc_cell(split, name)}"
            for split in (figures, independent)
        ]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        f"Sex accuracy {figures['sex_accuracy']:.3f}, race accuracy {figures['race_accuracy']:.3f}, age "
        f"mean absolute error {figures['age_mae_years']:.1f} years (Pearson r {figures['age_pearson_r']:.3f}); "
        f"{card['training_seconds']:.0f} s to draw, train and measure.",
    ]
    return "\n".join(lines) + "\n"


def _auroc_cell(figures: dict, name: str) -> str:
    value, (low, high) = figures["finding_auroc"][name], figures["finding_auroc_95"][name]
    if value is None:
        return "-"
    return f"{value:.3f}" if low is None else f"{value:.3f} [{low:.3f}, {high:.3f}]"


def held_out_splits(
    config: ClassifierConfig, progress_bar: bool = False
) -> dict[str, tuple[DeviceDraw, np.ndarray, list[dict]]]:
    """The held-out films (the seed stream ``seed + HELD_OUT_STREAM``) by split, each with its
    device draw: ``held_out`` with the devices drawn as in training, ``held_out_devices_independent``
    the same phantoms with each device drawn independently of the findings (the same films when
    the training draw is independent already)."""
    independent = config.devices.independent(config.finding_probability)
    splits: dict[str, tuple[DeviceDraw, np.ndarray, list[dict]]] = {}
    for key, devices in (("held_out", config.devices), ("held_out_devices_independent", independent)):
        if key != "held_out" and devices == config.devices:
            splits[key] = (devices, *splits["held_out"][1:])
            continue
        films, labels = draw_films(
            config.held_out,
            config.render_resolution,
            config.seed + HELD_OUT_STREAM,
            config.finding_probability,
            config.workers,
            progress_bar=progress_bar,
            devices=devices,
        )
        splits[key] = (devices, films, labels)
    return splits


def train_classifiers(output: str | Path, config: ClassifierConfig, progress_bar: bool = True) -> dict:
    """Draw films, train, measure on held-out films, write the set and its ``classifiers.md``
    (atomically).

    Raises
    ------
    OutputExistsError
        When ``output`` exists (checked before any work).
    """
    output = Path(output)
    if output.exists():
        raise OutputExistsError(f"output folder {output.name} already exists; choose a new one.")
    started = time.perf_counter()
    films, labels = draw_films(
        config.films,
        config.render_resolution,
        config.seed,
        config.finding_probability,
        config.workers,
        size=config.resolution,
        progress_bar=progress_bar,
        devices=config.devices,
    )
    targets = _targets(labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        network = CohortNetwork(config.width)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.learning_rate, total_steps=config.steps)
    images = torch.from_numpy(films)[:, None]
    network.train()
    for _ in tqdm(range(config.steps), desc="classifiers", unit="step", disable=not progress_bar):
        index = torch.randint(0, len(images), (config.batch,), generator=generator)
        out = network(images[index])
        loss = (
            F.binary_cross_entropy_with_logits(out["findings"], targets["findings"][index])
            + F.smooth_l1_loss(out["age"] / 20, targets["age"][index] / 20)
            + F.binary_cross_entropy_with_logits(out["sex"], targets["sex"][index])
            + F.cross_entropy(out["race"], targets["race"][index])
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    card = {
        "resolution": config.resolution,
        "width": config.width,
        "config": dataclasses.asdict(config),
        "pathologies": list(PATHOLOGIES),
        "races": list(RACES),
        "note": "trained on synthetic phantoms (cohort v2); meaningless on real films",
    }
    classifiers = CohortClassifiers(network, card, output.name)
    for key, (devices, test_films, test_labels) in held_out_splits(config, progress_bar).items():
        figures = held_out_figures(classifiers, test_films, test_labels, seed=config.seed)
        card[key] = figures if key == "held_out" else {**figures, "devices": dataclasses.asdict(devices)}
    card["training_seconds"] = round(time.perf_counter() - started, 1)
    with atomic_output_dir(output) as staging:
        save_cohort_classifiers(network, card, staging)
        (staging / MARKDOWN_NAME).write_text(held_out_markdown(card))
    return card
