"""The films a DICOMweb run records in its output folder (``cohort.json``) and takes again when
it resumes, without asking the server (the Orthanc tests in Testing/test_dicomweb_cohort.py run
the commands)."""

import json

import pytest

from instructx2x.dicom.dicomweb import COHORT_RECORD, CohortQuery, Film, cohort_films, record_films
from instructx2x.errors import InputError

# nothing listens here: a query asked of it would fail
UNREACHABLE = CohortQuery("http://127.0.0.1:9/dicom-web", study="1.2.3")
FILMS = [Film("1.2.3", "1.2.3.4", "1.2.3.4.5", "DX"), Film("1.2.3", "1.2.3.4", "1.2.3.4.6", "CR")]


def test_a_recorded_cohort_is_taken_without_asking_the_server(tmp_path):
    record_films(tmp_path, FILMS)
    assert cohort_films(UNREACHABLE, None, tmp_path) == FILMS
    record_films(tmp_path, FILMS[:1])  # the first record is kept
    assert cohort_films(UNREACHABLE, None, tmp_path) == FILMS
    assert [path.name for path in tmp_path.iterdir()] == [COHORT_RECORD]


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        json.dumps({"study": "1.2.3"}),
        json.dumps([{"study": "1.2.3", "series": "1.2.3.4", "instance": "1.2.3.4.5"}]),
        json.dumps([{"study": "1.2.3", "series": "1.2.3.4", "instance": "../x", "modality": "DX"}]),
    ],
)
def test_a_record_that_is_not_a_list_of_films_is_refused(tmp_path, content):
    (tmp_path / COHORT_RECORD).write_text(content)
    with pytest.raises(InputError, match="cohort.json is not the list of films this run started with"):
        cohort_films(UNREACHABLE, None, tmp_path)
