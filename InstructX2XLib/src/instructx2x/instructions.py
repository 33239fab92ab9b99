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

from .errors import ParameterError

__all__ = [
    "FINDINGS",
    "LEVEL_WORDS",
    "LUNG_ZONES",
    "PRIOR_CATEGORIES",
    "FINDING_TO_PRIOR",
    "MAX_INSTRUCTION_CHARS",
    "Operation",
    "Laterality",
    "ParsedInstruction",
    "parse_instruction",
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
)

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
