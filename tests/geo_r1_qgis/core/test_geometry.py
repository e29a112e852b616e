"""Tests of geo_r1_qgis/core/geometry.py: pure, run under the venv's Python and under QGIS's Python."""

from __future__ import annotations

import itertools
import math
import re
import struct

import pytest

from geo_r1_qgis.core.errors import ConfigError, ExtentError
from geo_r1_qgis.core.geometry import (
    Affine,
    PixelBox,
    TileGridSpec,
    box_area,
    box_to_polygon,
    continuous_iou,
    degrees_per_metre,
    gsd_to_scale,
    intersection_area,
    make_tile_grid,
    polygon_to_wkb,
    polygon_to_wkt,
    raster_bounds,
    ring_signed_area,
    window_from_map_bbox,
)

# Transforms used throughout: north-up metric, geographic, south-up (positive e), rotated, sheared,
# rotated + anisotropic. Built from their meaning, not from the code under test's output.
NORTH_UP = Affine(0.5, 0.0, 630000.0, 0.0, -0.5, 4250000.0)
GEOGRAPHIC = Affine(5e-6, 0.0, -97.5, 0.0, -5e-6, 38.4)
SOUTH_UP = Affine(2.0, 0.0, 100.0, 0.0, 2.0, -50.0)
_c, _s = math.cos(math.radians(20)), math.sin(math.radians(20))
ROTATED = Affine(0.5 * _c, 0.5 * _s, 630000.0, 0.5 * _s, -0.5 * _c, 4250000.0)
SHEARED = Affine(1.0, 0.3, 10.0, 0.1, -1.0, 20.0)
ROT_ANISO = Affine.translation(5e5, 4e6) * Affine.rotation(-35.0) * Affine.scale(0.3, -0.7)

TRANSFORMS = {
    "north_up": NORTH_UP,
    "geographic": GEOGRAPHIC,
    "south_up": SOUTH_UP,
    "rotated20": ROTATED,
    "sheared": SHEARED,
    "rot_aniso": ROT_ANISO,
}
ALL_T = pytest.mark.parametrize("transform", list(TRANSFORMS.values()), ids=list(TRANSFORMS))


def close(p, q, tol):
    return all(abs(a - b) <= tol for a, b in zip(p, q, strict=True))


def map_tol(transform: Affine) -> float:
    """1e-9 pixel expressed in map units (so geographic and metric rasters share one tolerance)."""
    return 1e-9 * max(1.0, *(abs(v) for v in transform.to_tuple()))


# ------------------------------------------------------------------------------------------------
# Affine
# ------------------------------------------------------------------------------------------------


def test_affine_point_follows_rasterio_convention():
    t = Affine(2.0, 3.0, 5.0, 7.0, 11.0, 13.0)
    # x = a*col + b*row + c ; y = d*col + e*row + f
    assert t * (1.0, 0.0) == (7.0, 20.0)
    assert t * (0.0, 1.0) == (8.0, 24.0)
    assert t * (0, 0) == (5.0, 13.0)
    assert t.apply(1.0, 1.0) == (10.0, 31.0)


def test_from_gdal_uses_gdal_order():
    gt = (630000.0, 0.5, 0.1, 4250000.0, 0.2, -0.5)  # (c, a, b, f, d, e)
    t = Affine.from_gdal(gt)
    assert (t.a, t.b, t.c, t.d, t.e, t.f) == (0.5, 0.1, 630000.0, 0.2, -0.5, 4250000.0)
    assert t.to_gdal() == gt


@ALL_T
def test_gdal_round_trip(transform):
    assert Affine.from_gdal(transform.to_gdal()) == transform


def test_from_gdal_rejects_wrong_length():
    with pytest.raises(ConfigError, match="6 numbers"):
        Affine.from_gdal((1.0, 2.0, 3.0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "1.0", None, True])
def test_affine_rejects_non_finite(bad):
    with pytest.raises(ConfigError, match="Affine"):
        Affine(bad, 0.0, 0.0, 0.0, -1.0, 0.0)


def test_rotation_turns_x_towards_y():
    r = Affine.rotation(90.0)
    assert close(r * (1.0, 0.0), (0.0, 1.0), 1e-15)
    assert close(r * (0.0, 1.0), (-1.0, 0.0), 1e-15)


@ALL_T
@pytest.mark.parametrize("other", [ROTATED, SHEARED, Affine.translation(3.5, -7.25), Affine.scale(2.0, 0.5)])
def test_composition_applies_right_operand_first(transform, other):
    for p in [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (123.5, 987.25)]:
        assert close((transform * other) * p, transform * (other * p), map_tol(transform) * 1e3)


def pixel_tol(transform: Affine, pixel) -> float:
    """1e-9 pixel, or the rounding of the map coordinates themselves where that is larger.

    A double holds a UTM northing (4.25e6 m) to about 1e-9 m, i.e. 2e-9 of a 0.5 m pixel; a longitude
    of -97.5 degrees to 1.4e-14 degree, i.e. 3e-9 of a 5e-6 degree pixel. No code can round-trip
    better than that, so the tolerance is the larger of 1e-9 px and a few ulps of the map coordinate.
    """
    x, y = transform * pixel
    ulp = 2.0**-52 * max(abs(x), abs(y), 1.0)
    return max(1e-9, 4 * ulp / min(transform.pixel_size)) * max(1.0, *map(abs, pixel))


@ALL_T
@pytest.mark.parametrize("pixel", [(0.0, 0.0), (0.5, 0.5), (1023.0, 17.25), (5000.125, 9999.875), (-3.0, 2.0)])
def test_pixel_map_pixel_round_trip(transform, pixel):
    x, y = transform * pixel
    assert close(transform.inverse_apply(x, y), pixel, pixel_tol(transform, pixel))
    assert close(transform.inverse() * (x, y), pixel, 4 * pixel_tol(transform, pixel))
    # map -> pixel -> map: 1e-9 of the map coordinate's magnitude (1e-9 degree, 1 cm in UTM).
    back = transform * transform.inverse_apply(x, y)
    assert close(back, (x, y), 1e-9 * max(1.0, abs(x), abs(y)) * 1e-3 + 1e-12)


def test_precision_of_the_pixel_tolerance_is_tight_for_small_coordinates():
    # With map coordinates of order 1 the tolerance is the plain 1e-9 pixel of the brief.
    assert pixel_tol(SHEARED, (3.0, 4.0)) == pytest.approx(4e-9)
    assert pixel_tol(NORTH_UP, (0.5, 0.5)) < 1e-8


@ALL_T
def test_inverse_composes_to_identity(transform):
    ident = transform * transform.inverse()
    assert ident.almost_equals(Affine.identity(), tol=1e-9)
    ident2 = transform.inverse() * transform
    assert ident2.almost_equals(Affine.identity(), tol=1e-9)


@pytest.mark.parametrize(
    "singular",
    [Affine(0, 0, 1, 0, 0, 2), Affine(1, 2, 0, 2, 4, 0), Affine(0.5, 0.0, 0.0, 0.25, 0.0, 0.0)],
)
def test_inverse_raises_on_singular(singular):
    with pytest.raises(ConfigError, match="singular"):
        singular.inverse()


@pytest.mark.parametrize(
    ("transform", "rectilinear"),
    [(NORTH_UP, True), (GEOGRAPHIC, True), (SOUTH_UP, True), (ROTATED, False), (SHEARED, False)],
)
def test_is_rectilinear(transform, rectilinear):
    assert transform.is_rectilinear is rectilinear


@pytest.mark.parametrize("angle", [0.0, 20.0, -35.0, 90.0, 180.0])
@pytest.mark.parametrize(("sx", "sy"), [(0.5, 0.5), (0.3, 0.7), (5e-6, 5e-6)])
def test_pixel_size_is_rotation_invariant(angle, sx, sy):
    t = Affine.translation(1e5, 2e6) * Affine.rotation(angle) * Affine.scale(sx, -sy)
    px, py = t.pixel_size
    assert math.isclose(px, sx, rel_tol=1e-12)
    assert math.isclose(py, sy, rel_tol=1e-12)


def test_mul_with_other_types_is_not_implemented():
    with pytest.raises(TypeError):
        NORTH_UP * 3


# ------------------------------------------------------------------------------------------------
# PixelBox
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("coords", [(0, 0, 0, 1), (0, 0, 1, 0), (5, 0, 1, 1), (0, 5, 1, 1), (0, 0, float("nan"), 1)])
def test_pixelbox_rejects_empty_or_inverted(coords):
    with pytest.raises(ConfigError, match="PixelBox"):
        PixelBox(*coords)


@pytest.mark.parametrize(
    ("a", "b", "iou"),
    [
        ((0, 0, 2, 2), (1, 1, 3, 3), 1 / 7),  # inter 1, union 4 + 4 - 1
        ((0, 0, 2, 2), (0, 0, 2, 2), 1.0),
        ((0, 0, 2, 2), (2, 0, 4, 2), 0.0),  # touching edges share no area
        ((0, 0, 4, 4), (1, 1, 3, 3), 4 / 16),
        ((0, 0, 10, 1), (5, 0, 15, 1), 5 / 15),
        ((0, 0, 1, 1), (10, 10, 11, 11), 0.0),
    ],
)
def test_iou_table(a, b, iou):
    assert math.isclose(PixelBox(*a).iou(PixelBox(*b)), iou, abs_tol=1e-15)
    assert math.isclose(PixelBox(*b).iou(PixelBox(*a)), iou, abs_tol=1e-15)
    # the one continuous IoU: PixelBox's is the tuple function's, exactly
    assert continuous_iou(a, b) == PixelBox(*a).iou(PixelBox(*b))
    assert intersection_area(a, b) == PixelBox(*a).intersection_area(PixelBox(*b))


def test_tuple_measures_take_empty_and_inverted_boxes():
    assert box_area((0, 0, 4, 3)) == 12.0
    assert box_area((4, 0, 0, 3)) == 0.0  # inverted: no area (PixelBox refuses such a box)
    assert box_area((1, 1, 1, 5)) == 0.0
    assert intersection_area((0, 0, 4, 4), (4, 0, 8, 4)) == 0.0  # touching edges share none
    assert intersection_area((0, 0, 4, 4), (3.5, 1, 8, 2)) == 0.5
    assert continuous_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0  # empty union
    assert continuous_iou((0, 0, 10, 10), (9, 0, 20, 10)) == 10 / 200  # Geo-R1's inclusive IoU says 0 here


def test_intersection_union_contains():
    a, b = PixelBox(0, 0, 4, 4), PixelBox(2, 1, 6, 3)
    assert a.intersection(b) == PixelBox(2, 1, 4, 3)
    assert a.intersection_area(b) == 4.0
    assert a.union(b) == PixelBox(0, 0, 6, 4)
    assert a.intersection(PixelBox(4, 0, 5, 1)) is None
    assert a.contains(PixelBox(1, 1, 4, 4))
    assert not a.contains(b)
    assert a.contains((4.0, 0.0))
    assert not a.contains((4.0001, 0.0))


def test_measures_and_window_view():
    b = PixelBox.from_window(10, 20, 30, 40)
    assert b.as_tuple() == (10, 20, 40, 60)
    assert (b.col_off, b.row_off, b.width, b.height, b.area) == (10, 20, 30, 40, 1200)
    assert b.center == (25.0, 40.0)
    assert b.corners() == ((10, 20), (40, 20), (40, 60), (10, 60))


@pytest.mark.parametrize(
    ("box", "size", "expected"),
    [
        ((-5, -5, 10, 10), (8, 20), (0, 0, 8, 10)),
        ((1, 2, 3, 4), (8, 8), (1, 2, 3, 4)),
        ((9, 9, 12, 12), (8, 8), None),
        ((8, 0, 12, 2), (8, 8), None),  # only touches the right edge
    ],
)
def test_clip(box, size, expected):
    clipped = PixelBox(*box).clip(*size)
    assert (clipped.as_tuple() if clipped else None) == expected


def test_offset_and_scale():
    b = PixelBox(1, 2, 3, 5)
    assert b.offset(10, -1) == PixelBox(11, 1, 13, 4)
    assert b.scale(2.0) == PixelBox(2, 4, 6, 10)
    assert b.scale(2.0, 0.5) == PixelBox(2, 1, 6, 2.5)
    with pytest.raises(ConfigError, match="positive"):
        b.scale(0.0)


# ------------------------------------------------------------------------------------------------
# box_to_polygon, WKT, WKB
# ------------------------------------------------------------------------------------------------

BOXES = [PixelBox(0, 0, 1, 1), PixelBox(10.5, 20.25, 47.0, 33.0), PixelBox(100, 900, 101, 1024)]


@ALL_T
@pytest.mark.parametrize("box", BOXES, ids=lambda b: "x".join(map(str, b.as_tuple())))
def test_box_to_polygon(transform, box):
    ring = box_to_polygon(box, transform)
    assert len(ring) == 5
    assert ring[0] == ring[-1]
    # Every vertex is a transformed corner, and all four corners are there (a rotated box stays rotated).
    expected = [transform * c for c in box.corners()]
    tol = map_tol(transform)
    for corner in expected:
        assert sum(close(corner, v, tol) for v in ring[:4]) == 1
    # Starts at the top-left pixel corner; counter-clockwise on the map (y up), whatever det's sign.
    assert close(ring[0], transform * (box.x1, box.y1), tol)
    area = ring_signed_area(ring)
    assert area > 0
    assert math.isclose(area, abs(transform.determinant) * box.area, rel_tol=1e-6)
    # Consecutive vertices are box-edge neighbours (never the diagonal).
    inv = transform.inverse()
    for p, q in itertools.pairwise(ring):
        (px, py), (qx, qy) = inv * p, inv * q
        assert math.isclose(px, qx, abs_tol=1e-6) != math.isclose(py, qy, abs_tol=1e-6)


def test_ring_signed_area_orientation():
    ccw = ((0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0), (0.0, 0.0))
    assert ring_signed_area(ccw) == 1.0
    assert ring_signed_area(tuple(reversed(ccw))) == -1.0
    assert ring_signed_area(ccw[:4]) == 1.0  # open ring


def _parse_wkt(wkt):
    m = re.fullmatch(r"POLYGON \(\((.*)\)\)", wkt)
    assert m, wkt
    return [tuple(float(v) for v in pt.split()) for pt in m.group(1).split(", ")]


@ALL_T
def test_polygon_to_wkt_round_trips_floats_exactly(transform):
    ring = box_to_polygon(PixelBox(3.3, 4.4, 5.5, 6.6), transform)
    wkt = polygon_to_wkt(ring)
    assert wkt.startswith("POLYGON ((")
    assert _parse_wkt(wkt) == [tuple(p) for p in ring]


def test_polygon_to_wkt_with_hole():
    outer = ((0.0, 0.0), (4.0, 0.0), (4.0, 4.0), (0.0, 4.0), (0.0, 0.0))
    hole = ((1.0, 1.0), (1.0, 2.0), (2.0, 2.0), (1.0, 1.0))
    assert polygon_to_wkt(outer, [hole]).count("), (") == 1


@pytest.mark.parametrize(
    "ring",
    [((0.0, 0.0), (1.0, 0.0), (1.0, 1.0)), ((0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0))],
    ids=["too_short", "not_closed"],
)
def test_polygon_rejects_bad_rings(ring):
    with pytest.raises(ConfigError, match="closed ring"):
        polygon_to_wkt(ring)
    with pytest.raises(ConfigError, match="closed ring"):
        polygon_to_wkb(ring)


@ALL_T
def test_polygon_to_wkb_layout(transform):
    ring = box_to_polygon(PixelBox(7, 8, 9, 10), transform)
    wkb = polygon_to_wkb(ring)
    order, gtype, nrings, npts = struct.unpack_from("<BIII", wkb, 0)
    assert (order, gtype, nrings, npts) == (1, 3, 1, 5)
    coords = struct.unpack_from("<10d", wkb, 13)
    assert len(wkb) == 13 + 10 * 8
    assert list(zip(coords[::2], coords[1::2], strict=True)) == [tuple(p) for p in ring]


def _wkb_reader():
    """shapely under the venv, osgeo.ogr under QGIS's Python: an independent WKB parser."""
    try:
        import shapely.wkb

        return lambda b: shapely.wkb.loads(b).wkt
    except ImportError:
        pass
    try:
        from osgeo import ogr

        return lambda b: ogr.CreateGeometryFromWkb(b).ExportToIsoWkt()
    except ImportError:
        return None


def test_wkb_parsed_by_an_independent_library():
    reader = _wkb_reader()
    if reader is None:
        pytest.skip("neither shapely nor osgeo.ogr is importable in this Python")
    ring = box_to_polygon(PixelBox(1, 2, 3, 4), ROTATED)
    wkt = reader(polygon_to_wkb(ring))
    assert wkt.replace(" ", "").startswith("POLYGON((")
    numbers = [float(v) for v in re.findall(r"-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?", wkt)]
    parsed = list(zip(numbers[::2], numbers[1::2], strict=True))
    assert len(parsed) == 5
    assert all(close(p, q, 1e-6) for p, q in zip(parsed, ring, strict=True))


# ------------------------------------------------------------------------------------------------
# Extents
# ------------------------------------------------------------------------------------------------


def test_raster_bounds_north_up():
    assert raster_bounds(NORTH_UP, 1024, 512) == (630000.0, 4250000.0 - 256.0, 630000.0 + 512.0, 4250000.0)


@ALL_T
def test_raster_bounds_is_the_bbox_of_the_corners(transform):
    xmin, ymin, xmax, ymax = raster_bounds(transform, 300, 200)
    corners = [transform * c for c in ((0, 0), (300, 0), (300, 200), (0, 200))]
    assert min(c[0] for c in corners) == xmin and max(c[0] for c in corners) == xmax
    assert min(c[1] for c in corners) == ymin and max(c[1] for c in corners) == ymax


@pytest.mark.parametrize(("w", "h"), [(0, 10), (10, -1), (1.5, 10)])
def test_raster_bounds_rejects_bad_size(w, h):
    with pytest.raises(ConfigError, match="positive integer"):
        raster_bounds(NORTH_UP, w, h)


@ALL_T
def test_window_of_whole_raster_bounds_is_whole_raster(transform):
    bounds = raster_bounds(transform, 300, 200)
    assert window_from_map_bbox(*bounds, transform, 300, 200) == PixelBox(0, 0, 300, 200)


@pytest.mark.parametrize("transform", [NORTH_UP, GEOGRAPHIC, SOUTH_UP], ids=["north_up", "geographic", "south_up"])
@pytest.mark.parametrize("box", [(10, 20, 30, 40), (0, 0, 1, 1), (299, 199, 300, 200)])
def test_window_on_pixel_edges_is_exact(transform, box):
    xs, ys = zip(*(transform * c for c in PixelBox(*box).corners()), strict=True)
    window = window_from_map_bbox(min(xs), min(ys), max(xs), max(ys), transform, 300, 200)
    assert window == PixelBox(*map(float, box))


def test_window_snaps_outwards_to_whole_pixels():
    # Pixel x 10.25..12.5, y 3.5..4.1 on a north-up 0.5 m raster.
    x0, y0 = NORTH_UP * (10.25, 4.1)
    x1, y1 = NORTH_UP * (12.5, 3.5)
    assert window_from_map_bbox(x0, y0, x1, y1, NORTH_UP, 300, 200) == PixelBox(10, 3, 13, 5)


def test_window_clips_partial_overlap():
    x0, y0 = NORTH_UP * (-50, 250)
    x1, y1 = NORTH_UP * (100, 150)
    assert window_from_map_bbox(x0, y0, x1, y1, NORTH_UP, 300, 200) == PixelBox(0, 150, 100, 200)


@ALL_T
def test_window_of_rotated_box_covers_it(transform):
    box = PixelBox(40.5, 60.5, 80.25, 90.0)
    xs, ys = zip(*box_to_polygon(box, transform), strict=True)
    window = window_from_map_bbox(min(xs), min(ys), max(xs), max(ys), transform, 300, 200)
    assert window.contains(box)
    assert all(float(v).is_integer() for v in window.as_tuple())


@pytest.mark.parametrize(
    "bbox",
    [(630000.0, 4249990.0, 630000.0, 4249999.0), (630010.0, 4249990.0, 630005.0, 4249999.0)],
    ids=["zero_width", "inverted"],
)
def test_window_rejects_empty_extent(bbox):
    with pytest.raises(ExtentError, match="empty") as info:
        window_from_map_bbox(*bbox, NORTH_UP, 300, 200)
    assert "630000" in str(info.value)  # the message shows the bbox and the raster bounds
    assert "4250000" in str(info.value)


@pytest.mark.parametrize(
    "bbox",
    [
        (640000.0, 4240000.0, 640010.0, 4240010.0),  # far away
        (630150.0, 4249900.0, 630200.0, 4249950.0),  # just east of the raster (it ends at x=630150)
    ],
)
def test_window_rejects_extent_outside(bbox):
    with pytest.raises(ExtentError, match="does not overlap") as info:
        window_from_map_bbox(*bbox, NORTH_UP, 300, 200)
    assert "630150" in str(info.value)


def test_window_outside_rotated_raster_but_inside_its_bbox():
    # A small bbox in the corner of the rotated raster's bounding box that the raster does not cover.
    xmin, ymin, _, _ = raster_bounds(ROTATED, 300, 200)
    corners = [ROTATED * c for c in ((0, 0), (300, 0), (300, 200), (0, 200))]
    assert not any(close(c, (xmin, ymin), 1e-6) for c in corners)  # the corner (xmin, ymin) is empty
    with pytest.raises(ExtentError):
        window_from_map_bbox(xmin, ymin, xmin + 1.0, ymin + 1.0, ROTATED, 300, 200)


def test_window_tiny_extent_gets_one_pixel():
    x, y = NORTH_UP * (10.5, 10.5)
    assert window_from_map_bbox(x, y - 1e-9, x + 1e-9, y, NORTH_UP, 300, 200) == PixelBox(10, 10, 11, 11)


# ------------------------------------------------------------------------------------------------
# GSD
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("transform", "gsd", "units", "expected"),
    [
        (NORTH_UP, 1.0, 1.0, 2.0),
        (NORTH_UP, 0.5, 1.0, 1.0),
        (NORTH_UP, 0.25, 1.0, 0.5),
        (ROTATED, 1.5, 1.0, 3.0),
        (Affine(0.3, 0, 0, 0, -0.75, 0), 1.5, 1.0, 1.5 / math.sqrt(0.3 * 0.75)),
        (Affine(1.0, 0, 0, 0, -1.0, 0), 2.0, 0.5, 1.0),  # CRS unit = 2 m (0.5 unit per metre)
    ],
)
def test_gsd_to_scale(transform, gsd, units, expected):
    assert math.isclose(gsd_to_scale(gsd, transform, units), expected, rel_tol=1e-12)


def test_gsd_to_scale_geographic():
    lat = 38.4
    dlon, dlat = degrees_per_metre(lat)
    # 1 degree of latitude is about 111 km, 1 degree of longitude about 111 km * cos(lat).
    assert 110_000 < 1 / dlat < 112_000
    assert math.isclose((1 / dlon) / (1 / dlat), math.cos(math.radians(lat)), rel_tol=0.01)
    t = Affine(dlon * 0.5, 0.0, -97.5, 0.0, -dlat * 0.5, lat)  # 0.5 m on the ground
    assert math.isclose(gsd_to_scale(1.0, t, (dlon, dlat)), 2.0, rel_tol=1e-9)


@pytest.mark.parametrize("gsd", [0.0, -1.0, float("nan")])
def test_gsd_to_scale_rejects_bad_gsd(gsd):
    with pytest.raises(ConfigError, match=r"gsd_m|ground sample distance"):
        gsd_to_scale(gsd, NORTH_UP)


# ------------------------------------------------------------------------------------------------
# Tile grid
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tile_size": 0}, "tile_size"),
        ({"tile_size": 512.0}, "tile_size"),
        ({"overlap": -1}, "overlap"),
        ({"tile_size": 64, "overlap": 64}, "smaller than tile_size"),
        ({"scale": 0.0}, "scale"),
        ({"scale": float("inf")}, "scale"),
    ],
)
def test_tile_grid_spec_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TileGridSpec(**kwargs)


def _covers(intervals, start, end):
    """True when the union of [a, b) intervals is exactly [start, end)."""
    reach = start
    for a, b in sorted(intervals):
        if a > reach:
            return False
        reach = max(reach, b)
    return reach == end and min(a for a, _ in intervals) == start


# (width, height, tile_size, overlap, scale, expected columns, expected rows), counts worked out by hand.
GRID_CASES = [
    (1024, 1024, 512, 0, 1.0, 2, 2),  # exact multiple, no overlap
    (1024, 1024, 512, 64, 1.0, 3, 3),  # 0, 448, and 512 (shifted back)
    (1000, 700, 512, 64, 1.0, 3, 2),
    (960, 512, 512, 64, 1.0, 2, 1),  # 448 + 512 = 960: exact, no shift
    (1008, 504, 504, 56, 1.0, 3, 1),  # multiples of 28
    (812, 1624, 812, 84, 1.0, 1, 3),  # multiples of 28, 812 = smart_resize(800)
    (300, 200, 512, 64, 1.0, 1, 1),  # raster smaller than a tile
    (300, 2000, 512, 64, 1.0, 1, 5),  # thin strip: 0, 448, 896, 1344, 1488
    (2048, 2048, 512, 64, 2.0, 3, 3),  # tile covers 1024 px, stride 896
    (1024, 1024, 512, 64, 2.0, 1, 1),  # exactly one coarse tile
    (1500, 700, 512, 64, 2.0, 2, 1),  # smaller than a coarse tile in y
    (1000, 1000, 500, 0, 1.5, 2, 2),  # 750 px per tile, no overlap
    (513, 513, 512, 0, 1.0, 2, 2),  # one pixel too many
    (1, 1, 512, 64, 1.0, 1, 1),  # a single pixel
]


@pytest.mark.parametrize(("w", "h", "tile", "overlap", "scale", "ncols", "nrows"), GRID_CASES)
@pytest.mark.parametrize("transform", [NORTH_UP, ROTATED, SHEARED], ids=["north_up", "rotated", "sheared"])
def test_tile_grid_invariants(w, h, tile, overlap, scale, ncols, nrows, transform):
    spec = TileGridSpec(tile, overlap, scale)
    tiles = make_tile_grid(transform, w, h, spec)
    assert len(tiles) == ncols * nrows
    assert [(t.row, t.col) for t in tiles] == [(r, c) for r in range(nrows) for c in range(ncols)]
    assert [t.index for t in tiles] == list(range(len(tiles)))
    assert [t.id for t in tiles] == [f"r{t.row}c{t.col}" for t in tiles]
    full = tile * scale
    for t in tiles:
        win = t.window
        assert win.x1 >= 0 and win.x2 <= w and win.y1 >= 0 and win.y2 <= h  # inside the raster
        assert all(float(v).is_integer() for v in win.as_tuple())  # whole pixels
        for length, size, area_len in ((win.width, t.size[0], w), (win.height, t.size[1], h)):
            if area_len >= full:  # a full tile: full image size
                assert abs(length - full) <= 0.5 and size == tile
            else:  # the area is smaller than a tile on this axis: the tile shrinks to it
                assert length == area_len
                assert size == max(1, round(length / scale))
        # The tile's affine maps its image onto its window.
        tol = map_tol(transform) * 1e3
        assert close(t.transform * (0, 0), transform * (win.x1, win.y1), tol)
        assert close(t.transform * t.size, transform * (win.x2, win.y2), tol)
    col_windows = sorted({(t.window.x1, t.window.x2) for t in tiles})
    row_windows = sorted({(t.window.y1, t.window.y2) for t in tiles})
    assert len(col_windows) == ncols and len(row_windows) == nrows
    assert _covers(col_windows, 0, w) and _covers(row_windows, 0, h)
    # Neighbours overlap by at least `overlap` tile pixels (exactly, except the shifted last tile).
    for windows in (col_windows, row_windows):
        for (_a1, a2), (b1, _b2) in itertools.pairwise(windows):
            assert a2 - b1 >= round(overlap * scale)
        steps = [b[0] - a[0] for a, b in itertools.pairwise(windows)]
        assert all(s == round(full) - round(overlap * scale) for s in steps[:-1])


def test_last_tile_is_shifted_back_and_full_size():
    tiles = make_tile_grid(NORTH_UP, 1000, 700, TileGridSpec(512, 64))
    last = tiles[-1]
    assert last.window == PixelBox(488, 188, 1000, 700)
    assert last.size == (512, 512)


@pytest.mark.parametrize(("scale", "size"), [(1.0, (300, 200)), (2.0, (150, 100)), (0.5, (600, 400))])
def test_raster_smaller_than_tile_shrinks_tile(scale, size):
    # Tile of 2048 image pixels is larger than the 300x200 raster at every scale here.
    (only,) = make_tile_grid(NORTH_UP, 300, 200, TileGridSpec(2048, 64, scale))
    assert only.window == PixelBox(0, 0, 300, 200)
    assert only.size == size


@pytest.mark.parametrize("transform", list(TRANSFORMS.values()), ids=list(TRANSFORMS))
@pytest.mark.parametrize("spec", [TileGridSpec(512, 64, 1.0), TileGridSpec(504, 0, 2.0), TileGridSpec(100, 10, 1.37)])
def test_tile_to_raster_agrees_with_tile_transform(transform, spec):
    box_in_tile = PixelBox(12.5, 30.0, 77.25, 90.5)
    for t in make_tile_grid(transform, 1200, 900, spec):
        raster_box = t.to_raster(box_in_tile)
        tol = map_tol(transform) * 1e4
        for tile_corner, raster_corner in zip(box_in_tile.corners(), raster_box.corners(), strict=True):
            assert close(t.transform * tile_corner, transform * raster_corner, tol)
        # ... and the map polygon of the tile box is the map polygon of the raster box.
        for p, q in zip(box_to_polygon(box_in_tile, t.transform), box_to_polygon(raster_box, transform), strict=True):
            assert close(p, q, tol)
        back = t.to_tile(raster_box)
        assert close(back.as_tuple(), box_in_tile.as_tuple(), 1e-9)
        # Round trip tile pixel -> map -> tile pixel.
        x, y = t.transform * (3.25, 4.5)
        assert close(t.transform.inverse_apply(x, y), (3.25, 4.5), pixel_tol(t.transform, (3.25, 4.5)))


def test_scale_two_tile_covers_twice_the_pixels():
    t = make_tile_grid(NORTH_UP, 4096, 4096, TileGridSpec(512, 64, 2.0))[0]
    assert t.window == PixelBox(0, 0, 1024, 1024)
    assert t.size == (512, 512)
    assert t.pixel_scale == (2.0, 2.0)
    assert t.to_raster(PixelBox(10, 10, 20, 30)) == PixelBox(20, 20, 40, 60)
    assert t.transform.pixel_size == (1.0, 1.0)  # 0.5 m raster pixels -> 1 m tile pixels


@pytest.mark.parametrize(
    ("window", "snapped"),
    [
        (PixelBox(100, 50, 900, 650), PixelBox(100, 50, 900, 650)),
        (PixelBox(100.5, 50.2, 899.5, 649.9), PixelBox(100, 50, 900, 650)),
        (PixelBox(-100, -100, 300, 200), PixelBox(0, 0, 300, 200)),
    ],
)
def test_tile_grid_over_a_window(window, snapped):
    tiles = make_tile_grid(NORTH_UP, 1000, 700, TileGridSpec(256, 32), window=window)
    for t in tiles:
        assert snapped.contains(t.window)
    assert min(t.window.x1 for t in tiles) == snapped.x1 and max(t.window.x2 for t in tiles) == snapped.x2
    assert min(t.window.y1 for t in tiles) == snapped.y1 and max(t.window.y2 for t in tiles) == snapped.y2


def test_tile_grid_window_outside_raster():
    with pytest.raises(ExtentError, match="outside"):
        make_tile_grid(NORTH_UP, 100, 100, TileGridSpec(64, 8), window=PixelBox(200, 200, 300, 300))


def test_tile_grid_is_deterministic():
    spec = TileGridSpec(300, 20, 1.3)
    assert make_tile_grid(ROTATED, 2000, 1500, spec) == make_tile_grid(ROTATED, 2000, 1500, spec)


@pytest.mark.parametrize(
    ("tile", "advice"),
    [(504, None), (448, None), (532, None), (512, "use 504 or 532"), (500, "use 476 or 504"), (20, "use 28 so")],
)
def test_tile_size_advice_names_the_nearest_multiples_of_28(tile, advice):
    from geo_r1_qgis.core.geometry import DEFAULT_TILE, tile_size_advice

    assert DEFAULT_TILE % 28 == 0
    got = tile_size_advice(tile)
    assert (got is None) if advice is None else (advice in got and str(tile) in got)
