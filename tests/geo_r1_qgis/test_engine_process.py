"""The engine from inside QGIS (``geo_r1_qgis/engine_control/engine_process.py``) on a real QgsApplication and
real engines.

Runs under QGIS's Python (``QT_QPA_PLATFORM=offscreen /usr/bin/python3 -m pytest``). The engine venv is the
repository's ``.venv``; the model is the format-trained tiny model (``tests/tiny_models.py``); the LoRA adapter is
made with peft in that venv. Every wait spins the Qt event loop, as QGIS would run it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

qgis_core = pytest.importorskip("qgis.core", reason="PyQGIS is not importable; run under /usr/bin/python3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import host_exec  # noqa: E402
from tiny_models import cached_build  # noqa: E402

pytestmark = [
    pytest.mark.qgis,
    pytest.mark.skipif(host_exec.remote(), reason="the engine manager starts the host's venv as its own child "
                                                  "process, which cannot run inside the QGIS 3.40 chroot"),
]  # fmt: skip

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
GEO_R1 = VENV_BIN / "geo-r1"
FORMAT_STEPS = 300
MODEL_ID = "Geo-R1/Geo-R1-3B-GRPO-REC-10shot"


def _venv_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny_model() -> Path:
    if not GEO_R1.is_file():
        pytest.skip(f"{GEO_R1} is missing: build the engine venv first (make setup)")

    def build(out: Path) -> None:
        proc = subprocess.run([str(GEO_R1), "tiny-model", str(out), "--learn-format", str(FORMAT_STEPS)],
                              capture_output=True, text=True, timeout=900, env=_venv_env(), check=False)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]

    return cached_build(f"tiny-format-model-seed0-steps{FORMAT_STEPS}", build=build)


LORA_SCRIPT = """
import sys, torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen2_5_VLForConditionalGeneration
torch.manual_seed(0)
model = Qwen2_5_VLForConditionalGeneration.from_pretrained(sys.argv[1])
config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
get_peft_model(model, config).save_pretrained(sys.argv[2])
"""


@pytest.fixture(scope="module")
def lora_dir(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "rec-lora"
    proc = subprocess.run([str(VENV_BIN / "python"), "-c", LORA_SCRIPT, str(tiny_model), str(out)],
                          capture_output=True, text=True, timeout=600, env=_venv_env(), check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def ep(qgis_app):
    from geo_r1_qgis.engine_control import engine_process

    return engine_process


@pytest.fixture()
def qsettings(qgis_app, tmp_path):
    from qgis.PyQt.QtCore import QSettings

    return qgis_core.QgsSettings(str(tmp_path / "qgis.ini"), QSettings.Format.IniFormat)


def spin(predicate, timeout_s: float = 240.0, what: str = "") -> None:
    """Run the Qt event loop until ``predicate()`` (a generous limit: a failure, not a timing assertion)."""
    from qgis.PyQt.QtCore import QCoreApplication

    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout_s} s for {what or predicate}")
        QCoreApplication.processEvents()
        time.sleep(0.02)


def _config(ep, tmp_path: Path, model: Path, **kw):
    return ep.EngineStartConfig(program=GEO_R1, model=str(model), token_file=tmp_path / "engine.token",
                                log_path=tmp_path / "engine.log", threads=1, start_timeout_s=300, **kw)  # fmt: skip


class Recorder:
    def __init__(self, manager) -> None:
        self.states: list[tuple[str, str]] = []
        self.countdown: list[int] = []
        self.lines: list[str] = []
        manager.stateChanged.connect(lambda s, m: self.states.append((s, m)))
        manager.countdown.connect(self.countdown.append)
        manager.logLines.connect(self.lines.extend)


def _call(fn, *args):
    """An asynchronous manager call, waited for with the event loop: (status, payload, error)."""
    out: list = []
    fn(*args, lambda *result: out.append(result))
    spin(lambda: bool(out), 300, getattr(fn, "__name__", "a reply"))
    return out[0]


# --------------------------------------------------------------------------------------------------
# The whole life of an engine the plugin starts
# --------------------------------------------------------------------------------------------------


def test_start_ground_switch_adapters_and_stop(ep, qsettings, tiny_model, lora_dir, tmp_path):
    from geo_r1_qgis.core.client import EngineClient, TileImage, read_token
    from geo_r1_qgis.settings import PluginSettings

    manager = ep.EngineManager(settings=qsettings)
    rec = Recorder(manager)
    assert manager.start(_config(ep, tmp_path, tiny_model))
    assert manager.state == ep.STARTING and rec.countdown and rec.countdown[0] == 300
    spin(lambda: manager.state != ep.STARTING, what="the engine to answer")
    assert manager.state == ep.HEALTHY, manager.message
    assert [s for s, _ in rec.states] == [ep.STARTING, ep.HEALTHY]
    assert manager.info["model"] == str(tiny_model) and manager.info["threads"] == 1
    assert any("listening on" in line for line in rec.lines), "the engine's log reaches the panel"
    saved = PluginSettings.load(qsettings)  # the user's engine settings are not the started engine's
    assert saved.engine_url == PluginSettings().engine_url and saved.token_file == ""
    assert manager.endpoint() == (manager.url, tmp_path / "engine.token")  # runs go to the started engine

    client = EngineClient(manager.url, read_token(tmp_path / "engine.token"), timeout_s=300)
    tile = TileImage.from_array(np.random.default_rng(0).integers(0, 256, (56, 56, 3), dtype=np.uint8))
    results = client.ground([tile], "all storage tanks", max_new_tokens=24)
    assert len(results) == 1 and results[0].raw_text

    status, payload, error = _call(manager.adapters)
    assert error is None and payload == {"active": None, "available": {}}
    status, payload, error = _call(manager.load_adapter, "rec-lora", str(lora_dir))
    assert error is None and "rec-lora" in payload["available"], error
    status, payload, error = _call(manager.load_adapter, "x", str(lora_dir / "missing"))
    assert status == 404 and "404" in error
    status, payload, error = _call(manager.activate_adapter, "rec-lora")
    assert error is None and payload["active"] == "rec-lora"
    assert client.info()["adapter"] == "rec-lora"
    spin(lambda: manager.info.get("adapter") == "rec-lora", 60, "/info after the switch")
    assert len(client.ground([tile], "all storage tanks", max_new_tokens=8)) == 1
    status, payload, error = _call(manager.activate_adapter, None)
    assert error is None and payload["active"] is None
    assert client.info()["adapter"] is None

    assert manager.stop()
    spin(lambda: manager.state == ep.STOPPED, 120, "the engine to stop")
    from qgis.PyQt.QtCore import QProcess

    assert manager.process.state() == QProcess.ProcessState.NotRunning
    assert manager.process.exitStatus() == QProcess.ExitStatus.NormalExit and manager.process.exitCode() == 0
    assert "shutdown requested over HTTP" in (tmp_path / "engine.log").read_text(), "stopped by the route, no signal"
    assert not any("SIGTERM" in line for line in manager.log_lines)


def test_a_killed_engine_is_detected_and_restarted(ep, qsettings, tiny_model, tmp_path):
    manager = ep.EngineManager(settings=qsettings)
    manager.start(_config(ep, tmp_path, tiny_model))
    spin(lambda: manager.state != ep.STARTING, what="the engine to answer")
    assert manager.state == ep.HEALTHY, manager.message
    first_pid = manager.pid
    os.kill(first_pid, signal.SIGKILL)
    spin(lambda: manager.state != ep.HEALTHY, 60, "the crash to be noticed")
    assert manager.state == ep.CRASHED
    assert "was killed" in manager.message and "Last lines" in manager.message
    manager.restart()
    spin(lambda: manager.state not in (ep.CRASHED, ep.STARTING), what="the restarted engine")
    assert manager.state == ep.HEALTHY and manager.pid != first_pid
    manager.stop_for_unload()  # what the plugin's unload does: waits, since the event loop may be gone
    assert not manager.owns_engine() and manager.state == ep.STOPPED


def test_a_start_that_never_answers_gives_up_after_its_timeout(ep, qsettings, tmp_path):
    fake = tmp_path / "geo-r1"
    fake.write_text("#!/bin/sh\necho loading forever\nexec sleep 600\n")
    fake.chmod(0o755)
    manager = ep.EngineManager(settings=qsettings)
    rec = Recorder(manager)
    manager.start(ep.EngineStartConfig(program=fake, model="m", token_file=tmp_path / "t", log_path=tmp_path / "l",
                                       start_timeout_s=2))  # fmt: skip
    spin(lambda: manager.state != ep.STARTING, 60, "the start timeout")
    assert manager.state == ep.CRASHED and "did not answer within 2 s" in manager.message
    assert "loading forever" in manager.message  # the last log lines come with it
    assert rec.countdown[0] == 2 and rec.countdown[-1] == 0
    spin(lambda: not manager.owns_engine(), 30, "the stuck process to be killed")


# --------------------------------------------------------------------------------------------------
# An engine the plugin did not start, and the status check
# --------------------------------------------------------------------------------------------------


@pytest.fixture()
def external(tiny_model, tmp_path):
    from geo_r1_qgis.engine_control.engine_process import free_port

    port = free_port()
    token_file = tmp_path / "ext" / "engine.token"
    log = open(tmp_path / "ext.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([str(GEO_R1), "serve", "--model", str(tiny_model), "--threads", "1", "--port", str(port),
                             "--token-file", str(token_file)], stdout=log, stderr=subprocess.STDOUT,
                            env=_venv_env())  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    deadline = time.monotonic() + 240
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):  # nosec B310 (loopback)
                break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "ext.log").read_text()[-2000:]
            time.sleep(0.25)
    yield proc, url, token_file
    os.kill(proc.pid, signal.SIGCONT)
    proc.terminate()
    proc.wait(timeout=60)
    log.close()


def _probed_manager(ep, qsettings, external) -> tuple[object, list[bool]]:
    """A manager whose settings point at the ``external`` engine, after its probe answered: (manager, found)."""
    from geo_r1_qgis.settings import PluginSettings

    _, url, token_file = external
    PluginSettings().with_values(engine_url=url, token_file=str(token_file)).save(qsettings)
    manager = ep.EngineManager(settings=qsettings)
    found: list[bool] = []
    manager.probe_external(found.append)
    spin(lambda: bool(found), 60, "the probe")
    return manager, found


def test_an_external_engine_is_reported_and_never_stopped(ep, qsettings, external):
    proc = external[0]
    manager, found = _probed_manager(ep, qsettings, external)
    assert found == [True] and manager.state == ep.EXTERNAL
    assert "the plugin never stops it" in manager.message and manager.info["model"]
    assert manager.stop() is False
    manager.stop_for_unload()
    _, payload, error = _call(manager.adapters)  # usable, only not ours to stop
    assert error is None and payload["active"] is None
    time.sleep(1.0)
    assert proc.poll() is None, "the plugin stopped an engine it did not start"


def test_an_answer_for_a_widget_closed_meanwhile_is_dropped_not_an_abort(ep, qsettings, external):
    """A panel closed while its GET /adapters was in flight: the answer used to call the deleted widget's
    method inside Qt's slot, which PyQt turns into an abort of QGIS (seen in the panel tests)."""
    from qgis.PyQt import sip
    from qgis.PyQt.QtCore import QObject

    calls: list = []

    class Widget(QObject):
        def answer(self, *result) -> None:
            calls.append(result)

    manager, found = _probed_manager(ep, qsettings, external)
    assert found == [True]
    gone, alive = Widget(), Widget()
    manager.adapters(gone.answer)
    sip.delete(gone)  # closed before the answer
    manager.adapters(alive.answer)
    spin(lambda: bool(calls), 60, "the living widget's answer")
    spin(lambda: not manager.http._inflight, 60, "both answers")
    assert len(calls) == 1 and calls[0][2] is None  # only the living one was called


def test_a_started_engine_leaves_the_users_settings_so_a_restart_finds_the_readme_engine(
    ep, qsettings, tiny_model, external, tmp_path
):
    """Issue 16, 3.3: Start in the panel rewrote the engine URL and token file to the started engine's random port;
    after a restart the engine the README starts (here on the settings' port) was not found, and fixing the URL in
    Settings left the panel saying "stopped"."""
    from qgis.PyQt import sip

    from geo_r1_qgis.gui.settings_dialog import SettingsDialog
    from geo_r1_qgis.settings import PluginSettings

    _proc, url, token_file = external
    PluginSettings().with_values(engine_url=url, token_file=str(token_file)).save(qsettings)
    manager = ep.EngineManager(settings=qsettings)
    manager.start(_config(ep, tmp_path / "own", tiny_model))
    spin(lambda: manager.state != ep.STARTING, what="the started engine")
    assert manager.state == ep.HEALTHY and manager.url != url, manager.message
    saved = PluginSettings.load(qsettings)
    assert (saved.engine_url, saved.token_file) == (url, str(token_file)), "the user's engine settings were changed"
    assert manager.endpoint() == (manager.url, tmp_path / "own" / "engine.token")
    manager.stop_for_unload()  # QGIS quits
    assert manager.endpoint() == (url, token_file)

    restarted = ep.EngineManager(settings=qsettings)  # the next QGIS session
    found: list[bool] = []
    restarted.probe_external(found.append)
    spin(lambda: bool(found), 60, "the probe")
    assert found == [True] and restarted.state == ep.EXTERNAL and restarted.url == url.rstrip("/")

    # Settings pointed elsewhere, then back: OK makes the engine line look again each time, and it agrees with
    # the menu's check
    nowhere = f"http://127.0.0.1:{ep.free_port()}"
    dialogs = []
    for target, state in ((nowhere, ep.STOPPED), (url, ep.EXTERNAL)):
        d = SettingsDialog(settings=qsettings, manager=restarted)
        dialogs.append(d)
        d.url_edit.setText(target)
        d.accept()
        spin(lambda state=state: restarted.state == state, 60, f"the engine line to say {state}")
        assert target in restarted.message, restarted.message
    checked: list = []
    restarted.recheck(lambda ok, text, info: checked.append((ok, text)))
    spin(lambda: bool(checked), 60, "the check")
    assert checked[0][0] is True and url in checked[0][1] and restarted.state == ep.EXTERNAL
    for d in dialogs:
        sip.delete(d)


_KEPT: list = []


def test_processing_left_without_an_engine_url_uses_the_engine_the_panel_started(
    ep, qsettings, tiny_model, tmp_path, monkeypatch
):
    """Issue 16, 3.3: once a started engine no longer rewrites the settings, Processing (ENGINE_URL empty) must still
    find it: the engine the plugin runs while it runs, else the settings' engine."""
    from qgis.core import QgsSettings

    from geo_r1_qgis.settings import PluginSettings

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _real_engine as real

    samples = tmp_path / "samples"
    proc = host_exec.run([str(GEO_R1), "sample-data", str(samples)], timeout=120, env=_venv_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    nowhere = f"http://127.0.0.1:{ep.free_port()}"
    saved = PluginSettings.load()
    down = PluginSettings().with_values(engine_url=nowhere, token_file=str(tmp_path / "own" / "engine.token"))
    down.save()
    down.save(qsettings)  # the manager's settings (QGIS's own in the plugin; a private file here)
    manager = ep.EngineManager(settings=qsettings)
    monkeypatch.setattr(ep, "_shared", manager)
    session = real.ProcessingSession()
    try:
        manager.start(_config(ep, tmp_path / "own", tiny_model))
        spin(lambda: manager.state != ep.STARTING, what="the started engine")
        assert manager.state == ep.HEALTHY, manager.message
        params = {"INPUT": str(samples / "utm.tif"), "EXPRESSION": "all bright squares", "MODE": 1, "TILE_SIZE": 224,
                  "OVERLAP": 32, "MAX_NEW_TOKENS": 32, "OUTPUT": "TEMPORARY_OUTPUT"}  # fmt: skip
        out = session.run(params)  # no ENGINE_URL, no TOKEN_FILE, the settings' engine down: the started one
        assert out is not None and out.isValid()  # with the settings' engine it raises "not running at ..."
        assert {f["model"] for f in out.getFeatures()} <= {manager.info.get("model")}
        manager.stop_for_unload()
        spin(lambda: manager.state == ep.STOPPED, 60, "the engine to stop")
        with pytest.raises(qgis_core.QgsProcessingException, match=f"not running at {nowhere}"):
            session.run(params)  # stopped: back to the settings' engine, which is not there
    finally:
        session.close()
        manager.stop_for_unload()
        spin(lambda: manager.state in (ep.STOPPED, ep.CRASHED), 60, "the engine to stop")
        _KEPT.append(manager)  # never collected while Qt may still call its reply handlers (a later test crashed)
        saved.save()
        QgsSettings().sync()


def test_the_status_check_never_blocks_on_a_hung_engine(ep, qgis_app, external):
    from qgis.PyQt.QtCore import QTimer

    proc, url, token_file = external
    ticks: list[int] = []
    timer = QTimer()
    timer.setInterval(50)
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start()
    ok_check = ep.EngineStatusCheck(url, token_file, timeout_ms=5000)
    ok_check.start()
    spin(lambda: ok_check.result is not None, 60, "the check of a running engine")
    assert ok_check.result[0] is True and "model" in ok_check.result[1] and "adapter none" in ok_check.result[1]
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        check = ep.EngineStatusCheck(url, token_file, timeout_ms=1500)
        check.start()  # returns at once
        ticks.clear()
        spin(lambda: check.result is not None, 60, "the check of a hung engine")
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        timer.stop()
    ok, text, _ = check.result
    assert not ok and "no answer within 1.5 s" in text
    assert len(ticks) >= 3, "the event loop stood still while the engine hung"


def test_an_unreachable_engine_says_how_to_start_one_in_plain_text(ep, qgis_app, tmp_path):
    from qgis.gui import QgsMessageBarItem
    from qgis.PyQt.QtWidgets import QTextBrowser

    port = ep.free_port()
    check = ep.EngineStatusCheck(f"http://127.0.0.1:{port}", tmp_path / "none.token", timeout_ms=2000)
    check.start()
    spin(lambda: check.result is not None, 30, "the check")
    ok, text, _ = check.result
    assert not ok and f"127.0.0.1:{port}" in text
    assert "geo-r1 serve --model <model id or directory>" in text and "Set up the engine" in text
    # The message bar renders rich text: what it shows must still hold the <...> part.
    item = QgsMessageBarItem("Geo-R1", ep.message_bar_text(text), qgis_core.Qgis.MessageLevel.Warning)
    shown = " ".join(b.toPlainText() for b in item.findChildren(QTextBrowser))
    assert "geo-r1 serve --model <model id or directory>" in shown, shown


# --------------------------------------------------------------------------------------------------
# Diagnostics, the subprocess environment, downloads
# --------------------------------------------------------------------------------------------------


def test_diagnostics_hold_versions_settings_and_log_but_not_the_token(ep, qsettings, tmp_path):
    token = "s3cr3t-" + "a" * 36
    token_file = tmp_path / "engine.token"
    token_file.write_text(token)
    from geo_r1_qgis.settings import PluginSettings

    PluginSettings().with_values(token_file=str(token_file), engine_model="my-model").save(qsettings)
    manager = ep.EngineManager(settings=qsettings)
    manager.token_file = token_file
    manager._append_lines(["INFO engine: listening", f"DEBUG a line that leaked the token {token}"])
    text = manager.copy_diagnostics()
    assert token not in text and "<token removed>" in text
    assert "QGIS " in text and "Qt " in text and "Python " in text and '"engine_model": "my-model"' in text
    assert "INFO engine: listening" in text
    from qgis.PyQt.QtWidgets import QApplication

    assert QApplication.clipboard().text() == text


ENV_SCRIPT = """#!/usr/bin/env python3
import json, os, sys
print(json.dumps({"env": dict(os.environ), "argv": sys.argv[1:]}), flush=True)
"""


def test_the_engine_process_gets_a_cleaned_environment_and_its_arguments(ep, qsettings, tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "geo-r1"
    fake.parent.mkdir()
    fake.write_text(ENV_SCRIPT)
    fake.chmod(0o755)
    leaked = {"PYTHONPATH": "/qgis/python", "PYTHONHOME": "/qgis", "GDAL_DATA": "/qgis/gdal", "PROJ_LIB": "/qgis/proj",
              "QT_PLUGIN_PATH": "/qgis/qt", "GEO_R1_KEEP": "yes"}  # fmt: skip
    for key, value in leaked.items():
        monkeypatch.setenv(key, value)
    manager = ep.EngineManager(settings=qsettings)
    config = ep.EngineStartConfig(program=fake, model="some/model", processor="Qwen/Qwen2.5-VL-3B-Instruct",
                                  adapter="rec=/a/b", token_file=tmp_path / "t", log_path=tmp_path / "e.log",
                                  threads=3, port=5555)  # fmt: skip
    manager.start(config)
    spin(lambda: manager.state == ep.CRASHED, 30, "the fake engine to exit")  # it exits at once: a crash
    assert "exited with status 0 unexpectedly" in manager.message
    seen = json.loads(next(line for line in (tmp_path / "e.log").read_text().splitlines() if line.startswith("{")))
    env = seen["env"]
    for key in ("PYTHONPATH", "PYTHONHOME", "GDAL_DATA", "PROJ_LIB", "QT_PLUGIN_PATH", "QT_QPA_PLATFORM"):
        assert key not in env, key
    assert env["GEO_R1_KEEP"] == "yes" and env["PYTHONUNBUFFERED"] == "1"
    assert seen["argv"] == ["serve", "--model", "some/model", "--processor", "Qwen/Qwen2.5-VL-3B-Instruct",
                            "--adapter", "rec=/a/b", "--host", "127.0.0.1", "--port", "5555", "--token-file",
                            str(tmp_path / "t"), "--threads", "3", "--parent-pid", str(os.getpid())]  # fmt: skip
    # "keep running": no --parent-pid, so the engine outlives QGIS
    assert "--parent-pid" not in config.__class__(**{**config.__dict__, "keep_running": True}).arguments(1, None)


def test_start_refuses_a_missing_venv_and_an_empty_model(ep, qsettings, tmp_path):
    from geo_r1_qgis.core.errors import ConfigError

    with pytest.raises(ConfigError, match="Set up the engine"):
        ep.EngineStartConfig(program=tmp_path / "nowhere" / "geo-r1", model="m")
    with pytest.raises(ConfigError, match="choose a model"):
        ep.EngineStartConfig(program=GEO_R1, model=" ")
    manager = ep.EngineManager(settings=qsettings)  # settings with no model: a message, not an exception
    assert manager.start() is False and manager.state == ep.CRASHED


def test_download_without_the_network_says_so(ep, qgis_app, tmp_path):
    # A Hub endpoint nothing listens on: what a machine without the network sees, on any machine.
    download = ep.ModelDownload(VENV_BIN / "python", MODEL_ID, extra_env={
        "HF_ENDPOINT": f"http://127.0.0.1:{ep.free_port()}", "HF_HOME": str(tmp_path / "hf")})  # fmt: skip
    done: list = []
    download.finished.connect(lambda ok, msg: done.append((ok, msg)))
    download.start()
    spin(lambda: bool(done), 120, "the download to fail")
    ok, message = done[0]
    assert not ok and "cannot be reached" in message and "HF_HUB_OFFLINE=1" in message
    assert download.lines[0].startswith(f"downloading {MODEL_ID}")


def test_the_menus_engine_check_answers_in_the_message_bar_without_waiting(ep, qgis_app, monkeypatch, tmp_path):
    from qgis.gui import QgsMessageBar
    from qgis.PyQt.QtWidgets import QTextBrowser, QWidget

    from geo_r1_qgis import plugin as plugin_module
    from geo_r1_qgis.settings import PluginSettings

    url = f"http://127.0.0.1:{ep.free_port()}"
    monkeypatch.setattr(
        PluginSettings, "load", classmethod(lambda cls, s=None: cls(engine_url=url, token_file=str(tmp_path / "t")))
    )

    class Iface:
        def __init__(self) -> None:
            self.window = QWidget()
            self.bar = QgsMessageBar(self.window)

        def mainWindow(self):
            return self.window

        def messageBar(self):
            return self.bar

    iface = Iface()
    plugin = plugin_module.GeoR1Plugin(iface)
    plugin.check_engine()  # returns at once; the answer comes through the event loop
    spin(lambda: iface.bar.currentItem() is not None, 30, "the message")
    shown = " ".join(b.toPlainText() for b in iface.bar.currentItem().findChildren(QTextBrowser))
    assert url in shown and "geo-r1 serve --model <model id or directory>" in shown, shown


def test_requests_in_flight_survive_garbage_collection(ep, qgis_app):
    """A garbage collection while a request is in flight (a run's worker thread triggers them) must neither lose
    the callback nor crash: the replies are held until they finish."""
    import gc
    import http.server
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"status": "ok"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    http_ = ep.EngineHttp()
    answers: list = []

    def again(status, payload, error) -> None:
        answers.append((status, payload, error))
        if len(answers) < 20:
            http_.request("GET", url, "/health", again)

    try:
        http_.request("GET", url, "/health", again)
        from qgis.PyQt.QtCore import QCoreApplication

        deadline = time.monotonic() + 60
        while len(answers) < 20 and time.monotonic() < deadline:
            QCoreApplication.processEvents()
            gc.collect()
        assert len(answers) == 20, answers
        assert all(a == (200, {"status": "ok"}, None) for a in answers), answers[:3]
        assert not http_._inflight
    finally:
        server.shutdown()
