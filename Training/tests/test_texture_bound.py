"""The bound on adding a finding whose pattern the instruction leaves open (texture_bound.py)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from training_scripts import SCRIPTS, load

from instructx2x_train.counterfactuals import PurePairsConfig, write_pure_pairs

SCRIPT = SCRIPTS / "texture_bound.py"


def _median_target():
    return load("texture_bound").median_target


def test_each_pixel_takes_the_median_of_the_draws_whose_lesion_covers_it():
    past = np.zeros((40, 40), np.float32)
    draws = [past.copy() for _ in range(3)]
    draws[0][5:20, 5:20] = 0.5
    draws[1][10:25, 10:25] = 0.3
    draws[2][10:25, 10:25] = 0.2
    median = _median_target()(past, draws, "pneumonia")
    assert median[7, 7] == 0.5  # only draw 0 covers it: its value, not the median of 0.5, 0, 0
    assert np.isclose(median[15, 15], 0.3)  # all three: 0.5, 0.3, 0.2
    assert np.isclose(median[22, 22], 0.25)  # draws 1 and 2
    assert median[35, 35] == 0.0  # no draw: the input


def _bound(folder: Path, finding: str) -> dict:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), str(folder), "--finding", finding, "--draws", "8"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(run.stdout)["accuracy_reduction"]


def test_the_median_beats_a_drawn_pneumonia_and_equals_a_texture_free_one(tmp_path):
    write_pure_pairs(
        tmp_path / "pairs",
        PurePairsConfig(
            pairs=8,
            seed=7,
            resolution=96,
            findings=("pneumonia", "lung opacity"),
            operations=("add",),
            split="test",
            other_finding_probability=0.0,
        ),
    )
    pneumonia = _bound(tmp_path / "pairs", "pneumonia")
    # lobules placed at random: a drawn pneumonia misses much of the true one; the median less
    assert pneumonia["a_draw (perfect model)"] < pneumonia["median_of_draws"] < 0.9
    # ground glass at the zone's centre has no texture: every draw is the target itself
    assert _bound(tmp_path / "pairs", "lung opacity") == {
        "median_of_draws": 1.0,
        "a_draw (perfect model)": 1.0,
    }


def test_bad_input_is_refused_with_a_specific_error_and_no_traceback(tmp_path):
    for args, message in (
        ([str(tmp_path), "--draws", "0"], "--draws must be >= 1, got 0"),
        ([str(tmp_path / "films")], "films has no manifest.json"),
    ):
        run = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)
        assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert list(tmp_path.iterdir()) == []
