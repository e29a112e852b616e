"""Tests of geo_r1_qgis/core/rules/gres_truth.py: polygons in chip pixels to masks, and the two keypoints."""

from __future__ import annotations

import numpy as np
import pytest

from geo_r1_qgis.core.errors import ConfigError
from geo_r1_qgis.core.rules.gres_truth import (
    check_polygons,
    keypoints,
    object_mask,
    polygons_bbox,
    rasterize,
    truth_mask,
)


def rect(x1, y1, x2, y2):
    return [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]


def test_a_rectangle_on_pixel_edges_covers_exactly_its_pixels():
    mask = rasterize([[rect(1, 1, 4, 3)]], (6, 5))  # width 6, height 5
    expected = np.zeros((5, 6), dtype=bool)
    expected[1:3, 1:4] = True
    assert mask.shape == (5, 6)
    assert (mask == expected).all()


def test_pixel_centres_decide():
    # x from 0.4 to 2.6 holds the centres 0.5, 1.5, 2.5; x from 0.6 to 2.4 only 1.5
    assert rasterize([[rect(0.4, 0, 2.6, 1)]], (4, 1))[0].tolist() == [True, True, True, False]
    assert rasterize([[rect(0.6, 0, 2.4, 1)]], (4, 1))[0].tolist() == [False, True, False, False]


def test_a_hole_is_left_out_and_the_chip_clips():
    square = [rect(0, 0, 10, 10), rect(3, 3, 7, 7)]
    mask = rasterize([square], (8, 12))  # the square reaches past the chip's right edge (x 8)
    assert mask.shape == (12, 8)
    assert mask.sum() == 8 * 10 - 4 * 4  # 80 inside the chip, minus the 4 x 4 hole
    assert not mask[3:7, 3:7].any() and mask[0, 7] and not mask[10:].any()


def test_a_triangle_by_hand():
    # the right triangle (0,0) (4,0) (0,4): centre (c+0.5, r+0.5) inside when c + r + 1 < 4
    mask = rasterize([[[(0, 0), (4, 0), (0, 4)]]], (4, 4))
    expected = np.array([[c + r + 1 < 4 for c in range(4)] for r in range(4)])
    assert (mask == expected).all()


def test_two_polygons_of_one_object_and_the_union_of_objects():
    obj = [[rect(0, 0, 2, 2)], [rect(4, 0, 6, 2)]]
    assert rasterize(obj, (8, 2)).sum() == 8
    union = truth_mask([[[rect(0, 0, 2, 2)]], [[rect(1, 0, 3, 2)]]], (4, 2))
    assert union.sum() == 6  # columns 0..2 of both rows
    assert not truth_mask([], (4, 2)).any()  # a negative chip


def test_a_sliver_keeps_the_pixel_of_its_box_centre():
    sliver = [[(2.1, 2.1), (2.3, 2.1), (2.3, 2.3)]]
    assert not rasterize([sliver], (5, 5)).any()
    mask = object_mask([sliver], (5, 5))
    assert mask.sum() == 1 and mask[2, 2]


def test_bbox_and_bad_polygons():
    assert polygons_bbox([[rect(1, 2, 5, 7)], [rect(0, 3, 2, 4)]]) == (0, 2, 5, 7)
    for bad in (
        [],
        [[]],
        [[[(0, 0), (1, 1)]]],
        [[[(0, 0), (1, "x"), (1, 1)]]],
        [[[(0, 0), (1, float("nan")), (1, 1)]]],
    ):
        with pytest.raises(ConfigError):
            check_polygons(bad)


def test_keypoints_of_a_rectangle():
    mask = rasterize([[rect(0, 0, 20, 6)]], (24, 8))
    k1, k2 = keypoints(mask)
    # depth 3 on rows 2-3, columns 2-17; the four pixels nearest the centroid (9.5, 2.5) tie: the first
    # in row-major order is (9, 2). keypoint2: among depth >= 2 (rows 1-4, columns 1-18) the farthest from it
    assert k1 == (9, 2)
    assert k2 == (18, 4)
    assert mask[k1[1], k1[0]] and mask[k2[1], k2[0]]


def test_keypoints_of_a_ring_stay_in_the_ring_and_spread():
    mask = rasterize([[rect(0, 0, 12, 12), rect(3, 3, 9, 9)]], (12, 12))
    (c1, r1), (c2, r2) = keypoints(mask)
    assert mask[r1, c1] and mask[r2, c2]
    assert (c1 - c2) ** 2 + (r1 - r2) ** 2 >= 6**2  # on opposite sides of the hole


def test_keypoints_of_one_pixel_and_of_nothing():
    mask = np.zeros((4, 4), dtype=bool)
    mask[1, 2] = True
    assert keypoints(mask) == ((2, 1), (2, 1))
    with pytest.raises(ConfigError, match="empty mask"):
        keypoints(np.zeros((4, 4), dtype=bool))
