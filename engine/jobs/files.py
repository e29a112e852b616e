"""A job folder: its layout, its states, and JSON files written atomically (tmp + ``os.replace``).

::

    JOBS_DIR/<id>/
      spec.json         what was asked (engine.jobs.spec.JobSpec), written once by the engine
      job.json          the state: written by the engine before the process starts, then by the process
                        at each phase change, and by the engine when the process is gone without an end state
      pid               the process id (written by the engine when it starts the process)
      cancel            appears on DELETE /jobs/{id}: the trainer stops at the end of that step
      job.log           the process's stdout and stderr
      annotations.gpkg  the copy of the annotation GeoPackage the job trains on (its sha256 in job.json)
      dataset/          train/dataset.py's dataset folder
      adapter/          train/trainer.py's output: the adapter, geo_r1_adapter.json, train_log.jsonl,
                        progress.json, checkpoints/ (kept until the job is done, for a resume)
      report/           train/evaluate.py's report.md, metrics.json and plots
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

#: every state of a job, in the order a job goes through them (the last three are end states)
STATES = ("queued", "building", "training", "evaluating", "done", "failed", "cancelled")
RUNNING = frozenset(STATES[:4])
ENDED = frozenset(STATES[4:])


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def seconds_between(start: str | None, end: str | None) -> float | None:
    """Seconds from one ISO time to another (``end`` None: now)."""
    if not start:
        return None
    t0 = datetime.fromisoformat(start)
    t1 = datetime.fromisoformat(end) if end else datetime.now(timezone.utc)
    return max(0.0, round((t1 - t0).total_seconds(), 1))


def write_json(path: Path, data: Any) -> None:
    """``data`` as JSON at ``path``, atomically: a reader sees the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object at ``path``, or None when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class JobPaths:
    """The files of the job folder ``root``."""

    root: Path

    @property
    def id(self) -> str:
        return self.root.name

    spec = property(lambda self: self.root / "spec.json")
    state = property(lambda self: self.root / "job.json")
    pid = property(lambda self: self.root / "pid")
    cancel = property(lambda self: self.root / "cancel")
    log = property(lambda self: self.root / "job.log")
    annotations = property(lambda self: self.root / "annotations.gpkg")
    dataset = property(lambda self: self.root / "dataset")
    adapter = property(lambda self: self.root / "adapter")
    report = property(lambda self: self.root / "report")
    train_log = property(lambda self: self.root / "adapter" / "train_log.jsonl")
    progress = property(lambda self: self.root / "adapter" / "progress.json")
    checkpoints = property(lambda self: self.root / "adapter" / "checkpoints")

    def read_state(self) -> dict[str, Any]:
        return read_json(self.state) or {}

    def update_state(self, **values: Any) -> dict[str, Any]:
        """Merge ``values`` into ``job.json`` (atomically) and return the new state."""
        state = {**self.read_state(), **values}
        write_json(self.state, state)
        return state

    def read_pid(self) -> int | None:
        try:
            return int(self.pid.read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            return None

    def has_checkpoint(self) -> bool:
        return self.checkpoints.is_dir() and any(self.checkpoints.glob("checkpoint-*"))
