"""Outlines from a real engine: ``geo-r1 serve --sam`` with the tiny SAM 2 (random weights) and the format-trained
tiny Qwen; the keypoint matching of engine/outlines.py on literal answers; the refusal without --sam."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _serve_helpers import assert_error, b64, data_uri, encoded, noise_image, serving

from engine.outlines import keypoints_for_boxes, wants_outline
from engine.runtime.backend import item_result
from geo_r1_qgis.core.rules.parsing import parse_output

shapely = pytest.importorskip("shapely", reason="polygon validity is checked with shapely (the [train] extra)")
from shapely.geometry import MultiPolygon, Polygon, box  # noqa: E402


@pytest.fixture(scope="module")
def engine(tiny_format_model_dir, tiny_sam_dir, tmp_path_factory):
    args = ["--model", str(tiny_format_model_dir), "--sam", str(tiny_sam_dir), "--batch-size", "4"]
    yield from serving(tmp_path_factory.mktemp("engine-sam"), args)


@pytest.fixture(scope="module")
def engine_without_sam(tiny_format_model_dir, tmp_path_factory):
    yield from serving(tmp_path_factory.mktemp("engine-nosam"), ["--model", str(tiny_format_model_dir)])


def shape(outline) -> MultiPolygon:
    return MultiPolygon([Polygon(p[0], p[1:]) for p in outline])


def check_outlines(item: dict, size: tuple[int, int]) -> int:
    """Every box's outline is valid, inside its box and the image; returns how many boxes had a non-empty one."""
    filled = 0
    for b in item["boxes"]:
        assert "outline" in b, b
        if not b["outline"]:
            continue
        filled += 1
        poly = shape(b["outline"])
        assert poly.is_valid
        x1, y1, x2, y2 = b["bbox"]
        # Eq. 7: the mask is clipped to the box as int() truncates it; pixels are whole
        assert box(int(x1), int(y1), int(x2), int(y2)).buffer(1e-9).contains(poly)
        assert box(0, 0, *size).contains(poly)
    return filled


def test_info_names_the_sam(engine) -> None:
    with engine.client() as api:
        info = api.get("/info").json()
    assert info["sam"] and "tiny-sam" in info["sam"]


def test_refine_to_outline_on_multi_boxes(engine) -> None:
    images = [noise_image(504, 504, seed=s) for s in range(3)]
    body = {"items": [{"image": data_uri(im), "expression": "storage tanks", "task": "multi", "outline": True}
                      for im in images], "max_new_tokens": 160}  # fmt: skip
    with engine.client() as api:
        r = api.post("/ground", json=body)
    assert r.status_code == 200, r.text[:500]
    items = r.json()["items"]
    n_boxes = sum(len(it["boxes"]) for it in items)
    assert n_boxes > 0, [it["raw_text"] for it in items]  # the format model answers boxes on these tiles
    filled = sum(check_outlines(it, (504, 504)) for it in items)
    assert filled > 0
    assert all("sam" in it["timings_ms"] and "trace" in it["timings_ms"] for it in items)
    assert all("keypoints" not in b for it in items for b in it["boxes"])


def test_multi_without_outline_has_none(engine) -> None:
    body = {"items": [{"image": data_uri(noise_image(504, 504)), "expression": "tanks", "task": "multi"}],
            "max_new_tokens": 120}  # fmt: skip
    with engine.client() as api:
        item = api.post("/ground", json=body).json()["items"][0]
    assert all("outline" not in b for b in item["boxes"])
    assert "sam" not in item["timings_ms"]


def test_gres_over_raw_tiles_with_coarse_tolerance(engine) -> None:
    tiles = [np.asarray(noise_image(448, 336, seed=s)) for s in (5, 6)]

    header = {"items": [{"width": 448, "height": 336, "expression": "the buildings", "task": "gres"} for _ in tiles],
              "max_new_tokens": 200, "outline_tolerance_px": 3.0}  # fmt: skip

    head = json.dumps(header).encode()
    body = len(head).to_bytes(4, "big") + head + b"".join(t.tobytes() for t in tiles)
    with engine.client() as api:
        r = api.post("/ground/tiles", content=body, headers={"Content-Type": "application/x-geo-r1-tiles"})
    assert r.status_code == 200, r.text[:500]
    for item in r.json()["items"]:
        check_outlines(item, (448, 336))
        for b in item["boxes"]:
            assert isinstance(b["keypoints"], list)


def test_an_engine_without_sam_refuses_outlines_and_says_how(engine_without_sam) -> None:
    im = b64(encoded(noise_image(64, 64)))
    with engine_without_sam.client() as api:
        for extra in ({"task": "gres"}, {"task": "rec", "outline": True}):
            r = api.post("/ground", json={"items": [{"image": im, "expression": "tank", **extra}]})
            assert_error(r, 422, "no SAM", "--sam")
        ok = api.post("/ground", json={"items": [{"image": im, "expression": "tank", "task": "gres", "outline": False}],
                                       "max_new_tokens": 16})  # fmt: skip
        assert ok.status_code == 200, ok.text[:300]
        assert api.get("/info").json()["sam"] is None


def test_wants_outline() -> None:
    assert wants_outline("gres", None) and not wants_outline("gres", False)
    assert not wants_outline("multi", None) and wants_outline("rec", True)


GRES_TEXT = (
    "<think> two tanks </think><answer>```json\n["
    '{"bbox_2d": [28, 56, 84, 112], "keypoint1": [56, 84], "keypoint2": [40, 70]}, '
    '{"bbox_2d": [200, 100, 300, 180], "keypoint1": [250, 140], "keypoint2": [260, 150]}'
    "]\n```</answer>"
)


@pytest.mark.parametrize("frame", ["model", "image"])
def test_keypoints_follow_their_boxes_into_the_image_frame(frame: str) -> None:
    parsed = parse_output(GRES_TEXT, "gres")
    model_size, image_size = (504, 504), (512, 512)
    result = item_result(GRES_TEXT, parsed, (1.0, 1.0), 1.0, model_size, image_size, 10, {}, box_frame=frame)
    points = keypoints_for_boxes(result, frame)
    k = 512 / 504 if frame == "model" else 1.0
    assert len(points) == 2
    flat = [v for pts in points for p in pts for v in p]
    assert flat == pytest.approx([v * k for v in (56, 84, 40, 70, 250, 140, 260, 150)])


def test_a_box_without_keypoints_is_prompted_alone() -> None:
    text = '<think> t </think><answer>[{"bbox_2d": [10, 10, 50, 50], "label": "tank"}]</answer>'
    result = item_result(text, parse_output(text, "gres"), (1.0,), 1.0, (504, 504), (504, 504), 5, {})
    assert len(result.boxes) == 1
    assert keypoints_for_boxes(result, "model") == [()]
