"""DICOMweb: a cohort of radiographs listed with QIDO-RS and fetched with WADO-RS; results
stored with STOW-RS.

``CohortQuery`` names the server and what to match (study, series, modality, study dates);
``list_films`` asks QIDO-RS for the matching instances and refuses, before any film is fetched
or any model loaded, a query that matches nothing or matches images that are not radiographs;
``retrieve_films`` fetches each film with WADO-RS into a folder (each file written whole or not
at all); results go back with ``push_stow`` into the source study (the edit's DICOM
objects already belong to it). A run records the films it starts with in its output folder
(``record_films``, ``OUTPUT/cohort.json``) and a resumed run edits those (``cohort_films``)
without asking the server again: by then the query may also match the run's own stored edits,
or other films. Credentials come from the environment or a file
(``read_credentials``), never from the command line; no message, log line or record carries
them. Nothing here runs unless the user names a server.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from ..errors import InputError, InputNotFoundError, PacsError, ParameterError

__all__ = [
    "RADIOGRAPH_MODALITIES",
    "CREDENTIAL_ENV",
    "Credentials",
    "CohortQuery",
    "Film",
    "COHORT_RECORD",
    "read_credentials",
    "connect",
    "list_films",
    "record_films",
    "cohort_films",
    "retrieve_films",
    "push_stow",
    "store_folder",
]

# what the editor reads as a projection radiograph (computed and digital radiography)
RADIOGRAPH_MODALITIES = ("CR", "DX")
CREDENTIAL_ENV = {
    "username": "INSTRUCTX2X_DICOMWEB_USER",
    "password": "INSTRUCTX2X_DICOMWEB_PASSWORD",
    "token": "INSTRUCTX2X_DICOMWEB_TOKEN",
}
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_MODALITY = re.compile(r"^[A-Z0-9]{1,16}$")
_DATES = re.compile(r"^(\d{8})?(-(\d{8})?)?$")
COHORT_RECORD = "cohort.json"  # the films a run started with, in its output folder
_TAGS = {"study": "0020000D", "series": "0020000E", "instance": "00080018", "modality": "00080060"}


@dataclasses.dataclass(frozen=True)
class Credentials:
    """HTTP basic (``username`` and ``password``) or bearer (``token``) authentication; the
    secret never shows in ``repr``."""

    username: str | None = dataclasses.field(default=None)
    password: str | None = dataclasses.field(default=None, repr=False)
    token: str | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        basic = self.username is not None or self.password is not None
        if basic and not (self.username and self.password):
            raise ParameterError("DICOMweb credentials need both a username and a password.")
        if basic == (self.token is not None):
            raise ParameterError(
                "DICOMweb credentials are a username and password, or a token: one of the two."
            )
        if self.token is not None and not self.token:
            raise ParameterError("DICOMweb token is empty.")

    def basic(self) -> tuple[str, str] | None:
        """``(username, password)`` for HTTP basic authentication; None for a token."""
        if self.username is None or self.password is None:
            return None
        return self.username, self.password


@dataclasses.dataclass(frozen=True)
class CohortQuery:
    """Which films to take from a DICOMweb server.

    Attributes
    ----------
    url: str
        The service root (``https://pacs/dicom-web``).
    study, series: str | None
        StudyInstanceUID, SeriesInstanceUID to restrict to.
    modality: str | None
        e.g. ``CR`` or ``DX``; without it every instance matched must still be a radiograph.
    dates: str | None
        StudyDate: ``YYYYMMDD``, or a range ``YYYYMMDD-YYYYMMDD`` (either end may be open).
    """

    url: str
    study: str | None = None
    series: str | None = None
    modality: str | None = None
    dates: str | None = None

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ParameterError("the DICOMweb URL must start with http:// or https://.")
        if "@" in self.url.split("/", 3)[2]:
            raise ParameterError(
                "the DICOMweb URL carries credentials; give them in the environment or a "
                "--dicomweb-credentials file instead (docs/cli.md)."
            )
        for name in ("study", "series"):
            value = getattr(self, name)
            if value is not None and (not _UID.match(value) or len(value) > 64):
                raise ParameterError(
                    f"--dicomweb-{name} must be a DICOM UID (digits and dots), got {value!r}."
                )
        if self.modality is not None and not _MODALITY.match(self.modality):
            raise ParameterError(
                f"--dicomweb-modality must be a DICOM modality such as DX, got {self.modality!r}."
            )
        if self.dates is not None and (not self.dates.strip("-") or not _DATES.match(self.dates)):
            raise ParameterError(
                f"--dicomweb-dates must read YYYYMMDD or YYYYMMDD-YYYYMMDD, got {self.dates!r}."
            )

    def describe(self) -> dict:
        """The query as recorded with the results (no credentials)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Film:
    """One instance the query matched."""

    study: str
    series: str
    instance: str
    modality: str

    @property
    def file_name(self) -> str:
        return f"{self.instance}.dcm"


def read_credentials(path: Path | None = None, environ: Mapping[str, str] = os.environ) -> Credentials | None:
    """Credentials from a file (JSON: ``{"username": ..., "password": ...}`` or
    ``{"token": ...}``), else from ``INSTRUCTX2X_DICOMWEB_USER``/``_PASSWORD`` or ``_TOKEN``;
    ``None`` when neither is given.

    Raises
    ------
    InputNotFoundError, InputError
        A missing or malformed file (the message never quotes its content).
    ParameterError
        An incomplete pair, or both kinds at once.
    """
    if path is not None:
        if not path.is_file():
            raise InputNotFoundError(f"DICOMweb credentials file not found: {path.name}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InputError(f"{path.name}: not a JSON object of username/password or token.") from None
        if not isinstance(data, dict) or set(data) - set(CREDENTIAL_ENV) or not data:
            raise InputError(f"{path.name}: keys must be username and password, or token.")
        if not all(isinstance(value, str) for value in data.values()):
            raise InputError(f"{path.name}: every value must be a string.")
        return Credentials(**data)
    found = {key: environ[name] for key, name in CREDENTIAL_ENV.items() if environ.get(name)}
    return Credentials(**found) if found else None


def connect(url: str, credentials: Credentials | None = None, timeout: float = 30.0):
    """A ``dicomweb_client.DICOMwebClient`` for ``url`` with the credentials set on its session."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    if credentials is not None and credentials.token is not None:
        session.headers["Authorization"] = f"Bearer {credentials.token}"
    elif credentials is not None:
        session.auth = credentials.basic()
    return DICOMwebClient(url=url, session=session, timeout=timeout)


def list_films(client, query: CohortQuery) -> list[Film]:
    """Every instance the query matches, sorted by study, series and instance UID.

    Raises
    ------
    InputError
        Nothing matched, or some matches are not radiographs (the message counts them by
        modality).
    PacsError
        The server refused or did not answer.
    """
    filters = {}
    if query.modality is not None:
        filters["Modality"] = query.modality
    if query.dates is not None:
        filters["StudyDate"] = query.dates
    if query.series is not None and query.study is None:
        # a series in the path needs its study there too: without one, a filter
        filters["SeriesInstanceUID"] = query.series
    answer = _ask(
        "QIDO-RS search",
        client.search_for_instances,
        study_instance_uid=query.study,
        series_instance_uid=query.series if query.study is not None else None,
        fields=["Modality", "StudyInstanceUID", "SeriesInstanceUID"],
        search_filters=filters,
        get_remaining=True,
    )
    films = sorted(
        {
            Film(*(_value(item, _TAGS[key]) for key in ("study", "series", "instance", "modality")))
            for item in answer
        },
        key=lambda film: (film.study, film.series, film.instance),
    )
    if not films:
        raise InputError("the DICOMweb query matched no film; check the study, series, modality and dates.")
    others = Counter(film.modality or "none" for film in films if film.modality not in RADIOGRAPH_MODALITIES)
    if others:
        counted = ", ".join(f"{count} {modality}" for modality, count in sorted(others.items()))
        raise InputError(
            f"the DICOMweb query matched {len(films)} images, of which {counted} are not radiographs "
            f"({'/'.join(RADIOGRAPH_MODALITIES)}); narrow it, e.g. with --dicomweb-modality DX."
        )
    bad = [
        film for film in films if not all(_UID.match(uid) for uid in (film.study, film.series, film.instance))
    ]
    if bad:
        raise PacsError(f"the DICOMweb server answered {len(bad)} instance(s) without valid UIDs.")
    return films


def record_films(output: Path, films: list[Film]) -> None:
    """Record ``films`` in ``output/cohort.json`` (written whole or not at all) unless a record is
    there already: the films a run starts with, for ``cohort_films`` when it resumes."""
    path = output / COHORT_RECORD
    if path.is_file():
        return
    partial = output / f".{COHORT_RECORD}.partial"
    partial.write_text(json.dumps([dataclasses.asdict(film) for film in films], indent=1) + "\n")
    partial.replace(path)


def cohort_films(query: CohortQuery, credentials: Credentials | None, output: Path) -> list[Film]:
    """The films ``output/cohort.json`` records (``record_films``: a run to resume), else every
    radiograph the query matches (``list_films``, asked of the server).

    Raises
    ------
    InputError
        A record that is not a list of films; as ``list_films``.
    PacsError
        As ``list_films``.
    """
    path = output / COHORT_RECORD
    if not path.is_file():
        return list_films(connect(query.url, credentials), query)
    fields = {field.name for field in dataclasses.fields(Film)}
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(recorded, list) or not recorded:
            raise ValueError
        films = []
        for item in recorded:
            if not isinstance(item, dict) or set(item) != fields:
                raise ValueError
            if not all(isinstance(value, str) for value in item.values()):
                raise ValueError
            film = Film(**item)
            if not all(_UID.match(uid) for uid in (film.study, film.series, film.instance)):
                raise ValueError
            films.append(film)
    except (UnicodeDecodeError, ValueError):
        raise InputError(
            f"{output.name}/{COHORT_RECORD} is not the list of films this run started with; "
            "choose a new output folder."
        ) from None
    return films


def retrieve_films(client, films: list[Film], folder: Path) -> list[Path]:
    """Fetch each film with WADO-RS into ``folder/<SOPInstanceUID>.dcm`` (one already there is
    kept); each file appears whole or not at all.

    Raises
    ------
    PacsError
        The server refused or failed, or sent another instance than asked for.
    """
    import pydicom

    paths = []
    for film in films:
        path = folder / film.file_name
        if not path.is_file():
            dataset = _ask(
                "WADO-RS retrieve",
                client.retrieve_instance,
                film.study,
                film.series,
                film.instance,
            )
            if str(dataset.get("SOPInstanceUID", "")) != film.instance:
                raise PacsError("the DICOMweb server sent another instance than the one asked for.")
            partial = folder / f".{film.file_name}.partial"
            pydicom.dcmwrite(partial, dataset, enforce_file_format=True)
            partial.replace(path)
        paths.append(path)
    return paths


def push_stow(paths: list[Path], url: str, credentials: Credentials | None = None) -> None:
    """Store every file with STOW-RS at ``url`` (the service root), authenticated with
    ``credentials`` (``read_credentials``) when given.

    Raises
    ------
    ParameterError
        When the URL is not http(s).
    PacsError
        When the server answers with an error.
    """
    if not url.startswith(("http://", "https://")):
        raise ParameterError(f"STOW-RS URL must start with http:// or https://, got {url!r}.")
    import pydicom

    client = connect(url, credentials)
    datasets = [pydicom.dcmread(path) for path in paths]
    _ask("STOW-RS store", client.store_instances, datasets=datasets)


def store_folder(folder: Path, url: str, credentials: Credentials | None = None) -> int:
    """Send every ``.dcm`` file of a result folder with STOW-RS (into the source study, which
    the edit's objects belong to); returns how many were sent.

    Raises
    ------
    PacsError
        The server refused them.
    """
    files = sorted(folder.glob("*.dcm"))
    if files:
        push_stow(files, url, credentials)
    return len(files)


def _ask(what: str, call, *args, **kwargs):
    """``call(*args, **kwargs)``; a refusal or failure of the server as a ``PacsError`` that
    names the HTTP status (never the URL's query or the credentials)."""
    from requests import RequestException
    from retrying import RetryError  # dicomweb_client's: its last retry of 408, 429, 503 or 504

    try:
        return call(*args, **kwargs)
    except RequestException as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        reason = f"HTTP {status}" if status is not None else type(error).__name__
        if status in (401, 403):
            reason += " (check the credentials)"
        raise PacsError(f"{what} on the DICOMweb server failed: {reason}.") from None
    except RetryError as error:
        attempt = error.last_attempt
        status = None if attempt.has_exception else getattr(attempt.value, "status_code", None)
        reason = f"HTTP {status}" if status is not None else type(attempt.value[1]).__name__
        raise PacsError(
            f"{what} on the DICOMweb server failed: {reason} after {attempt.attempt_number} attempts."
        ) from None
    except (RuntimeError, ValueError) as error:
        raise PacsError(f"{what} on the DICOMweb server failed: {type(error).__name__}.") from None


def _value(item: dict, tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])
