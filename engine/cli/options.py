"""Command-line flags derived from a config dataclass's fields, as trl's ``TrlParser`` derives them.

A field's flag, type, default and help come from the field itself; its ``metadata`` adds what a
type cannot say (see :data:`KEYS`). A command then needs no second list of its options:

    add_config_arguments(parser, GroundConfig)        # in add_arguments(parser)
    config = config_from_args(GroundConfig, args)     # in main(args)

Defaults are the dataclass's, so ``%(default)s`` in a help text shows the real one, and the
dataclass's ``__post_init__`` stays the only place that checks a value.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

#: what a field's metadata may say about its flag
KEYS = {
    "help": "the help text (may use %(default)s)",
    "flags": "option strings, canonical first (default: --name-with-dashes)",
    "aliases": "old spellings that still parse but are not shown in --help",
    "positional": "a positional argument (True) instead of a flag",
    "position": "where a positional argument goes among them (default: field order)",
    "group": "the help section the flag is listed under",
    "metavar": "argparse metavar",
    "choices": "allowed values",
    "action": "store_true, store_false (for --no-NAME flags), append (repeatable), boolean (--NAME/--no-NAME)",
    "nargs": "argparse nargs (a positional list: +; a flag whose value may be left out: ?, with const)",
    "const": "the value of a flag given without one (with nargs ?)",
    "one_of": "(name, required): the fields sharing a name are mutually exclusive flags",
    "type": "a callable that converts the flag's text (default: from the annotation)",
    "parse": "a callable applied to the parsed value before the dataclass gets it",
    "cli": "False: not a flag (set by the program, not by the user)",
}

_TYPES: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str, "Path": Path}


def _kind(annotation: object) -> str:
    """``"int"`` for ``int | None``, ``"Path"`` for ``Path``, ``"tuple"`` for ``tuple[str, ...]``."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = [p.strip() for p in text.split("|") if p.strip() != "None"]
    return parts[0].split("[")[0] if parts else "str"


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _action(kind: str, default: Any) -> str | None:
    if kind == "bool":
        return "boolean" if default is True else "store_true"
    return "append" if kind == "tuple" else None


def _help(text: str | None, default: Any, show: bool) -> str | None:
    """``text`` plus `` (default: %(default)s)`` where the default is a value and the text does not name it."""
    hidden = default is None or default is False or default is dataclasses.MISSING or default in ((), "")
    if not show or text is None or "(default" in text or hidden:
        return text
    return text + " (default: %(default)s)"


def hide_aliases(action: argparse.Action, aliases: Iterable[str]) -> argparse.Action:
    """Keep ``aliases`` parsing for ``action`` but out of ``--help`` and error messages."""
    hidden = set(aliases)
    action.option_strings = [s for s in action.option_strings if s not in hidden]
    return action


def cli_fields(cls: type) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and f.init]


def add_config_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    defaults: dict[str, Any] | None = None,
    show_defaults: bool = True,
) -> None:
    """One argument per field of ``cls`` (only ``include`` if given; not ``exclude`` and ``cli: False`` ones);
    ``defaults`` overrides the dataclass's default for this command only; ``show_defaults`` adds each value
    default to its help."""
    skip = set(exclude)
    keep = None if include is None else set(include)
    groups: dict[str, Any] = {}
    chosen = cli_fields(cls)
    positional = sorted(
        (f for f in chosen if f.metadata.get("positional")), key=lambda f: f.metadata.get("position", 0)
    )
    for f in [*positional, *(f for f in chosen if not f.metadata.get("positional"))]:
        if f.name in skip or (keep is not None and f.name not in keep):
            continue
        md = f.metadata
        target: Any = parser
        if md.get("group"):
            if md["group"] not in groups:
                groups[md["group"]] = parser.add_argument_group(md["group"])
            target = groups[md["group"]]
        if md.get("one_of"):
            name, required = md["one_of"]
            if ("one_of", name) not in groups:
                groups["one_of", name] = target.add_mutually_exclusive_group(required=required)
            target = groups["one_of", name]
        default = (defaults or {}).get(f.name, _default(f))
        kind = _kind(f.type)
        action = md.get("action") or _action(kind, default)
        shown = show_defaults and action not in ("store_true", "store_false", "boolean", "append")
        kwargs: dict[str, Any] = {"help": _help(md.get("help"), default, shown)}
        for key in ("metavar", "choices", "nargs", "const"):
            if key in md:
                kwargs[key] = md[key]
        if md.get("positional"):
            target.add_argument(f.name, type=md.get("type", _TYPES.get(kind, str)), **kwargs)
            continue
        flags = tuple(md.get("flags", (f"--{f.name.replace('_', '-')}",)))
        aliases = tuple(md.get("aliases", ()))
        kwargs["dest"] = f.name
        long = next((s for s in flags if s.startswith("--")), flags[0])
        if "choices" not in kwargs:  # argparse lists the choices instead
            kwargs.setdefault("metavar", long.lstrip("-").replace("-", "_").upper())
        if action in ("store_true", "store_false"):
            kwargs.pop("metavar", None)
            kwargs.update(action=action, default=default)
        elif action == "boolean":
            kwargs.pop("metavar", None)
            kwargs.update(action=argparse.BooleanOptionalAction, default=default)
        elif action == "append":
            kwargs.update(action="append", type=md.get("type", str), default=None)
        else:
            kwargs["type"] = md.get("type", _TYPES.get(kind, str))
            if default is dataclasses.MISSING:
                kwargs["required"] = True
            else:
                kwargs["default"] = default
        hide_aliases(target.add_argument(*flags, *aliases, **kwargs), aliases)


def config_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``cls`` that ``args`` holds, each through its field's ``parse``."""
    values: dict[str, Any] = {}
    for f in cli_fields(cls):
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if "parse" in f.metadata:
            value = f.metadata["parse"](value)
        elif f.metadata.get("action", "append" if _kind(f.type) == "tuple" else None) == "append":
            value = tuple(value or ())
        values[f.name] = value
    return values


def config_from_args(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """``cls`` filled from the parsed flags (plus ``extra``); its own ``__post_init__`` checks the values."""
    return cls(**{**config_values(cls, args), **extra})


def command_words(prefix: Sequence[str], config: Any) -> str:
    """The shell command that rebuilds ``config``: ``prefix`` (the command and its required flags, e.g.
    ``geo-r1 sample-sam build -o DIR``), then every field that differs from its default as ``--name value``
    (``--name`` / ``--no-name`` for booleans). Fields without a default must be in ``prefix``; a manifest that
    records it reruns the same build whatever the caller typed."""
    import shlex

    words = list(prefix)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.default is dataclasses.MISSING or value == f.default:
            continue
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(value, bool):
            words.append(flag if value else f"--no-{f.name.replace('_', '-')}")
        else:
            words += [flag, str(value)]
    return shlex.join(words)
