"""What a run's results look like, and how raster bands become an 8-bit RGB tile: shared by both
writers and both readers.

Pure (standard library and numpy). The command line's GeoPackage (``engine/gpkg.py``, ``engine/rasters.py``)
and the plugin's Processing output (``geo_r1_qgis/qgis_io/rasters.py``) both use these, so a layer made by either
has the same fields, and a raster is stretched the same way by either reader.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from .errors import ConfigError

#: The fields of every result layer, in order.
OUTPUT_FIELDS: tuple[str, ...] = (
    "expression",
    "mode",
    "score",
    "presence",
    "label",
    "reasoning",
    "model",
    "adapter",
    "prompt_version",
    "tile_id",
    "run_id",
    "created",
    "truncated",
)

#: Percentiles of the valid pixels that map to 0 and 255 when data is not 8-bit.
STRETCH_PERCENTILES: tuple[float, float] = (2.0, 98.0)


def make_run_id(now: datetime | None = None) -> str:
    """``YYYYmmddTHHMMSS_xxxxxx`` (UTC time and 6 random hex digits)."""
    now = now or datetime.now(timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S") + "_" + secrets.token_hex(3)


def stretch_limits(values: Any) -> tuple[float, float]:
    """The (low, high) of one band's valid values: the 2nd and 98th percentiles, never equal.

    Falls back to the min and max when the percentiles coincide, and to ``(v, v + 1)`` for a constant
    band; ``(0, 1)`` when there is no value at all.
    """
    import numpy as np

    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return (0.0, 1.0)
    lo, hi = np.percentile(values, STRETCH_PERCENTILES)
    if not hi > lo:
        lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        hi = lo + 1.0
    return (float(lo), float(hi))


def to_uint8(band: Any, lo: float, hi: float) -> Any:
    """One band stretched linearly so ``lo`` → 0 and ``hi`` → 255 (clipped, rounded; NaN → 0)."""
    import numpy as np

    values = np.nan_to_num(np.asarray(band, dtype=np.float32), nan=lo, posinf=hi, neginf=lo)
    # clip first: a value like a -3.4e38 nodata would overflow float32 in the scaling (and warn)
    values = np.clip(values, np.float32(lo), np.float32(hi))
    return np.clip((values - lo) * (255.0 / (hi - lo)), 0, 255).round().astype(np.uint8)


def palette_lut(entries: Any, size: int = 256) -> Any:
    """A ``(size, 3)`` uint8 lookup table from a colour table's ``(index, (r, g, b[, a]))`` entries.

    One-band paletted rasters hold colour indices (0..3, say: a nearly black image if sent as grey); both
    readers expand them through the table, so the model sees the colours the user sees.
    """
    import numpy as np

    lut = np.zeros((max(1, int(size)), 3), np.uint8)
    for index, colour in entries:
        i = int(index)
        if 0 <= i < len(lut):
            lut[i] = [int(c) for c in tuple(colour)[:3]]
    return lut


def apply_palette(indices: Any, lut: Any) -> Any:
    """``(h, w)`` colour indices -> ``(h, w, 3)`` uint8 RGB; an index outside the table -> black."""
    import numpy as np

    idx = np.asarray(indices)
    safe = np.where((idx >= 0) & (idx < len(lut)), idx, 0).astype(np.intp)
    rgb = lut[safe]
    rgb[(idx < 0) | (idx >= len(lut))] = 0
    return rgb


def parse_bands(text: str | None, option: str = "--bands") -> tuple[int, ...] | None:
    """``"4,3,2"`` -> ``(4, 3, 2)``; empty -> ``None`` (the automatic choice). Raises :class:`ConfigError`."""
    if text is None or not str(text).strip():
        return None
    try:
        bands = tuple(int(v) for v in str(text).replace(" ", "").split(","))
    except ValueError:
        raise ConfigError(
            f"{option} takes band numbers (from 1) separated by commas, got {text!r}; e.g. 1,2,3 or 4,3,2"
        ) from None
    if len(bands) not in (1, 3) or min(bands) < 1:
        raise ConfigError(f"{option} takes three band numbers (R,G,B) or one, counted from 1; got {text!r}")
    return bands


def choose_bands(
    count: int,
    interp: Sequence[str],
    requested: Sequence[int] | None = None,
    what: str = "the raster",
    option: str = "--bands",
) -> tuple[int, int, int]:
    """The three bands (1-based) that make the RGB image, the same way for every reader.

    ``interp`` names each band's colour interpretation (``"red"``, ``"green"``, ``"blue"``, ``"alpha"``
    or anything else). Requested bands win (one band is replicated into three channels); otherwise the
    bands marked red, green and blue; otherwise the first three non-alpha bands; a single band is
    replicated.
    """
    if requested:
        bad = [b for b in requested if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= count]
        if bad or len(requested) not in (1, 3):
            example = f"{option} 1,2,3" if option.startswith("-") else "1,2,3"
            raise ConfigError(
                f"{option} {','.join(map(str, requested))} is not valid for {what}, which has {count} band(s) "
                f"numbered 1..{count}; give three bands (R,G,B) or one, e.g. {example}"
            )
        chosen = tuple(requested)
    elif all(c in interp for c in ("red", "green", "blue")):
        chosen = tuple(list(interp).index(c) + 1 for c in ("red", "green", "blue"))
    elif count >= 3:
        data_bands = [i + 1 for i, c in enumerate(interp) if c != "alpha"]
        chosen = tuple(data_bands[:3]) if len(data_bands) >= 3 else (1, 2, 3)
    else:
        chosen = (1,)
    return chosen * 3 if len(chosen) == 1 else chosen  # type: ignore[return-value]


def run_meta(expression: str, mode: str, engine_info: Mapping[str, Any]) -> dict[str, str]:
    """The fields every feature of a run shares, from the query and the engine's ``/info``."""
    return {
        "expression": expression,
        "mode": mode,
        "model": str(engine_info.get("model") or ""),
        "adapter": str(engine_info.get("adapter") or ""),
        "prompt_version": str(engine_info.get("prompt_version") or ""),
    }


def detection_values(detection: Any, meta: Mapping[str, str], run_id: str, created: Any) -> dict[str, Any]:
    """One feature's values for :data:`OUTPUT_FIELDS` (``created`` in the writer's own time type)."""
    return {
        **meta,
        "score": float(detection.score),
        "presence": float(detection.presence),
        "label": detection.label,
        "reasoning": detection.reasoning,
        "tile_id": detection.tile_id,
        "run_id": run_id,
        "created": created,
        "truncated": int(detection.truncated),
    }
