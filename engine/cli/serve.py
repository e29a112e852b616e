"""``geo-r1 serve``: run the local grounding engine (:mod:`engine.server.app`)."""

from __future__ import annotations

import argparse

from engine.cli.options import add_config_arguments, config_from_args
from engine.server.app import ServeConfig, serve
from geo_r1_qgis.core.client import default_token_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`ServeConfig` field."""
    add_config_arguments(parser, ServeConfig, defaults={"token_file": default_token_path()})


def main(args: argparse.Namespace) -> int:
    return serve(config_from_args(ServeConfig, args))
