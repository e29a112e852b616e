"""The tiny Qwen2.5-VL checkpoints of the test suites, built once and cached under ``<repo>/.cache``.

The cache key is a hash of ``engine/runtime/tiny_model.py``, so a checkpoint is rebuilt only when the builder
changes. Builds go to a temporary sibling first and are renamed into place, so parallel runs are safe.
Used by ``tests/engine/conftest.py`` and ``tests/train/conftest.py``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"


def builder_hash() -> str:
    return hashlib.sha256((REPO / "engine" / "runtime" / "tiny_model.py").read_bytes()).hexdigest()[:12]


def cached_build(name: str, **config: object) -> Path:
    """The checkpoint ``TinyModelConfig(**config)`` builds, under ``.cache/<name>-<builder hash>``."""
    from engine.runtime.tiny_model import TinyModelConfig, build_tiny_model

    target = CACHE / f"{name}-{builder_hash()}"
    if (target / "model.safetensors").is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=CACHE))
    try:
        build_tiny_model(TinyModelConfig(out_dir=tmp / "m", **config))
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
