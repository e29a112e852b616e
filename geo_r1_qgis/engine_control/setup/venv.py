"""Where the engine's venv is, what was installed into it, and whether it still works.

The small API the rest of the plugin uses (the engine manager starts ``engine_executable(settings)``):

- :func:`engine_executable` -- ``<venv>/bin/geo-r1``
- :func:`installed_state` -- the install record the setup wrote into the venv, or None
- :func:`check_venv` -- "Check" in the setup dialog: does the venv match this plugin, and does it run?

Standard library only (QGIS's Python); nothing from the venv is ever imported here, it is only run, with
the cleaned environment, as an argument list (no shell).
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import subprocess  # nosec B404 (the venv's own programs, argument lists only)
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ...core.errors import ConfigError

#: the install record, written into the venv by the setup once everything is installed
RECORD_NAME = "geo-r1-install.json"
RECORD_FORMAT = 1
PLUGIN_DIR = Path(__file__).resolve().parents[2]  # geo_r1_qgis/ (this file: geo_r1_qgis/engine_control/setup/)


def bin_dir(venv: Path) -> Path:
    return Path(venv) / ("Scripts" if os.name == "nt" else "bin")


def venv_python(venv: Path) -> Path:
    return bin_dir(venv) / ("python.exe" if os.name == "nt" else "python")


def _venv_path(where: Any) -> Path:
    """A venv path from a path, or from anything with ``venv_path()`` (PluginSettings)."""
    if hasattr(where, "venv_path"):
        return Path(where.venv_path())
    return Path(where)


def engine_executable(settings: Any) -> Path:
    """``<venv>/bin/geo-r1`` of the engine venv that ``settings`` (PluginSettings, or a venv path) names."""
    return bin_dir(_venv_path(settings)) / ("geo-r1.exe" if os.name == "nt" else "geo-r1")


def plugin_version(plugin_dir: Path = PLUGIN_DIR) -> str:
    """The plugin's version from its ``metadata.txt`` (inside the installed plugin, or the source tree's root)."""
    for candidate in (plugin_dir / "metadata.txt", plugin_dir.parent / "metadata.txt"):
        if candidate.is_file():
            parser = configparser.ConfigParser(interpolation=None)
            parser.read(candidate, encoding="utf-8")
            if parser.has_option("general", "version"):
                return parser.get("general", "version").strip()
    return "unknown"


@dataclass(frozen=True)
class InstallRecord:
    """What the setup installed (``<venv>/geo-r1-install.json``)."""

    plugin_version: str
    geo_r1_version: str
    python: str
    python_version: str
    torch: str  # "cpu" or "cuda"
    source: str  # "index", "wheel" or "wheelhouse"
    source_path: str = ""
    #: sha256 of the geo-r1 wheel file installed (wheel sources), else ""
    wheel_sha256: str = ""
    #: sha256 of the venv's ``pip freeze`` right after the install
    freeze_sha256: str = ""
    constraints: str = ""
    pip_args: tuple[str, ...] = ()
    installed_at: str = ""
    format: int = RECORD_FORMAT
    extras: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> InstallRecord:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        known = {f for f in cls.__dataclass_fields__}
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known}
        return cls(**values)


@dataclass(frozen=True)
class InstallState:
    """The engine venv as found on disk: its record (or None when it has none) and whether it has the programs."""

    venv: Path
    record: InstallRecord | None
    has_python: bool
    has_engine: bool

    @property
    def usable(self) -> bool:
        return self.has_python and self.has_engine


def installed_state(venv: Any) -> InstallState | None:
    """The state of the engine venv at ``venv`` (a path or PluginSettings); None when there is no venv at all.

    Cheap: reads files only, runs nothing. :func:`check_venv` runs the engine to be sure.
    """
    path = _venv_path(venv)
    if not (path / "pyvenv.cfg").is_file():
        return None
    record = None
    try:
        record = InstallRecord.from_json((path / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        record = None
    return InstallState(path, record, venv_python(path).exists(), engine_executable(path).exists())


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The plugin's cleaned environment (no PYTHON*, GDAL_*, PROJ_*, QT_*) for a program outside QGIS's Python."""
    from ...settings import clean_environment

    return clean_environment(extra={"PIP_DISABLE_PIP_VERSION_CHECK": "1", **(extra or {})})


def run_quiet(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a program (argument list, cleaned environment, no shell) and capture its output."""
    creation = getattr(subprocess, "CREATE_NO_WINDOW", 0) if sys.platform == "win32" else 0
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,  # nosec B603
                          env=clean_env(), check=False, stdin=subprocess.DEVNULL, creationflags=creation)  # fmt: skip


def freeze_hash(venv: Path) -> str:
    """sha256 of the venv's ``pip freeze`` (sorted lines), which changes whenever a package does."""
    proc = run_quiet([venv_python(venv), "-m", "pip", "freeze", "--all"], timeout=120)
    if proc.returncode != 0:
        raise ConfigError(f"pip freeze failed in {venv}: {proc.stderr.strip()[-300:]}")
    lines = sorted(line.strip() for line in proc.stdout.splitlines() if line.strip())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    #: plain-text lines, each saying what was found and, for a problem, what to do
    lines: tuple[str, ...]
    engine_version: str = ""

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def check_venv(venv: Any, expected_version: str | None = None, *, run_engine: bool = True,
               check_freeze: bool = True) -> CheckResult:  # fmt: skip
    """ "Check": the venv exists, its record matches this plugin's version, and ``geo-r1 --version`` runs."""
    path = _venv_path(venv)
    expected = expected_version or plugin_version()
    state = installed_state(path)
    if state is None:
        return CheckResult(False, (f"No engine venv at {path}. Press Install to set the engine up.",))
    lines: list[str] = []
    ok = True
    if not state.usable:
        return CheckResult(False, (f"The venv at {path} has no geo-r1 program. Press Repair to reinstall it.",))
    rec = state.record
    if rec is None:
        ok = False
        lines.append(f"The venv at {path} has no install record ({RECORD_NAME}); it was not made by this setup"
                     " or its install did not finish. Press Repair to reinstall it.")  # fmt: skip
    else:
        lines.append(f"Installed {rec.installed_at} with plugin {rec.plugin_version}: geo-r1 {rec.geo_r1_version},"
                     f" torch for {rec.torch.upper()}, Python {rec.python_version}, from {rec.source}"
                     f"{' ' + rec.source_path if rec.source_path else ''}.")  # fmt: skip
        if rec.geo_r1_version != expected:
            ok = False
            lines.append(f"The engine is version {rec.geo_r1_version} but this plugin is {expected}."
                         " Press Repair to install the matching engine.")  # fmt: skip
    version = ""
    if run_engine:
        try:
            proc = run_quiet([engine_executable(path), "--version"], timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            proc = None
            lines.append(f"geo-r1 --version could not run: {exc}. Press Repair to reinstall the engine.")
            ok = False
        if proc is not None:
            out = (proc.stdout + proc.stderr).strip()
            if proc.returncode == 0 and out.startswith("geo-r1 "):
                version = out.split()[1]
                lines.append(f"{engine_executable(path)} --version runs: {out}.")
                if version != expected:
                    ok = False
                    lines.append(f"It is not this plugin's version ({expected}). Press Repair.")
            else:
                ok = False
                lines.append(f"geo-r1 --version failed (exit {proc.returncode}): {out[-300:]}."
                             " Press Repair to reinstall the engine.")  # fmt: skip
    if check_freeze and rec is not None and rec.freeze_sha256:
        try:
            now = freeze_hash(path)
        except (ConfigError, OSError, subprocess.TimeoutExpired) as exc:
            now = ""
            lines.append(f"pip freeze could not run ({exc}).")
        if now and now != rec.freeze_sha256:
            lines.append("The installed packages changed since the setup (pip freeze differs from the record)."
                         " If the engine misbehaves, press Repair.")  # fmt: skip
        elif now:
            lines.append("The installed packages are those the setup installed (pip freeze matches the record).")
    if ok:
        lines.append("The engine venv is ready.")
    return CheckResult(ok, tuple(lines), version)
