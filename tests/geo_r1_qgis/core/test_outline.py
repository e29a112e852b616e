"""geo_r1_qgis/core/outline.py: masks traced along pixel edges, simplified, placed; validity checked by shapely."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from geo_r1_qgis.core.errors import ConfigError
from geo_r1_qgis.core.geometry import Affine, ring_signed_area
from geo_r1_qgis.core.outline import (
    mask_to_polygons,
    multipolygon_to_wkb,
    polygon_area,
    polygon_to_map,
    simplify_polygons,
    trace_mask,
)

shapely = pytest.importorskip("shapely", reason="the validity checks use shapely (the venv's [train] extra)")
from shapely import wkb as shapely_wkb  # noqa: E402
from shapely.geometry import MultiPolygon, Polygon  # noqa: E402


def as_shapely(polys) -> MultiPolygon:
    return MultiPolygon([Polygon(p[0], p[1:]) for p in polys])


def disc(h=120, w=160, cx=70, cy=60, r=40, hole=12) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    d2 = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2
    return (d2 < r * r) & (d2 >= hole * hole)


def test_a_square_is_its_four_corners() -> None:
    m = np.zeros((5, 6), bool)
    m[1:3, 2:5] = True
    assert trace_mask(m) == [(((2.0, 1.0), (5.0, 1.0), (5.0, 3.0), (2.0, 3.0), (2.0, 1.0)),)]


def test_diagonal_pixels_are_two_polygons_touching_at_a_corner() -> None:
    m = np.array([[1, 0], [0, 1]], dtype=bool)
    polys = trace_mask(m)
    assert len(polys) == 2 and all(polygon_area(p) == 1 for p in polys)
    assert as_shapely(polys).is_valid


def test_a_ring_with_an_island_in_its_hole() -> None:
    m = np.ones((7, 7), bool)
    m[2:5, 2:5] = False
    m[3, 3] = True
    polys = trace_mask(m)
    assert len(polys) == 2
    outer, island = polys
    assert len(outer) == 2  # exterior and one hole
    assert ring_signed_area(outer[0]) > 0 > ring_signed_area(outer[1])
    assert polygon_area(outer) == 40 and polygon_area(island) == 1
    assert as_shapely(polys).is_valid


def test_a_background_pixel_open_only_at_a_corner_is_a_hole_touching_the_exterior() -> None:
    m = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 0]], dtype=bool)
    (poly,) = trace_mask(m)
    assert len(poly) == 2 and polygon_area(poly) == 7
    assert as_shapely([poly]).is_valid


@pytest.mark.parametrize("p", [0.2, 0.5, 0.75])
@pytest.mark.parametrize("tolerance", [0.0, 1.0, 2.5])
def test_random_masks_give_valid_polygons_of_the_masks_area(p: float, tolerance: float) -> None:
    m = np.random.default_rng(int(p * 100)).random((40, 50)) < p
    traced = trace_mask(m)
    shape = as_shapely(traced)
    assert shape.is_valid
    assert shape.area == m.sum() == sum(polygon_area(q) for q in traced)
    simple = simplify_polygons(traced, tolerance)
    assert as_shapely(simple).is_valid
    assert abs(as_shapely(simple).area - m.sum()) <= m.sum() * 0.1 + 1


def test_simplification_keeps_a_disc_within_the_tolerance_with_few_vertices() -> None:
    m = disc()
    traced = trace_mask(m)
    (simple,) = mask_to_polygons(m, tolerance=1.0)
    n_traced = sum(len(r) for r in traced[0])
    n_simple = sum(len(r) for r in simple)
    assert n_simple < n_traced / 2
    shape, exact = as_shapely([simple]), as_shapely(traced)
    assert shape.is_valid and len(simple) == 2  # the hole survives
    assert exact.hausdorff_distance(shape) <= 1.0 + 1e-9
    assert abs(shape.area - m.sum()) / m.sum() < 0.02


def test_min_area_drops_specks() -> None:
    m = disc()
    m[0, 0] = m[0, 159] = True
    assert len(mask_to_polygons(m, 1.0)) == 3
    assert len(mask_to_polygons(m, 1.0, min_area=2)) == 1


def test_empty_and_full_masks() -> None:
    assert trace_mask(np.zeros((4, 4), bool)) == []
    assert trace_mask(np.ones((2, 3), bool)) == [(((0.0, 0.0), (3.0, 0.0), (3.0, 2.0), (0.0, 2.0), (0.0, 0.0)),)]


@pytest.mark.parametrize("bad", [np.zeros(4, bool), np.zeros((2, 2), np.float32), [[0.5]]])
def test_bad_masks_are_refused(bad) -> None:
    with pytest.raises(ConfigError, match="mask"):
        trace_mask(bad)


@pytest.mark.parametrize("tol", [-1.0, float("nan"), True, "1"])
def test_bad_tolerances_are_refused(tol) -> None:
    with pytest.raises(ConfigError, match="tolerance"):
        simplify_polygons(trace_mask(disc()), tol)


@pytest.mark.parametrize(
    "transform",
    [
        Affine(0.5, 0.0, 1000.0, 0.0, -0.5, 2000.0),  # north up
        Affine(0.3, 0.4, 10.0, 0.4, -0.3, 20.0),  # rotated
        Affine(2.0, 0.0, 0.0, 0.0, 2.0, 0.0),  # y down (determinant > 0)
    ],
)
def test_to_map_keeps_exteriors_counter_clockwise_and_the_area_scaled(transform: Affine) -> None:
    (poly,) = mask_to_polygons(disc(), 1.0)
    placed = polygon_to_map(poly, transform)
    assert all(isinstance(r, np.ndarray) and r.shape[1] == 2 and r.dtype == np.float64 for r in placed)
    assert ring_signed_area([tuple(p) for p in placed[0]]) > 0  # the geometry module's own rule
    assert all(ring_signed_area([tuple(p) for p in h]) < 0 for h in placed[1:])
    scale = abs(transform.determinant)
    assert polygon_area(placed) == pytest.approx(polygon_area(poly) * scale)
    want = {tuple(np.round(transform.apply(*pt), 6)) for pt in poly[0]}
    assert {tuple(np.round(p, 6)) for p in placed[0]} == want
    assert as_shapely([placed]).is_valid


def test_wkb_round_trips_through_shapely() -> None:
    polys = mask_to_polygons(disc(), 1.0) + mask_to_polygons(disc(cx=140, r=10, hole=0), 1.0)
    blob = multipolygon_to_wkb(polys)
    assert struct.unpack("<BI", blob[:5]) == (1, 6)
    shape = shapely_wkb.loads(blob)
    assert shape.geom_type == "MultiPolygon" and len(shape.geoms) == 2
    assert shape.equals(as_shapely(polys))


def test_pieces_of_one_object_in_two_tiles_are_joined() -> None:
    from geo_r1_qgis.core.geometry import PixelBox
    from geo_r1_qgis.core.outline import union_outlines

    whole = np.zeros((40, 60), bool)
    whole[10:30, 5:55] = True
    whole[15:25, 20:40] = False  # a hole across the tile seam
    left, right = whole[:, :40], whole[:, 24:]  # two tiles overlapping by 16 px
    pl = mask_to_polygons(left, 0.0)
    pr = [polygon_to_map(p, Affine(1, 0, 24, 0, 1, 0)) for p in mask_to_polygons(right, 0.0)]
    joined = union_outlines([pl, pr], PixelBox(5, 10, 55, 30))
    shape = as_shapely(joined)
    assert shape.is_valid and len(joined) == 1 and len(joined[0]) == 2
    assert shape.symmetric_difference(as_shapely(trace_mask(whole))).area <= 2.0


def test_pieces_on_a_coarser_grid() -> None:
    from geo_r1_qgis.core.geometry import PixelBox
    from geo_r1_qgis.core.outline import union_outlines

    m = np.zeros((10, 10), bool)
    m[2:8, 2:8] = True
    a = [polygon_to_map(p, Affine(2, 0, 100, 0, 2, 50)) for p in mask_to_polygons(m, 0.0)]
    b = [polygon_to_map(p, Affine(2, 0, 108, 0, 2, 50)) for p in mask_to_polygons(m, 0.0)]
    joined = union_outlines([a, b], PixelBox(104, 54, 124, 66), step=2.0)
    assert as_shapely(joined).equals(as_shapely(a).union(as_shapely(b)))
