import numpy as np
import pytest

from instructx2x.dicom.intensity import IntensityMapping, LookupTable, Window
from instructx2x.dicom.native import composite_stored, feather_weights, proposed_stored


def mapping(voi, invert=False, bits=12, signed=False, slope=1.0, intercept=0.0, lut=None):
    return IntensityMapping(bits, signed, slope, intercept, lut, voi, 1.0, invert, ())


@pytest.mark.parametrize(
    "voi", [Window(2048, 4096, "LINEAR"), Window(2000, 3000, "LINEAR_EXACT"), Window(2048, 1500, "SIGMOID")]
)
@pytest.mark.parametrize("invert", [False, True])
def test_inverse_recovers_stored_values_inside_the_window(voi, invert):
    m = mapping(voi, invert=invert, slope=2.0, intercept=-500.0)
    stored = np.arange(0, 4096, dtype=np.int64)
    values = stored * 2.0 - 500.0
    inside = (values > voi.center - voi.width / 2 + 1) & (values < voi.center + voi.width / 2 - 1)
    if voi.function == "SIGMOID":  # float precision limits the sigmoid's tails
        inside &= np.abs(values - voi.center) < voi.width / 2
    recovered = m.inverse(m.forward(stored))
    assert np.array_equal(recovered[inside], stored[inside])


def test_linear_window_matches_the_standard_formula():
    w = Window(100, 51, "LINEAR")  # PS3.3 C.11.2.1.2.1: x <= c - 0.5 - (w-1)/2 -> 0
    assert w.forward(np.array([74.5, 75.0, 99.5, 124.5, 125.0])).tolist() == pytest.approx(
        [0.0, 0.01, 0.5, 1.0, 1.0]
    )


def test_modality_lut_round_trip_and_clipping():
    lut = LookupTable(0, np.arange(0, 2048) * 3)
    m = mapping(Window(3000, 6000, "LINEAR_EXACT"), lut=lut, bits=11)
    stored = np.arange(0, 2000, dtype=np.int64)
    assert np.array_equal(m.inverse(m.forward(stored)), stored)
    assert m.inverse(np.array([1.5, -1.0])).tolist() == [2000, 0]  # window top 6000 = 3 * 2000
    wide = mapping(Window(0, 100000, "LINEAR_EXACT"), bits=11)
    assert wide.inverse(np.array([1.0, 0.0])).tolist() == [2047, 0]  # clipped to the stored range


def test_signed_range():
    m = mapping(Window(0, 4096, "LINEAR_EXACT"), bits=12, signed=True)
    assert m.stored_range == (-2048, 2047)


def test_feather_is_zero_outside_and_one_deep_inside():
    mask = np.zeros((40, 40), bool)
    mask[10:30, 10:30] = True
    w = feather_weights(mask, 4)
    assert w[~mask].max() == 0 and w[20, 20] == 1.0
    assert 0 < w[10, 20] < w[12, 20] < w[16, 20] == 1.0
    assert np.array_equal(feather_weights(mask, 0), mask.astype(float))
    with pytest.raises(ValueError, match="feather_px"):
        feather_weights(mask, -1)


def test_composite_keeps_every_stored_value_outside_the_mask():
    rng = np.random.default_rng(0)
    original = rng.integers(0, 4096, (50, 60)).astype(np.uint16)
    proposed = rng.uniform(-100, 4200, (50, 60))
    mask = np.zeros((50, 60), bool)
    mask[5:40, 10:50] = True
    for feather in (0, 5):
        out, _ = composite_stored(original, proposed, mask, (0, 4095), feather)
        assert out.dtype == np.uint16
        assert np.array_equal(out[~mask], original[~mask])
    hard, clipped = composite_stored(original, proposed, mask, (0, 4095), 0)
    expected = np.clip(np.rint(proposed), 0, 4095)  # hand-computed: round, then clip
    assert np.array_equal(hard[mask], expected[mask])
    assert clipped == pytest.approx(((proposed < -0.5) | (proposed > 4095.5))[mask].mean())
    with pytest.raises(ValueError, match="same shape"):
        composite_stored(original, proposed[:10], mask, (0, 4095))


def test_change_composite_adds_the_models_change_at_the_windows_gain():
    """A LINEAR window of width w over stored values: a display change d is d * (w - 1)
    stored units (inverted for MONOCHROME1), added to values the window flattens too."""
    original = np.array([[0, 1000, 2048, 4000]], dtype=np.uint16)
    for invert, sign in ((False, 1), (True, -1)):
        m = mapping(Window(2048, 1025, "LINEAR"), invert=invert)  # 1536..2560 -> [0, 1]
        model_output = np.full((1, 4), 0.6)
        reconstruction = np.full((1, 4), 0.5)
        proposed = proposed_stored(original, m, np.zeros((1, 4)), model_output, reconstruction)
        assert proposed == pytest.approx(original + sign * 0.1 * 1024)
    replaced = proposed_stored(
        original, mapping(Window(2048, 1025, "LINEAR")), np.full((1, 4), 0.5), None, None
    )
    assert replaced == pytest.approx(np.full((1, 4), 2047.5))  # the window's middle, (c - 0.5)
