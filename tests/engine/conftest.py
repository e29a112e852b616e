"""Session fixtures: the tiny Qwen2.5-VL checkpoints, built once and cached under ``<repo>/.cache``.

The cache key is a hash of ``engine/runtime/tiny_model.py``, so a checkpoint is rebuilt only when the builder
changes. Builds go to a temporary sibling first and are renamed into place, so parallel runs are safe.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# _serve_helpers.py (engine processes for the end-to-end tests) is imported by tests in the subfolders too.
sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache"
#: Training steps of the format-trained tiny model (about 40 s on one core, once per builder change).
FORMAT_STEPS = 300


def _builder_hash() -> str:
    return hashlib.sha256((REPO / "engine" / "runtime" / "tiny_model.py").read_bytes()).hexdigest()[:12]


def _cached_build(name: str, steps: int) -> Path:
    from engine.runtime.tiny_model import TinyModelConfig, build_tiny_model

    target = CACHE / f"{name}-{_builder_hash()}"
    if (target / "model.safetensors").is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=CACHE))
    try:
        build_tiny_model(TinyModelConfig(out_dir=tmp / "m", seed=0, learn_format_steps=steps))
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


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A randomly initialised tiny Qwen2.5-VL checkpoint (seed 0)."""
    return _cached_build("tiny-model-seed0", 0)


@pytest.fixture(scope="session")
def tiny_format_model_dir() -> Path:
    """The tiny checkpoint after ``--learn-format 300``: greedy decoding follows Geo-R1's format."""
    return _cached_build(f"tiny-format-model-seed0-steps{FORMAT_STEPS}", FORMAT_STEPS)
