"""The truth matching of geo_r1_qgis.core.truth, on literal polygons (hand-computed areas)."""

from __future__ import annotations

import json
import math

import pytest

from geo_r1_qgis.core.errors import ConfigError
from geo_r1_qgis.core.truth import convex_polygon_iou, match_objects, read_truth


def square(x0: float, y0: float, side: float) -> tuple:
    return ((x0, y0), (x0 + side, y0), (x0 + side, y0 + side), (x0, y0 + side), (x0, y0))


def rotate(ring: tuple, deg: float) -> tuple:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return tuple((x * c - y * s, x * s + y * c) for x, y in ring)


def test_iou_of_overlapping_squares_is_the_hand_computed_one():
    # 10x10 squares offset by 5 in x: intersection 50, union 150
    assert convex_polygon_iou(square(0, 0, 10), square(5, 0, 10)) == pytest.approx(1 / 3)
    assert convex_polygon_iou(square(0, 0, 10), square(20, 0, 10)) == 0.0
    assert convex_polygon_iou(square(0, 0, 10), square(0, 0, 10)) == pytest.approx(1.0)


def test_iou_ignores_winding_closure_and_a_common_rotation():
    a, b = square(0, 0, 10), square(5, 5, 10)  # intersection 25, union 175
    assert convex_polygon_iou(a[::-1], b[:-1]) == pytest.approx(25 / 175)
    assert convex_polygon_iou(rotate(a, 20), rotate(b, 20)) == pytest.approx(25 / 175)


def test_a_square_and_its_45_degree_turn_about_the_centre():
    # the unit square centred at 0 and the same square turned 45°: the octagon between them, area 2(√2-1)
    a = tuple((x - 0.5, y - 0.5) for x, y in square(0, 0, 1))
    inter = 2 * (math.sqrt(2) - 1)
    assert convex_polygon_iou(a, rotate(a, 45)) == pytest.approx(inter / (2 - inter))


def test_matching_is_one_to_one_and_strictly_above_the_threshold():
    truth = [square(0, 0, 10), square(100, 0, 10)]
    pred = [square(0, 0, 10), square(1, 0, 10), square(105, 0, 10)]  # IoU 1, 0.818 (same truth), exactly 1/3
    m = match_objects(pred, truth)
    assert m.pairs == ((0, 0, pytest.approx(1.0)),)
    assert (m.found, m.n_predicted, m.n_truth) == (1, 3, 2)
    assert m.recall == 0.5 and m.precision == pytest.approx(1 / 3)
    assert match_objects(pred, truth, threshold=1 / 3).found == 1  # 1/3 itself is not above 1/3
    assert match_objects(pred, truth, threshold=0.3).found == 2
    assert match_objects([], truth).recall == 0.0 and match_objects([], []).precision == 0.0


def test_read_truth_filters_by_category_and_refuses_other_files(tmp_path):
    fc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[list(p) for p in square(0, 0, 1)]]},
         "properties": {"id": "tank-1", "category": "tank"}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[list(p) for p in square(5, 0, 1)]]},
         "properties": {"id": "field-1", "category": "field"}},
    ]}  # fmt: skip
    path = tmp_path / "t.objects.geojson"
    path.write_text(json.dumps(fc))
    (tank,) = read_truth(path, "tank")
    assert tank.id == "tank-1" and tank.ring[1] == (1.0, 0.0)
    assert len(read_truth(path)) == 2
    (tmp_path / "bad.geojson").write_text("{}")
    with pytest.raises(ConfigError, match="not a truth file"):
        read_truth(tmp_path / "bad.geojson")
