"""A radiograph's age and sex as its DICOM attributes state them, for reporting by subgroup.

Age: PatientAge (``nnnD``, ``nnnW``, ``nnnM`` or ``nnnY``), else the completed years between
PatientBirthDate and StudyDate (or AcquisitionDate when the study has no date). Sex:
PatientSex ``M`` or ``F``. Anything else (``O``, empty, absent, malformed, a birth date after
the study, an age above 150 years) is unknown: nothing is inferred.

Ethnic Group (0010,2160) is not read: it is free text whose values and vocabulary differ from
site to site (and by law from country to country), so a race subgroup taken from it would be a
guess at what a site meant.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from pathlib import Path

from pydicom import Dataset

__all__ = ["Demographics", "demographics", "read_demographics"]

_AGE = re.compile(r"^(\d{1,3})([DWMY])$")
_DAYS_PER = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}
_OLDEST = 150.0


@dataclasses.dataclass(frozen=True)
class Demographics:
    """Age in years and sex (``M``/``F``); ``None`` where the film does not state them."""

    age: float | None = None
    sex: str | None = None


def demographics(dataset: Dataset) -> Demographics:
    """The age and sex a dataset states (module docstring); never raises on bad values."""
    sex = str(dataset.get("PatientSex", "") or "").strip().upper()
    return Demographics(_age(dataset), sex if sex in ("M", "F") else None)


def read_demographics(path: str | Path) -> Demographics:
    """``demographics`` of a DICOM file, read without its pixel data.

    Raises
    ------
    ImageReadError
        The file is not DICOM, or is damaged before its pixel data.
    """
    import pydicom

    from ..image_io import ImageReadError

    try:
        return demographics(pydicom.dcmread(path, stop_before_pixels=True))
    except Exception as error:  # pydicom raises many types on damaged files
        raise ImageReadError(
            f"{Path(path).name}: not a readable DICOM file ({type(error).__name__})."
        ) from error


def _age(dataset: Dataset) -> float | None:
    stated = _AGE.match(str(dataset.get("PatientAge", "") or "").strip().upper())
    if stated is not None:
        number, unit = stated.groups()
        age = int(number) if unit == "Y" else int(number) * _DAYS_PER[unit] / _DAYS_PER["Y"]
        return float(age) if age <= _OLDEST else None
    birth = _date(dataset.get("PatientBirthDate"))
    seen = _date(dataset.get("StudyDate")) or _date(dataset.get("AcquisitionDate"))
    if birth is None or seen is None or birth > seen:
        return None
    years = seen.year - birth.year - ((seen.month, seen.day) < (birth.month, birth.day))
    return float(years) if years <= _OLDEST else None


def _date(value) -> datetime.date | None:
    text = str(value or "").strip()
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return datetime.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None
