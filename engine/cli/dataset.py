"""``geo-r1 dataset ACTION``: fine-tuning datasets from annotations (:mod:`train.dataset`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from engine.cli.options import add_config_arguments, config_from_args
from geo_r1_qgis.core.annotations import LAYER_NAME
from geo_r1_qgis.core.errors import ConfigError
from train.dataset import (
    BuildConfig,
    FromJsonConfig,
    ImportConfig,
    SyntheticConfig,
    build_dataset,
    build_synthetic,
    run_from_json,
    run_import,
)

#: ``geo-r1 dataset ACTION`` -> its config and one-line help
ACTIONS: dict[str, tuple[type, str]] = {
    "import": (ImportConfig, "turn a polygon layer into annotations of a raster"),
    "build": (BuildConfig, "chips, records and manifest from annotation GeoPackages"),
    "synthetic": (SyntheticConfig, "a small learnable few-shot set from the sample scenes"),
    "from-json": (FromJsonConfig, "a dataset folder from a VRSBench / DIOR-RSVG evaluation JSON"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    for action, (cls, help_) in ACTIONS.items():
        add_config_arguments(sub.add_parser(action, help=help_), cls)


def _summary(out_dir: Path, manifest: dict[str, Any]) -> None:
    lines = [f"dataset written to {out_dir}"]
    for split, tasks in manifest["counts"].items():
        n = {t: sum(v.values()) for t, v in tasks.items()}
        lines.append(f"  {split:<5} rec {n['rec']:>5}  multi {n['multi']:>5}")
    sys.stdout.write("\n".join(lines) + "\n")


def main(args: argparse.Namespace) -> int:
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("pyogrio").setLevel(logging.WARNING)  # "Created N records" on every write

    config = config_from_args(ACTIONS[args.action][0], args)
    if isinstance(config, ImportConfig):
        n = run_import(config)
        sys.stdout.write(f"{n} annotation(s) written to {config.output} (layer {LAYER_NAME})\n")
        return 0
    if isinstance(config, BuildConfig):
        _summary(config.out_dir, build_dataset(config))
        return 0
    if isinstance(config, SyntheticConfig):
        _summary(config.out_dir, build_synthetic(config))
        return 0
    if isinstance(config, FromJsonConfig):
        _summary(config.out_dir, run_from_json(config))
        return 0
    raise ConfigError(f"unknown action {args.action!r}")  # argparse prevents this
