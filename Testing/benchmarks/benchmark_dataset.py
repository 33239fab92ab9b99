"""Builder throughput: image pairs per second with registration at 512 px, 1 and 2 processes.

A synthetic cohort (576 x 512 images, as MIMIC-CXR-JPG is not square) is generated first, then
built twice into fresh folders. Target: >= 10 pairs/s per core. Also reports the cohort
generator's images per second at 512 px (target >= 50). Last line: one JSON object.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from instructx2x_train.cohort import CohortConfig, generate_cohort
from instructx2x_train.dataset import BuildConfig, build_dataset


def main() -> None:
    results: dict = {}
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        start = time.perf_counter()
        counts = generate_cohort(scratch / "square", CohortConfig(patients=60, rows=512, columns=512))
        results["cohort_images_per_s_512px_1_process"] = counts["images"] / (time.perf_counter() - start)
        cohort = scratch / "cohort"
        generate_cohort(cohort, CohortConfig(patients=150, workers=2))
        for workers in (1, 2):
            start = time.perf_counter()
            manifest = build_dataset(
                BuildConfig(cohort, cohort, workers=workers, no_finding_ratio=1.0),
                scratch / f"built{workers}",
            )
            seconds = time.perf_counter() - start
            pairs = manifest["counts"]["pairs_planned"]
            results[f"pairs_{workers}_process"] = pairs
            results[f"pairs_per_s_{workers}_process"] = pairs / seconds
            results[f"pairs_per_s_per_core_{workers}_process"] = pairs / seconds / workers
    for key, value in results.items():
        print(f"{key:<42} {value:.4g}" if isinstance(value, float) else f"{key:<42} {value}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
