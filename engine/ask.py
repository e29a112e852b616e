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

from engine.runtime.loading import parse_adapters
from geo_r1_qgis.core.errors import ConfigError, RasterError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AskConfig:
    image: Path
    expression: str
    model: str
    processor: str | None = None
    adapters: dict[str, str] = field(default_factory=dict)
    task: str = "multi"
    reasoning: bool = True
    max_new_tokens: int | None = None  # None: Geo-R1's for the task (rec 256, multi 1024)
    device: str = "auto"
    dtype: str = "auto"
    as_json: bool = False

    def __post_init__(self) -> None:
        if not self.image.is_file():
            raise ConfigError(f"image {self.image} does not exist: pass the path of a PNG/JPEG/TIFF file")
        if not self.expression.strip():
            raise ConfigError("the expression is empty: describe what to find, e.g. 'the largest storage tank'")
        if self.task not in ("rec", "multi"):
            raise ConfigError(f"--task must be 'rec' or 'multi', got {self.task!r}")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model-loading options shared by ``ask``, ``serve`` and ``ground``."""
    parser.add_argument("--model", required=True, help="Hugging Face id or local directory (Geo-R1, Qwen2.5-VL)")
    parser.add_argument("--processor", help="load the processor from another id/directory (Geo-R1 checkpoints)")
    parser.add_argument("--adapter", action="append", metavar="[NAME=]PATH", help="peft LoRA adapter (repeatable)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", type=Path, help="a plain image (PNG, JPEG, TIFF)")
    parser.add_argument("expression", help='what to find, e.g. "the largest storage tank"')
    add_model_arguments(parser)
    parser.add_argument("--task", choices=("rec", "multi"), default="multi", help="one box (rec) or all (multi)")
    parser.add_argument("--no-reasoning", action="store_true", help="use the SFT-baseline prompt without <think>")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="generation limit (default: Geo-R1's, 256 for rec, 1024 for multi)")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")


def main(args: argparse.Namespace) -> int:
    config = AskConfig(
        image=args.image,
        expression=args.expression,
        model=args.model,
        processor=args.processor,
        adapters=parse_adapters(args.adapter),
        task=args.task,
        reasoning=not args.no_reasoning,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        dtype=args.dtype,
        as_json=args.json,
    )
    from PIL import Image, UnidentifiedImageError

    from geo_r1_qgis.core.rules.prompts import default_max_new_tokens
    from engine.runtime.backend import GenerationSettings, GroundItem
    from engine.runtime.loading import LoadConfig
    from engine.runtime.local import LocalBackend

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
            f"box {i}: [{b.x1:.1f}, {b.y1:.1f}, {b.x2:.1f}, {b.y2:.1f}] score {b.score:.3f}"
            f" label {b.label or '-'}\n"
        )
    return 0
