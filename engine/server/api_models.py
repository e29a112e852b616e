"""The engine's request bodies (pydantic models) and their image decoding.

Every check here fails with an :class:`engine.server.security.ApiError` whose message names the bad field and
the fix: 400 malformed input (base64, image bytes, non-``data:`` URIs), 413 over a limit, 422 invalid
values. Decoding runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import base64
import binascii
import time
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.server.security import ApiError
from geo_r1_qgis.core.client import TILES_MEDIA_TYPE
from geo_r1_qgis.core.rules.coords import MAX_ASPECT_RATIO

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

#: Image formats the engine decodes (Pillow format names).
IMAGE_FORMATS = ("PNG", "JPEG", "TIFF", "WEBP")
#: Most alternatives per token OpenAI's API allows (and ``/v1/chat/completions`` accepts).
MAX_TOP_LOGPROBS = 20


# --------------------------------------------------------------------------------------------------
# Request models
# --------------------------------------------------------------------------------------------------


class _QueryIn(BaseModel):
    """What every grounding item asks: the expression, the task and whether to reason first."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    expression: str
    task: Literal["rec", "multi", "gres"] = "multi"
    reasoning: bool = True
    outline: bool | None = Field(
        default=None,
        description="masks from the engine's SAM (serve --sam), traced to polygons: default true for task gres "
        "(box + keypoints), false otherwise; true with rec/multi prompts SAM with each box alone",
    )


class _DecodingIn(BaseModel):
    """The decoding settings every grounding request carries."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_new_tokens: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="generation limit per item; default Geo-R1's: 256 for rec, 1024 for multi (mixed: the larger)",
    )
    do_sample: bool = False
    temperature: float = Field(default=1.0, gt=0.0, le=100.0, description="sampling temperature (with do_sample)")
    outline_tolerance_px: float = Field(
        default=1.0,
        ge=0.0,
        le=100.0,
        description="outline simplification (Douglas-Peucker), in pixels of the image: one pixel of a tile is "
        "its ground resolution; 0 keeps the traced pixel edges",
    )
    outline_min_area_px: float = Field(
        default=0.0, ge=0.0, description="outline parts smaller than this many pixels are dropped"
    )


class GroundItemIn(_QueryIn):
    """One item of ``POST /ground``: an encoded image (or raw RGB bytes) and an expression."""

    image: str | None = Field(default=None, description="base64 PNG/JPEG/TIFF/WebP bytes or a data: URI")
    rgb: str | None = Field(default=None, description="base64 raw row-major height×width×3 uint8")
    width: int | None = Field(default=None, ge=1, description="with rgb: width in pixels")
    height: int | None = Field(default=None, ge=1, description="with rgb: height in pixels")

    @model_validator(mode="after")
    def _one_image(self) -> GroundItemIn:
        if (self.image is None) == (self.rgb is None):
            raise ValueError("give exactly one of 'image' (encoded bytes) or 'rgb' (+ 'width', 'height')")
        if self.rgb is not None and (self.width is None or self.height is None):
            raise ValueError("'rgb' needs 'width' and 'height'")
        return self


class GroundRequest(_DecodingIn):
    items: list[GroundItemIn] = Field(min_length=1)


class TileItemIn(_QueryIn):
    """One item of ``POST /ground/tiles``: its pixels follow the JSON header, in item order."""

    width: int = Field(ge=1, description="width in pixels")
    height: int = Field(ge=1, description="height in pixels")


class TilesRequest(_DecodingIn):
    items: list[TileItemIn] = Field(min_length=1)


MAX_TILES_HEADER = 1 << 20


def split_tiles_body(body: bytes, max_pixels: int) -> tuple[TilesRequest, list[tuple[Image.Image, float]]]:
    """Parse a ``/ground/tiles`` body into its header and RGB images (400/422 on a bad body)."""
    from PIL import Image
    from pydantic import ValidationError

    t0 = time.perf_counter()
    if len(body) < 4:
        raise ApiError(400, f"a {TILES_MEDIA_TYPE} body starts with a 4-byte header length; got {len(body)} bytes")
    n = int.from_bytes(body[:4], "big")
    if not 2 <= n <= min(MAX_TILES_HEADER, len(body) - 4):
        raise ApiError(400, f"bad header length {n} in a {len(body)}-byte {TILES_MEDIA_TYPE} body")
    try:
        header = TilesRequest.model_validate_json(body[4 : 4 + n])
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in first.get("loc", ()))
        raise ApiError(422, f"header: {loc}: {first.get('msg')}") from None
    pixels = memoryview(body)[4 + n :]
    expected = 0
    for i, item in enumerate(header.items):
        _check_pixels(item.width, item.height, max_pixels, f"items[{i}]")
        expected += item.width * item.height * 3
    if len(pixels) != expected:
        raise ApiError(
            400,
            f"the body holds {len(pixels)} bytes of pixels, but the header's items need {expected} "
            "(row-major RGB uint8, items in order)",
        )
    images, offset = [], 0
    per_item_ms = (time.perf_counter() - t0) * 1000.0 / len(header.items)
    for item in header.items:
        size = item.width * item.height * 3
        t = time.perf_counter()
        image = Image.frombytes("RGB", (item.width, item.height), pixels[offset : offset + size])
        images.append((image, per_item_ms + (time.perf_counter() - t) * 1000.0))
        offset += size
    return header, images


class AdapterIn(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    path: str = Field(min_length=1)


class ActiveAdapterIn(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str | None


class JobIn(BaseModel):
    """``POST /jobs``: fine-tune the engine's model on an annotation GeoPackage (a job of its own process)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    annotations: str = Field(
        min_length=1, description="absolute path of an annotation GeoPackage (layer geo_r1_annotations)"
    )
    recipe: Literal["sft", "grpo", "dapo"] = Field(default="grpo", description="train/recipes/<recipe>.yaml")
    max_steps: int | None = Field(default=None, ge=1, description="optimiser steps (default: the recipe's)")
    max_seconds: float | None = Field(default=None, gt=0, description="a wall-clock budget for training")
    gsd: float | None = Field(default=None, gt=0, description="working ground resolution in metres (default: native)")
    chip: int | None = Field(
        default=None, description="chip side in pixels, a multiple of 28 (default: the model's tile, else 504)"
    )
    name: str | None = Field(default=None, min_length=1, max_length=64, description="default: <file>-<recipe>")
    init_adapter: str | None = Field(default=None, description="an adapter directory to continue training")
    eval_limit: int | None = Field(default=None, ge=1, description="score at most this many held-out queries")
    eval_max_new_tokens: int | None = Field(
        default=None, ge=1, le=4096, description="generation limit of the evaluation (default: Geo-R1's 256 for rec)"
    )
    options: dict[str, Any] | None = Field(
        default=None, description='more training options, as in a recipe (e.g. {"learning_rate": 5e-4})'
    )


class ResumeIn(BaseModel):
    """``POST /jobs/{id}/resume``: optionally a new budget (steps counted from the start of the job)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_steps: int | None = Field(default=None, ge=1)
    max_seconds: float | None = Field(default=None, gt=0)


class JobCurves(BaseModel):
    """Learning curves from train_log.jsonl, aligned on step; a missing value is null."""

    step: list[int]
    reward: list[float | None]
    format: list[float | None]
    iou: list[float | None]
    loss: list[float | None]


class JobSummary(BaseModel):
    """A job as ``GET /jobs`` lists it."""

    id: str
    name: str | None
    state: Literal["queued", "building", "training", "evaluating", "done", "failed", "cancelled"]
    recipe: str | None
    created: str | None
    started: str | None
    ended: str | None
    step: int
    max_steps: int | None
    max_seconds: float | None = None
    elapsed_s: float | None
    eta_s: float | None = Field(description="seconds of training left; null if unknown")
    error: str | None = Field(description="why it failed, in words a user reads")
    adapter: str | None = Field(description="absolute path of the adapter directory, once it exists")
    report: str | None = Field(description="absolute path of report.md, once written")
    metrics: dict[str, Any] | None = Field(
        description='{"base": {...}, "adapter": {...}}: train/evaluate.py\'s scores on the held-out split'
    )
    annotations: str | None = None
    annotations_sha256: str | None = Field(description="sha256 of the job's copy of the annotation file")
    dataset: str
    chip: int | None = None
    gsd: float | None = None
    eval_split: str | None = None
    device_note: str | None
    pid: int | None = None
    cancel_requested: bool = False
    resumable: bool = False
    job_dir: str | None = None
    log: str | None = None


class JobOut(JobSummary):
    """One job: its record, learning curves and the last lines of its log."""

    curves: JobCurves
    log_tail: list[str]


class JobList(BaseModel):
    jobs: list[JobSummary]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    stream: bool | None = None
    n: int | None = None
    stop: str | list[str] | None = None


# --------------------------------------------------------------------------------------------------
# Image decoding (runs in a worker thread)
# --------------------------------------------------------------------------------------------------


def _b64decode(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    compact = "".join(text.split())  # base64 wrapped over lines
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where} is not valid base64") from None


def split_data_uri(uri: str, where: str) -> bytes:
    """The bytes of a ``data:[<mime>];base64,<payload>`` URI (400 for anything else)."""
    if not uri.startswith("data:"):
        raise ApiError(
            400,
            f"{where}: only inline images are accepted (the engine never fetches URLs); "
            "send data:image/png;base64,<bytes>",
        )
    header, sep, payload = uri[5:].partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise ApiError(400, f"{where}: a data: URI must be base64-encoded (data:image/png;base64,...)")
    return _b64decode(payload, where)


def _check_pixels(width: int, height: int, max_pixels: int, where: str) -> None:
    if width * height > max_pixels:
        raise ApiError(
            413,
            f"{where}: the image is {width}×{height} = {width * height} pixels, more than the engine's "
            f"limit of {max_pixels} (--max-image-pixels); send smaller tiles",
        )
    if max(width, height) / max(1, min(width, height)) > MAX_ASPECT_RATIO:
        raise ApiError(
            422,
            f"{where}: the image is {width}×{height}, more than {MAX_ASPECT_RATIO}:1; the model cannot read it, "
            "crop or tile it closer to square",
        )


def open_image(data: bytes, max_pixels: int, where: str) -> Image.Image:
    """Decode encoded image bytes to RGB, checking the pixel count from the header first."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise ApiError(413, f"{where}: the image has too many pixels (--max-image-pixels)") from None
    except UnidentifiedImageError:
        raise ApiError(400, f"{where}: the bytes are not a PNG, JPEG, TIFF or WebP image") from None
    except Exception as exc:
        raise ApiError(400, f"{where}: cannot read the image header ({type(exc).__name__}: {exc})") from None
    width, height = image.size
    _check_pixels(width, height, max_pixels, where)
    try:
        image.load()
        return image.convert("RGB") if image.mode != "RGB" else image
    except MemoryError:
        raise
    except Image.DecompressionBombError:
        raise ApiError(413, f"{where}: the image has too many pixels (--max-image-pixels)") from None
    except Exception as exc:  # truncated or corrupt data: many exception kinds come out of decoders
        raise ApiError(400, f"{where}: corrupt {image.format} image ({type(exc).__name__}: {exc})") from None


def decode_ground_item(item: GroundItemIn, index: int, max_pixels: int) -> tuple[Image.Image, float]:
    """The RGB image of one ``/ground`` item and the milliseconds it took to decode."""
    t0 = time.perf_counter()
    if item.image is not None:
        where = f"items[{index}].image"
        text = item.image.strip()
        data = split_data_uri(text, where) if text.startswith("data:") else _b64decode(text, where)
        image = open_image(data, max_pixels, where)
    else:
        from PIL import Image

        where = f"items[{index}].rgb"
        assert item.width is not None and item.height is not None  # checked by the model validator
        _check_pixels(item.width, item.height, max_pixels, where)
        data = _b64decode(item.rgb or "", where)
        expected = item.width * item.height * 3
        if len(data) != expected:
            raise ApiError(
                400,
                f"{where} holds {len(data)} bytes, but {item.width}×{item.height}×3 = {expected} are "
                "expected (row-major RGB, uint8)",
            )
        image = Image.frombytes("RGB", (item.width, item.height), data)
    return image, (time.perf_counter() - t0) * 1000.0


class ErrorDetail(BaseModel):
    """What went wrong: a message that says what to do, an OpenAI-style type, and the HTTP status."""

    message: str
    type: str
    code: int


class ErrorOut(BaseModel):
    """Every error response of the engine: ``{"error": {"message", "type", "code"}}``."""

    error: ErrorDetail


#: What each error status means on this engine (the OpenAPI description of every route lists its own).
ERROR_STATUSES: dict[int, str] = {
    400: "a Host header that is not loopback (DNS rebinding), a body that is not valid JSON, or a corrupt image",
    401: "no bearer token, or not the engine's",
    404: "an unknown adapter, model, job or route",
    409: "a job clashes: one of that name is running, or it has already ended",
    413: "over a limit: body size, image pixels, items per request",
    422: "invalid values (the message names them)",
    500: "a bug; the engine logs it and goes on serving",
    502: "the OpenAI-compatible server behind --backend openai failed",
    503: "out of memory for this request (the engine goes on serving), a /shutdown it cannot do here, or no "
    "training extras for /jobs (pip install 'geo-r1[train]')",
}


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """FastAPI ``responses=`` for these statuses, each with :class:`ErrorOut`."""
    return {s: {"model": ErrorOut, "description": ERROR_STATUSES[s]} for s in statuses}
