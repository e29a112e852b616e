"""The engine setup's logic: find a Python, choose torch, plan the steps, build the venv beside the old one, swap.

Standard library only; QGIS appears only in :mod:`.task` and :mod:`.dialog`. Every program runs as an argument
list (never a shell) with the plugin's cleaned environment (no PYTHON*, GDAL_*, PROJ_*, QT_*), and nothing
from the venv is ever imported into QGIS's Python.

The new venv is built at ``<venv>.new``. Only when every step has passed is the old venv moved to
``<venv>.old``, the new one moved into place (its scripts' ``#!`` lines rewritten to the final path) and
checked, and the old one deleted. A failure at any step removes ``<venv>.new`` and leaves the old venv as it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess  # nosec B404 (python, pip and geo-r1, argument lists only)
import sys
import threading
import time
import zipfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ...core.errors import ConfigError, GeoR1Error
from .venv import (
    RECORD_NAME,
    InstallRecord,
    bin_dir,
    clean_env,
    engine_executable,
    freeze_hash,
    plugin_version,
    run_quiet,
    venv_python,
)

log = logging.getLogger(__name__)

MIN_PYTHON = (3, 10)
SOURCES = ("index", "wheel", "wheelhouse")
TORCH_CHOICES = ("cpu", "cuda")
#: the pins shipped inside the geo-r1 wheel (used when the user gives no constraints file)
WHEEL_PINS = "engine/constraints.txt"
LOG_TAIL = 25
#: run by the new venv's Python: the engine's imports work (torch, transformers, the server)
VERIFY_CODE = (
    "import torch, transformers, engine.server.app; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
)


class SetupError(GeoR1Error, RuntimeError):
    """A setup step failed. ``step`` names it; ``tail`` holds the last lines of its log."""

    def __init__(self, step: str, message: str, tail: str = "") -> None:
        super().__init__(message)
        self.step = step
        self.tail = tail


class SetupCanceled(SetupError):
    """The user cancelled the setup."""


# --------------------------------------------------------------------------------------------------
# Interpreters
# --------------------------------------------------------------------------------------------------

#: run with ``python -I -c``: what the setup needs to know about an interpreter, as one JSON line
PROBE_CODE = (
    "import json, sys, importlib.util as u\n"
    "print(json.dumps({'version': list(sys.version_info[:3]), 'executable': sys.executable,"
    " 'venv': u.find_spec('venv') is not None, 'ensurepip': u.find_spec('ensurepip') is not None}))"
)


@dataclass(frozen=True)
class Interpreter:
    path: Path
    version: tuple[int, ...] = ()
    has_venv: bool = False
    #: empty when usable, else what is wrong with it and what to do
    problem: str = ""
    #: the interpreter's own ``sys.executable`` (a pyenv shim or a link reports the real file)
    executable: str = ""

    @property
    def usable(self) -> bool:
        return not self.problem

    @property
    def label(self) -> str:
        v = ".".join(map(str, self.version)) if self.version else "?"
        return f"{self.path} (Python {v})" + (" (cannot be used)" if self.problem else "")


def probe_interpreter(path: Path | str, timeout: float = 30) -> Interpreter:
    """Run ``path -I -c PROBE_CODE`` with the cleaned environment and read its version and venv support."""
    path = Path(path)
    try:
        proc = run_quiet([path, "-I", "-c", PROBE_CODE], timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Interpreter(path, problem=f"it does not run ({exc}); choose another Python 3")
    try:
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        version = tuple(int(v) for v in data["version"])
    except (ValueError, KeyError, IndexError, TypeError):
        tail = " ".join((proc.stdout + proc.stderr).split())[-160:]
        return Interpreter(path, problem=f"it is not a working Python 3 (exit {proc.returncode}: {tail})")
    has_venv = bool(data.get("venv")) and bool(data.get("ensurepip"))
    problem = ""
    if version < MIN_PYTHON:
        problem = f"Python {'.'.join(map(str, MIN_PYTHON))} or newer is needed; install a newer Python 3"
    elif not has_venv:
        problem = ("its venv or ensurepip module is missing; on Debian/Ubuntu install python3-venv"
                   f" (sudo apt install python{version[0]}.{version[1]}-venv)")  # fmt: skip
    return Interpreter(path, version, has_venv, problem, str(data.get("executable") or ""))


def _qgis_bundle_roots() -> list[Path]:
    """Where QGIS's own interpreter lives when QGIS ships one (macOS QGIS.app, Windows OSGeo4W/standalone).

    A Linux distribution's QGIS uses the system's python3, which is shared with the rest of the system, so it
    is an ordinary candidate there: the venv isolates the engine from it either way.
    """
    roots = []
    if re.search(r"qgis|osgeo4w", sys.prefix, re.IGNORECASE):
        roots.append(Path(sys.prefix).resolve())
    exe = Path(sys.executable or "")
    if exe.name and not exe.name.lower().startswith("python"):  # QGIS's binary itself (qgis, qgis-bin.exe)
        roots.append(exe.resolve())
    return roots


def is_qgis_own(path: Path) -> bool:
    real = Path(path).resolve()
    return any(real == root or root in real.parents for root in _qgis_bundle_roots())


def candidate_paths(path_env: str | None = None, home: Path | None = None) -> list[Path]:
    """python3 and python3.N executables on PATH and in the usual places, each real file once, not QGIS's own."""
    home = home or Path.home()
    dirs = [Path(d) for d in (path_env if path_env is not None else os.environ.get("PATH", "")).split(os.pathsep) if d]
    dirs += [Path("/usr/local/bin"), Path("/opt/homebrew/bin"), Path("/opt/local/bin"), Path("/usr/bin"),
             home / ".pyenv" / "shims", home / ".local" / "bin"]  # fmt: skip
    dirs += sorted(Path("/Library/Frameworks/Python.framework/Versions").glob("3.*/bin"), reverse=True)
    names = ["python3", *(f"python3.{minor}" for minor in range(14, MIN_PYTHON[1] - 1, -1))]
    if os.name == "nt":
        names = ["python.exe", "python3.exe"]
    seen: set[Path] = set()
    out: list[Path] = []
    for d in dirs:
        for name in names:
            p = d / name
            if not (p.is_file() and os.access(p, os.X_OK)):
                continue
            real = p.resolve()
            if real in seen or is_qgis_own(p):
                continue
            seen.add(real)
            out.append(p)
    return out


def find_interpreters(path_env: str | None = None) -> list[Interpreter]:
    """Every candidate probed; usable ones first (newest Python first), then the rejected ones with the reason."""
    found, seen = [], set()
    for interp in map(probe_interpreter, candidate_paths(path_env)):
        real = Path(interp.executable).resolve() if interp.executable else interp.path.resolve()
        if real not in seen:  # python3 and python3.11 shims of one pyenv version: once
            seen.add(real)
            found.append(interp)
    usable = sorted((i for i in found if i.usable), key=lambda i: i.version, reverse=True)
    return usable + [i for i in found if not i.usable]


# --------------------------------------------------------------------------------------------------
# torch: CPU or CUDA
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuInfo:
    torch: str  # the recommended build: "cpu" or "cuda"
    text: str  # what nvidia-smi said, for the dialog


def detect_gpu(nvidia_smi: str | None = None) -> GpuInfo:
    """``nvidia-smi`` lists a GPU: the CUDA build; absent or failing: the CPU build."""
    exe = nvidia_smi or shutil.which("nvidia-smi")
    if not exe:
        return GpuInfo("cpu", "nvidia-smi not found: no NVIDIA driver, so the CPU build of torch")
    try:
        proc = run_quiet([exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"], timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return GpuInfo("cpu", f"nvidia-smi did not run ({exc}): the CPU build of torch")
    gpus = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not gpus:
        return GpuInfo("cpu", f"nvidia-smi found no GPU (exit {proc.returncode}): the CPU build of torch")
    return GpuInfo("cuda", f"nvidia-smi: {'; '.join(gpus)}: the CUDA build of torch")


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetupConfig:
    """One setup run. Checks itself; the source's files are checked by the first step."""

    python: Path
    venv: Path
    torch: str = "cpu"
    source: str = "index"
    #: the wheel file (source "wheel") or the wheelhouse folder (source "wheelhouse")
    source_path: str = ""
    #: where torch comes from (PyTorch's CPU or CUDA wheel index); empty: pip's configured index
    torch_index_url: str = ""
    #: pins for every pip install; empty: the wheelhouse's constraints.txt, or the pins inside the wheel
    constraints: str = ""
    #: extra pip install options (advanced), e.g. ("--retries", "1")
    pip_args: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()
    upgrade_pip: bool = True
    version: str = field(default_factory=plugin_version)
    log_path: Path | None = None

    def __post_init__(self) -> None:
        if self.torch not in TORCH_CHOICES:
            raise ConfigError(f"torch must be one of {TORCH_CHOICES}, got {self.torch!r}")
        if self.source not in SOURCES:
            raise ConfigError(f"the source must be one of {SOURCES}, got {self.source!r}")
        if self.source != "index" and not self.source_path:
            what = "wheel file" if self.source == "wheel" else "wheelhouse folder"
            raise ConfigError(f"choose the {what} to install from")
        if not str(self.venv).strip() or not Path(self.venv).is_absolute():
            raise ConfigError(f"the engine venv path must be an absolute path, got {str(self.venv)!r}")
        if any(not isinstance(a, str) for a in self.pip_args):
            raise ConfigError("extra pip options must be strings")

    @property
    def offline(self) -> bool:
        return self.source == "wheelhouse"

    @property
    def new_venv(self) -> Path:
        return self.venv.with_name(self.venv.name + ".new")

    @property
    def old_venv(self) -> Path:
        return self.venv.with_name(self.venv.name + ".old")


@dataclass(frozen=True)
class Step:
    key: str
    title: str
    #: the command (argument list) for a step that runs a program, empty for one done in-process
    argv: tuple[str, ...] = ()


def _constraints_args(cfg: SetupConfig) -> list[str]:
    if cfg.constraints:
        return ["-c", cfg.constraints]
    if cfg.source == "wheelhouse" and (Path(cfg.source_path) / "constraints.txt").is_file():
        return ["-c", str(Path(cfg.source_path) / "constraints.txt")]
    if cfg.source == "wheel":
        return ["-c", str(cfg.new_venv / "geo-r1-constraints.txt")]  # extracted from the wheel by "check"
    return []


def _offline_args(cfg: SetupConfig) -> list[str]:
    return ["--no-index", "--find-links", str(Path(cfg.source_path))] if cfg.offline else []


def geo_r1_requirement(cfg: SetupConfig) -> str:
    extras = f"[{','.join(cfg.extras)}]" if cfg.extras else ""
    if cfg.source == "wheel":
        return f"geo-r1{extras} @ {Path(cfg.source_path).resolve().as_uri()}"
    return f"geo-r1{extras}=={cfg.version}"


def plan_steps(cfg: SetupConfig) -> list[Step]:
    """The setup's steps, in order; the pip commands are complete argument lists."""
    py = str(venv_python(cfg.new_venv))
    pip = [py, "-m", "pip", "install", "--progress-bar", "off"]
    common = [*_constraints_args(cfg), *_offline_args(cfg), *cfg.pip_args]
    steps = [
        Step("check", "check the Python and the source"),
        Step("venv", "create the venv", (str(cfg.python), "-m", "venv", str(cfg.new_venv))),
    ]
    if cfg.upgrade_pip and not cfg.offline:
        steps.append(Step("pip", "upgrade pip", (*pip, "--upgrade", "pip", *cfg.pip_args)))
    torch_index = ["--index-url", cfg.torch_index_url] if cfg.torch_index_url and not cfg.offline else []
    steps += [
        Step("torch", f"install torch ({cfg.torch.upper()} build)", (*pip, "torch", *common, *torch_index)),
        Step("geo-r1", "install geo-r1", (*pip, geo_r1_requirement(cfg), *common)),
        Step("verify", "import the engine in the new venv", (py, "-c", VERIFY_CODE)),
        Step("record", "write the install record"),
        Step("swap", "put the new venv in place of the old one"),
    ]
    return steps


# --------------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def relocate_scripts(venv: Path, built_at: Path) -> int:
    """Rewrite the venv's scripts (``#!`` lines, activate scripts) and pyvenv.cfg from ``built_at`` to ``venv``.

    A venv records its own path in its scripts; built at ``<venv>.new`` and renamed, they must be told where they
    now are. Returns the number of files rewritten.
    """
    old, new = str(built_at).encode(), str(venv).encode()
    changed = 0
    files = [p for p in bin_dir(venv).iterdir() if p.is_file() and not p.is_symlink()] + [venv / "pyvenv.cfg"]
    for path in files:
        if path.stat().st_size > 1 << 20:
            continue
        data = path.read_bytes()
        if old in data and (path.name == "pyvenv.cfg" or data.startswith(b"#!") or b"\0" not in data[:4096]):
            mode = path.stat().st_mode
            path.write_bytes(data.replace(old, new))
            path.chmod(mode)
            changed += 1
    return changed


@dataclass(frozen=True)
class SetupResult:
    ok: bool
    message: str
    failed_step: str = ""
    tail: str = ""
    record: InstallRecord | None = None
    seconds: float = 0.0


class Installer:
    """Runs a :class:`SetupConfig`'s steps. ``on_line`` gets every log line, ``on_step(index, count, title)``
    each step as it starts. ``cancel()`` may be called from another thread: it kills the running program."""

    def __init__(self, cfg: SetupConfig, on_line: Callable[[str], None] | None = None,
                 on_step: Callable[[int, int, str], None] | None = None) -> None:  # fmt: skip
        self.cfg = cfg
        self.on_line = on_line or (lambda line: None)
        self.on_step = on_step or (lambda i, n, title: None)
        self.tail: deque[str] = deque(maxlen=LOG_TAIL)
        self._proc: subprocess.Popen | None = None
        self._canceled = threading.Event()
        self._lock = threading.Lock()
        self._log_file = None

    # -- control ---------------------------------------------------------------------------------
    def cancel(self) -> None:
        self._canceled.set()
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            _kill_tree(proc)

    @property
    def canceled(self) -> bool:
        return self._canceled.is_set()

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> SetupResult:
        cfg = self.cfg
        start = time.monotonic()
        steps = plan_steps(cfg)
        if cfg.log_path is not None:
            cfg.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(cfg.log_path, "a", encoding="utf-8")  # noqa: SIM115 (closed in finally)
        record = None
        current = steps[0]
        try:
            self._emit(f"== Geo-R1 engine setup {time.strftime('%Y-%m-%d %H:%M:%S')}: {cfg.venv}")
            for i, step in enumerate(steps):
                current = step
                if self.canceled:
                    raise SetupCanceled(step.title, "cancelled")
                self.on_step(i, len(steps), step.title)
                self._emit(f"-- step {i + 1}/{len(steps)}: {step.title}")
                if step.argv:
                    self._run_program(step)
                else:
                    result = getattr(self, "_step_" + step.key)()
                    if step.key == "record":
                        record = result
            seconds = time.monotonic() - start
            message = f"The engine is set up in {cfg.venv} ({seconds:.0f} s)."
            self._emit(message)
            return SetupResult(True, message, record=record, seconds=seconds)
        except SetupError as exc:
            return self._failed(steps, current, exc, start)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            return self._failed(steps, current, SetupError(current.title, f"{type(exc).__name__}: {exc}"), start)
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def _failed(self, steps: list[Step], step: Step, exc: SetupError, start: float) -> SetupResult:
        index = steps.index(step) + 1
        shutil.rmtree(self.cfg.new_venv, ignore_errors=True)
        kept = "The previous engine venv is unchanged." if self.cfg.venv.exists() else "No engine venv was installed."
        if isinstance(exc, SetupCanceled):
            message = f"Setup cancelled during step {index} of {len(steps)} ({step.title}). {kept}"
        else:
            message = (f"Setup failed at step {index} of {len(steps)} ({step.title}): {exc} {kept}"
                       " The last lines of the log are below; press Install to try again.")  # fmt: skip
        tail = exc.tail or "\n".join(self.tail)
        self._emit(message)
        return SetupResult(False, message, step.title, tail, seconds=time.monotonic() - start)

    def _emit(self, line: str) -> None:
        self.tail.append(line)
        if self._log_file is not None:
            self._log_file.write(line + "\n")
            self._log_file.flush()
        self.on_line(line)

    def _run_program(self, step: Step) -> None:
        kwargs: dict = {"start_new_session": True} if os.name != "nt" else {
            "creationflags": getattr(subprocess, "CREATE_NO_WINDOW", 0)}  # fmt: skip
        with self._lock:
            if self.canceled:
                raise SetupCanceled(step.title, "cancelled")
            self._proc = subprocess.Popen(list(step.argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,  # nosec B603
                                          stdin=subprocess.DEVNULL, text=True, errors="replace", bufsize=1,
                                          env=clean_env({"PYTHONUNBUFFERED": "1"}), **kwargs)  # fmt: skip
        proc = self._proc
        step_tail: deque[str] = deque(maxlen=LOG_TAIL)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                step_tail.append(line)
                self._emit(line)
        except BaseException:  # the line handler failed: the program must not outlive the step
            _kill_tree(proc)
            raise
        finally:  # the pipe closed and the program reaped, however the step ends (QGIS shows ResourceWarnings)
            proc.stdout.close()
            rc = proc.wait()
            with self._lock:
                self._proc = None
        if self.canceled:
            raise SetupCanceled(step.title, "cancelled")
        if rc != 0:
            raise SetupError(step.title, f"{Path(step.argv[0]).name} exited with status {rc}.", "\n".join(step_tail))

    # -- the in-process steps --------------------------------------------------------------------
    def _step_check(self) -> None:
        cfg = self.cfg
        interp = probe_interpreter(cfg.python)
        if not interp.usable:
            raise SetupError("check", f"the Python {cfg.python} cannot be used: {interp.problem}.")
        self._emit(f"Python: {interp.label}")
        if cfg.source == "wheel":
            wheel = Path(cfg.source_path)
            if not wheel.is_file():
                raise SetupError("check", f"the wheel file {wheel} does not exist; choose the geo_r1-*.whl file"
                                          " (make wheel builds it into dist/).")  # fmt: skip
            if wheel.suffix != ".whl" or not zipfile.is_zipfile(wheel):
                raise SetupError("check", f"{wheel} is not a wheel (.whl) file; choose the geo_r1-*.whl file.")
        elif cfg.source == "wheelhouse":
            folder = Path(cfg.source_path)
            if not folder.is_dir():
                raise SetupError("check", f"the wheelhouse folder {folder} does not exist; make it with 'geo-r1"
                                          " wheelhouse DIR' on a connected machine and copy it here.")  # fmt: skip
            if not list(folder.glob("geo_r1-*.whl")):
                raise SetupError("check", f"{folder} holds no geo_r1-*.whl; it is not a wheelhouse made by"
                                          " 'geo-r1 wheelhouse DIR'.")  # fmt: skip
        if cfg.constraints and not Path(cfg.constraints).is_file():
            raise SetupError("check", f"the constraints file {cfg.constraints} does not exist.")
        if cfg.new_venv.exists():
            self._emit(f"removing an unfinished earlier attempt at {cfg.new_venv}")
            shutil.rmtree(cfg.new_venv)
        if cfg.source == "wheel" and not cfg.constraints:
            # The pins shipped inside the wheel, where plan_steps' "-c" expects them ("python -m venv" accepts
            # a folder that exists).
            pins = _read_wheel_pins(Path(cfg.source_path))
            cfg.new_venv.mkdir(parents=True)
            (cfg.new_venv / "geo-r1-constraints.txt").write_text(pins or "# the wheel ships no pins\n", "utf-8")
            self._emit("pins: " + ("the wheel's own (engine/constraints.txt)" if pins else "none in the wheel"))
        torch_from = f" from {cfg.torch_index_url}" if cfg.torch_index_url else ""
        self._emit(f"torch: the {cfg.torch.upper()} build{torch_from}")

    def _step_record(self) -> InstallRecord:
        cfg = self.cfg
        proc = run_quiet([engine_executable(cfg.new_venv), "--version"], timeout=300)
        out = (proc.stdout + proc.stderr).strip()
        if proc.returncode != 0 or not out.startswith("geo-r1 "):
            raise SetupError("record", f"geo-r1 --version failed in the new venv (exit {proc.returncode}).", out)
        interp = probe_interpreter(venv_python(cfg.new_venv))
        constraints = _constraints_args(cfg)
        record = InstallRecord(
            plugin_version=plugin_version(),
            geo_r1_version=out.split()[1],
            python=str(cfg.python),
            python_version=".".join(map(str, interp.version)),
            torch=cfg.torch,
            source=cfg.source,
            source_path=str(Path(cfg.source_path).resolve()) if cfg.source_path else "",
            wheel_sha256=sha256_file(Path(cfg.source_path)) if cfg.source == "wheel" else "",
            freeze_sha256=freeze_hash(cfg.new_venv),
            constraints=constraints[1] if constraints else "",
            pip_args=tuple(cfg.pip_args),
            installed_at=time.strftime("%Y-%m-%d %H:%M:%S"),
            extras=tuple(cfg.extras),
        )
        if constraints and cfg.source == "wheel" and not cfg.constraints:
            record = replace(record, constraints=str(cfg.venv / "geo-r1-constraints.txt"))
        (cfg.new_venv / RECORD_NAME).write_text(record.to_json(), encoding="utf-8")
        self._emit(f"geo-r1 {record.geo_r1_version} installed; pip freeze sha256 {record.freeze_sha256[:16]}…")
        return record

    def _step_swap(self) -> None:
        cfg = self.cfg
        if cfg.old_venv.exists():
            shutil.rmtree(cfg.old_venv)
        had_old = cfg.venv.exists()
        if had_old:
            os.replace(cfg.venv, cfg.old_venv)
        try:
            os.replace(cfg.new_venv, cfg.venv)
            n = relocate_scripts(cfg.venv, cfg.new_venv)
            self._emit(f"moved into place; {n} scripts now point at {cfg.venv}")
            proc = run_quiet([engine_executable(cfg.venv), "--version"], timeout=300)
            if proc.returncode != 0:
                raise SetupError("swap", f"geo-r1 did not run from {cfg.venv} after the move.",
                                 (proc.stdout + proc.stderr)[-2000:])  # fmt: skip
        except (OSError, SetupError):
            if cfg.venv.exists():
                shutil.rmtree(cfg.venv, ignore_errors=True)
            if had_old:
                os.replace(cfg.old_venv, cfg.venv)
            raise
        if had_old:
            shutil.rmtree(cfg.old_venv, ignore_errors=True)


def _read_wheel_pins(wheel: Path) -> str | None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(WHEEL_PINS).decode("utf-8")
    except (KeyError, OSError, zipfile.BadZipFile):
        return None


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill a running step and the programs it started (pip's build subprocesses)."""
    try:
        if os.name != "nt":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError, OSError):
        pass
