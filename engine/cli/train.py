"""``geo-r1 train METHOD``: fine-tune a LoRA adapter with sft, grpo or dapo (:mod:`train.trainer`).

Runs under ``accelerate launch`` as it is (``accelerate launch -m engine.cli train grpo …``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Any

from engine.cli.options import add_config_arguments, config_values
from geo_r1_qgis.core.errors import ConfigError
from train.config import FIELD_NAMES, TrainConfig, build_config
from train.trainer import run

log = logging.getLogger(__name__)

#: options offered on the command line (any other field: --set NAME=VALUE or a recipe)
_CLI_FIELDS = ("task", "processor", "init_adapter", "learning_rate", "max_steps", "max_seconds", "num_train_epochs",
               "per_device_train_batch_size", "gradient_accumulation_steps", "num_generations", "lora_r",
               "lora_alpha", "beta", "seed", "device", "threads", "max_completion_length", "eval_limit",
               "sam")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``geo-r1 train``'s flags from :class:`TrainConfig`'s fields; each defaults to None so that the method's
    preset, then ``--config``, then the flags apply, in that order (:func:`train.config.build_config`)."""
    optional = ("resume", "force", "reasoning", *_CLI_FIELDS)
    add_config_arguments(parser, TrainConfig, include=("method", "data", "model", "output_dir", *optional),
                         defaults=dict.fromkeys(optional), show_defaults=False)  # fmt: skip
    parser.add_argument("--config", help="a YAML recipe (path, or a built-in name: sft, grpo, dapo, cpu-smoke, "
                                         "tiny-learn), applied over the method's preset")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="any other option of the recipe (YAML value), e.g. --set epsilon_high=0.28")  # fmt: skip
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "every recipe option (YAML key, or --set NAME=VALUE):\n" + "\n".join(
        f"  {f.name:<28} {f.metadata.get('help', '')}" for f in dataclasses.fields(TrainConfig) if f.name != "method"
    )


def _parse_set(items: list[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in FIELD_NAMES:
            raise ConfigError(f"--set takes NAME=VALUE with a recipe option name, got {item!r}")
        out[name] = yaml.safe_load(value)
    return out


def main(args: argparse.Namespace) -> int:
    overrides = config_values(TrainConfig, args)
    overrides.update(_parse_set(args.set))
    config = build_config(overrides.pop("method"), overrides, args.config)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = run(config)
    manifest_file = out / "geo_r1_adapter.json"
    manifest = json.loads(manifest_file.read_text(encoding="utf-8")) if manifest_file.is_file() else {}
    metrics = manifest.get("metrics", {})
    if metrics.get("before") or metrics.get("after"):
        log.warning("val check (%s queries): before %s, after %s", config.eval_limit, metrics.get("before"),
                    metrics.get("after"))  # fmt: skip
    sys.stdout.write(f"adapter: {out}\n")
    return 0
