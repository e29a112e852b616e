"""``geo-r1 serve``: the grounding engine over HTTP, on 127.0.0.1, behind a bearer token.

The server is a thin boundary around a :class:`engine.runtime.backend.Backend`: it checks and decodes
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
POST /jobs             start a fine-tuning job (its own process); GET /jobs, GET/DELETE /jobs/{id},
                       POST /jobs/{id}/resume: :mod:`engine.server.jobs`
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

Modules
-------
This module holds the configuration (:class:`ServeConfig`, the ``geo-r1 serve`` options), the mapping
of errors to statuses, the app and ``main``. The rest lives beside it:

- :mod:`engine.server.security`: the ASGI middleware (body limit, Host check, bearer token), the error shape
  and :class:`~engine.server.security.ApiError`, the token file and socket binding;
- :mod:`engine.server.api_models`: the pydantic request models and image decoding (base64, ``data:`` URIs,
  the raw ``/ground/tiles`` body), with the pixel and aspect-ratio checks;
- :mod:`engine.server.openai_compat`: the OpenAI-shaped parts of ``/v1/chat/completions`` (request checks,
  message conversion, log-probs and the response body).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request

from engine import __version__ as ENGINE_VERSION
from engine.jobs.manager import JobManager
from engine.outlines import OutlineRequest, outline_result, wants_outline
from engine.runtime.backend import Backend, GenerationSettings, GroundItem, is_out_of_memory
from engine.runtime.loading import parse_adapters
from engine.server.api_models import (
    ActiveAdapterIn,
    AdapterIn,
    ChatRequest,
    GroundRequest,
    TilesRequest,
    decode_ground_item,
    error_responses,
    split_tiles_body,
)
from engine.server.jobs import add_job_routes
from engine.server.openai_compat import (
    chat_completion,
    chat_settings,
    check_chat_request,
    decode_data_images,
    to_backend_messages,
)
from engine.server.security import (
    ApiError,
    BodyLimitMiddleware,
    HostCheckMiddleware,
    TokenAuthMiddleware,
    bind_socket,
    ensure_token,
    error_body,
    is_loopback,
)
from geo_r1_qgis.core.client import DEFAULT_PORT, TILES_MEDIA_TYPE, default_token_path, health_proof
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
from geo_r1_qgis.core.rules.coords import BOX_FRAMES
from geo_r1_qgis.core.rules.prompts import MAX_EXPRESSION_CHARS, MAX_NEW_TOKENS, PROMPT_VERSION, default_max_new_tokens

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from engine.runtime.sam import SamMasker

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


#: the help sections of ``geo-r1 serve``
_LOCAL = {"group": "model (--backend local)"}
_NET = {"group": "network"}
_REMOTE = {"group": "remote backend (--backend openai)"}
_LIMITS = {"group": "limits"}
_JOBS = {"group": "fine-tuning jobs"}


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``geo-r1 serve`` needs; checks itself and names the fix for a bad value."""

    # Model (--backend local)
    model: str | None = field(default=None, metadata={**_LOCAL, "help": "model id or directory (Qwen2.5-VL)"})
    processor: str | None = field(
        default=None, metadata={**_LOCAL, "help": "processor id or directory (default: the model's)"}
    )
    adapters: tuple[tuple[str, str], ...] = field(
        default=(),
        metadata={**_LOCAL, "help": "LoRA adapters to load at start, [NAME=]PATH (repeatable)", "flags": ("--adapter",),
                  "metavar": "[NAME=]PATH", "parse": lambda items: tuple(parse_adapters(items).items())},
    )  # fmt: skip
    device: str = field(default="auto", metadata={**_LOCAL, "help": "auto, cpu, cuda, cuda:N or mps"})
    dtype: str = field(default="auto", metadata={**_LOCAL, "help": "auto, float32, bfloat16 or float16"})
    batch_size: int = field(default=8, metadata={**_LOCAL, "help": "most items generated in one batch"})
    threads: int | None = field(
        default=None,
        metadata={**_LOCAL, "help": "CPU threads for torch (default: cores - 1, at least 1, with passive OpenMP "
                                    "waits, so a shared CPU does not collapse; see BENCHMARKS.md)"},
    )  # fmt: skip
    sam: str | None = field(
        default=None,
        metadata={**_LOCAL, "metavar": "MODEL",
                  "help": "SAM 2 id or directory for outlines (task gres, or outline: true), loaded offline like "
                  "--model, e.g. facebook/sam2.1-hiera-tiny in the Hugging Face cache, or `geo-r1 tiny-sam DIR`; "
                  "default: none (outline requests are refused)"},
    )  # fmt: skip
    sam_device: str | None = field(
        default=None, metadata={**_LOCAL, "help": "device for --sam: cpu, cuda, cuda:N, mps (default: --device's)"}
    )
    box_frame: str = field(
        default="model",
        metadata={**_LOCAL, "choices": BOX_FRAMES,
                  "help": "which pixels the model's boxes are in: model (Qwen2.5-VL's frame after smart_resize; "
                  "the engine scales them back) or image (the tile's own pixels, as Geo-R1's evaluation scores "
                  "them); tiles whose sides are multiples of 28 make both the same"},
    )  # fmt: skip
    # Network
    host: str = field(
        default="127.0.0.1",
        metadata={**_NET, "help": "address to bind; anything but loopback is reachable by others"},
    )
    port: int = field(default=DEFAULT_PORT, metadata={**_NET, "help": "TCP port"})
    parent_pid: int | None = field(
        default=None,
        metadata={**_NET, "help": "stop when this process ends (what starts an engine for itself passes its own PID)"},
    )
    token_file: Path | None = field(
        default=None,
        metadata={**_NET, "help": "bearer token file, created (0600) on first start (default: %(default)s)"},
    )
    # Remote backend (--backend openai)
    backend: str = field(
        default="local",
        metadata={**_REMOTE, "choices": ("local", "openai"),
                  "help": "local: run the model here; openai: forward to an OpenAI-compatible server"},
    )  # fmt: skip
    base_url: str | None = field(
        default=None,
        metadata={**_REMOTE, "help": "with --backend openai: the server's URL, e.g. http://127.0.0.1:8000/v1"},
    )
    api_key_env: str | None = field(
        default=None,
        metadata={**_REMOTE, "metavar": "VAR",
                  "help": "with --backend openai: environment variable holding its API key"},
    )  # fmt: skip
    remote_model: str | None = field(
        default=None,
        metadata={**_REMOTE, "metavar": "NAME", "help": "with --backend openai: model name (default: its first model)"},
    )
    concurrency: int = field(default=8, metadata={**_REMOTE, "help": "requests handed to the backend at once"})
    png_level: int = field(
        default=0,
        metadata={**_REMOTE, "help": "with --backend openai: zlib level of the tiles' PNG, 0 (stored: fastest, the "
                                     "most bytes) to 9; raise it on a slow link"},
    )  # fmt: skip
    remote_retries: int = field(
        default=3,
        metadata={**_REMOTE, "help": "with --backend openai: retries of a completion after a dropped connection, "
                                     "502, 503 or 429 (Retry-After honoured), with bounded backoff; 0: none"},
    )  # fmt: skip
    # Limits
    max_body_mb: float = field(default=64.0, metadata={**_LIMITS, "help": "largest request body, in MiB"})
    max_image_pixels: int = field(default=16_777_216, metadata={**_LIMITS, "help": "largest image, width × height"})
    max_items: int = field(default=64, metadata={**_LIMITS, "help": "most items (or images) in one request"})
    max_expression_chars: int = field(default=500, metadata={**_LIMITS, "help": "longest referring expression"})
    max_prompt_tokens: int | None = field(
        default=None,
        metadata={**_LIMITS, "help": "longest /v1/chat/completions prompt, in tokens (default: the model's context)"},
    )
    max_new_tokens: int = field(
        default=4096,
        metadata={**_LIMITS, "help": "largest generation limit a request may ask for (max_new_tokens, max_tokens)"},
    )
    header_timeout_s: float = field(
        default=5.0,
        metadata={**_LIMITS, "flags": ("--header-timeout",),
                  "help": "seconds a connection may take to send a request's headers"},
    )  # fmt: skip
    max_connections: int | None = field(
        default=None,
        metadata={**_LIMITS, "help": "most open connections (default: the descriptor limit less 64); at the cap, the "
                                     "oldest connection still sending its headers is dropped"},
    )  # fmt: skip
    memory_headroom_gb: float | None = field(
        default=None,
        metadata={**_LIMITS,
                  "help": "CPU only: memory a request may use beyond the loaded model, in GB; a request that needs "
                  "more gets 503 instead of pushing the desktop into swap (Linux/macOS address-space limit)"},
    )  # fmt: skip
    # Fine-tuning jobs
    jobs_dir: Path | None = field(
        default=None,
        metadata={**_JOBS, "metavar": "DIR",
                  "help": "where fine-tuning jobs (POST /jobs) keep their folders, listed again after a restart "
                          "(default: $XDG_DATA_HOME/geo-r1/jobs, i.e. ~/.local/share/geo-r1/jobs)"},
    )  # fmt: skip

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
        if not 0 <= self.png_level <= 9:
            raise ConfigError(f"--png-level must be a zlib level within 0..9 (0: fastest), got {self.png_level}")
        if self.remote_retries < 0:
            raise ConfigError(f"--remote-retries must be >= 0 (0: never retry), got {self.remote_retries}")
        if self.box_frame not in BOX_FRAMES:
            raise ConfigError(f"--box-frame must be one of {', '.join(BOX_FRAMES)}, got {self.box_frame!r}")
        if not self.header_timeout_s > 0:
            raise ConfigError(f"--header-timeout must be > 0 seconds, got {self.header_timeout_s}")
        if self.max_connections is not None and self.max_connections < 2:
            raise ConfigError(f"--max-connections must be >= 2, got {self.max_connections}")
        if not 1 <= self.max_new_tokens <= 4096:
            raise ConfigError(f"--max-new-tokens must be within 1..4096, got {self.max_new_tokens}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ConfigError(f"--max-prompt-tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}; leave it out for cores - 1")
        if not self.max_body_mb > 0:
            raise ConfigError(f"--max-body-mb must be > 0, got {self.max_body_mb}")
        if not 1 <= self.max_expression_chars <= MAX_EXPRESSION_CHARS:
            raise ConfigError(
                f"--max-expression-chars must be within 1..{MAX_EXPRESSION_CHARS} (the prompt builder's "
                f"limit), got {self.max_expression_chars}"
            )
        token_file = Path(self.token_file).expanduser() if self.token_file else default_token_path()
        object.__setattr__(self, "token_file", token_file)
        from engine.jobs.manager import default_jobs_dir

        object.__setattr__(self, "jobs_dir", Path(self.jobs_dir).expanduser() if self.jobs_dir else default_jobs_dir())
        object.__setattr__(self, "adapters", tuple((str(n), str(p)) for n, p in self.adapters))

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def limits(self) -> dict[str, int | None]:
        return {
            "max_body_bytes": self.max_body_bytes,
            "max_image_pixels": self.max_image_pixels,
            "max_items": self.max_items,
            "max_expression_chars": self.max_expression_chars,
            "max_prompt_tokens": self.max_prompt_tokens,
            "max_new_tokens": self.max_new_tokens,
        }


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
            allowed = sorted({m for r in request.app.routes if getattr(r, "path", None) == request.url.path
                              for m in (getattr(r, "methods", None) or ())})  # fmt: skip
            message = f"method {request.method} is not allowed on {request.url.path}; use {', '.join(allowed)}"
            headers = {**(exc.headers or {}), "Allow": ", ".join(allowed)}
            return JSONResponse(error_body(405, message, error_type), 405, headers)
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
    log.info(
        "address space capped at %.2f GB (%.2f GB in use + %.2f GB headroom)",
        limit / 2**30,
        in_use / 2**30,
        headroom_gb,
    )


#: The API documentation of ``POST /ground`` (served in /openapi.json); the confidence definitions are
#: engine/confidence.py's.
GROUND_DESCRIPTION = """\
Each item is one image (a tile) and one referring expression. `task` is `rec` (exactly one box: Geo-R1's
REC prompt) or `multi` (zero or more boxes, "None" when nothing: Geo-R1's OVD prompt); `reasoning: false`
uses the SFT-baseline prompt without `<think>`. Results come back in item order.

Boxes are `[x1, y1, x2, y2]` in the pixels of the image you sent: the model answers in the pixels of the
image it saw after Qwen's smart_resize, and the engine scales them back and clips them to the image.

**score** (per box): the geometric mean of the probabilities of the generated tokens that spell the box's
coordinate list, `exp(mean(log p))`, each token's probability taken under the distribution it was drawn from.

**presence** (per item): `1 - P(None)`, where `P(None)` is the total probability, at the first content token
of the answer (just after `<answer>`, past whitespace and a ```json fence), of the tokens that start the word
None (`None`, `none`, `null` and their prefixes). 0 when the output has neither an answer nor a box.

Rank boxes by `score × presence`; drop weak ones with a threshold on either. `parse_status` says how the
output was read: ok, none (the model said there is nothing), no_answer_tag, truncated, no_box or empty.
**Outlines** (an engine started with `--sam`): `task: "gres"` (Geo-R1's GRES prompt: boxes and two keypoints each)
or `outline: true` with `rec`/`multi` ("refine to outline": each box alone) prompts SAM 2 per box; the mask is
clipped to the box (Geo-R1's Eq. 7) and traced. Each box then has `outline`: a list of polygons, each a list of
closed rings `[[x, y], ...]` (the exterior first, then holes), in the pixels of the image you sent, on pixel
corners, simplified by Douglas-Peucker at `outline_tolerance_px` (default 1 pixel: one ground pixel of a tile);
parts under `outline_min_area_px` are dropped. `gres` boxes also have `keypoints` (image pixels). An engine without
`--sam` answers 422 to such items.
"""


def create_app(
    backend: Backend, config: ServeConfig, token: str, jobs: JobManager | None = None, sam: SamMasker | None = None
) -> FastAPI:
    """The engine's ASGI app around an already loaded ``backend``; ``jobs``: its fine-tuning jobs (default: a
    manager of ``config.jobs_dir`` for the backend's model)."""
    started = int(time.time())
    if jobs is None:
        jobs = make_job_manager(config)
        jobs.start_probe()
    jobs.device = str(backend.info().get("device") or "cpu")

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
    #: set by ``main`` to stop the server it runs (``POST /shutdown``); None when the app is served otherwise
    app.state.request_shutdown = None
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

    common = (400, 401, 413, 422, 500)  # every authenticated route

    @app.get("/health", tags=["engine"], responses=error_responses(400, 422, 500))
    async def health(challenge: str | None = None) -> dict[str, Any]:
        """No token needed. With ``?challenge=C`` (hex, at most 128 characters) the answer carries
        ``proof`` = HMAC-SHA256(token, "geo-r1-health:" + C): clients check it before they send the token."""
        out: dict[str, Any] = {"status": "ok", "engine_version": ENGINE_VERSION}
        if challenge is not None:
            if not (0 < len(challenge) <= 128) or any(c not in "0123456789abcdefABCDEF" for c in challenge):
                raise ApiError(422, "challenge must be 1 to 128 hexadecimal characters")
            out["proof"] = health_proof(token, challenge)
        return out

    @app.get("/info", tags=["engine"], responses=error_responses(*common))
    async def info() -> dict[str, Any]:
        return {
            **backend.info(),
            "engine_version": ENGINE_VERSION,
            "prompt_version": PROMPT_VERSION,
            "limits": config.limits(),
            "batch_size": config.batch_size,
            "threads": _torch_threads(),
            "concurrency": config.concurrency,
            "max_new_tokens_default": dict(MAX_NEW_TOKENS),
            "sam": sam.source if sam is not None else None,
            **(await training_info()),
        }

    async def training_info() -> dict[str, Any]:
        why = await anyio.to_thread.run_sync(jobs.training_error, 60.0)
        return {"training": why is None, "training_error": why}

    @app.post("/ground", tags=["engine"], summary="Geo-R1 grounding of images", description=GROUND_DESCRIPTION,
              responses=error_responses(*common, 502, 503))  # fmt: skip
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
        responses=error_responses(*common, 502, 503),
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
            if sam is None and wants_outline(item.task, item.outline):
                why = "task 'gres'" if item.task == "gres" else "outline: true"
                raise ApiError(
                    422,
                    f"items[{i}] asks for outlines ({why}), but this engine has no SAM: restart it with "
                    "`geo-r1 serve --sam MODEL` (a SAM 2 directory, e.g. from `geo-r1 tiny-sam DIR`, or "
                    "facebook/sam2.1-hiera-tiny in the Hugging Face cache), or send outline: false",
                )
            n = len(item.expression.strip())
            if n == 0:
                raise ApiError(422, f"items[{i}].expression is empty: describe what to find, e.g. 'storage tanks'")
            if n > config.max_expression_chars:
                raise ApiError(
                    422,
                    f"items[{i}].expression is {n} characters long; the limit is {config.max_expression_chars} "
                    "(--max-expression-chars): one sentence describing the target",
                )

    def add_outlines(
        body: GroundRequest | TilesRequest, decoded: list[tuple[Image.Image, float]], results: list[Any]
    ) -> list[Any]:
        """Per item, None or (per-box outline JSON, timings): SAM on the items that ask (engine/outlines.py)."""
        out: list[Any] = []
        for it, (image, _), result in zip(body.items, decoded, results, strict=True):
            if sam is None or not wants_outline(it.task, it.outline):
                out.append(None)
                continue
            request = OutlineRequest(it.task, True, body.outline_tolerance_px, body.outline_min_area_px)
            out.append(outline_result(sam, image, result, request, config.box_frame))
        return out

    async def run_ground(
        body: GroundRequest | TilesRequest, decoded: list[tuple[Image.Image, float]], t0: float
    ) -> JSONResponse:
        if body.max_new_tokens and body.max_new_tokens > config.max_new_tokens:
            raise ApiError(413, f"max_new_tokens {body.max_new_tokens} is over this engine's limit of "
                                f"{config.max_new_tokens} (--max-new-tokens)")  # fmt: skip
        limit = min(config.max_new_tokens,
                    body.max_new_tokens or default_max_new_tokens(it.task for it in body.items))  # fmt: skip
        settings = _settings(limit, body.do_sample, body.temperature)
        items = [
            GroundItem(image=img, expression=it.expression, task=it.task, reasoning=it.reasoning)
            for it, (img, _) in zip(body.items, decoded, strict=True)
        ]
        results = await call_backend(backend.ground, items, settings)
        if len(results) != len(items):
            raise ApiError(500, f"the backend returned {len(results)} results for {len(items)} items")
        outlines = await call_backend(add_outlines, body, decoded, results)
        out = []
        for result, (_, decode_ms), extra in zip(results, decoded, outlines, strict=True):
            item_json = result.to_json()
            item_json["timings_ms"] = {**item_json.get("timings_ms", {}), "decode": decode_ms}
            if extra is not None:
                boxes, timings = extra
                for box_json, box_extra in zip(item_json["boxes"], boxes, strict=True):
                    box_json.update(box_extra)
                item_json["timings_ms"].update(timings)
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

    @app.post(
        "/shutdown",
        tags=["engine"],
        status_code=202,
        summary="Stop this engine cleanly",
        description="Answers 202 first, then stops the server: requests in flight finish (up to 10 s), no new "
        "connection is accepted, and the process exits with status 0. What started the engine (the QGIS plugin) "
        "uses it before SIGTERM.",
        responses=error_responses(*common, 503),
    )
    async def shutdown() -> JSONResponse:
        stop = app.state.request_shutdown
        if stop is None:
            raise ApiError(503, "this engine cannot stop itself here (not run by geo-r1 serve); stop its process")
        log.info("shutdown requested over HTTP: stopping")
        return JSONResponse({"status": "stopping"}, status_code=202, background=BackgroundTask(stop))

    @app.get("/adapters", tags=["adapters"], responses=error_responses(*common))
    async def adapters() -> dict[str, Any]:
        return backend.adapters()

    @app.post("/adapters", tags=["adapters"], responses=error_responses(*common, 404, 503))
    async def load_adapter(body: AdapterIn) -> dict[str, Any]:
        await call_backend(backend.load_adapter, body.name, body.path)
        log.info("loaded adapter %r from %s", body.name, body.path)
        return backend.adapters()

    @app.post("/adapters/active", tags=["adapters"], responses=error_responses(*common, 404, 503))
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

    add_job_routes(app, jobs, lambda: int(backend.info().get("tile") or 504), common)

    @app.get("/v1/models", tags=["openai"], responses=error_responses(*common))
    async def list_models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model_id(), "object": "model", "created": started, "owned_by": "geo-r1"}],
        }

    @app.post("/v1/chat/completions", tags=["openai"], responses=error_responses(*common, 404, 502, 503))
    async def chat_completions(body: ChatRequest, request: Request) -> JSONResponse:
        check_chat_request(body)
        served = model_id()
        if body.model != served:
            raise ApiError(404, f"model {body.model!r} is not served here; GET /v1/models lists {served!r}")
        messages, urls = to_backend_messages(body.messages)
        if len(urls) > config.max_items:
            raise ApiError(413, f"{len(urls)} images in one request; the limit is {config.max_items} (--max-items)")
        images = await anyio.to_thread.run_sync(decode_data_images, urls, config.max_image_pixels)
        top = int(body.top_logprobs or 0)
        want_logprobs = bool(body.logprobs)
        # Ask for at least one alternative so the backend records log-probs at all.
        asked = body.max_completion_tokens or body.max_tokens
        if asked and asked > config.max_new_tokens:
            raise ApiError(413, f"max_tokens {asked} is over this engine's limit of {config.max_new_tokens} "
                                "(--max-new-tokens)")  # fmt: skip
        settings = chat_settings(body)
        if settings.max_new_tokens > config.max_new_tokens:  # the default (256) over a lower engine limit
            settings = dataclasses.replace(settings, max_new_tokens=config.max_new_tokens)
        cancel = threading.Event()
        work = asyncio.ensure_future(call_backend(
            backend.chat, messages, images, settings, max(1, top) if want_logprobs else 0, cancel
        ))  # fmt: skip
        while not work.done():  # a client that leaves stops its generation (the worker is then free again)
            await asyncio.wait({work}, timeout=0.5)
            if not work.done() and await request.is_disconnected():
                cancel.set()
                log.info("chat client disconnected: generation stopped")
        result = await work
        return JSONResponse(chat_completion(result, served, top, want_logprobs))

    return app


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def watch_parent(pid: int, interval_s: float = 1.0) -> threading.Thread:
    """Stop this engine (SIGTERM to itself: a clean shutdown) once process ``pid`` is gone or it is no longer
    this process's parent, whatever ended it (SIGKILL included). Portable; on Linux the starter also sets
    ``PR_SET_PDEATHSIG``, which is immediate."""

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != pid or not _alive(pid):
                log.warning("the process that started this engine (PID %d) is gone: stopping", pid)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    thread = threading.Thread(target=watch, name="geo-r1-parent-watch", daemon=True)
    thread.start()
    return thread


def _torch_threads() -> int | None:
    """torch's intra-op thread count, when torch is loaded (the local backend)."""
    import sys

    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else None


def make_job_manager(config: ServeConfig) -> JobManager:
    """The fine-tuning jobs of ``config.jobs_dir``, training the engine's own model (none for --backend openai)."""
    assert config.jobs_dir is not None
    local = config.backend == "local"
    return JobManager(config.jobs_dir, config.model if local else None, config.processor if local else None)


def build_backend(config: ServeConfig) -> Backend:
    """Load the backend ``config`` asks for (imports torch only for the local one)."""
    if config.backend == "local":
        from engine.runtime.loading import LoadConfig
        from engine.runtime.local import LocalBackend
        from engine.runtime.threads import configure_torch_threads

        configure_torch_threads(config.threads)
        load_config = LoadConfig(
            model=config.model,
            processor=config.processor,
            adapters=dict(config.adapters),
            device=config.device,
            dtype=config.dtype,
        )
        backend = LocalBackend(load_config, batch_size=config.batch_size)
        backend.box_frame = config.box_frame
        backend.max_prompt_tokens = config.max_prompt_tokens
        if config.adapters:  # what the user asked for is what answers: the first adapter is active
            first = config.adapters[0][0]
            backend.activate_adapter(first)
            log.info("adapter %r is active (switch with POST /adapters/active)", first)
        return backend
    from engine.runtime.remote import RemoteBackend

    api_key = None
    if config.api_key_env:
        api_key = os.environ.get(config.api_key_env)
        if not api_key:
            raise ConfigError(
                f"--api-key-env {config.api_key_env}: that environment variable is not set or empty; "
                f"export {config.api_key_env}=<key> before starting"
            )
    assert config.base_url is not None  # checked by ServeConfig
    remote = RemoteBackend(config.base_url, api_key=api_key, model=config.remote_model, concurrency=config.concurrency,
                           png_level=config.png_level, retries=config.remote_retries)  # fmt: skip
    remote.box_frame = config.box_frame
    return remote


def serve(config: ServeConfig) -> int:
    """Run the engine until interrupted (``geo-r1 serve``, :mod:`engine.cli.serve`)."""
    import uvicorn
    from PIL import Image

    assert config.token_file is not None
    token = ensure_token(config.token_file)  # before loading anything: a bad token file fails fast
    if config.parent_pid is not None:  # watched from the start: a parent that dies while the model loads counts
        watch_parent(config.parent_pid)
    # Pillow's own decompression-bomb guard, as a second line behind the header check.
    Image.MAX_IMAGE_PIXELS = config.max_image_pixels
    jobs = make_job_manager(config)
    jobs.start_probe()  # whether the training extras import, checked while the model loads
    log.info("loading the %s backend ...", config.backend)
    backend = build_backend(config)
    sam = None
    if config.sam:
        from engine.runtime.sam import SamMasker

        sam = SamMasker.load(config.sam, config.sam_device or config.device)
    if config.memory_headroom_gb is not None:
        limit_memory(config.memory_headroom_gb, backend.info().get("device", "cpu"))
    try:
        app = create_app(backend, config, token, jobs, sam)
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
        from engine.server.guard import GuardedHttpTools, RepeatFilter, connection_cap

        GuardedHttpTools.header_timeout_s = config.header_timeout_s
        GuardedHttpTools.max_connections = config.max_connections or connection_cap()
        for handler in logging.getLogger().handlers:  # a flood must not fill the disk with the same line
            handler.addFilter(RepeatFilter())
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                log_config=None,
                lifespan="on",
                timeout_graceful_shutdown=10,
                server_header=False,
                http=GuardedHttpTools,
            )
        )

        def request_shutdown() -> None:
            server.should_exit = True

        app.state.request_shutdown = request_shutdown
        server.run(sockets=[sock])
        return 0 if server.started else 1
    finally:
        close = getattr(backend, "close", None)
        if callable(close):
            close()
