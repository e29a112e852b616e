"""A controlled toy task for learning checks: one bright square on a dark chip.

Used where a test or a benchmark needs to know that the training wiring (the advantage's sign, the reward
plumbing, the coordinate frame) is right, independent of how hard real imagery is. ``grid`` puts the square
on a 4×4 grid of 28-pixel cells (random IoU about 0.06); ``continuous`` anywhere. Each chip also has a few
dim distractor squares, so the model must look at brightness, not only at "a square".
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from geo_r1_qgis.core.errors import ConfigError
from train.data_format import MANIFEST, ChipRecord, write_records

EXPRESSION = "bright square"


@dataclass(frozen=True)
class ToyConfig:
    out_dir: Path
    n_train: int = 64
    n_val: int = 48
    n_test: int = 48
    side: int = 112
    layout: str = "grid"  # grid | continuous
    seed: int = 0

    def __post_init__(self) -> None:
        if self.side % 28 or self.side < 56:
            raise ConfigError(f"side must be a multiple of 28 and >= 56, got {self.side}")
        if self.layout not in ("grid", "continuous"):
            raise ConfigError(f"layout must be grid or continuous, got {self.layout!r}")
        if min(self.n_train, self.n_val, self.n_test) < 1:
            raise ConfigError("every split needs at least one chip")


def write_toy_dataset(config: ToyConfig) -> Path:
    """Write the dataset directory (train/data_format.py) and return it. Deterministic for a seed."""
    from PIL import Image, ImageDraw

    out = Path(config.out_dir)
    rng = random.Random(config.seed)
    side, cell = config.side, config.side // 4
    records = []
    for split, n in (("train", config.n_train), ("val", config.n_val), ("test", config.n_test)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            bg = tuple(rng.randint(10, 50) for _ in range(3))
            image = Image.new("RGB", (side, side), bg)
            draw = ImageDraw.Draw(image)
            if config.layout == "grid":
                x, y, s = rng.randrange(4) * cell, rng.randrange(4) * cell, cell
            else:
                s = rng.randint(side // 5, side // 3)
                x, y = rng.randint(0, side - s), rng.randint(0, side - s)
            for _ in range(2):  # dim distractors
                d = rng.randint(8, 14)
                dx, dy = rng.randint(0, side - d), rng.randint(0, side - d)
                draw.rectangle([dx, dy, dx + d - 1, dy + d - 1], fill=tuple(v + 40 for v in bg))
            draw.rectangle([x, y, x + s - 1, y + s - 1], fill=tuple(rng.randint(220, 255) for _ in range(3)))
            rel = f"images/{split}/{i:04d}.png"
            image.save(out / rel)
            common = {"image": rel, "split": split, "expression": EXPRESSION, "category": "square",
                      "image_size": (side, side)}  # fmt: skip
            box = (x, y, x + s, y + s)
            records.append(ChipRecord(id=f"{split}-{i:04d}", task="rec", boxes=(box,), is_unique=True, **common))
            records.append(ChipRecord(id=f"{split}-{i:04d}-m", task="multi", boxes=(box,), **common))
    write_records(out, records)
    manifest = {"format": "geo-r1-dataset", "version": 1, "kind": f"toy-{config.layout}", "chip": side,
                "gsd_m": None, "crs": None, "seed": config.seed, "frame": "image",
                "counts": {"train": config.n_train, "val": config.n_val, "test": config.n_test}}  # fmt: skip
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return out
