"""Model-pixel <-> image-pixel coordinates, and Geo-R1's IoU.

Qwen2.5-VL answers in absolute pixels of the image AS THE MODEL SAW IT: the processor first resizes every
image with :func:`smart_resize` so that each side is a multiple of 28 and the area lies within
[min_pixels, max_pixels]. A 512x512 tile is seen as 504x504 and an 800x800 one as 812x812, so a box must
be scaled back (x by W/W', y by H/H') before it is placed on the map, as VLM-R1's ``resize_bbox`` does in
its reward. Geo-R1's own evaluation scripts skip this (a 1-2 % drift); we do not.

Conventions
-----------
* Sizes are ``(width, height)`` tuples everywhere in this module EXCEPT :func:`smart_resize`, which keeps
  transformers' ``(height, width)`` argument and result order so it can be compared with it directly.
  Use :func:`model_input_size` to get ``(width, height)``.
* Boxes are ``(x1, y1, x2, y2)`` in continuous pixel coordinates: (0, 0) is the top-left corner of the
  top-left pixel and (W, H) the bottom-right corner of the image, so clipping is to [0, W] x [0, H].
* :func:`geo_r1_iou` is the inclusive-pixel IoU of VLM-R1's reward and Geo-R1's evaluation, kept exactly
  (it is not the continuous-area IoU, ``geometry.continuous_iou``; use it where numbers must match the paper's).
* Every rescale between frames is ``x / from_width * to_width`` (VLM-R1's ``resize_bbox`` arithmetic), written
  once in :func:`_scale`: :func:`rescale_to_image` (the reward's, unclipped), :func:`model_to_image_box`
  (clipped, for the map) and :func:`image_to_model_box` (the inverse).

Differences from upstream (deliberate)
--------------------------------------
* :func:`smart_resize` is transformers' ``models/qwen2_vl/image_processing_qwen2_vl.smart_resize``
  (what the processor itself runs), with Qwen2.5-VL's processor limits as defaults (min_pixels=3136,
  max_pixels=12845056; transformers' own defaults are 3136 and 1003520). It raises :class:`ConfigError`
  (a ``ValueError``, with the same "absolute aspect ratio must be smaller than 200" message) where
  transformers raises ``ValueError``, and also for non-positive sizes, where transformers would divide by
  zero. ``qwen_vl_utils.smart_resize`` differs only for sides below 14 pixels (it never rounds a side to
  0 before the min_pixels check); the processor's result is what the model sees.

This module is pure: standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from geo_r1_qgis.core.errors import ConfigError
from geo_r1_qgis.core.geometry import PixelBox

__all__ = [
    "MAX_ASPECT_RATIO",
    "QWEN25_MAX_PIXELS",
    "QWEN25_MIN_PIXELS",
    "QWEN_FACTOR",
    "geo_r1_iou",
    "image_to_model_box",
    "model_input_size",
    "model_to_image_box",
    "rescale_to_image",
    "smart_resize",
]

#: patch_size (14) x merge_size (2): every side the model sees is a multiple of this.
QWEN_FACTOR = 28
#: Qwen2.5-VL-3B-Instruct's preprocessor_config.json limits.
QWEN25_MIN_PIXELS = 3136
QWEN25_MAX_PIXELS = 12845056
#: transformers refuses images whose long side is more than this many times the short side.
MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int,
    width: int,
    factor: int = QWEN_FACTOR,
    min_pixels: int = QWEN25_MIN_PIXELS,
    max_pixels: int = QWEN25_MAX_PIXELS,
) -> tuple[int, int]:
    """The ``(height, width)`` Qwen2-VL / Qwen2.5-VL resizes an image of ``height`` x ``width`` to.

    Same arithmetic as transformers (Python's ``round`` rounds halves to even: 14 -> 0, 42 -> 56).
    """
    if height <= 0 or width <= 0:
        raise ConfigError(f"image size must be positive, got height={height}, width={width}")
    if factor <= 0 or min_pixels <= 0 or max_pixels < min_pixels:
        raise ConfigError(
            f"need factor > 0 and 0 < min_pixels <= max_pixels, got factor={factor}, "
            f"min_pixels={min_pixels}, max_pixels={max_pixels}"
        )
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ConfigError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {ratio} "
            f"(image {width}x{height}); crop or tile the image closer to square"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def model_input_size(
    image_size: tuple[int, int],
    min_pixels: int = QWEN25_MIN_PIXELS,
    max_pixels: int = QWEN25_MAX_PIXELS,
) -> tuple[int, int]:
    """``(width, height)`` the model sees for an image of ``image_size = (width, height)``."""
    width, height = image_size
    h, w = smart_resize(height, width, QWEN_FACTOR, min_pixels, max_pixels)
    return w, h


def _corners(box: Any) -> tuple[float, float, float, float]:
    if hasattr(box, "x1"):
        return (float(box.x1), float(box.y1), float(box.x2), float(box.y2))
    x1, y1, x2, y2 = box
    return (float(x1), float(y1), float(x2), float(y2))


def _scale(
    corners: tuple[float, float, float, float], from_size: Sequence[float], to_size: Sequence[float]
) -> tuple[float, float, float, float]:
    """The one rescale: each x divided by the ``from`` width and multiplied by the ``to`` width (y alike)."""
    x1, y1, x2, y2 = corners
    (fw, fh), (tw, th) = from_size, to_size
    return (x1 / fw * tw, y1 / fh * th, x2 / fw * tw, y2 / fh * th)


def _check_size(name: str, size: Sequence[float]) -> tuple[float, float]:
    try:
        w, h = size
        w, h = float(w), float(h)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a (width, height) pair, got {size!r}") from None
    if not (math.isfinite(w) and math.isfinite(h) and w > 0 and h > 0):
        raise ConfigError(f"{name} must be a positive (width, height), got {size!r}")
    return w, h


#: Which pixels the model's boxes are in. ``model``: the image as the model saw it after ``smart_resize``
#: (Qwen2.5-VL's native frame, and VLM-R1's training reward since 2025-06-26); the engine scales boxes back to
#: the client's image. ``image``: the client's image itself (no scaling, only clipping), for checkpoints
#: trained and scored without the rescale, as Geo-R1's evaluation scripts score. Tiles whose sides are
#: multiples of 28 make both the same (GEO-R1.md, "Coordinates").
BOX_FRAMES = ("model", "image")


def model_to_image_box(
    box: Any,
    model_size: tuple[int, int],
    image_size: tuple[int, int],
) -> PixelBox | None:
    """Undo smart_resize: scale a model-pixel box to ``image_size`` pixels and clip it to the image.

    ``box`` is ``(x1, y1, x2, y2)`` or anything with ``x1, y1, x2, y2`` attributes (a ``ParsedBox``);
    corners may be swapped. ``model_size`` and ``image_size`` are ``(width, height)``. Returns None when
    the box has a non-finite coordinate, lies entirely outside the image, or has zero width or height
    after clipping. Raises ConfigError for a non-positive size.
    """
    mw, mh = _check_size("model_size", model_size)
    iw, ih = _check_size("image_size", image_size)
    x1, y1, x2, y2 = _corners(box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None
    x1, y1, x2, y2 = _scale((x1, y1, x2, y2), (mw, mh), (iw, ih))
    xa, xb = sorted((x1, x2))
    ya, yb = sorted((y1, y2))
    xa, xb = max(0.0, xa), min(iw, xb)
    ya, yb = max(0.0, ya), min(ih, yb)
    if xb <= xa or yb <= ya:
        return None
    return PixelBox(xa, ya, xb, yb)


def image_to_model_box(
    box: Any,
    image_size: tuple[int, int],
    model_size: tuple[int, int],
) -> tuple[float, float, float, float]:
    """The inverse scaling (no clipping, no rounding): where an image-pixel box lies in model pixels.

    For building training targets in the model's frame, and for tests. Sizes are ``(width, height)``.
    """
    iw, ih = _check_size("image_size", image_size)
    mw, mh = _check_size("model_size", model_size)
    return _scale(_corners(box), (iw, ih), (mw, mh))


def rescale_to_image(box: Sequence[float], image_size: Sequence[int]) -> tuple[float, float, float, float]:
    """VLM-R1's ``resize_bbox``: a box the model wrote for an image of ``image_size`` (``(width, height)``),
    from the model's frame (:func:`model_input_size`) to the image's pixels. No clipping, rounding or
    reordering; the identity when the image's sides are multiples of 28. The corners are used as given
    (ints stay ints until the division, as upstream)."""
    iw, ih = int(image_size[0]), int(image_size[1])
    return _scale((box[0], box[1], box[2], box[3]), model_input_size((iw, ih)), (iw, ih))


def geo_r1_iou(a: Sequence[int], b: Sequence[int]) -> float:
    """IoU with the inclusive-pixel convention of VLM-R1's reward and Geo-R1's evaluation, exactly.

    ``inter`` counts pixels ``[max(a0,b0), min(a2-1,b2-1)]`` inclusive (only when the intersection's
    start is strictly below its end on both axes), ``union`` uses the exclusive areas
    ``(x2-x1)*(y2-y1)``; a union <= 0 gives 0.0.
    """
    ix1 = max(a[0], b[0])
    iy1 = max(a[1], b[1])
    ix2 = min(a[2] - 1, b[2] - 1)
    iy2 = min(a[3] - 1, b[3] - 1)
    inter = (ix2 - ix1 + 1) * (iy2 - iy1 + 1) if ix1 < ix2 and iy1 < iy2 else 0
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    if union <= 0:
        return 0.0
    return float(inter) / union
