"""GRES ground truth from polygons: the true mask of a chip and the answer target (box + two keypoints).

Geo-R1's GRES answer is a list of ``{"bbox_2d": [x1, y1, x2, y2], "keypoint1": [x3, y3], "keypoint2": [x4, y4]}``
items (GEO-R1.md, "Prompts"); a frozen SAM turns each box and its two points into a mask, and the reward and
the evaluation compare the union of those masks with the true mask. Our annotations are polygons, so both
the true mask and a target answer (for SFT and for checking the reward) come from them, by these rules:

- **Polygons in chip pixels.** An object's polygon is kept as rings of ``(x, y)`` in the pixels of the chip
  (pixel-edge convention: pixel ``(col, row)`` covers ``[col, col + 1) x [row, row + 1)``); a polygon is its
  exterior ring followed by its holes; an object may have several polygons (a MultiPolygon).
- **Rasterising** (:func:`rasterize`): a pixel is in the mask when its centre ``(col + 0.5, row + 0.5)`` is
  inside the polygon by the even-odd rule over all its rings, which is GDAL's ``RasterizeLayer`` default
  (not "all touched"). An object so thin that no pixel centre falls inside keeps one pixel: the one holding
  the centre of its box's part inside the chip (:func:`object_mask`), so every true object has a mask.
- **Keypoints** (:func:`keypoints`): two pixels inside the object's mask, chosen to sit well inside it, where
  a positive point prompt helps SAM most. ``keypoint1`` is the mask pixel deepest inside the mask (largest
  number of 4-neighbour erosions it survives; ties: nearest the mask's centroid, then first in row-major
  order). ``keypoint2`` is, among the pixels at least half as deep (and at least depth 1), the one farthest
  from ``keypoint1`` (ties: row-major); for a one-pixel mask it is ``keypoint1``. Each is written as the
  integer ``[col, row]`` of its pixel, which lies inside that pixel. A box is the object's pixel box
  ``floor(x1), floor(y1), ceil(x2), ceil(y2)`` clipped to the chip, as every other box of a dataset.

Pure: the standard library and numpy only, so the plugin, the dataset builder, the reward and the evaluator
all use this one definition.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from geo_r1_qgis.core.errors import ConfigError

__all__ = [
    "Polygon",
    "check_polygons",
    "keypoints",
    "object_mask",
    "polygons_bbox",
    "rasterize",
    "truth_mask",
]

#: One polygon: its exterior ring, then its holes; a ring is a list of ``(x, y)`` in chip pixels.
Polygon = Sequence[Sequence[Sequence[float]]]


def check_polygons(polygons: Any, where: str = "") -> list[list[list[list[float]]]]:
    """``polygons`` (one object's) as plain lists of floats, or a :class:`ConfigError` saying what is wrong."""
    prefix = f"{where}: " if where else ""
    if not isinstance(polygons, (list, tuple)) or not polygons:
        raise ConfigError(f"{prefix}an object's outline must be a non-empty list of polygons, got {polygons!r:.80}")
    out = []
    for polygon in polygons:
        if not isinstance(polygon, (list, tuple)) or not polygon:
            raise ConfigError(f"{prefix}a polygon must be a list of rings (exterior first), got {polygon!r:.80}")
        rings = []
        for ring in polygon:
            try:
                pts = [[float(p[0]), float(p[1])] for p in ring]
            except (TypeError, ValueError, IndexError):
                raise ConfigError(f"{prefix}a ring must be a list of [x, y] points, got {ring!r:.80}") from None
            if len(pts) < 3 or not all(math.isfinite(v) for p in pts for v in p):
                raise ConfigError(f"{prefix}a ring needs at least 3 finite [x, y] points, got {ring!r:.80}")
            rings.append(pts)
        out.append(rings)
    return out


def polygons_bbox(polygons: Any) -> tuple[float, float, float, float]:
    """The bounding box ``(x1, y1, x2, y2)`` of an object's polygons (their exterior rings)."""
    pts = [p for polygon in check_polygons(polygons) for p in polygon[0]]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return min(xs), min(ys), max(xs), max(ys)


def rasterize(polygons: Any, size: Sequence[int]) -> Any:
    """The boolean ``height x width`` mask of an object's polygons (``size`` is ``(width, height)``): pixel
    centres inside by the even-odd rule over every ring of every polygon (GDAL's default rule)."""
    import numpy as np

    width, height = int(size[0]), int(size[1])
    mask = np.zeros((height, width), dtype=bool)
    edges = []
    for polygon in check_polygons(polygons):
        for ring in polygon:
            a = np.asarray(ring, dtype=float)
            b = np.roll(a, -1, axis=0)
            edges.append(np.concatenate([a, b], axis=1))  # x0, y0, x1, y1
    if not edges or width < 1 or height < 1:
        return mask
    e = np.concatenate(edges)
    e = e[e[:, 1] != e[:, 3]]  # horizontal edges never cross a scanline
    if e.size == 0:
        return mask
    x0, y0, x1, y1 = e.T
    ylo, yhi = np.minimum(y0, y1), np.maximum(y0, y1)
    row_lo = max(0, math.floor(float(ylo.min()) - 0.5))
    row_hi = min(height - 1, math.ceil(float(yhi.max()) - 0.5))
    cols = np.arange(width) + 0.5
    for row in range(row_lo, row_hi + 1):
        yc = row + 0.5
        hit = (ylo <= yc) & (yc < yhi)  # half-open: a vertex on the scanline is counted once
        if not hit.any():
            continue
        xs = x0[hit] + (yc - y0[hit]) * (x1[hit] - x0[hit]) / (y1[hit] - y0[hit])
        # even-odd: a centre is inside when an odd number of crossings lie to its left
        crossings = np.searchsorted(np.sort(xs), cols, side="right")
        mask[row] = crossings % 2 == 1
    return mask


def object_mask(polygons: Any, size: Sequence[int]) -> Any:
    """:func:`rasterize`, and where no pixel centre is inside (a sliver), the one pixel holding the centre
    of the part of the object's box inside the chip: every object that reaches into the chip keeps a mask."""
    mask = rasterize(polygons, size)
    if not mask.any():
        x1, y1, x2, y2 = polygons_bbox(polygons)
        x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(size[0])), min(y2, float(size[1]))
        if x1 < x2 and y1 < y2:  # the centre of the box's part inside the chip
            col, row = math.floor((x1 + x2) / 2), math.floor((y1 + y2) / 2)
            mask[min(row, mask.shape[0] - 1), min(col, mask.shape[1] - 1)] = True
    return mask


def truth_mask(objects: Sequence[Any], size: Sequence[int]) -> Any:
    """The true mask of a query: the union of its objects' masks (:func:`object_mask`); no objects (a negative
    chip), an empty mask."""
    import numpy as np

    mask = np.zeros((int(size[1]), int(size[0])), dtype=bool)
    for polygons in objects:
        mask |= object_mask(polygons, size)
    return mask


def _depth(mask: Any) -> Any:
    """How many 4-neighbour erosions each mask pixel survives (1 at the edge; outside the array is background)."""
    import numpy as np

    depth = np.zeros(mask.shape, dtype=np.int32)
    cur = mask.copy()
    level = 0
    while cur.any():
        level += 1
        depth[cur] = level
        pad = np.pad(cur, 1, constant_values=False)
        cur = cur & pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    return depth


def keypoints(mask: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    """The two keypoints ``((col, row), (col, row))`` of one object's mask, by the rule of the module
    docstring. An empty mask is an error (:func:`object_mask` never gives one)."""
    import numpy as np

    mask = np.asarray(mask, dtype=bool)
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ConfigError("an object with an empty mask has no keypoints; use object_mask, which keeps a pixel")
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    crop = mask[r0:r1, c0:c1]
    depth = _depth(crop)
    ys, xs = np.nonzero(crop)  # row-major order
    d = depth[ys, xs]
    cy, cx = ys.mean(), xs.mean()
    deepest = np.flatnonzero(d == d.max())
    near = ((ys[deepest] - cy) ** 2 + (xs[deepest] - cx) ** 2).astype(float)
    k1 = deepest[int(np.argmin(near))]  # argmin: the first of equals, i.e. row-major
    floor = max(1, math.ceil(int(d.max()) / 2))
    cand = np.flatnonzero(d >= floor)
    far = (ys[cand] - ys[k1]) ** 2 + (xs[cand] - xs[k1]) ** 2
    k2 = cand[int(np.argmax(far))]
    p1 = (int(xs[k1] + c0), int(ys[k1] + r0))
    p2 = (int(xs[k2] + c0), int(ys[k2] + r0))
    return p1, p2
