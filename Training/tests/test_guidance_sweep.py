"""The guidance sweep's choice, which `make demo-model` writes into the demo model's card."""

import subprocess
import sys

from training_scripts import SCRIPTS, load

SCRIPT = SCRIPTS / "guidance_sweep.py"


def _sweep_module():
    return load("guidance_sweep")


def _row(s_t: float, **figures) -> dict:
    """A sweep row of 160 edits in 16 groups, 120 laterality trials over 6 findings."""
    row = {
        "guidance_scale": s_t,
        "image_guidance_scale": 1.5,
        "direction_worst": 0.7,
        "direction_mean": 0.95,
        "laterality_worst": 0.7,
        "laterality_mean": 0.8,
        "accuracy_groups_met": 10,
        "accuracy_mean": 0.5,
        "edits_per_group": 10,
        "edits": 160,
        "trials_per_side_finding": 20,
        "lateral_trials": 120,
    }
    return {**row, **figures}


def test_the_most_accurate_setting_wins_unless_it_loses_direction_or_side():
    choose = _sweep_module().choose
    authors = _row(7.5)
    # laterality mean 0.8 rests on 120 trials: its standard error is 0.037
    wrong_side = _row(3.0, accuracy_groups_met=14, laterality_mean=0.76)
    better = _row(2.5, accuracy_groups_met=12, accuracy_mean=0.55, laterality_mean=0.77)
    less_accurate = _row(2.0, accuracy_groups_met=12, accuracy_mean=0.52)
    assert choose([authors, wrong_side, better, less_accurate]) is better
    # the worst group's direction rests on 10 edits (standard error 0.145): 0.5 is a real loss
    assert choose([authors, _row(3.0, direction_worst=0.5, accuracy_groups_met=16)]) is authors
    # one trial fewer of the 20 for the worst finding's side is not
    assert (
        choose([authors, _row(3.0, laterality_worst=0.65, accuracy_groups_met=16)])["guidance_scale"] == 3.0
    )


def test_bad_settings_are_refused_before_anything_is_made(tmp_path):
    for settings, message in (
        (["4/-1"], "image_guidance_scale must lie in"),
        (["4"], "settings are S_T/S_I pairs"),
    ):
        done = subprocess.run(
            [sys.executable, str(SCRIPT), str(tmp_path), *settings, "--model", "no-such-model"],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []
