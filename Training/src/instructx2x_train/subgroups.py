"""The subgroups that ``stress-test`` and ``evaluate`` report by: age band, sex and race, each
where a film states it (a ``films.csv``, or a DICOM film's own attributes:
``instructx2x.dicom.demographics``). A film that states none is in no subgroup but "all"."""

from __future__ import annotations

__all__ = ["AGE_BANDS", "subgroups", "group_order"]

AGE_BANDS = ((0, 45, "age <45"), (45, 65, "age 45-64"), (65, 200, "age >=65"))


def subgroups(age: float | None, sex: str | None, race: str | None) -> list[str]:
    """``all``, then the film's age band, ``sex S`` and ``race R`` for what is known."""
    groups = ["all"]
    if age is not None:
        groups += [label for low, high, label in AGE_BANDS if low <= age < high]
    if sex:
        groups.append(f"sex {sex}")
    if race:
        groups.append(f"race {race}")
    return groups


def group_order(group: str) -> tuple[int, str]:
    """All films first, then age bands in order, then sex, then race."""
    bands = [label for _, _, label in AGE_BANDS]
    if group == "all":
        return (0, "")
    if group in bands:
        return (1, str(bands.index(group)))
    return (2, group)
