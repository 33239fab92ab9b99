"""Evaluation throughput: films per second for each classifier set on this machine, and the
wall time of a small evaluation run with the demo model, extrapolated to 1,000 pairs.

The cohort-v2 set is the bundled one. The torchxrayvision set runs only where torchxrayvision
imports (the eval environment: ``.venv-eval/bin/python Testing/benchmarks/benchmark_evaluation.py
--xrv-only``); its published weights can't be reached here, so it runs on weight files of the
same architectures built offline (DenseNet-121, ResNet-34 race model; the RIKEN age model, a
SENet-154, is replaced by a small TorchScript module, so the xrv figure is a lower bound on its
cost). The last line is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def report(results: dict, key: str, value: float, unit: str) -> None:
    results[key] = value
    print(f"{key:<44} {value:.4g} {unit}", flush=True)


def films(count: int, side: int = 256) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.random((side, side), dtype=np.float32) for _ in range(count)]


def throughput(classifiers, count: int) -> float:
    batch = films(count)
    classifiers.predict(batch[:4])  # warm-up
    started = time.perf_counter()
    classifiers.predict(batch)
    return count / (time.perf_counter() - started)


def xrv_with_offline_weights(home: Path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from xrv_weights import write_xrv_weights

    write_xrv_weights(home / ".torchxrayvision" / "models_data")
    os.environ["HOME"] = str(home)
    from instructx2x.classifiers import load_classifiers

    return load_classifiers("torchxrayvision")


def evaluation_run(results: dict, pairs: int) -> None:
    from instructx2x_train.counterfactuals import PurePairsConfig, write_pure_pairs
    from instructx2x_train.evaluation import EvaluationConfig, evaluate

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_pure_pairs(
            root / "pairs",
            PurePairsConfig(
                pairs=pairs, seed=1000, resolution=256, split="test", other_finding_probability=0.0
            ),
        )
        started = time.perf_counter()
        outcome = evaluate(
            root / "report", EvaluationConfig(model="demo", dataset=str(root / "pairs")), progress_bar=False
        )
        seconds = time.perf_counter() - started
    # editing and classifying grow with the pairs; the tables' 1,000 bootstrap resamples of five
    # rows cost about the same for any split size
    report(results, f"evaluation_{pairs}_pairs_4_modes_s", seconds, "s")
    report(results, "edit_and_classify_s_per_pair_4_modes", outcome["seconds"] / pairs, "s")
    report(results, "tables_bootstrap_s", seconds - outcome["seconds"], "s")
    report(
        results,
        "evaluation_per_1000_pairs_min",
        (outcome["seconds"] / pairs * 1000 + seconds - outcome["seconds"]) / 60,
        "min (extrapolated)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--films", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=24, help="pairs of the timed evaluation run")
    parser.add_argument("--xrv-only", action="store_true", help="only the torchxrayvision set (eval venv)")
    args = parser.parse_args()
    results = {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    print(f"torch {torch.__version__}, {results['threads']} threads, {results['cpu_capability']}")
    if not args.xrv_only:
        from instructx2x.classifiers import COHORT_SET_NAME, load_classifiers

        report(
            results,
            "cohort_v2_films_per_s",
            throughput(load_classifiers(COHORT_SET_NAME), args.films),
            "films/s",
        )
        evaluation_run(results, args.pairs)
    else:
        with tempfile.TemporaryDirectory() as home:
            classifiers = xrv_with_offline_weights(Path(home))
            report(
                results, "torchxrayvision_films_per_s", throughput(classifiers, args.films // 4), "films/s"
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
