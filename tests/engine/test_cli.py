"""The ``geo-r1`` dispatcher: help, exit codes, lazy imports, one-line errors."""

import re
import subprocess
import sys

import pytest

from engine import cli


def test_help_lists_every_command_and_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_no_command_or_an_unknown_one_exits_2(capsys):
    assert cli.main([]) == 2
    with pytest.raises(SystemExit) as exc:
        cli.main(["bogus"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_project_errors_become_one_line_and_exit_1(tmp_path, capsys):
    rc = cli.main(["ground", str(tmp_path / "missing.tif"), "all tanks", "-o", str(tmp_path / "o.gpkg")])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("geo-r1 ground: error: ") and "missing.tif" in err[-1]
    assert not (tmp_path / "o.gpkg").exists()


def test_a_command_imports_only_what_it_needs(tmp_path):
    code = (
        "import sys; from engine import cli\n"
        f"rc = cli.main(['sample-data', {str(tmp_path)!r}, '--size', '256'])\n"
        "heavy = [m for m in ('torch', 'transformers', 'fastapi', 'peft') if m in sys.modules]\n"
        "print(rc, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0 []", out.stdout + out.stderr


#: command (and sub-action) -> the old spellings of its output flag, which still parse but are not listed
OUTPUT_ALIASES = {
    ("ground", None): ("--output",),
    ("train", None): ("--output-dir",),
    ("eval", None): ("--out",),
    ("dataset", "import"): ("--output",),
    ("dataset", "build"): ("--out-dir",),
    ("dataset", "synthetic"): ("--out-dir",),
    ("dataset", "from-json"): ("--out-dir",),
    ("sample-model", "build"): ("--out-dir",),
}


def _help_of(name, action):
    parser, _ = cli.command_parser(name)
    if action is None:
        return parser, parser.format_help()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return parser, sub.choices[action].format_help()


@pytest.mark.parametrize(("name", "action"), sorted(OUTPUT_ALIASES, key=str))
def test_the_output_flag_is_spelled_one_way_and_old_spellings_still_parse(name, action, tmp_path):
    parser, text = _help_of(name, action)
    assert "-o " in text and "--output" in text
    for old in OUTPUT_ALIASES[name, action]:
        if old == "--output":
            continue
        assert not re.search(re.escape(old) + r"\b(?!-)", text)  # hidden
        required = {"ground": ["r.tif", "tanks"], "train": ["sft", "--data", "d", "--model", "m"],
                    "dataset": [action, *({"import": ["l.gpkg", "--raster", "r.tif", "--expression", "e"],
                                           "build": ["a.gpkg"], "synthetic": ["--shots", "1"],
                                           "from-json": ["e.json", "--images", "i"]}.get(action, []))],
                    "sample-model": ["build"]}.get(name, [])  # fmt: skip
        new = vars(parser.parse_args([*required, "--output", str(tmp_path / "x.gpkg")]))
        assert vars(parser.parse_args([*required, old, str(tmp_path / "x.gpkg")])) == new


def test_one_name_per_idea_batch_size():
    parser, text = _help_of("ground", None)
    assert "--batch-size" in text and "--batch " not in text
    old = parser.parse_args(["r.tif", "tanks", "-o", "x.gpkg", "--batch", "3"])
    new = parser.parse_args(["r.tif", "tanks", "-o", "x.gpkg", "--batch-size", "3"])
    assert vars(old) == vars(new)
