"""Fixtures for the training tests: tiny models (cached under .cache, keyed on the builder's hash) and a
small learnable dataset directory written through train/data_format.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import REPO, cached_build, cached_sam_build

SHARED_DATA = REPO.parent / "shared" / "data"


def _cached(name: str, **kwargs: object) -> Path:
    return cached_build(name, **kwargs)


@pytest.fixture(scope="session")
def tiny_rope10_dir() -> Path:
    """A random tiny Qwen2.5-VL with rope_theta 10 (the base the training tests fine-tune)."""
    return _cached("tiny-rope10-seed0", seed=0, rope_theta=10.0)


@pytest.fixture(scope="session")
def tiny_format_model_dir() -> Path:
    """The format-trained tiny model, the same cache entry as tests/engine/conftest.py's fixture."""
    return _cached("tiny-format-model-seed0-steps300", seed=0, learn_format_steps=300)


@pytest.fixture(scope="session")
def tiny_other_dir() -> Path:
    """Another random tiny model (seed 1): a different base, for the mismatch tests."""
    return _cached("tiny-rope10-seed1", seed=1, rope_theta=10.0)


@pytest.fixture()
def grid_dataset(tmp_path: Path) -> Path:
    """train/toy.py's bright-square grid task, small: 12 train, 6 val and 6 test chips."""
    from train.toy import ToyConfig, write_toy_dataset

    return write_toy_dataset(ToyConfig(tmp_path / "data", n_train=12, n_val=6, n_test=6))


@pytest.fixture(scope="session")
def tiny_sam_dir() -> Path:
    """A randomly initialised tiny SAM 2 checkpoint (seed 0; engine/runtime/tiny_sam.py), built once and cached."""
    return cached_sam_build("tiny-sam-seed0", seed=0)
