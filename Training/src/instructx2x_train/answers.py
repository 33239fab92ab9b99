"""MIMIC-Diff-VQA difference answers: write them (synthetic cohort), read them (builder).

Answers are concatenations of sentences (docs/method.md section 5):

* "the level of X has changed from A to B. "
* "the main image has an additional finding of X than the reference image. "
* "the main image has additional findings of X, Y, and Z than the reference image. "
* "the main image is missing the finding of X than the reference image. " (plural alike)
* "nothing has changed."

Lists read "a, b, and c"; two items read "a, and b". Pneumonia and infection count as the
same finding, so an answer that adds one and removes the other is no change.
"""

from __future__ import annotations

import dataclasses
import enum
import re

from instructx2x.instructions import LEVEL_WORDS

__all__ = [
    "Change",
    "ChangeKind",
    "AnswerParseError",
    "format_answer",
    "parse_answer",
    "to_instructions",
    "MULTI_FINDING_MODES",
    "NOTHING_CHANGED",
]

NOTHING_CHANGED = "nothing has changed."
MULTI_FINDING_MODES = ("combined", "per-finding", "single-only")
_EQUIVALENT = {"infection": "pneumonia"}


class AnswerParseError(ValueError):
    """A sentence of a difference answer matches none of the grammar's forms."""


class ChangeKind(str, enum.Enum):
    ADD = "add"
    REMOVE = "remove"
    LEVEL = "level"


@dataclasses.dataclass(frozen=True)
class Change:
    """One finding's change from the reference (past) to the main (current) study."""

    kind: ChangeKind
    finding: str
    before: str | None = None
    after: str | None = None


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + ", and " + items[-1]


def _split(text: str) -> list[str]:
    parts = [p.strip() for p in re.split(r",\s*(?:and\s+)?|\s+and\s+", text) if p.strip()]
    return parts


def format_answer(changes: list[Change]) -> str:
    """The Diff-VQA answer for a list of changes (grouped as the dataset groups them)."""
    if not changes:
        return NOTHING_CHANGED
    sentences = [
        f"the level of {c.finding} has changed from {c.before} to {c.after}. "
        for c in changes
        if c.kind is ChangeKind.LEVEL
    ]
    added = [c.finding for c in changes if c.kind is ChangeKind.ADD]
    removed = [c.finding for c in changes if c.kind is ChangeKind.REMOVE]
    if added:
        noun = "an additional finding" if len(added) == 1 else "additional findings"
        sentences.append(f"the main image has {noun} of {_join(added)} than the reference image. ")
    if removed:
        noun = "the finding" if len(removed) == 1 else "the findings"
        sentences.append(f"the main image is missing {noun} of {_join(removed)} than the reference image. ")
    return "".join(sentences)


_LEVEL = re.compile(r"^the level of (?P<finding>.+?) has changed from (?P<levels>.+ to .+)$")
_ADDED = re.compile(
    r"^the main image has (?:an additional finding|additional findings) of "
    r"(?P<items>.+?) than the reference image$"
)
_MISSING = re.compile(
    r"^the main image is missing (?:the finding|the findings) of "
    r"(?P<items>.+?) than the reference image$"
)


def parse_answer(answer: str) -> list[Change]:
    """The changes an answer describes; empty for "nothing has changed".

    Raises
    ------
    AnswerParseError
        When a sentence matches none of the forms (the message quotes it).
    """
    text = " ".join(str(answer).lower().split())
    if text.strip(" .") == NOTHING_CHANGED.strip("."):
        return []
    changes: list[Change] = []
    for sentence in (s.strip() for s in re.split(r"\.(?:\s+|$)", text)):
        if not sentence:
            continue
        if match := _LEVEL.match(sentence):
            before, after = _split_levels(match["levels"])
            changes.append(Change(ChangeKind.LEVEL, _canonical(match["finding"]), before, after))
        elif match := _ADDED.match(sentence):
            changes += [Change(ChangeKind.ADD, _canonical(f)) for f in _split(match["items"])]
        elif match := _MISSING.match(sentence):
            changes += [Change(ChangeKind.REMOVE, _canonical(f)) for f in _split(match["items"])]
        else:
            raise AnswerParseError(f"unrecognised difference sentence: {sentence!r}")
    added = {c.finding for c in changes if c.kind is ChangeKind.ADD}
    removed = {c.finding for c in changes if c.kind is ChangeKind.REMOVE}
    cancelled = added & removed  # e.g. "pneumonia" added, "infection" missing: no change
    return [c for c in changes if c.kind is ChangeKind.LEVEL or c.finding not in cancelled]


def _split_levels(text: str) -> tuple[str, str]:
    """Split "A to B" where A or B may itself read "moderate to large": prefer known levels."""
    words = text.split(" to ")
    splits = [(" to ".join(words[:i]), " to ".join(words[i:])) for i in range(1, len(words))]
    for before, after in splits:
        if before in LEVEL_WORDS and after in LEVEL_WORDS:
            return before, after
    return splits[0]


def _canonical(finding: str) -> str:
    finding = finding.strip()
    return _EQUIVALENT.get(finding, finding)


def _instruction(change: Change) -> str:
    if change.kind is ChangeKind.ADD:
        return f"Add the finding of {change.finding}"
    if change.kind is ChangeKind.REMOVE:
        return f"Remove the finding of {change.finding}"
    return f"Change the level of {change.finding} from {change.before} to {change.after}"


def to_instructions(changes: list[Change], mode: str = "combined") -> list[str]:
    """Instructions for one image pair.

    Parameters
    ----------
    changes: list[Change]
        From ``parse_answer``.
    mode: str
        ``combined``: one instruction with every change, joined by ". " (the target image shows
        all of them); ``per-finding``: one instruction per change (noisy for multi-change pairs,
        whose target shows every change); ``single-only``: pairs with exactly one change only.

    Raises
    ------
    ValueError
        For an unknown mode.
    """
    if mode not in MULTI_FINDING_MODES:
        raise ValueError(f"mode must be one of {MULTI_FINDING_MODES}, got {mode!r}.")
    if not changes:
        return []
    sentences = [_instruction(c) for c in changes]
    if mode == "per-finding":
        return sentences
    if mode == "single-only":
        return sentences if len(sentences) == 1 else []
    return [". ".join(sentences)]
