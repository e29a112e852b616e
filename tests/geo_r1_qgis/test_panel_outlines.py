"""The panel's Outlines choice in a real QgsApplication, against a real ``geo-r1 serve --sam`` (the tiny random SAM 2
and the format-trained tiny Qwen): a run started from the panel ends showing its outline layer (MultiPolygons,
valid, the boxes' fields), with the box layer still in the GeoPackage. Random SAM weights outline nothing in
particular; what the outlines look like is not checked."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
qgis_core = pytest.importorskip("qgis.core", reason="PyQGIS is not importable; run under /usr/bin/python3")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _real_engine as rx  # noqa: E402
from _real_engine import spin  # noqa: E402

pytestmark = pytest.mark.qgis

from qgis.core import QgsProject, QgsVectorLayer, QgsWkbTypes  # noqa: E402

RASTER = rx.SHARED / "cog.tif"


@pytest.fixture(scope="module")
def engine(tiny_sam_engine):
    return tiny_sam_engine  # the session's tiny model + tiny SAM engine (conftest)


@pytest.fixture
def dock(qgis_app, isolated_settings, engine, tmp_path):
    from qgis.gui import QgsMapCanvas

    canvas = QgsMapCanvas()
    yield from rx.panel_dock(engine, canvas, tmp_path, max_new_tokens=160)
    canvas.deleteLater()


def _configure(dock, expression: str, mode: str, outline_choice: int):
    raster = qgis_core.QgsRasterLayer(str(RASTER), RASTER.stem)
    QgsProject.instance().addMapLayer(raster)
    dock.raster_combo.setLayer(raster)
    dock.expression_combo.setEditText(expression)
    dock.mode_combo.setCurrentIndex(dock.mode_combo.findData(mode))
    dock.area_combo.setCurrentIndex(1)  # the whole raster layer
    dock.tile_spin.setValue(224)
    dock.overlap_spin.setValue(32)
    dock.outline_combo.setCurrentIndex(outline_choice)  # 0 none, 1 refine each box, 2 GRES
    return raster


@pytest.mark.skipif(not RASTER.is_file(), reason="../shared/data/cog.tif is not there")
def test_a_refined_run_shows_its_outlines(dock):
    from geo_r1_qgis.qgis_io.gpkg_ogr import RunLayers

    raster = _configure(dock, "all buildings", "all", 1)
    entry = dock.start_run()
    assert entry is not None, dock.status_label.text()
    assert spin(lambda: dock.task is None, 600), dock.status_label.text()
    assert entry.status == "done", entry.message
    shown = QgsProject.instance().mapLayer(entry.map_layer_id)
    assert isinstance(shown, QgsVectorLayer) and shown.isValid()
    layers = RunLayers(entry.output, entry.run_id, entry.layer)
    assert layers.has_outlines()
    assert shown.name().endswith("(outlines)")
    assert QgsWkbTypes.flatType(shown.wkbType()) == QgsWkbTypes.MultiPolygon
    assert shown.crs() == raster.crs()
    boxes = QgsVectorLayer(layers.answer_uri, "boxes", "ogr")
    assert boxes.isValid() and 0 < shown.featureCount() <= boxes.featureCount()
    assert [f.name() for f in boxes.fields()] == [f.name() for f in shown.fields()]
    assert all(f.geometry().isGeosValid() for f in shown.getFeatures())


def test_gres_needs_mode_all_and_says_so(dock):
    _configure(dock, "the largest building", "one", 2)
    assert dock.start_run() is None
    assert "mode all" in dock.status_label.text(), dock.status_label.text()
