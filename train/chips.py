"""Pure chip-placement maths for ``geo-r1 dataset build``: chip sizes, offsets, boxes, spatial split cells.

Everything works on plain tuples in **raster pixels** (pixel-edge convention, as
:mod:`geo_r1_qgis.core.geometry`): a chip is a square window ``(x1, y1, x2, y2)`` of ``side`` raster
pixels with integer corners, read and resampled to ``chip`` x ``chip`` image pixels. An object is the
pixel box around its polygon. No rasterio, GDAL or numpy here; randomness comes from a
:class:`random.Random` the caller seeds, so a seed gives the same chips on every machine.

Rules (see ``docs/ARCHITECTURE.md``, "Datasets"):

* chip sides are multiples of :data:`CHIP_MULTIPLE` (28), so Qwen2.5-VL's ``smart_resize`` leaves the
  chip unchanged and the model's frame is the image frame;
* an object counts in a chip when more than :data:`INSIDE_THRESHOLD` of its box area is inside; a chip
  that cuts an object of the expression with half or less of it inside is ambiguous (is it in the
  answer or not?) and is re-drawn;
* a box in chip pixels is ``floor(x1), floor(y1), ceil(x2), ceil(y2)``, clipped to the chip.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence

from geo_r1_qgis.core.errors import ConfigError
from geo_r1_qgis.core.geometry import box_area, intersection_area  # continuous areas, defined once
from geo_r1_qgis.core.rules.coords import QWEN25_MAX_PIXELS, QWEN25_MIN_PIXELS, QWEN_FACTOR

#: Qwen2.5-VL's frame (patch 14 x merge 2) and pixel bounds, from their one home (rules/coords): a chip outside
#: them would be resized by ``smart_resize``.
CHIP_MULTIPLE = QWEN_FACTOR
MIN_PIXELS = QWEN25_MIN_PIXELS
MAX_PIXELS = QWEN25_MAX_PIXELS
#: An object belongs to a chip's answer when more than this fraction of its box is inside.
INSIDE_THRESHOLD = 0.5
#: Float noise absorbed when boxes are snapped to whole pixels (a box on pixel edges stays put).
_EPS = 1e-6

Box = tuple[float, float, float, float]
IntBox = tuple[int, int, int, int]
Window = tuple[int, int, int, int]
Cell = tuple[int, int]


def check_chip_size(size: object, option: str = "--chip") -> int:
    """``size`` if it is a multiple of 28 within Qwen2.5-VL's pixel bounds; else a :class:`ConfigError`
    naming the nearest multiples."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise ConfigError(f"{option} must be a whole number of pixels, got {size!r}; e.g. {option} 504")
    lo = max(CHIP_MULTIPLE, size // CHIP_MULTIPLE * CHIP_MULTIPLE)
    hi = max(CHIP_MULTIPLE * 2, lo + CHIP_MULTIPLE)
    if size % CHIP_MULTIPLE or size < CHIP_MULTIPLE * 2:
        near = f"{lo} or {hi}" if size > CHIP_MULTIPLE * 2 else f"{hi}"
        raise ConfigError(
            f"{option} must be a multiple of {CHIP_MULTIPLE} (at least {CHIP_MULTIPLE * 2}) so the model sees "
            f"the chip unresized, got {size}; use {near}"
        )
    if size * size > MAX_PIXELS:
        raise ConfigError(f"{option} {size} gives more than {MAX_PIXELS} pixels, which the model resizes; use <= 3584")
    return size


def overlaps(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two windows or boxes share area (touching edges share none)."""
    return intersection_area(a, b) > 0.0


def inside_fraction(box: Sequence[float], window: Sequence[float]) -> float:
    """The fraction of ``box``'s area inside ``window`` (0 for an empty box)."""
    area = box_area(box)
    return intersection_area(box, window) / area if area > 0 else 0.0


def chip_box(box: Sequence[float], window: Sequence[float], chip: int) -> IntBox | None:
    """``box`` (raster pixels) in the pixels of the ``chip`` x ``chip`` image of ``window``: floor the
    top-left, ceil the bottom-right, clip to the chip; ``None`` when nothing of it is inside."""
    sx = chip / (window[2] - window[0])
    sy = chip / (window[3] - window[1])
    x1 = max(0, math.floor((box[0] - window[0]) * sx + _EPS))
    y1 = max(0, math.floor((box[1] - window[1]) * sy + _EPS))
    x2 = min(chip, math.ceil((box[2] - window[0]) * sx - _EPS))
    y2 = min(chip, math.ceil((box[3] - window[1]) * sy - _EPS))
    if x1 >= x2 or y1 >= y2:
        return None
    return (x1, y1, x2, y2)


def origin_range(lo: float, hi: float, side: int, limit: int) -> tuple[int, int] | None:
    """The integer chip origins ``o`` on one axis with ``[lo, hi]`` inside ``[o, o + side]`` and the chip
    inside ``[0, limit]``, as ``(first, last)``; ``None`` when there is none."""
    first = max(0, math.ceil(hi - side - _EPS))
    last = min(limit - side, math.floor(lo + _EPS))
    return (first, last) if first <= last else None


def random_window_around(box: Sequence[float], side: int, width: int, height: int, rng: random.Random) -> Window | None:
    """A ``side``-pixel window holding all of ``box``, inside the raster, at a uniformly random offset
    (so the object is not always centred); ``None`` when the box is bigger than the window or the
    raster is smaller than it."""
    xs = origin_range(box[0], box[2], side, width)
    ys = origin_range(box[1], box[3], side, height)
    if xs is None or ys is None:
        return None
    x = rng.randint(*xs)
    y = rng.randint(*ys)
    return (x, y, x + side, y + side)


def random_window_inside(
    area: Sequence[float], side: int, width: int, height: int, rng: random.Random
) -> Window | None:
    """A ``side``-pixel window at a random place inside the raster whose centre lies in ``area``
    (an area smaller than the window gives a window around it); ``None`` when the raster is smaller."""
    if side > width or side > height:
        return None
    cx0, cx1 = max(area[0], side / 2), min(area[2], width - side / 2)
    cy0, cy1 = max(area[1], side / 2), min(area[3], height - side / 2)
    if cx0 > cx1 or cy0 > cy1:
        return None
    x = min(width - side, max(0, round(rng.uniform(cx0, cx1) - side / 2)))
    y = min(height - side, max(0, round(rng.uniform(cy0, cy1) - side / 2)))
    return (x, y, x + side, y + side)


def classify(window: Sequence[float], boxes: Sequence[Sequence[float]]) -> tuple[list[int], list[int]]:
    """Indices of the boxes counted in the chip (more than half inside) and of those it cuts ambiguously
    (some, but at most half, inside)."""
    inside, cut = [], []
    for i, b in enumerate(boxes):
        f = inside_fraction(b, window)
        if f > INSIDE_THRESHOLD:
            inside.append(i)
        elif f > 0.0:
            cut.append(i)
    return inside, cut


def place_chip(
    target: int,
    boxes: Sequence[Sequence[float]],
    side: int,
    width: int,
    height: int,
    rng: random.Random,
    tries: int = 8,
    accept: Callable[[Window], bool] | None = None,
    prefer_alone: bool = True,
) -> tuple[Window, list[int]] | None:
    """A window around ``boxes[target]`` that cuts no other box ambiguously and that ``accept`` takes,
    with the indices of the boxes it counts; up to ``tries`` random offsets, else ``None``.

    With ``prefer_alone`` the tries go on until a window holds the target alone (so the chip can also
    be a one-box REC query), falling back to the first acceptable window."""
    fallback: tuple[Window, list[int]] | None = None
    for _ in range(max(1, tries)):
        window = random_window_around(boxes[target], side, width, height, rng)
        if window is None:
            return None
        inside, cut = classify(window, boxes)
        if cut or target not in inside:
            continue
        if accept is not None and not accept(window):
            continue
        if len(inside) == 1 or not prefer_alone:
            return window, inside
        if fallback is None:
            fallback = (window, inside)
    return fallback


# --------------------------------------------------------------------------------------------------
# Spatial split
# --------------------------------------------------------------------------------------------------


def cell_of(box: Sequence[float], cell_size: float) -> Cell:
    """The grid cell (column, row) holding the box's centre, for cells of ``cell_size`` raster pixels."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return (int(cx // cell_size), int(cy // cell_size))


def cell_window(cell: Cell, cell_size: float) -> Box:
    c, r = cell
    return (c * cell_size, r * cell_size, (c + 1) * cell_size, (r + 1) * cell_size)


def choose_val_cells(counts: Mapping[Cell, int], fraction: float, rng: random.Random) -> set[Cell]:
    """Whole cells for validation, drawn at random until they hold at least ``fraction`` of the
    annotations in ``counts`` (cell -> number); at least one cell always stays for training."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {fraction!r}; e.g. 0.2")
    cells = sorted(c for c, n in counts.items() if n > 0)
    total = sum(counts[c] for c in cells)
    if fraction == 0.0 or len(cells) < 2:
        return set()
    rng.shuffle(cells)
    chosen: set[Cell] = set()
    taken = 0
    for c in cells[:-1]:
        if taken >= fraction * total:
            break
        chosen.add(c)
        taken += counts[c]
    return chosen


def disjoint_from(window: Sequence[float], others: Iterable[Sequence[float]]) -> bool:
    """Whether ``window`` shares no area with any of ``others``."""
    return not any(overlaps(window, o) for o in others)
