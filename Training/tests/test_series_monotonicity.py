"""The progression-series measure (series_monotonicity.py): its truth rises with the level, and
the script writes its tables from a model's series."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
from training_scripts import SCRIPTS, load

from instructx2x.instructions import parse_series
from instructx2x_train.phantom import RENDERED_FINDINGS, level_words

SCRIPT = SCRIPTS / "series_monotonicity.py"


def test_the_true_films_of_every_finding_rise_with_the_level_in_both_measures():
    script = load("series_monotonicity")
    for index, name in enumerate(RENDERED_FINDINGS):
        patient = script.patient_series(7, index, 1, 128)
        without, truths, lesion = patient["without"], patient["truths"], patient["lesion"]
        assert patient["levels"] == level_words(name) and len(truths) == 3
        series = parse_series(patient["instructions"])  # the training wording is a valid series
        assert series.levels == level_words(name) and series.region_step == 2
        for truth in truths:  # one patient: the films differ only inside the lesion
            assert np.array_equal(truth[~lesion], without[~lesion])
        sign = np.sign(truths[-1] - without)
        values = script.measures(truths, without, lesion, sign, name)
        assert script.monotone(values["intensity"]) and script.monotone(values["extent"]), (name, values)


def test_monotone_means_strictly_rising():
    monotone = load("series_monotonicity").monotone
    assert monotone([0.1, 0.2, 0.3])
    assert not monotone([0.1, 0.2, 0.2]) and not monotone([0.3, 0.2, 0.1])


def test_a_run_writes_the_table_per_finding(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            str(out),
            "--model",
            "untrained-tiny",
            "--series",
            "1",
            "--resolution",
            "64",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md", "series.csv", "strips.png"]
    rows = pd.read_csv(out / "series.csv")
    assert list(rows["finding"]) == list(RENDERED_FINDINGS)
    results = json.loads((out / "results.json").read_text())
    assert [row["finding"] for row in results["per_finding"]] == [*RENDERED_FINDINGS, "all findings"]
    assert results["settings"]["cpu"] and results["target"] == 0.9
    assert "| all findings | 8 |" in (out / "results.md").read_text()


def test_bad_arguments_are_refused_before_anything_is_made(tmp_path):
    (tmp_path / "taken").mkdir()
    for arguments, message in (
        (["--series", "0"], "--series must be at least 1"),
        ([], "exists"),
    ):
        target = tmp_path / ("taken" if not arguments else "new")
        done = subprocess.run(
            [sys.executable, str(SCRIPT), str(target), "--model", "no-such-model", *arguments],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
