"""What the plugin tests share to run against a real engine: the engine venv's paths and environment, the
format-trained tiny model, a ``geo-r1 serve`` process, and Processing with the Geo-R1 provider.

Test modules import this module (``sys.path`` holds this folder) instead of one another's private helpers.
Stdlib and pytest only at import: QGIS's Python has no httpx, and PyQGIS is imported where it is used.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import host_exec  # the engine venv's commands, also from inside the QGIS 3.40 chroot
from tiny_models import cached_build, cached_sam_build

__all__ = [
    "FORMAT_STEPS",
    "GEO_R1",
    "REPO",
    "SAMPLE_MODEL",
    "SHARED",
    "UNSEEN_SEED",
    "VENV_BIN",
    "Engine",
    "FakeIface",
    "ProcessingSession",
    "feature_rings",
    "free_port",
    "host_exec",
    "need_venv",
    "panel_dock",
    "sample_data",
    "spin",
    "tiny_format_model",
    "tiny_sam",
    "venv_env",
]  # fmt: skip

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
GEO_R1 = VENV_BIN / "geo-r1"
SHARED = REPO.parent / "shared" / "data"
SAMPLE_MODEL = REPO / "resources" / "sample_model"
FORMAT_STEPS = 300
QGIS_PLUGINS = "/usr/share/qgis/python/plugins"
UNSEEN_SEED = 9100  # the sample model trained on seeds 0-199 (tests/engine/test_end_to_end.py uses the same)


def venv_env() -> dict[str, str]:
    """This environment for the engine venv's commands: no PYTHONPATH/PYTHONHOME of QGIS's Python, offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def need_venv() -> None:
    if not GEO_R1.is_file():
        pytest.skip(f"{GEO_R1} is missing: build the engine venv first (make setup)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_sam() -> Path:
    """The random tiny SAM 2 (``geo-r1 tiny-sam`` in the engine venv), cached like the tiny model."""

    def build(out: Path) -> None:
        proc = host_exec.run([str(GEO_R1), "tiny-sam", str(out)], timeout=300, env=venv_env())
        assert proc.returncode == 0, f"geo-r1 tiny-sam failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"

    return cached_sam_build("tiny-sam-seed0", build=build)


def tiny_format_model() -> Path:
    """The format-trained tiny model, the same cache entry the engine suite uses (built once, by whichever runs
    first; here through ``geo-r1 tiny-model`` in the engine venv, since QGIS's Python has no torch)."""

    def build(out: Path) -> None:
        proc = host_exec.run([str(GEO_R1), "tiny-model", str(out), "--learn-format", str(FORMAT_STEPS)],
                             timeout=600, env=venv_env())  # fmt: skip
        assert proc.returncode == 0, f"geo-r1 tiny-model failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"

    return cached_build(f"tiny-format-model-seed0-steps{FORMAT_STEPS}", build=build)


class Engine:
    """A real ``geo-r1 serve`` on a free port, with its token file and log in ``workdir`` (stdlib HTTP only)."""

    def __init__(self, workdir: Path, model: Path, extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token_file = workdir / "engine.token"
        self.log_path = workdir / "engine.log"
        cmd = [str(GEO_R1), "serve", "--model", str(model), "--port", str(self.port),
               "--token-file", str(self.token_file), *extra]  # fmt: skip
        self.proc = host_exec.spawn(cmd, log_path=self.log_path, env=venv_env())
        deadline = time.monotonic() + 180
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"geo-r1 serve did not start:\n{self.log_tail()}")
            time.sleep(0.25)
        self.token = self.token_file.read_text().strip()
        self.info = self._get("/info")

    def _get(self, path: str) -> dict:
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as resp:  # nosec B310 (our own loopback URL)
            return json.loads(resp.read())

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:  # nosec B310
                return resp.status == 200
        except OSError:
            return False

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        self.proc.stop(timeout=30)


class ProcessingSession:
    """Processing and the Geo-R1 provider on the session's QgsApplication (conftest.py); layers die before
    the session ends, since they must be gone before exitQgis()."""

    def __init__(self) -> None:
        from qgis.core import QgsApplication

        self.layers: list = []
        if QGIS_PLUGINS not in sys.path:
            sys.path.append(QGIS_PLUGINS)
        from processing.core.Processing import Processing

        Processing.initialize()
        from geo_r1_qgis.processing_provider import GeoR1Provider

        self.provider = GeoR1Provider()
        assert QgsApplication.processingRegistry().addProvider(self.provider)

    def raster(self, path: Path):
        from qgis.core import QgsRasterLayer

        layer = QgsRasterLayer(str(path), path.stem)
        self.layers.append(layer)
        return layer

    def run(self, params: dict, **overrides):
        import processing
        from qgis.core import QgsProcessingContext, QgsProcessingFeedback, QgsProcessingUtils

        context = QgsProcessingContext()
        feedback = QgsProcessingFeedback()
        result = processing.run("geor1:ground", {**params, **overrides}, context=context, feedback=feedback)
        out = result["OUTPUT"]
        if isinstance(out, str):
            out = QgsProcessingUtils.mapLayerFromString(out, context, allowLoadingNewLayers=True)
            out = out.clone() if out is not None else None
        self.layers.append(out)
        return out

    def close(self) -> None:
        from qgis.core import QgsApplication

        QgsApplication.processingRegistry().removeProvider(self.provider)
        self.layers.clear()  # layers must die before exitQgis(), or the interpreter segfaults at exit
        gc.collect()


def feature_rings(layer) -> list[list[tuple[float, float]]]:
    """Each feature's outer ring, in the layer's CRS."""
    rings = []
    for f in layer.getFeatures():
        geom = f.geometry()
        parts = geom.asMultiPolygon() if geom.isMultipart() else [geom.asPolygon()]
        rings += [[(p.x(), p.y()) for p in part[0]] for part in parts]
    return rings


def sample_data(out: Path, *args: str) -> Path:
    """``geo-r1 sample-data OUT ARGS`` in the engine venv; returns ``out``."""
    need_venv()
    proc = host_exec.run([str(GEO_R1), "sample-data", str(out), *args], timeout=120, env=venv_env())
    assert proc.returncode == 0, f"geo-r1 sample-data failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def spin(until, timeout: float = 120.0, step: float = 0.02) -> bool:
    """Run the Qt event loop until ``until()`` is true (False after ``timeout`` seconds)."""
    from qgis.core import QgsApplication

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        QgsApplication.processEvents()
        if until():
            return True
        time.sleep(step)
    return bool(until())


class FakeIface:
    """QGIS's interface (``iface``) as far as the plugin uses it, built from QGIS's own widgets: a main window for the
    docks, the canvas, a message bar, a layer tree view whose current layer is the active layer (as in QGIS:
    QgisApp::setActiveLayer sets the view's current layer), and the toolbar and Raster-menu entries it was given."""

    def __init__(self, canvas) -> None:
        from qgis.core import QgsLayerTreeModel, QgsProject
        from qgis.gui import QgsLayerTreeView, QgsMessageBar
        from qgis.PyQt.QtWidgets import QMainWindow

        self.window = QMainWindow()
        self._canvas, self._bar = canvas, QgsMessageBar()
        self.view = QgsLayerTreeView()
        self.model = QgsLayerTreeModel(QgsProject.instance().layerTreeRoot())
        self.view.setModel(self.model)
        self.toolbar: list = []
        self.menu: list = []

    def mainWindow(self):
        return self.window

    def mapCanvas(self):
        return self._canvas

    def messageBar(self):
        return self._bar

    def layerTreeView(self):
        return self.view

    def setActiveLayer(self, layer) -> bool:
        self.view.setCurrentLayer(layer)
        return True

    def activeLayer(self):
        return self.view.currentLayer()

    def addDockWidget(self, area, dock) -> None:
        self.window.addDockWidget(area, dock)

    def removeDockWidget(self, dock) -> None:
        self.window.removeDockWidget(dock)

    def addToolBarIcon(self, action) -> None:
        self.toolbar.append(action)

    def removeToolBarIcon(self, action) -> None:
        self.toolbar.remove(action)

    def addPluginToRasterMenu(self, name, action) -> None:
        self.menu.append(action)

    def removePluginRasterMenu(self, name, action) -> None:
        self.menu.remove(action)


def panel_dock(engine, canvas, tmp_path: Path, **settings):
    """A ``dock`` fixture's body, ``yield from panel_dock(engine, canvas, tmp_path)``: the panel on ``engine``
    (with ``settings`` over the defaults, results in ``tmp_path``), and after the test its run cancelled, its runs
    forgotten and the map emptied."""
    from qgis.core import QgsProject

    from geo_r1_qgis.gui.panel import RUNS, GeoR1Dock
    from geo_r1_qgis.settings import PluginSettings

    PluginSettings().with_values(engine_url=engine.url, token_file=str(engine.token_file),
                                 output_gpkg=str(tmp_path / "results.gpkg"), **settings).save()  # fmt: skip
    dock = GeoR1Dock(None, canvas=canvas)
    yield dock
    if dock.task is not None:
        dock.task.cancel()
        spin(lambda: dock.task is None, 30)
    RUNS.clear()
    QgsProject.instance().removeAllMapLayers()
    dock.deleteLater()
    gc.collect()
