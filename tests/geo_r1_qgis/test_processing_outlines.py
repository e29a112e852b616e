"""``geor1:ground``'s Outlines option under real QGIS: a real ``geo-r1 serve --sam`` (the tiny random SAM 2 and the
format-trained tiny Qwen, from the venv), the outlines written to OUTLINE_OUTPUT as MultiPolygons beside the boxes.

Random SAM weights outline nothing in particular: what is checked is the layer, its geometry type, validity, CRS
and that every outline lies inside its box (one pixel of simplification allowed)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
qgis_core = pytest.importorskip("qgis.core", reason="PyQGIS is not importable; run under /usr/bin/python3")

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _real_engine import SHARED  # noqa: E402

pytestmark = pytest.mark.qgis
RASTER = SHARED / "cog.tif"
#: GRES's prompt is not the tiny model's training prompt: on the NAIP scene's 448 px tiles it still answers boxes
#: (as in tests/engine/test_ground_outlines.py), on cog.tif's 224 px tiles it does not
GRES_RASTER, GRES_TILE = SHARED / "naip_m_4709963_se_14_20200831.tif", 448


@pytest.fixture(scope="module")
def engine(tiny_sam_engine):
    return tiny_sam_engine  # the session's tiny model + tiny SAM engine (conftest)


def run(qgis, params: dict):
    import processing
    from qgis.core import QgsProcessingContext, QgsProcessingFeedback, QgsProcessingUtils

    context, feedback = QgsProcessingContext(), QgsProcessingFeedback()
    result = processing.run("geor1:ground", params, context=context, feedback=feedback)
    layers = []
    for key in ("OUTPUT", "OUTLINE_OUTPUT"):
        out = result.get(key)
        if isinstance(out, str):
            out = QgsProcessingUtils.mapLayerFromString(out, context, allowLoadingNewLayers=True)
            out = out.clone() if out is not None else None
        qgis.layers.append(out)
        layers.append(out)
    return layers


@pytest.mark.skipif(not RASTER.is_file(), reason="../shared/data/cog.tif is not there")
@pytest.mark.parametrize("choice, path, tile", [(1, RASTER, 224), (2, GRES_RASTER, GRES_TILE)], ids=["refine", "gres"])
def test_outlines_beside_the_boxes(qgis, engine, choice, path, tile):
    from qgis.core import QgsGeometry, QgsWkbTypes

    raster = qgis.raster(path)
    params = {"INPUT": raster, "EXPRESSION": "all buildings", "MODE": 1, "TILE_SIZE": tile, "OVERLAP": 32,
              "ENGINE_URL": engine.url, "TOKEN_FILE": str(engine.token_file), "MAX_NEW_TOKENS": 160,
              "OUTLINES": choice, "OUTPUT": "memory:", "OUTLINE_OUTPUT": "memory:"}  # fmt: skip
    boxes, outlines = run(qgis, params)
    assert boxes is not None and outlines is not None
    assert boxes.featureCount() > 0, "the format model answers boxes on this raster"
    assert QgsWkbTypes.flatType(outlines.wkbType()) == QgsWkbTypes.MultiPolygon
    assert outlines.crs() == raster.crs()
    assert [f.name() for f in outlines.fields()] == [f.name() for f in boxes.fields()]
    pixel = max(raster.rasterUnitsPerPixelX(), raster.rasterUnitsPerPixelY())
    by_key = {}
    for f in boxes.getFeatures():
        by_key.setdefault((f["tile_id"], f["score"]), []).append(QgsGeometry(f.geometry()))
    n = 0
    for f in outlines.getFeatures():
        g = f.geometry()
        assert g.isGeosValid() and not g.isEmpty()
        mine = by_key.get((f["tile_id"], f["score"]))
        assert mine, (f["tile_id"], f["score"])
        assert any(b.buffer(pixel * 1.01, 1).contains(g) for b in mine)
        n += 1
    assert 0 < n <= boxes.featureCount()


def test_without_outlines_no_outline_layer(qgis, engine):
    raster = qgis.raster(RASTER)
    params = {"INPUT": raster, "EXPRESSION": "all buildings", "MODE": 1, "TILE_SIZE": 224, "OVERLAP": 32,
              "ENGINE_URL": engine.url, "TOKEN_FILE": str(engine.token_file), "MAX_NEW_TOKENS": 32,
              "OUTPUT": "memory:"}  # fmt: skip
    boxes, outlines = run(qgis, params)
    assert boxes is not None and outlines is None
