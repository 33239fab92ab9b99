"""The acceptance's per-edit figures on hand-made images (no model)."""

import numpy as np

from instructx2x_train.demo_acceptance import measure_edit


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
