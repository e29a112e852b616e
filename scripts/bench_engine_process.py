"""Engine start time to healthy, and the time from a kill to its detection, through the plugin's EngineManager.

Runs under QGIS's Python with the offscreen platform, like the plugin's tests:

    QT_QPA_PLATFORM=offscreen /usr/bin/python3 scripts/bench_engine_process.py --runs 3

The engine is the repository's .venv (``geo-r1 serve``, one thread) with the format-trained tiny model from
``.cache`` (built by the test suites), so the start time is the process, imports and server overhead, not
model weights. Times are wall clock, from ``start()`` to the healthy state, and from SIGKILL to the crashed
state, with the Qt event loop spinning as in QGIS.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def spin(predicate, timeout_s: float) -> None:
    from qgis.PyQt.QtCore import QCoreApplication

    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout_s} s")
        QCoreApplication.processEvents()
        time.sleep(0.005)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    models = sorted((ROOT / ".cache").glob("tiny-format-model-seed0-steps300-*"))
    if not models:
        raise SystemExit("no tiny model in .cache: run the plugin tests once (they build it)")
    from qgis.core import QgsApplication
    from qgis.PyQt.QtCore import QSettings

    app = QgsApplication([], False)
    app.initQgis()
    from qgis.core import QgsSettings

    from geo_r1_qgis.engine_control import engine_process as ep

    starts, detections = [], []
    with tempfile.TemporaryDirectory() as tmp:
        qs = QgsSettings(str(Path(tmp) / "qgis.ini"), QSettings.Format.IniFormat)
        manager = ep.EngineManager(settings=qs)
        for run in range(args.runs):
            config = ep.EngineStartConfig(program=ROOT / ".venv" / "bin" / "geo-r1", model=str(models[-1]),
                                          token_file=Path(tmp) / "engine.token", log_path=Path(tmp) / "engine.log",
                                          threads=1, start_timeout_s=300)  # fmt: skip
            t0 = time.perf_counter()
            manager.start(config)
            spin(lambda: manager.state != ep.STARTING, 300)
            if manager.state != ep.HEALTHY:
                raise SystemExit(manager.message)
            starts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            os.kill(manager.pid, signal.SIGKILL)
            spin(lambda: manager.state == ep.CRASHED, 60)
            detections.append(time.perf_counter() - t0)
            print(f"run {run + 1}: healthy after {starts[-1]:.2f} s, kill detected after "
                  f"{detections[-1] * 1000:.1f} ms", flush=True)  # fmt: skip
    print(f"start to healthy: median {statistics.median(starts):.2f} s (min {min(starts):.2f}, max {max(starts):.2f})")
    print(f"kill to crashed: median {statistics.median(detections) * 1000:.1f} ms (max {max(detections) * 1000:.1f})")
    app.exitQgis()
    return 0


if __name__ == "__main__":
    sys.exit(main())
