"""Session fixtures: the tiny Qwen2.5-VL checkpoints (built once, cached: ``tests/tiny_models.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# _serve_helpers.py (engine processes for the end-to-end tests) is imported by tests in the subfolders too,
# and tiny_models.py by both suites.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import CACHE, REPO, builder_hash, cached_build, cached_sam_build  # noqa: F401

#: Training steps of the format-trained tiny model (about 40 s on one core, once per builder change).
FORMAT_STEPS = 300


def _builder_hash() -> str:
    return builder_hash()


def _cached_build(name: str, steps: int) -> Path:
    return cached_build(name, seed=0, learn_format_steps=steps)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A randomly initialised tiny Qwen2.5-VL checkpoint (seed 0)."""
    return _cached_build("tiny-model-seed0", 0)


@pytest.fixture(scope="session")
def tiny_format_model_dir() -> Path:
    """The tiny checkpoint after ``--learn-format 300``: greedy decoding follows Geo-R1's format."""
    return _cached_build(f"tiny-format-model-seed0-steps{FORMAT_STEPS}", FORMAT_STEPS)


@pytest.fixture(scope="session")
def tiny_sam_dir() -> Path:
    """A randomly initialised tiny SAM 2 checkpoint (seed 0; engine/runtime/tiny_sam.py), built once and cached."""
    return cached_sam_build("tiny-sam-seed0", seed=0)
