"""The films of a DICOMweb cohort for ``evaluate`` and ``stress-test``: listed with QIDO-RS
before the model loads (``dicomweb.cohort_films``: a resumed run takes the films it recorded in
``OUTPUT/cohort.json``, whatever the server holds by then, its own stored edits included),
recorded and fetched with WADO-RS by the main process into ``OUTPUT/films/`` once the output
folder exists (``fetch_cohort``), then checked to be radiographs the editor reads
(``check_readable``) before any film is edited or classified. The query, the record, the client
and the checks are the library's (``instructx2x.dicom.dicomweb``), shared with ``instructx2x
edit --dicomweb``. A film's local name is its SOPInstanceUID: it finds the film again in the
PACS and carries nothing of the patient (no name, ID, date, age or sex).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from instructx2x.dicom.dicomweb import CohortQuery, Credentials, Film
from instructx2x.errors import InstructX2XError
from instructx2x.image_io import ImageReadError

__all__ = ["FETCHED", "fetch_cohort", "check_readable"]

FETCHED = "films"  # a DICOMweb cohort's films, in the output folder


def fetch_cohort(
    output: Path,
    films: list[Film],
    query: CohortQuery,
    credentials: Credentials | None,
    resumed: bool,
    check: Callable[[list[Path]], None] | None = None,
) -> list[Path]:
    """Record the films in ``output/cohort.json`` (a new run: ``dicomweb.record_films``), fetch
    them into ``output/films`` (those already there are kept), then ``check`` them; a failure in
    a new run removes the output folder it created, so nothing is left half written. Returns the
    films' paths, in the order of ``films``."""
    from instructx2x.dicom.dicomweb import connect, record_films, retrieve_films

    try:
        record_films(output, films)
        (output / FETCHED).mkdir(exist_ok=True)
        paths = retrieve_films(connect(query.url, credentials), films, output / FETCHED)
        if check is not None:
            check(paths)
    except (InstructX2XError, KeyboardInterrupt):
        if not resumed:
            shutil.rmtree(output, ignore_errors=True)
        raise
    return paths


def check_readable(paths: list[Path]) -> None:
    """Every fetched film reads as a radiograph the editor takes (``read_image``).

    Raises
    ------
    ImageReadError
        The first film that does not (no pixel data, not a chest, a photometric interpretation,
        size or transfer syntax it cannot take, ...), named by its file and the reason.
    """
    from instructx2x import read_image

    for path in paths:
        try:
            read_image(path)
        except ImageReadError as error:
            raise ImageReadError(
                f"the DICOMweb query matched a film that cannot be edited: {error} Leave it out "
                "with a narrower query (--dicomweb-series, --dicomweb-modality, --dicomweb-dates)."
            ) from None
