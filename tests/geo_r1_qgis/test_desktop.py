"""The Geo-R1 panel in Debian's real QGIS desktop under Xvfb, used as a user would, against a real engine.

``make plugin-zip`` is unzipped into a fresh QGIS profile (never the user's: the profile, HOME and the XDG
folders are all under the test's temporary folder) and enabled there, with the plugin's settings pointing at
a real ``geo-r1 serve`` with the tiny format-trained model. ``qgis`` starts on a private Xvfb display with a
sample raster and ``desktop_driver.py`` (``--code``), which clicks the toolbar button, types the expression,
clicks Run, waits for the run, clicks the best result and saves a screenshot of the screen.

The screenshot goes to the test's temporary folder; ``GEO_R1_SCREENSHOT=docs/panel.png`` (``make
panel-screenshot``) writes the README's copy instead. Host QGIS only: inside the QGIS 3.40 chroot there is no
desktop and no X server, so the test says so and skips.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("qgis.core", reason="PyQGIS is not importable; run under /usr/bin/python3")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_processing as tp

pytestmark = [pytest.mark.qgis, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).resolve().parent / "desktop_driver.py"
PROFILE = "geo-r1-test"
EXPRESSION = "all bright squares"
TIMEOUT_S = 540  # the whole QGIS session; each step in the driver has its own, shorter limit
SCREEN = "1600x1000x24"


def _need_desktop() -> None:
    if tp.host_exec.remote():
        pytest.skip("the desktop test runs on the host's QGIS only (no X server in the QGIS 3.40 chroot)")
    missing = [exe for exe in ("qgis", "Xvfb", "xdotool") if shutil.which(exe) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: run 'make setup' (apt-get install qgis xvfb xdotool)")


def _kill_group(proc: subprocess.Popen, timeout: float = 15) -> None:
    """End a process this test started in its own session, and everything it started."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def _xvfb(log: Path):
    """A private X display (Xvfb picks a free number and writes it to a pipe)."""
    read_fd, write_fd = os.pipe()
    with open(log, "wb") as out:
        proc = subprocess.Popen(["Xvfb", "-displayfd", str(write_fd), "-screen", "0", SCREEN, "-nolisten", "tcp"],
                                stdout=out, stderr=subprocess.STDOUT, pass_fds=(write_fd,),
                                start_new_session=True)  # fmt: skip
    os.close(write_fd)
    try:
        deadline = time.monotonic() + 30
        number = b""
        os.set_blocking(read_fd, False)
        while not number.endswith(b"\n"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Xvfb did not start:\n{log.read_text(errors='replace')[-2000:]}")
            with contextlib.suppress(BlockingIOError):
                number += os.read(read_fd, 16)
            time.sleep(0.05)
        yield f":{number.decode().strip()}"
    finally:
        os.close(read_fd)
        _kill_group(proc)


def _profile(root: Path, zip_path: Path, engine, output_gpkg: Path) -> Path:
    """A fresh profile under ``root``: the plugin unzipped and enabled, its settings set."""
    profile = root / "profiles" / PROFILE
    plugins = profile / "python" / "plugins"
    plugins.mkdir(parents=True)
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(plugins)
    ini = profile / "QGIS" / "QGIS3.ini"
    ini.parent.mkdir(parents=True)
    ini.write_text(
        "[PythonPlugins]\ngeo_r1_qgis=true\n\n"
        f"[geo_r1]\nengine_url={engine.url}\ntoken_file={engine.token_file}\noutput_gpkg={output_gpkg}\n"
        "tile_size=224\noverlap=32\n\n"
        "[qgis]\ncheckVersion=false\nshowTips=false\n\n"
        # the results GeoPackage lies under /tmp, which QGIS counts as temporary and asks about on exit
        "[app]\naskToSaveMemoryLayers=false\n"
    )
    return profile


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    _need_desktop()
    tp._need_venv()
    eng = tp._Engine(tmp_path_factory.mktemp("desktop-engine"), tp._tiny_format_model(), extra=("--threads", "1"))
    yield eng
    eng.stop()


def test_the_panel_in_the_qgis_desktop(engine, tmp_path):
    # the plugin as a user installs it
    make = subprocess.run(["make", "-s", "plugin-zip"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip
    assert make.returncode == 0, make.stdout + make.stderr
    zip_path = REPO / "dist" / "geo_r1_qgis.zip"
    samples = tmp_path / "samples"
    proc = tp.host_exec.run([str(tp.GEO_R1), "sample-data", str(samples)], timeout=120, env=tp._venv_env())
    assert proc.returncode == 0, f"geo-r1 sample-data failed:\n{proc.stdout}\n{proc.stderr}"
    output_gpkg = tmp_path / "results.gpkg"
    _profile(tmp_path / "qgis", zip_path, engine, output_gpkg)
    screenshot = Path(os.environ.get("GEO_R1_SCREENSHOT") or tmp_path / "panel.png").resolve()
    status_path = tmp_path / "status.json"
    config = tmp_path / "driver.json"
    config.write_text(json.dumps({"expression": EXPRESSION, "screenshot": str(screenshot),
                                  "status": str(status_path), "timeout_s": TIMEOUT_S - 60}))  # fmt: skip
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QT_", "PYTHON", "XDG_"))}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), XDG_DATA_HOME=str(home / ".local/share"),
               XDG_CACHE_HOME=str(home / ".cache"), XDG_RUNTIME_DIR=str(tmp_path), GEO_R1_DESKTOP_CONFIG=str(config),
               QT_QPA_PLATFORM="xcb", LANG="C.UTF-8", LC_ALL="C.UTF-8")  # fmt: skip
    qgis_log = tmp_path / "qgis.log"
    with _xvfb(tmp_path / "xvfb.log") as display:
        env["DISPLAY"] = display
        cmd = ["qgis", "--profiles-path", str(tmp_path / "qgis"), "--profile", PROFILE, "--nologo",
               "--noversioncheck", "--code", str(DRIVER), str(samples / "utm.tif")]  # fmt: skip
        with open(qgis_log, "wb") as out:
            qgis = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                                    start_new_session=True)  # fmt: skip
        try:
            qgis.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        finally:
            _kill_group(qgis)
    log_text = qgis_log.read_text(errors="replace")
    assert status_path.exists(), f"the driver wrote no status; QGIS said:\n{log_text[-4000:]}"
    status = json.loads(status_path.read_text())
    print(json.dumps({k: v for k, v in status.items() if k not in ("messages", "message_log_tabs")}, indent=1))
    assert status["ok"], f"{status.get('error')}\nat step {status['step']}\n{status['log']}\n{log_text[-3000:]}"

    # the plugin loaded and ran without a Python error
    assert "Python error" not in status["message_log_tabs"], status["message_log_tabs"]["Python error"]
    errors = [m for m in status["messages"] if m["tag"] == "Python error" or "Traceback" in m["text"]]
    assert not errors, errors
    assert "Traceback" not in log_text, log_text[-4000:]
    # the run finished with features in the Geo-R1 group, above the raster, seen while it ran
    assert status["run_status"] == "done", status["run_message"]
    assert status["features"] >= 1, status["group_layers"]
    assert status["group_above_raster"]
    assert status["first_feature_while_running"] is True
    assert status["opened_by"].startswith("toolbar button")
    assert status.get("selected_result"), "no result was listed to click"
    # the engine started outside QGIS is shown as such, and QGIS quit by itself (Project > Exit QGIS)
    assert status.get("engine_state", "external") == "external", status.get("engine_state")
    assert not status_path.with_suffix(".exit.png").exists(), "QGIS did not quit within 15 s of Exit (see the png)"
    # the GeoPackage the panel wrote
    assert output_gpkg.exists()
    # the screenshot: the screen's size, and not blank
    assert screenshot.exists() and status["screenshot_size"] == [1600, 1000]
    _assert_not_blank(screenshot)


def _assert_not_blank(path: Path) -> None:
    from qgis.PyQt.QtGui import QImage

    img = QImage(str(path))
    assert not img.isNull(), path
    greys = []
    for y in range(0, img.height(), 10):
        for x in range(0, img.width(), 10):
            c = img.pixelColor(x, y)
            greys.append(0.299 * c.red() + 0.587 * c.green() + 0.114 * c.blue())
    mean = sum(greys) / len(greys)
    variance = sum((g - mean) ** 2 for g in greys) / len(greys)
    assert variance > 100.0, f"the screenshot looks blank (grey variance {variance:.1f})"
    assert len({round(g) for g in greys}) > 50, "the screenshot has almost no distinct shades"
