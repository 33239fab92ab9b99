"""Per-edit verification: did the instructed finding change, and nothing else?

A radiologist reading a counterfactual needs to see, for this one edit, that the classifiers
moved the instructed finding the instructed way, that the other findings and the classifiers'
estimates of age, sex and race stayed put, and that not one pixel outside the edit mask changed.
The same rule that the evaluation scores (``expected_labels``) decides the verdict; margins say
how far another figure may move before it counts as collateral change.

The age, sex and race estimates are inferred demographics: they decide the verdict, but the
report (``Verification.to_dict``, ``Verification.summary``) shows their values only when asked,
labelled as model estimates; otherwise it says which of them moved, without values.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from .classifiers import (
    COHORT_SET_NAME,
    FINDING_TO_PATHOLOGY,
    PATHOLOGIES,
    RACES,
    ClassifierSet,
    Predictions,
    load_classifiers,
)
from .dicom.read import PHANTOM_MANUFACTURER
from .errors import ModelLoadError, ParameterError, ResourceError
from .instructions import Operation, parse_instruction
from .xrv_classifiers import torchxrayvision_ready

__all__ = [
    "VerificationMargins",
    "Verification",
    "expected_labels",
    "verify_edit",
    "lung_zones",
    "choose_classifiers",
    "DEMOGRAPHIC_FIELDS",
    "DEMOGRAPHICS_LABEL",
]

ZONE_ROWS = ("upper", "middle", "lower")
# The inferred demographics of a report, shown only when asked for.
DEMOGRAPHIC_FIELDS = (
    "age_before",
    "age_after",
    "race_before",
    "race_after",
    "sex_female_before",
    "sex_female_after",
)
DEMOGRAPHICS_LABEL = (
    "model estimates: the classifiers' reading of the images, not the patient's recorded age, sex or race"
)


@dataclasses.dataclass(frozen=True)
class VerificationMargins:
    """How far a figure may move before the report flags it."""

    probability: float = 0.2  # another finding's probability, or P(female)
    age_years: float = 5.0
    race_probability: float = 0.2  # any race class's probability

    def __post_init__(self) -> None:
        if not (0 < self.probability < 1 and 0 < self.race_probability < 1 and self.age_years > 0):
            raise ValueError(f"margins must be positive (probabilities below 1), got {self}.")


def expected_labels(source: dict[str, bool], instruction: str) -> dict[str, bool]:
    """The labels the edited image should have: the source's, changed as the instruction says.

    Add X: X present. Remove X: X absent. Change the level of X: X still present. Findings
    outside the five pathologies change nothing here.
    """
    parsed = parse_instruction(instruction)
    expected = {name: bool(source.get(name, False)) for name in PATHOLOGIES}
    for finding in parsed.findings:
        pathology = FINDING_TO_PATHOLOGY.get(finding)
        if pathology is None:
            continue
        if parsed.operation is Operation.REMOVE:
            expected[pathology] = False
        elif parsed.operation in (Operation.ADD, Operation.CHANGE_LEVEL):
            expected[pathology] = True
    return expected


def choose_classifiers(spec: str, model_info, image=None) -> tuple[ClassifierSet, str]:
    """The set that fits an edit, and why it was chosen.

    ``auto``: a phantom (a DICOM the synthetic cohort wrote) is read by ``cohort-v2``; another
    DICOM film by torchxrayvision's set when its weights are on disk and pass their digest
    check; otherwise the set the model's card names (the demo model names ``cohort-v2``; the
    reason then says why torchxrayvision's weights on disk were refused), else
    torchxrayvision's (which then says what is missing or refused). Any other ``spec`` is
    taken as it is. Sets load once per process.
    """
    if spec != "auto":
        return _load_cached(spec), "asked for"
    source = getattr(image, "dicom", None)
    dataset = source.dataset if source is not None else None
    if dataset is not None and dataset.get("Manufacturer") == PHANTOM_MANUFACTURER:
        return _load_cached(COHORT_SET_NAME), "the input is a synthetic-cohort phantom"
    refused = None
    if dataset is not None and torchxrayvision_ready():
        chosen, refused = _torchxrayvision_or_refusal()
        if chosen is not None:
            return chosen, "the input is a DICOM film and torchxrayvision's weights are present"
    named = (getattr(model_info, "card", None) or {}).get("classifiers")
    if named:
        return _load_cached(named), "the model's card names it" + (
            "" if refused is None else f"; torchxrayvision's weights are present but refused: {refused}"
        )
    return _load_cached("torchxrayvision"), "the default for real films"


@functools.lru_cache(maxsize=4)
def _load_cached(spec: str) -> ClassifierSet:
    return load_classifiers(spec)


@functools.lru_cache(maxsize=1)
def _torchxrayvision_or_refusal() -> tuple[ClassifierSet | None, str | None]:
    """torchxrayvision's set, or why it was refused (checked once per process, as sets load)."""
    try:
        return _load_cached("torchxrayvision"), None
    except (ModelLoadError, ResourceError) as error:
        return None, str(error)


def lung_zones(mask: np.ndarray) -> dict[str, float]:
    """Share of the mask in each of six zones of a PA film: the patient's right and left
    (image left and right) by upper, middle and lower thirds of the rows between 10 % and 90 %
    of the height (an approximation of the lung zones without a lung segmentation)."""
    mask = np.asarray(mask, dtype=bool)
    rows, columns = mask.shape
    total = max(int(mask.sum()), 1)
    edges = np.linspace(0.1 * rows, 0.9 * rows, 4).round().astype(int)
    edges[0], edges[-1] = 0, rows  # the outer zones take the margins
    shares = {}
    for side, (left, right) in (("right", (0, columns // 2)), ("left", (columns // 2, columns))):
        for name, top, bottom in zip(ZONE_ROWS, edges[:-1], edges[1:]):
            shares[f"{side} {name}"] = float(mask[top:bottom, left:right].sum() / total)
    return shares


@dataclasses.dataclass(frozen=True)
class Verification:
    """One edit checked by one classifier set; ``to_dict`` is the JSON, ``summary`` the text."""

    classifiers: dict
    instruction: str
    instructed: tuple[str, ...]
    expected: dict[str, bool]
    findings_before: dict[str, float]
    findings_after: dict[str, float]
    age_before: float
    age_after: float
    race_before: dict[str, float]
    race_after: dict[str, float]
    sex_female_before: float | None
    sex_female_after: float | None
    max_change_outside_mask: float
    mask_fraction: float
    zones: dict[str, float]
    failed: tuple[str, ...]
    collateral: tuple[str, ...]
    margins: VerificationMargins

    @property
    def passed(self) -> bool:
        return not self.failed and not self.collateral and self.max_change_outside_mask == 0

    def to_dict(self, include_demographics: bool = False) -> dict:
        """The report as JSON-ready data.

        Parameters
        ----------
        include_demographics: bool
            Add the age, sex and race estimates under ``demographic_estimates``, labelled as
            model estimates (``DEMOGRAPHICS_LABEL``); without it they are left out.
        """
        data = dataclasses.asdict(self)
        estimates = {name: data.pop(name) for name in DEMOGRAPHIC_FIELDS}
        data["passed"] = self.passed
        if include_demographics:
            data["demographic_estimates"] = {"label": DEMOGRAPHICS_LABEL, **estimates}
        return data

    def summary(self, include_demographics: bool = False) -> str:
        """A short readable report: verdict first, then the figures behind it (the age, sex and
        race estimates only with ``include_demographics``, labelled as model estimates)."""
        verdict = "PASSED" if self.passed else "FLAGGED"
        lines = [
            f"Verification {verdict}: {self.instruction}",
            f"classifiers: {self.classifiers['name']}, {self.classifiers['chosen_because']} "
            f"({self.classifiers['caveat']})",
        ]
        if not self.instructed:
            lines.append(
                "- the instructed finding is not one of the five the classifiers read: only "
                "collateral change and the pixels outside the mask are checked"
            )
        lines += [f"- failed edit: {item}" for item in self.failed]
        lines += [f"- collateral change: {item}" for item in self.collateral]
        if self.max_change_outside_mask != 0:
            lines.append(
                f"- the image changed outside the edit mask (max {self.max_change_outside_mask:.3g})"
            )
        lines.append("findings (probability before -> after; * instructed):")
        for name in PATHOLOGIES:
            mark = "*" if name in self.instructed else " "
            lines.append(
                f" {mark} {name:<13} {self.findings_before[name]:.2f} -> {self.findings_after[name]:.2f}"
                f"  (expected {'present' if self.expected[name] else 'absent'})"
            )
        if include_demographics:
            race = max(self.race_before, key=self.race_before.__getitem__)
            race_after = max(self.race_after, key=self.race_after.__getitem__)
            lines.append(
                f"{DEMOGRAPHICS_LABEL}: age {self.age_before:.1f} -> {self.age_after:.1f} years; "
                f"race {race} -> {race_after}"
                + (
                    ""
                    if self.sex_female_before is None
                    else f"; P(female) {self.sex_female_before:.2f} -> {self.sex_female_after:.2f}"
                )
            )
        else:
            lines.append(
                "age, sex and race estimates: checked, values not shown (include_demographics shows them)"
            )
        zone = max(self.zones, key=self.zones.__getitem__)
        lines.append(
            f"edit mask: {100 * self.mask_fraction:.1f} % of the image, mostly {zone} "
            f"({100 * self.zones[zone]:.0f} %); change outside it: {self.max_change_outside_mask:.3g}"
        )
        return "\n".join(lines) + "\n"


def verify_edit(
    source: np.ndarray,
    edited: np.ndarray,
    edit_mask: np.ndarray,
    instruction: str,
    classifiers: ClassifierSet,
    margins: VerificationMargins = VerificationMargins(),
    chosen_because: str = "asked for",
) -> Verification:
    """Check one edit: ``source`` and ``edited`` float ``(rows, columns)`` in ``[0, 1]``,
    ``edit_mask`` bool on the same grid; ``chosen_because`` goes into the report beside the
    set's name (``choose_classifiers``).

    The source's labels are the classifiers' own decisions on it (a single film has no
    ground truth); the instructed finding fails when the edited film's decision is not the
    expected one. Collateral change: another finding's probability moves by more than the
    margin or its decision flips, predicted age moves by more than ``age_years``, P(female)
    or a race probability by more than their margins.

    Raises
    ------
    ParameterError
        When the three arrays are not on one grid (checked before any classifier runs).
    """
    source, edited = np.asarray(source, np.float32), np.asarray(edited, np.float32)
    edit_mask = np.asarray(edit_mask, dtype=bool)
    if not (source.shape == edited.shape == edit_mask.shape) or source.ndim != 2:
        raise ParameterError(
            f"source, edited and mask must be one 2-D grid, got {source.shape}, "
            f"{edited.shape}, {edit_mask.shape}."
        )
    parsed = parse_instruction(instruction)
    predictions: Predictions = classifiers.predict([source, edited])
    before = dict(zip(PATHOLOGIES, predictions.findings[0].tolist()))
    after = dict(zip(PATHOLOGIES, predictions.findings[1].tolist()))
    expected = expected_labels({name: p >= 0.5 for name, p in before.items()}, instruction)
    instructed = tuple(
        dict.fromkeys(FINDING_TO_PATHOLOGY[f] for f in parsed.findings if f in FINDING_TO_PATHOLOGY)
    )
    failed = tuple(
        f"{name}: expected {'present' if expected[name] else 'absent'}, classifier says {after[name]:.2f}"
        for name in instructed
        if (after[name] >= 0.5) != expected[name]
    )
    collateral = [
        f"{name}: {before[name]:.2f} -> {after[name]:.2f}"
        for name in PATHOLOGIES
        if name not in instructed
        and (
            abs(after[name] - before[name]) > margins.probability
            or (after[name] >= 0.5) != (before[name] >= 0.5)
        )
    ]
    # inferred demographics: named without their values (the report shows those only when asked)
    ages = predictions.age.tolist()
    if abs(ages[1] - ages[0]) > margins.age_years:
        collateral.append(f"age estimate moved by more than {margins.age_years:g} years")
    races = predictions.race
    if np.abs(races[1] - races[0]).max() > margins.race_probability or races[0].argmax() != races[1].argmax():
        collateral.append(
            f"race estimate changed (its most likely class, or a class probability by more "
            f"than {margins.race_probability:g})"
        )
    sex = None if predictions.sex_female is None else predictions.sex_female.tolist()
    if sex is not None and abs(sex[1] - sex[0]) > margins.probability:
        collateral.append(f"sex estimate: P(female) moved by more than {margins.probability:g}")
    outside = np.abs(edited - source)[~edit_mask]
    return Verification(
        classifiers={**classifiers.describe(), "chosen_because": chosen_because},
        instruction=parsed.text,
        instructed=instructed,
        expected=expected,
        findings_before=before,
        findings_after=after,
        age_before=ages[0],
        age_after=ages[1],
        race_before=dict(zip(RACES, races[0].tolist())),
        race_after=dict(zip(RACES, races[1].tolist())),
        sex_female_before=None if sex is None else sex[0],
        sex_female_after=None if sex is None else sex[1],
        max_change_outside_mask=float(outside.max()) if outside.size else 0.0,
        mask_fraction=float(edit_mask.mean()),
        zones=lung_zones(edit_mask),
        failed=failed,
        collateral=tuple(collateral),
        margins=margins,
    )
