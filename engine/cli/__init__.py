"""The ``geo-r1`` command line: one small module per subcommand, in this folder (as rasterio's ``rio/``).

Each subcommand lives in its own module, ``engine/cli/NAME.py``, which exposes ``add_arguments(parser)`` and
``main(args) -> int``. Only the chosen subcommand's module is imported, so ``geo-r1 sample-data``
never pays for importing torch. Errors of the project's hierarchy are caught here, at the boundary,
and printed as one clear line with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from types import ModuleType

from geo_r1_qgis.core.errors import GeoR1Error

#: subcommand -> its one-line help; ``geo-r1 NAME`` runs ``engine/cli/NAME.py`` (dashes as underscores)
COMMANDS: dict[str, str] = {
    "sample-data": "write synthetic georeferenced sample rasters with true boxes",
    "dataset": "build fine-tuning datasets from annotations (import, build, synthetic, from-json)",
    "tiny-model": "build a tiny randomly initialised Qwen2.5-VL checkpoint",
    "tiny-sam": "build a random SAM 2 checkpoint (tiny, or SAM 2.1-tiny size) for geo-r1 serve --sam",
    "sample-model": "train the project's small Qwen2.5-VL on the sample scenes (build), or score it (eval)",
    "sample-sam": "train the project's small SAM 2 on the sample scenes' true masks (build), for serve --sam",
    "serve": "run the local grounding engine (HTTP on 127.0.0.1, token protected)",
    "ask": "print the reasoning and boxes for one plain image",
    "ground": "ground an expression over a whole raster and write a GeoPackage",
    "eval": "score a model and adapters on a dataset, Geo-R1's way, and write a report",
    "train": "fine-tune a LoRA adapter: sft, grpo or dapo",
    "match": "count the true objects a run found (polygon IoU on the map against a *.objects.geojson)",
    "wheelhouse": "download this engine and its dependencies into a folder, for offline setup",
}

#: commands that need the ``[train]`` extra -> the modules it brings that they import
TRAIN_EXTRA: dict[str, tuple[str, ...]] = {
    "train": ("trl", "datasets", "yaml", "matplotlib", "pycocotools"),
    "eval": ("matplotlib", "pycocotools", "yaml"),
    "dataset": ("shapely",),
}


def missing_extra(name: str) -> str | None:
    """A plain message when ``geo-r1 NAME`` needs the ``[train]`` extra and it is not installed, else None."""
    missing = [m for m in TRAIN_EXTRA.get(name, ()) if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return (f"geo-r1 {name} needs the training extras ({', '.join(missing)} not installed):"
            f" pip install 'geo-r1[train]' in this environment")  # fmt: skip


log = logging.getLogger("geo_r1")


def _version() -> str:
    from engine import __version__

    return __version__


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geo-r1",
        description="Geo-R1 reasoning-first grounding for georeferenced imagery.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<12} {help_}" for name, help_ in COMMANDS.items()),
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("--version", action="version", version=f"geo-r1 {_version()}")
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND", help="see below")
    return parser


def command_parser(name: str) -> tuple[argparse.ArgumentParser, ModuleType]:
    """The parser of ``geo-r1 NAME`` and the module that runs it (imported only now)."""
    module = importlib.import_module(f"engine.cli.{name.replace('-', '_')}")
    parser = argparse.ArgumentParser(prog=f"geo-r1 {name}", description=COMMANDS[name])
    module.add_arguments(parser)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    # Find the subcommand first, then import only its module.
    first = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if first is None:
        if "--version" in argv:
            sys.stdout.write(f"geo-r1 {_version()}\n")
            return 0
        if {"-h", "--help"} & set(argv):
            top.print_help(sys.stdout)
            return 0
        top.print_help(sys.stderr)
        return 2
    top_args = top.parse_args(argv[: first + 1])
    name = top_args.command
    if (need := missing_extra(name)) is not None:
        sys.stderr.write(f"geo-r1 {name}: error: {need}\n")
        return 1
    from engine.runtime.threads import prepare_environment

    prepare_environment()  # before anything imports torch
    parser, module = command_parser(name)
    args = parser.parse_args(argv[first + 1 :])
    level = logging.WARNING - 10 * min(2, top_args.verbose + 1)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if top_args.verbose < 2:  # third-party chatter (GDAL's own error echo, HTTP client lines) only with -vv
        for noisy in ("rasterio", "httpx", "urllib3", "PIL"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(module.main(args) or 0)
    except GeoR1Error as exc:
        log.debug("error", exc_info=True)
        sys.stderr.write(f"geo-r1 {name}: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"geo-r1 {name}: interrupted\n")
        return 130
