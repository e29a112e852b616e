"""A small client for the engine's HTTP API, standard library only.

The QGIS plugin and the ``geo-r1 ground`` command both talk to the engine through this module, so
the protocol exists once on the client side. See docs/ARCHITECTURE.md for the routes.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import os
import secrets
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, EngineOverloadedError, EngineRequestError, EngineUnavailableError
from .retry import RetryPolicy, parse_retry_after, transient_error

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8731
DEFAULT_URL = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"
#: ``POST /ground/tiles`` body: u32 big-endian header length, JSON header, raw RGB pixels in item order
TILES_MEDIA_TYPE = "application/vnd.geo-r1.tiles"
SERVE_HINT = "start it with:  geo-r1 serve --model <model id or directory>"


def default_token_path() -> Path:
    """Where the engine stores its bearer token unless ``--token-file`` says otherwise."""
    if os.name == "nt":
        base = Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    else:
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "geo-r1" / "engine.token"


def read_token(path: str | os.PathLike[str] | None = None) -> str:
    """Read the engine's token; a clear error if it is missing."""
    p = Path(path) if path else default_token_path()
    try:
        token = p.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise EngineUnavailableError(
            f"no engine token at {p}: the engine writes it on its first start; {SERVE_HINT}"
            " (or pass the token file the engine was started with)"
        ) from None
    except OSError as exc:
        raise EngineUnavailableError(f"cannot read the engine token {p}: {exc}") from None
    if not token:
        raise EngineUnavailableError(f"the engine token file {p} is empty; delete it and restart the engine")
    return token


@dataclass(frozen=True)
class TileImage:
    """A tile as raw RGB bytes (row-major, height × width × 3, uint8); any bytes-like object."""

    rgb: bytes | memoryview
    width: int
    height: int

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise ConfigError(f"tile size must be positive, got {self.width}×{self.height}")
        if len(self.rgb) != self.width * self.height * 3:
            raise ConfigError(f"tile bytes ({len(self.rgb)}) do not match {self.width}×{self.height}×3 RGB")

    @classmethod
    def from_array(cls, array: Any) -> TileImage:
        """From a numpy ``(H, W, 3)`` uint8 array."""
        h, w, c = array.shape
        if c != 3 or str(array.dtype) != "uint8":
            raise ConfigError(f"tile array must be (H, W, 3) uint8, got {array.shape} {array.dtype}")
        if not array.flags["C_CONTIGUOUS"]:
            array = array.copy(order="C")
        # A flat view of the array's own memory: no copy until the request body is joined.
        return cls(rgb=memoryview(array).cast("B"), width=int(w), height=int(h))


@dataclass(frozen=True)
class Box:
    """A box from the engine, in the pixels of the tile image the client sent."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    label: str | None = None
    #: the box's outline from the engine's SAM (``outline`` requests, task ``gres``): polygons in the same tile
    #: pixels, each a tuple of closed rings as (n, 2) float arrays (exterior first); empty when none was asked or
    #: SAM found nothing; not part of the box's equality
    outline: tuple = field(default=(), compare=False)

    @classmethod
    def from_json(cls, b: dict[str, Any]) -> Box:
        """One box of the engine's answer (``{"bbox": [x1, y1, x2, y2], "score", "label", "outline"}``)."""
        x1, y1, x2, y2 = (float(v) for v in b["bbox"])
        return cls(x1, y1, x2, y2, score=float(b.get("score", 0.0)), label=b.get("label"),
                   outline=_outline_from_json(b.get("outline")))  # fmt: skip


def _outline_from_json(value: Any) -> tuple:
    import numpy as np

    return tuple(tuple(np.asarray(ring, dtype=float).reshape(-1, 2) for ring in poly) for poly in value or ())


@dataclass(frozen=True)
class GroundResult:
    """The engine's answer for one tile."""

    boxes: tuple[Box, ...]
    presence: float
    reasoning: str | None
    raw_text: str
    parse_status: str
    timings_ms: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> GroundResult:
        boxes = tuple(Box.from_json(b) for b in item.get("boxes", []))
        return cls(
            boxes=boxes,
            presence=float(item.get("presence", 0.0)),
            reasoning=item.get("reasoning"),
            raw_text=item.get("raw_text", ""),
            parse_status=str(item.get("parse_status", "")),
            timings_ms=dict(item.get("timings_ms", {})),
        )


def health_proof(token: str, challenge: str) -> str:
    """What an engine answers to ``GET /health?challenge=C``: HMAC-SHA256 of C keyed with its token.

    It proves the server holds the token without revealing it, so a client never sends its token to some
    other program that happens to listen on the engine's port (the engine down, the port reused).
    """
    return hmac.new(token.encode("utf-8"), ("geo-r1-health:" + challenge).encode("utf-8"), hashlib.sha256).hexdigest()


def engine_capacity(info: dict[str, Any] | None) -> int:
    """How many tiles an engine can work on at once, from its ``/info``: the remote backend's concurrency
    (requests it has in flight at the server behind it), else the local backend's batch size."""
    info = info or {}
    key = "concurrency" if info.get("backend") == "openai" else "batch_size"
    value = info.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else 8


#: what must agree between the engines of one run (their /info), or the tiles would be answered differently
SAME_ON_EVERY_ENGINE = ("model", "adapter", "prompt_version", "box_frame", "tile")


def engines_info(answers: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The ``/info`` a run records for its engines ``[(url, info), ...]``: the first engine's, with
    ``"engines"`` (each URL and what it takes at once) when there are several. Engines that would answer
    differently (another model, adapter, prompt version, box frame or tile) are refused, naming both."""
    first_url, first = answers[0]
    for url, info in answers[1:]:
        for key in SAME_ON_EVERY_ENGINE:
            if info.get(key) != first.get(key):
                raise ConfigError(
                    f"the engines of one run must answer alike, but {key} is {first.get(key)!r} at {first_url} and "
                    f"{info.get(key)!r} at {url}; start every --engine with the same model and adapter"
                )
    if len(answers) == 1:
        return first
    return {**first, "engines": [{"url": u, "capacity": engine_capacity(i)} for u, i in answers]}


class EngineClient:
    """Talks to one engine over HTTP. Thread-safe: it holds no connection state.

    ``retry`` says how a grounding request is tried again after a transient fault (:mod:`.retry`): a
    dropped connection, HTTP 429, 502 or 503."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        timeout_s: float = 600.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"engine URL must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self._proven_for: str | None = None  # the token the server has proven it holds

    # -- plumbing ---------------------------------------------------------------------------------
    def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        timeout_s: float | None = None,
        raw: tuple[bytes, str] | None = None,
        auth: bool = True,
    ) -> Any:
        if auth and self.token and self._proven_for != self.token:
            self._prove_server()
        data = None if body is None else json.dumps(body).encode("utf-8")
        if raw is not None:
            data = raw[0]
        # The URL scheme is checked in __init__ (http or https only).
        req = urllib.request.Request(self.url + path, data=data, method=method)  # nosec B310
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", raw[1] if raw is not None else "application/json")
        if auth and self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as resp:  # nosec B310
                return json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            message = _error_message(exc)
            # the technical line goes to the log (the plugin's is QGIS's message log); the error reads as words
            log.warning("engine %s %s%s -> %s: %s", method, self.url, path.split("?")[0], exc.code, message)
            error: EngineRequestError | EngineOverloadedError
            if exc.code == 503:
                error = EngineOverloadedError(
                    f"the engine at {self.url} has no memory (or capacity) left for this request: {message}. Try "
                    "again when it is less busy, or choose a smaller tile size"
                )
                error.status = 503  # type: ignore[attr-defined]
            else:
                error = EngineRequestError(f"the engine {STATUS_WORDS.get(exc.code, 'refused the request')} "
                                           f"(HTTP {exc.code}): {message}", exc.code)  # fmt: skip
            error.retry_after = parse_retry_after(exc.headers.get("Retry-After") if exc.headers else None)  # type: ignore[union-attr]
            raise error from None
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            unavailable = EngineUnavailableError(
                f"cannot reach the engine at {self.url} ({reason}); is it running? {SERVE_HINT}"
            )
            # refused, reset or closed before an answer: worth another try; a timeout is not
            unavailable.transient = not isinstance(reason, TimeoutError)  # type: ignore[attr-defined]
            raise unavailable from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EngineRequestError(f"engine {method} {path} returned invalid JSON: {exc}") from None

    # -- routes -----------------------------------------------------------------------------------
    def health(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """``GET /health``, which needs no token: none is sent."""
        return self._request("GET", "/health", timeout_s=timeout_s, auth=False)

    def _prove_server(self) -> None:
        """Before the token first leaves this process: the server must prove it holds the same token."""
        assert self.token is not None
        challenge = secrets.token_hex(16)
        answer = self._request("GET", f"/health?challenge={challenge}", timeout_s=10.0, auth=False)
        proof = answer.get("proof") if isinstance(answer, dict) else None
        if not isinstance(proof, str) or not hmac.compare_digest(proof, health_proof(self.token, challenge)):
            raise EngineRequestError(
                f"the engine at {self.url} did not prove that it holds this token (HTTP 401), so the token was "
                "not sent (a wrong token file, or another program listening on that port, or an engine older "
                f"than this client); use the engine's token file. {SERVE_HINT}",
                401,
            )
        self._proven_for = self.token

    def info(self, timeout_s: float = 30.0) -> dict[str, Any]:
        return self._request("GET", "/info", timeout_s=timeout_s)

    def adapters(self) -> dict[str, Any]:
        """``GET /adapters``: ``{"active": name or None, "available": {name: path}}``."""
        return self._request("GET", "/adapters", timeout_s=30.0)

    def load_adapter(self, name: str, path: str) -> dict[str, Any]:
        """``POST /adapters``: register the peft LoRA adapter in directory ``path`` as ``name``."""
        return self._request("POST", "/adapters", {"name": name, "path": str(path)})

    def activate_adapter(self, name: str | None) -> dict[str, Any]:
        """``POST /adapters/active``: switch to adapter ``name``, or back to the base model with None."""
        return self._request("POST", "/adapters/active", {"name": name})

    def shutdown(self) -> dict[str, Any]:
        """``POST /shutdown``: the engine answers 202, then stops cleanly."""
        return self._request("POST", "/shutdown", {}, timeout_s=10.0)

    def wait_until_ready(self, total_timeout_s: float = 120.0, poll_s: float = 0.25) -> dict[str, Any]:
        """Poll ``/health`` until it answers, then return ``/info``; raise after the total timeout."""
        deadline = time.monotonic() + total_timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                self.health(timeout_s=min(5.0, max(0.5, deadline - time.monotonic())))
                return self.info()
            except EngineUnavailableError as exc:
                last = exc
                time.sleep(poll_s)
        raise EngineUnavailableError(
            f"the engine at {self.url} did not become ready within {total_timeout_s:.0f} s ({last})"
        )

    def ground(
        self,
        tiles: list[TileImage],
        expression: str,
        task: str = "multi",
        reasoning: bool = True,
        max_new_tokens: int | None = None,
        outline: bool | None = None,
    ) -> list[GroundResult]:
        """Ground one expression on several tiles in one request (the engine batches them).

        ``outline``: ask the engine's SAM for each box's outline (None: the engine's default, on for ``gres``).

        The pixels travel raw (``POST /ground/tiles``): no base64, no JSON-encoded image.
        """
        header: dict[str, Any] = {
            "items": [
                {"width": t.width, "height": t.height, "expression": expression, "task": task, "reasoning": reasoning,
                 **({} if outline is None else {"outline": outline})}
                for t in tiles
            ],
        }  # fmt: skip
        if max_new_tokens is not None:  # otherwise the engine's default for the task (Geo-R1: rec 256, multi 1024)
            header["max_new_tokens"] = max_new_tokens
        head = json.dumps(header).encode("utf-8")
        body = b"".join([len(head).to_bytes(4, "big"), head, *(t.rgb for t in tiles)])
        answer = self.retry.call(
            lambda: self._request("POST", "/ground/tiles", raw=(body, TILES_MEDIA_TYPE)),
            transient_error,
            what=f"POST {self.url}/ground/tiles ({len(tiles)} tile(s))",
        )
        results = answer.get("items")
        if not isinstance(results, list) or len(results) != len(tiles):
            raise EngineRequestError(f"engine returned {len(results or [])} results for {len(tiles)} tiles")
        return [GroundResult.from_json(r) for r in results]


#: the longest expression any engine accepts (the prompt builder's limit,
#: ``geo_r1_qgis.core.rules.prompts`` imports it from here;
#: ``--max-expression-chars`` can only lower it): the plugin's history never keeps a longer one
MAX_EXPRESSION_CHARS = 2000


def request_bytes(expression: str, items: int, width: int, height: int) -> int:
    """The size of a ``POST /ground/tiles`` body of ``items`` tiles of ``width`` × ``height`` (as :meth:`EngineClient.
    ground` builds it, a few bytes generous for the header)."""
    item = {"width": width, "height": height, "expression": expression, "task": "multi", "reasoning": True}
    header = json.dumps({"items": [item] * items, "max_new_tokens": 4096}).encode("utf-8")
    return 4 + len(header) + items * width * height * 3


def check_limits(limits: dict[str, Any] | None, *, expression: str, largest_tile: tuple[int, int], items: int,
                 max_new_tokens: int | None) -> None:  # fmt: skip
    """Refuse a run the engine would refuse, before anything starts: every limit ``GET /info`` reports that the
    run's requests could break (expression length, image pixels, items and bytes per request, generation length).

    ``largest_tile`` is the largest tile image the run sends, ``items`` the tiles in its fullest request. Each
    message says what is over which limit and what to do. ``max_prompt_tokens`` needs the engine's tokenizer
    and is left to the engine (the expression's length bounds it)."""
    limits = limits or {}
    expression = expression.strip()

    def limit(name: str) -> int | None:
        value = limits.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    most = limit("max_expression_chars")
    if most is not None and len(expression) > most:
        raise ConfigError(
            f"the description is {len(expression)} characters long; this engine accepts at most {most}. Describe "
            "the target in one short sentence, e.g. 'all storage tanks'"
        )
    w, h = largest_tile
    most = limit("max_image_pixels")
    if most is not None and w * h > most:
        raise ConfigError(
            f"a tile of {w} × {h} pixels is over this engine's limit of {most:,} pixels per image; choose a smaller "
            "tile size (Advanced), or start the engine with a larger --max-image-pixels"
        )
    most = limit("max_items")
    if most is not None and items > most:
        raise ConfigError(
            f"the run sends {items} tiles per request; this engine takes at most {most}. Start the engine with "
            f"--max-items {items} or more"
        )
    most = limit("max_body_bytes")
    size = request_bytes(expression, items, w, h)
    if most is not None and size > most:
        raise ConfigError(
            f"a request of {items} tiles of {w} × {h} pixels is {size / 2**20:.1f} MiB; this engine accepts at most "
            f"{most / 2**20:.1f} MiB per request. Choose a smaller tile size (Advanced), or start the engine with a "
            "larger --max-body-mb"
        )
    most = limit("max_new_tokens")
    if most is not None and max_new_tokens is not None and max_new_tokens > most:
        raise ConfigError(
            f"max new tokens is {max_new_tokens}; this engine generates at most {most}. Lower it in the Geo-R1 "
            "Settings (0: the engine's default), or start the engine with a larger --max-new-tokens"
        )


#: what an engine's error status means, in words (docs/ARCHITECTURE.md, "Errors are JSON")
STATUS_WORDS = {
    400: "could not read the request",
    401: "refused the token (it does not match: use the token file the engine was started with, --token-file)",
    404: "does not know what was asked for",
    413: "refused a request over one of its limits",
    422: "refused a value of the request",
    500: "failed on this request (its log says why)",
    502: "could not reach the model server behind it",
}


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        payload = json.loads(exc.read().decode("utf-8"))
        err = payload.get("error", payload)
        return str(err.get("message", err) if isinstance(err, dict) else err)
    except Exception:
        return exc.reason if isinstance(exc.reason, str) else str(exc)
