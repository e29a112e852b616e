"""Tests of train/chips.py: the pure chip-placement maths (no rasterio, no numpy)."""

from __future__ import annotations

import random

import pytest

from geo_r1_qgis.core.errors import ConfigError
from train import chips as cm


@pytest.mark.parametrize("size", [56, 112, 224, 448, 504, 532, 1008, 3584])
def test_chip_sizes_accepted(size):
    assert cm.check_chip_size(size) == size


@pytest.mark.parametrize(
    ("size", "nearest"),
    [
        (500, "476 or 504"),
        (512, "504 or 532"),
        (100, "84 or 112"),
        (28, "56"),
        (30, "56"),
        (0, "56"),
        (-28, "56"),
    ],
)
def test_chip_sizes_rejected_with_the_nearest_multiples(size, nearest):
    with pytest.raises(ConfigError, match=f"multiple of 28.*use {nearest}$"):
        cm.check_chip_size(size)


@pytest.mark.parametrize("bad", [504.0, "504", True, None])
def test_chip_size_must_be_an_int(bad):
    with pytest.raises(ConfigError, match="whole number"):
        cm.check_chip_size(bad)


def test_chip_size_beyond_qwen_max_pixels():
    with pytest.raises(ConfigError, match="3584"):
        cm.check_chip_size(3612)


@pytest.mark.parametrize(
    ("box", "window", "expected"),
    [
        ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),
        ((0, 0, 10, 10), (5, 0, 15, 10), 0.5),
        ((0, 0, 10, 10), (10, 0, 20, 10), 0.0),  # touching edges share no area
        ((0, 0, 10, 10), (-5, -5, 5, 5), 0.25),
        ((2, 2, 4, 4), (0, 0, 100, 100), 1.0),
        ((0, 0, 0, 10), (0, 0, 10, 10), 0.0),  # empty box
    ],
)
def test_inside_fraction(box, window, expected):
    assert cm.inside_fraction(box, window) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("box", "window", "chip", "expected"),
    [
        # native resolution: shift only, floor/ceil
        ((110.0, 220.0, 130.0, 250.0), (100, 200, 212, 312), 112, (10, 20, 30, 50)),
        ((110.4, 220.6, 130.2, 249.9), (100, 200, 212, 312), 112, (10, 20, 31, 50)),
        # clipped to the chip
        ((90.0, 190.0, 130.0, 250.0), (100, 200, 212, 312), 112, (0, 0, 30, 50)),
        ((200.0, 300.0, 230.0, 330.0), (100, 200, 212, 312), 112, (100, 100, 112, 112)),
        # half resolution: a 224-pixel window read into 112 pixels
        ((10.0, 20.0, 31.0, 41.0), (0, 0, 224, 224), 112, (5, 10, 16, 21)),
        # float noise on pixel edges does not grow the box
        ((10.000000001, 20.0, 29.999999999, 40.0), (0, 0, 112, 112), 112, (10, 20, 30, 40)),
        # outside
        ((300.0, 300.0, 310.0, 310.0), (0, 0, 112, 112), 112, None),
    ],
)
def test_chip_box(box, window, chip, expected):
    assert cm.chip_box(box, window, chip) == expected


@pytest.mark.parametrize(
    ("lo", "hi", "side", "limit", "expected"),
    [
        (100, 120, 50, 1000, (70, 100)),
        (0, 20, 50, 1000, (0, 0)),  # at the raster's edge: the chip starts at 0
        (980, 1000, 50, 1000, (950, 950)),
        (10.5, 40.2, 50, 1000, (0, 10)),
        (100, 160, 50, 1000, None),  # the box is bigger than the chip
        (10, 20, 50, 40, None),  # the raster is smaller than the chip
        (100, 150, 50, 1000, (100, 100)),  # exactly the chip's size
    ],
)
def test_origin_range(lo, hi, side, limit, expected):
    assert cm.origin_range(lo, hi, side, limit) == expected


def test_random_window_around_holds_the_box_at_varied_offsets():
    rng = random.Random(1)
    box = (300.0, 400.0, 330.0, 420.0)
    windows = {cm.random_window_around(box, 112, 1000, 800, rng) for _ in range(50)}
    assert len(windows) > 20  # not always centred
    for w in windows:
        assert w is not None and w[2] - w[0] == 112 and w[3] - w[1] == 112
        assert w[0] <= box[0] and w[1] <= box[1] and box[2] <= w[2] and box[3] <= w[3]
        assert w[0] >= 0 and w[2] <= 1000 and w[1] >= 0 and w[3] <= 800


def test_random_window_is_deterministic_for_a_seed():
    box = (300.0, 400.0, 330.0, 420.0)
    a = [cm.random_window_around(box, 112, 1000, 800, random.Random(5)) for _ in range(3)]
    b = [cm.random_window_around(box, 112, 1000, 800, random.Random(5)) for _ in range(3)]
    assert a == b


def test_random_window_inside():
    rng = random.Random(0)
    for _ in range(50):
        w = cm.random_window_inside((0, 0, 300, 300), 100, 1000, 1000, rng)
        assert w is not None
        cx, cy = (w[0] + w[2]) / 2, (w[1] + w[3]) / 2
        assert 50 <= cx <= 300 and 50 <= cy <= 300
    assert cm.random_window_inside((0, 0, 10, 10), 100, 50, 1000, rng) is None


@pytest.mark.parametrize(
    ("window", "inside", "cut"),
    [
        ((0, 0, 100, 100), [0, 1], []),
        ((0, 0, 55, 100), [0], [1]),  # box 1 is 50 % inside: ambiguous, not counted
        ((0, 0, 56, 100), [0, 1], []),  # 60 % inside: counted
        ((0, 0, 20, 100), [0], []),
        ((200, 200, 300, 300), [], []),
    ],
)
def test_classify(window, inside, cut):
    boxes = [(0, 0, 20, 20), (50, 50, 60, 60)]
    assert cm.classify(window, boxes) == (inside, cut)


def test_place_chip_never_cuts_a_box_ambiguously():
    rng = random.Random(3)
    boxes = [(100.0, 100.0, 120.0, 120.0), (130.0, 100.0, 150.0, 120.0), (60.0, 60.0, 80.0, 80.0)]
    for _ in range(100):
        placed = cm.place_chip(0, boxes, 64, 400, 400, rng, tries=10)
        if placed is None:
            continue
        window, inside = placed
        assert 0 in inside
        for i, b in enumerate(boxes):
            f = cm.inside_fraction(b, window)
            assert f == 0.0 or f > 0.5
            assert (i in inside) == (f > 0.5)


def test_place_chip_prefers_a_lone_target_and_respects_accept():
    boxes = [(100.0, 100.0, 120.0, 120.0), (150.0, 100.0, 170.0, 120.0)]
    _, inside = cm.place_chip(0, boxes, 64, 400, 400, random.Random(0), tries=50)
    assert inside == [0]
    forbidden = (0, 0, 400, 400)
    assert (
        cm.place_chip(0, boxes, 64, 400, 400, random.Random(0), accept=lambda w: cm.disjoint_from(w, [forbidden]))
        is None
    )
    # a target bigger than the chip has no place
    assert cm.place_chip(0, [(0.0, 0.0, 100.0, 10.0)], 64, 400, 400, random.Random(0)) is None


@pytest.mark.parametrize(
    ("box", "cell", "expected"),
    [
        ((0, 0, 10, 10), 100, (0, 0)),
        ((95, 95, 115, 115), 100, (1, 1)),  # by the centre
        ((250, 10, 260, 20), 100, (2, 0)),
    ],
)
def test_cell_of(box, cell, expected):
    assert cm.cell_of(box, cell) == expected
    x1, y1, x2, y2 = cm.cell_window(expected, cell)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    assert x1 <= cx < x2 and y1 <= cy < y2


@pytest.mark.parametrize(
    ("counts", "fraction", "min_share"),
    [
        ({(0, 0): 5, (1, 0): 5, (0, 1): 5, (1, 1): 5}, 0.2, 0.2),
        ({(0, 0): 5, (1, 0): 5, (0, 1): 5, (1, 1): 5}, 0.5, 0.5),
        ({(c, 0): 1 for c in range(20)}, 0.3, 0.3),
    ],
)
def test_choose_val_cells(counts, fraction, min_share):
    chosen = cm.choose_val_cells(counts, fraction, random.Random(0))
    total = sum(counts.values())
    share = sum(counts[c] for c in chosen) / total
    assert share >= min_share
    assert len(chosen) < len(counts)  # a train cell always remains
    assert chosen == cm.choose_val_cells(counts, fraction, random.Random(0))


@pytest.mark.parametrize(
    ("counts", "fraction"),
    [({(0, 0): 10}, 0.5), ({(0, 0): 3, (1, 1): 3}, 0.0), ({}, 0.2)],
)
def test_choose_val_cells_none(counts, fraction):
    assert cm.choose_val_cells(counts, fraction, random.Random(0)) == set()


def test_choose_val_cells_rejects_bad_fraction():
    with pytest.raises(ConfigError, match="val-fraction"):
        cm.choose_val_cells({(0, 0): 1}, 1.0, random.Random(0))


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ((0, 0, 10, 10), (10, 0, 20, 10), False),
        ((0, 0, 10, 10), (9, 9, 20, 20), True),
        ((0, 0, 10, 10), (20, 20, 30, 30), False),
    ],
)
def test_overlaps(a, b, expected):
    assert cm.overlaps(a, b) is expected
    assert cm.disjoint_from(a, [b]) is not expected
