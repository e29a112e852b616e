"""``geo-r1 tiny-model OUT_DIR``: a tiny random Qwen2.5-VL checkpoint (:mod:`engine.runtime.tiny_model`)."""

from __future__ import annotations

import argparse

from engine.cli.options import add_config_arguments, config_from_args
from engine.runtime.tiny_model import TinyModelConfig, build_tiny_model

#: the fields offered as flags (the rest keep their defaults)
CLI_FIELDS = ("out_dir", "seed", "force", "learn_format_steps", "rope_theta", "hidden_size")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TinyModelConfig, include=CLI_FIELDS)


def main(args: argparse.Namespace) -> int:
    build_tiny_model(config_from_args(TinyModelConfig, args))
    return 0
