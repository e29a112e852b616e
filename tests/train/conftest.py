"""Fixtures for the training tests: tiny models (cached under .cache, keyed on the builder's hash) and a
small learnable dataset directory written through train/data_format.py."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import REPO, cached_build

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


def write_grid_dataset(out: Path, n_train: int = 12, n_val: int = 6, side: int = 112, seed: int = 0) -> Path:
    """A dark 112x112 chip with one bright 28x28 square on a 4x4 grid; rec + multi records, and negatives."""
    from PIL import Image, ImageDraw

    from train.data_format import MANIFEST, ChipRecord, write_records

    rng = random.Random(seed)
    records = []
    for split, n in (("train", n_train), ("val", n_val), ("test", n_val)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image = Image.new("RGB", (side, side), (20, 30, 25))
            x, y = rng.randrange(4) * 28, rng.randrange(4) * 28
            box = (x, y, x + 28, y + 28)
            ImageDraw.Draw(image).rectangle([x, y, x + 27, y + 27], fill=(240, 240, 230))
            rel = f"images/{split}/{i:03d}.png"
            image.save(out / rel)
            common = dict(image=rel, split=split, expression="white square", category="white square",
                          image_size=(side, side))  # fmt: skip
            records.append(ChipRecord(id=f"{split}-{i}", task="rec", boxes=(box,), is_unique=True, **common))
            records.append(ChipRecord(id=f"{split}-{i}-m", task="multi", boxes=(box,), **common))
        empty = f"images/{split}/neg.png"
        Image.new("RGB", (side, side), (20, 30, 25)).save(out / empty)
        common = dict(image=empty, split=split, expression="white square", category="white square",
                      image_size=(side, side))  # fmt: skip
        records.append(ChipRecord(id=f"{split}-neg", task="multi", boxes=(), negative=True, **common))
    write_records(out, records)
    manifest = {"chip_size": side, "gsd": None, "crs": None, "seed": seed}
    (out / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    return out


@pytest.fixture()
def grid_dataset(tmp_path: Path) -> Path:
    return write_grid_dataset(tmp_path / "data")
