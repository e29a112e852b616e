"""What every grounding backend returns, and the interface the server talks to.

A backend turns (image, expression) items into reasoning plus boxes. Two implement it:
:class:`engine.runtime.local.LocalBackend` (a transformers model in this process) and
:class:`engine.runtime.remote.RemoteBackend` (a remote OpenAI-compatible server such as vLLM or SGLang, or a
second engine's ``/v1`` route). Both use the same prompts (:mod:`geo_r1_qgis.core.rules.prompts`), the same parser
(:mod:`geo_r1_qgis.core.rules.parsing`), the same coordinate handling
(:mod:`geo_r1_qgis.core.rules.coords`) and the same confidence
definitions (:mod:`geo_r1_qgis.core.rules.confidence`), so their results are interchangeable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from geo_r1_qgis.core.client import Box
from geo_r1_qgis.core.errors import ConfigError
from geo_r1_qgis.core.rules.prompts import TASKS

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

Task = Literal["rec", "multi", "gres"]


@dataclass(frozen=True)
class GroundItem:
    """One grounding query: an RGB image (a tile) and a referring expression."""

    image: Image.Image
    expression: str
    task: Task = "multi"
    reasoning: bool = True

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {self.task!r}")
        if not isinstance(self.expression, str) or not self.expression.strip():
            raise ConfigError("the expression is empty: describe what to find, e.g. 'all storage tanks'")


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings. Geo-R1's evaluation decodes greedily with max_new_tokens=256."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= 4096:
            raise ConfigError(f"max_new_tokens must be within 1..4096, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")


@dataclass(frozen=True)
class ItemResult:
    """Everything the engine says about one item."""

    boxes: tuple[Box, ...]  # in the pixels of the image the client sent (smart_resize undone, clipped)
    presence: float
    reasoning: str | None
    answer: str | None
    raw_text: str
    parse_status: str
    format_ok: bool
    image_size: tuple[int, int]
    model_size: tuple[int, int]
    tokens_generated: int
    timings_ms: dict[str, float] = field(default_factory=dict)
    #: how many items were generated together with this one (micro-batching)
    batch_size: int = 1

    def to_json(self) -> dict[str, Any]:
        return {
            "boxes": [{"bbox": [b.x1, b.y1, b.x2, b.y2], "score": b.score, "label": b.label} for b in self.boxes],
            "presence": self.presence,
            "reasoning": self.reasoning,
            "answer": self.answer,
            "raw_text": self.raw_text,
            "parse_status": self.parse_status,
            "format_ok": self.format_ok,
            "image_size": list(self.image_size),
            "model_size": list(self.model_size),
            "tokens_generated": self.tokens_generated,
            "timings_ms": dict(self.timings_ms),
            "batch_size": self.batch_size,
        }


@dataclass(frozen=True)
class ChatResult:
    """The raw result of an OpenAI-style chat completion (for the ``/v1`` route)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"
    #: per generated token: (token text, log-prob, {alternative token text: log-prob}) when asked for
    logprobs: tuple[tuple[str, float, dict[str, float]], ...] | None = None


def is_out_of_memory(exc: BaseException) -> bool:
    """Out of memory, whoever ran out: torch's OutOfMemoryError (CUDA, MPS; recognised without importing
    torch), MemoryError (numpy, PIL, and EngineOverloadedError), or the CPU allocator's RuntimeError."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def item_result(
    text: str,
    parsed: Any,
    scores: tuple[float, ...],
    presence: float,
    model_size: tuple[int, int],
    image_size: tuple[int, int],
    tokens_generated: int,
    timings_ms: dict[str, float],
    batch_size: int = 1,
    box_frame: str = "model",
) -> ItemResult:
    """The result of one item from the model's text, its parse and its confidences (every backend's last step).

    Boxes go from the model's pixels back to the client image's (smart_resize undone, clipped); with
    ``box_frame="image"`` they are taken as the client image's pixels already (clipped only). Boxes with no
    area left are dropped.
    """
    from geo_r1_qgis.core.rules.coords import model_to_image_box

    frame_size = image_size if box_frame == "image" else model_size  # "image": clip only (BOX_FRAMES)
    boxes = []
    for pbox, score in zip(parsed.boxes, scores, strict=True):
        box = model_to_image_box(pbox, frame_size, image_size)
        if box is not None:
            boxes.append(Box(box.x1, box.y1, box.x2, box.y2, score=score, label=pbox.label))
    return ItemResult(
        boxes=tuple(boxes),
        presence=presence,
        reasoning=parsed.reasoning,
        answer=parsed.answer,
        raw_text=text,
        parse_status=str(getattr(parsed.status, "value", parsed.status)),
        format_ok=bool(parsed.format_ok),
        image_size=(int(image_size[0]), int(image_size[1])),
        model_size=(int(model_size[0]), int(model_size[1])),
        tokens_generated=tokens_generated,
        timings_ms=timings_ms,
        batch_size=batch_size,
    )


class Backend(Protocol):
    """What the server needs from a backend. Implementations must be thread-safe."""

    def info(self) -> dict[str, Any]:
        """Model, processor, adapter, device, dtype, backend kind (JSON-serialisable)."""

    def ground(self, items: list[GroundItem], settings: GenerationSettings) -> list[ItemResult]:
        """Ground every item; results in the same order. Raises EngineOverloadedError on OOM."""

    def chat(
        self,
        messages: list[dict[str, Any]],
        images: list[Image.Image],
        settings: GenerationSettings,
        top_logprobs: int = 0,
        cancel: Any = None,
    ) -> ChatResult:
        """Run one chat completion on already-templated messages (images in message order); a set
        ``cancel`` (a ``threading.Event``) stops the generation at the next token."""

    def adapters(self) -> dict[str, Any]:
        """{"active": name | None, "available": {name: path}}."""

    def load_adapter(self, name: str, path: str) -> None: ...

    def activate_adapter(self, name: str | None) -> None: ...
