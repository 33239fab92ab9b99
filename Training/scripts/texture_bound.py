"""The best accuracy reduction any model can reach when adding a finding whose pattern the
instruction leaves open (pneumonia's lobules), on a folder of held-out pure pairs.

The acceptance's "perfect model" draws another plausible target (a sampler that knows the
cohort). An output that cannot see the pattern does better in mean absolute error by painting,
at each pixel, the median of the plausible targets there: the pooled error inside the true
lesion is a sum over pixels, each minimised by the median of the target's value given that the
pixel lies in the lesion. So this median, estimated from ``--draws`` redrawn targets a pair,
scores what no model can beat in expectation; it approaches the bound from below as the draws
grow (run two draw counts to see how close it is).

Usage: python texture_bound.py PAIRS_FOLDER [--finding pneumonia] [--draws 64]
       (PAIRS_FOLDER: `instructx2x-train pure-pairs` output, e.g. the acceptance's OUT/pairs)
"""

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from instructx2x_train.counterfactuals import pairs_config, plausible_targets
from instructx2x_train.demo_acceptance import lesion_mask, measure_edit, read_film
from instructx2x_train.phantom import finding_masks


def median_target(past: np.ndarray, draws: list[np.ndarray], finding: str) -> np.ndarray:
    """Per pixel, the median of the draws whose lesion covers it; the input where none does.

    A draw's lesion is its mask as the cohort draws it (from these 8-bit films, not the float
    ones the truth's came from) and every pixel the draw changes, so that no changed pixel
    falls outside it by rounding."""
    stack = np.stack(draws)
    covered = np.stack([finding_masks(draw, {finding: past})[finding] | (draw != past) for draw in draws])
    # where no draw's lesion lies, every draw equals the input: their median is the input
    return np.nanmedian(np.where(covered | ~covered.any(axis=0), stack, np.nan), axis=0).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", type=Path)
    parser.add_argument("--finding", default="pneumonia")
    parser.add_argument("--draws", type=int, default=64)
    args = parser.parse_args()
    if args.draws < 1:
        parser.error(f"--draws must be >= 1, got {args.draws}")
    try:
        config = pairs_config(args.pairs)
    except FileNotFoundError as error:
        parser.error(str(error))
    if config is None:
        parser.error("films inserted into backgrounds cannot be redrawn (pairs_config)")
    truth = pd.read_csv(args.pairs / "truth.csv", dtype=str, keep_default_na=False)
    chosen = truth[(truth.operation == "add") & (truth.finding == args.finding)]
    if chosen.empty:
        parser.error(f"{args.pairs.name} holds no pair adding {args.finding}")
    best, sampled = [], []
    for pair_id in chosen.pair_id:
        past = read_film(args.pairs / "past" / f"{pair_id}.png")
        target = read_film(args.pairs / "current" / f"{pair_id}.png")
        lesion = lesion_mask(args.pairs, pair_id, args.finding)
        draws = plausible_targets(config, pair_id, args.draws)
        best.append(measure_edit(past, target, median_target(past, draws, args.finding), lesion))
        sampled += [measure_edit(past, target, draw, lesion) for draw in draws]

    def reduction(rows: list[dict]) -> float:
        return round(1 - sum(r["error_edited"] for r in rows) / sum(r["error_unedited"] for r in rows), 3)

    print(
        json.dumps(
            {
                "finding": args.finding,
                "pairs": len(chosen),
                "draws": args.draws,
                "accuracy_reduction": {
                    "median_of_draws": reduction(best),
                    "a_draw (perfect model)": reduction(sampled),
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
