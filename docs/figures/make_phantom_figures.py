"""Figures of cohort v2 (docs/cohort-v2.md): phantoms beside RG1, and every finding.

phantom_vs_rg1.png: RG1_UNCR.dcm (pydicom-data's real adult PA CR; its spacing is not stated,
0.2 mm assumed) and three phantoms (0.7 mm), all resampled to 1 mm per pixel, so anatomy
sizes compare directly.
phantom_findings.png: one phantom with each rendered finding at moderate level, its
ground-truth mask outlined in red.

Usage: python make_phantom_figures.py OUTPUT_FOLDER
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.data import get_testdata_file

from instructx2x import read_image
from instructx2x.overlay import outline
from instructx2x_train.phantom import RENDERED_FINDINGS, Anatomy, FindingState, Pose, render_frontal

MM = 1.0  # output pixel size
PHANTOM_MM = 0.7  # the phantoms' pixel size (512 px = 358 mm, an adult chest field)
folder = Path(sys.argv[1])


def at_mm(pixels: np.ndarray, spacing: float) -> np.ndarray:
    rows, columns = (round(n * spacing / MM) for n in pixels.shape)
    return np.asarray(
        Image.fromarray(pixels.astype(np.float32)).resize((columns, rows), Image.Resampling.BOX)
    )


real = read_image(get_testdata_file("RG1_UNCR.dcm"))
RG1_MM = 0.2  # RG1 states no spacing (PixelSpacing 0\0); 0.2 mm puts it on a 39 x 37 cm field
panels = [at_mm(real.pixels, RG1_MM)]
people = [
    (Anatomy.draw(np.random.default_rng(1), 30, "F", "Asian"), []),
    (Anatomy.draw(np.random.default_rng(2), 82, "M", "Black"), []),
    (
        Anatomy.draw(np.random.default_rng(3), 60, "M", "White"),
        [
            FindingState("pleural effusion", "moderate", "left", seed=1),
            FindingState("consolidation", "moderate", "right", (0.3, -0.4), seed=2),
        ],
    ),
]
for index, (anatomy, findings) in enumerate(people):
    film, _ = render_frontal(512, 512, findings, Pose(), np.random.default_rng(index), anatomy)
    panels.append(at_mm(film, PHANTOM_MM))
height = max(p.shape[0] for p in panels)
row = np.concatenate([np.pad(p, ((0, height - p.shape[0]), (0, 8)), constant_values=1.0) for p in panels], 1)
Image.fromarray((np.clip(row, 0, 1) * 255).round().astype(np.uint8)).save(folder / "phantom_vs_rg1.png")

tiles = []
anatomy = Anatomy.draw(np.random.default_rng(5), 55, "M", "White")
for index, name in enumerate(RENDERED_FINDINGS):
    finding = FindingState(name, "moderate", "left" if index % 2 else "right", (0.2, 0.2), seed=index)
    film, masks = render_frontal(256, 256, [finding], Pose(), np.random.default_rng(9), anatomy)
    rgb = np.repeat(film[..., None], 3, -1)
    rgb[outline(masks[name])] = (1.0, 0.15, 0.15)
    tiles.append(rgb)
grid = np.concatenate([np.concatenate(tiles[:4], 1), np.concatenate(tiles[4:], 1)], 0)
Image.fromarray((grid * 255).round().astype(np.uint8)).save(folder / "phantom_findings.png")
