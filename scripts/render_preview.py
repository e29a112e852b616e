"""Render a raster with a GeoPackage layer on top to a PNG, headless, with QGIS (run with /usr/bin/python3).

    QT_QPA_PLATFORM=offscreen /usr/bin/python3 scripts/render_preview.py RASTER OUT.gpkg PREVIEW.png [--truth F]

A quick way to look at what a run produced, as a QGIS user would see it.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from qgis.core import (
    QgsApplication,
    QgsFillSymbol,
    QgsMapRendererParallelJob,
    QgsMapSettings,
    QgsRasterLayer,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QSize
from qgis.PyQt.QtGui import QColor


def latest_answer_layer(gpkg: str) -> str:
    """The answer layer of the latest run recorded in ``geo_r1_runs``."""
    import sqlite3

    with sqlite3.connect(gpkg) as con:
        row = con.execute("SELECT layer FROM geo_r1_runs ORDER BY started DESC LIMIT 1").fetchone()
    if row is None:
        raise SystemExit(f"{gpkg} records no run; pass --layer")
    return row[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("raster")
    ap.add_argument("gpkg")
    ap.add_argument("png")
    ap.add_argument("--truth", help="a GeoJSON of true boxes, drawn in green")
    ap.add_argument("--size", type=int, default=900)
    ap.add_argument("--layer", help="layer to draw (default: the answer layer of the file's latest run)")
    args = ap.parse_args()
    app = QgsApplication([], False)
    app.initQgis()
    layers = []
    try:
        raster = QgsRasterLayer(args.raster, "raster")
        layer = args.layer or latest_answer_layer(args.gpkg)
        vectors = [QgsVectorLayer(f"{args.gpkg}|layername={layer}", layer, "ogr")]
        if not vectors[0].isValid():
            sys.stderr.write(f"no layer {layer!r} in {args.gpkg}\n")
            return 1
        vectors[0].setRenderer(
            vectors[0]
            .renderer()
            .__class__(
                QgsFillSymbol.createSimple({"color": "0,0,0,0", "outline_color": "255,40,40", "outline_width": "0.6"})
            )
        )
        if args.truth:
            truth = QgsVectorLayer(args.truth, "truth", "ogr")
            truth.renderer().setSymbol(
                QgsFillSymbol.createSimple({"color": "0,0,0,0", "outline_color": "40,220,40", "outline_width": "0.4"})
            )
            vectors.append(truth)
        layers = [*vectors, raster]
        settings = QgsMapSettings()
        settings.setLayers(layers)
        settings.setDestinationCrs(raster.crs())
        settings.setExtent(raster.extent())
        settings.setOutputSize(QSize(args.size, args.size))
        settings.setBackgroundColor(QColor(255, 255, 255))
        job = QgsMapRendererParallelJob(settings)
        job.start()
        job.waitForFinished()
        job.renderedImage().save(args.png, "PNG")
        sys.stderr.write(f"{vectors[0].featureCount()} feature(s) drawn over {args.raster} -> {args.png}\n")
    finally:
        del layers
        raster = vectors = truth = None
        app.exitQgis()
    return 0


if __name__ == "__main__":
    sys.exit(main())
