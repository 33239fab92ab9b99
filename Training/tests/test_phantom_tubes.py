"""The thin structures of the phantoms (vessels, airways, septal lines) are chords of tapered
cylinders drawn many at once: the geometry of one chord, and max (not sum) where they cross."""

import numpy as np

from instructx2x_train.phantom import _CANVAS, _draw_tubes

SCALE = (_CANVAS - 1) / 2  # body units [-1, 1] to canvas pixels


def body(pixel: np.ndarray) -> np.ndarray:
    return pixel / SCALE - 1


def test_a_tube_is_the_chord_of_a_cylinder_across_its_axis():
    radius = 0.02
    canvas = _draw_tubes([((-0.5, 0.0), (0.5, 0.0), radius, radius)])
    rows = np.arange(_CANVAS)
    distance = np.abs(body(rows) - 0.0)
    expected = 2 * np.sqrt(np.clip(radius**2 - distance**2, 0, None))
    np.testing.assert_allclose(canvas[:, _CANVAS // 2], expected, atol=1e-6)
    assert canvas[:, _CANVAS // 2].max() > 1.9 * radius
    # nothing beyond the ends: the cap is the cylinder's end, not a streak along the row
    beyond = int(np.ceil((0.5 + 1) * SCALE + radius * SCALE)) + 1
    assert not canvas[:, beyond:].any()


def test_a_tapered_tube_thins_from_its_start_to_its_end():
    canvas = _draw_tubes([((-0.5, 0.0), (0.5, 0.0), 0.02, 0.01)])
    start, middle, end = (int(round((u + 1) * SCALE)) for u in (-0.45, 0.0, 0.45))
    widths = [np.count_nonzero(canvas[:, column]) for column in (start, middle, end)]
    assert widths[0] > widths[1] > widths[2] > 0


def test_crossing_tubes_take_the_denser_chord_not_the_sum():
    horizontal = ((-0.5, 0.0), (0.5, 0.0), 0.02, 0.02)
    vertical = ((0.0, -0.5), (0.0, 0.5), 0.01, 0.01)
    both = _draw_tubes([horizontal, vertical])
    np.testing.assert_array_equal(both, np.maximum(_draw_tubes([horizontal]), _draw_tubes([vertical])))


def test_many_tubes_of_every_size_draw_as_each_alone():
    rng = np.random.default_rng(3)
    tubes = [
        (
            tuple(rng.uniform(-1.1, 1.1, 2)),
            tuple(rng.uniform(-1.1, 1.1, 2) * rng.uniform(0.02, 1)),
            float(rng.uniform(0.002, 0.02)),
            float(rng.uniform(0.002, 0.02)),
        )
        for _ in range(150)
    ]
    alone = np.zeros((_CANVAS, _CANVAS), np.float32)
    for tube in tubes:
        np.maximum(alone, _draw_tubes([tube]), out=alone)
    np.testing.assert_array_equal(_draw_tubes(tubes), alone)


def test_tubes_off_the_canvas_draw_nothing_and_none_is_an_empty_canvas():
    assert not _draw_tubes([((1.5, 1.5), (1.8, 1.6), 0.02, 0.02)]).any()
    assert not _draw_tubes([]).any()
    edge = _draw_tubes([((0.9, 0.0), (1.4, 0.0), 0.02, 0.02)])
    assert edge[:, -1].any()  # a tube that leaves the canvas is drawn up to its edge
