"""Pure geometry: pixel <-> map affines, pixel boxes, box -> polygon, and the tile grid.

Everything here works on plain floats and tuples. It imports the standard library only (no QGIS,
GDAL, rasterio, shapely or pyproj), so the QGIS plugin and the command line share the very same code
and it is tested without a running QGIS.

Conventions
-----------
* Pixel coordinates use the *pixel-edge* convention of GDAL and rasterio: ``(0, 0)`` is the top-left
  corner of the top-left pixel, ``(width, height)`` the bottom-right corner of the bottom-right
  pixel, and the centre of pixel ``(col, row)`` is ``(col + 0.5, row + 0.5)``. ``x`` is the column
  axis, ``y`` the row axis (pointing down).
* :class:`Affine` follows rasterio: ``x = a*col + b*row + c`` and ``y = d*col + e*row + f``.
  GDAL's geotransform holds the same six numbers in the order ``(c, a, b, f, d, e)``.
  Rotation and shear (``b`` and ``d`` not zero) are supported everywhere.
* Map polygons are exterior rings of the four transformed box corners, closed (first point repeated
  last) and oriented **counter-clockwise** in map coordinates (``x`` east, ``y`` north), as OGC
  Simple Features and GeoJSON (RFC 7946) want for exterior rings, whatever the sign of the
  raster's determinant.
* Box areas, intersections and IoU here are **continuous** (:func:`continuous_iou`: areas of the boxes
  as drawn, no +1 pixel). Geo-R1's own inclusive-pixel IoU, for numbers that must match the paper's, is
  :func:`geo_r1_qgis.core.rules.coords.geo_r1_iou`; each is defined once.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

from .errors import ConfigError, ExtentError

__all__ = [
    "Affine",
    "PixelBox",
    "Point",
    "Ring",
    "Tile",
    "TileGridSpec",
    "box_area",
    "box_to_polygon",
    "continuous_iou",
    "gsd_to_scale",
    "intersection_area",
    "make_tile_grid",
    "polygon_to_wkb",
    "polygon_to_wkt",
    "raster_bounds",
    "ring_signed_area",
    "window_from_map_bbox",
]

Point = tuple[float, float]
Ring = tuple[Point, ...]

#: Snapping tolerance, in pixels, that absorbs floating-point noise when a map extent is turned into
#: whole pixels (a bbox on pixel edges must not grow by one pixel because of 1e-12 of rounding).
_SNAP_EPS_PX = 1e-6


def _check_finite(owner: str, **values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{owner}: {name} must be a number, got {value!r} ({type(value).__name__})")
        if not math.isfinite(value):
            raise ConfigError(f"{owner}: {name} must be finite, got {value!r}; check the georeferencing")


# --------------------------------------------------------------------------------------------------
# Affine
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Affine:
    """A 2-D affine transform ``x = a*col + b*row + c``, ``y = d*col + e*row + f`` (rasterio's order).

    ``Affine * (col, row)`` maps a point; ``A * B`` composes (``B`` applies first, then ``A``), so
    ``raster_transform * Affine.translation(col_off, row_off)`` is the transform of a window.
    """

    a: float
    b: float
    c: float
    d: float
    e: float
    f: float

    def __post_init__(self) -> None:
        _check_finite("Affine", a=self.a, b=self.b, c=self.c, d=self.d, e=self.e, f=self.f)

    # -- constructors ----------------------------------------------------------------------------
    @classmethod
    def identity(cls) -> Affine:
        return cls(1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

    @classmethod
    def translation(cls, tx: float, ty: float) -> Affine:
        return cls(1.0, 0.0, tx, 0.0, 1.0, ty)

    @classmethod
    def scale(cls, sx: float, sy: float | None = None) -> Affine:
        """Scale by ``sx`` along x and ``sy`` (default ``sx``) along y."""
        return cls(sx, 0.0, 0.0, 0.0, sx if sy is None else sy, 0.0)

    @classmethod
    def rotation(cls, angle_deg: float) -> Affine:
        """Rotate counter-clockwise (x towards y) by ``angle_deg`` degrees about the origin."""
        _check_finite("Affine.rotation", angle_deg=angle_deg)
        rad = math.radians(angle_deg)
        cos, sin = math.cos(rad), math.sin(rad)
        return cls(cos, -sin, 0.0, sin, cos, 0.0)

    @classmethod
    def shear(cls, x_angle_deg: float = 0.0, y_angle_deg: float = 0.0) -> Affine:
        """Shear by the given angles (degrees) along x and along y."""
        _check_finite("Affine.shear", x_angle_deg=x_angle_deg, y_angle_deg=y_angle_deg)
        return cls(1.0, math.tan(math.radians(x_angle_deg)), 0.0, math.tan(math.radians(y_angle_deg)), 1.0, 0.0)

    @classmethod
    def from_gdal(cls, gt: Sequence[float]) -> Affine:
        """Build from a GDAL geotransform ``(c, a, b, f, d, e)``."""
        if len(gt) != 6:
            raise ConfigError(f"a GDAL geotransform has 6 numbers (c, a, b, f, d, e), got {len(gt)}: {gt!r}")
        c, a, b, f, d, e = (float(v) for v in gt)
        return cls(a, b, c, d, e, f)

    def to_gdal(self) -> tuple[float, float, float, float, float, float]:
        """The GDAL geotransform ``(c, a, b, f, d, e)``."""
        return (self.c, self.a, self.b, self.f, self.d, self.e)

    # -- algebra ---------------------------------------------------------------------------------
    @overload
    def __mul__(self, other: Affine) -> Affine: ...
    @overload
    def __mul__(self, other: Point | Sequence[float]) -> Point: ...
    def __mul__(self, other: object) -> Affine | Point:
        if isinstance(other, Affine):
            return Affine(
                self.a * other.a + self.b * other.d,
                self.a * other.b + self.b * other.e,
                self.a * other.c + self.b * other.f + self.c,
                self.d * other.a + self.e * other.d,
                self.d * other.b + self.e * other.e,
                self.d * other.c + self.e * other.f + self.f,
            )
        if isinstance(other, (tuple, list)) and len(other) == 2:
            col, row = other
            return (self.a * col + self.b * row + self.c, self.d * col + self.e * row + self.f)
        return NotImplemented

    def apply(self, col: float, row: float) -> Point:
        """Map one point (typed alternative to ``self * (col, row)``)."""
        return (self.a * col + self.b * row + self.c, self.d * col + self.e * row + self.f)

    @property
    def determinant(self) -> float:
        return self.a * self.e - self.b * self.d

    def inverse(self) -> Affine:
        """The inverse transform (map -> pixel). Raises :class:`ConfigError` when singular."""
        det = self.determinant
        scale = max(abs(self.a), abs(self.b), abs(self.d), abs(self.e))
        if scale == 0.0 or abs(det) <= 1e-12 * scale * scale:
            raise ConfigError(
                f"the transform {self.to_gdal()} (GDAL order) is singular (determinant {det!r}) and cannot "
                "be inverted; the raster's geotransform is broken: fix or re-create its georeferencing"
            )
        ia, ib = self.e / det, -self.b / det
        id_, ie = -self.d / det, self.a / det
        return Affine(ia, ib, -(ia * self.c + ib * self.f), id_, ie, -(id_ * self.c + ie * self.f))

    def inverse_apply(self, x: float, y: float) -> Point:
        """Map -> pixel for one point, more precisely than ``self.inverse() * (x, y)``.

        The offsets ``c`` and ``f`` are subtracted first, so large map coordinates (UTM northings,
        Web Mercator) do not lose digits in a large inverse offset. Raises like :meth:`inverse`.
        """
        inv = self.inverse()
        dx, dy = x - self.c, y - self.f
        return (inv.a * dx + inv.b * dy, inv.d * dx + inv.e * dy)

    # -- properties ------------------------------------------------------------------------------
    def is_rectilinear_within(self, tol: float = 1e-12) -> bool:
        """True when there is no rotation or shear (``b`` and ``d`` are zero within ``tol``, relative)."""
        scale = max(abs(self.a), abs(self.e), 1e-300)
        return abs(self.b) <= tol * scale and abs(self.d) <= tol * scale

    @property
    def is_rectilinear(self) -> bool:
        """True when pixel columns run along x and rows along y (no rotation, no shear)."""
        return self.is_rectilinear_within()

    @property
    def pixel_size(self) -> tuple[float, float]:
        """Lengths, in map units, of one pixel step along a row and along a column."""
        return (math.hypot(self.a, self.d), math.hypot(self.b, self.e))

    def almost_equals(self, other: Affine, tol: float = 1e-9) -> bool:
        """True when every coefficient differs by at most ``tol``."""
        return all(abs(p - q) <= tol for p, q in zip(self.to_tuple(), other.to_tuple(), strict=True))

    def to_tuple(self) -> tuple[float, float, float, float, float, float]:
        """``(a, b, c, d, e, f)``, the order ``affine.Affine(*t)`` takes."""
        return (self.a, self.b, self.c, self.d, self.e, self.f)


# --------------------------------------------------------------------------------------------------
# Continuous box measures (on any (x1, y1, x2, y2) sequence; PixelBox uses them)
# --------------------------------------------------------------------------------------------------


def box_area(box: Sequence[float]) -> float:
    """The area of ``(x1, y1, x2, y2)``; 0 for an empty or inverted box."""
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def intersection_area(a: Sequence[float], b: Sequence[float]) -> float:
    """The area two ``(x1, y1, x2, y2)`` boxes share (touching edges share none)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def continuous_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of the boxes' continuous areas (no +1 pixel convention), in ``[0, 1]``;
    0.0 when the union is empty. Geo-R1's inclusive-pixel IoU is ``rules.coords.geo_r1_iou``."""
    inter = intersection_area(a, b)
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


# --------------------------------------------------------------------------------------------------
# PixelBox
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PixelBox:
    """An axis-aligned box in pixel coordinates (pixel-edge convention), ``x1 < x2`` and ``y1 < y2``.

    It also serves as a raster *window*: ``col_off = x1``, ``row_off = y1``, ``width``, ``height``.
    """

    x1: float
    y1: float
    x2: float
    y2: float

    def __post_init__(self) -> None:
        _check_finite("PixelBox", x1=self.x1, y1=self.y1, x2=self.x2, y2=self.y2)
        if not (self.x1 < self.x2 and self.y1 < self.y2):
            raise ConfigError(
                f"PixelBox needs x1 < x2 and y1 < y2, got ({self.x1!r}, {self.y1!r}, {self.x2!r}, {self.y2!r}); "
                "pass the top-left corner first and drop empty boxes"
            )

    @classmethod
    def from_window(cls, col_off: float, row_off: float, width: float, height: float) -> PixelBox:
        return cls(col_off, row_off, col_off + width, row_off + height)

    # -- measures --------------------------------------------------------------------------------
    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    @property
    def area(self) -> float:
        return (self.x2 - self.x1) * (self.y2 - self.y1)

    @property
    def center(self) -> Point:
        return ((self.x1 + self.x2) / 2.0, (self.y1 + self.y2) / 2.0)

    @property
    def col_off(self) -> float:
        return self.x1

    @property
    def row_off(self) -> float:
        return self.y1

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)

    def corners(self) -> tuple[Point, Point, Point, Point]:
        """Top-left, top-right, bottom-right, bottom-left (clockwise on screen, y pointing down)."""
        return ((self.x1, self.y1), (self.x2, self.y1), (self.x2, self.y2), (self.x1, self.y2))

    # -- set operations --------------------------------------------------------------------------
    def intersection(self, other: PixelBox) -> PixelBox | None:
        """The common box, or ``None`` when the boxes share no area (touching edges share none)."""
        x1, y1 = max(self.x1, other.x1), max(self.y1, other.y1)
        x2, y2 = min(self.x2, other.x2), min(self.y2, other.y2)
        if x1 < x2 and y1 < y2:
            return PixelBox(x1, y1, x2, y2)
        return None

    def intersection_area(self, other: PixelBox) -> float:
        """:func:`intersection_area` of the two boxes."""
        return intersection_area(self.as_tuple(), other.as_tuple())

    def iou(self, other: PixelBox) -> float:
        """:func:`continuous_iou` of the two boxes (no +1 pixel convention), in ``[0, 1]``."""
        return continuous_iou(self.as_tuple(), other.as_tuple())

    def union(self, other: PixelBox) -> PixelBox:
        """The smallest box holding both."""
        return PixelBox(min(self.x1, other.x1), min(self.y1, other.y1), max(self.x2, other.x2), max(self.y2, other.y2))

    def contains(self, other: PixelBox | Point) -> bool:
        """True when ``other`` (a box or an ``(x, y)`` point) lies inside this box, edges included."""
        if isinstance(other, PixelBox):
            return self.x1 <= other.x1 and self.y1 <= other.y1 and other.x2 <= self.x2 and other.y2 <= self.y2
        x, y = other
        return self.x1 <= x <= self.x2 and self.y1 <= y <= self.y2

    def clip(self, width: float, height: float) -> PixelBox | None:
        """This box cut to ``[0, width] x [0, height]``; ``None`` when nothing of it is left."""
        return self.intersection(PixelBox(0.0, 0.0, width, height))

    def offset(self, dx: float, dy: float) -> PixelBox:
        return PixelBox(self.x1 + dx, self.y1 + dy, self.x2 + dx, self.y2 + dy)

    def scale(self, sx: float, sy: float | None = None) -> PixelBox:
        """Multiply the coordinates by ``sx`` (x) and ``sy`` (y, default ``sx``); both must be > 0."""
        sy = sx if sy is None else sy
        if not (sx > 0 and sy > 0):
            raise ConfigError(f"PixelBox.scale needs positive factors, got sx={sx!r}, sy={sy!r}")
        return PixelBox(self.x1 * sx, self.y1 * sy, self.x2 * sx, self.y2 * sy)


# --------------------------------------------------------------------------------------------------
# Box -> polygon, WKT, WKB
# --------------------------------------------------------------------------------------------------


def ring_signed_area(ring: Sequence[Point]) -> float:
    """Shoelace area of a ring: positive when counter-clockwise with ``y`` pointing up (map axes).

    Coordinates are taken relative to the first point, so a small ring far from the origin (a pixel
    in UTM or in degrees) keeps its digits.
    """
    if not ring:
        return 0.0
    ox, oy = ring[0]
    pts = [(x - ox, y - oy) for x, y in ring]
    if tuple(ring[0]) != tuple(ring[-1]):
        pts.append(pts[0])
    total = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        total += x0 * y1 - x1 * y0
    return total / 2.0


def box_to_polygon(box: PixelBox, transform: Affine) -> Ring:
    """The map polygon of a pixel box: its four corners through ``transform``, as a closed ring.

    Returns five points, the first repeated last, starting at the box's top-left pixel corner
    ``(x1, y1)`` and running **counter-clockwise** in map coordinates (positive
    :func:`ring_signed_area`). With a rotated or sheared transform the ring is the rotated
    parallelogram, not its bounding box.
    """
    corners = [transform.apply(x, y) for x, y in box.corners()]  # clockwise in pixel space
    if transform.determinant < 0:
        # Pixel rows point down while map y points up (the usual north-up case): the pixel-clockwise
        # order is clockwise on the map too, so walk it backwards from the same first corner.
        corners = [corners[0], corners[3], corners[2], corners[1]]
    corners.append(corners[0])
    return tuple(corners)


def _check_ring(ring: Sequence[Point], what: str) -> None:
    if len(ring) < 4 or tuple(ring[0]) != tuple(ring[-1]):
        raise ConfigError(
            f"{what} must be a closed ring of at least 4 points (first == last), got {len(ring)} points "
            f"starting {tuple(ring[:1])} and ending {tuple(ring[-1:])}; use box_to_polygon to build one"
        )
    for point in ring:
        if len(point) != 2:
            raise ConfigError(f"{what}: points must be (x, y) pairs, got {point!r}")
        _check_finite(what, x=point[0], y=point[1])


def polygon_to_wkt(exterior: Sequence[Point], holes: Sequence[Sequence[Point]] = ()) -> str:
    """``POLYGON ((x y, ...), ...)`` with full ``repr`` precision, so parsing it gives the same floats."""
    rings = [exterior, *holes]
    parts = []
    for i, ring in enumerate(rings):
        _check_ring(ring, "polygon exterior" if i == 0 else f"polygon hole {i}")
        parts.append("(" + ", ".join(f"{float(x)!r} {float(y)!r}" for x, y in ring) + ")")
    return "POLYGON (" + ", ".join(parts) + ")"


_WKB_POLYGON = 3


def polygon_to_wkb(exterior: Sequence[Point], holes: Sequence[Sequence[Point]] = ()) -> bytes:
    """ISO/OGC WKB of a 2-D Polygon, little-endian (byte order flag 1, geometry type 3)."""
    rings = [exterior, *holes]
    out = [struct.pack("<BII", 1, _WKB_POLYGON, len(rings))]
    for i, ring in enumerate(rings):
        _check_ring(ring, "polygon exterior" if i == 0 else f"polygon hole {i}")
        out.append(struct.pack("<I", len(ring)))
        out.append(struct.pack(f"<{2 * len(ring)}d", *(float(v) for point in ring for v in point)))
    return b"".join(out)


# --------------------------------------------------------------------------------------------------
# Raster extents
# --------------------------------------------------------------------------------------------------


def _check_size(owner: str, width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{owner}: raster {name} must be a positive integer, got {value!r}")


def raster_bounds(transform: Affine, width: int, height: int) -> tuple[float, float, float, float]:
    """``(xmin, ymin, xmax, ymax)`` in map units: the bounding box of the raster's four corners."""
    _check_size("raster_bounds", width, height)
    corners = [transform.apply(x, y) for x, y in PixelBox(0, 0, width, height).corners()]
    xs = [p[0] for p in corners]
    ys = [p[1] for p in corners]
    return (min(xs), min(ys), max(xs), max(ys))


def _convex_overlap(poly_a: Sequence[Point], poly_b: Sequence[Point]) -> bool:
    """True when two convex polygons (open rings) share area: the separating axis theorem."""
    for poly in (poly_a, poly_b):
        for (x0, y0), (x1, y1) in zip(poly, [*poly[1:], poly[0]], strict=True):
            nx, ny = y0 - y1, x1 - x0  # the edge's normal
            if nx == 0.0 and ny == 0.0:
                continue
            pa = [nx * x + ny * y for x, y in poly_a]
            pb = [nx * x + ny * y for x, y in poly_b]
            scale = max(map(abs, pa + pb)) or 1.0
            if min(max(pa), max(pb)) - max(min(pa), min(pb)) <= 1e-12 * scale:
                return False
    return True


def window_from_map_bbox(
    xmin: float, ymin: float, xmax: float, ymax: float, transform: Affine, width: int, height: int
) -> PixelBox:
    """The raster window (whole pixels) covering a map bbox, clipped to the raster.

    The bbox's four corners go through the inverse transform (so rotated rasters work); the pixel
    bounding box of those is snapped outwards to whole pixels and clipped to the raster. Raises
    :class:`ExtentError` for an empty bbox or one that does not overlap the raster.
    """
    _check_finite("window_from_map_bbox", xmin=xmin, ymin=ymin, xmax=xmax, ymax=ymax)
    _check_size("window_from_map_bbox", width, height)
    bounds = raster_bounds(transform, width, height)
    bounds_txt = "({:.10g}, {:.10g}, {:.10g}, {:.10g})".format(*bounds)
    bbox_txt = f"({xmin:.10g}, {ymin:.10g}, {xmax:.10g}, {ymax:.10g})"
    if not (xmin < xmax and ymin < ymax):
        raise ExtentError(
            f"the extent {bbox_txt} (xmin, ymin, xmax, ymax) is empty: it needs xmin < xmax and ymin < ymax; "
            f"draw or choose an extent with an area (the raster covers {bounds_txt})"
        )
    pix = [transform.inverse_apply(x, y) for x, y in ((xmin, ymin), (xmax, ymin), (xmax, ymax), (xmin, ymax))]
    cols = [p[0] for p in pix]
    rows = [p[1] for p in pix]
    x1 = max(0, math.floor(min(cols) + _SNAP_EPS_PX))
    y1 = max(0, math.floor(min(rows) + _SNAP_EPS_PX))
    x2 = min(width, math.ceil(max(cols) - _SNAP_EPS_PX))
    y2 = min(height, math.ceil(max(rows) - _SNAP_EPS_PX))
    raster_quad = PixelBox(0, 0, width, height).corners()
    if not _convex_overlap(pix, raster_quad):
        raise ExtentError(
            f"the extent {bbox_txt} does not overlap the raster, which covers {bounds_txt} "
            "(same CRS); choose an extent over the raster or use the whole raster"
        )
    # A bbox thinner than the snapping tolerance still gets one pixel.
    if x2 <= x1:
        x1, x2 = (x1, x1 + 1) if x1 < width else (width - 1, width)
    if y2 <= y1:
        y1, y2 = (y1, y1 + 1) if y1 < height else (height - 1, height)
    return PixelBox(float(x1), float(y1), float(x2), float(y2))


def gsd_to_scale(
    gsd_m: float, raster_transform: Affine, crs_units_per_metre: float | tuple[float, float] = 1.0
) -> float:
    """The :attr:`TileGridSpec.scale` that resamples the raster to a ground sample distance of ``gsd_m``.

    ``crs_units_per_metre`` converts metres to CRS units: 1.0 for metric CRSs, or for a geographic
    CRS ``(degrees of longitude per metre, degrees of latitude per metre)`` at the raster's latitude
    (see :func:`degrees_per_metre`). The native pixel size is the geometric mean of the two pixel
    sides, so the result keeps the pixel *area* right for non-square pixels. ``scale > 1`` means
    coarser tiles than the raster; ``< 1`` upsamples.
    """
    _check_finite("gsd_to_scale", gsd_m=gsd_m)
    if gsd_m <= 0:
        raise ConfigError(f"the ground sample distance must be > 0 metres, got {gsd_m!r}; e.g. --gsd 0.5")
    ux, uy = (
        (crs_units_per_metre, crs_units_per_metre)
        if isinstance(crs_units_per_metre, (int, float))
        else crs_units_per_metre
    )
    _check_finite("gsd_to_scale", crs_units_per_metre_x=ux, crs_units_per_metre_y=uy)
    if ux <= 0 or uy <= 0:
        raise ConfigError(f"crs_units_per_metre must be > 0, got {crs_units_per_metre!r}")
    px, py = raster_transform.pixel_size
    native_m = math.sqrt((px / ux) * (py / uy))
    if native_m <= 0:
        raise ConfigError(f"the raster transform {raster_transform.to_gdal()} has a zero pixel size")
    return gsd_m / native_m


def degrees_per_metre(latitude_deg: float) -> tuple[float, float]:
    """Degrees of (longitude, latitude) per metre on the WGS 84 ellipsoid at ``latitude_deg``."""
    _check_finite("degrees_per_metre", latitude_deg=latitude_deg)
    if not -90.0 < latitude_deg < 90.0:
        raise ConfigError(f"latitude must be strictly between -90 and 90 degrees, got {latitude_deg!r}")
    a, e2 = 6378137.0, 6.69437999014e-3
    phi = math.radians(latitude_deg)
    w = math.sqrt(1.0 - e2 * math.sin(phi) ** 2)
    m_per_deg_lat = math.radians(a * (1.0 - e2) / w**3)
    m_per_deg_lon = math.radians(a * math.cos(phi) / w)
    return (1.0 / m_per_deg_lon, 1.0 / m_per_deg_lat)


# --------------------------------------------------------------------------------------------------
# Tile grid
# --------------------------------------------------------------------------------------------------


#: The default tile: a multiple of 28, so the model's frame and the tile's frame agree.
DEFAULT_TILE = 504


def tile_size_advice(tile_size: int) -> str | None:
    """A one-line warning when ``tile_size`` is not a multiple of 28, naming the nearest multiples; else None."""
    from .rules.coords import QWEN_FACTOR  # here, not at the top: rules.coords imports this module

    if tile_size % QWEN_FACTOR == 0:
        return None
    lower = tile_size // QWEN_FACTOR * QWEN_FACTOR
    upper = lower + QWEN_FACTOR
    sizes = f"{lower} or {upper}" if lower else f"{upper}"
    return (
        f"tile size {tile_size} is not a multiple of {QWEN_FACTOR}: the model sees the tile resized and its boxes are "
        f"scaled back from that frame; use {sizes} so the model sees the tile as it is"
    )


@dataclass(frozen=True)
class TileGridSpec:
    """How to cut a raster into model tiles.

    ``tile_size`` and ``overlap`` are in pixels of the tile *image* sent to the model. ``scale`` is
    output pixel size / native pixel size: 2.0 makes each tile pixel cover 2x2 raster pixels (a
    coarser ground resolution, so a 504 px tile covers 1008 raster pixels); see :func:`gsd_to_scale`.
    """

    tile_size: int = DEFAULT_TILE
    overlap: int = 64
    scale: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.tile_size, bool) or not isinstance(self.tile_size, int) or self.tile_size < 1:
            raise ConfigError(f"tile_size must be a positive integer of pixels, got {self.tile_size!r}; e.g. 504")
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, int) or self.overlap < 0:
            raise ConfigError(f"overlap must be an integer >= 0 pixels, got {self.overlap!r}; e.g. 64")
        if self.overlap >= self.tile_size:
            raise ConfigError(
                f"overlap ({self.overlap}) must be smaller than tile_size ({self.tile_size}), or tiles "
                "would never advance; use e.g. an overlap of tile_size // 8"
            )
        _check_finite("TileGridSpec", scale=self.scale)
        if self.scale <= 0:
            raise ConfigError(
                f"scale must be > 0 (output pixel size / native pixel size), got {self.scale!r}; "
                "1.0 keeps the native resolution"
            )

    @property
    def stride(self) -> int:
        """Step between tile origins, in tile-image pixels."""
        return self.tile_size - self.overlap


@dataclass(frozen=True)
class Tile:
    """One tile of a grid.

    ``window`` is the source window in full-resolution raster pixels; ``size`` the (width, height)
    of the tile image the model sees; ``transform`` maps tile-image pixels to map coordinates.
    """

    index: int
    row: int
    col: int
    window: PixelBox
    size: tuple[int, int]
    transform: Affine

    def __post_init__(self) -> None:
        w, h = self.size
        if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
            raise ConfigError(f"Tile.size must be two positive integers, got {self.size!r}")
        if min(self.index, self.row, self.col) < 0:
            raise ConfigError(f"Tile index, row and col must be >= 0, got {self.index}, {self.row}, {self.col}")

    @property
    def id(self) -> str:
        """``r<row>c<col>``, e.g. ``r3c7``."""
        return f"r{self.row}c{self.col}"

    @property
    def pixel_scale(self) -> tuple[float, float]:
        """Raster pixels per tile-image pixel along x and y (the tile's actual scale)."""
        return (self.window.width / self.size[0], self.window.height / self.size[1])

    @property
    def to_raster_transform(self) -> Affine:
        """Affine mapping tile-image pixels to full-resolution raster pixels."""
        sx, sy = self.pixel_scale
        return Affine(sx, 0.0, self.window.x1, 0.0, sy, self.window.y1)

    def to_raster(self, box: PixelBox) -> PixelBox:
        """A box in tile-image pixels -> the same box in full-resolution raster pixels."""
        sx, sy = self.pixel_scale
        return PixelBox(
            self.window.x1 + box.x1 * sx,
            self.window.y1 + box.y1 * sy,
            self.window.x1 + box.x2 * sx,
            self.window.y1 + box.y2 * sy,
        )

    def to_tile(self, box: PixelBox) -> PixelBox:
        """A box in full-resolution raster pixels -> tile-image pixels (not clipped)."""
        sx, sy = self.pixel_scale
        return PixelBox(
            (box.x1 - self.window.x1) / sx,
            (box.y1 - self.window.y1) / sy,
            (box.x2 - self.window.x1) / sx,
            (box.y2 - self.window.y1) / sy,
        )


def _axis_tiles(start: int, length: int, tile_len: int, stride: int) -> list[tuple[int, int]]:
    """``(offset, length)`` pairs covering ``[start, start + length)`` on one axis (raster pixels)."""
    if length <= tile_len:
        return [(start, length)]
    n = math.ceil((length - tile_len) / stride) + 1
    offsets = [start + i * stride for i in range(n - 1)]
    offsets.append(start + length - tile_len)  # the last tile is shifted back inside the area
    return [(off, tile_len) for off in offsets]


def _snap_window(window: PixelBox, width: int, height: int) -> PixelBox:
    clipped = window.clip(width, height)
    if clipped is None:
        raise ExtentError(
            f"the window {window.as_tuple()} (raster pixels) lies outside the {width} x {height} raster; "
            "choose a window inside it"
        )
    x1 = math.floor(clipped.x1 + _SNAP_EPS_PX)
    y1 = math.floor(clipped.y1 + _SNAP_EPS_PX)
    x2 = max(x1 + 1, math.ceil(clipped.x2 - _SNAP_EPS_PX))
    y2 = max(y1 + 1, math.ceil(clipped.y2 - _SNAP_EPS_PX))
    return PixelBox(float(x1), float(y1), float(min(x2, width)), float(min(y2, height)))


def make_tile_grid(
    raster_transform: Affine,
    raster_width: int,
    raster_height: int,
    spec: TileGridSpec | None = None,
    window: PixelBox | None = None,
) -> list[Tile]:
    """Cut ``window`` (default: the whole raster) into tiles, in row-major order.

    Rules, per axis:

    * Windows are whole raster pixels. ``window`` is clipped to the raster and snapped outwards to
      whole pixels first. A full tile covers ``round(tile_size * scale)`` raster pixels and tiles start
      every ``tile_len - round(overlap * scale)`` raster pixels (at least 1), so neighbours overlap by
      ``overlap`` tile pixels (up to rounding when ``tile_size * scale`` is not whole).
    * **Edge rule:** the last tile on an axis is shifted back so that it ends exactly on the area's
      edge. Every tile is then full size and inside the area; the last tile simply overlaps its
      neighbour by more than ``overlap``.
    * **Small area:** when the area is shorter than one tile on an axis, there is one tile on that
      axis, shrunk to the area; its image side is ``round(area_len / (tile_len / tile_size))``
      (at least 1), so it keeps the grid's scale.

    The tile image is ``size`` pixels; its pixels map to raster pixels with the scale
    ``window / size`` (:attr:`Tile.pixel_scale`), which equals ``spec.scale`` up to the whole-pixel
    rounding above.
    """
    spec = TileGridSpec() if spec is None else spec
    _check_size("make_tile_grid", raster_width, raster_height)
    area = PixelBox(0.0, 0.0, float(raster_width), float(raster_height)) if window is None else window
    area = _snap_window(area, raster_width, raster_height)
    tile_len = max(1, round(spec.tile_size * spec.scale))
    stride = max(1, tile_len - round(spec.overlap * spec.scale))
    per_px = tile_len / spec.tile_size  # raster pixels per tile pixel, for full tiles
    x0, y0 = int(area.x1), int(area.y1)
    cols = _axis_tiles(x0, int(area.x2) - x0, tile_len, stride)
    rows = _axis_tiles(y0, int(area.y2) - y0, tile_len, stride)

    def image_len(length: int) -> int:
        return spec.tile_size if length >= tile_len else max(1, round(length / per_px))

    tiles: list[Tile] = []
    for r, (row_off, row_len) in enumerate(rows):
        for c, (col_off, col_len) in enumerate(cols):
            win = PixelBox.from_window(float(col_off), float(row_off), float(col_len), float(row_len))
            size = (image_len(col_len), image_len(row_len))
            to_raster = Affine(col_len / size[0], 0.0, float(col_off), 0.0, row_len / size[1], float(row_off))
            tiles.append(
                Tile(index=len(tiles), row=r, col=c, window=win, size=size, transform=raster_transform * to_raster)
            )
    return tiles
