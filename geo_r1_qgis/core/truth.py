"""Detections on the map checked against the truth: polygon against polygon, in the raster's CRS.

The sample rasters come with ``*.objects.geojson`` truth files (``geo-r1 sample-data``). This module reads
them, reads a run's result polygons from the results GeoPackage (through :mod:`.gpkg_schema`), and matches
the two one to one by the IoU of the polygons on the map, strictly above a threshold (0.5 by default, as
Geo-R1's ``>`` in its evaluation). Boxes on the map are convex (axis-aligned or, on a rotated raster,
rotated rectangles), so the intersection is a convex clip. Pure: the standard library only.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .errors import ConfigError
from .geometry import Point, Ring, ring_signed_area
from .gpkg_schema import connect, ident

__all__ = [
    "Match",
    "TruthObject",
    "convex_polygon_iou",
    "greedy_match",
    "match_objects",
    "read_result_rings",
    "read_truth",
]

T = TypeVar("T")


@dataclass(frozen=True)
class TruthObject:
    """One true object of a truth file: its id, category and exterior ring in the file's CRS."""

    id: str
    category: str
    ring: Ring


@dataclass(frozen=True)
class Match:
    """A one-to-one matching: ``pairs`` are ``(prediction index, truth index, IoU)``."""

    pairs: tuple[tuple[int, int, float], ...]
    n_predicted: int
    n_truth: int

    @property
    def found(self) -> int:
        return len(self.pairs)

    @property
    def recall(self) -> float:
        return self.found / self.n_truth if self.n_truth else 0.0

    @property
    def precision(self) -> float:
        return self.found / self.n_predicted if self.n_predicted else 0.0

    def matched_truth(self) -> frozenset[int]:
        return frozenset(t for _, t, _ in self.pairs)


def _open(ring: Sequence[Point]) -> list[Point]:
    pts = [(float(x), float(y)) for x, y in ring]
    if len(pts) > 1 and pts[0] == pts[-1]:
        pts.pop()
    if ring_signed_area(pts + pts[:1]) < 0:
        pts.reverse()
    return pts


def _clip(subject: list[Point], clipper: list[Point]) -> list[Point]:
    """Sutherland–Hodgman: ``subject`` clipped by the convex, counter-clockwise ``clipper``."""
    out = subject
    for i, (ax, ay) in enumerate(clipper):
        bx, by = clipper[(i + 1) % len(clipper)]
        if not out:
            break
        inp, out = out, []

        def inside(p: Point, ax: float = ax, ay: float = ay, bx: float = bx, by: float = by) -> bool:
            return (bx - ax) * (p[1] - ay) - (by - ay) * (p[0] - ax) >= 0

        def cut(p: Point, q: Point, ax: float = ax, ay: float = ay, bx: float = bx, by: float = by) -> Point:
            dx, dy = q[0] - p[0], q[1] - p[1]
            den = (bx - ax) * dy - (by - ay) * dx
            t = ((bx - ax) * (ay - p[1]) - (by - ay) * (ax - p[0])) / den if den else 0.0
            return (p[0] + t * dx, p[1] + t * dy)

        for j, cur in enumerate(inp):
            prev = inp[j - 1]
            if inside(cur):
                if not inside(prev):
                    out.append(cut(prev, cur))
                out.append(cur)
            elif inside(prev):
                out.append(cut(prev, cur))
    return out


def _area(pts: list[Point]) -> float:
    return abs(ring_signed_area(pts + pts[:1])) if len(pts) >= 3 else 0.0


def convex_polygon_iou(a: Sequence[Point], b: Sequence[Point]) -> float:
    """The IoU of two convex polygons on the map (continuous areas; rings closed or open, either winding)."""
    pa, pb = _open(a), _open(b)
    area_a, area_b = _area(pa), _area(pb)
    if area_a <= 0 or area_b <= 0:
        return 0.0
    inter = _area(_clip(pa, pb))
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def greedy_match(predicted: Sequence[T], truth: Sequence[T], iou: Callable[[T, T], float],
                 threshold: float = 0.5) -> Match:  # fmt: skip
    """Greedy one-to-one matching by ``iou``, highest first (ties: lower indices first); a pair counts when its
    IoU is strictly above ``threshold``. The one matcher of the project's counts on the map and on chips."""
    candidates = sorted(
        ((iou(p, t), i, j) for i, p in enumerate(predicted) for j, t in enumerate(truth)),
        key=lambda c: (-c[0], c[1], c[2]),
    )
    used_p: set[int] = set()
    used_t: set[int] = set()
    pairs = []
    for value, i, j in candidates:
        if value <= threshold:
            break
        if i in used_p or j in used_t:
            continue
        used_p.add(i)
        used_t.add(j)
        pairs.append((i, j, value))
    return Match(tuple(sorted(pairs)), len(predicted), len(truth))


def match_objects(predicted: Sequence[Sequence[Point]], truth: Sequence[Sequence[Point]],
                  threshold: float = 0.5) -> Match:  # fmt: skip
    """Polygons on the map matched one to one (:func:`greedy_match` by :func:`convex_polygon_iou`)."""
    return greedy_match(predicted, truth, convex_polygon_iou, threshold)


def read_truth(path: str | Path, category: str | None = None) -> list[TruthObject]:
    """The objects of a ``*.objects.geojson`` truth file (of one ``category`` when given)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        out: list[TruthObject] = []
        for f in data["features"]:
            props = f.get("properties") or {}
            if category is not None and props.get("category") != category:
                continue
            ring = tuple((float(x), float(y)) for x, y in f["geometry"]["coordinates"][0])
            out.append(TruthObject(str(props.get("id", f.get("id", len(out)))), str(props.get("category")), ring))
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise ConfigError(f"{path} is not a truth file of polygons (as geo-r1 sample-data writes): {exc}") from None
    return out


def _ring_from_gpkg_blob(blob: bytes) -> Ring:
    """The exterior ring of a GeoPackage geometry blob holding a 2-D Polygon (header, then WKB)."""
    if blob[:2] != b"GP":
        raise ConfigError("not a GeoPackage geometry blob")
    flags = blob[3]
    envelope = {0: 0, 1: 32, 2: 48, 3: 48, 4: 64}.get((flags >> 1) & 0x07, 0)
    wkb = blob[8 + envelope :]
    order = "<" if wkb[0] == 1 else ">"
    (kind,) = struct.unpack_from(order + "I", wkb, 1)
    if kind % 1000 != 3:
        raise ConfigError(f"geometry type {kind} is not a polygon")
    (n,) = struct.unpack_from(order + "I", wkb, 9)
    vals = struct.unpack_from(f"{order}{2 * n}d", wkb, 13)
    return tuple((vals[2 * i], vals[2 * i + 1]) for i in range(n))


def read_result_rings(path: str | Path, layer: str) -> list[Ring]:
    """The exterior rings of a results layer's polygons, in file order."""
    with connect(path) as con:
        row = con.execute("SELECT column_name FROM gpkg_geometry_columns WHERE table_name = ?", (layer,)).fetchone()
        if row is None:
            raise ConfigError(f"{path} has no layer {layer!r} with geometries")
        blobs = con.execute(f"SELECT {ident(row[0])} FROM {ident(layer)} ORDER BY fid").fetchall()  # nosec B608
    return [_ring_from_gpkg_blob(b[0]) for b in blobs if b[0]]
