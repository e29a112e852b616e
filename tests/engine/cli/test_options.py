"""engine/cli/options.py: flags derived from a config dataclass's fields, and every command uses it."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from engine import cli
from engine.cli.options import add_config_arguments, cli_fields, config_from_args, config_values


@dataclass(frozen=True)
class Example:
    src: Path = field(metadata={"positional": True, "help": "input"})
    output: Path = field(metadata={"flags": ("-o", "--output"), "aliases": ("--out",), "help": "where"})
    size: int = field(default=504, metadata={"group": "tiles", "help": "tile side"})
    gsd: float | None = field(default=None, metadata={"group": "tiles", "help": "metres (default: the raster's)"})
    reasoning: bool = field(default=True, metadata={"flags": ("--no-reasoning",), "action": "store_false",
                                                    "help": "no <think>"})  # fmt: skip
    force: bool = field(default=False, metadata={"help": "overwrite"})
    tags: tuple[str, ...] = field(default=(), metadata={"flags": ("--tag",), "help": "repeatable"})
    bands: tuple[int, ...] | None = field(
        default=None, metadata={"action": "store", "parse": lambda t: tuple(map(int, t.split(","))) if t else None}
    )
    a: str | None = field(default=None, metadata={"one_of": ("ab", True), "help": "a"})
    b: str | None = field(default=None, metadata={"one_of": ("ab", True), "help": "b"})
    internal: dict = field(default_factory=dict, metadata={"cli": False})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="x")
    add_config_arguments(parser, Example)
    return parser


def test_flags_types_defaults_and_parses_come_from_the_fields():
    args = _parser().parse_args(["in.tif", "-o", "o.gpkg", "--a", "1", "--size", "56", "--no-reasoning",
                                 "--tag", "t1", "--tag", "t2", "--bands", "3,2,1"])  # fmt: skip
    config = config_from_args(Example, args)
    assert config == Example(src=Path("in.tif"), output=Path("o.gpkg"), size=56, reasoning=False, tags=("t1", "t2"),
                             bands=(3, 2, 1), a="1")  # fmt: skip
    plain = config_from_args(Example, _parser().parse_args(["in.tif", "-o", "o.gpkg", "--b", "2"]))
    assert plain == Example(src=Path("in.tif"), output=Path("o.gpkg"), b="2")  # every default is the dataclass's


def test_help_shows_value_defaults_groups_and_hides_aliases():
    text = _parser().format_help()
    assert "tile side (default: 504)" in text
    assert "metres (default: the raster's)" in text and "(default: None)" not in text
    assert "tiles:" in text and "--out " not in text and "--internal" not in text
    assert "(--a A | --b B)" in text  # one_of: a required, mutually exclusive pair


def test_required_fields_and_exclusive_ones_are_enforced(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["in.tif", "--a", "1"])  # no -o
    with pytest.raises(SystemExit):
        _parser().parse_args(["in.tif", "-o", "o.gpkg", "--a", "1", "--b", "2"])
    assert "not allowed with argument" in capsys.readouterr().err
    old = _parser().parse_args(["in.tif", "--out", "o.gpkg", "--a", "1"])
    assert old.output == Path("o.gpkg")


#: command -> (its config class, the action under it or None, the arguments it requires)
COMMANDS = {
    "serve": ("engine.server.app:ServeConfig", None, []),
    "ground": ("engine.ground:GroundConfig", None, ["r.tif", "tanks", "-o", "o.gpkg"]),
    "ask": ("engine.cli.ask:AskConfig", None, ["i.png", "tanks", "--model", "m"]),
    "wheelhouse": ("engine.wheelhouse:WheelhouseConfig", None, ["dir"]),
    "sample-data": ("train.sample_data:SampleDataConfig", None, ["dir"]),
    "eval": ("train.evaluate:EvalConfig", None, ["-o", "rep"]),
    "sample-model": ("train.sample_model:SampleModelConfig", "build", ["-o", "m"]),
    "dataset-build": ("train.dataset:BuildConfig", "build", ["a.gpkg", "-o", "d"]),
    "dataset-synthetic": ("train.dataset:SyntheticConfig", "synthetic", ["-o", "d", "--shots", "1"]),
}


def _cls(spec: str) -> type:
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_field_is_a_flag_whose_default_is_the_fields(name):
    spec, action, required = COMMANDS[name]
    cls = _cls(spec)
    parser, _ = cli.command_parser(name.split("-")[0] if name.startswith("dataset") else name)
    namespace = parser.parse_args([*([action] if action else []), *required])
    values = config_values(cls, namespace)
    for f in cli_fields(cls):
        assert f.name in values, f"{name}: field {f.name} has no flag"
        if f.default is dataclasses.MISSING or (name, f.name) == ("serve", "token_file"):  # that one: the real path
            continue
        assert values[f.name] == f.default, f"{name}: --{f.name} gives {values[f.name]!r}, the field {f.default!r}"
