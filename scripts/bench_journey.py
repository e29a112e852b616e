"""The few-shot journey a user makes in QGIS (issue 19 §4), as a benchmark: draw, fine-tune, before and after.

    QT_QPA_PLATFORM=offscreen /usr/bin/python3 scripts/bench_journey.py [--minutes 12] [--boxes 10] [--test-boxes 5]
        [--category building] [--expression building] [--set NAME=VALUE ...] [--keep DIR]

QGIS's own Python (3.22 on the host), headless. Two sample scenes the sample model never saw (``geo-r1 sample-data``
seeds 9100 and 9101, in the engine venv); one real ``geo-r1 serve`` with the project's sample model
(``resources/sample_model``, one thread) and its own ``--jobs-dir``. Then, as a user would:

1. the annotation dock's box tool on a map canvas: ``--boxes`` boxes dragged (QgsMapMouseEvents: press, move,
   release) around that many ``--category`` objects of the first scene, each answered in the dock's dialog
   (expression, category, split train), and ``--test-boxes`` on the second scene marked test; Save;
2. the panel's Fine-tune section on that file: GRPO (the recipe's own settings unless ``--set`` overrides one, as
   the section's ``training_options`` do), a budget of ``--minutes`` minutes, the chip the model serves; Fine-tune
   clicked, the job watched to its end;
3. the job's own evaluation of the base model against the adapter on the test boxes (Geo-R1's REC metrics
   through ``train/evaluate.py``), read from the panel's record and printed with the wall times.

The category the sample model does worst on is buildings (it was pretrained on storage tanks only: BENCHMARKS.md,
"Sample model"). The job's process gets half the cores (one here); the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "geo_r1_qgis"))

log = logging.getLogger("bench_journey")

TRAIN_SEED, TEST_SEED = 9100, 9101  # scenes the sample model never saw (it trained on seeds 0-199)


def _option(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set takes NAME=VALUE, got {text!r}")
    return name, json.loads(value) if value[:1] in "0123456789-[{tf" else value


def _scene(rx, root: Path, seed: int) -> Path:
    out = root / f"scene{seed}"
    proc = rx.host_exec.run([str(rx.GEO_R1), "sample-data", str(out), "--seed", str(seed)], timeout=300,
                            env=rx.venv_env())  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"geo-r1 sample-data failed:\n{proc.stdout}\n{proc.stderr}")
    return out / "utm.tif"


def _draw(dock, canvas, raster, truth: Path, category: str, n: int, answer: dict) -> int:
    """Drag a box around each of the first ``n`` ``category`` objects of ``truth`` with the dock's box tool."""
    from qgis.core import QgsPointXY
    from test_annotations import _drag

    from geo_r1_qgis.core.truth import read_truth

    objects = read_truth(truth, category)[:n]
    if len(objects) < n:
        raise SystemExit(f"{truth} has {len(objects)} {category} objects, fewer than the {n} asked for")
    dock.start_annotating(raster)
    to_px = canvas.getCoordinateTransform()
    for obj in objects:
        xs, ys = [p[0] for p in obj.ring], [p[1] for p in obj.ring]
        pad = 0.08 * max(max(xs) - min(xs), max(ys) - min(ys))  # a hand-drawn box is a little loose
        a = to_px.transform(QgsPointXY(min(xs) - pad, max(ys) + pad))
        b = to_px.transform(QgsPointXY(max(xs) + pad, min(ys) - pad))
        _drag(dock, canvas, (round(a.x()), round(a.y())), (round(b.x()), round(b.y())), **answer)
    return len(objects)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=int, default=12, help="the Fine-tune budget in minutes (default %(default)s)")
    ap.add_argument("--boxes", type=int, default=10, help="train boxes drawn (default %(default)s)")
    ap.add_argument("--test-boxes", type=int, default=5, help="test boxes drawn on the other scene")
    ap.add_argument("--category", default="building", help="the scenes' category boxed (default %(default)s)")
    ap.add_argument("--expression", default="building", help="what each box is said to show")
    ap.add_argument("--set", dest="options", type=_option, action="append", default=[],
                    help="a training option beyond the recipe's, NAME=VALUE (e.g. learning_rate=1e-4)")  # fmt: skip
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: a temp one)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import _real_engine as rx
    from _real_engine import spin
    from qgis.core import QgsApplication

    app = QgsApplication([], True)
    app.initQgis()
    from qgis.core import QgsProject, QgsRasterLayer
    from qgis.gui import QgsMapCanvas
    from qgis.PyQt.QtCore import QCoreApplication

    from geo_r1_qgis.gui.annotation_dock import AnnotationDock
    from geo_r1_qgis.gui.panel import GeoR1Dock
    from geo_r1_qgis.settings import PluginSettings

    QCoreApplication.setApplicationName(f"geo-r1-bench-journey-{os.getpid()}")  # never a user's QGIS settings
    rx.need_venv()
    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="bench-journey-")
    root = args.keep or Path(tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    rasters = {seed: _scene(rx, root, seed) for seed in (TRAIN_SEED, TEST_SEED)}
    (root / "engine").mkdir(exist_ok=True)
    eng = rx.Engine(root / "engine", rx.SAMPLE_MODEL, extra=("--threads", "1", "--jobs-dir", str(root / "jobs")))
    try:
        gpkg = root / "journey.gpkg"
        PluginSettings().with_values(engine_url=eng.url, token_file=str(eng.token_file), annotation_gpkg=str(gpkg),
                                     output_gpkg=str(root / "results.gpkg")).save()  # fmt: skip
        layers = {}
        for seed, path in rasters.items():
            layers[seed] = QgsRasterLayer(str(path), f"scene{seed}")
            QgsProject.instance().addMapLayer(layers[seed])
        canvas = QgsMapCanvas()
        canvas.resize(800, 800)
        canvas.setDestinationCrs(layers[TRAIN_SEED].crs())
        canvas.setLayers(list(layers.values()))
        canvas.setExtent(layers[TRAIN_SEED].extent())
        canvas.show()
        app.processEvents()

        # 1. annotate with the box tool
        t0 = time.perf_counter()
        dock = AnnotationDock(None, canvas)
        dock.open_file(gpkg)
        answer = {"expression": args.expression, "category": args.category}
        drawn = {"train": _draw(dock, canvas, layers[TRAIN_SEED], rasters[TRAIN_SEED].with_suffix(".objects.geojson"),
                                args.category, args.boxes, {**answer, "split": "train"}),
                 "test": _draw(dock, canvas, layers[TEST_SEED], rasters[TEST_SEED].with_suffix(".objects.geojson"),
                               args.category, args.test_boxes, {**answer, "split": "test"})}  # fmt: skip
        if not dock.save():
            raise SystemExit(f"the annotations were not saved: {dock.status_label.text()}")
        counts = dock.counts()
        issues = [str(i) for i in dock.check()]
        log.info("annotated in %.1f s: %s; the dock's checks: %s", time.perf_counter() - t0, counts, issues or "none")
        dock.stop_annotating()

        # 2. fine-tune from the panel
        panel = GeoR1Dock(None, canvas=canvas)
        manager = panel.engine_box.manager
        manager.probe_external()
        if not spin(lambda: manager.state == "external" and bool(manager.info), 60):
            raise SystemExit(f"the panel did not find the engine: {manager.message}")
        panel.set_annotation_file(dock.annotation_path())
        ft = panel.finetune
        ft.recipe_combo.setCurrentIndex(ft.recipe_combo.findData("grpo"))
        ft.budget_unit.setCurrentIndex(ft.budget_unit.findData("minutes"))
        ft.budget_spin.setValue(args.minutes)
        ft.name_edit.setText(f"journey {args.category}")
        ft.training_options = dict(args.options)
        started: list[dict] = []
        ft.jobStarted.connect(started.append)
        t_click = time.perf_counter()
        ft.finetune_button.click()
        if not spin(lambda: bool(started) or ft.finetune_button.isEnabled(), 120) or not started:
            raise SystemExit(f"the job did not start: {ft.message_label.text()}")
        marks: dict[str, float] = {}

        def ended() -> bool:
            state = ft.record.get("state", "")
            marks.setdefault(state, time.perf_counter() - t_click)
            if (ft.record.get("step") or 0) >= 1:
                marks.setdefault("first step", time.perf_counter() - t_click)
            return state in ("done", "failed", "cancelled")

        if not spin(ended, 60 * args.minutes + 1800, step=0.5):
            raise SystemExit(f"the job did not end: {ft.state_label.text()}")
        wall = time.perf_counter() - t_click
        record = dict(ft.record)
        if record["state"] != "done":
            raise SystemExit(f"the job ended {record['state']}: {record.get('error')}\n"
                             + "\n".join(record.get("log_tail") or []))  # fmt: skip
        rows = [[ft.metrics_table.item(r, c).text() for c in range(3)] for r in range(ft.metrics_table.rowCount())]
        metrics = record.get("metrics") or {}
        steps = record.get("step")
        summary = {
            "command": " ".join(sys.argv), "category": args.category, "expression": args.expression,
            "boxes": drawn, "counts": counts, "dock_checks": issues, "minutes": args.minutes,
            "options": dict(args.options), "steps": steps, "eval_split": record.get("eval_split"),
            "marks_s": marks, "job_wall_s": wall, "whole_s": time.perf_counter() - t_all,
            "panel_rows": rows, "report": record.get("report"), "load_1min": os.getloadavg()[0],
            **{name: {k: m.get(k) for k in ("acc@0.5", "acc@0.7", "mean_iou", "format_ok", "failed_parses", "counts")}
               for name, m in metrics.items()},
        }  # fmt: skip
        out = root / "journey.json"
        out.write_text(json.dumps(summary, indent=1, default=str))
        print(json.dumps(summary, indent=1, default=str))
        for name in ("base", "adapter"):
            m = metrics.get(name) or {}
            print(f"{name}: Acc@0.5 {m.get('acc@0.5', {}).get('overall')}  mIoU {m.get('mean_iou')}  "
                  f"format ok {m.get('format_ok')} %")  # fmt: skip
        print(f"{steps} GRPO steps in a {args.minutes} min budget; Fine-tune click to done {wall:.0f} s; "
              f"load {summary['load_1min']:.1f}")  # fmt: skip
        if ft.watcher is not None:
            ft.watcher.stop()
        panel.deleteLater()
        dock.deleteLater()
        canvas.deleteLater()
        QgsProject.instance().removeAllMapLayers()
        app.processEvents()
    finally:
        eng.stop()
        if tmp is not None:
            tmp.cleanup()
    app.exitQgis()
    return 0


if __name__ == "__main__":
    sys.exit(main())
