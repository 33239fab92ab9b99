"""Choose how many noise draws a model's relevance map averages, on validation pairs.

docs/method.md section 2, step 3, computes the relevance map from one noise draw, and a small
model's map carries much of that draw's noise: the IQR clip ties a plateau of cells at the
maximum, and which cells make it changes from draw to draw (``guidance.relevance_map``
averages the maps of several).
Each setting previews every validation pair (guidance only: one UNet call a draw) and measures
the acceptance's region figures: peak in lesion, and the share of the lesion and of the image
the RSE mask covers.

The choice (``choose``): among the settings whose masks meet the acceptance's coverage targets,
the fewest draws whose peak rate is within one binomial standard error of the best rate (each
draw costs a UNet call per edit); the authors' one draw if none qualifies. ``sweep.json``
records it, and ``bundle_demo_model.py`` writes it into the model card.

Usage: python relevance_draws_sweep.py WORK_FOLDER [--model demo] [--seed 3000] [K ...]
       (writes WORK_FOLDER/relevance-sweep/: pairs/, sweep.json, sweep.md)
"""

import argparse
import json
import math
import signal
import sys
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from instructx2x import read_image
from instructx2x.editor import InstructX2XEditor
from instructx2x.outputs import atomic_output_dir
from instructx2x.parameters import EditParameters
from instructx2x.provenance import to_json
from instructx2x_train.counterfactuals import PurePairsConfig, write_pure_pairs
from instructx2x_train.demo_acceptance import TARGETS, lesion_mask, peak_in_lesion

DRAWS = (1, 2, 4, 8, 16)
PAIRS = 160  # as many as the guidance sweep, at the acceptance's 256 px


def load_pairs(root: Path) -> list[tuple]:
    """(film, instruction, true lesion) of every pair in ``root``, read once for all settings."""
    truth = pd.read_csv(root / "truth.csv", dtype=str, keep_default_na=False)
    return [
        (
            read_image(root / "past" / f"{pair.pair_id}.png"),
            pair.instruction,
            lesion_mask(root, pair.pair_id, pair.finding),
        )
        for pair in truth.itertuples()
    ]


def measure(editor: InstructX2XEditor, pairs: list[tuple], draws: int) -> dict:
    """Region figures of previews of every pair with ``draws`` noise draws."""
    rows = []
    for image, instruction, lesion in tqdm(pairs, desc=f"{draws} draws"):
        preview = editor.preview(image, EditParameters(instruction, relevance_draws=draws))
        rows.append(
            {
                "peak_in_lesion": peak_in_lesion(preview.guidance_map, lesion)[0],
                "lesion_coverage": float(preview.edit_mask[lesion].mean()),
                "image_coverage": float(preview.edit_mask.mean()),
            }
        )
    frame = pd.DataFrame(rows)
    return {"relevance_draws": draws, "previews": len(frame), **frame.mean().to_dict()}


def choose(rows: list[dict]) -> dict:
    """The setting the model card takes (module docstring)."""
    eligible = [
        row
        for row in rows
        if row["lesion_coverage"] >= TARGETS.lesion_coverage
        and row["image_coverage"] <= TARGETS.image_coverage
    ]
    if not eligible:
        return next(row for row in rows if row["relevance_draws"] == 1)
    best = max(eligible, key=lambda row: row["peak_in_lesion"])
    rate = best["peak_in_lesion"]
    floor = rate - math.sqrt(rate * (1 - rate) / best["previews"])
    return min(
        (row for row in eligible if row["peak_in_lesion"] >= floor), key=lambda row: row["relevance_draws"]
    )


def markdown(rows: list[dict], seed: int, chosen: dict) -> str:
    """The sweep's table, as it goes into the model card."""
    lines = [
        f"Validation pure pairs: {rows[0]['previews']} at 256 px (seed {seed}); guidance maps only.",
        "",
        "| relevance draws | peak in lesion | lesion coverage | image coverage |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['relevance_draws']} | {r['peak_in_lesion']:.3f} | {r['lesion_coverage']:.3f} | "
        f"{r['image_coverage']:.3f} |"
        for r in rows
    ]
    lines += ["", f"Chosen: {chosen['relevance_draws']} draw{'s' if chosen['relevance_draws'] > 1 else ''}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--seed", type=int, default=3000, help="validation seed (not 0, not 1000)")
    parser.add_argument("draws", nargs="*", type=int, default=DRAWS, metavar="K")
    args = parser.parse_intermixed_args()
    if 1 not in args.draws:
        parser.error("the draws must include 1, the authors' setting")
    for draws in args.draws:  # refused before any folder is made or model loaded
        try:
            EditParameters("-", relevance_draws=draws)
        except ValueError as error:
            parser.error(str(error))
    folder = args.work / "relevance-sweep"
    if folder.exists():
        parser.error(f"{folder} exists: remove it or choose another work folder")
    editor = InstructX2XEditor.from_model(args.model)
    with atomic_output_dir(folder) as staging:  # an interrupted sweep leaves nothing
        write_pure_pairs(
            staging / "pairs",
            PurePairsConfig(
                pairs=PAIRS, seed=args.seed, resolution=256, split="test", other_finding_probability=0.0
            ),
        )
        pairs, rows = load_pairs(staging / "pairs"), []
        for draws in sorted(set(args.draws)):
            rows.append(measure(editor, pairs, draws))
            print(json.dumps(rows[-1]), flush=True)
        chosen = choose(rows)
        (staging / "sweep.json").write_text(
            to_json({"seed": args.seed, "rows": rows, "chosen": chosen}) + "\n"
        )
        (staging / "sweep.md").write_text(markdown(rows, args.seed, chosen))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill cleans up like Ctrl-C
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("cancelled: nothing was written.")
