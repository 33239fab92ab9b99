"""Pure counterfactual pairs: two films that differ only by the instructed finding.

Real data never has the true counterfactual of an edit; a phantom does. Each pair shares the
patient's anatomy, pose and quantum noise and differs only inside the finding's ground-truth
mask (outside it the two films are the same bytes). The same findings can be inserted into
real normal films a site supplies (``backgrounds``): the film is read as a density map through
the phantom's contrast curve, the finding's attenuation is added on the phantom's standard
thorax, and only the lesion's pixels change.

The folder is a MIMIC-EDIT-INSTRUCTION dataset (``instructx2x-train train`` reads it) with
``truth.csv`` (what each pair is) and a ``.masks.npz`` beside every image (one boolean array
per finding present, as in the cohort).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from instructx2x.outputs import atomic_output_dir

from .phantom import (
    LATERALISED_FINDINGS,
    RACES,
    RENDERED_FINDINGS,
    ZONED_FINDINGS,
    Anatomy,
    FindingState,
    Pose,
    at_zone_centre,
    draw_finding,
    finding_masks,
    form_film,
    redraw_texture,
    render_attenuation,
)

__all__ = [
    "PurePairsConfig",
    "write_pure_pairs",
    "instruction_for",
    "OPERATIONS",
    "insert_finding",
    "TRUTH_COLUMNS",
    "plausible_targets",
    "pairs_config",
    "pairs_settings",
]

logger = logging.getLogger(__name__)

OPERATIONS = ("add", "remove")
TRUTH_COLUMNS = [
    "pair_id",
    "split",
    "operation",
    "finding",
    "side",
    "zone",
    "level",
    "instruction",
    "age",
    "sex",
    "race",
    "background",
    "other_finding",
]
_BACKGROUND_SUFFIXES = (".dcm", ".dicom", ".png", ".jpg", ".jpeg")


def instruction_for(operation: str, finding: FindingState) -> str:
    """The instruction that turns the pair's input into its target, in the training templates."""
    site = f"{finding.side} " if finding.name in LATERALISED_FINDINGS else ""
    if finding.name in ZONED_FINDINGS:
        site += f"{finding.zone} zone "
    if operation == "add":
        return f"Add the finding of {finding.level} {site}{finding.name}"
    return f"Remove the finding of {site}{finding.name}"


@dataclasses.dataclass(frozen=True)
class PurePairsConfig:
    """What to generate.

    Attributes
    ----------
    pairs: int
        Number of pairs; findings, operations and sides cycle so that each is balanced.
    seed: int
        Fixes every draw; pair i uses ``numpy.random.default_rng([seed, i])``, whatever the
        number of workers. Use a seed never used in training for a held-out set.
    resolution: int
        Square image size.
    findings: tuple[str, ...]
        Findings to pair (names from ``RENDERED_FINDINGS``).
    operations: tuple[str, ...]
        ``add`` (input without, target with) and/or ``remove``.
    validation_fraction: float
        Share of pairs in split ``validation`` (the rest in ``split``).
    split: str
        Split name of the other pairs (``train`` for a training set, ``test`` for held-out).
    other_finding_probability: float
        Chance that another finding is present in both films (edits amid other disease).
    backgrounds: str
        Folder of real normal PA films (DICOM/PNG/JPEG) to insert findings into instead of
        phantoms; empty for phantoms.
    workers: int
        Worker processes.
    """

    pairs: int = 1000
    seed: int = 0
    resolution: int = 256
    findings: tuple[str, ...] = RENDERED_FINDINGS
    operations: tuple[str, ...] = OPERATIONS
    validation_fraction: float = 0.0
    split: str = "train"
    other_finding_probability: float = 0.25
    backgrounds: str = ""
    workers: int = 1

    def __post_init__(self) -> None:
        if self.pairs < 1:
            raise ValueError(f"pairs must be >= 1, got {self.pairs}.")
        if self.resolution < 64:
            raise ValueError(f"resolution must be >= 64, got {self.resolution}.")
        unknown = [f for f in self.findings if f not in RENDERED_FINDINGS]
        if unknown or not self.findings:
            raise ValueError(
                f"findings must be among {', '.join(RENDERED_FINDINGS)}; got {unknown or 'none'}."
            )
        if not self.operations or any(o not in OPERATIONS for o in self.operations):
            raise ValueError(
                f"operations must be among {', '.join(OPERATIONS)}; got {list(self.operations)}."
            )
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}.")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}.")
        if self.backgrounds and not Path(self.backgrounds).is_dir():
            raise FileNotFoundError(f"backgrounds folder not found: {Path(self.backgrounds).name}.")


def _plan(config: PurePairsConfig, index: int, rng: np.random.Generator):
    """What pair ``index`` shows: balanced over finding x operation x side; focal opacities at
    their zone's centre, where the instruction puts them."""
    findings, operations = config.findings, config.operations
    name = findings[index % len(findings)]
    operation = operations[(index // len(findings)) % len(operations)]
    side = ("left", "right")[(index // (len(findings) * len(operations))) % 2]
    # draw_finding still draws a site (then set aside): every later draw, and so every pair's
    # bytes, stays what the bundled demo model was trained on
    target = at_zone_centre(draw_finding(rng, name, side))
    other = None
    if rng.random() < config.other_finding_probability:
        choices = [f for f in RENDERED_FINDINGS if f != name]
        other = at_zone_centre(
            draw_finding(rng, str(rng.choice(choices)), str(rng.choice(("left", "right"))))
        )
    return operation, target, other


def _phantom_pair(
    config: PurePairsConfig, rng: np.random.Generator, target: FindingState, other: FindingState | None
):
    age, sex, race = int(rng.integers(25, 90)), str(rng.choice(("F", "M"))), str(rng.choice(RACES))
    anatomy = Anatomy.draw(rng, age, sex, race)
    pose = Pose(
        float(rng.normal(0, 1.5)),
        float(rng.uniform(0.97, 1.03)),
        float(rng.normal(0, 0.02)),
        float(rng.normal(0, 0.02)),
    )
    size = config.resolution
    noise = rng.standard_normal((size, size)).astype(np.float32)
    blur = 0.0012 * size
    base = [other] if other else []
    film = {}
    for key, findings in (("without", base), ("with", base + [target])):
        film[key] = form_film(render_attenuation(size, size, anatomy, findings, pose), noise, blur)
    lesion = finding_masks(film["with"], {target.name: film["without"]})[target.name]
    masks_with = {target.name: lesion}
    if other is not None:
        alone = form_film(render_attenuation(size, size, anatomy, [target], pose), noise, blur)
        masks_with[other.name] = finding_masks(film["with"], {other.name: alone})[other.name]
    masks_without = {k: v for k, v in masks_with.items() if k != target.name}
    with_finding = np.where(lesion, film["with"], film["without"])  # the same bytes outside
    return (
        (film["without"], masks_without),
        (with_finding, masks_with),
        {"age": age, "sex": sex, "race": race, "background": ""},
    )


def insert_finding(background: np.ndarray, finding: FindingState) -> tuple[np.ndarray, np.ndarray]:
    """Insert a finding into a real film (display values in [0, 1], bright = dense).

    The film is read back to density through the phantom's contrast curve, the finding's
    attenuation (drawn on the standard thorax, centred) is added, and the result is shown
    through the same curve; pixels outside the lesion mask are returned untouched.

    Returns
    -------
    tuple[numpy.ndarray, numpy.ndarray]
        The film with the finding (float32) and the lesion mask (bool).
    """
    rows, columns = background.shape
    flat = np.zeros((rows, columns), np.float32)
    anatomy, pose = Anatomy(), Pose()
    change = render_attenuation(rows, columns, anatomy, [finding], pose) - render_attenuation(
        rows, columns, anatomy, [], pose
    )
    shown = np.clip(background.astype(np.float64), 0.01, 0.99)
    density = 0.72 + 0.28 * np.log(shown / (1 - shown))
    # the phantom's film curve without noise or blur, applied to the real film's densities
    edited = (
        form_film(np.clip(density + change, 0, None), flat, 0.0)
        - form_film(np.clip(density, 0, None), flat, 0.0)
        + background
    )
    lesion = finding_masks(edited.astype(np.float32), {finding.name: background.astype(np.float32)})[
        finding.name
    ]
    return np.where(lesion, np.clip(edited, 0, 1), background).astype(np.float32), lesion


def _background_files(folder: str) -> list[Path]:
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in _BACKGROUND_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no DICOM/PNG/JPEG films in {Path(folder).name}.")
    return files


def _background_pair(config: PurePairsConfig, index: int, target: FindingState, files: list[Path]):
    from instructx2x import read_image  # the package's reader registers DICOM too

    path = files[index % len(files)]
    film = read_image(path).pixels
    size = config.resolution
    film = np.asarray(Image.fromarray(film).resize((size, size), Image.Resampling.BOX), np.float32)
    film = np.round(np.clip(film, 0, 1) * 255) / 255  # the exact bytes written as "without"
    with_finding, lesion = insert_finding(film, target)
    return (
        (film, {}),
        (with_finding, {target.name: lesion}),
        {"age": "", "sex": "", "race": "", "background": path.name},
    )


def _render(config: PurePairsConfig, index: int, backgrounds: list[Path], redraw: int | None = None):
    """Pair ``index``: its operation, findings, films with masks and patient. ``redraw`` (a draw
    number) gives the instructed finding another texture."""
    rng = np.random.default_rng([config.seed, index])
    operation, target, other = _plan(config, index, rng)
    if redraw is not None:
        target = redraw_texture(target, np.random.default_rng([config.seed, index, 1, redraw]))
    if config.backgrounds:
        other = None
        without, with_finding, who = _background_pair(config, index, target, backgrounds)
    else:
        without, with_finding, who = _phantom_pair(config, rng, target, other)
    past, current = (without, with_finding) if operation == "add" else (with_finding, without)
    return operation, target, other, past, current, who


def _pixels(image: np.ndarray) -> np.ndarray:
    """The bytes a film is written as."""
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def _pair_id(config: PurePairsConfig, index: int) -> str:
    return f"{config.seed:04d}-{index:07d}"


def _pair(args: tuple[PurePairsConfig, int, Path, str, list[Path]]) -> dict:
    config, index, root, split, backgrounds = args
    operation, target, other, past, current, who = _render(config, index, backgrounds)
    pair_id = _pair_id(config, index)
    for kind, (image, masks) in (("past", past), ("current", current)):
        Image.fromarray(_pixels(image)).save(root / kind / f"{pair_id}.png")
        np.savez_compressed(root / kind / f"{pair_id}.masks.npz", **masks)
    return {
        "pair_id": pair_id,
        "split": split,
        "operation": operation,
        "finding": target.name,
        "side": target.side if target.name in LATERALISED_FINDINGS else "",
        "zone": target.zone if target.name in ZONED_FINDINGS else "",
        "level": target.level,
        "instruction": instruction_for(operation, target),
        **who,
        "other_finding": other.name if other else "",
    }


def plausible_targets(config: PurePairsConfig, pair_id: str, draws: int) -> list[np.ndarray]:
    """Targets as right as the pair's own for its instruction: the same patient, pose and noise
    with the instructed finding drawn again with another texture.

    An instruction names a finding's level, side and (focal opacities) zone, not its pattern
    (pneumonia's lobules, bronchograms, septal lines), so a perfect model of these pairs would
    give one of these. Measured
    against the pair's target as if they were edits, they bound what any model can score
    (the acceptance's "perfect model" figures). Films as written (float32 in [0, 1]).
    """
    index = int(pair_id.rsplit("-", 1)[1])
    if pair_id != _pair_id(config, index):
        raise ValueError(f"pair {pair_id} was not written with seed {config.seed}.")
    backgrounds = _background_files(config.backgrounds) if config.backgrounds else []
    return [
        _pixels(_render(config, index, backgrounds, draw)[4][0]).astype(np.float32) / 255
        for draw in range(draws)
    ]


def pairs_settings(root: str | Path) -> dict:
    """The settings a pure-pairs folder's manifest records (seed, resolution, backgrounds, ...)."""
    manifest = Path(root) / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(
            f"{Path(root).name} has no manifest.json: make the folder with `instructx2x-train pure-pairs`."
        )
    return json.loads(manifest.read_text())["settings"]


def pairs_config(root: str | Path) -> PurePairsConfig | None:
    """The settings that wrote a pure-pairs folder (its manifest); None for films inserted into
    backgrounds, whose folder the manifest names but does not locate."""
    settings = pairs_settings(root)
    if settings["backgrounds"]:
        return None
    fields = {f.name for f in dataclasses.fields(PurePairsConfig)}
    values: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in settings.items() if k in fields
    }
    return PurePairsConfig(**values)


def write_pure_pairs(output: str | Path, config: PurePairsConfig) -> dict:
    """Write ``config.pairs`` pure pairs into ``output`` (created; must not exist).

    Returns
    -------
    dict
        The manifest (counts per finding and operation, settings).

    Raises
    ------
    FileExistsError
        When ``output`` exists. A failed or interrupted run leaves nothing behind.
    """
    backgrounds = _background_files(config.backgrounds) if config.backgrounds else []  # before any work
    validation = int(round(config.pairs * config.validation_fraction))
    rows: list[dict] = []
    with atomic_output_dir(Path(output)) as staging:
        for kind in ("past", "current"):
            (staging / kind).mkdir()
        jobs = [
            (config, i, staging, "validation" if i < validation else config.split, backgrounds)
            for i in range(config.pairs)
        ]
        with ProcessPoolExecutor(config.workers) if config.workers > 1 else nullcontext() as pool:
            results = pool.map(_pair, jobs, chunksize=8) if pool else map(_pair, jobs)
            rows.extend(tqdm(results, total=config.pairs, desc="pairs", unit="pair"))
        truth = pd.DataFrame(rows, columns=TRUTH_COLUMNS)
        truth.to_csv(staging / "truth.csv", index=False)
        table = pd.DataFrame(
            {
                "split": truth.split,
                "past_dicom_id": truth.pair_id,
                "current_dicom_id": truth.pair_id,
                "instruction": truth.instruction,
            }
        )
        table.to_csv(staging / "instructions.csv", index=False)
        settings = {
            **dataclasses.asdict(config),
            "findings": list(config.findings),
            "operations": list(config.operations),
            "image_format": "png",
            "backgrounds": Path(config.backgrounds).name if config.backgrounds else "",
        }
        settings.pop("workers")
        manifest = {
            "format": "mimic-edit-instruction/1",
            "kind": "pure-pairs/1",
            "complete": True,
            "settings": settings,
            "pairs": config.pairs,
            "counts": {
                f"{o} {f}": int(((truth.operation == o) & (truth.finding == f)).sum())
                for f in config.findings
                for o in config.operations
            },
            "per_split": {str(k): int(v) for k, v in truth.split.value_counts().items()},
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("Pure pairs: %s", manifest["per_split"])
    return manifest
