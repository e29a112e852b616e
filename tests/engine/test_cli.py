"""The ``geo-r1`` dispatcher: help, exit codes, lazy imports, one-line errors."""

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
