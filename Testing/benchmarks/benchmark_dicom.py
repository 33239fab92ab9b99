"""DICOM work per image, model excluded: read, preprocess, export, C-STORE round trip.

Uses the real 1955x1841 CR (RG1_UNCR.dcm from pydicom-data) and a real Orthanc on loopback.
The first export in a process also loads highdicom's tables of the standard once; it is
reported apart ("cold") from the steady state ("warm", median of 5). Target: < 1 s per image.
The last line is one JSON object with all figures.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from pydicom.data import get_testdata_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orthanc import OrthancServer

from instructx2x.dicom import export_dicom_edit, read_dicom
from instructx2x.dicom.pacs import CStoreTarget, push_cstore
from instructx2x.editor import EditResult

RG1 = cast(str, get_testdata_file("RG1_UNCR.dcm"))  # a path (a Dataset only with read=True)


def report(results: dict, key: str, value: float, unit: str = "s") -> None:
    results[key] = value
    print(f"{key:<36} {value:.4g} {unit}", flush=True)


def fake_result(image) -> EditResult:
    """An edit result of the right shapes, so the export runs without a model."""
    rows, columns = image.pixels.shape
    mask = np.zeros((rows, columns), bool)
    mask[rows // 4 : 3 * rows // 4, columns // 2 : columns - 50] = True
    edited = np.where(mask, np.clip(image.pixels + 0.1, 0, 1), image.pixels).astype(np.float32)
    manifest = {
        "parameters": {
            "instruction": "Add the finding of left pleural effusion",
            "seed": 0,
            "num_inference_steps": 100,
            "tau": 0.1,
        },
        "model": {"name": "benchmark", "sha256": "0" * 64, "trained": False},
        "input": image.identity(),
        "prior": None,
    }
    return EditResult(edited, mask, mask.astype(np.float32), None, None, manifest)


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    results: dict = {}
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        reads = [timed(lambda: read_dicom(RG1)) for _ in range(5)]
        report(results, "read_s", statistics.median(reads))
        image = read_dicom(RG1)

        def preprocess():
            tensor = torch.from_numpy(image.pixels)[None, None]
            F.interpolate(tensor, size=(512, 512), mode="bilinear", antialias=True)

        report(results, "preprocess_s", statistics.median(timed(preprocess) for _ in range(5)))

        result = fake_result(image)
        report(results, "export_cold_s", timed(lambda: export_dicom_edit(image, result, scratch / "cold")))
        warm = [timed(lambda i=i: export_dicom_edit(image, result, scratch / f"warm{i}")) for i in range(5)]
        report(results, "export_warm_s", statistics.median(warm))
        report(
            results, "total_warm_s", results["read_s"] + results["preprocess_s"] + results["export_warm_s"]
        )

        server = OrthancServer(scratch).start()
        try:
            target = CStoreTarget("127.0.0.1", server.dicom_port, server.aet)
            files = [
                scratch / "warm0" / n
                for n in ("counterfactual.dcm", "guidance_overlay.dcm", "edit_region_seg.dcm")
            ]
            pushes = [timed(lambda: push_cstore(files, target)) for _ in range(3)]
            report(results, "cstore_round_trip_3_objects_s", statistics.median(pushes))
        finally:
            server.stop()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
