"""``geo-r1 match RESULTS.gpkg TRUTH.geojson``: how many true objects a run found, polygon against polygon.

The matching is :mod:`geo_r1_qgis.core.truth` (one to one, IoU on the map strictly above the threshold).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from engine.cli.options import add_config_arguments, config_from_args
from geo_r1_qgis.core.errors import ConfigError
from geo_r1_qgis.core.gpkg_schema import find_runs
from geo_r1_qgis.core.truth import match_objects, read_result_rings, read_truth

#: the truth files' category names, as a sentence says them
PLURALS = {"tank": "storage tanks", "building": "buildings", "field": "fields", "road": "roads", "river": "rivers"}


@dataclass(frozen=True)
class MatchConfig:
    """A results GeoPackage, the truth it is checked against, and how."""

    results: Path = field(metadata={"positional": True, "metavar": "RESULTS.gpkg",
                                    "help": "a GeoPackage written by geo-r1 ground or the plugin"})  # fmt: skip
    truth: Path = field(metadata={"positional": True, "metavar": "TRUTH.geojson",
                                  "help": "the raster's *.objects.geojson (sample-data writes them)"})  # fmt: skip
    category: str | None = field(default=None, metadata={"help": "only the true objects of this category, e.g. tank"})
    layer: str | None = field(default=None, metadata={"help": "the results layer (default: the file's latest run)"})
    iou: float = field(default=0.5, metadata={"help": "a pair counts when its IoU on the map is above this"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "results", Path(self.results))
        object.__setattr__(self, "truth", Path(self.truth))
        for name in ("results", "truth"):
            if not getattr(self, name).is_file():
                raise ConfigError(f"{getattr(self, name)} does not exist; pass the {name} file")
        if not 0 <= self.iou < 1:
            raise ConfigError(f"--iou must be in [0, 1), got {self.iou!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, MatchConfig)


def main(args: argparse.Namespace) -> int:
    config = config_from_args(MatchConfig, args)
    layer = config.layer
    if layer is None:
        runs = find_runs(config.results)
        if not runs:
            raise ConfigError(f"{config.results} records no run; pass --layer")
        layer = runs[-1].layer
    truth = read_truth(config.truth, config.category)
    m = match_objects(read_result_rings(config.results, layer), [t.ring for t in truth], config.iou)
    what = PLURALS.get(config.category or "", config.category or "objects")
    sys.stdout.write(f"found {m.found} of {m.n_truth} {what} ({m.n_predicted} detection(s) in layer {layer!r}; "
          f"recall {m.recall:.0%}, precision {m.precision:.0%}, IoU > {config.iou:g} on the map)\n")  # fmt: skip
    return 0
