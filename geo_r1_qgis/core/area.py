"""Pure geometry of an *area of interest* made of polygons: which tiles to ask, which boxes to keep.

The user may restrict a run to polygons (the selected features of a polygon layer). The polygons
arrive here already in **raster pixel coordinates** (pixel-edge convention, ``y`` down; the QGIS
adapter :func:`geo_r1_qgis.qgis_io.rasters.area_from_selection` reprojects and converts them), as
:class:`AreaPolygon` values: one exterior ring and its holes. A multipolygon is several
:class:`AreaPolygon` values. The area is the **union** of the polygons; a point inside a hole is
outside its polygon (it may still be inside another polygon of the area).

Two rules, both here and nowhere else:

* **Tiles.** A tile is asked when its window shares area with at least one polygon
  (:func:`polygon_intersects_box`): an exact polygon/rectangle test, not a bounding-box test, so a
  tile that only meets the polygon's bounding box (say, the empty corner of an L-shaped field) is
  not asked. Touching along an edge or at a point shares no area and does not count.
* **Boxes.** A detected box is kept when its **centre** lies inside the area, boundary included
  (:func:`box_in_area`). The centre rule is predictable (a box is in or out, whatever its size,
  and the same object is judged the same way whichever tile saw it), it keeps an object that
  crosses the boundary but lies mostly inside, and it drops the objects a tile saw beyond the
  boundary (tiles are rectangles and overlap their neighbours, so they always see some ground
  outside the polygons). "Any overlap" would keep those; "wholly inside" would lose every object
  the boundary cuts.

Imports the standard library only (no QGIS, GDAL or shapely): the plugin and the command line share it.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import ConfigError
from .geometry import PixelBox, Point, Ring, ring_signed_area

__all__ = [
    "AreaPolygon",
    "area_bounds",
    "area_digest",
    "box_in_area",
    "check_area",
    "point_in_area",
    "point_in_polygon",
    "polygon_intersects_box",
    "tiles_touching",
]


def _closed(ring: Sequence[Point], what: str) -> Ring:
    pts = []
    for p in ring:
        if len(p) != 2:
            raise ConfigError(f"{what}: points must be (x, y) pairs, got {p!r}")
        x, y = float(p[0]), float(p[1])
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ConfigError(f"{what}: coordinates must be finite, got {p!r}; check the polygon layer's geometries")
        pts.append((x, y))
    if pts and pts[0] != pts[-1]:
        pts.append(pts[0])
    if len(pts) < 4:
        raise ConfigError(f"{what} needs at least 3 distinct points, got {len(pts)} point(s); fix or drop that polygon")
    return tuple(pts)


@dataclass(frozen=True)
class AreaPolygon:
    """One polygon of an area, in raster pixel coordinates: an exterior ring and its holes.

    Rings may be given open or closed; they are stored closed. Orientation does not matter.
    An exterior with no area (all points on a line) is refused.
    """

    exterior: Ring
    holes: tuple[Ring, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "exterior", _closed(self.exterior, "an area polygon's exterior"))
        object.__setattr__(
            self, "holes", tuple(_closed(h, f"hole {i + 1} of an area polygon") for i, h in enumerate(self.holes))
        )
        if ring_signed_area(self.exterior) == 0.0:
            raise ConfigError(
                f"an area polygon has no area (its {len(self.exterior) - 1} points lie on a line, starting "
                f"{self.exterior[0]}); fix or drop that polygon"
            )

    @property
    def rings(self) -> tuple[Ring, ...]:
        return (self.exterior, *self.holes)

    @property
    def bounds(self) -> PixelBox:
        xs = [p[0] for p in self.exterior]
        ys = [p[1] for p in self.exterior]
        return PixelBox(min(xs), min(ys), max(xs), max(ys))  # an exterior with area spans both axes


def check_area(polygons: object) -> tuple[AreaPolygon, ...]:
    """``polygons`` as a non-empty tuple of :class:`AreaPolygon`; a clear error otherwise."""
    if not isinstance(polygons, (tuple, list)) or not polygons:
        raise ConfigError(
            f"area_polygons must be a non-empty tuple of AreaPolygon (raster pixels), got {polygons!r}; "
            "use None for no polygon area"
        )
    for p in polygons:
        if not isinstance(p, AreaPolygon):
            raise ConfigError(
                f"area_polygons holds {p!r}, not an AreaPolygon; build them with AreaPolygon(exterior, holes)"
            )
    return tuple(polygons)


def area_bounds(polygons: Iterable[AreaPolygon]) -> PixelBox:
    """The bounding box of every exterior ring (raster pixels)."""
    boxes = [p.bounds for p in polygons]
    out = boxes[0]
    for b in boxes[1:]:
        out = out.union(b)
    return out


# --------------------------------------------------------------------------------------------------
# Points
# --------------------------------------------------------------------------------------------------


def _on_segment(px: float, py: float, a: Point, b: Point) -> bool:
    (x0, y0), (x1, y1) = a, b
    cross = (x1 - x0) * (py - y0) - (y1 - y0) * (px - x0)
    scale = max(abs(x1 - x0), abs(y1 - y0), 1.0)
    if abs(cross) > 1e-9 * scale * scale:
        return False
    return min(x0, x1) - 1e-9 <= px <= max(x0, x1) + 1e-9 and min(y0, y1) - 1e-9 <= py <= max(y0, y1) + 1e-9


def _ring_position(point: Point, ring: Ring) -> int:
    """1 strictly inside, 0 on the boundary, -1 outside (even-odd ray casting along +x)."""
    px, py = point
    inside = False
    for a, b in itertools.pairwise(ring):
        if _on_segment(px, py, a, b):
            return 0
        (x0, y0), (x1, y1) = a, b
        if (y0 > py) != (y1 > py):
            x_cross = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
            if x_cross > px:
                inside = not inside
    return 1 if inside else -1


def point_in_polygon(point: Point, polygon: AreaPolygon) -> bool:
    """True when ``point`` is inside the polygon or on its boundary (a hole's edge counts as inside)."""
    if _ring_position(point, polygon.exterior) < 0:
        return False
    return all(_ring_position(point, hole) <= 0 for hole in polygon.holes)  # not strictly inside a hole


def point_in_area(point: Point, polygons: Iterable[AreaPolygon]) -> bool:
    """True when ``point`` lies in at least one polygon (boundary included)."""
    return any(point_in_polygon(point, p) for p in polygons)


def box_in_area(box: PixelBox, polygons: Iterable[AreaPolygon]) -> bool:
    """The box rule: keep a box when its centre lies in the area (see the module docstring)."""
    return point_in_area(box.center, polygons)


# --------------------------------------------------------------------------------------------------
# Rectangles
# --------------------------------------------------------------------------------------------------


def _segment_crosses_open_box(a: Point, b: Point, box: PixelBox) -> bool:
    """True when the segment ``a``-``b`` passes through the *open* interior of ``box``.

    Liang-Barsky clips the segment to the closed box; the clipped piece enters the open interior
    exactly when its midpoint does (a chord of a convex polygon that is not part of one side runs
    through the interior).
    """
    (x0, y0), (x1, y1) = a, b
    dx, dy = x1 - x0, y1 - y0
    t0, t1 = 0.0, 1.0
    for p, q in ((-dx, x0 - box.x1), (dx, box.x2 - x0), (-dy, y0 - box.y1), (dy, box.y2 - y0)):
        if p == 0.0:
            if q < 0.0:
                return False
            continue
        t = q / p
        if p < 0.0:
            t0 = max(t0, t)
        else:
            t1 = min(t1, t)
        if t0 > t1:
            return False
    tm = (t0 + t1) / 2.0
    mx, my = x0 + tm * dx, y0 + tm * dy
    return box.x1 < mx < box.x2 and box.y1 < my < box.y2


def polygon_intersects_box(polygon: AreaPolygon, box: PixelBox) -> bool:
    """True when the polygon and the box share area (touching along an edge or at a point does not count).

    If a ring (exterior or hole) runs through the box's open interior, the polygon's interior lies
    on one side of that ring, inside the box: they share area. Otherwise the open box is wholly
    inside or wholly outside the polygon, and its centre decides.
    """
    bounds = polygon.bounds
    if bounds.intersection(box) is None:
        return False
    for ring in polygon.rings:
        for a, b in itertools.pairwise(ring):
            if _segment_crosses_open_box(a, b, box):
                return True
    return point_in_polygon(box.center, polygon)


def tiles_touching(items: Sequence, polygons: Sequence[AreaPolygon], window=lambda item: item.window) -> list:
    """The items (tiles, or ``(id, tile)`` pairs with ``window=``) whose window shares area with a polygon."""
    return [it for it in items if any(polygon_intersects_box(p, window(it)) for p in polygons)]


def area_digest(polygons: Sequence[AreaPolygon]) -> str:
    """A short, stable fingerprint of an area (for a run's parameters, so a resume needs the same area)."""
    h = hashlib.sha256()
    for p in polygons:
        for ring in p.rings:
            h.update(repr(ring).encode())
            h.update(b";")
        h.update(b"|")
    return h.hexdigest()[:16]
