"""The Geo-R1 panel's GUI figures: its load time, Run to the first feature on the map, Cancel to the task's end.

Runs under QGIS's Python with the offscreen platform, like the plugin's tests:

    QT_QPA_PLATFORM=offscreen OMP_NUM_THREADS=1 /usr/bin/python3 scripts/bench_panel.py --runs 3

A real engine (``.venv/bin/geo-r1 serve --threads 1`` with the format-trained tiny model from ``.cache``, built
by the test suites) and a sample raster (``geo-r1 sample-data``, utm.tif, 1024 x 1024). Each repetition:

- **load**: ``GeoR1Dock(None, canvas)`` built and shown, events processed (the first one also pays the imports);
- **Run to first feature**: ``start_run()`` to the first detections added to the map layer (the panel's own
  ``first_feature_s``), over the whole raster, 224 px tiles with 32 px overlap, "all bright squares";
- **Cancel to end**: the engine is frozen with SIGSTOP after the first committed batch, so the next request is
  held; 0.5 s later Cancel is pressed, and the time runs until the task has ended (the panel's ``task`` is
  None). SIGCONT afterwards.

The plugin's settings go to a throw-away QSettings application name, removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
GEO_R1 = ROOT / ".venv" / "bin" / "geo-r1"
EXPRESSION = "all bright squares"


def spin(predicate, timeout_s: float) -> None:
    from qgis.core import QgsApplication

    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout_s} s")
        QgsApplication.processEvents()
        time.sleep(0.005)


def pump(seconds: float) -> None:
    """Process events for ``seconds``."""
    end = time.monotonic() + seconds
    spin(lambda: time.monotonic() >= end, seconds + 5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def venv_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "QT_", "GDAL_", "PROJ_"))}
    return {**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


@contextlib.contextmanager
def engine(tmp: Path, model: Path):
    port = free_port()
    token = tmp / "engine.token"
    with open(tmp / "engine.log", "wb") as log:
        cmd = [str(GEO_R1), "serve", "--model", str(model), "--port", str(port), "--threads", "1",
               "--token-file", str(token), "--parent-pid", str(os.getpid())]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=venv_env())
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(url + "/health", timeout=2) as resp:  # nosec B310
                if resp.status == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"geo-r1 serve did not start; see {tmp / 'engine.log'}")
            time.sleep(0.25)
        yield proc, url, token
    finally:
        with contextlib.suppress(OSError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    models = sorted((ROOT / ".cache").glob("tiny-format-model-seed0-steps300-*"))
    if not models or not GEO_R1.exists():
        raise SystemExit("no tiny model in .cache or no .venv: run 'make setup' and the plugin tests once")
    from qgis.core import QgsApplication, QgsProject, QgsRasterLayer, QgsSettings
    from qgis.gui import QgsMapCanvas
    from qgis.PyQt.QtCore import QCoreApplication

    app = QgsApplication([], True)
    app.initQgis()
    QCoreApplication.setApplicationName(f"geo-r1-bench-{os.getpid()}")  # never the user's settings
    from geo_r1_qgis.gui.panel import RUNS, GeoR1Dock
    from geo_r1_qgis.settings import PluginSettings

    loads, firsts, cancels, runs = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp_name, engine(Path(tmp_name), models[-1]) as (proc, url, token):
        tmp = Path(tmp_name)
        subprocess.run([str(GEO_R1), "sample-data", str(tmp / "samples")], env=venv_env(), check=True,
                       capture_output=True, timeout=300)  # fmt: skip
        canvas = QgsMapCanvas()
        canvas.resize(800, 600)
        canvas.show()
        for run in range(args.runs):
            PluginSettings().with_values(engine_url=url, token_file=str(token), output_gpkg=str(tmp / f"r{run}.gpkg"),
                                         tile_size=224, overlap=32).save()  # fmt: skip
            raster = QgsRasterLayer(str(tmp / "samples" / "utm.tif"), "utm")
            QgsProject.instance().addMapLayer(raster)
            canvas.setDestinationCrs(raster.crs())
            canvas.setLayers([raster])
            canvas.setExtent(raster.extent())

            t0 = time.perf_counter()
            dock = GeoR1Dock(None, canvas=canvas)
            dock.show()
            QgsApplication.processEvents()
            loads.append(time.perf_counter() - t0)
            # opening the panel asks whether an engine answers; wait for that answer before Run, as a user does
            # (a status check in flight while a run starts can crash QGIS's Python: see BENCHMARKS.md)
            manager = getattr(dock.engine_box, "manager", None)
            if manager is not None:
                spin(lambda m=manager: m.state != "stopped", 10)
                pump(2.0)  # its adapter list follows

            def configure(tile: int, overlap: int, dock=dock, raster=raster) -> None:
                dock.raster_combo.setLayer(raster)
                dock.expression_combo.setEditText(EXPRESSION)
                dock.mode_combo.setCurrentIndex(dock.mode_combo.findData("all"))
                dock.area_combo.setCurrentIndex(dock.area_combo.findData("layer"))
                dock.tile_spin.setValue(tile)
                dock.overlap_spin.setValue(overlap)

            configure(224, 32)
            t0 = time.perf_counter()
            entry = dock.start_run()
            if entry is None:
                raise SystemExit(dock.status_label.text())
            spin(lambda dock=dock: dock.task is None, 300)
            if entry.status != "done" or entry.first_feature_s is None:
                raise SystemExit(f"the run ended {entry.status}: {entry.message}")
            runs.append(time.perf_counter() - t0)
            firsts.append(entry.first_feature_s)

            configure(84, 0)
            frozen: dict[str, float] = {}

            def freeze(_batch, frozen=frozen) -> None:
                if not frozen:
                    os.kill(proc.pid, signal.SIGSTOP)
                    frozen["at"] = time.monotonic()

            entry = dock.start_run()
            dock.task.batchCommitted.connect(freeze)
            try:
                spin(lambda frozen=frozen: bool(frozen), 300)
                pump(0.5)  # the next request is now held by the frozen engine
                t0 = time.perf_counter()
                dock.cancel_run()
                spin(lambda dock=dock: dock.task is None, 30)
                cancels.append(time.perf_counter() - t0)
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            if entry.status != "canceled":
                raise SystemExit(f"the cancelled run ended {entry.status}: {entry.message}")
            print(f"run {run + 1}: load {loads[-1] * 1000:.0f} ms, Run to first feature {firsts[-1]:.2f} s "
                  f"(whole run {runs[-1]:.2f} s), Cancel to end {cancels[-1] * 1000:.0f} ms", flush=True)  # fmt: skip
            dock.hide()
            dock.deleteLater()
            RUNS.clear()
            QgsProject.instance().removeAllMapLayers()
            QgsApplication.processEvents()
            time.sleep(1.0)  # let the thawed engine finish the abandoned request before the next repetition
        canvas.hide()
    QgsSettings().clear()

    def row(name: str, values: list[float], unit: str = "s", scale: float = 1.0) -> str:
        v = [x * scale for x in values]
        return f"| {name} | {statistics.median(v):.2f} {unit} | {min(v):.2f}–{max(v):.2f} {unit} |"

    print(f"\n| figure ({args.runs} runs) | median | range |\n| --- | --- | --- |")
    print(row("panel load (build + show), first with imports", loads[:1], "ms", 1000))
    if len(loads) > 1:
        print(row("panel load (build + show), later", loads[1:], "ms", 1000))
    print(row("Run to the first feature on the map", firsts))
    print(row("whole run (25 tiles of 224 px)", runs))
    print(row("Cancel to the task's end, engine frozen (SIGSTOP)", cancels, "ms", 1000))
    app.exitQgis()
    return 0


if __name__ == "__main__":
    sys.exit(main())
