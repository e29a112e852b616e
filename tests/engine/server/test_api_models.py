"""engine/api_models.py: request models and image decoding, on tiny literal images (no server)."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image
from pydantic import ValidationError

from engine.server.api_models import (
    GroundItemIn,
    decode_ground_item,
    open_image,
    split_data_uri,
    split_tiles_body,
)
from engine.server.security import ApiError
from geo_r1_qgis.core.rules.coords import MAX_ASPECT_RATIO


def _png(width=3, height=2, mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def _tiles_body(header, pixels):
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(4, "big") + raw + pixels


# -- request models -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"image": "AAAA", "rgb": "AAAA", "width": 1, "height": 1},  # both
        {},  # neither
        {"rgb": "AAAA", "width": 1},  # rgb without height
    ],
)
def test_a_ground_item_needs_exactly_one_image(fields):
    with pytest.raises(ValidationError):
        GroundItemIn(expression="tanks", **fields)


# -- data: URIs and encoded images ----------------------------------------------------------------


def test_split_data_uri_returns_the_bytes_and_accepts_wrapped_base64():
    payload = base64.b64encode(b"\x00\x01\x02" * 40).decode()
    wrapped = "\n".join(payload[i : i + 20] for i in range(0, len(payload), 20))
    assert split_data_uri(f"data:image/png;base64,{wrapped}", "x") == b"\x00\x01\x02" * 40


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("https://example.com/a.png", "never fetches URLs"),
        ("data:image/png,rawbytes", "base64-encoded"),
        ("data:image/png;base64,@@@", "not valid base64"),
    ],
)
def test_split_data_uri_refuses_anything_else_with_400(uri, message):
    with pytest.raises(ApiError, match=message) as info:
        split_data_uri(uri, "image 0")
    assert info.value.status_code == 400


def test_open_image_converts_to_rgb():
    image = open_image(_png(mode="L"), 100, "x")
    assert image.mode == "RGB" and image.size == (3, 2)


def test_open_image_refuses_bytes_that_are_no_image():
    with pytest.raises(ApiError, match="not a PNG, JPEG, TIFF or WebP") as info:
        open_image(b"GIF89a not really", 100, "x")
    assert info.value.status_code == 400


def test_open_image_checks_the_pixel_count_from_the_header():
    with pytest.raises(ApiError, match="--max-image-pixels") as info:
        open_image(_png(4, 4), 15, "x")
    assert info.value.status_code == 413


# -- /ground items ----------------------------------------------------------------------------------


def test_decode_ground_item_reads_raw_rgb_and_encoded_images():
    rgb = GroundItemIn(rgb=base64.b64encode(bytes(range(6))).decode(), width=2, height=1, expression="x")
    image, ms = decode_ground_item(rgb, 0, 100)
    assert image.size == (2, 1) and image.getpixel((1, 0)) == (3, 4, 5) and ms >= 0.0
    png = GroundItemIn(image=base64.b64encode(_png()).decode(), expression="x")
    assert decode_ground_item(png, 0, 100)[0].size == (3, 2)


@pytest.mark.parametrize(
    ("width", "height", "nbytes", "status", "message"),
    [
        (2, 2, 6, 400, r"items\[1\].rgb holds 6 bytes"),
        (40, 40, 3, 413, "--max-image-pixels"),
        (MAX_ASPECT_RATIO + 1, 1, 3 * (MAX_ASPECT_RATIO + 1), 422, "closer to square"),
    ],
)
def test_decode_ground_item_refuses_bad_raw_rgb(width, height, nbytes, status, message):
    item = GroundItemIn(rgb=base64.b64encode(bytes(nbytes)).decode(), width=width, height=height, expression="x")
    with pytest.raises(ApiError, match=message) as info:
        decode_ground_item(item, 1, 1000)
    assert info.value.status_code == status


# -- /ground/tiles bodies -------------------------------------------------------------------------


def test_split_tiles_body_cuts_the_pixels_in_item_order():
    header = {"items": [{"width": 1, "height": 1, "expression": "a"}, {"width": 2, "height": 1, "expression": "b"}]}
    body, images = split_tiles_body(_tiles_body(header, bytes(range(9))), 100)
    assert [it.expression for it in body.items] == ["a", "b"]
    assert images[0][0].getpixel((0, 0)) == (0, 1, 2)
    assert images[1][0].size == (2, 1) and images[1][0].getpixel((1, 0)) == (6, 7, 8)


@pytest.mark.parametrize(
    ("raw", "status", "message"),
    [
        (b"\x00\x00", 400, "4-byte header length"),
        (b"\x00\x00\xff\xff{}", 400, "bad header length"),
        (_tiles_body({"items": []}, b""), 422, "header: items"),
        (_tiles_body({"items": [{"width": 1, "height": 1, "expression": "a"}]}, b"\x00\x00"), 400, "2 bytes of pixels"),
    ],
)
def test_split_tiles_body_refuses_a_bad_body(raw, status, message):
    with pytest.raises(ApiError, match=message) as info:
        split_tiles_body(raw, 100)
    assert info.value.status_code == status
