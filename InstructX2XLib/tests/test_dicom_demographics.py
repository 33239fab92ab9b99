"""A film's age and sex as its DICOM attributes state them (``instructx2x.dicom.demographics``):
PatientAge in each unit, else birth date to study (or acquisition) date; M/F; nothing guessed."""

import pytest
from dicom_factory import make_radiograph

from instructx2x.dicom.demographics import Demographics, demographics, read_demographics


def film(**attributes):
    dataset = make_radiograph("DX")
    for keyword in ("PatientAge", "PatientBirthDate", "PatientSex", "StudyDate", "AcquisitionDate"):
        if keyword in dataset:
            delattr(dataset, keyword)
    for keyword, value in attributes.items():
        setattr(dataset, keyword, value)
    return dataset


@pytest.mark.parametrize(
    "attributes, age",
    [
        ({"PatientAge": "065Y"}, 65.0),
        ({"PatientAge": "018M"}, 1.5),
        ({"PatientAge": "052W"}, 52 * 7 / 365.25),
        ({"PatientAge": "010D"}, 10 / 365.25),
        # PatientAge wins over the dates
        ({"PatientAge": "044Y", "PatientBirthDate": "19500101", "StudyDate": "20260101"}, 44.0),
        # completed years: the day before the birthday is still 44
        ({"PatientBirthDate": "19810615", "StudyDate": "20260614"}, 44.0),
        ({"PatientBirthDate": "19810615", "StudyDate": "20260615"}, 45.0),
        ({"PatientBirthDate": "19600229", "AcquisitionDate": "20250301"}, 65.0),
        # malformed age: the dates decide
        ({"PatientAge": "65", "PatientBirthDate": "19600101", "StudyDate": "20260101"}, 66.0),
    ],
)
def test_the_stated_age_in_years(attributes, age):
    assert demographics(film(**attributes)).age == pytest.approx(age)


@pytest.mark.parametrize(
    "attributes",
    [
        {},
        {"PatientAge": ""},
        {"PatientAge": "ABCY"},
        {"PatientAge": "200Y"},
        {"PatientBirthDate": "19600101"},  # no date to measure from
        {"StudyDate": "20260101"},
        {"PatientBirthDate": "20270101", "StudyDate": "20260101"},  # born after the study
        {"PatientBirthDate": "19601301", "StudyDate": "20260101"},  # no such month
        {"PatientBirthDate": "1960", "StudyDate": "20260101"},
        {"PatientBirthDate": "18500101", "StudyDate": "20260101"},  # older than 150
    ],
)
def test_an_age_the_film_does_not_state_is_unknown(attributes):
    assert demographics(film(**attributes)).age is None


@pytest.mark.parametrize(
    "sex, expected", [("M", "M"), ("F", "F"), ("f", "F"), ("O", None), ("", None), ("X", None), (None, None)]
)
def test_only_m_and_f_are_a_sex(sex, expected):
    attributes = {} if sex is None else {"PatientSex": sex}
    assert demographics(film(**attributes)).sex == expected


def test_a_file_is_read_without_its_pixels(tmp_path):
    path = tmp_path / "film.dcm"
    film(PatientAge="070Y", PatientSex="F").save_as(path, enforce_file_format=True)
    assert read_demographics(path) == Demographics(70.0, "F")
