"""``geo-r1 ground RASTER "EXPR" -o OUT.gpkg``: ground an expression over a whole raster (:mod:`engine.ground`)."""

from __future__ import annotations

import argparse

from engine.cli.options import add_config_arguments, config_from_args
from engine.ground import GroundConfig, run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`GroundConfig` field."""
    add_config_arguments(parser, GroundConfig)


def main(args: argparse.Namespace) -> int:
    return run(config_from_args(GroundConfig, args))
