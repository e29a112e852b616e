"""The tiny Qwen2.5-VL checkpoints of the test suites, built once and cached under ``<repo>/.cache``.

The cache key is a hash of ``engine/runtime/tiny_model.py``, so a checkpoint is rebuilt only when the builder
changes. Builds go to a temporary sibling first and are renamed into place, so parallel runs are safe; a lock
file per checkpoint makes a second run wait for the first one's build instead of training the same model beside
it (``make test`` runs its suites side by side, and on a fresh clone each would otherwise build them all).
Used by ``tests/engine/conftest.py`` and ``tests/train/conftest.py``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"


def builder_hash(builder: str = "tiny_model.py") -> str:
    return hashlib.sha256((REPO / "engine" / "runtime" / builder).read_bytes()).hexdigest()[:12]


def _build_cached(name: str, builder: str, build: Callable[[Path], None]) -> Path:
    """``build(dir)`` once into ``.cache/<name>-<hash of engine/runtime/<builder>>``: one build per name at a time
    (a lock file), renamed into place; builds of older builder versions are removed."""
    target = CACHE / f"{name}-{builder_hash(builder)}"
    if (target / "model.safetensors").is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if (target / "model.safetensors").is_file():  # another run built it meanwhile
            return target
        return _build(name, target, build)


def _build(name: str, target: Path, build: Callable[[Path], None]) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=CACHE))
    try:
        build(tmp / "m")
        try:
            os.replace(tmp / "m", target)
        except OSError:  # another run finished first
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for stale in CACHE.glob(f"{name}-*"):  # builds of older builder versions
        if stale != target and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    return target


def cached_build(name: str, build: Callable[[Path], None] | None = None, **config: object) -> Path:
    """The checkpoint ``TinyModelConfig(**config)`` builds, under ``.cache/<name>-<builder hash>``.

    ``build(out_dir)`` replaces the in-process build (the QGIS suite, whose Python has no torch, runs
    ``geo-r1 tiny-model`` in the engine's venv instead). Standard library only at import time.
    """

    def in_process(out: Path) -> None:
        from engine.runtime.tiny_model import TinyModelConfig, build_tiny_model

        build_tiny_model(TinyModelConfig(out_dir=out, **config))

    return _build_cached(name, "tiny_model.py", build or in_process)


def cached_sam_build(name: str, seed: int = 0, build: Callable[[Path], None] | None = None) -> Path:
    """The random SAM 2 ``engine.runtime.tiny_sam.build_tiny_sam`` builds, cached as above but keyed on
    ``engine/runtime/tiny_sam.py``; ``build(out_dir)`` replaces the in-process build (``geo-r1 tiny-sam``)."""

    def in_process(out: Path) -> None:
        from engine.runtime.tiny_sam import build_tiny_sam

        build_tiny_sam(out, seed=seed)

    return _build_cached(name, "tiny_sam.py", build or in_process)
