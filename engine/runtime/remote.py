"""A backend that forwards to any OpenAI-compatible server: vLLM, SGLang, or a second engine's ``/v1``.

:class:`RemoteBackend` implements :class:`engine.runtime.backend.Backend`. The remote server only generates
text; everything Geo-R1-specific happens here, with the same code as the local backend: the prompt
(:func:`geo_r1_qgis.core.rules.prompts.build_messages`, sent as OpenAI content parts, the image first as a PNG
``data:`` URI), the parse (:func:`geo_r1_qgis.core.rules.parsing.parse_output`), the coordinate rescaling
(:mod:`geo_r1_qgis.core.rules.coords`) and the confidences
(:func:`geo_r1_qgis.core.rules.confidence.confidence_from_tokens`).

Assumptions (documented because the remote server does not report them)
-----------------------------------------------------------------------
* **Coordinates.** The remote model's processor resizes images with Qwen2.5-VL's default
  ``smart_resize`` (multiples of 28, min_pixels=3136, max_pixels=12845056), so a box is rescaled from
  :func:`geo_r1_qgis.core.rules.coords.model_input_size` of the image we sent to the image's own size. A server
  started with other limits (vLLM ``--mm-processor-kwargs '{"max_pixels": ...}'``) must be matched with
  the ``min_pixels``/``max_pixels`` arguments, or boxes of large images land in the wrong place.
* **Confidence.** Each request asks for ``logprobs`` with ``top_logprobs=20``. A box's score uses the
  log-probabilities of the chosen tokens, exactly as locally. Presence needs ``P(None)`` at the branch
  position; the remote server only returns the top 20 alternatives, so ``P(None)`` is the mass of the
  None-like tokens among them: a lower bound, equal to the local value whenever the None tokens rank
  in the top 20 (they do whenever they matter). A server that returns no logprobs gets score 1.0 for
  every box and presence 1.0 if there is a box, else 0.0, with a warning in the log.
* **Decoding.** Greedy settings are sent as ``temperature=0``; sampling sends the temperature.

Connections use :mod:`httpx` directly (environment proxy variables are ignored: the server is usually
on this machine or this network). ``concurrency`` requests are in flight at most, across all callers.

Cost per tile and faults
------------------------
* **Encoding** (:func:`png_bytes`): the tile's pixels become a PNG with no row filter and zlib at
  ``png_level`` (default 0, stored: lossless, about 3 ms for a 504² tile however noisy, where Pillow's
  adaptive filtering took 25 to 55 ms; a higher level trades CPU for bytes on a slow link). The request body is
  ``json.dumps`` of the payload with a placeholder, the base64 bytes spliced in (base64 needs no JSON escaping),
  so the image is neither scanned by the JSON encoder nor copied into a str.
* **Retries** (:mod:`geo_r1_qgis.core.retry`, the client's policy): a completion that fails with a dropped
  connection, 502, 503 or 429 (``Retry-After`` honoured) is tried again up to ``retries`` times with bounded
  backoff; then the error goes to the caller (the engine answers 502 or 503, and the client may try again).
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import math
import secrets
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from engine.runtime.backend import ChatResult, GenerationSettings, GroundItem, ItemResult, item_result
from geo_r1_qgis.core.errors import (
    ConfigError,
    EngineOverloadedError,
    EngineRequestError,
    EngineUnavailableError,
)
from geo_r1_qgis.core.retry import RetryPolicy, parse_retry_after, transient_error
from geo_r1_qgis.core.rules.confidence import confidence_from_tokens, is_none_piece
from geo_r1_qgis.core.rules.coords import QWEN25_MAX_PIXELS, QWEN25_MIN_PIXELS, model_input_size
from geo_r1_qgis.core.rules.parsing import parse_output
from geo_r1_qgis.core.rules.prompts import build_messages

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

log = logging.getLogger(__name__)

#: Alternatives asked for per token (the most OpenAI's API allows).
TOP_LOGPROBS = 20

START_HINT = (
    "start it first, e.g.  vllm serve Qwen/Qwen2.5-VL-3B-Instruct --port 8000  or  "
    "geo-r1 serve --model <model> --port 8000  and pass its /v1 URL (http://127.0.0.1:8000/v1)"
)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DATA_URI_PREFIX = b"data:image/png;base64,"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(data, zlib.crc32(kind)).to_bytes(4, "big")


def png_bytes(image: Image.Image, level: int = 0) -> bytes:
    """A lossless PNG of an RGB image: 8-bit RGB, no row filter, zlib at ``level`` (0: stored, the fastest)."""
    import numpy as np

    rgb = image if image.mode == "RGB" else image.convert("RGB")
    w, h = rgb.size
    rows = np.empty((h, w * 3 + 1), np.uint8)  # each scanline: filter type 0 (None), then its pixels
    rows[:, 0] = 0
    rows[:, 1:] = np.asarray(rgb).reshape(h, w * 3)
    header = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes((8, 2, 0, 0, 0))  # 8 bits, RGB, no interlace
    return b"".join((_PNG_SIGNATURE, _png_chunk(b"IHDR", header), _png_chunk(b"IDAT", zlib.compress(rows, level)),
                     _png_chunk(b"IEND", b"")))  # fmt: skip


def image_data_uri(image: Image.Image, level: int = 0) -> bytes:
    """``data:image/png;base64,...`` of an RGB image, as ASCII bytes (:func:`png_bytes`)."""
    return DATA_URI_PREFIX + base64.b64encode(png_bytes(image, level))


def png_data_uri(image: Image.Image, level: int = 0) -> str:
    """A lossless ``data:image/png;base64,...`` URI of an RGB image, as a str (:func:`image_data_uri`)."""
    return image_data_uri(image, level).decode("ascii")


def to_openai_messages(messages: list[dict[str, Any]], image_uris: list[str]) -> list[dict[str, Any]]:
    """Qwen chat messages (``{"type": "image"}`` placeholders) -> OpenAI content parts, images in order."""
    uris = iter(image_uris)
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str) or content is None:
            out.append({"role": message["role"], "content": content or ""})
            continue
        parts = []
        for part in content:
            if part.get("type") == "image":
                try:
                    url = next(uris)
                except StopIteration:
                    raise ConfigError("more image placeholders in the messages than images") from None
                parts.append({"type": "image_url", "image_url": {"url": url}})
            elif part.get("type") == "text":
                parts.append({"type": "text", "text": part.get("text", "")})
            else:
                raise ConfigError(f"unsupported message part type {part.get('type')!r}: use 'text' or 'image'")
        out.append({"role": message["role"], "content": parts})
    if next(uris, None) is not None:
        raise ConfigError("more images than image placeholders in the messages")
    return out


def token_logprobs(
    logprobs: dict[str, Any] | None,
) -> tuple[list[str], list[float], list[float], list[dict[str, float]]]:
    """Pieces, chosen log-probs, P(None-like) and alternatives per token from OpenAI's ``logprobs``."""
    pieces: list[str] = []
    chosen: list[float] = []
    none_probs: list[float] = []
    alternatives: list[dict[str, float]] = []
    for entry in (logprobs or {}).get("content") or []:
        pieces.append(str(entry.get("token", "")))
        chosen.append(_finite(entry.get("logprob")))
        alts: dict[str, float] = {}
        for alt in entry.get("top_logprobs") or []:
            alts.setdefault(str(alt.get("token", "")), _finite(alt.get("logprob")))
        alternatives.append(alts)
        none_probs.append(min(1.0, sum(math.exp(lp) for tok, lp in alts.items() if _none_piece(tok))))
    return pieces, chosen, none_probs, alternatives


#: is_none_piece of a token text, remembered: the same few thousand token texts come back in every answer
_none_piece = functools.lru_cache(maxsize=1 << 16)(is_none_piece)


def _finite(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return -9999.0
    return v if math.isfinite(v) else -9999.0


class RemoteBackend:
    """Geo-R1 grounding through an OpenAI-compatible ``/v1`` server (see the module docstring)."""

    kind = "openai"
    #: which pixels the model's boxes are in (geo_r1_qgis.core.rules.coords.BOX_FRAMES); the server sets it
    box_frame = "model"

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        model: str | None = None,
        concurrency: int = 8,
        timeout_s: float = 300.0,
        *,
        min_pixels: int = QWEN25_MIN_PIXELS,
        max_pixels: int = QWEN25_MAX_PIXELS,
        png_level: int = 0,
        retries: int = 3,
    ) -> None:
        import httpx

        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, got {base_url!r}")
        if concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
        if not timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0, got {timeout_s}")
        if isinstance(png_level, bool) or not isinstance(png_level, int) or not 0 <= png_level <= 9:
            raise ConfigError(f"png_level must be a zlib level 0..9 (0: stored, fastest), got {png_level!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigError(f"retries must be an integer >= 0 (0: never retry), got {retries!r}")
        self.png_level = png_level
        self.retry = RetryPolicy(attempts=retries + 1)
        #: stands for the image in the JSON text until the base64 bytes replace it
        self._placeholder = f"geo-r1-image-{secrets.token_hex(8)}"
        self.base_url = base_url.rstrip("/")
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        headers = {"Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._httpx = httpx
        self._client = httpx.Client(
            base_url=self.base_url + "/",
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            trust_env=False,
        )
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="geo-r1-remote")
        self._warned_no_logprobs = threading.Event()
        self.model = model or self._first_model()
        log.info("remote backend: %s, model %s, %d requests in flight at most", self.base_url, self.model, concurrency)

    # -- Backend interface ------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {
            "backend": self.kind,
            "base_url": self.base_url,
            "model": self.model,
            "processor": None,
            "adapter": None,
            "adapters": [],
            "device": "remote",
            "dtype": None,
            "concurrency": self.concurrency,
            "smart_resize": {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels},
            "box_frame": self.box_frame,
            "tile": None,  # the served model's tile is not known behind an OpenAI-compatible server
        }

    def ground(self, items: list[GroundItem], settings: GenerationSettings) -> list[ItemResult]:
        futures: list[Future[ItemResult]] = [self._pool.submit(self._ground_one, it, settings) for it in items]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    def chat(
        self,
        messages: list[dict[str, Any]],
        images: list[Image.Image],
        settings: GenerationSettings,
        top_logprobs: int = 0,
        cancel: Any = None,  # the remote server keeps its own request; nothing to stop here
    ) -> ChatResult:
        del cancel
        payload = self._payload(
            to_openai_messages(messages, [png_data_uri(im, self.png_level) for im in images]), settings
        )
        if top_logprobs:
            payload["logprobs"] = True
            payload["top_logprobs"] = min(TOP_LOGPROBS, top_logprobs)
        answer = self._pool.submit(self._post, "chat/completions", payload).result()
        choice = self._choice(answer)
        text = (choice.get("message") or {}).get("content") or ""
        lp = None
        if top_logprobs:
            pieces, chosen, _, alternatives = token_logprobs(choice.get("logprobs"))
            lp = tuple(zip(pieces, chosen, alternatives, strict=True))
        usage = answer.get("usage") or {}
        finish = choice.get("finish_reason")
        return ChatResult(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason=finish if finish in ("stop", "length") else "stop",
            logprobs=lp,
        )

    def adapters(self) -> dict[str, Any]:
        return {"active": None, "available": {}}

    def load_adapter(self, name: str, path: str) -> None:
        raise ConfigError(
            f"cannot load adapter {name!r} here: adapters of a remote server are loaded there "
            "(vLLM: --enable-lora --lora-modules NAME=PATH); then start this engine with --remote-model NAME"
        )

    def activate_adapter(self, name: str | None) -> None:
        if name is not None:
            self.load_adapter(name, "")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    # -- internals --------------------------------------------------------------------------------
    def _payload(self, messages: list[dict[str, Any]], settings: GenerationSettings) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": messages,
            "max_tokens": settings.max_new_tokens,
            "temperature": settings.temperature if settings.do_sample else 0.0,
            "stream": False,
        }

    def _ground_one(self, item: GroundItem, settings: GenerationSettings) -> ItemResult:
        t0 = time.perf_counter()
        image = item.image if item.image.mode == "RGB" else item.image.convert("RGB")
        image_size = (int(image.size[0]), int(image.size[1]))
        model_size = model_input_size(image_size, self.min_pixels, self.max_pixels)
        messages = to_openai_messages(build_messages(item.expression, item.task, item.reasoning), [self._placeholder])
        payload = self._payload(messages, settings)
        payload.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
        body = self._body(payload, image_data_uri(image, self.png_level))
        t1 = time.perf_counter()
        answer = self._request("POST", "chat/completions", content=body)
        t2 = time.perf_counter()
        choice = self._choice(answer)
        text = (choice.get("message") or {}).get("content") or ""
        pieces, chosen, none_probs, _ = token_logprobs(choice.get("logprobs"))
        parsed = parse_output(text, item.task, item.reasoning)
        scores, presence = self._confidences(text, pieces, chosen, none_probs, parsed, item)
        usage = answer.get("usage") or {}
        timings = {"preprocess": (t1 - t0) * 1000.0, "generate": (t2 - t1) * 1000.0}
        result = item_result(
            text,
            parsed,
            scores,
            presence,
            model_size,
            image_size,
            int(usage.get("completion_tokens") or len(pieces)),
            timings,
            box_frame=self.box_frame,
        )
        result.timings_ms["parse"] = (time.perf_counter() - t2) * 1000.0
        return result

    def _confidences(
        self,
        text: str,
        pieces: list[str],
        chosen: list[float],
        none_probs: list[float],
        parsed: Any,
        item: GroundItem,
    ) -> tuple[tuple[float, ...], float]:
        if not pieces:
            if not self._warned_no_logprobs.is_set():
                self._warned_no_logprobs.set()
                log.warning(
                    "%s returned no logprobs: box scores are 1.0 and presence is 1.0/0.0 (boxes or not)",
                    self.base_url,
                )
            return tuple(1.0 for _ in parsed.boxes), 1.0 if parsed.boxes else 0.0
        joined = "".join(pieces)
        if joined == text:
            return confidence_from_tokens(pieces, chosen, none_probs, parsed)
        # The token texts do not spell the message exactly (a server-side detokenisation quirk): score
        # the parse of the tokens' own text, which has the same boxes in the same order when it agrees.
        log.debug("token pieces do not spell the returned text; scoring the pieces' own parse")
        token_parse = parse_output(joined, item.task, item.reasoning)
        scores, presence = confidence_from_tokens(pieces, chosen, none_probs, token_parse)
        if len(scores) != len(parsed.boxes):
            scores = tuple(0.0 for _ in parsed.boxes)
        return scores, presence

    def _first_model(self) -> str:
        answer = self._request("GET", "models")
        data = answer.get("data") if isinstance(answer, dict) else None
        if not data or not isinstance(data, list) or not data[0].get("id"):
            raise EngineRequestError(f"{self.base_url}/models lists no model; pass the model name (--remote-model)")
        return str(data[0]["id"])

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", path, payload)

    def _body(self, payload: dict[str, Any], uri: bytes) -> bytes:
        """The JSON body of ``payload`` whose one image URL is the placeholder, with ``uri`` in its place."""
        text = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        before, sep, after = text.partition(self._placeholder.encode("ascii"))
        if not sep or self._placeholder.encode("ascii") in after:
            raise ConfigError("the request must hold exactly one image placeholder")  # a bug, not the user's
        return b"".join((before, uri, after))

    def _request(
        self, method: str, path: str, payload: dict[str, Any] | None = None, content: bytes | None = None
    ) -> dict[str, Any]:
        """One request, tried again after a transient fault (module docstring, "Cost per tile and faults")."""
        return self.retry.call(
            lambda: self._request_once(method, path, payload, content),
            transient_error,
            what=f"{method} {self.base_url}/{path}",
        )

    def _request_once(
        self, method: str, path: str, payload: dict[str, Any] | None, content: bytes | None
    ) -> dict[str, Any]:
        httpx = self._httpx
        url = f"{self.base_url}/{path}"
        try:
            if content is not None:
                response = self._client.request(method, path, content=content,
                                                headers={"Content-Type": "application/json"})  # fmt: skip
            else:
                response = self._client.request(method, path, json=payload)
        except httpx.TimeoutException:
            raise EngineUnavailableError(
                f"the OpenAI-compatible server at {self.base_url} did not answer {method} /{path} within "
                f"{self.timeout_s:.0f} s; is it overloaded or stuck?"
            ) from None
        except httpx.TransportError as exc:
            error = EngineUnavailableError(
                f"cannot reach the OpenAI-compatible server at {self.base_url} ({type(exc).__name__}: {exc}); "
                + START_HINT
            )
            error.transient = True  # type: ignore[attr-defined]  # refused, reset or closed: worth another try
            raise error from None
        if response.status_code >= 400:
            message = _error_message(response)
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            failure: EngineOverloadedError | EngineRequestError
            if response.status_code == 503:
                failure = EngineOverloadedError(f"{url} is overloaded: {message}")
                failure.status = 503  # type: ignore[attr-defined]
            else:
                hint = " (check the API key: --api-key-env)" if response.status_code in (401, 403) else ""
                failure = EngineRequestError(f"{method} {url} -> {response.status_code}: {message}{hint}",
                                             response.status_code)  # fmt: skip
            failure.retry_after = retry_after  # type: ignore[union-attr]
            raise failure
        try:
            answer = response.json()
        except ValueError:
            raise EngineRequestError(f"{method} {url} returned invalid JSON") from None
        if not isinstance(answer, dict):
            raise EngineRequestError(f"{method} {url} returned {type(answer).__name__}, not a JSON object")
        return answer

    def _choice(self, answer: dict[str, Any]) -> dict[str, Any]:
        choices = answer.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise EngineRequestError(f"{self.base_url}/chat/completions returned no choices")
        return choices[0]


def _error_message(response: Any) -> str:
    try:
        payload = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    err = payload.get("error", payload) if isinstance(payload, dict) else payload
    if isinstance(err, dict):
        return str(err.get("message") or err.get("detail") or err)
    return str(err)[:300]
