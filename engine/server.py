"""``geo-r1 serve``: the grounding engine over HTTP, on 127.0.0.1, behind a bearer token.

The server is a thin boundary around a :class:`engine.backend.Backend`: it checks and decodes
requests, hands the work to the backend from a worker thread (the backend batches concurrent
requests itself, the event loop never blocks), and turns every failure into a JSON error body of
one shape, ``{"error": {"message", "type", "code"}}``, with a 4xx or 5xx status.

Routes (all but ``GET /health`` need ``Authorization: Bearer <token>``)
------------------------------------------------------------------------
=====================  ==========================================================================
GET  /health           ``{"status": "ok", "engine_version"}``; no details, no token needed
GET  /info             the backend's info, engine and prompt versions, limits, batch size
POST /ground           Geo-R1 grounding of base64 images (PNG/JPEG/TIFF/WebP or raw RGB)
GET  /adapters         ``{"active", "available"}``
POST /adapters         ``{"name", "path"}``: load a LoRA adapter
POST /adapters/active  ``{"name": str | null}``: switch adapters (null: the base model)
GET  /v1/models        OpenAI-compatible model list (one model)
POST /v1/chat/completions  OpenAI-compatible chat (inline ``data:`` images only, no streaming)
GET  /openapi.json     the OpenAPI schema
=====================  ==========================================================================

Status codes: 400 malformed input (bad JSON, base64 or image bytes, non-``data:`` image URLs,
unsupported options such as ``stream``) or a Host header that is not this machine (DNS-rebinding
guard), 401 missing or wrong token, 404 unknown route, model or adapter, 413 too large (body,
pixels, number of items), 422 invalid values, 500 an unexpected engine error, 502 the remote server
of ``--backend openai`` failed, 503 out of memory. The server keeps serving after any of them.

Security model: the engine binds 127.0.0.1 unless told otherwise. A browser page cannot use it:
it cannot read the token file, the Host check defeats DNS rebinding, and no CORS headers are sent.
The token lives in a 0600 file (``geo-r1 serve`` refuses a token file other users can read), is
compared in constant time and is never logged.

Decoding options of ``/v1/chat/completions`` follow OpenAI's, except that an omitted (or zero)
``temperature`` decodes greedily, as Geo-R1 is evaluated; ``top_p``, ``seed`` and other sampling
fields are accepted and ignored.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import ipaddress
import json
import logging
import os
import secrets
import socket
import stat
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import anyio
import anyio.to_thread
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException
from starlette.requests import Request

from geo_r1_qgis.core.client import DEFAULT_PORT, TILES_MEDIA_TYPE, default_token_path
from geo_r1_qgis.core.errors import (
    ConfigError,
    EngineOverloadedError,
    EngineRequestError,
    EngineUnavailableError,
    ExtentError,
    GeoR1Error,
    ModelNotFoundError,
    RasterError,
)

from . import __version__ as ENGINE_VERSION
from .backend import Backend, GenerationSettings, GroundItem
from .coords import MAX_ASPECT_RATIO
from .prompts import MAX_EXPRESSION_CHARS, PROMPT_VERSION

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Host names that always mean "this machine" (the Host header check accepts them with any port).
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
#: Bind addresses that listen on every interface.
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})  # nosec B104 - names, used to detect a wildcard bind
#: Routes that need no token.
PUBLIC_PATHS = frozenset({"/health"})
#: Image formats the engine decodes (Pillow format names).
IMAGE_FORMATS = ("PNG", "JPEG", "TIFF", "WEBP")
#: Most alternatives per token OpenAI's API allows (and ``/v1/chat/completions`` accepts).
MAX_TOP_LOGPROBS = 20

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    422: "invalid_request_error",
    500: "server_error",
    502: "upstream_error",
    503: "overloaded_error",
}


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``geo-r1 serve`` needs; checks itself and names the fix for a bad value."""

    # Model (--backend local)
    model: str | None = field(default=None, metadata={"help": "model id or directory (Qwen2.5-VL)"})
    processor: str | None = field(default=None, metadata={"help": "processor id or directory (default: the model's)"})
    adapters: tuple[tuple[str, str], ...] = field(
        default=(), metadata={"help": "LoRA adapters to load at start, NAME=PATH (repeatable)"}
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N or mps"})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16"})
    batch_size: int = field(default=8, metadata={"help": "most items generated in one batch"})
    # Network
    host: str = field(
        default="127.0.0.1", metadata={"help": "address to bind; anything but loopback is reachable by others"}
    )
    port: int = field(default=DEFAULT_PORT, metadata={"help": "TCP port"})
    token_file: Path | None = field(
        default=None,
        metadata={"help": "bearer token file, created (0600) on first start (default: %(default)s)"},
    )
    # Remote backend (--backend openai)
    backend: str = field(
        default="local",
        metadata={"help": "local: run the model here; openai: forward to an OpenAI-compatible server"},
    )
    base_url: str | None = field(
        default=None, metadata={"help": "with --backend openai: the server's URL, e.g. http://127.0.0.1:8000/v1"}
    )
    api_key_env: str | None = field(
        default=None, metadata={"help": "with --backend openai: environment variable holding its API key"}
    )
    remote_model: str | None = field(
        default=None, metadata={"help": "with --backend openai: model name (default: its first model)"}
    )
    concurrency: int = field(default=8, metadata={"help": "requests handed to the backend at once"})
    # Limits
    max_body_mb: float = field(default=64.0, metadata={"help": "largest request body, in MiB"})
    max_image_pixels: int = field(default=16_777_216, metadata={"help": "largest image, width × height"})
    max_items: int = field(default=64, metadata={"help": "most items (or images) in one request"})
    max_expression_chars: int = field(default=500, metadata={"help": "longest referring expression"})
    memory_headroom_gb: float | None = field(
        default=None,
        metadata={
            "help": "CPU only: memory a request may use beyond the loaded model, in GB; a request that needs more "
            "gets 503 instead of pushing the desktop into swap (Linux/macOS address-space limit)"
        },
    )

    def __post_init__(self) -> None:
        if self.backend not in ("local", "openai"):
            raise ConfigError(f"--backend must be 'local' or 'openai', got {self.backend!r}")
        if self.backend == "local":
            if not self.model:
                raise ConfigError(
                    "--model is required with --backend local: pass a model id or directory, "
                    "e.g. --model Geo-R1/Geo-R1-3B-GRPO-REC-10shot --processor Qwen/Qwen2.5-VL-3B-Instruct"
                )
            if self.base_url:
                raise ConfigError("--base-url is only used with --backend openai; add --backend openai")
        else:
            if not self.base_url or not self.base_url.startswith(("http://", "https://")):
                raise ConfigError(
                    "--backend openai needs --base-url with an http(s) URL of an OpenAI-compatible server, "
                    f"e.g. --base-url http://127.0.0.1:8000/v1 (got {self.base_url!r})"
                )
            if self.adapters:
                raise ConfigError(
                    "--adapter only applies to --backend local; with --backend openai load adapters on the "
                    "remote server (vLLM: --enable-lora --lora-modules NAME=PATH) and pass --remote-model NAME"
                )
        for name, path in self.adapters:
            if not name or not path:
                raise ConfigError(f"--adapter must be NAME=PATH, got {name}={path}")
        if not self.host.strip():
            raise ConfigError("--host is empty: use 127.0.0.1 (this machine only)")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"--port must be within 1..65535, got {self.port}")
        for name in ("concurrency", "batch_size", "max_image_pixels", "max_items"):
            value = getattr(self, name)
            if value < 1:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if not self.max_body_mb > 0:
            raise ConfigError(f"--max-body-mb must be > 0, got {self.max_body_mb}")
        if not 1 <= self.max_expression_chars <= MAX_EXPRESSION_CHARS:
            raise ConfigError(
                f"--max-expression-chars must be within 1..{MAX_EXPRESSION_CHARS} (the prompt builder's "
                f"limit), got {self.max_expression_chars}"
            )
        token_file = Path(self.token_file).expanduser() if self.token_file else default_token_path()
        object.__setattr__(self, "token_file", token_file)
        object.__setattr__(self, "adapters", tuple((str(n), str(p)) for n, p in self.adapters))

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def limits(self) -> dict[str, int]:
        return {
            "max_body_bytes": self.max_body_bytes,
            "max_image_pixels": self.max_image_pixels,
            "max_items": self.max_items,
            "max_expression_chars": self.max_expression_chars,
        }

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeConfig:
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        values["adapters"] = tuple(_parse_adapter(a) for a in (args.adapter or ()))
        return cls(**values)


def _parse_adapter(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise ConfigError(f"--adapter must be NAME=PATH, e.g. --adapter rec10=./runs/rec10, got {text!r}")
    return name.strip(), path.strip()


def _help(name: str) -> str:
    spec = next(f for f in dataclasses.fields(ServeConfig) if f.name == name)
    text = spec.metadata.get("help", "")
    return text if spec.default in (None, ()) else text + " (default: %(default)s)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``geo-r1 serve`` options (see :class:`ServeConfig` for their meaning)."""
    model = parser.add_argument_group("model (--backend local)")
    model.add_argument("--model", help=_help("model"))
    model.add_argument("--processor", help=_help("processor"))
    model.add_argument("--adapter", action="append", metavar="NAME=PATH", help=_help("adapters"))
    model.add_argument("--device", default="auto", help=_help("device"))
    model.add_argument("--dtype", default="auto", help=_help("dtype"))
    model.add_argument("--batch-size", type=int, default=8, help=_help("batch_size"))
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help=_help("host"))
    net.add_argument("--port", type=int, default=DEFAULT_PORT, help=_help("port"))
    net.add_argument(
        "--token-file", type=Path, default=None, help=_help("token_file") % {"default": default_token_path()}
    )
    remote = parser.add_argument_group("remote backend (--backend openai)")
    remote.add_argument("--backend", choices=("local", "openai"), default="local", help=_help("backend"))
    remote.add_argument("--base-url", help=_help("base_url"))
    remote.add_argument("--api-key-env", metavar="VAR", help=_help("api_key_env"))
    remote.add_argument("--remote-model", metavar="NAME", help=_help("remote_model"))
    remote.add_argument("--concurrency", type=int, default=8, help=_help("concurrency"))
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-body-mb", type=float, default=64.0, help=_help("max_body_mb"))
    limits.add_argument("--max-image-pixels", type=int, default=16_777_216, help=_help("max_image_pixels"))
    limits.add_argument("--max-items", type=int, default=64, help=_help("max_items"))
    limits.add_argument("--max-expression-chars", type=int, default=500, help=_help("max_expression_chars"))
    limits.add_argument("--memory-headroom-gb", type=float, help=_help("memory_headroom_gb"))


# --------------------------------------------------------------------------------------------------
# Token file
# --------------------------------------------------------------------------------------------------


def ensure_token(path: str | os.PathLike[str]) -> str:
    """Return the engine's bearer token, creating the file (0600, parent 0700) on first start.

    An existing file is reused; one that other users can read is refused (ConfigError naming the fix).
    """
    path = Path(path).expanduser()
    if path.exists() or path.is_symlink():
        return _read_token(path)
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
    token = secrets.token_urlsafe(32)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:  # another engine created it just now: use theirs
        return _read_token(path)
    except OSError as exc:
        raise ConfigError(f"cannot create the token file {path}: {exc.strerror}; pass --token-file") from None
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    os.chmod(path, 0o600)
    log.info("created a new engine token in %s", path)
    return token


def _read_token(path: Path) -> str:
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"cannot read the token file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"the token file {path} is not a regular file; pass another --token-file")
    if os.name != "nt" and st.st_mode & 0o077:
        raise ConfigError(
            f"the token file {path} can be read by other users (mode {stat.S_IMODE(st.st_mode):04o}): "
            f"run  chmod 600 {path}  (or delete it and the engine writes a new one)"
        )
    token = path.read_text(encoding="utf-8").strip()
    if not token:
        raise ConfigError(f"the token file {path} is empty: delete it and the engine writes a new one")
    return token


# --------------------------------------------------------------------------------------------------
# Errors and ASGI middleware (pure: no FastAPI)
# --------------------------------------------------------------------------------------------------


class ApiError(HTTPException):
    """An HTTP error with a message for the client (rendered as ``{"error": {...}}``)."""

    def __init__(
        self, status: int, message: str, error_type: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.error_type = error_type or _ERROR_TYPES.get(status, "invalid_request_error")


class BodyTooLargeError(ApiError):
    """Raised from ``receive`` once a request body passes the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"the request body is larger than the engine's limit of {limit} bytes (--max-body-mb): "
            "send fewer or smaller images per request",
        )


def error_body(status: int, message: str, error_type: str | None = None) -> dict[str, Any]:
    """The JSON body of every error response."""
    return {
        "error": {
            "message": message,
            "type": error_type or _ERROR_TYPES.get(status, "invalid_request_error"),
            "code": status,
        }
    }


async def send_error(
    send: Send, status: int, message: str, error_type: str | None = None, headers: dict[str, str] | None = None
) -> None:
    """Send a complete JSON error response on a raw ASGI ``send``."""
    body = json.dumps(error_body(status, message, error_type)).encode("utf-8")
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413, counting bytes as they arrive.

    A declared ``Content-Length`` over the limit is refused before anything is read. Otherwise (no
    Content-Length, chunked, or a short declaration) the bytes are counted as the app receives them,
    and the read that passes the limit raises :class:`BodyTooLargeError`, which the app's error handler
    (or this middleware, if the app lets it through) turns into a 413 response.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                await send_error(send, 400, f"invalid Content-Length header {declared!r}")
                return
            if too_big:
                await send_error(send, 413, BodyTooLargeError(self.max_bytes).detail)
                return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLargeError as exc:
            if started:
                raise
            await send_error(send, 413, exc.detail)


def split_host_header(value: str | None) -> str | None:
    """The host name of a Host header (lower case, IPv6 without brackets), or None if malformed."""
    if value is None:
        return None
    text = value.strip().lower()
    if not text:
        return None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        name, rest = text[1:end], text[end + 1 :]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return None
        return name or None
    if text.count(":") > 1:  # an IPv6 address must be bracketed in a Host header
        return None
    name, sep, port = text.partition(":")
    if sep and not port.isdigit():
        return None
    return name or None


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_allowed(host_header: str | None, bound_host: str) -> bool:
    """Whether a request's Host header names this machine (the DNS-rebinding guard).

    Accepted: 127.0.0.1, localhost and ::1 (any port) and the bound address. When bound to a wildcard
    (0.0.0.0 or ::), any IP literal is accepted too: DNS rebinding needs a host NAME, and clients on
    other machines can only reach a wildcard-bound engine by one of its addresses.
    """
    name = split_host_header(host_header)
    if name is None:
        return False
    bound = bound_host.strip().strip("[]").lower()
    if name in LOOPBACK_HOSTS or name == bound:
        return True
    return bound in WILDCARD_HOSTS and _is_ip_literal(name)


class HostCheckMiddleware:
    """Answer 400 to requests whose Host header is missing or is not this machine (DNS rebinding)."""

    def __init__(self, app: ASGIApp, bound_host: str) -> None:
        self.app = app
        self.bound_host = bound_host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            value = _header(scope, b"host")
            if value is None or split_host_header(value) is None:
                await send_error(send, 400, f"missing or malformed Host header {value!r}", "invalid_host")
                return
            if not host_allowed(value, self.bound_host):
                await send_error(
                    send,
                    400,
                    f"Host {value!r} is not this engine: use http://127.0.0.1:<port> "
                    "(requests for other host names are refused to stop DNS rebinding)",
                    error_type="invalid_host",
                )
                return
        await self.app(scope, receive, send)


class TokenAuthMiddleware:
    """Require ``Authorization: Bearer <token>`` on every route except :data:`PUBLIC_PATHS`.

    Runs before the body is read, so an unauthenticated client never gets its body parsed.
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        if not token:
            raise ConfigError("the engine token is empty")
        self.app = app
        self._token = token.encode("utf-8")

    def authorized(self, header: str | None) -> bool:
        scheme, _, value = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return secrets.compare_digest(value.strip().encode("utf-8", "replace"), self._token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        public = scope["type"] != "http" or scope.get("path") in PUBLIC_PATHS
        if not public and not self.authorized(_header(scope, b"authorization")):
            await send_error(
                send,
                401,
                "missing or wrong bearer token: send 'Authorization: Bearer <token>' with the token "
                "from the engine's token file (logged by geo-r1 serve at start)",
                headers={"WWW-Authenticate": "Bearer"},
            )
            return
        await self.app(scope, receive, send)


# --------------------------------------------------------------------------------------------------
# Request models
# --------------------------------------------------------------------------------------------------


class GroundItemIn(BaseModel):
    """One item of ``POST /ground``: an encoded image (or raw RGB bytes) and an expression."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(default=None, description="base64 PNG/JPEG/TIFF/WebP bytes or a data: URI")
    rgb: str | None = Field(default=None, description="base64 raw row-major height×width×3 uint8")
    width: int | None = Field(default=None, ge=1, description="with rgb: width in pixels")
    height: int | None = Field(default=None, ge=1, description="with rgb: height in pixels")
    expression: str
    task: Literal["rec", "multi"] = "multi"
    reasoning: bool = True

    @model_validator(mode="after")
    def _one_image(self) -> GroundItemIn:
        if (self.image is None) == (self.rgb is None):
            raise ValueError("give exactly one of 'image' (encoded bytes) or 'rgb' (+ 'width', 'height')")
        if self.rgb is not None and (self.width is None or self.height is None):
            raise ValueError("'rgb' needs 'width' and 'height'")
        return self


class GroundRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[GroundItemIn] = Field(min_length=1)
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0


class TileItemIn(BaseModel):
    """One item of ``POST /ground/tiles``: its pixels follow the JSON header, in item order."""

    model_config = ConfigDict(extra="forbid")

    width: int = Field(ge=1, description="width in pixels")
    height: int = Field(ge=1, description="height in pixels")
    expression: str
    task: Literal["rec", "multi"] = "multi"
    reasoning: bool = True


class TilesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[TileItemIn] = Field(min_length=1)
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0


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
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    path: str = Field(min_length=1)


class ActiveAdapterIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore")

    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

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


# --------------------------------------------------------------------------------------------------
# Error mapping
# --------------------------------------------------------------------------------------------------


def status_for(exc: BaseException) -> int:
    """The HTTP status of an exception coming out of a backend."""
    if isinstance(exc, HTTPException):
        return exc.status_code
    if isinstance(exc, EngineOverloadedError) or is_out_of_memory(exc):
        return 503
    if isinstance(exc, ModelNotFoundError):
        return 404
    if isinstance(exc, ConfigError | ExtentError):
        return 422
    if isinstance(exc, RasterError):
        return 400
    if isinstance(exc, EngineUnavailableError | EngineRequestError):
        return 502
    return 500


def is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError, or torch's OutOfMemoryError (recognised without importing torch)."""
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"


def _validation_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid")))
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "invalid request: " + "; ".join(parts) + more


def _install_error_handlers(app: FastAPI) -> None:
    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        error_type = getattr(exc, "error_type", None)
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and not isinstance(exc, ApiError):
            message = f"no route {request.method} {request.url.path}; see /openapi.json"
        elif exc.status_code == 405 and not isinstance(exc, ApiError):
            message = f"method {request.method} is not allowed on {request.url.path}"
        return JSONResponse(error_body(exc.status_code, message, error_type), exc.status_code, exc.headers)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            ctx = next((e.get("ctx", {}) for e in errors if e.get("type") == "json_invalid"), {})
            detail = ctx.get("error", "JSON decode error") if isinstance(ctx, dict) else "JSON decode error"
            return JSONResponse(error_body(400, f"the request body is not valid JSON ({detail})"), 400)
        return JSONResponse(error_body(422, _validation_message(errors)), 422)

    async def engine_error(request: Request, exc: Exception) -> JSONResponse:
        status = status_for(exc)
        if status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.url.path, status, exc)
        return JSONResponse(error_body(status, str(exc)), status)

    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        # Reached only by bugs outside the backend calls (those are mapped in _call_backend).
        return JSONResponse(error_body(500, f"internal engine error ({type(exc).__name__}); see the engine's log"), 500)

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(GeoR1Error, engine_error)
    app.add_exception_handler(Exception, unexpected_error)


# --------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------


def _settings(max_new_tokens: int, do_sample: bool, temperature: float) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature)


def _openai_logprobs(
    logprobs: tuple[tuple[str, float, dict[str, float]], ...] | None, top: int
) -> dict[str, Any] | None:
    if logprobs is None:
        return None
    content = []
    for token, logprob, alternatives in logprobs:
        ranked = sorted(alternatives.items(), key=lambda kv: kv[1], reverse=True)[:top]
        content.append(
            {
                "token": token,
                "logprob": float(logprob),
                "bytes": list(token.encode("utf-8")),
                "top_logprobs": [
                    {"token": t, "logprob": float(lp), "bytes": list(t.encode("utf-8"))} for t, lp in ranked
                ],
            }
        )
    return {"content": content, "refusal": None}


def limit_memory(headroom_gb: float, device: str) -> None:
    """Cap this process's address space at what it uses now plus ``headroom_gb`` (CPU engines only).

    Allocations beyond it fail inside the request (MemoryError, or torch's allocator error), which the
    runtime turns into 503; the engine goes on serving. CUDA reserves huge virtual ranges, so a GPU
    engine is left alone (its own out-of-memory errors already give 503).
    """
    if not str(device).startswith("cpu"):
        log.warning("--memory-headroom-gb applies to CPU engines only; ignored on %s", device)
        return
    try:
        import resource
    except ImportError:  # Windows
        log.warning("--memory-headroom-gb is not supported on this platform; ignored")
        return
    with open("/proc/self/statm", encoding="ascii") as f:
        in_use = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = in_use + int(headroom_gb * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    log.info("address space capped at %.2f GB (%.2f GB in use + %.2f GB headroom)", limit / 2**30, in_use / 2**30,
             headroom_gb)


def create_app(backend: Backend, config: ServeConfig, token: str) -> FastAPI:
    """The engine's ASGI app around an already loaded ``backend``."""
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        log.info("engine app started (%s backend, concurrency %d)", config.backend, config.concurrency)
        yield
        log.info("engine app stopping")

    app = FastAPI(
        title="Geo-R1 engine",
        version=ENGINE_VERSION,
        description="Reasoning-first referring-expression grounding (Geo-R1) for georeferenced imagery.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.limiter = anyio.CapacityLimiter(config.concurrency)
    _install_error_handlers(app)
    # Added innermost first: Host check -> token -> body limit -> routes.
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    app.add_middleware(TokenAuthMiddleware, token=token)
    app.add_middleware(HostCheckMiddleware, bound_host=config.host)

    async def call_backend(fn: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking backend call in a worker thread; map its failures to HTTP errors."""
        try:
            return await anyio.to_thread.run_sync(partial(fn, *args), limiter=app.state.limiter)
        except (HTTPException, GeoR1Error):
            raise
        except Exception as exc:
            if is_out_of_memory(exc):
                log.warning("out of memory in %s: %s", getattr(fn, "__name__", fn), exc)
                raise ApiError(
                    503, f"the engine ran out of memory ({type(exc).__name__}); retry, or lower --batch-size"
                ) from None
            log.exception("backend call %s failed", getattr(fn, "__name__", fn))
            raise ApiError(500, f"internal engine error: {type(exc).__name__}: {exc}") from None

    def model_id() -> str:
        return str(backend.info().get("model") or "geo-r1")

    @app.get("/health", tags=["engine"])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "engine_version": ENGINE_VERSION}

    @app.get("/info", tags=["engine"])
    async def info() -> dict[str, Any]:
        return {
            **backend.info(),
            "engine_version": ENGINE_VERSION,
            "prompt_version": PROMPT_VERSION,
            "limits": config.limits(),
            "batch_size": config.batch_size,
            "concurrency": config.concurrency,
        }

    @app.post("/ground", tags=["engine"])
    async def ground(body: GroundRequest) -> JSONResponse:
        t0 = time.perf_counter()
        check_items(body)

        def decode_all() -> list[tuple[Image.Image, float]]:
            return [decode_ground_item(it, i, config.max_image_pixels) for i, it in enumerate(body.items)]

        decoded = await anyio.to_thread.run_sync(decode_all)
        return await run_ground(body, decoded, t0)

    @app.post(
        "/ground/tiles",
        tags=["engine"],
        summary="POST /ground with raw pixels: no base64, no JSON-encoded images",
        description=(
            f"Body ({TILES_MEDIA_TYPE}): a 4-byte big-endian length N, N bytes of JSON header "
            "(like /ground's body, but each item has width and height instead of an image), then the "
            "items' raw row-major RGB uint8 pixels, concatenated in item order. Same response as /ground."
        ),
    )
    async def ground_tiles(request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        raw = await request.body()
        body, decoded = await anyio.to_thread.run_sync(split_tiles_body, raw, config.max_image_pixels)
        check_items(body)
        return await run_ground(body, decoded, t0)

    def check_items(body: GroundRequest | TilesRequest) -> None:
        if len(body.items) > config.max_items:
            raise ApiError(
                413,
                f"{len(body.items)} items in one request; the engine takes at most {config.max_items} "
                "(--max-items): split the request",
            )
        for i, item in enumerate(body.items):
            n = len(item.expression.strip())
            if n == 0:
                raise ApiError(422, f"items[{i}].expression is empty: describe what to find, e.g. 'storage tanks'")
            if n > config.max_expression_chars:
                raise ApiError(
                    422,
                    f"items[{i}].expression is {n} characters long; the limit is {config.max_expression_chars} "
                    "(--max-expression-chars): one sentence describing the target",
                )

    async def run_ground(
        body: GroundRequest | TilesRequest, decoded: list[tuple[Image.Image, float]], t0: float
    ) -> JSONResponse:
        settings = _settings(body.max_new_tokens, body.do_sample, body.temperature)
        items = [
            GroundItem(image=img, expression=it.expression, task=it.task, reasoning=it.reasoning)
            for it, (img, _) in zip(body.items, decoded, strict=True)
        ]
        results = await call_backend(backend.ground, items, settings)
        if len(results) != len(items):
            raise ApiError(500, f"the backend returned {len(results)} results for {len(items)} items")
        out = []
        for result, (_, decode_ms) in zip(results, decoded, strict=True):
            item_json = result.to_json()
            item_json["timings_ms"] = {**item_json.get("timings_ms", {}), "decode": decode_ms}
            out.append(item_json)
        backend_info = backend.info()
        return JSONResponse(
            {
                "items": out,
                "model": backend_info.get("model"),
                "adapter": backend_info.get("adapter"),
                "prompt_version": PROMPT_VERSION,
                "engine_version": ENGINE_VERSION,
                "timings_ms": {"total": (time.perf_counter() - t0) * 1000.0},
            }
        )

    @app.get("/adapters", tags=["adapters"])
    async def adapters() -> dict[str, Any]:
        return backend.adapters()

    @app.post("/adapters", tags=["adapters"])
    async def load_adapter(body: AdapterIn) -> dict[str, Any]:
        await call_backend(backend.load_adapter, body.name, body.path)
        log.info("loaded adapter %r from %s", body.name, body.path)
        return backend.adapters()

    @app.post("/adapters/active", tags=["adapters"])
    async def activate_adapter(body: ActiveAdapterIn) -> dict[str, Any]:
        available = backend.adapters().get("available", {})
        if body.name is not None and body.name not in available:
            raise ApiError(
                404,
                f"no adapter named {body.name!r}; loaded: {sorted(available) or 'none'} "
                "(load one with POST /adapters, or send null for the base model)",
            )
        await call_backend(backend.activate_adapter, body.name)
        log.info("active adapter: %s", body.name or "none (base model)")
        return backend.adapters()

    @app.get("/v1/models", tags=["openai"])
    async def list_models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model_id(), "object": "model", "created": started, "owned_by": "geo-r1"}],
        }

    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions(body: ChatRequest) -> JSONResponse:
        if body.stream:
            raise ApiError(400, "stream=true is not supported by this engine: send stream=false")
        if body.n not in (None, 1):
            raise ApiError(400, f"n={body.n} is not supported: one completion per request")
        if body.stop:
            raise ApiError(400, "stop sequences are not supported by this engine")
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true")
        served = model_id()
        if body.model != served:
            raise ApiError(404, f"model {body.model!r} is not served here; GET /v1/models lists {served!r}")

        messages: list[dict[str, Any]] = []
        urls: list[str] = []
        for m, message in enumerate(body.messages):
            role = "system" if message.role == "developer" else message.role
            if message.content is None or isinstance(message.content, str):
                messages.append({"role": role, "content": message.content or ""})
                continue
            parts: list[dict[str, Any]] = []
            for p, part in enumerate(message.content):
                if isinstance(part, TextPart):
                    parts.append({"type": "text", "text": part.text})
                else:
                    where = f"messages[{m}].content[{p}].image_url"
                    if not part.image_url.url.startswith("data:"):
                        raise ApiError(
                            400,
                            f"{where}: only data: URIs are accepted (the engine never fetches URLs); "
                            "send data:image/png;base64,<bytes>",
                        )
                    parts.append({"type": "image"})
                    urls.append(part.image_url.url)
            messages.append({"role": role, "content": parts})
        if len(urls) > config.max_items:
            raise ApiError(413, f"{len(urls)} images in one request; the limit is {config.max_items} (--max-items)")

        def decode_all() -> list[Image.Image]:
            return [
                open_image(split_data_uri(url, f"image {i}"), config.max_image_pixels, f"image {i}")
                for i, url in enumerate(urls)
            ]

        images = await anyio.to_thread.run_sync(decode_all)
        temperature = body.temperature or 0.0
        settings = _settings(
            body.max_completion_tokens or body.max_tokens or 256,
            temperature > 0,
            temperature if temperature > 0 else 1.0,
        )
        top = int(body.top_logprobs or 0)
        want_logprobs = bool(body.logprobs)
        # Ask for at least one alternative so the backend records log-probs at all.
        result = await call_backend(backend.chat, messages, images, settings, max(1, top) if want_logprobs else 0)
        return JSONResponse(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": served,
                "system_fingerprint": f"geo-r1-{ENGINE_VERSION}",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": result.text, "refusal": None},
                        "logprobs": _openai_logprobs(result.logprobs, top) if want_logprobs else None,
                        "finish_reason": result.finish_reason,
                    }
                ],
                "usage": {
                    "prompt_tokens": result.prompt_tokens,
                    "completion_tokens": result.completion_tokens,
                    "total_tokens": result.prompt_tokens + result.completion_tokens,
                },
            }
        )

    return app


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def build_backend(config: ServeConfig) -> Backend:
    """Load the backend ``config`` asks for (imports torch only for the local one)."""
    if config.backend == "local":
        from .loading import LoadConfig
        from .runtime import LocalBackend

        load_config = LoadConfig(
            model=config.model,
            processor=config.processor,
            adapters=dict(config.adapters),
            device=config.device,
            dtype=config.dtype,
        )
        return LocalBackend(load_config, batch_size=config.batch_size)
    from .remote import RemoteBackend

    api_key = None
    if config.api_key_env:
        api_key = os.environ.get(config.api_key_env)
        if not api_key:
            raise ConfigError(
                f"--api-key-env {config.api_key_env}: that environment variable is not set or empty; "
                f"export {config.api_key_env}=<key> before starting"
            )
    assert config.base_url is not None  # checked by ServeConfig
    return RemoteBackend(config.base_url, api_key=api_key, model=config.remote_model, concurrency=config.concurrency)


def is_loopback(host: str) -> bool:
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket on ``host:port``, or a ConfigError that says what to do."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host!r} is not an address of this machine ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    if os.name != "nt":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port} ({exc.strerror}): another engine may already run there "
            f"(try GET /health), or pick another --port"
        ) from None
    sock.set_inheritable(True)
    return sock


def main(args: argparse.Namespace) -> int:
    """Run the engine until interrupted."""
    import uvicorn
    from PIL import Image

    config = ServeConfig.from_args(args)
    assert config.token_file is not None
    token = ensure_token(config.token_file)  # before loading anything: a bad token file fails fast
    # Pillow's own decompression-bomb guard, as a second line behind the header check.
    Image.MAX_IMAGE_PIXELS = config.max_image_pixels
    log.info("loading the %s backend ...", config.backend)
    backend = build_backend(config)
    if config.memory_headroom_gb is not None:
        limit_memory(config.memory_headroom_gb, backend.info().get("device", "cpu"))
    try:
        app = create_app(backend, config, token)
        sock = bind_socket(config.host, config.port)
        if not is_loopback(config.host):
            log.warning("!" * 78)
            log.warning(
                "the engine listens on %s, which other machines can reach. Anyone with the token can run "
                "the model and read results. Use --host 127.0.0.1 unless you mean this.",
                config.host,
            )
            log.warning("!" * 78)
        log.info("Geo-R1 engine %s listening on %s", ENGINE_VERSION, config.url)
        log.info("bearer token file: %s", config.token_file)
        server = uvicorn.Server(
            uvicorn.Config(app, log_config=None, lifespan="on", timeout_graceful_shutdown=10, server_header=False)
        )
        server.run(sockets=[sock])
        return 0 if server.started else 1
    finally:
        close = getattr(backend, "close", None)
        if callable(close):
            close()
