"""Fine-tuning from the panel, the pure part: the job request, its texts, its curves' scaling, its metrics.

The engine's jobs API (``POST /jobs``, ``GET /jobs/{id}``, ``GET /jobs``, ``DELETE /jobs/{id}``) trains a LoRA
adapter on an annotation GeoPackage (:mod:`geo_r1_qgis.core.annotations`). The plugin asks and shows; what it
shows is computed here, with no QGIS and no Qt, so it is tested on literal job records:

* :class:`FinetuneRequest`: the body of ``POST /jobs``, which checks itself and explains a bad value;
* :func:`progress_text`, :func:`duration_text`, :func:`progress_percent`: the progress line and bar;
* :func:`curve_series`, :func:`nice_ticks`, :func:`PlotFrame`: the learning curves' points, axes and their
  mapping to pixels (the plot widget only draws what these give);
* :func:`metric_rows`: base model against adapter, under Geo-R1's metric names (Acc@0.5, mIoU, mAP, AP50);
* :func:`error_sentence`: an engine refusal as one plain sentence (its ``detail``), never an HTTP dump.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = [
    "CURVES",
    "DEFAULT_RECIPE",
    "FINAL_STATES",
    "RECIPES",
    "FinetuneRequest",
    "PlotFrame",
    "adapter_summary",
    "curve_series",
    "duration_text",
    "error_sentence",
    "job_label",
    "metric_rows",
    "nice_ticks",
    "progress_percent",
    "progress_text",
    "read_adapter_manifest",
    "state_text",
]

#: recipe key -> what the panel calls it (the engine's ``recipe`` values)
RECIPES: tuple[tuple[str, str], ...] = (
    ("sft", "SFT (supervised, fast)"),
    ("grpo", "GRPO (Geo-R1's reinforcement learning)"),
    ("dapo", "DAPO (GRPO with DAPO's loss)"),
)
DEFAULT_RECIPE = "grpo"
#: a job in one of these states changes no more
FINAL_STATES = frozenset({"done", "failed", "cancelled"})
STATE_WORDS = {
    "queued": "queued (waiting for the engine)",
    "building": "building the training set from the annotations",
    "training": "training",
    "evaluating": "evaluating the base model and the adapter",
    "done": "done",
    "failed": "failed",
    "cancelled": "cancelled",
}
#: the curves plotted, in order: (key in the job's ``curves``, legend label, RGB colour)
CURVES: tuple[tuple[str, str, tuple[int, int, int]], ...] = (
    ("reward", "reward", (31, 119, 180)),
    ("format", "format", (44, 160, 44)),
    ("iou", "IoU", (214, 39, 40)),
)
#: the longest training budget the panel offers
MAX_BUDGET_STEPS = 100_000
MAX_BUDGET_SECONDS = 7 * 24 * 3600.0


@dataclass(frozen=True)
class FinetuneRequest:
    """One fine-tune, as the panel asks the engine for it (``POST /jobs``). Exactly one budget: steps or seconds."""

    annotations: Path | str
    recipe: str = DEFAULT_RECIPE
    max_steps: int | None = None
    max_seconds: float | None = None
    #: ground resolution the chips are cut at, metres per pixel (None: the raster's own)
    gsd: float | None = None
    #: chip side in pixels (None: the model's tile)
    chip: int | None = None
    name: str | None = None
    init_adapter: str | None = None
    #: training options beyond the recipe's (``geo-r1 train grpo --help`` names them), e.g. {"lora_r": 8}
    options: Mapping[str, Any] | None = None
    #: tokens the base-vs-adapter evaluation generates at most (None: the engine's default)
    eval_max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        text = str(self.annotations).strip()
        if not text:
            raise ConfigError("choose the annotation GeoPackage to fine-tune on (draw boxes with Annotate, or pick "
                              "a .gpkg file with a geo_r1_annotations layer)")  # fmt: skip
        path = Path(text).expanduser()
        if not path.is_file():
            raise ConfigError(f"the annotation file {path} does not exist; pick the GeoPackage your annotations "
                              "are saved in")  # fmt: skip
        if path.suffix.lower() != ".gpkg":
            raise ConfigError(f"the annotation file {path.name} is not a GeoPackage (.gpkg); pick the file your "
                              "annotations are saved in")  # fmt: skip
        object.__setattr__(self, "annotations", path.resolve())
        keys = [k for k, _ in RECIPES]
        if self.recipe not in keys:
            raise ConfigError(f"unknown recipe {self.recipe!r}; choose one of {', '.join(keys)}")
        if (self.max_steps is None) == (self.max_seconds is None):
            raise ConfigError("give the training budget as steps or as minutes (one of the two)")
        if self.max_steps is not None and not 1 <= int(self.max_steps) <= MAX_BUDGET_STEPS:
            raise ConfigError(f"steps must be between 1 and {MAX_BUDGET_STEPS}, got {self.max_steps}")
        if self.max_seconds is not None and not 0 < float(self.max_seconds) <= MAX_BUDGET_SECONDS:
            raise ConfigError(f"the time budget must be more than 0 and at most 7 days, got {self.max_seconds} s")
        if self.gsd is not None and not float(self.gsd) > 0:
            raise ConfigError(f"the ground resolution must be > 0 m/px (or the raster's own), got {self.gsd}")
        if self.chip is not None and not 28 <= int(self.chip) <= 4096:
            raise ConfigError(f"the chip must be between 28 and 4096 pixels (or the model's tile), got {self.chip}")
        if self.options is not None and not isinstance(self.options, Mapping):
            raise ConfigError(f"training options must be a mapping of option names to values, got {self.options!r}")
        if self.eval_max_new_tokens is not None and int(self.eval_max_new_tokens) < 1:
            raise ConfigError(f"eval_max_new_tokens must be >= 1 (or the engine's default), got "
                              f"{self.eval_max_new_tokens}")  # fmt: skip

    def body(self) -> dict[str, Any]:
        """The JSON body of ``POST /jobs``."""
        return {
            "annotations": str(self.annotations),
            "recipe": self.recipe,
            "max_steps": int(self.max_steps) if self.max_steps is not None else None,
            "max_seconds": float(self.max_seconds) if self.max_seconds is not None else None,
            "gsd": float(self.gsd) if self.gsd is not None else None,
            "chip": int(self.chip) if self.chip is not None else None,
            "name": (self.name or "").strip() or None,
            "init_adapter": (self.init_adapter or "").strip() or None,
            **({"options": dict(self.options)} if self.options else {}),
            **({"eval_max_new_tokens": int(self.eval_max_new_tokens)} if self.eval_max_new_tokens else {}),
        }


# --------------------------------------------------------------------------------------------------
# Texts
# --------------------------------------------------------------------------------------------------


def duration_text(seconds: float | None) -> str:
    """``45 s``, ``3 min 20 s``, ``1 h 05 min``; empty for None or a negative or non-finite value."""
    if seconds is None or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
        return ""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def state_text(state: str | None) -> str:
    return STATE_WORDS.get(str(state or ""), str(state or "unknown"))


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        else None  # fmt: skip


def progress_percent(record: Mapping[str, Any]) -> int:
    """0..100 for the progress bar: step over max_steps (a done job: 100)."""
    if record.get("state") == "done":
        return 100
    step, total = _int(record.get("step")), _int(record.get("max_steps"))
    if step is None or not total or total <= 0:
        return 0
    return max(0, min(100, round(100 * step / total)))


def progress_text(record: Mapping[str, Any]) -> str:
    """``training: step 3 of 10, 12 s so far, about 40 s left`` (what is known of it)."""
    parts = [state_text(record.get("state"))]
    step, total = _int(record.get("step")), _int(record.get("max_steps"))
    if step is not None and record.get("state") not in ("queued", "building"):
        parts.append(f"step {step} of {total}" if total else f"step {step}")
    elapsed = duration_text(record.get("elapsed_s"))
    if elapsed:
        parts.append(f"{elapsed} so far" if record.get("state") not in FINAL_STATES else f"took {elapsed}")
    eta = duration_text(record.get("eta_s"))
    if eta and record.get("state") not in FINAL_STATES:
        parts.append(f"about {eta} left")
    return ", ".join(parts)


def job_label(record: Mapping[str, Any]) -> str:
    """How an earlier job is listed: ``name (recipe, state, created)``."""
    name = record.get("name") or record.get("id") or "?"
    created = str(record.get("created") or "")[:16].replace("T", " ")
    bits = [b for b in (str(record.get("recipe") or ""), str(record.get("state") or ""), created) if b]
    return f"{name} ({', '.join(bits)})" if bits else str(name)


def error_sentence(status: int | None, payload: Any, error: str | None, doing: str) -> str:
    """An engine refusal (or no answer) as a sentence: ``<doing> failed: <detail>``. The engine's detail comes
    from ``{"detail": ...}`` or ``{"error": {"message": ...}}``; without one, ``error`` (the transport's words)."""
    detail = ""
    if isinstance(payload, Mapping):
        raw = payload.get("detail")
        if raw is None and isinstance(payload.get("error"), Mapping):
            raw = payload["error"].get("message")
        if isinstance(raw, list):  # pydantic's list of problems
            raw = "; ".join(str(item.get("msg", item)) if isinstance(item, Mapping) else str(item) for item in raw)
        detail = " ".join(str(raw).split()) if raw else ""
    if not detail:
        detail = (error or f"the engine answered {status}").strip()
        if detail.startswith("the engine ") and "): " in detail:  # "the engine refused ... (HTTP 422): detail"
            detail = detail.split("): ", 1)[1]
    detail = detail.rstrip(".")
    if detail:
        detail = detail[0].upper() + detail[1:]
    return f"{doing} failed: {detail}." if doing else f"{detail}."


# --------------------------------------------------------------------------------------------------
# Curves
# --------------------------------------------------------------------------------------------------


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def curve_series(curves: Mapping[str, Sequence[Any]] | None) -> list[tuple[str, str, tuple[int, int, int],
                                                                           list[tuple[float, float]]]]:  # fmt: skip
    """``(key, label, colour, [(step, value), ...])`` of each plotted curve (:data:`CURVES`) with points; a missing
    or non-finite value (a step that logged no reward, an SFT run's format) leaves no point."""
    if not curves:
        return []
    steps = list(curves.get("step") or [])
    out = []
    for key, label, colour in CURVES:
        values = list(curves.get(key) or [])
        points = []
        for i, value in enumerate(values):
            x = _finite(steps[i]) if i < len(steps) else float(i + 1)
            y = _finite(value)
            if x is not None and y is not None:
                points.append((x, y))
        if points:
            out.append((key, label, colour, points))
    return out


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (1, 2, 5 × 10^n apart) covering ``lo..hi``."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, count - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step + 1e-9) * step
    n = max(1, math.ceil((hi - first) / step - 1e-9))
    return [round(first + i * step, 10) for i in range(n + 1)]


@dataclass(frozen=True)
class PlotFrame:
    """The data range of a plot and the pixel rectangle it is drawn in: ``to_pixel`` maps a point (y upwards)."""

    x_lo: float
    x_hi: float
    y_lo: float
    y_hi: float
    left: float
    top: float
    width: float
    height: float

    def __post_init__(self) -> None:
        if not (self.x_hi > self.x_lo and self.y_hi > self.y_lo):
            raise ConfigError(f"a plot range must be increasing, got x {self.x_lo}..{self.x_hi}, "
                              f"y {self.y_lo}..{self.y_hi}")  # fmt: skip
        if self.width <= 0 or self.height <= 0:
            raise ConfigError(f"a plot area must be larger than 0 pixels, got {self.width} x {self.height}")

    @classmethod
    def fit(cls, series: Sequence[Sequence[tuple[float, float]]], left: float, top: float, width: float,
            height: float) -> PlotFrame:  # fmt: skip
        """The frame that holds every point: x from the first to the last step (at least 1 wide); y from
        min(0, lowest) to max(1, highest) on nice ticks, since rewards, format and IoU live in 0..1."""
        xs = [p[0] for s in series for p in s]
        ys = [p[1] for s in series for p in s]
        x_lo, x_hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
        if x_hi - x_lo < 1:
            x_hi = x_lo + 1
        y_lo, y_hi = min([0.0, *ys]), max([1.0, *ys])
        ticks = nice_ticks(y_lo, y_hi)
        if ticks:
            y_lo, y_hi = min(y_lo, ticks[0]), max(y_hi, ticks[-1])
        return cls(x_lo, x_hi, y_lo, y_hi, left, top, max(1.0, width), max(1.0, height))

    def to_pixel(self, x: float, y: float) -> tuple[float, float]:
        px = self.left + (x - self.x_lo) / (self.x_hi - self.x_lo) * self.width
        py = self.top + self.height - (y - self.y_lo) / (self.y_hi - self.y_lo) * self.height
        return px, py


def tick_text(value: float) -> str:
    """A tick's label: an integer without decimals, else up to 3 significant digits."""
    if abs(value - round(value)) < 1e-9:
        return str(round(value))
    return f"{value:.3g}"


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------

#: metric key -> (Geo-R1's name, how it is stored: "fraction" 0..1 or "percent" 0..100, or "count")
METRIC_NAMES: dict[str, tuple[str, str]] = {
    "acc50": ("Acc@0.5", "fraction"),
    "acc@0.5": ("Acc@0.5", "percent"),
    "acc@0.7": ("Acc@0.7", "percent"),
    "mean_iou": ("mIoU", "fraction"),
    "miou": ("mIoU", "fraction"),
    "mAP": ("mAP", "percent"),
    "map": ("mAP", "percent"),
    "AP50": ("AP50", "percent"),
    "ap50": ("AP50", "percent"),
    "giou": ("gIoU", "fraction"),
    "ciou": ("cIoU", "fraction"),
    "precision": ("Precision", "fraction"),
    "recall": ("Recall", "fraction"),
    "f1": ("F1", "fraction"),
    "format": ("Format", "fraction"),
    "queries": ("Queries", "count"),
}
_ORDER = list(METRIC_NAMES)


def _metric_value(raw: Any) -> float | None:
    if isinstance(raw, Mapping):  # a breakdown: its overall value
        raw = raw.get("overall")
    return _finite(raw)


def metric_text(key: str, raw: Any) -> str:
    """One metric's value as shown: ``81.2 %`` for a score, ``12`` for a count, ``–`` when absent."""
    value = _metric_value(raw)
    if value is None:
        return "–"
    kind = METRIC_NAMES.get(key, ("", "plain"))[1]
    if kind == "fraction":
        return f"{value * 100:.1f} %"
    if kind == "percent":
        return f"{value:.1f} %"
    if kind == "count":
        return str(round(value))
    return f"{value:.3g}"


def metric_rows(metrics: Mapping[str, Any] | None) -> list[tuple[str, str, str]]:
    """``(name, base, adapter)`` rows of a job's ``metrics`` (``{"base": {...}, "adapter": {...}}``, or a
    manifest's ``{"before", "after"}``): Geo-R1's names first in their usual order, then any other number."""
    if not isinstance(metrics, Mapping):
        return []
    base = metrics.get("base", metrics.get("before")) or {}
    tuned = metrics.get("adapter", metrics.get("after")) or {}
    base = base if isinstance(base, Mapping) else {}
    tuned = tuned if isinstance(tuned, Mapping) else {}
    keys = [k for k in dict.fromkeys([*base, *tuned]) if _metric_value(base.get(k)) is not None
            or _metric_value(tuned.get(k)) is not None]  # fmt: skip
    keys.sort(key=lambda k: (_ORDER.index(k) if k in _ORDER else len(_ORDER), k))
    seen: set[str] = set()
    rows = []
    for key in keys:
        name = METRIC_NAMES.get(key, (key, ""))[0]
        if name in seen:  # the same metric under two keys (acc50 and acc@0.5): the first one
            continue
        seen.add(name)
        rows.append((name, metric_text(key, base.get(key)), metric_text(key, tuned.get(key))))
    return rows


#: the manifest a Geo-R1 trainer writes beside its adapter (train/trainer.py; engine.runtime.loading reads it too)
ADAPTER_MANIFEST = "geo_r1_adapter.json"


def read_adapter_manifest(folder: str | Path) -> dict[str, Any]:
    """An adapter folder's ``geo_r1_adapter.json``, or {} when it has none or it is unreadable (the engine runs
    on this machine, so the folder the engine lists is readable here)."""
    import json

    try:
        data = json.loads((Path(folder).expanduser() / ADAPTER_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, RuntimeError):
        return {}
    return data if isinstance(data, dict) else {}


def adapter_summary(manifest: Mapping[str, Any] | None) -> str:
    """One line on an adapter from its ``geo_r1_adapter.json``: method, steps and its metrics before -> after."""
    if not isinstance(manifest, Mapping) or not manifest:
        return ""
    head = [str(manifest.get("method") or "").upper(), str(manifest.get("task") or "")]
    if _int(manifest.get("steps")) is not None:
        head.append(f"{manifest['steps']} steps")
    rows = metric_rows(manifest.get("metrics"))
    scores = [f"{name} {b} -> {a}" for name, b, a in rows if name != "Queries"]
    return "; ".join([" ".join(h for h in head if h), *scores]).strip("; ")
