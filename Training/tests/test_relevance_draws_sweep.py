"""The relevance-draws sweep's choice, which `make demo-model` writes into the demo model's card."""

import subprocess
import sys

from training_scripts import SCRIPTS, load

SCRIPT = SCRIPTS / "relevance_draws_sweep.py"


def _choose():
    return load("relevance_draws_sweep").choose


def _row(draws: int, peak: float, lesion: float = 1.0, image: float = 0.45) -> dict:
    return {
        "relevance_draws": draws,
        "previews": 160,
        "peak_in_lesion": peak,
        "lesion_coverage": lesion,
        "image_coverage": image,
    }


def test_the_fewest_draws_within_a_standard_error_of_the_best_peak():
    choose = _choose()
    # the best rate 0.85 on 160 previews has a standard error of 0.028
    rows = [_row(1, 0.63), _row(2, 0.80), _row(4, 0.83), _row(8, 0.85)]
    assert choose(rows)["relevance_draws"] == 4
    # a setting whose masks miss the coverage targets never counts, not even as the best
    rows = [_row(1, 0.63), _row(4, 0.83), _row(8, 0.95, lesion=0.85), _row(16, 0.99, image=0.6)]
    assert choose(rows)["relevance_draws"] == 4
    # none meets them: the authors' one draw
    assert choose([_row(1, 0.6, lesion=0.8), _row(4, 0.9, lesion=0.8)])["relevance_draws"] == 1


def test_bad_draws_are_refused_before_anything_is_made(tmp_path):
    for draws, message in (
        (["1", "0"], "relevance_draws must be an integer in [1, 16]"),
        (["4"], "the draws must include 1"),
        (["1", "x"], "invalid int value"),
    ):
        done = subprocess.run(
            [sys.executable, str(SCRIPT), str(tmp_path), *draws, "--model", "no-such-model"],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []
