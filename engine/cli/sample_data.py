"""``geo-r1 sample-data OUT_DIR``: synthetic georeferenced sample rasters with true boxes (:mod:`train.sample_data`)."""

from __future__ import annotations

import argparse
import logging

from engine.cli.options import add_config_arguments, config_from_args
from train.sample_data import SampleDataConfig, write_samples

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, SampleDataConfig)


def main(args: argparse.Namespace) -> int:
    config = config_from_args(SampleDataConfig, args)
    paths = write_samples(config)
    rasters = [p.name for p in paths if p.suffix == ".tif"]
    log.info("wrote %d rasters (%s), their truth files and samples.json to %s", len(rasters), ", ".join(rasters),
             config.out_dir.resolve())  # fmt: skip
    return 0
