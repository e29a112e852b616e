"""``geo-r1 sample-model build`` trains the project's small Qwen2.5-VL (:mod:`train.sample_model`); ``geo-r1
sample-model eval`` scores one on its manifest's held-out scenes."""

from __future__ import annotations

import argparse
import sys

from engine.cli.options import add_config_arguments, config_from_args
from train.sample_model import SampleEvalConfig, SampleModelConfig, build, command_line, evaluate_model, metrics_line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    build_parser = sub.add_parser("build", help="train the sample model from scratch (or continue one with --init)")
    add_config_arguments(build_parser, SampleModelConfig)
    eval_parser = sub.add_parser("eval", help="score a built model on its manifest's held-out scenes")
    add_config_arguments(eval_parser, SampleEvalConfig)


def main(args: argparse.Namespace) -> int:
    if args.action == "eval":
        cfg = config_from_args(SampleEvalConfig, args)
        metrics = evaluate_model(cfg)
        sys.stdout.write(f"{cfg.model} on {metrics['scenes']} held-out scenes: {metrics_line(metrics)}\n"
                         f"re-score the REC answers with Geo-R1's rules: geo-r1 eval --predictions "
                         f"{cfg.out_dir / 'rec_results.json'} -o {cfg.out_dir / 'report'}\n")  # fmt: skip
        return 0
    config = config_from_args(SampleModelConfig, args)
    manifest = build(config, command=command_line(config))
    held = manifest["heldout"]
    sys.stdout.write(f"sample model: {config.out_dir} ({manifest['steps']} steps, {manifest['train_seconds']} s); "
                     f"held-out: {metrics_line(held)}\n")  # fmt: skip
    return 0
