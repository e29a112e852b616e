"""Masks to outline polygons, pure numpy: traced along pixel edges, simplified, placed by an affine.

A SAM mask (GRES, or "refine to outline") is a boolean (height, width) array in tile pixels. This module turns
it into polygons the GeoPackage can hold, in three steps, each a pure function:

1. :func:`trace_mask`: every 4-connected component of the mask becomes a polygon whose exterior and holes run
   along pixel edges (vertices on integer pixel corners, ``(0, 0)`` the top-left corner of the top-left pixel).
   Where two pixels of the mask meet only at a corner, the tracer turns toward the mask, so they are two
   polygons touching at a point; rings never cross or revisit a vertex, so every traced polygon is valid
   (OGC simple features: the rule GDAL's and GEOS's ``IsValid`` check). In pixel coordinates exteriors have a
   positive shoelace area (:func:`~geo_r1_qgis.core.geometry.ring_signed_area`) and holes a negative one.
2. :func:`simplify_polygons`: collinear vertices are dropped (lossless), then each ring is simplified by
   Douglas–Peucker at ``tolerance`` pixels. A simplification that would make a polygon invalid (a ring that
   crosses or touches itself, another ring of it, or a neighbouring polygon; a ring collapsed below a
   triangle) is not kept: that polygon stays as traced (lossless), so the result is valid whatever the tolerance.
   The tolerance is in tile pixels, that is in units of the tile's ground resolution: ``tolerance=1`` allows a
   vertex to move by one ground pixel (the staircase of a traced diagonal is within 0.71 px of the diagonal).
3. :func:`polygon_to_map`: vertices through an affine (:class:`~geo_r1_qgis.core.geometry.Affine`: tile to
   raster to map, rotated rasters included); rings are re-ordered so that exteriors stay counter-clockwise on
   the map and holes clockwise (as :func:`~geo_r1_qgis.core.geometry.box_to_polygon`).

:func:`mask_to_polygons` chains 1 and 2; :func:`multipolygon_to_wkb` writes the result as WKB for a GeoPackage.

Where this runs: the engine traces (it has the masks; polygons are a few hundred bytes where a 504² mask is
31 kB as bits) and sends polygons in tile pixels; the CLI and the plugin place them with the tile's affine, as
they place boxes. The plugin ships this module too (numpy only) and never needs a mask.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from geo_r1_qgis.core.errors import ConfigError
from geo_r1_qgis.core.geometry import Affine, ring_signed_area

__all__ = [
    "DEFAULT_TOLERANCE_PX",
    "Polygon",
    "mask_to_polygons",
    "multipolygon_to_wkb",
    "polygon_area",
    "polygon_to_map",
    "polygons_bounds",
    "ring_area",
    "simplify_polygons",
    "trace_mask",
    "union_outlines",
]

#: A polygon: closed rings ``((x, y), …, first point again)``, the exterior first, then its holes; a ring is an
#: (n, 2) float array (what the tracer and the placing return) or a sequence of points (JSON, literals in tests)
Polygon = tuple[np.ndarray | Sequence[tuple[float, float]], ...]

#: The default simplification: one tile pixel, i.e. one ground-resolution step of the tile.
DEFAULT_TOLERANCE_PX = 1.0
#: Polygons with more traced vertices than this are not simplified (proving the result valid costs n²).
MAX_CHECKED_VERTICES = 2000

# Edge directions, (dx, dy), with the mask on the math-left (-dy, dx): see _edges.
_DIRS = np.array([(1, 0), (0, 1), (-1, 0), (0, -1)], dtype=np.int64)


def _check_mask(mask: Any) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ConfigError(f"a mask must be a 2-D (height, width) array, got shape {arr.shape}")
    if arr.dtype != bool:
        if not np.issubdtype(arr.dtype, np.integer):
            raise ConfigError(f"a mask must be boolean (or 0/1 integers), got {arr.dtype}")
        arr = arr != 0
    return arr


def _edges(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The mask's boundary edges as (start vertex, end vertex, direction index), vertices numbered
    ``y * (width + 1) + x`` on the pixel-corner grid; the mask lies on each edge's math-left."""
    h, w = mask.shape
    p = np.zeros((h + 2, w + 2), dtype=bool)
    p[1:-1, 1:-1] = mask
    inside = p[1:-1, 1:-1]
    stride = w + 1
    starts, ends, dirs = [], [], []

    def add(sel: np.ndarray, x0: np.ndarray, y0: np.ndarray, d: int) -> None:
        dx, dy = _DIRS[d]
        starts.append(y0 * stride + x0)
        ends.append((y0 + dy) * stride + (x0 + dx))
        dirs.append(np.full(len(x0), d, dtype=np.int64))

    ys, xs = np.nonzero(inside & ~p[:-2, 1:-1])  # top edge: (x, y) -> (x+1, y)
    add(inside, xs, ys, 0)
    ys, xs = np.nonzero(inside & ~p[1:-1, 2:])  # right edge: (x+1, y) -> (x+1, y+1)
    add(inside, xs + 1, ys, 1)
    ys, xs = np.nonzero(inside & ~p[2:, 1:-1])  # bottom edge: (x+1, y+1) -> (x, y+1)
    add(inside, xs + 1, ys + 1, 2)
    ys, xs = np.nonzero(inside & ~p[1:-1, :-2])  # left edge: (x, y+1) -> (x, y)
    add(inside, xs, ys + 1, 3)
    return np.concatenate(starts), np.concatenate(ends), np.concatenate(dirs), stride


def _rings(mask: np.ndarray) -> list[np.ndarray]:
    """Closed rings of pixel-corner vertices ((n+1, 2) int arrays, first point repeated last)."""
    if not mask.any():
        return []
    start, end, direction, stride = _edges(mask)
    order = np.argsort(start, kind="stable")
    sorted_start = start[order]
    first = np.searchsorted(sorted_start, end, side="left")
    count = np.searchsorted(sorted_start, end, side="right") - first
    nxt = order[np.minimum(first, len(order) - 1)]
    saddle = np.nonzero(count == 2)[0]
    if len(saddle):  # two ways on: turn left, toward the mask (4-connected components, no revisited vertex)
        a, b = order[first[saddle]], order[first[saddle] + 1]
        left = (direction[saddle] + 1) % 4  # a left turn (math sense, see _DIRS)
        nxt[saddle] = np.where(direction[a] == left, a, b)
    seen = np.zeros(len(start), dtype=bool)
    rings = []
    for e0 in range(len(start)):
        if seen[e0]:
            continue
        chain = []
        e = e0
        while not seen[e]:
            seen[e] = True
            chain.append(e)
            e = int(nxt[e])
        verts = start[np.array([*chain, chain[0]])]
        rings.append(np.stack([verts % stride, verts // stride], axis=1))
    return rings


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """The ring without the vertices where it goes straight on (closed, first point repeated last)."""
    pts = ring[:-1]
    prev = np.roll(pts, 1, axis=0)
    nxt = np.roll(pts, -1, axis=0)
    cross = (pts[:, 0] - prev[:, 0]) * (nxt[:, 1] - pts[:, 1]) - (pts[:, 1] - prev[:, 1]) * (nxt[:, 0] - pts[:, 0])
    kept = pts[cross != 0]
    return np.vstack([kept, kept[:1]])


def _split_loops(ring: np.ndarray) -> list[np.ndarray]:
    """A closed ring that passes a vertex more than once, cut there into loops that do not (each closed)."""
    pts = ring[:-1]
    keys = pts[:, 0] * (1 << 32) + pts[:, 1]
    if len(np.unique(keys)) == len(keys):
        return [ring]
    loops: list[np.ndarray] = []
    stack: list[int] = []
    where: dict[Any, int] = {}
    for k, key in enumerate(keys.tolist()):
        if key in where:
            i = where[key]
            loop = stack[i:]
            for gone in loop[1:]:
                del where[int(keys[gone])]
            del stack[i + 1 :]
            loops.append(pts[np.array([*loop, loop[0]])])
        else:
            where[key] = len(stack)
            stack.append(k)
    if len(stack) > 2:
        loops.append(pts[np.array([*stack, stack[0]])])
    return loops


def _points_in_ring(px: np.ndarray, py: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """Even-odd test of many points against one ring (points never on it: pixel centres against pixel edges)."""
    xs, ys = ring[:-1, 0][None, :], ring[:-1, 1][None, :]
    xe, ye = ring[1:, 0][None, :], ring[1:, 1][None, :]
    y = py[:, None]
    crosses = (ys > y) != (ye > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        xi = xs + (y - ys) * (xe - xs) / (ye - ys)
    return (np.count_nonzero(crosses & (px[:, None] < xi), axis=1) % 2) == 1


def trace_mask(mask: Any) -> list[Polygon]:
    """The mask's 4-connected components as polygons along pixel edges (see the module docstring), largest first.

    A ring that would pass a corner twice (a component that closes around a background pixel touching the
    outside only at that corner) is cut there: the exterior, and a hole touching it at that point, as OGC wants.
    """
    arr = _check_mask(mask)
    rings = [_drop_collinear(loop) for r in _rings(arr) for loop in _split_loops(r)]
    signed = [ring_signed_area(r.tolist()) for r in rings]
    exteriors = [r for r, a in zip(rings, signed, strict=True) if a > 0]
    holes = [r for r, a in zip(rings, signed, strict=True) if a < 0]
    owners: list[list[np.ndarray]] = [[] for _ in exteriors]
    if holes:
        # each hole's test point: the centre of the background pixel on the right of its first edge
        first = np.array([h[0] for h in holes], dtype=float)
        second = np.array([h[1] for h in holes], dtype=float)
        d = np.sign(second - first)
        px = (first[:, 0] + second[:, 0]) / 2 + 0.5 * d[:, 1]
        py = (first[:, 1] + second[:, 1]) / 2 - 0.5 * d[:, 0]
        free = np.ones(len(holes), dtype=bool)
        areas = np.array([ring_signed_area(r.tolist()) for r in exteriors])
        for k in np.argsort(areas):  # smallest exterior first: a hole belongs to the innermost one around it
            ext = exteriors[k]
            cand = (
                free & (px > ext[:, 0].min()) & (px < ext[:, 0].max()) & (py > ext[:, 1].min()) & (py < ext[:, 1].max())
            )
            idx = np.nonzero(cand)[0]
            if not len(idx):
                continue
            inside = idx[_points_in_ring(px[idx], py[idx], ext)]
            for i in inside.tolist():
                owners[k].append(holes[i])
            free[inside] = False
            if not free.any():
                break
    polys: list[Polygon] = [tuple(_as_ring(r) for r in [ext, *own]) for ext, own in zip(exteriors, owners, strict=True)]
    polys.sort(key=lambda p: -polygon_area(p))
    return polys


def _as_ring(arr: np.ndarray) -> tuple[tuple[float, float], ...]:
    return tuple((float(x), float(y)) for x, y in arr.tolist())


def ring_area(ring: Any) -> float:
    """Signed shoelace area of a closed ring (a sequence of points or an (n, 2) array; first point repeated last),
    as :func:`~geo_r1_qgis.core.geometry.ring_signed_area` (relative to the first point), vectorised."""
    a = np.asarray(ring, dtype=float)
    if a.ndim != 2 or len(a) < 3:
        return 0.0
    x, y = a[:, 0] - a[0, 0], a[:, 1] - a[0, 1]
    return float(0.5 * np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def polygon_area(polygon: Polygon) -> float:
    """The area of a polygon (exterior less holes), whatever the rings' orientation."""
    if len(polygon) == 0:
        return 0.0
    return abs(ring_area(polygon[0])) - sum(abs(ring_area(h)) for h in polygon[1:])


def _douglas_peucker(pts: np.ndarray, tol: float) -> np.ndarray:
    """Douglas–Peucker of an open polyline (its ends kept)."""
    keep = np.zeros(len(pts), dtype=bool)
    keep[0] = keep[-1] = True
    stack = [(0, len(pts) - 1)]
    while stack:
        i, j = stack.pop()
        if j - i < 2:
            continue
        a, b = pts[i], pts[j]
        seg = pts[i + 1 : j]
        d = b - a
        norm = math.hypot(d[0], d[1])
        if norm == 0:
            dist = np.hypot(seg[:, 0] - a[0], seg[:, 1] - a[1])
        else:
            dist = np.abs(d[0] * (seg[:, 1] - a[1]) - d[1] * (seg[:, 0] - a[0])) / norm
        k = int(np.argmax(dist))
        if dist[k] > tol:
            keep[i + 1 + k] = True
            stack.append((i, i + 1 + k))
            stack.append((i + 1 + k, j))
    return pts[keep]


def _simplify_ring(ring: np.ndarray, tol: float) -> np.ndarray:
    pts = ring[:-1].astype(float)
    if len(pts) <= 4:
        return ring.astype(float)
    far = int(np.argmax(np.hypot(pts[:, 0] - pts[0, 0], pts[:, 1] - pts[0, 1])))
    loop = np.vstack([pts, pts[:1]])
    left = _douglas_peucker(loop[: far + 1], tol)
    right = _douglas_peucker(loop[far:], tol)
    return np.vstack([left, right[1:]])


def _segments(rings: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All segments (n, 4) with their ring index and position in the ring."""
    segs, ring_id, pos = [], [], []
    for k, r in enumerate(rings):
        segs.append(np.hstack([r[:-1], r[1:]]))
        ring_id.append(np.full(len(r) - 1, k))
        pos.append(np.arange(len(r) - 1))
    return np.vstack(segs).astype(float), np.concatenate(ring_id), np.concatenate(pos)


def _orient(ax: Any, ay: Any, bx: Any, by: Any, cx: Any, cy: Any) -> Any:
    return np.sign((bx - ax) * (cy - ay) - (by - ay) * (cx - ax))


def _any_contact(s: np.ndarray, t: np.ndarray, same: np.ndarray | None = None) -> bool:
    """Whether any segment of ``s`` meets (crosses or touches) any of ``t``; ``same`` masks out pairs."""
    for lo in range(0, len(s), 512):
        a = s[lo : lo + 512, None, :]
        b = t[None, :, :]
        o1 = _orient(a[..., 0], a[..., 1], a[..., 2], a[..., 3], b[..., 0], b[..., 1])
        o2 = _orient(a[..., 0], a[..., 1], a[..., 2], a[..., 3], b[..., 2], b[..., 3])
        o3 = _orient(b[..., 0], b[..., 1], b[..., 2], b[..., 3], a[..., 0], a[..., 1])
        o4 = _orient(b[..., 0], b[..., 1], b[..., 2], b[..., 3], a[..., 2], a[..., 3])
        proper = (o1 * o2 <= 0) & (o3 * o4 <= 0)
        # collinear pairs: they meet only if their extents overlap
        colin = (o1 == 0) & (o2 == 0)
        overlap_x = np.minimum(np.maximum(a[..., 0], a[..., 2]), np.maximum(b[..., 0], b[..., 2])) >= np.maximum(
            np.minimum(a[..., 0], a[..., 2]), np.minimum(b[..., 0], b[..., 2])
        )
        overlap_y = np.minimum(np.maximum(a[..., 1], a[..., 3]), np.maximum(b[..., 1], b[..., 3])) >= np.maximum(
            np.minimum(a[..., 1], a[..., 3]), np.minimum(b[..., 1], b[..., 3])
        )
        hit = np.where(colin, overlap_x & overlap_y, proper)
        if same is not None:
            hit &= ~same[lo : lo + 512]
        if hit.any():
            return True
    return False


def _near(segs: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The segments whose bounding boxes meet ``box`` (x1, y1, x2, y2)."""
    lo_x, hi_x = np.minimum(segs[:, 0], segs[:, 2]), np.maximum(segs[:, 0], segs[:, 2])
    lo_y, hi_y = np.minimum(segs[:, 1], segs[:, 3]), np.maximum(segs[:, 1], segs[:, 3])
    return segs[(hi_x >= box[0]) & (lo_x <= box[2]) & (hi_y >= box[1]) & (lo_y <= box[3])]


def _polygons_meet(sp: np.ndarray, sq: np.ndarray) -> bool:
    """Whether two polygons' outlines (their segments) meet; only the segments within the other's bounds are tested."""
    bp = np.array([sp[:, [0, 2]].min(), sp[:, [1, 3]].min(), sp[:, [0, 2]].max(), sp[:, [1, 3]].max()])
    bq = np.array([sq[:, [0, 2]].min(), sq[:, [1, 3]].min(), sq[:, [0, 2]].max(), sq[:, [1, 3]].max()])
    sp, sq = _near(sp, bq), _near(sq, bp)
    return bool(len(sp) and len(sq)) and _any_contact(sp, sq)


def _valid_simplification(rings: Sequence[np.ndarray]) -> bool:
    """Every ring at least a triangle with its traced orientation, and no two non-adjacent segments meet."""
    if any(len(r) < 4 for r in rings):
        return False
    s, rid, pos = _segments(rings)
    n = np.array([len(r) - 1 for r in rings])[rid]
    same_ring = rid[:, None] == rid[None, :]
    d = np.abs(pos[:, None] - pos[None, :])
    adjacent = same_ring & ((d <= 1) | (d == n[:, None] - 1))
    return not _any_contact(s, s, adjacent)


def simplify_polygons(polygons: Sequence[Polygon], tolerance: float = DEFAULT_TOLERANCE_PX) -> list[Polygon]:
    """Each polygon's rings by Douglas–Peucker at ``tolerance`` pixels, kept only where the result stays valid
    (on its own and against the other polygons it comes near); else the polygon as given. ``tolerance=0``
    returns the polygons unchanged."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance):
        raise ConfigError(f"the outline tolerance must be a finite number of pixels >= 0, got {tolerance!r}")
    if tolerance < 0:
        raise ConfigError(f"the outline tolerance must be >= 0 pixels, got {tolerance!r}; 1 is one ground pixel")
    if tolerance == 0 or not polygons:
        return list(polygons)
    originals = [[np.asarray(r, dtype=float) for r in p] for p in polygons]
    simple = []
    for rings in originals:
        if sum(len(r) for r in rings) > MAX_CHECKED_VERTICES:
            simple.append(rings)  # too many vertices to prove a simplification valid quickly: kept as traced
            continue
        cand = [_simplify_ring(r, tolerance) for r in rings]
        ok = _valid_simplification(cand) and all(
            np.sign(ring_signed_area(c.tolist())) == np.sign(ring_signed_area(r.tolist()))
            for c, r in zip(cand, rings, strict=True)
        )
        simple.append(cand if ok else rings)
    # neighbours: simplified outlines of two polygons must not meet (their traced ones touch at most at points)
    bounds = np.array([[p[0][:, 0].min(), p[0][:, 1].min(), p[0][:, 0].max(), p[0][:, 1].max()] for p in simple])
    changed = np.array([simple[i] is not originals[i] for i in range(len(simple))])
    b = bounds
    near = (b[:, None, 0] <= b[None, :, 2]) & (b[None, :, 0] <= b[:, None, 2])
    near &= (b[:, None, 1] <= b[None, :, 3]) & (b[None, :, 1] <= b[:, None, 3])
    pairs = np.nonzero(np.triu(near, 1))
    segs: dict[int, np.ndarray] = {}

    def outline(k: int) -> np.ndarray:
        if k not in segs:
            segs[k] = _segments(simple[k])[0]
        return segs[k]

    reverted = True
    while reverted:  # a polygon put back as traced is checked again against its simplified neighbours
        reverted = False
        for i, j in zip(*pairs, strict=True):
            if (changed[i] or changed[j]) and _polygons_meet(outline(i), outline(j)):
                for k in (i, j):
                    if changed[k]:
                        simple[k] = originals[k]
                        segs.pop(k, None)
                        changed[k] = False
                reverted = True
    return [tuple(_as_ring(r) for r in p) for p in simple]


def mask_to_polygons(mask: Any, tolerance: float = DEFAULT_TOLERANCE_PX, min_area: float = 0.0) -> list[Polygon]:
    """:func:`trace_mask`, components smaller than ``min_area`` pixels dropped, then :func:`simplify_polygons`."""
    if isinstance(min_area, bool) or not isinstance(min_area, (int, float)) or not min_area >= 0:
        raise ConfigError(f"the outline's min_area must be a number of pixels >= 0, got {min_area!r}")
    polys = [p for p in trace_mask(mask) if polygon_area(p) >= min_area]
    return simplify_polygons(polys, tolerance)


def polygon_to_map(polygon: Polygon, transform: Affine) -> tuple[np.ndarray, ...]:
    """A polygon in pixels through ``transform``: exterior counter-clockwise on the map, holes clockwise.

    The rings come back as (n, 2) float64 arrays: a run holds every object's outline until it ends, and an array
    takes 16 bytes a vertex where a tuple of two floats takes 104 (BENCHMARKS.md, "Outlines")."""
    out = []
    for k, ring in enumerate(polygon):
        a = np.asarray(ring, dtype=float)
        pts = np.column_stack(
            [transform.a * a[:, 0] + transform.b * a[:, 1] + transform.c,
             transform.d * a[:, 0] + transform.e * a[:, 1] + transform.f]
        )  # fmt: skip
        if (ring_area(pts) > 0) != (k == 0):
            pts = pts[::-1].copy()
        out.append(pts)
    return tuple(out)


def union_outlines(pieces: Sequence[Sequence[Polygon]], box: Any, step: float = 1.0) -> tuple[Polygon, ...]:
    """One outline from the outlines of an object's pieces in several tiles (raster pixels): drawn on a grid of
    ``step`` raster pixels (the tiles' pixel size) over ``box`` (a PixelBox holding them all; pixel centres by
    the even-odd rule, :func:`~geo_r1_qgis.core.rules.gres_truth.rasterize`), OR-ed, traced and simplified again
    at :data:`DEFAULT_TOLERANCE_PX` grid pixels. The union is exact up to that grid."""
    from geo_r1_qgis.core.rules.gres_truth import rasterize

    if not step > 0:
        raise ConfigError(f"the outline grid step must be > 0 raster pixels, got {step!r}")
    ox, oy = math.floor(box.x1), math.floor(box.y1)
    width = math.ceil((box.x2 - ox) / step) + 1
    height = math.ceil((box.y2 - oy) / step) + 1
    to_grid = Affine(1.0 / step, 0.0, -ox / step, 0.0, 1.0 / step, -oy / step)
    mask = np.zeros((height, width), dtype=bool)
    for piece in pieces:
        for poly in piece:
            grid_poly = polygon_to_map(poly, to_grid)
            mask |= rasterize([[list(map(list, ring)) for ring in grid_poly]], (width, height))
    back = Affine(step, 0.0, float(ox), 0.0, step, float(oy))
    return tuple(polygon_to_map(p, back) for p in mask_to_polygons(mask, DEFAULT_TOLERANCE_PX))


def polygons_bounds(polygons: Sequence[Polygon]) -> tuple[float, float, float, float]:
    """(min x, min y, max x, max y) of the polygons' exteriors."""
    if not polygons:
        raise ConfigError("no polygon to bound")
    ext = np.vstack([np.asarray(p[0], dtype=float) for p in polygons])
    return (float(ext[:, 0].min()), float(ext[:, 1].min()), float(ext[:, 0].max()), float(ext[:, 1].max()))


_WKB_MULTIPOLYGON = 6


def multipolygon_to_wkb(polygons: Sequence[Polygon]) -> bytes:
    """ISO WKB (little-endian) of a MultiPolygon of these polygons (closed rings, exterior first)."""
    parts = [struct.pack("<BII", 1, _WKB_MULTIPOLYGON, len(polygons))]
    for poly in polygons:
        parts.append(struct.pack("<BII", 1, 3, len(poly)))
        for ring in poly:
            if len(ring) < 4 or tuple(map(float, ring[0])) != tuple(map(float, ring[-1])):
                raise ConfigError(f"an outline ring must be closed with at least 4 points, got {len(ring)} points")
            parts.append(struct.pack("<I", len(ring)))
            parts.append(np.asarray(ring, dtype="<f8").tobytes())
    return b"".join(parts)
