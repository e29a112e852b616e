"""Outlines for grounded boxes: a frozen SAM 2 prompted with each box (and its GRES keypoints), masks traced.

The server's last step for the items that ask for outlines (task ``gres``, or ``outline: true`` for ``rec`` and
``multi``: "refine to outline"), after any backend (local or remote) has answered. Per item:

1. The prompts. ``gres``: each box the engine returns (:class:`~engine.runtime.backend.ItemResult`, in the client
   image's pixels) with the two keypoints the model wrote for it, read by
   :func:`~geo_r1_qgis.core.rules.parsing.gres_answer` and moved to the image's pixels by the same frame rule
   as the boxes (:mod:`geo_r1_qgis.core.rules.coords`, ``--box-frame``). A box whose keypoints cannot be found
   (the GRES parse did not read it) is prompted alone. ``rec``/``multi`` with ``outline``: each box alone.
2. :meth:`engine.runtime.sam.SamMasker.masks`: one mask per box, clipped to the box (Eq. 7).
3. :func:`geo_r1_qgis.core.outline.mask_to_polygons`: polygons in the image's pixels (pixel corners; the
   exterior first, then holes), simplified at ``tolerance_px`` pixels of the image, which is its ground
   resolution when the image is a tile.

Each box's JSON gains ``outline`` (a list of polygons, each a list of rings of ``[x, y]``) and, for ``gres``,
``keypoints``; the item's ``timings_ms`` gains ``sam`` and ``trace``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.runtime.backend import ItemResult
from engine.runtime.sam import MaskPrompt, SamMasker
from geo_r1_qgis.core.outline import DEFAULT_TOLERANCE_PX, mask_to_polygons
from geo_r1_qgis.core.rules.coords import model_to_image_box
from geo_r1_qgis.core.rules.parsing import gres_answer


@dataclass(frozen=True)
class OutlineRequest:
    """One item's outline settings: its task, and whether the request asked for outlines."""

    task: str
    outline: bool
    tolerance_px: float = DEFAULT_TOLERANCE_PX
    min_area_px: float = 0.0


def wants_outline(task: str, outline: bool | None) -> bool:
    """Whether an item gets outlines: ``gres`` unless ``outline`` is False; others only with ``outline`` True."""
    return bool(outline) if outline is not None else task == "gres"


def _points_in_image(point: tuple[float, float], frame: tuple[int, int], image: tuple[int, int]) -> tuple[float, float]:
    x, y = point
    return (x * image[0] / frame[0], y * image[1] / frame[1])


def keypoints_for_boxes(result: ItemResult, box_frame: str) -> list[tuple[tuple[float, float], ...]]:
    """For each box of a ``gres`` result, the keypoints the model wrote for it (image pixels); () when unknown."""
    items = gres_answer(result.raw_text) or ()
    frame = result.image_size if box_frame == "image" else result.model_size
    found: list[tuple[tuple[float, float, float, float], tuple[tuple[float, float], ...]]] = []
    for item in items:
        box = model_to_image_box(item.box, frame, result.image_size)
        if box is not None:
            found.append(
                (
                    (box.x1, box.y1, box.x2, box.y2),
                    tuple(_points_in_image(p, frame, result.image_size) for p in item.points),
                )
            )
    out = []
    for b in result.boxes:
        match = next(
            (
                pts
                for xyxy, pts in found
                if all(math.isclose(u, v, abs_tol=1e-6) for u, v in zip(xyxy, (b.x1, b.y1, b.x2, b.y2), strict=True))
            ),
            (),
        )
        out.append(match)
    return out


def outline_result(
    sam: SamMasker, image: Any, result: ItemResult, request: OutlineRequest, box_frame: str
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Per box of ``result``: ``{"outline": polygons[, "keypoints": points]}``; and the timings (ms)."""
    if not result.boxes:
        return [], {"sam": 0.0, "trace": 0.0}
    points = keypoints_for_boxes(result, box_frame) if request.task == "gres" else [() for _ in result.boxes]
    prompts = [MaskPrompt((b.x1, b.y1, b.x2, b.y2), pts) for b, pts in zip(result.boxes, points, strict=True)]
    t0 = time.perf_counter()
    rgb = np.asarray(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.uint8)
    masks = sam.masks(rgb, prompts)
    t1 = time.perf_counter()
    extras = []
    for mask, pts in zip(masks, points, strict=True):
        polys = mask_to_polygons(mask, request.tolerance_px, request.min_area_px)
        entry: dict[str, Any] = {"outline": [[[list(p) for p in ring] for ring in poly] for poly in polys]}
        if request.task == "gres":
            entry["keypoints"] = [list(p) for p in pts]
        extras.append(entry)
    t2 = time.perf_counter()
    return extras, {"sam": (t1 - t0) * 1000.0, "trace": (t2 - t1) * 1000.0}
