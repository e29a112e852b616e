"""``geo-r1 ask IMAGE "EXPR" --model M``: try a model quickly on one plain image.

Loads the model in this process (no server), grounds the expression, and prints the reasoning and
the boxes in the image's own pixels. ``--json`` prints the engine's full result instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from engine.cli.options import add_config_arguments, config_from_args
from engine.runtime.loading import parse_adapters
from geo_r1_qgis.core.errors import ConfigError, RasterError
from geo_r1_qgis.core.rules.prompts import TASKS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AskConfig:
    image: Path = field(metadata={"positional": True, "help": "a plain image (PNG, JPEG, TIFF)"})
    expression: str = field(metadata={"positional": True, "help": 'what to find, e.g. "the largest storage tank"'})
    model: str = field(metadata={"help": "Hugging Face id or local directory (Geo-R1, Qwen2.5-VL)"})
    processor: str | None = field(
        default=None, metadata={"help": "load the processor from another id/directory (Geo-R1 checkpoints)"}
    )
    adapters: dict[str, str] = field(
        default_factory=dict,
        metadata={"flags": ("--adapter",), "action": "append", "metavar": "[NAME=]PATH", "parse": parse_adapters,
                  "help": "peft LoRA adapter (repeatable)"},
    )  # fmt: skip
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N or mps"})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16"})
    task: str = field(
        default="multi",
        metadata={"choices": TASKS, "help": "one box (rec), all (multi), or gres (boxes and keypoints)"},
    )
    reasoning: bool = field(
        default=True,
        metadata={"flags": ("--no-reasoning",), "action": "store_false",
                  "help": "use the SFT-baseline prompt without <think>"},
    )  # fmt: skip
    # None: Geo-R1's for the task (rec 256, multi 1024)
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "generation limit (default: Geo-R1's, 256 for rec, 1024 for multi)"}
    )
    as_json: bool = field(default=False, metadata={"flags": ("--json",), "help": "print the full result as JSON"})

    def __post_init__(self) -> None:
        if not self.image.is_file():
            raise ConfigError(f"image {self.image} does not exist: pass the path of a PNG/JPEG/TIFF file")
        if not self.expression.strip():
            raise ConfigError("the expression is empty: describe what to find, e.g. 'the largest storage tank'")
        if self.task not in TASKS:
            raise ConfigError(
                f"--task must be one of {TASKS}, got {self.task!r}: rec (one box), multi (all boxes) or gres"
            )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``geo-r1 ask`` options, one per :class:`AskConfig` field."""
    add_config_arguments(parser, AskConfig)


def main(args: argparse.Namespace) -> int:
    config = config_from_args(AskConfig, args)
    from PIL import Image, UnidentifiedImageError

    from engine.runtime.backend import GenerationSettings, GroundItem
    from engine.runtime.loading import LoadConfig
    from engine.runtime.local import LocalBackend
    from geo_r1_qgis.core.rules.prompts import default_max_new_tokens

    try:
        with Image.open(config.image) as im:
            image = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise RasterError(f"cannot read {config.image} as an image ({exc}); pass a PNG, JPEG or TIFF") from None
    backend = LocalBackend(
        LoadConfig(
            model=config.model,
            processor=config.processor,
            adapters=config.adapters,
            device=config.device,
            dtype=config.dtype,
        ),
        batch_size=1,
    )
    try:
        if config.adapters:
            backend.activate_adapter(next(iter(config.adapters)))
        item = GroundItem(image=image, expression=config.expression, task=config.task, reasoning=config.reasoning)
        limit = config.max_new_tokens or default_max_new_tokens(config.task)
        (result,) = backend.ground([item], GenerationSettings(max_new_tokens=limit))
    finally:
        backend.close()
    out = sys.stdout
    if config.as_json:
        out.write(json.dumps(result.to_json(), indent=2) + "\n")
        return 0
    out.write(f"reasoning: {result.reasoning or '(none)'}\n")
    out.write(f"parse status: {result.parse_status}   presence: {result.presence:.3f}\n")
    if not result.boxes:
        out.write("boxes: none\n")
    for i, b in enumerate(result.boxes, 1):
        out.write(
            f"box {i}: [{b.x1:.1f}, {b.y1:.1f}, {b.x2:.1f}, {b.y2:.1f}] score {b.score:.3f} label {b.label or '-'}\n"
        )
    return 0
