"""The acceptance's per-edit figures on hand-made images (no model)."""

import numpy as np
import pandas as pd
import pytest

from instructx2x_train.demo_acceptance import measure_edit, zone_summary


def test_a_tied_guidance_maximum_counts_by_its_share_inside_the_lesion():
    """The IQR clip leaves a plateau at the maximum; its top row lies outside this lesion, which
    np.argmax's first tie would report as a miss."""
    past = np.zeros((8, 8), np.float32)
    lesion = np.zeros((8, 8), bool)
    lesion[3:6, 2:6] = True
    truth = past + 0.5 * lesion
    guidance = np.full((8, 8), 0.2, np.float32)
    guidance[2:6, 2:6] = 1.0  # 16 tied pixels, 12 of them in the lesion
    figures = measure_edit(past, truth, truth, lesion, lesion, guidance)
    assert figures["peak_in_lesion"] == 0.75 and figures["peak_pixels"] == 16
    assert figures["direction_ok"] and figures["error_edited"] == 0.0 and figures["lesion_coverage"] == 1.0


def test_zone_summary_groups_focal_opacities_by_operation_and_the_zone_named():
    """A model blind to the zone words misses only the upper-zone adds: the table must say so
    for that group alone, apex to base, and leave out edits that name no zone."""
    rows = []
    for op in ("add", "remove"):
        for zone in ("lower", "upper", "mid"):
            for k in range(4):
                hit = not (op == "add" and zone == "upper" and k < 3)
                rows.append(
                    {
                        "operation": op,
                        "zone": zone,
                        "direction_ok": hit,
                        "error_unedited": 0.2,
                        "error_edited": 0.05 if hit else 0.2,
                    }
                )
    rows.append(
        {"operation": "add", "zone": "", "direction_ok": False, "error_unedited": 0.2, "error_edited": 0.4}
    )
    summary = zone_summary(pd.DataFrame(rows))
    assert list(summary) == [
        "add upper",
        "add mid",
        "add lower",
        "remove upper",
        "remove mid",
        "remove lower",
    ]
    assert summary["add upper"]["edits"] == 4 and summary["add upper"]["direction_rate"] == 0.25
    assert summary["add upper"]["accuracy_reduction"] == pytest.approx(1 - (3 * 0.2 + 0.05) / 4 / 0.2)
    assert all(
        g["direction_rate"] == 1.0 and g["accuracy_reduction"] == 0.75
        for name, g in summary.items()
        if name != "add upper"
    )
