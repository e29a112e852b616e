"""Tests of geo_r1_qgis/core/area.py and its use by the run loop: polygon areas in raster pixels (pure)."""

from __future__ import annotations

import pytest

from geo_r1_qgis.core.area import (
    AreaPolygon,
    area_bounds,
    area_digest,
    box_in_area,
    point_in_area,
    point_in_polygon,
    polygon_intersects_box,
    tiles_touching,
)
from geo_r1_qgis.core.errors import ConfigError, ExtentError
from geo_r1_qgis.core.geometry import Affine, PixelBox, TileGridSpec, make_tile_grid
from geo_r1_qgis.core.pipeline import GroundingJob, plan_full, run_grounding

from .test_pipeline import ArraySource, ColourClient, RecordingSink, paint

SQUARE = AreaPolygon(((0, 0), (10, 0), (10, 10), (0, 10)))
#: an L: the square 0..10 without its top-right quarter 5..10 x 0..5 (y down)
ELL = AreaPolygon(((0, 0), (5, 0), (5, 5), (10, 5), (10, 10), (0, 10)))
#: a 0..30 square with a 10..20 hole
HOLED = AreaPolygon(((0, 0), (30, 0), (30, 30), (0, 30)), holes=(((10, 10), (20, 10), (20, 20), (10, 20)),))
#: a triangle whose bounding box is 0..10 x 0..10 but which leaves the bottom-right corner empty
TRIANGLE = AreaPolygon(((0, 0), (10, 0), (0, 10)))


@pytest.mark.parametrize(
    ("point", "polygon", "inside"),
    [
        ((5, 5), SQUARE, True),
        ((0, 5), SQUARE, True),  # on an edge: inside
        ((10, 10), SQUARE, True),  # a vertex
        ((10.001, 5), SQUARE, False),
        ((7, 2), ELL, False),  # the missing quarter
        ((7, 7), ELL, True),
        ((5, 2), ELL, True),  # on the inner edge
        ((15, 15), HOLED, False),  # in the hole
        ((10, 15), HOLED, True),  # on the hole's edge: the polygon's boundary, kept
        ((5, 25), HOLED, True),
        ((6, 6), TRIANGLE, False),
        ((4, 4), TRIANGLE, True),
    ],
)
def test_point_in_polygon(point, polygon, inside):
    assert point_in_polygon(point, polygon) is inside


@pytest.mark.parametrize(
    ("box", "polygon", "touches"),
    [
        (PixelBox(2, 2, 4, 4), SQUARE, True),  # inside
        (PixelBox(-5, -5, 20, 20), SQUARE, True),  # holds the polygon
        (PixelBox(8, 8, 12, 12), SQUARE, True),  # overlaps a corner
        (PixelBox(10, 0, 12, 10), SQUARE, False),  # shares an edge only
        (PixelBox(10, 10, 12, 12), SQUARE, False),  # shares a corner point only
        (PixelBox(6, 1, 9, 4), ELL, False),  # in the L's bounding box, not in the L
        (PixelBox(6, 1, 9, 5.5), ELL, True),  # reaches into the L's lower arm
        (PixelBox(7, 7, 9.5, 9.5), TRIANGLE, False),  # inside the triangle's bbox corner, not the triangle
        (PixelBox(4, 4, 9, 9), TRIANGLE, True),  # the hypotenuse crosses it
        (PixelBox(12, 12, 18, 18), HOLED, False),  # wholly in the hole
        (PixelBox(8, 12, 18, 18), HOLED, True),  # the hole's edge crosses it
        (PixelBox(10, 10, 20, 20), HOLED, False),  # exactly the hole
        (PixelBox(1, 1, 29, 29), HOLED, True),  # holds the hole and more
        (PixelBox(40, 0, 50, 10), HOLED, False),  # outside the bbox
    ],
)
def test_polygon_intersects_box(box, polygon, touches):
    assert polygon_intersects_box(polygon, box) is touches


def test_multipolygon_is_the_union_of_its_parts():
    far = AreaPolygon(((100, 100), (110, 100), (110, 110), (100, 110)))
    area = (SQUARE, far)
    assert point_in_area((5, 5), area) and point_in_area((105, 105), area)
    assert not point_in_area((50, 50), area)  # between the parts, inside their joint bbox
    assert area_bounds(area) == PixelBox(0, 0, 110, 110)
    # A polygon overlapping a hole of another fills it: the union, not even-odd.
    plug = AreaPolygon(((12, 12), (18, 12), (18, 18), (12, 18)))
    assert not point_in_area((15, 15), (HOLED,)) and point_in_area((15, 15), (HOLED, plug))


def test_boxes_are_kept_by_their_centre():
    assert box_in_area(PixelBox(8, 8, 11, 11), (SQUARE,))  # centre (9.5, 9.5) inside, though it sticks out
    assert not box_in_area(PixelBox(9, 9, 13, 13), (SQUARE,))  # overlaps, centre (11, 11) outside
    assert not box_in_area(PixelBox(6, 1, 9, 4), (ELL,))
    assert not box_in_area(PixelBox(13, 13, 17, 17), (HOLED,))  # in the hole


def test_tiles_touching_a_polygon():
    tiles = make_tile_grid(Affine.identity(), 40, 40, TileGridSpec(10, 0))
    kept = {t.id for t in tiles_touching(tiles, (TRIANGLE,))}
    # The triangle (0,0)-(10,0)-(0,10) lies in the first tile only; its neighbours share an edge or a point.
    assert kept == {"r0c0"}
    holed = {t.id for t in tiles_touching(tiles, (HOLED,))}
    assert "r1c1" not in holed  # the tile that is exactly the hole
    assert len(holed) == 8  # the other tiles of the 30 x 30 square
    pairs = [(t.id, t) for t in tiles]
    assert [i for i, _ in tiles_touching(pairs, (SQUARE,), window=lambda p: p[1].window)] == ["r0c0"]


def test_polygon_values_check_themselves():
    open_ring = AreaPolygon(((0, 0), (4, 0), (4, 4)))
    assert open_ring.exterior[0] == open_ring.exterior[-1] and len(open_ring.exterior) == 4
    with pytest.raises(ConfigError, match="at least 3"):
        AreaPolygon(((0, 0), (1, 1)))
    with pytest.raises(ConfigError, match="no area"):
        AreaPolygon(((0, 0), (1, 1), (2, 2)))
    with pytest.raises(ConfigError, match="finite"):
        AreaPolygon(((0, 0), (1, float("nan")), (2, 0)))
    with pytest.raises(ConfigError, match="non-empty tuple"):
        GroundingJob(expression="x", area_polygons=())
    with pytest.raises(ConfigError, match="not an AreaPolygon"):
        GroundingJob(expression="x", area_polygons=(((0, 0), (1, 0), (1, 1)),))
    assert area_digest((SQUARE,)) == area_digest((AreaPolygon(SQUARE.exterior),)) != area_digest((ELL,))


# -- the run loop ------------------------------------------------------------------------------------


def _scene():
    # 400 x 400 raster, 100 px tiles without overlap: 16 tiles. Objects: A at (20..40, 20..40), inside the
    # polygon; B at (250..270, 20..40), outside it; C straddles the polygon's edge with its centre outside.
    rgb = paint(400, 400, [(20, 20, 40, 40, 0.9), (250, 20, 270, 40, 0.8), (185, 60, 215, 80, 0.7)])
    return ArraySource(rgb, Affine(0.5, 0.0, 1000.0, 0.0, -0.5, 2000.0))


#: a polygon over the left half's top part, with a notch: x 0..190 by y 0..190 (raster pixels)
AREA = (AreaPolygon(((0, 0), (190, 0), (190, 190), (0, 190))),)


def test_only_tiles_touching_the_polygons_are_asked_and_outside_boxes_dropped():
    src = _scene()
    job = GroundingJob(expression="x", tile_size=100, overlap=0, area_polygons=AREA)
    plan = plan_full(job, src)
    assert {tid for tid, _ in plan.tiles} == {"r0c0", "r0c1", "r1c0", "r1c1"}
    sink = RecordingSink()
    client = ColourClient()
    summary = run_grounding(job, src, sink, client)
    assert summary.status == "done" and summary.tiles_total == 4 and src.reads == 4
    centres = sorted(m.detection.box.center for m in summary.final)
    assert centres == [(30.0, 30.0)]  # A only: B is in a tile never asked, C's centre (200, 70) is outside
    written = [m.detection.box.center for _, dets in sink.tiles.values() for m in dets]
    assert (200.0, 70.0) not in written  # dropped before it was written, not only at the end
    # Without the polygons, the same run finds all three.
    everything = run_grounding(GroundingJob(expression="x", tile_size=100, overlap=0), _scene(), RecordingSink(),
                               ColourClient())  # fmt: skip
    assert len(everything.final) == 3


def test_a_tile_in_the_polygons_bbox_but_not_in_them_is_not_asked():
    src = _scene()
    ell = (AreaPolygon(((0, 0), (100, 0), (100, 100), (200, 100), (200, 200), (0, 200))),)  # no r0c1 quarter
    job = GroundingJob(expression="x", tile_size=100, overlap=0, area_polygons=ell)
    assert {tid for tid, _ in plan_full(job, src).tiles} == {"r0c0", "r1c0", "r1c1"}


def test_mode_one_coarse_to_fine_keeps_to_the_polygons():
    # A 1600 x 1600 raster (64 tiles of 200 px): the best object (0.95) lies outside the polygon, a weaker
    # one (0.6) inside: mode one must answer the weaker one, through both coarse and refine passes.
    rgb = paint(1600, 1600, [(1300, 1300, 1340, 1340, 0.95), (200, 300, 240, 340, 0.6)])
    src = ArraySource(rgb, Affine.identity())
    area = (AreaPolygon(((0, 0), (800, 0), (800, 800), (0, 800))),)
    job = GroundingJob(expression="x", mode="one", tile_size=200, overlap=20, area_polygons=area, coarse_min_tiles=4)
    summary = run_grounding(job, src, RecordingSink(), ColourClient())
    assert summary.strategy.startswith("coarse-to-fine")
    assert [m.detection.box.center for m in summary.final] == [pytest.approx((220.0, 320.0), abs=6.0)]
    free = run_grounding(GroundingJob(expression="x", mode="one", tile_size=200, overlap=20, coarse_min_tiles=4),
                         ArraySource(rgb, Affine.identity()), RecordingSink(), ColourClient())  # fmt: skip
    assert free.final[0].detection.box.center == pytest.approx((1320.0, 1320.0), abs=6.0)


def test_polygons_off_the_raster_are_an_extent_error():
    src = _scene()
    off = (AreaPolygon(((5000, 5000), (6000, 5000), (6000, 6000))),)
    with pytest.raises(ExtentError, match="do not overlap"):
        plan_full(GroundingJob(expression="x", area_polygons=off), src)
    # Bounding box over the raster, polygon itself not: no tile touches it.
    sliver = (AreaPolygon(((390, -100), (500, -100), (500, 500), (399.9, 500), (460, 200))),)
    with pytest.raises(ExtentError, match="no tile touches"):
        plan_full(GroundingJob(expression="x", tile_size=100, overlap=0, area_polygons=sliver), src)
