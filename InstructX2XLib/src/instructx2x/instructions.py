"""Instruction grammar and vocabulary (docs/method.md section 4).

The model was trained on three templates built from MIMIC-Diff-VQA answers:
"Add the finding of X", "Remove the finding of X" and "Change the level of X from A to B".
Parsing them into a structured instruction tells the pipeline which anatomical priors apply
and lets the result say exactly what was understood.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import unicodedata
from collections.abc import Sequence

from .errors import ParameterError

__all__ = [
    "FINDINGS",
    "LEVEL_WORDS",
    "LEVEL_GRADES",
    "LEVEL_PLACEHOLDER",
    "LUNG_ZONES",
    "PRIOR_CATEGORIES",
    "FINDING_TO_PRIOR",
    "MAX_INSTRUCTION_CHARS",
    "Operation",
    "Laterality",
    "ParsedInstruction",
    "ParsedSeries",
    "parse_instruction",
    "parse_series",
    "swap_sides",
]

MAX_INSTRUCTION_CHARS = 300

# The 30 finding names of MIMIC-Diff-VQA.
FINDINGS: tuple[str, ...] = (
    "pleural effusion",
    "atelectasis",
    "cardiomegaly",
    "enlargement of the cardiac silhouette",
    "edema",
    "hernia",
    "vascular congestion",
    "hilar congestion",
    "pneumothorax",
    "heart failure",
    "lung opacity",
    "pneumonia",
    "tortuosity of the descending aorta",
    "scoliosis",
    "gastric distention",
    "hypoxemia",
    "hypertensive heart disease",
    "hematoma",
    "tortuosity of the thoracic aorta",
    "contusion",
    "emphysema",
    "granuloma",
    "calcification",
    "pleural thickening",
    "thymoma",
    "blunting of the costophrenic angle",
    "consolidation",
    "fracture",
    "pneumomediastinum",
    "air collection",
)

LEVEL_WORDS: tuple[str, ...] = (
    "moderately",
    "moderate",
    "acute",
    "mildly",
    "mild",
    "small",
    "severe",
    "moderate to large",
    "moderate to severe",
    "mild to moderate",
    "minimal",
    "subtle",
    "massive",
    "minimally",
    "increasing",
    "decreasing",
    "minor",
    "large",  # the grade above moderate of pleural effusion and pneumothorax (cohort v2's films)
)

# Severity grades of the level words, least to most severe; words of one grade say the same
# amount ("mild" and "small"). "acute", "increasing" and "decreasing" are no grade.
LEVEL_GRADES: dict[str, int] = {
    "minimal": 1,
    "minimally": 1,
    "subtle": 1,
    "minor": 1,
    "mild": 2,
    "mildly": 2,
    "small": 2,
    "mild to moderate": 3,
    "moderate": 4,
    "moderately": 4,
    "moderate to large": 5,
    "moderate to severe": 5,
    "severe": 6,
    "large": 6,
    "massive": 7,
}
# Where a series' levels go in its template ("Add the finding of {level} edema").
LEVEL_PLACEHOLDER = "{level}"

# The thirds of a lung's height that reports name ("left lower zone consolidation"), top down.
LUNG_ZONES: tuple[str, ...] = ("upper", "mid", "lower")

# The eight MS-CXR categories that have an anatomical pseudo mask.
PRIOR_CATEGORIES: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Pleural Effusion",
    "Lung Opacity",
    "Pneumonia",
    "Pneumothorax",
)

# Findings whose edit happens where one of the eight priors lies. The rest (aorta, spine,
# bones, ...) have no prior and run with the full-image mask.
FINDING_TO_PRIOR: dict[str, str] = {
    "pleural effusion": "Pleural Effusion",
    "blunting of the costophrenic angle": "Pleural Effusion",
    "atelectasis": "Atelectasis",
    "cardiomegaly": "Cardiomegaly",
    "enlargement of the cardiac silhouette": "Cardiomegaly",
    "edema": "Edema",
    "vascular congestion": "Edema",
    "hilar congestion": "Edema",
    "heart failure": "Edema",
    "pneumothorax": "Pneumothorax",
    "lung opacity": "Lung Opacity",
    "pneumonia": "Pneumonia",
    "consolidation": "Consolidation",
}

# Common ways radiologists write the same findings, mapped to the vocabulary.
SYNONYMS: dict[str, str] = {
    "pleural effusions": "pleural effusion",
    "effusions": "pleural effusion",
    "effusion": "pleural effusion",
    "atelectases": "atelectasis",
    "atelectatic": "atelectasis",
    "collapse": "atelectasis",
    "cardiac enlargement": "cardiomegaly",
    "enlarged heart": "cardiomegaly",
    "enlarged cardiac silhouette": "enlargement of the cardiac silhouette",
    "pulmonary edema": "edema",
    "pulmonary oedema": "edema",
    "oedema": "edema",
    "pulmonary vascular congestion": "vascular congestion",
    "congestive heart failure": "heart failure",
    "chf": "heart failure",
    "pneumothoraces": "pneumothorax",
    "ptx": "pneumothorax",
    "opacities": "lung opacity",
    "opacity": "lung opacity",
    "opacification": "lung opacity",
    "pneumonias": "pneumonia",
    "infection": "pneumonia",
    "infections": "pneumonia",
    "consolidations": "consolidation",
    "hiatal hernia": "hernia",
    "hiatus hernia": "hernia",
    "granulomas": "granuloma",
    "calcifications": "calcification",
    "fractures": "fracture",
    "rib fracture": "fracture",
    "hematomas": "hematoma",
    "costophrenic angle blunting": "blunting of the costophrenic angle",
}


class Operation(str, enum.Enum):
    """The edit an instruction asks for."""

    ADD = "add"
    REMOVE = "remove"
    CHANGE_LEVEL = "change_level"
    OTHER = "other"  # free text outside the training templates


class Laterality(str, enum.Enum):
    """The patient's side named in an instruction (radiological convention)."""

    LEFT = "left"
    RIGHT = "right"
    BILATERAL = "bilateral"


_LATERALITY_WORDS: dict[str, Laterality] = {
    "left": Laterality.LEFT,
    "left-sided": Laterality.LEFT,
    "left sided": Laterality.LEFT,
    "right": Laterality.RIGHT,
    "right-sided": Laterality.RIGHT,
    "right sided": Laterality.RIGHT,
    "bilateral": Laterality.BILATERAL,
    "bibasilar": Laterality.BILATERAL,
    "bibasal": Laterality.BILATERAL,
    "both": Laterality.BILATERAL,
}

# Zone words of reports, lobes included as the nearest zone (the middle lobe and lingula
# project onto the mid zone of a PA film).
_ZONE_WORDS: dict[str, str] = {
    **{
        f"{word} {noun}": zone
        for word, zone in (("upper", "upper"), ("mid", "mid"), ("middle", "mid"), ("lower", "lower"))
        for noun in ("zone", "zones", "lobe", "lobes", "lung", "lungs")
    },
    "mid-zone": "mid",
    "midzone": "mid",
    "lingula": "mid",
    "lingular": "mid",
    "apex": "upper",
    "apices": "upper",
    "apical": "upper",
    "base": "lower",
    "bases": "lower",
    "basal": "lower",
    "basilar": "lower",
    "bibasal": "lower",
    "bibasilar": "lower",
}

_OPERATION_PATTERNS: tuple[tuple[Operation, re.Pattern[str]], ...] = (
    (Operation.CHANGE_LEVEL, re.compile(r"^\s*change\s+the\s+(?:level|severity)\s+of\b")),
    (Operation.ADD, re.compile(r"^\s*(?:add|introduce|insert|show|create)\b")),
    (Operation.REMOVE, re.compile(r"^\s*(?:remove|delete|erase|resolve|clear)\b")),
)
_LEVEL_CHANGE = re.compile(r"\bfrom\s+(?P<before>[a-z ]+?)\s+to\s+(?P<after>[a-z ]+?)\s*[.!]?\s*$")


def _phrase_pattern(phrases: list[str]) -> re.Pattern[str]:
    """One alternation, longest phrases first, so 'moderate to large' beats 'moderate'."""
    ordered = sorted(phrases, key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(re.escape(p) for p in ordered) + r")\b")


_FINDING_PATTERN = _phrase_pattern(list(FINDINGS) + list(SYNONYMS))
_LEVEL_PATTERN = _phrase_pattern(list(LEVEL_WORDS))
_LATERALITY_PATTERN = _phrase_pattern(list(_LATERALITY_WORDS))
_ZONE_PATTERN = _phrase_pattern(list(_ZONE_WORDS))


@dataclasses.dataclass(frozen=True)
class ParsedInstruction:
    """What an edit instruction asks for, in the vocabulary of the training data.

    Attributes
    ----------
    text: str
        The instruction as given (whitespace normalised), which is what the model sees.
    operation: Operation
        Add, remove, change the level, or other.
    findings: tuple[str, ...]
        Canonical finding names in order of appearance, without repeats.
    levels: tuple[str, ...]
        Level words in order of appearance (for a level change: from, to).
    laterality: Laterality | None
        The patient's side when the instruction names one.
    prior_categories: tuple[str, ...]
        MS-CXR categories whose pseudo masks cover the findings.
    zones: tuple[str, ...]
        Lung zones named (``LUNG_ZONES``), top down; lobes and "basilar" count as the zone
        they project onto. Reported, not used to narrow the prior: where a zone lies on a
        film depends on its framing, which the fixed 512 px priors don't know.
    """

    text: str
    operation: Operation
    findings: tuple[str, ...]
    levels: tuple[str, ...]
    laterality: Laterality | None
    prior_categories: tuple[str, ...]
    zones: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """JSON-ready form for manifests."""
        return {
            "text": self.text,
            "operation": self.operation.value,
            "findings": list(self.findings),
            "levels": list(self.levels),
            "laterality": None if self.laterality is None else self.laterality.value,
            "prior_categories": list(self.prior_categories),
            "zones": list(self.zones),
        }


def parse_instruction(text: str) -> ParsedInstruction:
    """Parse an edit instruction.

    Parameters
    ----------
    text: str
        For example "Add the finding of left pleural effusion" or
        "Change the level of edema from mild to severe".

    Returns
    -------
    ParsedInstruction
        The structured instruction. Unknown findings are not an error: ``findings`` is then
        empty and the caller decides (the pipeline falls back to the full-image prior and
        says so).

    Raises
    ------
    TypeError
        When ``text`` is not a string.
    ParameterError
        When the instruction is empty, longer than ``MAX_INSTRUCTION_CHARS``, or holds a
        control character or bytes that were not valid UTF-8 (they would reach the model
        and the DICOM text attributes raw). Line breaks and tabs count as spaces.
    """
    if not isinstance(text, str):
        raise TypeError(f"instruction must be a str, got {type(text).__name__}.")
    normalized = " ".join(text.split())
    for position, character in enumerate(normalized):
        category = unicodedata.category(character)
        if category == "Cs":
            raise ParameterError(
                f"instruction holds bytes that are not valid UTF-8 (at character "
                f"{position + 1}); type it again as plain text."
            )
        if category in ("Cc", "Cf"):
            raise ParameterError(
                f"instruction holds the control character U+{ord(character):04X} "
                f"at character {position + 1}; remove it."
            )
    if not normalized:
        raise ParameterError(
            "instruction is empty: say what to edit, e.g. 'Add the finding of pleural effusion'."
        )
    if len(normalized) > MAX_INSTRUCTION_CHARS:
        raise ParameterError(
            f"instruction has {len(normalized)} characters; at most {MAX_INSTRUCTION_CHARS} are accepted."
        )
    lowered = normalized.lower()

    operation = next((op for op, pattern in _OPERATION_PATTERNS if pattern.search(lowered)), Operation.OTHER)
    findings = _unique(SYNONYMS.get(m, m) for m in _FINDING_PATTERN.findall(lowered))
    if operation is Operation.CHANGE_LEVEL and (change := _LEVEL_CHANGE.search(lowered)):
        levels = (change["before"].strip(), change["after"].strip())
    else:
        levels = tuple(_LEVEL_PATTERN.findall(lowered))
    sides = _unique(_LATERALITY_WORDS[w] for w in _LATERALITY_PATTERN.findall(lowered))
    if len(sides) == 1:
        laterality = sides[0]
    elif sides:
        laterality = Laterality.BILATERAL
    else:
        laterality = None
    categories = _unique(FINDING_TO_PRIOR[f] for f in findings if f in FINDING_TO_PRIOR)
    named_zones = {_ZONE_WORDS[w] for w in _ZONE_PATTERN.findall(lowered)}
    zones = tuple(zone for zone in LUNG_ZONES if zone in named_zones)
    return ParsedInstruction(normalized, operation, findings, levels, laterality, categories, zones)


def _unique(items) -> tuple:
    """Items in first-seen order without repeats."""
    return tuple(dict.fromkeys(items))


@dataclasses.dataclass(frozen=True)
class ParsedSeries:
    """A progression series: one finding, on one side, at levels in order of severity.

    Every step edits the same input with the same seed and the same edit region, so that the
    series differs only by the instructed level (docs/method.md section 8.7).

    Attributes
    ----------
    steps: tuple[ParsedInstruction, ...]
        The steps' instructions, parsed, in the order given.
    levels: tuple[str, ...]
        Each step's level: the level added, or the level changed to.
    direction: str
        ``increasing`` (least to most severe) or ``decreasing``.
    region_step: int
        The step (0-based) whose relevance map gives every step its edit region: the one
        farthest in grade from the input's level (an added finding's input has none), the
        later one of a tie.
    """

    steps: tuple[ParsedInstruction, ...]
    levels: tuple[str, ...]
    direction: str
    region_step: int

    @property
    def instructions(self) -> tuple[str, ...]:
        """The steps' instructions as the model sees them."""
        return tuple(step.text for step in self.steps)

    @property
    def finding(self) -> str:
        """The one finding every step names."""
        return self.steps[0].findings[0]

    def to_dict(self) -> dict:
        """JSON-ready form for manifests."""
        return {
            "instructions": list(self.instructions),
            "levels": list(self.levels),
            "direction": self.direction,
            "region_step": self.region_step,
            "region_instruction": self.instructions[self.region_step],
            "finding": self.finding,
            "operation": self.steps[0].operation.value,
            "laterality": None if self.steps[0].laterality is None else self.steps[0].laterality.value,
            "zones": list(self.steps[0].zones),
        }


def parse_series(steps: Sequence[str], template: str | None = None) -> ParsedSeries:
    """Read and check a progression series before any model work.

    Parameters
    ----------
    steps: Sequence[str]
        The steps in order: instructions ("Add the finding of mild edema", "Change the level of
        edema from mild to severe"), or, with ``template``, level words ("mild", "severe").
    template: str | None
        An instruction holding ``{level}`` once; each level of ``steps`` takes its place.

    Returns
    -------
    ParsedSeries

    Raises
    ------
    ParameterError
        Naming the problem and the step: fewer than two steps; a level where an instruction
        belongs or the reverse; a step that is not "Add the finding of <level> X" or "Change
        the level of X from A to B"; steps that differ in operation, finding, side or zone; a
        level that is no severity grade (``LEVEL_GRADES``); level changes from different
        levels, or to the level they start from; levels not strictly in order of severity,
        increasing or decreasing.
    """
    if isinstance(steps, str) or not all(isinstance(step, str) for step in steps):
        raise ParameterError("a series is a list of instructions or of levels, one string a step.")
    if len(steps) < 2:
        raise ParameterError(
            f"a series needs at least two steps, got {len(steps)}"
            + (f" ({steps[0]!r})" if steps else "")
            + ": give the levels or instructions in order, e.g. mild moderate severe."
        )
    if template is not None:
        instructions = _fill_template(template, steps)
    else:
        for number, step in enumerate(steps, start=1):
            if " ".join(step.lower().split()) in LEVEL_GRADES:
                raise ParameterError(
                    f"series step {number} ({step!r}) is a level, not an instruction: give an "
                    f"instruction holding {LEVEL_PLACEHOLDER} for the levels to fill."
                )
        instructions = list(steps)
    parsed = []
    for number, text in enumerate(instructions, start=1):
        try:
            parsed.append(parse_instruction(text))
        except ParameterError as error:
            raise ParameterError(f"series step {number}: {error}") from None
    levels, start = _series_levels(parsed)
    grades = [LEVEL_GRADES[level] for level in levels]
    increasing = all(a < b for a, b in zip(grades, grades[1:]))
    if not increasing and not all(a > b for a, b in zip(grades, grades[1:])):
        same = next((i for i in range(1, len(grades)) if grades[i] == grades[i - 1]), None)
        if same is not None:
            raise ParameterError(
                f"series steps {same} and {same + 1} are one grade ({levels[same - 1]!r} and "
                f"{levels[same]!r}): each step must be more severe than the last, or each less."
            )
        raise ParameterError(
            f"series levels out of order: {', '.join(levels)}; give them from least to most "
            f"severe, or from most to least (grades: {_grades_text(levels)})."
        )
    origin = 0 if start is None else LEVEL_GRADES[start]
    distances = [abs(grade - origin) for grade in grades]
    region = max(range(len(grades)), key=lambda i: (distances[i], i))
    return ParsedSeries(tuple(parsed), tuple(levels), "increasing" if increasing else "decreasing", region)


def _fill_template(template: object, levels: Sequence[str]) -> list[str]:
    """The series' instructions: each level in the template's ``{level}``."""
    if not isinstance(template, str) or template.count(LEVEL_PLACEHOLDER) != 1:
        raise ParameterError(
            f"a series of levels needs an instruction holding {LEVEL_PLACEHOLDER} once, e.g. "
            f"'Add the finding of {LEVEL_PLACEHOLDER} left pleural effusion'; got {template!r:.80}."
        )
    filled = []
    for number, level in enumerate(levels, start=1):
        word = " ".join(level.lower().split())
        if word not in LEVEL_GRADES:
            raise ParameterError(
                f"series step {number} ({level!r}) is no severity grade; with a template the steps "
                f"are levels: {_grades_text(sorted(LEVEL_GRADES, key=LEVEL_GRADES.__getitem__))}."
            )
        filled.append(template.replace(LEVEL_PLACEHOLDER, word))
    return filled


def _series_levels(parsed: list[ParsedInstruction]) -> tuple[list[str], str | None]:
    """Each step's level and the level the steps change from (None for added findings), after
    checking that the steps share operation, finding, side and zone."""
    first = parsed[0]
    for number, step in enumerate(parsed, start=1):
        if step.operation not in (Operation.ADD, Operation.CHANGE_LEVEL):
            raise ParameterError(
                f"series step {number} ({step.text!r}) sets no level: a series steps through levels "
                "of one finding with 'Add the finding of <level> X' or 'Change the level of X "
                "from A to B'."
            )
        if len(step.findings) != 1:
            named = ", ".join(step.findings) if step.findings else "no known finding"
            raise ParameterError(f"series step {number} names {named}; a series follows one finding.")
        for what, value, expected in (
            ("operation", step.operation.value, first.operation.value),
            ("finding", step.findings[0], first.findings[0]),
            ("side", _side_text(step.laterality), _side_text(first.laterality)),
            ("zone", ", ".join(step.zones) or "none", ", ".join(first.zones) or "none"),
        ):
            if value != expected:
                raise ParameterError(
                    f"series step {number} has {what} {value}, step 1 {expected}: one finding on one "
                    "side throughout, only the level changes."
                )
    levels, starts = [], set()
    for number, step in enumerate(parsed, start=1):
        if step.operation is Operation.CHANGE_LEVEL:
            if len(step.levels) != 2:
                raise ParameterError(f"series step {number} ({step.text!r}) does not say 'from A to B'.")
            before, after = step.levels
            for level in (before, after):
                _check_grade(number, level)
            if before == after:
                raise ParameterError(f"series step {number} changes nothing (from {before} to {after}).")
            starts.add(before)
            levels.append(after)
        else:
            if len(step.levels) != 1:
                named = ", ".join(step.levels) if step.levels else "none"
                raise ParameterError(
                    f"series step {number} ({step.text!r}) names levels: {named}; each step names one."
                )
            _check_grade(number, step.levels[0])
            levels.append(step.levels[0])
    if len(starts) > 1:
        raise ParameterError(
            f"series steps change from different levels ({', '.join(sorted(starts))}): every step "
            "edits the same input, so each changes from the input's level."
        )
    return levels, next(iter(starts), None)


def _check_grade(number: int, level: str) -> None:
    if level not in LEVEL_GRADES:
        raise ParameterError(
            f"series step {number}: {level!r} is no severity grade; use one of "
            f"{_grades_text(sorted(LEVEL_GRADES, key=LEVEL_GRADES.__getitem__))}."
        )


def _grades_text(levels) -> str:
    return ", ".join(f"{level} {LEVEL_GRADES[level]}" if level in LEVEL_GRADES else level for level in levels)


def _side_text(laterality: Laterality | None) -> str:
    return "none" if laterality is None else laterality.value


_SIDE_SWAP = {"left": "right", "right": "left"}
_SIDE_WORD = re.compile(r"\b(left|right)(?=\b)", re.IGNORECASE)


def swap_sides(text: str) -> str:
    """The instruction for the mirrored film: every patient side the parser knows swapped.

    A horizontal flip moves the patient's left to the other half of the image, so "left"
    must become "right" (and "left-sided" "right-sided") or the pair teaches the model the
    wrong side. Bilateral words and capitalisation are kept.
    """

    def swap(match: re.Match[str]) -> str:
        word = match.group(1)
        other = _SIDE_SWAP[word.lower()]
        return other.capitalize() if word[0].isupper() else other

    return _SIDE_WORD.sub(swap, text)
