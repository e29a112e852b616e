"""``geo-r1 tiny-sam OUT_DIR``: a random SAM 2 checkpoint, tiny or SAM 2.1-tiny size (engine/runtime/tiny_sam.py)."""

from __future__ import annotations

import argparse

from engine.cli.options import add_config_arguments, config_from_args
from engine.runtime.tiny_sam import TinySamConfig, build_tiny_sam


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TinySamConfig)


def main(args: argparse.Namespace) -> int:
    config = config_from_args(TinySamConfig, args)
    build_tiny_sam(config.out_dir, config.seed, real_size=config.real_size, force=config.force)
    return 0
