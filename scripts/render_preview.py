"""Render a raster with a GeoPackage layer on top to a PNG, headless, with QGIS (run with /usr/bin/python3).

    QT_QPA_PLATFORM=offscreen /usr/bin/python3 scripts/render_preview.py RASTER OUT.gpkg PREVIEW.png [--truth F]
        [--layer NAME] [--also NAME] [--fill] [--extent XMIN,YMIN,XMAX,YMAX]

``--layer RUN_outline --also RUN --fill --extent ...`` draws a run's outline layer filled over its boxes (in
yellow), zoomed to an area: the README's docs/outlines.png.

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
    QgsRectangle,
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
    ap.add_argument("--also", help="another layer of the file drawn under it, thin yellow (e.g. the run's boxes)")
    ap.add_argument("--fill", action="store_true", help="fill the layer's polygons (translucent red)")
    ap.add_argument("--extent", help="area to draw, XMIN,YMIN,XMAX,YMAX in the raster's CRS (default: the raster)")
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
                QgsFillSymbol.createSimple(
                    {
                        "color": "255,40,40,90" if args.fill else "0,0,0,0",
                        "outline_color": "255,40,40",
                        "outline_width": "0.6",
                    }
                )
            )
        )
        if args.also:
            also = QgsVectorLayer(f"{args.gpkg}|layername={args.also}", args.also, "ogr")
            if not also.isValid():
                sys.stderr.write(f"no layer {args.also!r} in {args.gpkg}\n")
                return 1
            also.renderer().setSymbol(
                QgsFillSymbol.createSimple({"color": "0,0,0,0", "outline_color": "255,220,0", "outline_width": "0.4"})
            )
            vectors.append(also)
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
        if args.extent:
            xmin, ymin, xmax, ymax = (float(v) for v in args.extent.split(","))
            settings.setExtent(QgsRectangle(xmin, ymin, xmax, ymax))
        else:
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
