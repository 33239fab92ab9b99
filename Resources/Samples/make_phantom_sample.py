"""Make phantom_pa.dcm (the main job's sample) and the ground truth of its demo edit.

A cohort-v2 phantom of a normal adult PA chest, drawn with a seed that no training or test set
uses (4242), written as a 12-bit CR at 0.7 mm per pixel (512 x 512). Beside it:
phantom_pa_truth_moderate_left_effusion.png, the true lesion of the instruction
"Add the finding of moderate left pleural effusion" on this very film (white = lesion), which
the main job outlines on its figure.

Usage: python make_phantom_sample.py OUTPUT_FOLDER
"""

import datetime
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from instructx2x_train.cohort import write_cr
from instructx2x_train.phantom import (
    Anatomy,
    FindingState,
    Pose,
    finding_masks,
    form_film,
    render_attenuation,
)

SEED, SIZE = 4242, 512
folder = Path(sys.argv[1])
rng = np.random.default_rng(SEED)
anatomy = Anatomy.draw(rng, 58, "F", "White")
pose = Pose(0.8, 1.0, 0.01, -0.01)
noise = rng.standard_normal((SIZE, SIZE)).astype(np.float32)
effusion = FindingState("pleural effusion", "moderate", "left", seed=SEED)
normal = form_film(render_attenuation(SIZE, SIZE, anatomy, [], pose), noise, 0.0012 * SIZE)
with_effusion = form_film(render_attenuation(SIZE, SIZE, anatomy, [effusion], pose), noise, 0.0012 * SIZE)
lesion = finding_masks(with_effusion, {effusion.name: normal})[effusion.name]
pixels = np.round(normal * 4095).astype(np.uint16)
write_cr(
    folder / "phantom_pa.dcm",
    pixels,
    "PHANTOM4242",
    4242,
    f"phantom-{SEED}",
    "PA",
    datetime.date(2150, 1, 1),
    "F",
    58,
    spacing_mm=0.7,
)
Image.fromarray(lesion.astype(np.uint8) * 255).save(folder / "phantom_pa_truth_moderate_left_effusion.png")
