"""A resumable run's folder: created once, resumed with the same settings, refused otherwise with
the settings that differ named (``sharding.open_run_folder``; ``jobs.check_jobs_output``)."""

import json

import pytest

from instructx2x.errors import OutputExistsError
from instructx2x.jobs import JOBS_SETTINGS, check_jobs_output
from instructx2x.sharding import INCOMPLETE, RECORDS, open_run_folder

SETTINGS = {"seed": 0, "bootstrap": 100, "model": "demo"}


def test_a_run_folder_is_made_resumed_and_refused_with_what_differs(tmp_path):
    output = tmp_path / "run"
    assert open_run_folder(output, "settings.json", SETTINGS, "stress test") is False
    assert (output / RECORDS).is_dir() and (output / INCOMPLETE).is_file()
    assert json.loads((output / "settings.json").read_text()) == SETTINGS
    assert open_run_folder(output, "settings.json", SETTINGS, "stress test") is True

    other = {**SETTINGS, "bootstrap": 200, "limit": 3}
    with pytest.raises(
        OutputExistsError, match=r"unfinished stress test with other settings \(bootstrap, limit\)"
    ):
        open_run_folder(output, "settings.json", other, "stress test")
    assert json.loads((output / "settings.json").read_text()) == SETTINGS

    (output / INCOMPLETE).unlink()
    with pytest.raises(OutputExistsError, match="not an unfinished stress test"):
        open_run_folder(output, "settings.json", SETTINGS, "stress test")


def test_a_jobs_run_with_other_settings_names_them_and_creates_nothing(tmp_path):
    output = tmp_path / "jobs"
    output.mkdir()
    (output / INCOMPLETE).write_text("interrupted\n")
    (output / JOBS_SETTINGS).write_text(json.dumps({"rows": [], "batch_size": 1}))
    assert check_jobs_output(output, {"rows": [], "batch_size": 1}) is True
    with pytest.raises(OutputExistsError, match=r"other rows or settings \(batch_size\)"):
        check_jobs_output(output, {"rows": [], "batch_size": 2})
    assert sorted(path.name for path in output.iterdir()) == [INCOMPLETE, JOBS_SETTINGS]
