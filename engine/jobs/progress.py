"""What a running job shows: its learning curves, its ETA and the tail of its log. Pure (files in, values out)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

#: curve name -> the train_log.jsonl keys it is read from, first present wins (train/trainer.py's aliases)
CURVE_KEYS: dict[str, tuple[str, ...]] = {
    "reward": ("reward",),
    "format": ("format",),
    "iou": ("iou", "od"),
    "loss": ("loss",),
}
LOG_TAIL_LINES = 40


def read_train_log(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``train_log.jsonl``; a torn last line (being written) is skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def curves(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """``{"step": [...], "reward": [...], "format": [...], "iou": [...], "loss": [...]}``, aligned on step.

    Rows of one step are merged (trl logs the end-of-training summary at the last step again; a resumed run
    logs its first steps again): a later value replaces an earlier one, a missing value is None.
    """
    by_step: dict[int, dict[str, float]] = {}
    for row in rows:
        merged = by_step.setdefault(int(row["step"]), {})
        for name, keys in CURVE_KEYS.items():
            value = next((row[k] for k in keys if isinstance(row.get(k), (int, float))), None)
            if value is not None:
                merged[name] = float(value)
    steps = sorted(s for s, values in by_step.items() if values)
    out: dict[str, list[Any]] = {"step": steps}
    for name in CURVE_KEYS:
        out[name] = [by_step[s].get(name) for s in steps]
    return out


def eta_seconds(
    progress: Mapping[str, Any] | None, max_seconds: float | None, since_update_s: float = 0.0
) -> float | None:
    """Seconds of training left, from the step rate of ``progress`` (train/trainer.py's ``job_callback`` file),
    capped by a wall-clock budget; None before the first step or when nothing bounds the run."""
    if not progress:
        return None
    step, first, seconds = progress.get("step"), progress.get("first_step", 0), progress.get("seconds")
    max_steps = progress.get("max_steps")
    if not isinstance(step, int) or not isinstance(seconds, (int, float)):
        return None
    done = step - (first or 0)
    left: list[float] = []
    if done > 0 and isinstance(max_steps, int) and max_steps > 0:
        left.append((max_steps - step) * seconds / done - since_update_s)
    if max_seconds:
        left.append(max_seconds - seconds - since_update_s)
    return round(max(0.0, min(left)), 1) if left else None


def log_tail(path: Path, n: int = LOG_TAIL_LINES) -> list[str]:
    """The last ``n`` lines of a log (progress bars' carriage-return updates: their last state only)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read()
    except OSError:
        return []
    lines = [line.rsplit("\r", 1)[-1] for line in data.decode("utf-8", errors="replace").split("\n")]
    if size > 64 * 1024:
        lines = lines[1:]  # the first one is cut
    return [line.rstrip() for line in lines if line.strip()][-n:]
