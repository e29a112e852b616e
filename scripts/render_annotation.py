"""Render the annotation dock and the Fine-tune section beside the map, headless (run with /usr/bin/python3).

    .venv/bin/geo-r1 sample-data /tmp/scene --seed 9100
    QT_QPA_PLATFORM=offscreen /usr/bin/python3 scripts/render_annotation.py /tmp/scene/utm.tif docs/annotate.png

What a user sees after drawing a few boxes: the raster on a map canvas with the annotation layer over it, the
annotation dock (its file, the boxes listed by category, the checks' messages) and the panel's Fine-tune section
filled with the same file. The boxes are drawn through the dock's own ``box_drawn`` (what the box tool calls on a
mouse release), around the first ``--boxes`` objects of each category in the raster's ``*.objects.geojson``
truth, as a user would drag them; the annotation file is written beside ``OUT`` (``OUT.gpkg``) and kept.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qgis.core import QgsApplication

log = logging.getLogger("render_annotation")

#: the categories drawn and the expression each box gets (as a user would type it in the dock's dialog)
EXPRESSIONS = {"tank": "storage tank", "building": "building"}


def _boxes(truth: Path, per_category: int) -> list[tuple[str, tuple[float, float, float, float]]]:
    from geo_r1_qgis.core.truth import read_truth

    out = []
    for category in EXPRESSIONS:
        for obj in read_truth(truth, category)[:per_category]:
            xs, ys = [p[0] for p in obj.ring], [p[1] for p in obj.ring]
            pad = 0.08 * max(max(xs) - min(xs), max(ys) - min(ys))  # a hand-drawn box is a little loose
            out.append((category, (min(xs) - pad, min(ys) - pad, max(xs) + pad, max(ys) + pad)))
    return out


def _wait_for_render(app, canvas) -> None:
    done: list[bool] = []
    canvas.mapCanvasRefreshed.connect(lambda: done.append(True))
    canvas.refresh()
    for _ in range(600):
        app.processEvents()
        if done and not canvas.isDrawing():
            return
        canvas.thread().msleep(20)
    log.warning("the map canvas did not finish drawing in 12 s; the image shows what it had")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("raster", type=Path, help="a raster with a *.objects.geojson truth file beside it")
    ap.add_argument("out", type=Path, help="the PNG to write")
    ap.add_argument("--boxes", type=int, default=6, help="boxes drawn per category (default: %(default)s)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    truth = args.raster.with_name(args.raster.stem + ".objects.geojson")
    if not truth.is_file():
        ap.error(f"{truth} is missing: make the raster with `geo-r1 sample-data DIR`, which writes it beside it")
    app = QgsApplication([], True)
    app.initQgis()
    from qgis.core import QgsProject, QgsRasterLayer, QgsRectangle
    from qgis.gui import QgsMapCanvas
    from qgis.PyQt.QtCore import QCoreApplication
    from qgis.PyQt.QtGui import QPainter, QPixmap
    from qgis.PyQt.QtWidgets import QVBoxLayout, QWidget

    from geo_r1_qgis.gui.annotation_dock import AnnotationChoice, AnnotationDock
    from geo_r1_qgis.gui.finetune_widget import FinetuneWidget

    QCoreApplication.setApplicationName(f"geo-r1-render-{os.getpid()}")  # never a user's QGIS settings
    raster = QgsRasterLayer(str(args.raster), args.raster.stem)
    if not raster.isValid():
        ap.error(f"{args.raster} is not a raster QGIS opens")
    QgsProject.instance().addMapLayer(raster)
    canvas = QgsMapCanvas()
    canvas.resize(820, 820)
    canvas.setDestinationCrs(raster.crs())
    canvas.show()
    gpkg = args.out.with_suffix(".gpkg")
    gpkg.unlink(missing_ok=True)
    dock = AnnotationDock(None, canvas)
    dock.resize(380, 520)
    dock.open_file(gpkg)
    dock.start_annotating(raster)
    boxes = _boxes(truth, args.boxes)
    for i, (category, (x1, y1, x2, y2)) in enumerate(boxes):
        last = i + 1 == len(boxes) or boxes[i + 1][0] != category  # one box of each category held out, as the
        split = "test" if last else "train"  # dock's check asks (the evaluation after fine-tuning reads it)
        choice = AnnotationChoice(EXPRESSIONS[category], category, split=split)
        dock.box_drawn(QgsRectangle(x1, y1, x2, y2), raster.crs(), choice)
    if not dock.save():
        log.error("the annotations were not saved: %s", dock.status_label.text())
        return 1
    layers = [lyr for lyr in (dock.store.loaded_layer(), raster) if lyr is not None]
    canvas.setLayers(layers)
    canvas.setExtent(raster.extent())
    _wait_for_render(app, canvas)
    finetune_host = QWidget()
    QVBoxLayout(finetune_host).addWidget(finetune := FinetuneWidget(parent=finetune_host))
    finetune.set_annotation_file(dock.annotation_path())
    finetune_host.resize(380, 300)
    dock.show()
    finetune_host.show()
    for _ in range(20):
        app.processEvents()
    parts = [canvas.grab(), dock.grab(), finetune_host.grab()]
    width = parts[0].width() + max(p.width() for p in parts[1:])
    image = QPixmap(width, max(parts[0].height(), parts[1].height() + parts[2].height()))
    image.fill()
    painter = QPainter(image)
    painter.drawPixmap(0, 0, parts[0])
    painter.drawPixmap(parts[0].width(), 0, parts[1])
    painter.drawPixmap(parts[0].width(), parts[1].height(), parts[2])
    painter.end()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(str(args.out))
    log.info("wrote %s (%d boxes in %s)", args.out, len(dock.features()), gpkg)
    dock.stop_annotating()
    for widget in (dock, finetune_host, canvas):
        widget.close()
        widget.deleteLater()
    QgsProject.instance().removeAllMapLayers()
    app.processEvents()
    app.exitQgis()
    return 0


if __name__ == "__main__":
    sys.exit(main())
