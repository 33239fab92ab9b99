"""The README's main command, end to end, exactly as a user runs it (`make demo`), and the
second sample (RG1, a real film)."""

import json
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pydicom
from console import console_script
from dicom_factory import dciodvfy_errors
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "Resources" / "Samples"
PHANTOM = SAMPLES / "phantom_pa.dcm"
TRUTH = SAMPLES / "phantom_pa_truth_moderate_left_effusion.png"
INSTRUCTION = "Add the finding of moderate left pleural effusion"


def _make_demo_command(tmp_path: Path) -> list[str]:
    """The command `make demo` runs, read from the Makefile itself (so the two cannot drift)."""
    completed = subprocess.run(
        ["make", "-s", "-n", "demo", f"BIN={Path(console_script('instructx2x')).parent}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    line = next(text for text in completed.stdout.replace("\\\n", " ").splitlines() if " edit " in text)
    return shlex.split(line.replace("out/demo-$(date +%Y%m%d-%H%M%S)", str(tmp_path / "demo")))


def test_main_job_edits_the_bundled_phantom_with_the_demo_model(tmp_path):
    command = _make_demo_command(tmp_path)
    assert "--model" in command and command[command.index("--model") + 1] == "demo"
    assert str(PHANTOM.relative_to(ROOT)) in command and INSTRUCTION in command
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert "UNTRAINED" not in completed.stderr + completed.stdout
    out = tmp_path / "demo"
    summary = json.loads(completed.stdout)
    assert summary["prior"]["categories"] == ["Pleural Effusion"]
    for name in (
        "counterfactual.dcm",
        "guidance_overlay.dcm",
        "edit_region_seg.dcm",
        "edited.png",
        "guidance_overlay.png",
        "edit_mask.png",
        "figure.png",
        "manifest.json",
        "provenance.json",
    ):
        assert (out / name).is_file(), name
    for name in ("counterfactual.dcm", "guidance_overlay.dcm", "edit_region_seg.dcm"):
        assert dciodvfy_errors(out / name) == [], name
        assert "SYNTHETIC" in str(pydicom.dcmread(out / name).SeriesDescription)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["name"] == "demo" and manifest["model"]["trained"] is True
    if manifest["device"] == "cpu":  # the default CPU path: DPM-Solver++ with the card's step count
        assert (
            manifest["parameters"]["num_inference_steps"]
            == manifest["model"]["card"]["few_step_solver_steps"]
            == 10
        )

    source = pydicom.dcmread(PHANTOM).pixel_array
    edited = pydicom.dcmread(out / "counterfactual.dcm").pixel_array
    mask = np.asarray(Image.open(out / "edit_mask.png")) > 0
    truth = np.asarray(Image.open(TRUTH)) > 0
    assert np.array_equal(edited[~mask], source[~mask])
    # a believable local edit: fluid makes the true lesion denser, on the patient's left
    # (the image's right), and the edit mask covers most of the true lesion
    change = edited.astype(float) - source
    assert change[truth].mean() > 0.25 * 4095 * 0.05
    assert mask[truth].mean() > 0.5 and not mask[:, : source.shape[1] // 2].any()
    figure = Image.open(out / "figure.png")
    assert figure.height == 512 and figure.width == 3 * 512
    assert "SYNTHETIC" in figure.info["Description"]


def test_second_sample_a_real_film_with_the_default_model(tmp_path):
    executable = console_script("instructx2x")
    out = tmp_path / "rg1"
    completed = subprocess.run(
        [
            executable,
            "edit",
            str(SAMPLES / "chest_pa.png"),
            "-i",
            "Add the finding of right pneumothorax",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert "using the bundled demo model" in completed.stderr  # the one-line notice
    source = np.asarray(Image.open(SAMPLES / "chest_pa.png"))
    edited = np.asarray(Image.open(out / "edited.png"))
    mask = np.asarray(Image.open(out / "edit_mask.png")) > 0
    assert edited.shape == source.shape and np.array_equal(edited[~mask], source[~mask])
    assert not mask[:, source.shape[1] // 2 :].any() and mask.any()  # patient's right = image's left
