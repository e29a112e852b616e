"""What every grounding backend returns, and the interface the server talks to.

A backend turns (image, expression) items into reasoning plus boxes. Two implement it:
:class:`engine.runtime.LocalBackend` (a transformers model in this process) and
:class:`engine.remote.RemoteBackend` (a remote OpenAI-compatible server such as vLLM or SGLang, or a
second engine's ``/v1`` route). Both use the same prompts (:mod:`engine.prompts`), the same parser
(:mod:`engine.parsing`), the same coordinate handling (:mod:`engine.coords`) and the same confidence
definitions (:mod:`engine.confidence`), so their results are interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from geo_r1_qgis.core.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

Task = Literal["rec", "multi"]
TASKS: tuple[str, ...] = ("rec", "multi")


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
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")


@dataclass(frozen=True)
class BoxResult:
    """A box in the pixels of the image the client sent (smart_resize undone, clipped)."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    label: str | None = None

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)


@dataclass(frozen=True)
class ItemResult:
    """Everything the engine says about one item."""

    boxes: tuple[BoxResult, ...]
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
            "boxes": [
                {"bbox": [b.x1, b.y1, b.x2, b.y2], "score": b.score, "label": b.label} for b in self.boxes
            ],
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
    ) -> ChatResult:
        """Run one chat completion on already-templated messages (images in message order)."""

    def adapters(self) -> dict[str, Any]:
        """{"active": name | None, "available": {name: path}}."""

    def load_adapter(self, name: str, path: str) -> None: ...

    def activate_adapter(self, name: str | None) -> None: ...
