"""``geo-r1 sample-model build``: train the project's small Qwen2.5-VL (:mod:`train.sample_model`)."""

from __future__ import annotations

import argparse
import sys

from engine.cli.options import add_config_arguments, config_from_args
from train.sample_model import SampleModelConfig, build, command_line, metrics_line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    build_parser = sub.add_parser("build", help="train the sample model from scratch (or continue one with --init)")
    add_config_arguments(build_parser, SampleModelConfig)


def main(args: argparse.Namespace) -> int:
    config = config_from_args(SampleModelConfig, args)
    manifest = build(config, command=command_line(config))
    held = manifest["heldout"]
    sys.stdout.write(f"sample model: {config.out_dir} ({manifest['steps']} steps, {manifest['train_seconds']} s); "
                     f"held-out: {metrics_line(held)}\n")  # fmt: skip
    return 0
