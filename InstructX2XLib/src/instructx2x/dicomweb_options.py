"""The command-line options that name a DICOMweb cohort, shared by ``instructx2x edit``,
``instructx2x-train evaluate`` and ``instructx2x-train stress-test``: ``add_query_arguments``
puts them on a parser (with ``--dicomweb-store`` for the commands that store results back) and
``query_from_arguments`` reads them back as a ``dicom.dicomweb.CohortQuery`` and its
credentials. Adding the options imports no DICOM library; reading them does.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ParameterError

if TYPE_CHECKING:
    from .dicom.dicomweb import CohortQuery, Credentials

__all__ = ["add_query_arguments", "query_from_arguments"]

# the options besides --dicomweb, by their attribute's suffix
_QUERY_OPTIONS = ("study", "series", "modality", "dates", "credentials")


def add_query_arguments(group: argparse._ActionsContainer, store: str | None = None) -> None:
    """Add ``--dicomweb URL``, ``--dicomweb-study``, ``--dicomweb-series``,
    ``--dicomweb-modality``, ``--dicomweb-dates`` and ``--dicomweb-credentials FILE`` to a parser
    or argument group; with ``store`` (its help text) also the flag ``--dicomweb-store``."""
    group.add_argument("--dicomweb", metavar="URL", help="the DICOMweb service root (the only network use)")
    group.add_argument("--dicomweb-study", metavar="UID", help="StudyInstanceUID to match")
    group.add_argument("--dicomweb-series", metavar="UID", help="SeriesInstanceUID to match")
    group.add_argument("--dicomweb-modality", metavar="CR|DX", help="Modality to match")
    group.add_argument("--dicomweb-dates", metavar="YYYYMMDD[-YYYYMMDD]", help="StudyDate or range to match")
    group.add_argument(
        "--dicomweb-credentials",
        type=Path,
        metavar="FILE",
        help="JSON file with username and password, or token (default: $INSTRUCTX2X_DICOMWEB_USER, "
        "_PASSWORD or _TOKEN)",
    )
    if store is not None:
        group.add_argument("--dicomweb-store", action="store_true", help=store)


def query_from_arguments(
    args: argparse.Namespace, environ: Mapping[str, str] = os.environ
) -> tuple[CohortQuery | None, Credentials | None]:
    """The cohort and credentials that the ``add_query_arguments`` options name; ``(None, None)``
    without ``--dicomweb``. Credentials come from the file, else from the environment
    (``dicom.dicomweb.read_credentials``).

    Raises
    ------
    ParameterError
        A query option, a credentials file or ``--dicomweb-store`` without ``--dicomweb``; a
        malformed query.
    InputNotFoundError, InputError
        A missing or malformed credentials file.
    """
    if args.dicomweb is None:
        for name in _QUERY_OPTIONS:
            if getattr(args, f"dicomweb_{name}") is not None:
                raise ParameterError(f"--dicomweb-{name} needs --dicomweb URL.")
        if getattr(args, "dicomweb_store", False):
            raise ParameterError("--dicomweb-store needs --dicomweb URL.")
        return None, None
    from .dicom.dicomweb import CohortQuery, read_credentials

    query = CohortQuery(
        args.dicomweb, args.dicomweb_study, args.dicomweb_series, args.dicomweb_modality, args.dicomweb_dates
    )
    return query, read_credentials(args.dicomweb_credentials, environ)
