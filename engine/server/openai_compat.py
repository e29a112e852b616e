"""The pieces of ``POST /v1/chat/completions`` that are OpenAI's shape rather than the engine's.

The route itself lives in :func:`engine.server.app.create_app`; these pure helpers check the options of a
:class:`engine.server.api_models.ChatRequest`, turn its messages into the backend's chat messages, and build
the OpenAI ``chat.completion`` body (with ``logprobs`` in OpenAI's format) from a
:class:`engine.runtime.backend.ChatResult`.

Decoding options follow OpenAI's, except that an omitted (or zero) ``temperature`` decodes greedily,
as Geo-R1 is evaluated; ``top_p``, ``seed`` and other sampling fields are accepted and ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

from engine import __version__ as ENGINE_VERSION
from engine.runtime.backend import ChatResult, GenerationSettings
from engine.server.api_models import ChatMessageIn, ChatRequest, TextPart, open_image, split_data_uri
from engine.server.security import ApiError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image


def check_chat_request(body: ChatRequest) -> None:
    """Refuse the options this engine does not support (400)."""
    if body.stream:
        raise ApiError(400, "stream=true is not supported by this engine: send stream=false")
    if body.n not in (None, 1):
        raise ApiError(400, f"n={body.n} is not supported: one completion per request")
    if body.stop:
        raise ApiError(400, "stop sequences are not supported by this engine")
    if body.top_logprobs and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs=true")


def to_backend_messages(messages: list[ChatMessageIn]) -> tuple[list[dict[str, Any]], list[str]]:
    """The backend's chat messages (images as ``{"type": "image"}`` placeholders) and the images' data: URIs.

    ``developer`` messages become ``system`` ones. An image URL that is not a ``data:`` URI is a 400:
    the engine never fetches URLs.
    """
    out: list[dict[str, Any]] = []
    urls: list[str] = []
    for m, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if message.content is None or isinstance(message.content, str):
            out.append({"role": role, "content": message.content or ""})
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
        out.append({"role": role, "content": parts})
    return out, urls


def decode_data_images(urls: list[str], max_pixels: int) -> list[Image.Image]:
    """The RGB images of ``data:`` URIs, in order (runs in a worker thread)."""
    return [open_image(split_data_uri(url, f"image {i}"), max_pixels, f"image {i}") for i, url in enumerate(urls)]


def chat_settings(body: ChatRequest) -> GenerationSettings:
    """Generation settings of a chat request: greedy unless ``temperature`` > 0."""
    temperature = body.temperature or 0.0
    return GenerationSettings(
        max_new_tokens=body.max_completion_tokens or body.max_tokens or 256,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
    )


def openai_logprobs(
    logprobs: tuple[tuple[str, float, dict[str, float]], ...] | None, top: int
) -> dict[str, Any] | None:
    """A choice's ``logprobs`` in OpenAI's format, keeping the ``top`` likeliest alternatives per token."""
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


def chat_completion(result: ChatResult, served: str, top: int, want_logprobs: bool) -> dict[str, Any]:
    """The OpenAI ``chat.completion`` body of one backend answer."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": served,
        "system_fingerprint": f"geo-r1-{ENGINE_VERSION}",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text, "refusal": None},
                "logprobs": openai_logprobs(result.logprobs, top) if want_logprobs else None,
                "finish_reason": result.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        },
    }
