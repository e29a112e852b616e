"""The plugin's engine setup (geo_r1_qgis/engine_control/setup/) under QGIS's own Python.

Real programs throughout: the host's python3 builds real venvs, pip installs from pip's configured index, the
wheel is the one ``make wheel`` builds, and the installed ``geo-r1 serve`` answers /health with the tiny model.
Fake interpreters (small executable scripts) stand in only where a test needs a Python that misbehaves: one
that prints its environment, one too old, one whose ``-m venv`` hangs until cancelled.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
qgis_core = pytest.importorskip("qgis.core", reason="PyQGIS is not importable; run under /usr/bin/python3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import host_exec  # noqa: E402
from tiny_models import cached_build  # noqa: E402

from geo_r1_qgis.core.errors import ConfigError  # noqa: E402
from geo_r1_qgis.engine_control.setup import installer as inst  # noqa: E402
from geo_r1_qgis.engine_control.setup.venv import (  # noqa: E402
    RECORD_NAME,
    check_venv,
    engine_executable,
    installed_state,
    plugin_version,
    venv_python,
)

pytestmark = pytest.mark.qgis

REPO = Path(__file__).resolve().parents[2]
VENV_GEO_R1 = REPO / ".venv" / "bin" / "geo-r1"
LEAKY = {"PYTHONPATH": "/usr/share/qgis/python", "GDAL_DATA": "/usr/share/gdal", "PROJ_LIB": "/usr/share/proj",
         "QT_PLUGIN_PATH": "/usr/lib/qt5/plugins", "PROJ_DATA": "/usr/share/proj", "PYTHONHOME": "/usr"}  # fmt: skip


def _fake_python(path: Path, body: str) -> Path:
    """An executable script that answers like a Python (``-I`` keeps QGIS's variables out of the fake itself)."""
    path.write_text(f"#!{sys.executable} -I\nimport json, os, sys, time\n{body}\n")
    path.chmod(0o755)
    return path


PROBE_OK = "print(json.dumps({'version': [3, 12, 1], 'executable': sys.argv[0], 'venv': True, 'ensurepip': True}))"


# --------------------------------------------------------------------------------------------------
# The cleaned environment, interpreters, torch
# --------------------------------------------------------------------------------------------------


def test_subprocesses_get_a_cleaned_environment(tmp_path, monkeypatch):
    for key, value in LEAKY.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("GEO_R1_TEST_KEEP", "yes")
    env_file = tmp_path / "env.json"
    fake = _fake_python(
        tmp_path / "python3",
        f"""
with open({str(env_file)!r}, "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "env": dict(os.environ)}}) + "\\n")
if "-c" in sys.argv:
    {PROBE_OK}
else:
    sys.exit(3)""",
    )
    # the version check ...
    interp = inst.probe_interpreter(fake)
    assert interp.usable and interp.version == (3, 12, 1)
    # ... and a setup step (the fake's "-m venv" fails, which also names the step)
    cfg = inst.SetupConfig(python=fake, venv=tmp_path / "engine-venv", upgrade_pip=False)
    result = inst.Installer(cfg).run()
    assert not result.ok and result.failed_step == "create the venv", result.message
    calls = [json.loads(line) for line in env_file.read_text().splitlines()]
    assert any("venv" in c["argv"] for c in calls) and len(calls) >= 3  # probe, the check's probe, -m venv
    for call in calls:
        leaked = sorted(k for k in call["env"] if k in LEAKY or k.startswith(("QT_", "GDAL_", "PROJ_", "PYTHONP")))
        assert leaked == [], f"{call['argv']}: {leaked} leaked into the subprocess"
        assert call["env"].get("GEO_R1_TEST_KEEP") == "yes"  # the rest of the environment is kept


def test_interpreter_problems_are_plain_and_say_what_to_do(tmp_path):
    old = _fake_python(tmp_path / "old", "print(json.dumps({'version': [3, 8, 10], 'venv': True, 'ensurepip': True}))")
    novenv = _fake_python(tmp_path / "novenv",
                          "print(json.dumps({'version': [3, 11, 2], 'venv': True, 'ensurepip': False}))")  # fmt: skip
    broken = _fake_python(tmp_path / "broken", "sys.exit('segfault, sort of')")
    assert "3.10 or newer" in inst.probe_interpreter(old).problem
    assert "python3.11-venv" in inst.probe_interpreter(novenv).problem
    assert "not a working Python" in inst.probe_interpreter(broken).problem
    assert "does not run" in inst.probe_interpreter(tmp_path / "missing").problem


def test_finds_this_machines_python3(tmp_path):
    found = inst.find_interpreters()
    assert found, "not even QGIS's python3 was found on PATH"
    usable = [i for i in found if i.usable]
    assert all(i.version >= (3, 10) and i.has_venv for i in usable)
    # usable ones first; an unusable one says what to do (the QGIS 3.40 chroot's python3 has no ensurepip)
    assert found[: len(usable)] == usable
    assert all(("python3" in i.problem and "-venv" in i.problem) or "3.10" in i.problem or "Python 3" in i.problem
               for i in found[len(usable):])  # fmt: skip
    real = {i.path.resolve() for i in found}
    assert len(real) == len(found)  # each real interpreter once
    # a PATH of its own: the fake is found first, and a second link to the same file is not listed twice
    fake = _fake_python(tmp_path / "python3", PROBE_OK)
    (tmp_path / "python3.12").symlink_to(fake)
    paths = inst.candidate_paths(path_env=str(tmp_path))
    assert paths[0] == fake and tmp_path / "python3.12" not in paths


@pytest.mark.parametrize(("prefix", "executable", "candidate", "own"), [
    ("/Applications/QGIS.app/Contents/MacOS", "/Applications/QGIS.app/Contents/MacOS/bin/python3",
     "/Applications/QGIS.app/Contents/MacOS/bin/python3", True),
    ("/Applications/QGIS.app/Contents/MacOS", "/Applications/QGIS.app/Contents/MacOS/bin/python3",
     "/opt/homebrew/bin/python3", False),
    ("/usr", "/usr/bin/qgis", "/usr/bin/qgis", True),  # QGIS's binary as sys.executable
    ("/usr", "/usr/bin/python3", "/usr/bin/python3", False),  # a distribution's shared python3
])  # fmt: skip
def test_qgis_own_interpreter_is_never_a_candidate(monkeypatch, prefix, executable, candidate, own):
    monkeypatch.setattr(inst.sys, "prefix", prefix)
    monkeypatch.setattr(inst.sys, "executable", executable)
    assert inst.is_qgis_own(Path(candidate)) is own


def test_torch_build_follows_nvidia_smi(tmp_path, monkeypatch):
    gpu = _fake_python(tmp_path / "nvidia-smi", "print('NVIDIA H200, 550.54.15, 143771 MiB')")
    nogpu = _fake_python(tmp_path / "nvidia-smi-none", "print('NVIDIA-SMI has failed'); sys.exit(9)")
    found = inst.detect_gpu(str(gpu))
    assert found.torch == "cuda" and "H200" in found.text
    assert inst.detect_gpu(str(nogpu)).torch == "cpu"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    absent = inst.detect_gpu()
    assert absent.torch == "cpu" and "not found" in absent.text


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------


def test_plan_for_each_source(tmp_path):
    venv = tmp_path / "engine-venv"
    house = tmp_path / "house"
    house.mkdir()
    (house / "constraints.txt").write_text("torch==2.13.0\n")
    off = inst.plan_steps(inst.SetupConfig(python=Path("/usr/bin/python3"), venv=venv, source="wheelhouse",
                                           source_path=str(house), pip_args=("--retries", "0")))  # fmt: skip
    keys = [s.key for s in off]
    assert keys == ["check", "venv", "torch", "geo-r1", "verify", "record", "swap"]  # no pip upgrade offline
    for step in (s for s in off if s.key in ("torch", "geo-r1")):
        argv = list(step.argv)
        assert argv[0] == str(venv_python(tmp_path / "engine-venv.new"))
        assert argv[argv.index("--find-links") + 1] == str(house) and "--no-index" in argv
        assert argv[argv.index("-c") + 1] == str(house / "constraints.txt") and argv[-2:] == ["--retries", "0"]
    assert f"geo-r1=={plugin_version()}" in off[3].argv
    wheel = tmp_path / "geo_r1-0.1.0-py3-none-any.whl"
    online = inst.plan_steps(inst.SetupConfig(python=Path("/usr/bin/python3"), venv=venv, source="wheel",
                                              source_path=str(wheel), torch="cuda", extras=("train",),
                                              torch_index_url="file:///idx/cu"))  # fmt: skip
    by_key = {s.key: s for s in online}
    assert "pip" in by_key and "--no-index" not in by_key["geo-r1"].argv
    assert f"geo-r1[train] @ {wheel.as_uri()}" in by_key["geo-r1"].argv
    assert by_key["torch"].argv[-2:] == ("--index-url", "file:///idx/cu") and "CUDA" in by_key["torch"].title
    bad_values = (
        ({"torch": "rocm"}, "torch must be"),
        ({"source": "ftp"}, "source must be"),
        ({"source": "wheel"}, "choose the wheel file"),
        ({"venv": Path("rel/venv")}, "absolute"),
    )
    for bad, match in bad_values:
        with pytest.raises(ConfigError, match=match):
            inst.SetupConfig(**{"python": Path("/usr/bin/python3"), "venv": venv, **bad})


def test_relocated_venv_scripts_run_from_their_new_place(tmp_path):
    built = tmp_path / "engine-venv.new"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(built)], check=True, timeout=120)
    script = built / "bin" / "hello"
    script.write_text(f"#!{built}/bin/python\nimport sys\nprint(sys.prefix)\n")
    script.chmod(0o755)
    final = tmp_path / "engine-venv"
    os.replace(built, final)
    assert inst.relocate_scripts(final, built) >= 2  # hello and the activate scripts (and pyvenv.cfg when named)
    out = subprocess.run([str(final / "bin" / "hello")], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == str(final)
    assert str(built) not in (final / "bin" / "activate").read_text()


def test_the_setup_leaves_no_unclosed_pipe_file_or_process(tmp_path):
    """QGIS shows every ResourceWarning in its "Python warning" tab: a step that fails and one that is cancelled
    must close the program's pipe, the log file and reap the program (warnings as errors, after a collection)."""
    import gc
    import threading
    import warnings

    fake = _fake_python(
        tmp_path / "python3",
        f"""
if "-c" in sys.argv:
    {PROBE_OK}
elif "hang" in os.environ.get("FAKE_MODE", ""):
    print("creating the venv ...", flush=True)
    time.sleep(600)
else:
    print("creating the venv ...", flush=True)
    print("Error: no room left", flush=True)
    sys.exit(3)
""",
    )
    cfg = inst.SetupConfig(python=fake, venv=tmp_path / "engine-venv", source="index", log_path=tmp_path / "setup.log")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        result = inst.Installer(cfg).run()
        assert not result.ok and "exited with status 3" in result.message, result.message
        os.environ["FAKE_MODE"] = "hang"
        try:
            installer = inst.Installer(cfg)
            threading.Timer(3.0, installer.cancel).start()
            cancelled = installer.run()
        finally:
            del os.environ["FAKE_MODE"]
        assert not cancelled.ok and "cancelled" in cancelled.message, cancelled.message
        del installer
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks, leaks


def test_a_failed_pip_step_is_named_with_its_log_and_the_old_venv_stays(tmp_path):
    """A wheelhouse without torch's dependencies: real pip fails offline at "install torch" (pip's configured
    find-links may still hold torch itself); the old venv is untouched."""
    old = tmp_path / "engine-venv"
    old.mkdir()
    (old / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (old / "marker").write_text("the old engine")
    house = tmp_path / "house"
    house.mkdir()
    (house / "geo_r1-0.1.0-py3-none-any.whl").write_bytes(b"not really a wheel")
    lines: list[str] = []
    steps: list[str] = []
    cfg = inst.SetupConfig(python=_usable_python(), venv=old, source="wheelhouse", source_path=str(house),
                           log_path=tmp_path / "setup.log")  # fmt: skip
    result = inst.Installer(cfg, on_line=lines.append, on_step=lambda i, n, t: steps.append(t)).run()
    assert not result.ok and result.failed_step.startswith("install torch"), result.message
    assert "step 3 of 7 (install torch (CPU build))" in result.message and "unchanged" in result.message
    assert "ERROR: No matching distribution found for" in result.tail
    assert steps == ["check the Python and the source", "create the venv", "install torch (CPU build)"]
    assert (old / "marker").read_text() == "the old engine" and not cfg.new_venv.exists()
    assert "No matching distribution found for" in (tmp_path / "setup.log").read_text()
    assert any("step 3/7" in line for line in lines)


def _usable_python() -> Path:
    usable = [i for i in inst.find_interpreters() if i.usable]
    if not usable:
        pytest.skip("no python3 >= 3.10 with venv on this machine besides QGIS's own")
    return usable[0].path


# --------------------------------------------------------------------------------------------------
# The real install: the wheel make wheel built, torch from the local pinned wheel, geo-r1 serve
# --------------------------------------------------------------------------------------------------


def _need_host() -> None:
    if host_exec.remote():
        pytest.skip("the real install needs the host's Python and pip index; the QGIS 3.40 chroot has neither"
                    " (it runs on the host's QGIS 3.22 run)")  # fmt: skip
    if not VENV_GEO_R1.is_file():
        pytest.skip(f"{VENV_GEO_R1} is missing: make setup builds the repository's venv (make wheel needs it)")


@pytest.fixture(scope="module")
def built_wheel() -> Path:
    _need_host()
    proc = subprocess.run(["make", "-s", "-o", "setup", "wheel"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip
    assert proc.returncode == 0, f"make wheel failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    wheel = REPO / "dist" / f"geo_r1-{plugin_version()}-py3-none-any.whl"
    assert wheel.is_file(), f"make wheel did not write {wheel}"
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory, built_wheel):
    """The plugin's installer, from the wheel, into a fresh venv (torch resolves to the local pinned CPU wheel)."""
    root = tmp_path_factory.mktemp("setup")
    # --no-compile (the setup's "extra pip options"): pip byte-compiling torch and transformers is most of the
    # install's CPU time and nothing this test checks; Python compiles what it imports when the engine starts
    cfg = inst.SetupConfig(python=_usable_python(), venv=root / "engine-venv", source="wheel",
                           source_path=str(built_wheel), log_path=root / "engine-setup.log",
                           pip_args=("--no-compile",))  # fmt: skip
    steps: list[str] = []
    result = inst.Installer(cfg, on_step=lambda i, n, t: steps.append(t)).run()
    assert result.ok, f"{result.message}\n{result.tail}"
    return cfg, result, steps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_installer_builds_a_venv_that_serves(installed, tmp_path):
    cfg, result, steps = installed
    assert steps[0] == "check the Python and the source" and steps[-1] == "put the new venv in place of the old one"
    assert not cfg.new_venv.exists() and not cfg.old_venv.exists()
    rec = result.record
    assert rec is not None and rec.geo_r1_version == plugin_version() and rec.source == "wheel"
    assert rec.torch == "cpu" and len(rec.wheel_sha256) == 64 and len(rec.freeze_sha256) == 64
    assert json.loads((cfg.venv / RECORD_NAME).read_text())["wheel_sha256"] == rec.wheel_sha256
    state = installed_state(cfg.venv)
    assert state is not None and state.usable and state.record == rec
    check = check_venv(cfg.venv, plugin_version())
    assert check.ok and check.engine_version == plugin_version(), check.text
    assert "pip freeze matches" in check.text
    # torch is the pinned CPU build; the base install has no training extras, and says how to get them
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    torch_v = subprocess.run([str(venv_python(cfg.venv)), "-c", "import torch; print(torch.__version__)"],
                             capture_output=True, text=True, timeout=300, env=env, check=True)  # fmt: skip
    assert torch_v.stdout.strip() == "2.13.0+cpu"
    train = subprocess.run([str(engine_executable(cfg.venv)), "train", "sft"], capture_output=True, text=True,
                           timeout=300, env=env, check=False)  # fmt: skip
    assert train.returncode == 1 and "pip install 'geo-r1[train]'" in train.stderr
    # geo-r1 serve from the installed venv answers /health with the tiny model
    model = cached_build("tiny-model-seed0", build=_build_tiny)
    port = _free_port()
    log_path = tmp_path / "serve.log"
    cmd = [str(engine_executable(cfg.venv)), "serve", "--model", str(model), "--port", str(port),
           "--token-file", str(tmp_path / "token"), "--threads", "1"]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        health = None
        while health is None:
            assert proc.poll() is None, f"geo-r1 serve exited:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no /health after 300 s:\n{log_path.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:  # nosec B310
                    health = json.loads(resp.read())
            except OSError:
                time.sleep(0.5)
        assert health == {"status": "ok", "engine_version": plugin_version()}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _build_tiny(out: Path) -> None:
    proc = host_exec.run([str(VENV_GEO_R1), "tiny-model", str(out)], timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert proc.returncode == 0, f"geo-r1 tiny-model failed:\n{proc.stderr[-2000:]}"


@pytest.mark.slow
def test_a_broken_install_names_its_step_and_the_previous_venv_still_works(installed, tmp_path):
    cfg, _, _ = installed
    before = (cfg.venv / RECORD_NAME).read_text()
    broken = inst.SetupConfig(python=cfg.python, venv=cfg.venv, source="wheel",
                              source_path=str(tmp_path / "geo_r1-9.9.9-py3-none-any.whl"))  # fmt: skip
    failed = inst.Installer(broken).run()
    assert not failed.ok and failed.failed_step == "check the Python and the source"
    assert "step 1 of 8" in failed.message and "does not exist" in failed.message and "unchanged" in failed.message
    assert (cfg.venv / RECORD_NAME).read_text() == before and not broken.new_venv.exists()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    still = subprocess.run([str(engine_executable(cfg.venv)), "--version"], capture_output=True, text=True,
                           timeout=120, env=env, check=False)  # fmt: skip
    assert still.returncode == 0 and still.stdout.strip() == f"geo-r1 {plugin_version()}"


# --------------------------------------------------------------------------------------------------
# The dialog
# --------------------------------------------------------------------------------------------------


def _wait(app, predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        app.processEvents()
        time.sleep(0.02)


def test_dialog_shows_the_python_found_and_cancels_an_install(qgis_app, tmp_path):
    from geo_r1_qgis.engine_control.setup.dialog import SetupDialog
    from geo_r1_qgis.engine_control.setup.installer import GpuInfo
    from geo_r1_qgis.settings import PluginSettings

    old = tmp_path / "engine-venv"
    old.mkdir()
    (old / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (old / "marker").write_text("the old engine")
    settings = PluginSettings(engine_venv=str(old))
    dialog = SetupDialog(None, settings=settings, gpu=GpuInfo("cpu", "nvidia-smi not found: the CPU build"))
    found = inst.find_interpreters()
    assert found and dialog.python_combo.count() == len(found)
    assert str(found[0].path) in dialog.python_combo.itemText(0)
    if found[0].usable:
        assert dialog.python_note.text().startswith(f"Found Python {'.'.join(map(str, found[0].version))}")
    else:  # e.g. the QGIS 3.40 chroot's python3, without ensurepip: the note says why and what to do
        assert dialog.python_note.text() == f"This Python cannot be used: {found[0].problem}."
    assert dialog.venv_edit.text() == str(old) and "without an install record" in dialog.status.text()
    assert dialog.torch_choice() == "cpu" and "nvidia-smi" in dialog.gpu_note.text()

    # a Python whose "-m venv" hangs: Install, then Cancel while it runs
    pid_file = tmp_path / "pid"
    hang = _fake_python(
        tmp_path / "python3",
        f"""
if "-c" in sys.argv:
    {PROBE_OK}
else:
    open({str(pid_file)!r}, "w").write(str(os.getpid()))
    time.sleep(300)""",
    )
    assert dialog.add_interpreter(hang).usable
    assert dialog.python_combo.currentData() == str(hang)
    task = dialog.start_install()
    assert task is not None and not dialog.cancel_button.isHidden() and dialog.cancel_button.isEnabled()
    assert not dialog.install_button.isEnabled()
    # the fake python creates the file before it writes its pid: wait for the pid itself (a fresh-clone 3.40 run read
    # the empty file in between)
    _wait(qgis_app, lambda: pid_file.exists() and pid_file.read_text().strip().isdigit())
    _wait(qgis_app, lambda: "create the venv" in dialog.status.text())
    pid = int(pid_file.read_text())
    dialog.cancel_button.click()
    _wait(qgis_app, lambda: dialog.task is None)
    assert dialog.last_ok is False
    assert "cancelled during step 2 of 8 (create the venv)" in dialog.status.text().lower()
    assert "previous engine venv is unchanged" in dialog.status.text()
    assert (old / "marker").read_text() == "the old engine" and not (tmp_path / "engine-venv.new").exists()
    _wait(qgis_app, lambda: _gone(pid), timeout=30)  # the hanging "pip" was killed
    assert dialog.install_button.isEnabled() and not dialog.cancel_button.isEnabled()
    assert "-- step 2/8: create the venv" in dialog.log_view.toPlainText()
    dialog.close()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie is gone too (killed, not yet reaped by its parent)
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return True


@pytest.mark.slow
def test_from_the_installed_venv_to_objects_on_the_map_through_the_gui(installed, qgis_app, tmp_path):
    """Issue 12's promise, through the plugin's own parts only: the venv the installer built (from the wheel),
    the engine started from it by the EngineManager (QProcess), and a run from the panel that puts objects on
    the map; then the engine is stopped."""
    from qgis.gui import QgsMapCanvas
    from qgis.PyQt.QtCore import QCoreApplication

    from geo_r1_qgis.engine_control import engine_process as ep
    from geo_r1_qgis.gui.panel import RUNS, GeoR1Dock
    from geo_r1_qgis.settings import PluginSettings

    cfg, _, _ = installed
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _real_engine as real

    model, samples = real.tiny_format_model(), tmp_path / "samples"
    proc = host_exec.run([str(VENV_GEO_R1), "sample-data", str(samples)], timeout=120, env=real.venv_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    old_app = QCoreApplication.applicationName()
    QCoreApplication.setApplicationName(f"geo-r1-journey-{os.getpid()}")  # never the user's QGIS settings
    manager = ep.EngineManager(settings=qgis_core.QgsSettings())
    shared_before, ep._shared = ep._shared, manager  # the plugin's one manager, as the panel's Start uses it
    canvas, dock = QgsMapCanvas(), None
    try:
        PluginSettings().with_values(output_gpkg=str(tmp_path / "results.gpkg")).save()
        start = ep.EngineStartConfig(program=engine_executable(cfg.venv), model=str(model),
                                     token_file=tmp_path / "engine.token", log_path=tmp_path / "engine.log",
                                     threads=1, start_timeout_s=300)  # fmt: skip
        assert manager.start(start)

        def wait(predicate, timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while not predicate():
                assert time.monotonic() < deadline, f"waited {timeout} s; engine log:\n{manager.log_lines[-20:]}"
                QCoreApplication.processEvents()
                time.sleep(0.02)

        wait(lambda: manager.state != ep.STARTING, 300)
        assert manager.state == ep.HEALTHY, manager.message
        # the panel uses the engine just started; the user's engine URL stays as it was (issue 16, 3.3)
        assert ep.shared_endpoint() == (manager.url, tmp_path / "engine.token")
        assert PluginSettings.load().engine_url != manager.url

        raster = qgis_core.QgsRasterLayer(str(samples / "utm.tif"), "utm")
        qgis_core.QgsProject.instance().addMapLayer(raster)
        canvas.setDestinationCrs(raster.crs())
        canvas.setExtent(raster.extent())
        dock = GeoR1Dock(None, canvas=canvas)
        dock.raster_combo.setLayer(raster)
        dock.expression_combo.setEditText("all bright squares")
        dock.area_combo.setCurrentIndex(1)
        dock.tile_spin.setValue(224)
        entry = dock.start_run()
        assert entry is not None, dock.status_label.text()
        wait(lambda: dock.task is None, 300)
        assert entry.status == "done", entry.message
        layer = qgis_core.QgsProject.instance().mapLayer(entry.map_layer_id)
        assert layer.featureCount() >= 1
        assert {f["model"] for f in layer.getFeatures()} == {str(model)}
    finally:
        if manager.state not in (ep.STOPPED, ep.CRASHED):
            manager.stop()
            deadline = time.monotonic() + 120
            while manager.state != ep.STOPPED and time.monotonic() < deadline:
                QCoreApplication.processEvents()
                time.sleep(0.05)
        assert manager.state == ep.STOPPED
        ep._shared = shared_before
        RUNS.clear()
        qgis_core.QgsProject.instance().removeAllMapLayers()
        if dock is not None:
            dock.deleteLater()
        qgis_core.QgsSettings().clear()
        QCoreApplication.setApplicationName(old_app)
