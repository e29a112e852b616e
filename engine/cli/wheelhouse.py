"""``geo-r1 wheelhouse DIR``: the engine and its dependencies, for offline setup (:mod:`engine.wheelhouse`)."""

from __future__ import annotations

import argparse
import json
import sys

from engine.cli.options import add_config_arguments, config_from_args
from engine.wheelhouse import WheelhouseConfig, build_wheelhouse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, WheelhouseConfig)


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(WheelhouseConfig, args)
    manifest = build_wheelhouse(cfg)
    n = len(json.loads(manifest.read_text())["files"])
    sys.stdout.write(f"{n} files in {cfg.out_dir}; manifest {manifest.name}. Carry the folder to the offline"
                     " machine and choose it as the wheelhouse in the plugin's setup dialog.\n")  # fmt: skip
    return 0
