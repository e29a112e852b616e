"""Fuse the detections of overlapping tiles into one answer per object. Pure Python.

Why
---
Tiles overlap (see :func:`~geo_r1_qgis.core.geometry.make_tile_grid`), so an object in an overlap
strip is found by up to four tiles, and an object under a tile edge is seen cut in one tile and
whole in its neighbour. :func:`merge_detections` turns all of them into one detection per object.

The merge rule
--------------
All boxes are in full-resolution **raster** pixels.

1. **Grouping.** Two detections belong to the same object when

   * their IoU is ``>= iou_threshold`` (default 0.5: duplicates from overlapping tiles), or
   * the intersection covers ``>= containment_threshold`` of the *smaller* box (default 0.7: a
     piece cut by a tile edge lies inside the whole box seen by the neighbouring tile), or
   * both are *truncated* (they touch an inner tile edge, see :func:`flag_truncated`), they
     intersect or lie within ``gap_tol_px`` of each other (pieces of an object cut by tiles with
     no overlap only touch), and their extents agree on one axis (1-D IoU of the x or of the y
     intervals ``>= iou_threshold``): two pieces of an object larger than the overlap, cut across
     the other axis.

   Groups are closed transitively (union-find): if A pairs with B and B with C, A, B and C are one
   object even when A and C do not overlap.

2. **One detection per group.** If the group has a member that is *not* truncated, the
   highest-scoring such member is kept with its box, label, reasoning and tile, and the group's
   maximum ``score`` and ``presence``. So a box cut by a tile edge is dropped in favour of the
   whole box from the neighbouring tile: the object is kept once.
   If *every* member is truncated (the object is larger than the overlap, so no tile sees it
   whole), the output box is the **union** of the members' boxes, with the group's maximum score
   and presence, the best member's label and reasoning, the member tiles' ids joined with ``+``,
   and ``truncated=True`` to say that the box was assembled from pieces.

3. Output is sorted by descending score (ties: top-to-bottom, left-to-right), so it is
   deterministic whatever the input order.

Labels are not compared: a query asks for one kind of object, so differently worded labels of the
same box are duplicates too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from .errors import ConfigError
from .geometry import PixelBox, Tile
from .outline import union_outlines

__all__ = [
    "MODES",
    "Detection",
    "flag_truncated",
    "merge_detections",
    "refinement_windows",
    "select_mode",
]

#: The answer modes: the single best object, or every object.
MODES = ("one", "all")


def _check_unit(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be in [0, 1], got {value!r}; scores are probabilities")


@dataclass(frozen=True)
class Detection:
    """One detected object: a box in full-resolution raster pixels, with its scores and provenance.

    ``score`` is the confidence of this box, ``presence`` the model's confidence that the
    referred object is in the tile at all. ``truncated`` is True when the box touches an inner
    tile edge (the object probably continues in the next tile).
    """

    box: PixelBox
    score: float = 1.0
    presence: float = 1.0
    label: str = ""
    reasoning: str = ""
    tile_id: str = ""
    truncated: bool = False
    #: the object's outline (SAM), polygons of (n, 2) ring arrays in full-resolution raster pixels
    #: (core/outline.py); () when none; not part of the detection's equality
    outline: tuple = field(default=(), compare=False)
    #: the size of one pixel of the tile it was traced in, in raster pixels (for merging pieces across tiles)
    outline_step: float = field(default=1.0, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.box, PixelBox):
            raise ConfigError(f"Detection.box must be a PixelBox (raster pixels), got {self.box!r}")
        _check_unit("Detection.score", self.score)
        _check_unit("Detection.presence", self.presence)


def flag_truncated(
    box_in_tile: PixelBox,
    tile: Tile,
    raster_w: int,
    raster_h: int,
    tol_px: float = 2.0,
    area: PixelBox | None = None,
) -> bool:
    """True when a box (in tile-image pixels) touches an edge of the tile that is not the area's edge.

    ``area`` is the processed window in raster pixels (default the whole ``raster_w x raster_h``
    raster). An edge of the tile that lies on the area's edge does not count: nothing lies beyond
    it, so a box cut there cannot be completed by another tile. ``tol_px`` is in tile-image pixels.
    """
    if tol_px < 0:
        raise ConfigError(f"tol_px must be >= 0 pixels, got {tol_px!r}")
    area = PixelBox(0.0, 0.0, float(raster_w), float(raster_h)) if area is None else area
    win = tile.window
    w, h = tile.size
    eps = 1e-6
    inner_left = win.x1 > area.x1 + eps
    inner_top = win.y1 > area.y1 + eps
    inner_right = win.x2 < area.x2 - eps
    inner_bottom = win.y2 < area.y2 - eps
    return (
        (inner_left and box_in_tile.x1 <= tol_px)
        or (inner_top and box_in_tile.y1 <= tol_px)
        or (inner_right and box_in_tile.x2 >= w - tol_px)
        or (inner_bottom and box_in_tile.y2 >= h - tol_px)
    )


def _interval_iou(a1: float, a2: float, b1: float, b2: float) -> float:
    inter = min(a2, b2) - max(a1, b1)
    if inter <= 0:
        return 0.0
    return inter / (max(a2, b2) - min(a1, b1))


def _same_object(
    p: Detection, q: Detection, iou_threshold: float, containment_threshold: float, gap_tol_px: float
) -> bool:
    inter = p.box.intersection_area(q.box)
    if inter > 0.0:
        if p.box.iou(q.box) >= iou_threshold:  # the continuous IoU, defined once (geometry.continuous_iou)
            return True
        if inter / min(p.box.area, q.box.area) >= containment_threshold:
            return True
    if p.truncated and q.truncated:
        a, b = p.box, q.box
        gap_x = max(a.x1, b.x1) - min(a.x2, b.x2)
        gap_y = max(a.y1, b.y1) - min(a.y2, b.y2)
        if gap_x > gap_tol_px or gap_y > gap_tol_px:
            return False
        return (
            _interval_iou(a.x1, a.x2, b.x1, b.x2) >= iou_threshold
            or _interval_iou(a.y1, a.y2, b.y1, b.y2) >= iou_threshold
        )
    return False


def _sort_key(det: Detection) -> tuple[float, float, float, float, float, float]:
    b = det.box
    return (-det.score, -det.presence, b.y1, b.x1, b.y2, b.x2)


def merge_detections(
    dets: Iterable[Detection],
    iou_threshold: float = 0.5,
    containment_threshold: float = 0.7,
    gap_tol_px: float = 2.0,
) -> list[Detection]:
    """One detection per object, following the rule in this module's docstring.

    ``gap_tol_px`` (raster pixels) is how far apart two truncated pieces may be and still be joined.
    """
    for name, value in (("iou_threshold", iou_threshold), ("containment_threshold", containment_threshold)):
        if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
            raise ConfigError(f"{name} must be in (0, 1], got {value!r}; e.g. 0.5")
    if not (isinstance(gap_tol_px, (int, float)) and gap_tol_px >= 0):
        raise ConfigError(f"gap_tol_px must be >= 0 raster pixels, got {gap_tol_px!r}; e.g. 2")
    items = sorted(dets, key=_sort_key)
    parent = list(range(len(items)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    # Sweep along x: only boxes whose x-ranges meet (within gap_tol_px) can pair, which keeps
    # thousands of detections fast; the pairs tested are the same as with a full double loop.
    by_x = sorted(range(len(items)), key=lambda k: items[k].box.x1)
    for p, i in enumerate(by_x):
        reach = items[i].box.x2 + gap_tol_px
        for j in by_x[p + 1 :]:
            if items[j].box.x1 > reach:
                break
            if _same_object(items[i], items[j], iou_threshold, containment_threshold, gap_tol_px):
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)

    groups: dict[int, list[Detection]] = {}
    for i, det in enumerate(items):
        groups.setdefault(find(i), []).append(det)

    merged = []
    for members in groups.values():  # members keep the sorted order: best first
        score = max(m.score for m in members)
        presence = max(m.presence for m in members)
        whole = [m for m in members if not m.truncated]
        if whole:
            merged.append(replace(whole[0], score=score, presence=presence))
            continue
        box = members[0].box
        for m in members[1:]:
            box = box.union(m.box)
        tile_ids = sorted({m.tile_id for m in members if m.tile_id})
        pieces = [m.outline for m in members if m.outline]
        outline = union_outlines(pieces, box, members[0].outline_step) if len(pieces) > 1 else (pieces or [()])[0]
        merged.append(
            replace(members[0], box=box, score=score, presence=presence, tile_id="+".join(tile_ids), truncated=True,
                    outline=outline)
        )  # fmt: skip
    return sorted(merged, key=_sort_key)


def select_mode(dets: Sequence[Detection], mode: str) -> list[Detection]:
    """``"one"``: the single best detection by score (empty list if none); ``"all"``: all, best first."""
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    ordered = sorted(dets, key=_sort_key)
    return ordered[:1] if mode == "one" else ordered


def refinement_windows(
    coarse_dets: Sequence[Detection],
    raster_w: int,
    raster_h: int,
    tile_size_px_fullres: int,
    top_k: int = 3,
    dedupe_iou: float = 0.5,
) -> list[PixelBox]:
    """Full-resolution windows for the fine pass of a coarse-to-fine search.

    Candidates are taken best score first. Each gets a ``tile_size_px_fullres`` square window
    (shrunk to the raster when the raster is smaller) centred on its box, shifted to lie inside the
    raster and snapped to whole pixels. A window whose IoU with an already chosen one is
    ``>= dedupe_iou`` is skipped, and the next candidate is tried, until ``top_k`` windows are
    chosen or the candidates run out. The result is in that order (best first).
    """
    if isinstance(tile_size_px_fullres, bool) or not isinstance(tile_size_px_fullres, int):
        raise ConfigError(f"tile_size_px_fullres must be an integer of pixels, got {tile_size_px_fullres!r}")
    if tile_size_px_fullres < 1:
        raise ConfigError(f"tile_size_px_fullres must be >= 1 pixel, got {tile_size_px_fullres}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ConfigError(f"top_k must be an integer >= 0, got {top_k!r}")
    if not (isinstance(raster_w, int) and isinstance(raster_h, int) and raster_w > 0 and raster_h > 0):
        raise ConfigError(f"raster size must be positive integers, got {raster_w!r} x {raster_h!r}")
    win_w = min(tile_size_px_fullres, raster_w)
    win_h = min(tile_size_px_fullres, raster_h)
    chosen: list[PixelBox] = []
    for det in sorted(coarse_dets, key=_sort_key):
        if len(chosen) >= top_k:
            break
        cx, cy = det.box.center
        x1 = min(max(0, round(cx - win_w / 2)), raster_w - win_w)
        y1 = min(max(0, round(cy - win_h / 2)), raster_h - win_h)
        win = PixelBox.from_window(float(x1), float(y1), float(win_w), float(win_h))
        if all(win.iou(other) < dedupe_iou for other in chosen):
            chosen.append(win)
    return chosen
