"""The README's main command, end to end, exactly as a user runs it."""

import json
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from instructx2x.schedulers import FEW_STEP_SOLVER_STEPS

from console import console_script

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "Resources" / "Samples" / "chest_pa.png"


def test_main_command_edits_the_bundled_radiograph(tmp_path):
    executable = console_script("instructx2x")
    out = tmp_path / "demo"
    completed = subprocess.run(
        [executable, "edit", str(SAMPLE), "--model", "untrained-tiny", "-i",
         "Add the finding of left pleural effusion", "-o", str(out)],
        capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert "UNTRAINED MODEL" in completed.stderr
    summary = json.loads(completed.stdout)
    assert summary["prior"]["categories"] == ["Pleural Effusion"]
    manifest = json.loads((out / "manifest.json").read_text())
    if manifest["device"] == "cpu":  # the default CPU path (docs/benchmarks.md)
        assert manifest["parameters"]["num_inference_steps"] == FEW_STEP_SOLVER_STEPS
        assert manifest["dtype"] == "float32"  # bf16 pays only for large UNets (devices.py)
    source = np.asarray(Image.open(SAMPLE))
    edited = np.asarray(Image.open(out / "edited.png"))
    mask = np.asarray(Image.open(out / "edit_mask.png")) > 0
    assert edited.shape == source.shape
    assert np.array_equal(edited[~mask], source[~mask])
    # the patient's left is the image's right on a PA film
    assert not mask[:, : source.shape[1] // 2].any() and mask.any()
