"""``geo-r1 sample-sam build`` trains the project's small SAM 2 on the sample scenes' true masks
(:mod:`train.sample_sam`)."""

from __future__ import annotations

import argparse
import sys

from engine.cli.options import add_config_arguments, config_from_args
from train.sample_sam import SampleSamConfig, build, command_line, metrics_line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    build_parser = sub.add_parser("build", help="train the sample SAM from scratch on the sample scenes")
    add_config_arguments(build_parser, SampleSamConfig)


def main(args: argparse.Namespace) -> int:
    config = config_from_args(SampleSamConfig, args)
    manifest = build(config, command=command_line(config))
    sys.stdout.write(f"sample SAM: {config.out_dir} ({manifest['steps']} steps, {manifest['train_seconds']} s); "
                     f"held-out: {metrics_line(manifest['heldout'])}\n")  # fmt: skip
    return 0
