"""Native detail inside the edit: composite "change" against "replace".

For each film, one edit with a fixed painted mask (the middle of the right lung field) and
each composite mode, measured inside the mask:

  detail   energy of the finest scale (each pixel minus its 3x3 mean), edited / input;
           1.0 means the native detail survived, ~0 that the upsampled model grid replaced it.
  change   mean |edited - input|: the edit's own magnitude (display units, [0, 1]).
  clipped  fraction of the mask's pixels clipped to the display or stored range.

Films: RG1_UNCR.dcm (pydicom-data's real PA CR, 1955x1841, MONOCHROME1) and a
synthetic-cohort phantom (Training package) at 1024x1024. The model is the tiny random one,
so "change" measures how much each mode alters the film, not an edit's quality.
Prints each row, then one JSON line.

Usage: python benchmark_composite.py
"""

from __future__ import annotations

import json
from typing import cast

import numpy as np

from instructx2x import EditParameters, InstructX2XEditor, Radiograph, read_dicom
from instructx2x.devices import cpu_description


def detail(array: np.ndarray, mask: np.ndarray) -> float:
    blurred = sum(np.roll(np.roll(array, dy, 0), dx, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9
    return float(((array - blurred)[mask] ** 2).mean())


def films() -> dict[str, Radiograph]:
    from pydicom.data import get_testdata_file

    real = cast(str, get_testdata_file("RG1_UNCR.dcm"))  # a path (a Dataset only with read=True)
    out = {"RG1_UNCR (real CR)": read_dicom(real)}
    try:
        from instructx2x_train.phantom import Pose, render_frontal

        pixels, _ = render_frontal(1024, 1024, [], Pose(), np.random.default_rng(0))
        out["phantom 1024"] = Radiograph(
            np.clip(pixels, 0, 1).astype(np.float32), "phantom.png", "0" * 64, "png", 16
        )
    except (ImportError, TypeError) as error:  # the Training package is optional here
        print(f"phantom skipped: {error}")
    return out


def main() -> None:
    editor = InstructX2XEditor.from_model("untrained-tiny", device="cpu")
    print(f"CPU: {cpu_description()}; model untrained-tiny at {editor.native_resolution} px")
    rows = []
    for name, image in films().items():
        h, w = image.pixels.shape
        mask = np.zeros((h, w), bool)
        mask[int(0.3 * h) : int(0.7 * h), int(0.15 * w) : int(0.45 * w)] = True
        inner = np.zeros_like(mask)
        inner[int(0.32 * h) : int(0.68 * h), int(0.17 * w) : int(0.43 * w)] = True
        source = detail(image.pixels, inner)
        for mode in ("change", "replace"):
            result = editor.edit(
                image,
                EditParameters(
                    "Add the finding of left pleural effusion", region_mode="prior", composite=mode
                ),
                mask=mask,
            )
            row = {
                "film": name,
                "composite": mode,
                "detail_ratio": round(detail(result.edited, inner) / source, 3),
                "mean_abs_change": round(float(np.abs(result.edited - image.pixels)[mask].mean()), 4),
                "clipped_fraction": result.manifest["composite"]["clipped_fraction"],
            }
            rows.append(row)
            print(row)
    print(json.dumps({"cpu": cpu_description(), "rows": rows}))


if __name__ == "__main__":
    main()
