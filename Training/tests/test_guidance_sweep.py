"""The guidance sweep's choice, which `make demo-model` writes into the demo model's card."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "guidance_sweep.py"


def _sweep_module():
    spec = importlib.util.spec_from_file_location("guidance_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(s_t: float, **figures) -> dict:
    row = {"guidance_scale": s_t, "image_guidance_scale": 1.5, "direction_worst": 0.7, "direction_mean": 0.9,
           "laterality_worst": 0.6, "laterality_mean": 0.8, "accuracy_groups_met": 10, "accuracy_mean": 0.5}
    return {**row, **figures}


def test_the_most_accurate_setting_wins_unless_it_loses_direction_or_side():
    choose = _sweep_module().choose
    authors = _row(7.5)
    wrong_side = _row(3.0, accuracy_groups_met=14, laterality_mean=0.79)
    better = _row(2.5, accuracy_groups_met=12, accuracy_mean=0.55)
    tied_but_less_accurate = _row(2.0, accuracy_groups_met=12, accuracy_mean=0.52)
    assert choose([authors, wrong_side, better, tied_but_less_accurate]) is better
    assert choose([authors, _row(3.0, direction_worst=0.65, accuracy_groups_met=16)]) is authors
