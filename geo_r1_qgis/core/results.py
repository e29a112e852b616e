"""What a run's results look like, and how raster values become 8-bit: shared by both writers and readers.

Pure (standard library and numpy). The command line's GeoPackage (``engine/gpkg.py``, ``engine/rasters.py``)
and the plugin's Processing output (``geo_r1_qgis/qgis_io.py``) both use these, so a layer made by either
has the same fields, and a raster is stretched the same way by either reader.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timezone
from typing import Any

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
    return np.clip((values - lo) * (255.0 / (hi - lo)), 0, 255).round().astype(np.uint8)
