"""Where the rows of a jobs run come from: a jobs CSV, or a cohort of films on a DICOMweb server.

``prepare_jobs_run`` turns either source into prepared rows, this process's shard, the settings
a resume must match and, for a cohort stored back, the STOW-RS step run after each row; all
before the model loads, so a bad source costs no model work. A cohort's films are recorded in
``OUTPUT/cohort.json`` and fetched (by the main process) into ``OUTPUT/films/``; a resumed run
edits the films it recorded, without asking the server again (which by then also holds the
edits the run stored). A failure before any row is edited removes an output folder this run
created, so nothing is left half written.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from .errors import InstructX2XError, PacsError, ParameterError
from .jobs import (
    INCOMPLETE,
    AfterRow,
    EditJob,
    PreparedJob,
    check_jobs_output,
    cohort_jobs,
    jobs_settings,
    open_jobs_output,
    prepare_jobs,
    read_jobs_file,
)
from .outputs import check_new_output_folder
from .sharding import Shard, current_shard

__all__ = ["JobsRun", "prepare_jobs_run", "FILMS"]

FILMS = "films"


@dataclasses.dataclass
class JobsRun:
    """Rows checked and ready for ``jobs.run_jobs_file``."""

    prepared: list[PreparedJob]
    settings: dict
    shard: Shard
    after_row: AfterRow | None = None


def prepare_jobs_run(
    template: EditJob,
    batch_size: int,
    jobs_file: Path | None = None,
    cohort=None,
    credentials=None,
    store: bool = False,
    **settings,
) -> JobsRun:
    """Read and check every row of a jobs CSV (``jobs_file``) or a DICOMweb cohort (``cohort``,
    a ``dicom.dicomweb.CohortQuery``; ``credentials`` from ``dicomweb.read_credentials``;
    ``store``: send each row's DICOM objects back with STOW-RS) before any model work.

    ``template`` gives every row's settings (a cohort's rows also take its instruction and
    seed); ``settings`` (the model, the sampler) join what a resume must match.

    Raises
    ------
    InstructX2XError
        ``InputError`` (no film, a non-radiograph, a bad row, a malformed ``cohort.json``),
        ``ParameterError``, ``OutputExistsError``, ``PacsError`` (the server failed; nothing left
        behind).
    """
    if not (template.output / INCOMPLETE).is_file():  # a new folder: checked before any source is read
        check_new_output_folder(template.output)
    shard = current_shard()
    if cohort is None:
        if jobs_file is None:
            raise ParameterError("give a jobs file or a DICOMweb cohort.")
        jobs = read_jobs_file(jobs_file, template)
        prepared = prepare_jobs(jobs)
        run_settings = jobs_settings(jobs, batch_size, **settings)
        check_jobs_output(template.output, run_settings)
        return JobsRun(prepared, run_settings, shard)
    from .dicom.dicomweb import cohort_films, connect, record_films, retrieve_films, store_folder

    output = template.output
    films = cohort_films(cohort, credentials, output)
    jobs = cohort_jobs([output / FILMS / film.file_name for film in films], template)
    run_settings = jobs_settings(jobs, batch_size, dicomweb=cohort.describe(), store=store, **settings)
    created = False
    try:
        if shard.is_main:
            created = not open_jobs_output(output, run_settings)
            record_films(output, films)
            (output / FILMS).mkdir(exist_ok=True)
            retrieve_films(connect(cohort.url, credentials), films, output / FILMS)
        shard.wait()
        prepared = prepare_jobs(jobs)
    except (InstructX2XError, KeyboardInterrupt):
        if created:
            shutil.rmtree(output, ignore_errors=True)
        raise

    def store_row(item: PreparedJob, folder: Path) -> dict:
        try:
            return {"stored": store_folder(folder, cohort.url, credentials)}
        except PacsError as error:
            raise PacsError(
                f"{folder.name} written but not stored ({error}); the rows before it are kept: "
                "rerun the same command to resume."
            ) from None

    return JobsRun(prepared, run_settings, shard, store_row if store else None)
