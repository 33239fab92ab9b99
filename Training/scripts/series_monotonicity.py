"""Does a progression series follow its levels? A model's series against the phantom's truth.

For each of the eight rendered findings, ``--series`` patients (phantoms drawn from the seed)
are filmed without the finding and with it at each of its levels (small, moderate, large for
pleural effusion and pneumothorax; mild, moderate, severe for the others): the phantom's own
ground truth. The film without it is edited with the series "Add the finding of <level> ..." at
every level, worded as the training pairs are (``counterfactuals.instruction_for``), by
``InstructX2XEditor.edit_series``: one seed and one edit region for every step. Per step:

- intensity: the mean change over the true lesion (the union of its masks at every level),
  each pixel signed as the truth at the highest level changes it (fluid brightens, a
  pneumothorax darkens its rim);
- extent: the area (share of the film) that the cohort's own lesion rule
  (``phantom.finding_masks``: more than 1 % of the display range after a 1-pixel blur, closed
  and filled) finds changed between the input and the step.

A series is monotone in a measure when the measure rises strictly from each step to the next;
the target is 90 % of series monotone in intensity or in extent, per finding. The same
measures on the true films (the ``truth`` columns) check the measures themselves.

Usage: python Training/scripts/series_monotonicity.py OUT [--model demo] [--series 10]
       [--seed 5000] [--resolution 256]
       (writes OUT/: series.csv, results.json, results.md, strips.png)
"""

from __future__ import annotations

import argparse
import hashlib
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from instructx2x.devices import cpu_description
from instructx2x.editor import InstructX2XEditor
from instructx2x.image_io import Radiograph
from instructx2x.instructions import parse_series
from instructx2x.outputs import atomic_output_dir
from instructx2x.overlay import series_strip
from instructx2x.parameters import EditParameters
from instructx2x.provenance import to_json
from instructx2x_train.counterfactuals import instruction_for
from instructx2x_train.phantom import (
    LATERALISED_FINDINGS,
    RACES,
    RENDERED_FINDINGS,
    Anatomy,
    FindingState,
    Pose,
    at_zone_centre,
    draw_finding,
    finding_masks,
    form_film,
    level_words,
    render_attenuation,
)

TARGET = 0.90
MEASURES = ("intensity", "extent")


def patient_series(seed: int, finding_index: int, number: int, size: int) -> dict:
    """One patient without ``RENDERED_FINDINGS[finding_index]`` and with it at every level: the
    same anatomy, pose, noise and lesion site and texture; each film as the 8-bit values a
    pure pair writes."""
    name = RENDERED_FINDINGS[finding_index]
    rng = np.random.default_rng([seed, finding_index, number])
    side = ("left", "right")[number % 2]
    drawn = at_zone_centre(draw_finding(rng, name, side))  # site and texture; the level is set below
    age, sex, race = int(rng.integers(25, 90)), str(rng.choice(("F", "M"))), str(rng.choice(RACES))
    anatomy = Anatomy.draw(rng, age, sex, race)
    pose = Pose(
        float(rng.normal(0, 1.5)),
        float(rng.uniform(0.97, 1.03)),
        float(rng.normal(0, 0.02)),
        float(rng.normal(0, 0.02)),
    )
    noise = rng.standard_normal((size, size)).astype(np.float32)
    blur = 0.0012 * size

    def film(findings: list[FindingState]) -> np.ndarray:
        picture = form_film(render_attenuation(size, size, anatomy, findings, pose), noise, blur)
        return (np.round(np.clip(picture, 0, 1) * 255) / 255).astype(np.float32)

    without = film([])
    levels = level_words(name)
    states = [
        FindingState(name, level, drawn.side, drawn.location, drawn.seed, drawn.zone) for level in levels
    ]
    truths = []
    for state in states:
        with_finding = film([state])
        lesion = finding_masks(with_finding, {name: without})[name]
        truths.append(np.where(lesion, with_finding, without).astype(np.float32))  # the same bytes outside
    return {
        "finding": name,
        "side": drawn.side if name in LATERALISED_FINDINGS else "",
        "zone": drawn.zone if name in ("consolidation", "pneumonia", "lung opacity") else "",
        "levels": levels,
        "instructions": [instruction_for("add", state) for state in states],
        "without": without,
        "truths": truths,
        "lesion": np.logical_or.reduce([np.abs(t - without) > 0 for t in truths]),
    }


def measures(films: list[np.ndarray], without: np.ndarray, lesion: np.ndarray, sign: np.ndarray, name: str):
    """Intensity and extent of each film's change from ``without`` (module docstring)."""
    intensity = [float(((film - without) * sign)[lesion].mean()) for film in films]
    extent = [float(finding_masks(film, {name: without})[name].mean()) for film in films]
    return {"intensity": intensity, "extent": extent}


def monotone(values: list[float]) -> bool:
    return all(a < b for a, b in zip(values, values[1:]))


def run(editor: InstructX2XEditor, count: int, seed: int, size: int) -> tuple[list[dict], list[np.ndarray]]:
    rows, strips = [], []
    for finding_index, name in enumerate(RENDERED_FINDINGS):
        for number in range(count):
            patient = patient_series(seed, finding_index, number, size)
            without, lesion = patient["without"], patient["lesion"]
            sign = np.sign(patient["truths"][-1] - without)
            series = parse_series(patient["instructions"])
            image = Radiograph(
                without, f"{name}-{number}.png", hashlib.sha256(without.tobytes()).hexdigest(), "png", 8
            )
            started = time.perf_counter()
            result = editor.edit_series(image, series, EditParameters(series.instructions[0], seed=number))
            seconds = time.perf_counter() - started
            edited = [step.edited_image() for step in result.steps]
            model = measures(edited, without, lesion, sign, name)
            truth = measures(patient["truths"], without, lesion, sign, name)
            row = {
                "finding": name,
                "series": number,
                "side": patient["side"],
                "zone": patient["zone"],
                "levels": " > ".join(patient["levels"]),
                "edit_fraction": round(float(result.edit_mask.mean()), 4),
                "lesion_in_region": round(float(result.edit_mask[lesion].mean()), 4),
                "seconds": round(seconds, 2),
            }
            for kind, values in (("model", model), ("truth", truth)):
                for measure in MEASURES:
                    row[f"{kind}_{measure}"] = " ".join(f"{v:.5f}" for v in values[measure])
                    row[f"{kind}_{measure}_monotone"] = monotone(values[measure])
            row["model_either_monotone"] = row["model_intensity_monotone"] or row["model_extent_monotone"]
            rows.append(row)
            print(to_json(row, indent=None), flush=True)
            if number == 0:
                labels = [f"{n}: {level}" for n, level in enumerate(patient["levels"], start=1)]
                strips.append(series_strip(without, edited, labels, result.edit_mask, lesion, height=160))
    return rows, strips


def summarise(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    columns = [
        "model_intensity_monotone",
        "model_extent_monotone",
        "model_either_monotone",
        "truth_intensity_monotone",
        "truth_extent_monotone",
    ]
    table = frame.groupby("finding", sort=False)[columns].mean()
    table["series"] = frame.groupby("finding", sort=False).size()
    table["lesion_in_region"] = frame.groupby("finding", sort=False)["lesion_in_region"].mean()
    table.loc["all findings"] = [*frame[columns].mean(), len(frame), frame["lesion_in_region"].mean()]
    return table


def markdown(table: pd.DataFrame, settings: dict) -> str:
    lines = [
        f"{settings['series_per_finding']} series a finding (seed {settings['seed']}, {settings['resolution']} px "
        f"films), model {settings['model']['name']} (sha256 {settings['model']['sha256'][:12]}), "
        f"{settings['sampling']['num_inference_steps']} steps, s_T {settings['sampling']['guidance_scale']:g}, "
        f"{settings['sampling']['relevance_draws']} relevance draws; {settings['cpu']}, "
        f"{settings['threads']} threads, {settings['minutes']:.1f} min.",
        "",
        "| finding | series | monotone in intensity | in extent | in either (target 90 %) | met | "
        "truth: intensity / extent | lesion in the region |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for finding, row in table.iterrows():
        lines.append(
            f"| {finding} | {int(row['series'])} | {_percent(row['model_intensity_monotone'])} | "
            f"{_percent(row['model_extent_monotone'])} | **{_percent(row['model_either_monotone'])}** | "
            f"{'yes' if row['model_either_monotone'] >= TARGET else 'no'} | "
            f"{_percent(row['truth_intensity_monotone'])} / {_percent(row['truth_extent_monotone'])} | "
            f"{_percent(row['lesion_in_region'])} |"
        )
    return "\n".join(lines) + "\n"


def _percent(value: float) -> str:
    return f"{100 * value:.0f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--series", type=int, default=10, help="series a finding (default 10)")
    parser.add_argument("--seed", type=int, default=5000, help="phantom seed (not 0, 1000 or 3000)")
    parser.add_argument("--resolution", type=int, default=256, help="film size in pixels (default 256)")
    args = parser.parse_args()
    if args.series < 1 or args.resolution < 64:
        parser.error("--series must be at least 1 and --resolution at least 64")
    if args.output.exists():
        parser.error(f"{args.output} exists: remove it or choose another folder")
    import torch

    started = time.perf_counter()
    editor = InstructX2XEditor.from_model(args.model)
    with atomic_output_dir(args.output) as staging:  # an interrupted run leaves nothing
        rows, strips = run(editor, args.series, args.seed, args.resolution)
        table = summarise(rows)
        settings = {
            "model": editor.model_info.to_dict(),
            "sampling": editor.sampling(),
            "series_per_finding": args.series,
            "seed": args.seed,
            "resolution": args.resolution,
            "cpu": cpu_description(),
            "threads": torch.get_num_threads(),
            "minutes": (time.perf_counter() - started) / 60,
            "command": " ".join(["python", "Training/scripts/series_monotonicity.py", *sys.argv[1:]]),
        }
        pd.DataFrame(rows).to_csv(staging / "series.csv", index=False)
        results = {
            "settings": settings,
            "target": TARGET,
            "per_finding": table.reset_index().to_dict("records"),
        }
        (staging / "results.json").write_text(to_json(results) + "\n")
        (staging / "results.md").write_text(markdown(table, settings))
        width = max(strip.shape[1] for strip in strips)
        padded = [np.pad(s, ((0, 0), (0, width - s.shape[1]), (0, 0))) for s in strips]
        Image.fromarray(np.concatenate(padded, axis=0)).save(staging / "strips.png")
    print((args.output / "results.md").read_text())


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill cleans up like Ctrl-C
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("cancelled: nothing was written.")
