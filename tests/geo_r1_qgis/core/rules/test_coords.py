"""geo_r1_qgis/core/rules/coords.py: smart_resize against transformers' own, box rescaling round trips, Geo-R1's IoU."""

from __future__ import annotations

import ast
import math
import pathlib

import pytest

from geo_r1_qgis.core.errors import ConfigError
from geo_r1_qgis.core.geometry import continuous_iou
from geo_r1_qgis.core.rules import coords, parsing, prompts
from geo_r1_qgis.core.rules.coords import (
    geo_r1_iou,
    image_to_model_box,
    model_input_size,
    model_to_image_box,
    rescale_to_image,
    smart_resize,
)
from geo_r1_qgis.core.rules.parsing import ParsedBox

MIN, MAX = 3136, 12845056


@pytest.fixture(scope="module")
def hf_smart_resize():
    """transformers' own function (the torchvision module needs torchvision; its PIL twin is a copy)."""
    try:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as fn
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as fn
    return fn


# (height, width): tiles, 28-multiples, non-multiples, half-way rounding, tiny, huge, extreme aspect ratios
SIZES = [
    (512, 512), (800, 800), (504, 504), (812, 812), (256, 256), (1024, 1024), (1024, 768), (768, 1024),
    (28, 28), (56, 56), (28 * 7, 28 * 11), (28 * 40, 28 * 3), (600, 1000), (333, 777), (517, 299),
    (42, 1000), (70, 1000), (14, 600), (13, 600), (1, 1), (1, 200), (200, 1), (10, 10), (14, 14), (27, 29),
    (3, 500), (28, 5600), (5600, 28), (100, 20000), (4000, 3000), (10000, 10000), (3585, 3584),
    (20000, 100), (7001, 9999), (99999, 1000),
]  # fmt: skip


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_smart_resize_equals_transformers(hf_smart_resize, height: int, width: int) -> None:
    assert smart_resize(height, width) == hf_smart_resize(height, width, 28, MIN, MAX)


@pytest.mark.parametrize(("height", "width"), SIZES[:20])
@pytest.mark.parametrize(("min_pixels", "max_pixels"), [(56 * 56, 28 * 28 * 1280), (256 * 28 * 28, 1280 * 28 * 28)])
def test_smart_resize_equals_transformers_other_limits(
    hf_smart_resize, height: int, width: int, min_pixels: int, max_pixels: int
) -> None:
    got = smart_resize(height, width, 28, min_pixels, max_pixels)
    assert got == hf_smart_resize(height, width, 28, min_pixels, max_pixels)


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        (512, 512, (504, 504)),  # GEO-R1.md
        (800, 800, (812, 812)),  # GEO-R1.md
        (504, 504, (504, 504)),
        (28 * 9, 28 * 13, (28 * 9, 28 * 13)),
        (600, 1000, (588, 1008)),
        (70, 1000, (56, 1008)),  # round(2.5) == 2: half to even
        (42, 1000, (56, 1008)),  # round(1.5) == 2
        (1, 1, (56, 56)),  # raised to min_pixels
        (14, 14, (56, 56)),
        (10000, 10000, (3556, 3556)),  # capped by max_pixels; float floor gives 127*28, not 128*28
    ],
)
def test_smart_resize_literals(height: int, width: int, expected: tuple[int, int]) -> None:
    got = smart_resize(height, width)
    assert got == expected
    assert got[0] % 28 == 0 and got[1] % 28 == 0


@pytest.mark.parametrize(("height", "width"), [(1, 201), (201, 1), (10, 2001), (28, 5629), (1, 100000)])
def test_smart_resize_rejects_extreme_aspect_ratio_like_transformers(hf_smart_resize, height: int, width: int) -> None:
    with pytest.raises(ValueError, match="absolute aspect ratio must be smaller than 200"):
        hf_smart_resize(height, width, 28, MIN, MAX)
    with pytest.raises(ConfigError, match="absolute aspect ratio must be smaller than 200"):
        smart_resize(height, width)


@pytest.mark.parametrize(("height", "width"), [(0, 10), (10, 0), (-5, 10), (0, 0)])
def test_smart_resize_rejects_non_positive_sizes(height: int, width: int) -> None:
    with pytest.raises(ConfigError, match="image size must be positive"):
        smart_resize(height, width)


@pytest.mark.parametrize(("factor", "min_pixels", "max_pixels"), [(0, MIN, MAX), (28, 0, MAX), (28, MAX, MIN)])
def test_smart_resize_rejects_bad_limits(factor: int, min_pixels: int, max_pixels: int) -> None:
    with pytest.raises(ConfigError, match="min_pixels"):
        smart_resize(512, 512, factor, min_pixels, max_pixels)


@pytest.mark.parametrize(("width", "height"), [(512, 512), (800, 600), (100, 30), (30, 700), (1000, 333)])
def test_model_input_size_matches_the_processor(width: int, height: int) -> None:
    """The image processor itself (PIL backend): grid_thw x 14 is what model_input_size says."""
    image_processing = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    from PIL import Image

    proc = image_processing.Qwen2VLImageProcessorPil(min_pixels=MIN, max_pixels=MAX)
    out = proc(images=[Image.new("RGB", (width, height))], return_tensors="np")
    _, gh, gw = (int(v) for v in out["image_grid_thw"][0])
    assert model_input_size((width, height)) == (gw * 14, gh * 14)


def test_model_input_size_is_width_height() -> None:
    assert model_input_size((1000, 600)) == (1008, 588)
    assert model_input_size((600, 1000)) == (588, 1008)


# ---------------------------------------------------------------------------------------------------
# model_to_image_box
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("box", "model_size", "image_size", "expected"),
    [
        ((0, 0, 504, 504), (504, 504), (512, 512), (0, 0, 512, 512)),
        ((252, 126, 378, 504), (504, 504), (512, 512), (256, 128, 384, 512)),
        ((203, 203, 406, 609), (812, 812), (800, 800), (200, 200, 400, 600)),
        ((10, 20, 30, 40), (504, 504), (504, 504), (10, 20, 30, 40)),  # 28-multiple: identity
        ((504, 294, 1008, 588), (1008, 588), (1000, 600), (500, 300, 1000, 600)),  # x and y scale apart
        ((378, 504, 252, 126), (504, 504), (512, 512), (256, 128, 384, 512)),  # swapped corners
        ((-20, -10, 100, 100), (100, 100), (200, 100), (0, 0, 200, 100)),  # clipped at 0
        ((50, 50, 150, 120), (100, 100), (100, 100), (50, 50, 100, 100)),  # clipped at the far edge
        ((-1e9, -1e9, 1e9, 1e9), (504, 504), (512, 512), (0, 0, 512, 512)),
        ((0.5, 0.25, 1.5, 1.75), (504, 504), (504, 504), (0.5, 0.25, 1.5, 1.75)),
    ],
)
def test_model_to_image_box(box, model_size, image_size, expected) -> None:
    got = model_to_image_box(box, model_size, image_size)
    assert got is not None
    assert (got.x1, got.y1, got.x2, got.y2) == pytest.approx(expected, rel=1e-12, abs=1e-9)
    assert got.x1 < got.x2 and got.y1 < got.y2


@pytest.mark.parametrize(
    "box",
    [
        (600, 10, 700, 20),  # entirely right of the image
        (-50, 10, -1, 20),  # entirely left
        (10, 510, 20, 600),  # entirely below
        (10, 10, 10, 20),  # zero width
        (10, 20, 30, 20),  # zero height
        (-5, 10, 0, 20),  # touches the left edge only: zero width after clipping
        (504, 10, 600, 20),  # starts exactly at the right edge
        (float("nan"), 0, 10, 10),
        (0, 0, float("inf"), 10),
    ],
)
def test_model_to_image_box_none_when_degenerate_or_outside(box) -> None:
    assert model_to_image_box(box, (504, 504), (512, 512)) is None


def test_model_to_image_box_accepts_a_parsed_box() -> None:
    out = parsing.parse_output('<answer>{"bbox_2d": [252, 126, 378, 504]}</answer>', "rec")
    got = model_to_image_box(out.boxes[0], (504, 504), (512, 512))
    assert got is not None and (got.x1, got.y1, got.x2, got.y2) == (256, 128, 384, 512)
    assert model_to_image_box(ParsedBox(1, 2, 3, 4, None, (0, 1)), (10, 10), (10, 10)) is not None


@pytest.mark.parametrize(
    ("model_size", "image_size"),
    [((0, 504), (512, 512)), ((504, 504), (512, -1)), ((504,), (512, 512)), (None, (512, 512)),
     ((504, 504), (float("nan"), 512)), ((504, 504), ("a", 512))],
)  # fmt: skip
def test_model_to_image_box_rejects_bad_sizes(model_size, image_size) -> None:
    with pytest.raises(ConfigError, match="must be a"):
        model_to_image_box((1, 2, 3, 4), model_size, image_size)


# Tile sizes (width, height): multiples of 28 (model == image) and not (model != image)
TILES = [(504, 504), (812, 812), (28 * 20, 28 * 30), (512, 512), (800, 800), (1000, 600), (333, 777),
         (256, 256), (1024, 768), (13, 600), (4000, 3000)]  # fmt: skip
FRACTIONS = [(0.1, 0.2, 0.6, 0.9), (0.0, 0.0, 1.0, 1.0), (0.45, 0.45, 0.55, 0.56), (0.9, 0.05, 0.99, 0.5)]


@pytest.mark.parametrize(("width", "height"), TILES)
@pytest.mark.parametrize("fractions", FRACTIONS)
def test_round_trip_image_model_image(width: int, height: int, fractions) -> None:
    model = model_input_size((width, height))
    if width % 28 == 0 and height % 28 == 0 and width * height <= MAX:
        assert model == (width, height)
    box = (fractions[0] * width, fractions[1] * height, fractions[2] * width, fractions[3] * height)
    in_model = image_to_model_box(box, (width, height), model)
    back = model_to_image_box(in_model, model, (width, height))
    assert back is not None
    assert (back.x1, back.y1, back.x2, back.y2) == pytest.approx(box, rel=1e-9, abs=1e-9)


def _vlm_r1_resize_bbox(bbox: list, input_height: int, input_width: int, image_height: int, image_width: int) -> list:
    """VLM-R1's ``resize_bbox`` (``src/open-r1-multimodal/src/open_r1/grpo_jsonl.py``), transcribed."""
    bbox[0] = bbox[0] / input_width * image_width
    bbox[1] = bbox[1] / input_height * image_height
    bbox[2] = bbox[2] / input_width * image_width
    bbox[3] = bbox[3] / input_height * image_height
    return bbox


@pytest.mark.parametrize(("width", "height"), TILES)
def test_rescale_to_image_is_vlm_r1_resize_bbox(width: int, height: int) -> None:
    mw, mh = model_input_size((width, height))
    for x1, y1, x2, y2 in [(0, 0, mw, mh), (1, 2, 3, 4), (mw // 3, mh // 7, mw - 1, mh - 5), (-4, 5, mw + 9, 2)]:
        want = _vlm_r1_resize_bbox([x1, y1, x2, y2], mh, mw, height, width)
        assert rescale_to_image((x1, y1, x2, y2), (width, height)) == tuple(want)  # exactly, not approx


@pytest.mark.parametrize(("width", "height"), TILES)
def test_the_map_and_the_reward_rescale_alike(width: int, height: int) -> None:
    """One rescale: where nothing is clipped, the map's box is the reward's, to the last bit."""
    model = model_input_size((width, height))
    for f in FRACTIONS:
        box = (f[0] * model[0], f[1] * model[1], f[2] * model[0], f[3] * model[1])
        got = model_to_image_box(box, model, (width, height))
        assert got is not None and got.as_tuple() == rescale_to_image(box, (width, height))


@pytest.mark.parametrize(("width", "height"), [(512, 512), (800, 800)])
def test_not_rescaling_drifts_by_one_to_two_percent(width: int, height: int) -> None:
    """Why we rescale: Geo-R1's raw model pixels are off by |W'/W - 1| (GEO-R1.md: 1-2 %)."""
    model = model_input_size((width, height))
    raw = (model[0] * 0.9, model[1] * 0.9)  # a corner the model wrote, far from the origin
    fixed = model_to_image_box((0, 0, *raw), model, (width, height))
    assert fixed is not None
    drift = abs(raw[0] - fixed.x2) / fixed.x2
    assert 0.01 <= drift <= 0.02


# ---------------------------------------------------------------------------------------------------
# geo_r1_iou: the inclusive-pixel convention, exactly
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),
        ((0, 0, 10, 10), (5, 5, 15, 15), 25 / 175),
        ((0, 0, 10, 10), (8, 0, 20, 10), 20 / 200),
        ((0, 0, 10, 10), (9, 0, 20, 10), 0.0),  # a one-pixel overlap counts as none (ix1 < ix2 is strict)
        ((0, 0, 10, 10), (10, 10, 20, 20), 0.0),
        ((0, 0, 10, 10), (0, 0, 5, 10), 50 / 100),
        ((199, 249, 245, 331), (200, 250, 246, 330), 3600 / 3852),
        ((0, 0, 0, 0), (0, 0, 0, 0), 0.0),  # union 0
        ((0, 0, 0, 0), (10, 20, 110, 220), 0.0),  # Geo-R1's failed parse vs a real box
        ((5, 5, 5, 5), (0, 0, 10, 10), 0.0),
        ((10, 10, 0, 0), (0, 0, 10, 10), 0.0),  # reversed corners: no intersection, union 200
        ((10, 0, 0, 10), (0, 0, 1, 1), 0.0),  # negative union
        ((0, 0, 2, 2), (0, 0, 2, 2), 1.0),
        ((0, 0, 1, 1), (0, 0, 1, 1), 0.0),  # one-pixel boxes never intersect: inter 0, union 2
    ],
)
def test_geo_r1_iou(a, b, expected: float) -> None:
    got = geo_r1_iou(a, b)
    assert type(got) is float
    assert got == pytest.approx(expected, abs=1e-15)
    assert geo_r1_iou(b, a) == pytest.approx(expected, abs=1e-15)


def test_geo_r1_iou_differs_from_continuous_iou_on_thin_overlaps() -> None:
    # continuous IoU: overlap 1x10 = 10 pixels, union 200, IoU 0.05; Geo-R1: ix1 = ix2 = 9 is not "<"
    a, b = (0, 0, 10, 10), (9, 0, 20, 10)
    assert geo_r1_iou(a, b) == 0.0
    assert continuous_iou(a, b) == 10 / 200
    # two columns of overlap: both conventions agree on integer boxes
    assert geo_r1_iou((0, 0, 10, 10), (8, 0, 20, 10)) == 20 / 200


def test_strict_threshold_semantics() -> None:
    """Acc@0.5 uses a strict '>': an IoU of exactly 0.5 does not count."""
    a, b = (0, 0, 10, 10), (0, 0, 10, 5)
    assert geo_r1_iou(a, b) == 0.5
    assert not geo_r1_iou(a, b) > 0.5


# ---------------------------------------------------------------------------------------------------
# Purity: the three engine modules import no heavy dependency
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [coords, parsing, prompts])
def test_module_is_pure(module) -> None:
    tree = ast.parse(pathlib.Path(module.__file__).read_text(encoding="utf-8"))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    allowed = {"__future__", "collections", "dataclasses", "enum", "json", "math", "re", "typing", "geo_r1_qgis"}
    assert roots <= allowed, roots - allowed


def test_returns_the_core_pixel_box() -> None:
    from geo_r1_qgis.core.geometry import PixelBox

    box = model_to_image_box((1, 2, 3, 4), (10, 10), (10, 10))
    assert isinstance(box, PixelBox)
    assert (box.x1, box.y1, box.x2, box.y2) == (1.0, 2.0, 3.0, 4.0)
    assert all(isinstance(v, float) for v in (box.x1, box.y1, box.x2, box.y2))
    assert not math.isnan(box.x1)
