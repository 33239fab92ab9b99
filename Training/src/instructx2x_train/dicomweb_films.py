"""The films of a DICOMweb cohort for ``evaluate`` and ``stress-test``: listed with QIDO-RS
before the model loads (``list_cohort``), fetched with WADO-RS by the main process into
``OUTPUT/films/`` once the output folder exists (``fetch_cohort``). The query, the client and
the checks are the library's (``instructx2x.dicom.dicomweb``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from instructx2x.dicom.dicomweb import CohortQuery, Credentials, Film
from instructx2x.errors import InstructX2XError

__all__ = ["FETCHED", "list_cohort", "fetch_cohort"]

FETCHED = "films"  # a DICOMweb cohort's films, in the output folder


def list_cohort(query: CohortQuery, credentials: Credentials | None) -> list[Film]:
    """Every radiograph the query matches (``dicomweb.list_films``: no film, a non-radiograph or a
    refusal by the server raise before anything is fetched)."""
    from instructx2x.dicom.dicomweb import connect, list_films

    return list_films(connect(query.url, credentials), query)


def fetch_cohort(
    output: Path,
    films: list[Film],
    query: CohortQuery,
    credentials: Credentials | None,
    resumed: bool,
    check: Callable[[list[Path]], None] | None = None,
) -> list[Path]:
    """Fetch the films into ``output/films`` (those already there are kept), then ``check``
    them; a failure in a new run removes the output folder it created, so nothing is left
    half written. Returns the films' paths, in the order of ``films``."""
    from instructx2x.dicom.dicomweb import connect, retrieve_films

    try:
        (output / FETCHED).mkdir(exist_ok=True)
        paths = retrieve_films(connect(query.url, credentials), films, output / FETCHED)
        if check is not None:
            check(paths)
    except (InstructX2XError, KeyboardInterrupt):
        if not resumed:
            shutil.rmtree(output, ignore_errors=True)
        raise
    return paths
