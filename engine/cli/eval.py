"""``geo-r1 eval``: score a model and adapters on a dataset, Geo-R1's way (:mod:`train.evaluate`)."""

from __future__ import annotations

import argparse
import sys

from engine.cli.options import add_config_arguments, config_from_args
from train.evaluate import EvalConfig, run, summary_lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, EvalConfig)


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(EvalConfig, args)
    metrics = run(cfg)
    sys.stdout.write("".join(line + "\n" for line in summary_lines(metrics)))
    sys.stdout.write(f"report: {cfg.out_dir / 'report.md'}\n")
    return 0
