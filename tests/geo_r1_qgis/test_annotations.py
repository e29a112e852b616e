"""The annotation tool and dock in a real QgsApplication with a map canvas, on a real raster.

Boxes are drawn with the map tool by QgsMapMouseEvents (press, move, release) on a canvas whose CRS
(EPSG:3857) is not the raster's (EPSG:32618); the dialog is answered as a user would (its fields set, OK).
The written GeoPackage is read back by the engine venv's ``geo-r1 dataset build`` and compared with what
``geo-r1 dataset import`` writes from the same polygons. QGIS's Python only; the build is the project's venv.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
qgis_core = pytest.importorskip("qgis.core", reason="PyQGIS is not importable; run under /usr/bin/python3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import host_exec  # noqa: E402  (the engine venv's commands, also from inside the QGIS 3.40 chroot)

pytestmark = pytest.mark.qgis

from qgis.core import (  # noqa: E402
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeature,
    QgsField,
    QgsGeometry,
    QgsPointXY,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QCoreApplication, QEvent, QPoint, Qt, QTimer  # noqa: E402

from geo_r1_qgis.core.annotations import (  # noqa: E402
    FEW_SHOTS,
    NO_HELD_OUT,
    PARTLY_OUTSIDE,
    RASTER_MISSING,
    RASTER_NOT_LOADED,
    TOO_SMALL,
    Annotation,
)
from geo_r1_qgis.core.errors import ConfigError, OutputError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
GEO_R1 = REPO / ".venv" / "bin" / "geo-r1"
VENV_PY = REPO / ".venv" / "bin" / "python"
SHARED = REPO.parent / "shared" / "data"
RASTER = SHARED / "RGB.byte.tif"  # EPSG:32618, 791 x 718 pixels of 300 m
OTHER_CRS_RASTER = SHARED / "rgb1_fake_nir_epsg3857.tif"
MAP_CRS = "EPSG:3857"


def _venv_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _need_venv() -> None:
    if not GEO_R1.is_file():
        pytest.skip(f"{GEO_R1} is missing: build the engine venv first (make setup)")


@pytest.fixture(scope="module")
def canvas(qgis_app):
    from qgis.gui import QgsMapCanvas

    c = QgsMapCanvas()
    c.resize(800, 600)
    c.show()
    yield c
    c.hide()


@pytest.fixture
def raster(qgis_app, canvas):
    if not RASTER.is_file():
        pytest.skip(f"{RASTER} is missing (the shared rasters live in <repo>/../shared/data)")
    layer = QgsRasterLayer(str(RASTER), "rgb")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem(MAP_CRS))
    canvas.setLayers([layer])
    canvas.setExtent(_to_map(canvas, layer.crs()).transformBoundingBox(layer.extent()))
    canvas.refresh()
    assert canvas.mapSettings().destinationCrs().authid() == MAP_CRS != layer.crs().authid() == "EPSG:32618"
    return layer


@pytest.fixture
def dock(qgis_app, isolated_settings, canvas, tmp_path):
    from geo_r1_qgis.gui.annotation_dock import AnnotationDock
    from geo_r1_qgis.settings import PluginSettings

    PluginSettings().with_values(annotation_gpkg=str(tmp_path / "ann.gpkg")).save()
    d = AnnotationDock(None, canvas=canvas)
    yield d
    d.stop_annotating()
    for layer in QgsProject.instance().mapLayers().values():
        if isinstance(layer, QgsVectorLayer) and layer.isEditable():
            layer.rollBack()
    QgsProject.instance().removeAllMapLayers()
    d.deleteLater()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    gc.collect()


def _to_map(canvas, crs):
    return QgsCoordinateTransform(crs, canvas.mapSettings().destinationCrs(), QgsProject.instance())


def _event(canvas, kind, xy):
    from qgis.gui import QgsMapMouseEvent

    return QgsMapMouseEvent(canvas, kind, QPoint(*xy), Qt.MouseButton.LeftButton, Qt.MouseButton.LeftButton,
                            Qt.KeyboardModifier.NoModifier)  # fmt: skip


def _answer(dock, expression=None, split=None, negative=None, category=None, cancel=False, seen=None):
    """Answer the dialog the next box opens, as a user would: set its fields, click OK (or Cancel)."""

    def fill():
        d = dock.dialog
        assert d is not None, "no dialog opened"
        if seen is not None:
            seen.update(items=[d.expression_combo.itemText(i) for i in range(d.expression_combo.count())],
                        expression=d.expression_combo.currentText(), split=d.split_combo.currentText(),
                        negative=d.negative_check.isChecked())  # fmt: skip
        if cancel:
            d.reject()
            return
        if expression is not None:
            d.expression_combo.setEditText(expression)
        if split is not None:
            d.split_combo.setCurrentText(split)
        if negative is not None:
            d.negative_check.setChecked(negative)
        if category is not None:
            d.category_edit.setText(category)
        d.buttons.button(d.buttons.StandardButton.Ok).click()

    QTimer.singleShot(0, fill)


def _drag(dock, canvas, start, end, **answer):
    """Press at ``start``, move half way and to ``end``, release: the rectangle drawn, in map coordinates."""
    tool = dock.tool
    assert tool is not None and canvas.mapTool() is tool
    if answer:
        _answer(dock, **answer)
    tool.canvasPressEvent(_event(canvas, QEvent.Type.MouseButtonPress, start))
    mid = ((start[0] + end[0]) // 2, (start[1] + end[1]) // 2)
    tool.canvasMoveEvent(_event(canvas, QEvent.Type.MouseMove, mid))
    tool.canvasMoveEvent(_event(canvas, QEvent.Type.MouseMove, end))
    to_map = canvas.getCoordinateTransform()
    a, b = to_map.toMapCoordinates(*start), to_map.toMapCoordinates(*end)
    rect = QgsRectangle(a, b)
    band = tool.band.asGeometry().boundingBox()  # the rubber band follows the drag
    assert band.toString(3) == rect.toString(3)
    tool.canvasReleaseEvent(_event(canvas, QEvent.Type.MouseButtonRelease, end))
    assert tool.band.asGeometry().isEmpty()
    return rect


def _in_raster_crs(canvas, raster, rect):
    ct = QgsCoordinateTransform(canvas.mapSettings().destinationCrs(), raster.crs(), QgsProject.instance())
    return ct.transformBoundingBox(rect)


def _close(a: QgsRectangle, b: QgsRectangle, tol: float = 1e-6) -> bool:
    return all(abs(x - y) <= tol for x, y in zip((a.xMinimum(), a.yMinimum(), a.xMaximum(), a.yMaximum()),
                                                   (b.xMinimum(), b.yMinimum(), b.xMaximum(), b.yMaximum()),
                                                   strict=True))  # fmt: skip


def _file_rows(path: Path) -> list[dict]:
    """The saved file's features, read with osgeo.ogr (not QGIS)."""
    from osgeo import ogr

    ds = ogr.Open(str(path))
    layer = ds.GetLayerByName("geo_r1_annotations")
    rows = [{**f.items(), "wkt": f.GetGeometryRef().ExportToWkt()} for f in layer]
    ds = None
    return rows


def _memory_polygons(crs: str, polygons, fields=()):
    layer = QgsVectorLayer(f"Polygon?crs={crs}", "labels", "memory")
    provider = layer.dataProvider()
    from geo_r1_qgis.compat import field_type

    provider.addAttributes([QgsField(name, field_type("String")) for name in fields])
    layer.updateFields()
    feats = []
    for geometry, values in polygons:
        f = QgsFeature(layer.fields())
        f.setGeometry(geometry)
        f.setAttributes(list(values))
        feats.append(f)
    assert provider.addFeatures(feats)
    QgsProject.instance().addMapLayer(layer)
    return layer


def _raster_point_in_4326(raster, col: float, row: float) -> QgsPointXY:
    ext = raster.extent()
    x = ext.xMinimum() + col * ext.width() / raster.width()
    y = ext.yMaximum() - row * ext.height() / raster.height()
    ct = QgsCoordinateTransform(raster.crs(), QgsCoordinateReferenceSystem("EPSG:4326"), QgsProject.instance())
    return ct.transform(QgsPointXY(x, y))


def _square_4326(raster, col: float, row: float, side_px: float) -> QgsGeometry:
    corners = [_raster_point_in_4326(raster, c, r) for c, r in
               ((col, row), (col + side_px, row), (col + side_px, row + side_px), (col, row + side_px))]  # fmt: skip
    return QgsGeometry.fromPolygonXY([[*corners, corners[0]]])


# --------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------


def test_boxes_drawn_on_the_canvas_are_stored_in_the_raster_crs(dock, canvas, raster, tmp_path):
    assert dock.annotation_path() == tmp_path / "ann.gpkg"  # from the settings' new key
    assert not dock.annotation_path().exists()  # nothing is written before the first box
    dock.start_annotating(raster)
    assert dock.draw_button.isChecked()
    seen: dict = {}
    rect = _drag(dock, canvas, (300, 200), (360, 250), expression="storage tank", category="tank", split="val",
                 seen=seen)  # fmt: skip
    assert seen["items"] == [] and seen["split"] == "train"  # a first box: nothing to offer, train by default
    (f,) = dock.features()
    layer = dock.store.loaded_layer()
    assert layer.crs().authid() == "EPSG:32618"  # the raster's, not the map's EPSG:3857
    assert _close(f.geometry.boundingBox(), _in_raster_crs(canvas, raster, rect))
    assert not _close(f.geometry.boundingBox(), rect, tol=1000.0)  # really moved out of the map's coordinates
    ann = f.annotation
    assert (ann.expression, ann.category, ann.split, ann.negative, ann.is_unique) == ("storage tank", "tank", "val",
                                                                                      False, None)  # fmt: skip
    assert ann.raster == raster.source() == str(RASTER)
    # the next box offers the layer's expressions and the last answers
    seen.clear()
    _drag(dock, canvas, (420, 300), (470, 340), split="train", seen=seen)
    assert seen["items"] == ["storage tank"] and seen["expression"] == "storage tank" and seen["split"] == "val"
    assert [f.annotation.split for f in dock.features()] == ["val", "train"]
    assert dock.save()
    rows = _file_rows(dock.annotation_path())
    assert [r["expression"] for r in rows] == ["storage tank"] * 2 and [r["split"] for r in rows] == ["val", "train"]
    assert [r["negative"] for r in rows] == [0, 0] and rows[0]["is_unique"] is None and rows[0]["category"] == "tank"
    assert Annotation.from_attributes(rows[0]).raster == str(RASTER)


def test_a_cancelled_dialog_a_click_and_a_box_off_the_raster_add_nothing(dock, canvas, raster):
    dock.start_annotating(raster)
    _drag(dock, canvas, (300, 200), (360, 250), cancel=True)
    assert dock.features() == [] and "cancelled" in dock.status_label.text()
    tool = dock.tool
    tool.canvasPressEvent(_event(canvas, QEvent.Type.MouseButtonPress, (300, 200)))
    tool.canvasReleaseEvent(_event(canvas, QEvent.Type.MouseButtonRelease, (301, 201)))  # a click, not a box
    assert dock.features() == [] and "Drag a box" in dock.status_label.text()
    canvas.setExtent(QgsRectangle(0, 0, 100000, 100000))  # the Gulf of Guinea, far from the raster
    tool.canvasPressEvent(_event(canvas, QEvent.Type.MouseButtonPress, (300, 200)))
    tool.canvasReleaseEvent(_event(canvas, QEvent.Type.MouseButtonRelease, (360, 250)))
    assert dock.features() == [] and "outside the raster rgb" in dock.status_label.text()
    assert dock.dialog is None


def test_the_dialog_refuses_an_empty_expression_and_keeps_what_was_typed(dock, canvas, raster):
    dock.start_annotating(raster)
    errors = []

    def fill():
        d = dock.dialog
        d.expression_combo.setEditText("   ")
        d.split_combo.setCurrentText("test")
        d.accept()
        errors.append(d.error_label.text())
        assert d.isVisible() and d.split_combo.currentText() == "test"  # still open, the split kept
        d.expression_combo.setEditText("ship")
        d.accept()

    QTimer.singleShot(0, fill)
    _drag(dock, canvas, (300, 200), (360, 250))
    assert "needs an expression" in errors[0]
    assert [(f.annotation.expression, f.annotation.split) for f in dock.features()] == [("ship", "test")]


def test_a_negative_area_and_selected_polygons(dock, canvas, raster):
    dock.start_annotating(raster)
    _drag(dock, canvas, (200, 150), (300, 230), expression="storage tank", negative=True)
    (neg,) = dock.features()
    assert neg.annotation.negative is True
    a, b = _square_4326(raster, 100, 100, 20), _square_4326(raster, 300, 300, 10)
    multi = QgsGeometry.collectGeometry([_square_4326(raster, 500, 400, 8), _square_4326(raster, 520, 420, 8)])
    assert multi.isMultipart()
    layer = _memory_polygons("EPSG:4326", [(a, ()), (b, ()), (multi, ())])
    layer.selectByIds([f.id() for f in layer.getFeatures()][::2])  # the first and the multipolygon
    dock.polygon_combo.setLayer(layer)
    seen: dict = {}
    _answer(dock, expression="storage tank", negative=False, split="train", seen=seen)
    fids = dock.add_selected_polygons()
    assert seen["negative"] is True  # the last answer is offered...
    assert len(fids) == 3  # ...and the multipolygon gives one annotation per part
    feats = {f.fid: f for f in dock.features()}
    ct = QgsCoordinateTransform(layer.crs(), raster.crs(), QgsProject.instance())
    want = QgsGeometry(a)
    want.transform(ct)
    got = min((feats[f].geometry for f in fids), key=lambda g: g.asPolygon()[0][0].distance(want.asPolygon()[0][0]))
    assert got.asPolygon()[0][0].distance(want.asPolygon()[0][0]) < 1e-6  # vertex by vertex, into EPSG:32618
    assert got.boundingBox().width() == pytest.approx(20 * 300.04, rel=0.01)
    assert all(not feats[f].annotation.negative and feats[f].annotation.raster == str(RASTER) for f in fids)
    assert dock.counts() == {"storage tank": {"train": 3, "val": 0, "test": 0, "negative": 1}}
    layer.removeSelection()
    with pytest.raises(ConfigError, match="no polygon of labels is selected"):
        dock.add_selected_polygons()


def test_importing_a_polygon_layer_in_another_crs(dock, raster):
    dock.raster_combo.setLayer(raster)
    inside = [_square_4326(raster, 50 + 40 * i, 60, 12) for i in range(4)]
    far = QgsGeometry.fromRect(QgsRectangle(10, 10, 11, 11))  # off Africa
    layer = _memory_polygons("EPSG:4326", [(inside[0], ("tank", "train")), (inside[1], ("tank", "val")),
                                           (inside[2], ("ship", "test")), (inside[3], ("", "train")),
                                           (far, ("tank", "train"))], fields=("label", "split"))  # fmt: skip
    n = dock.import_layer(layer, expression_field="label", split_field="split")
    assert n == 3
    assert "1 outside the raster, 1 without an expression left out" in dock.status_label.text()
    got = [(f.annotation.expression, f.annotation.split) for f in dock.features()]
    assert got == [("tank", "train"), ("tank", "val"), ("ship", "test")]
    box = dock.features()[0].geometry.boundingBox()
    ext = raster.extent()
    assert box.xMinimum() == pytest.approx(ext.xMinimum() + 50 * ext.width() / raster.width(), abs=0.01)
    store_layer = dock.store.loaded_layer()
    store_layer.undoStack().undo()  # one undo takes the whole import back
    assert dock.features() == []
    assert dock.import_layer(layer, expression="storage tank", category="tank") == 4
    assert {f.annotation.expression for f in dock.features()} == {"storage tank"}
    with pytest.raises(ConfigError, match="no field 'nope'"):
        dock.import_layer(layer, expression_field="nope")
    with pytest.raises(ConfigError, match="one expression for every polygon, or the field"):
        dock.import_layer(layer)


def test_undo_removes_the_last_box_and_the_dock_deletes_and_edits(dock, canvas, raster):
    dock.start_annotating(raster)
    for i in range(3):
        _drag(dock, canvas, (200 + 60 * i, 200), (240 + 60 * i, 240), expression="tank" if i < 2 else "ship")
    layer = dock.store.loaded_layer()
    assert layer.isEditable() and layer.undoStack().count() == 3
    layer.undoStack().undo()  # Ctrl+Z
    assert [f.annotation.expression for f in dock.features()] == ["tank", "tank"]
    assert dock.counts() == {"tank": {"train": 2, "val": 0, "test": 0, "negative": 0}}
    QCoreApplication.processEvents()  # the list follows the layer's signals, once per burst
    top = dock.tree.topLevelItem(0)
    assert (top.text(0), top.text(1), dock.tree.topLevelItemCount()) == ("tank", "2", 1)
    first, second = (f.fid for f in dock.features())
    item = dock.item_of(second)
    item.setSelected(True)
    assert dock.delete_selected() == 1
    assert [f.fid for f in dock.features()] == [first] and dock.item_of(second) is None
    layer.undoStack().undo()
    assert len(dock.features()) == 2
    # Edit: the same small dialog, filled with the box's values; raster and date kept
    created = dock.features()[0].annotation.created
    seen: dict = {}
    _answer(dock, expression="oil tank", split="test", seen=seen)
    assert dock.edit(first)
    assert seen["expression"] == "tank" and seen["split"] == "train"
    edited = next(f.annotation for f in dock.features() if f.fid == first)
    assert (edited.expression, edited.split, edited.created, edited.raster) == ("oil tank", "test", created,
                                                                                str(RASTER))  # fmt: skip
    assert dock.last_choice.expression == "ship"  # the last box drawn: an edit is not the next box's default
    assert dock.save() and not layer.isEditable()
    assert sorted(r["expression"] for r in _file_rows(dock.annotation_path())) == ["oil tank", "tank"]
    # a double-click on a box zooms the map to it
    fid = dock.features()[0].fid
    item = dock.item_of(fid)
    dock.tree.itemDoubleClicked.emit(item, 0)
    want = _to_map(canvas, raster.crs()).transformBoundingBox(dock.features()[0].geometry.boundingBox())
    assert canvas.extent().contains(want) and canvas.extent().width() < 4 * want.width()


def test_counts_and_warnings_in_the_dock(dock, canvas, raster, tmp_path):
    from geo_r1_qgis.gui.annotation_dock import AnnotationChoice

    copy = tmp_path / "copy.tif"  # a raster that will go away
    shutil.copy(RASTER, copy)
    gone = QgsRasterLayer(str(copy), "copy")
    QgsProject.instance().addMapLayer(gone)
    dock.raster_combo.setLayer(raster)
    crs = raster.crs()
    ext = raster.extent()
    px = ext.width() / raster.width()

    def box(col, row, side, choice, layer=raster):
        x, y = ext.xMinimum() + col * px, ext.yMaximum() - row * px
        dock.raster_combo.setLayer(layer)
        return dock.box_drawn(QgsRectangle(x, y - side * px, x + side * px, y), crs, choice)[0]

    tank = AnnotationChoice("storage tank")
    for i in range(3):
        box(100 + 30 * i, 100, 20, tank)
    small = box(300, 300, 3, tank)  # 3 x 3 pixels at the native 300 m
    edge = box(780, 300, 20, AnnotationChoice("ship", split="val"))  # past the right edge
    box(400, 400, 20, AnnotationChoice("ship", split="test"), layer=gone)
    issues = dock.check()
    codes = {(i.code, i.expression) for i in issues}
    assert (FEW_SHOTS, "storage tank") in codes and (NO_HELD_OUT, "storage tank") in codes
    assert (NO_HELD_OUT, "ship") not in codes
    by = {i.code: i for i in issues}
    assert by[TOO_SMALL].fids == (small,) and by[PARTLY_OUTSIDE].fids == (edge,)
    text = dock.warnings_label.text()
    assert "the evaluation after fine-tuning needs held-out boxes: mark a few as val or test" in text
    assert "4 train box(es); Geo-R1's few-shot recipe uses 1, 5, 10" in text
    # the tree: expression > split > boxes, with counts
    top = {dock.tree.topLevelItem(i).text(0): dock.tree.topLevelItem(i) for i in range(dock.tree.topLevelItemCount())}
    assert top["storage tank"].text(1) == "4"
    splits = {top["storage tank"].child(j).text(0): top["storage tank"].child(j) for j in range(3)}
    assert [splits[s].text(1) for s in ("train", "val", "test")] == ["4", "0", "0"]
    assert splits["train"].childCount() == 4
    # a coarser ground resolution: the 20-pixel boxes become 5 pixels, the 3-pixel one under 1
    dock.gsd_spin.setValue(1200.0)
    assert {i.code: i for i in dock.check()}[TOO_SMALL].fids == (small,)
    dock.gsd_spin.setValue(2000.0)
    assert len({i.code: i for i in dock.check()}[TOO_SMALL].fids) == 6
    dock.gsd_spin.setValue(0.0)
    assert dock.save()
    # the raster is no longer loaded, then no longer exists
    QgsProject.instance().removeMapLayer(gone.id())
    assert {i.code: i for i in dock.check()}[RASTER_NOT_LOADED].level == "warning"
    copy.unlink()
    missing = {i.code: i for i in dock.check()}[RASTER_MISSING]
    assert missing.level == "error" and str(copy) in missing.message and "no longer exists" in missing.message
    assert "✖" in dock.warnings_label.text()


def test_one_crs_per_file_and_a_web_layer_is_refused(dock, raster):
    from geo_r1_qgis.gui.annotation_dock import AnnotationChoice

    if not OTHER_CRS_RASTER.is_file():
        pytest.skip(f"{OTHER_CRS_RASTER} is missing")
    dock.raster_combo.setLayer(raster)
    ext = raster.extent()
    dock.box_drawn(QgsRectangle(ext.center().x(), ext.center().y(), ext.center().x() + 5000, ext.center().y() + 5000),
                   raster.crs(), AnnotationChoice("tank"))  # fmt: skip
    other = QgsRasterLayer(str(OTHER_CRS_RASTER), "other")
    QgsProject.instance().addMapLayer(other)
    dock.raster_combo.setLayer(other)
    oext = other.extent()
    with pytest.raises(ConfigError, match="one CRS per file"):
        dock.box_drawn(QgsRectangle(oext.center().x(), oext.center().y(), oext.center().x() + 50,
                                    oext.center().y() + 50), other.crs(), AnnotationChoice("tank"))  # fmt: skip
    assert len(dock.features()) == 1
    web = QgsRasterLayer("type=xyz&url=file:///nowhere/{z}/{x}/{y}.png&zmax=19&zmin=0", "web", "wms")
    QgsProject.instance().addMapLayer(web)
    dock.raster_combo.setLayer(web)
    assert web.isValid()
    with pytest.raises(ConfigError, match="web layer"):
        dock.raster()


# --------------------------------------------------------------------------------------------------
# The file: the command line reads what the dock writes; a foreign file is refused
# --------------------------------------------------------------------------------------------------


def test_the_file_builds_a_dataset_and_matches_what_the_command_line_imports(dock, canvas, raster, tmp_path):
    _need_venv()
    dock.start_annotating(raster)
    # some 300 raster pixels apart (1.2 per screen pixel here), so 112-pixel chips around each hold only it
    corners = [(110, 90), (360, 90), (620, 90), (110, 420), (620, 440)]
    for (x, y), split in zip(corners, ["train", "train", "train", "val", "test"], strict=True):
        _drag(dock, canvas, (x, y), (x + 30, y + 30), expression="storage tank", split=split)
    _drag(dock, canvas, (330, 400), (400, 470), expression="storage tank", negative=True)
    assert dock.save()
    out = tmp_path / "dataset"
    proc = host_exec.run([GEO_R1, "dataset", "build", dock.annotation_path(), "-o", out, "--chip", "112",
                          "--chips-per-box", "1"], env=_venv_env(), timeout=300)  # fmt: skip
    assert proc.returncode == 0, f"geo-r1 dataset build failed:\n{proc.stdout}\n{proc.stderr}"
    records = {s: (out / f"{s}_rec.jsonl").read_text().splitlines() for s in ("train", "val", "test")}
    assert len(records["train"]) >= 3 and records["val"] and records["test"], proc.stderr
    manifest = json.loads((out / "dataset.json").read_text())
    assert "32618" in json.dumps(manifest)

    # the same polygons (a GeoJSON in EPSG:4326) through the dock's import and through geo-r1 dataset import
    polygons = [_square_4326(raster, 100 + 30 * i, 120, 15) for i in range(3)]
    layer = _memory_polygons("EPSG:4326", [(g, ()) for g in polygons])
    geojson = tmp_path / "labels.geojson"
    from qgis.core import QgsVectorFileWriter

    opts = QgsVectorFileWriter.SaveVectorOptions()
    opts.driverName = "GeoJSON"
    err = QgsVectorFileWriter.writeAsVectorFormatV3(layer, str(geojson), QgsProject.instance().transformContext(),
                                                    opts)  # fmt: skip
    assert err[0] == QgsVectorFileWriter.WriterError.NoError, err
    dock.open_file(tmp_path / "plugin.gpkg")
    assert dock.import_layer(layer, expression="storage tank", category="tank") == 3
    assert dock.save()
    cli = tmp_path / "cli.gpkg"
    proc = host_exec.run([GEO_R1, "dataset", "import", geojson, "--raster", RASTER, "--expression", "storage tank",
                          "--category", "tank", "-o", cli], env=_venv_env(), timeout=120)  # fmt: skip
    assert proc.returncode == 0, f"geo-r1 dataset import failed:\n{proc.stdout}\n{proc.stderr}"
    script = """
import json, sys
import numpy as np, pyogrio, shapely
from pyproj import CRS
from train.dataset import read_annotations
out = {}
for name in sys.argv[1:]:
    info = pyogrio.read_info(name, layer="geo_r1_annotations")
    s = read_annotations(name)
    out[name] = {"fields": list(info["fields"]), "dtypes": [str(d) for d in info["dtypes"]],
                 "geometry_type": info["geometry_type"], "epsg": CRS.from_user_input(s.crs).to_epsg(),
                 "anns": [{**f.annotation.to_attributes(), "created": ""} for f in s.features],
                 "coords": [shapely.get_coordinates(shapely.normalize(f.geometry)).round(3).tolist()
                            for f in s.features]}
print(json.dumps(out))
"""
    proc = host_exec.run([VENV_PY, "-c", script, tmp_path / "plugin.gpkg", cli], env=_venv_env(), cwd=REPO,
                         timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    ours, theirs = got[str(tmp_path / "plugin.gpkg")], got[str(cli)]
    assert ours["fields"] == theirs["fields"] and ours["dtypes"] == theirs["dtypes"], (ours, theirs)
    assert ours["geometry_type"] == theirs["geometry_type"] == "Polygon"
    assert ours["epsg"] == theirs["epsg"] == 32618
    assert ours["anns"] == theirs["anns"]
    assert ours["coords"] == theirs["coords"]  # the same polygons, reprojected by QGIS and by pyproj, to 1 mm


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_file_of_another_layout_is_refused_and_left_alone(dock, raster, tmp_path):
    from osgeo import ogr, osr

    from geo_r1_qgis.gui.annotation_dock import AnnotationChoice
    from geo_r1_qgis.qgis_io.annotation_layer import AnnotationStore

    foreign = tmp_path / "foreign.gpkg"
    ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(foreign))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32618)
    lyr = ds.CreateLayer("geo_r1_annotations", srs, ogr.wkbPoint)
    lyr.CreateField(ogr.FieldDefn("expression", ogr.OFTReal))
    ds = None
    before = _sha(foreign)
    with pytest.raises(OutputError) as info:
        AnnotationStore(foreign)
    message = str(info.value)
    assert "is not a Geo-R1 annotation file" in message and "another layout" in message
    assert "Point, not polygons" in message and "lacks the field(s) category, raster" in message
    assert "expression (Real, not str)" in message and "left as it is" in message
    with pytest.raises(OutputError, match="another layout"):
        dock.open_file(foreign)
    dock.file_widget.setFilePath(str(foreign))  # chosen in the dock: the status says so, nothing is written
    assert "another layout" in dock.status_label.text()
    assert dock.check()[0].code == "no_file" and "another layout" in dock.check()[0].message
    dock.raster_combo.setLayer(raster)
    ext = raster.extent()
    with pytest.raises(OutputError, match="another layout"):
        dock.box_drawn(QgsRectangle(ext.center(), ext.center()).buffered(3000), raster.crs(),
                       AnnotationChoice("tank"))  # fmt: skip
    assert _sha(foreign) == before
    text = tmp_path / "notes.gpkg"
    text.write_text("not a database\n")
    with pytest.raises(OutputError, match="GDAL cannot open it as a vector file"):
        AnnotationStore(text)
    assert text.read_text() == "not a database\n"
    with pytest.raises(OutputError, match=r"ending in \.gpkg"):
        AnnotationStore(tmp_path / "ann.shp")
    # a GeoPackage with other layers gets the annotation layer beside them
    other = tmp_path / "results.gpkg"
    ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(other))
    ds.CreateLayer("results", srs, ogr.wkbPolygon)
    ds = None
    dock.open_file(other)
    dock.box_drawn(QgsRectangle(ext.center(), ext.center()).buffered(3000), raster.crs(), AnnotationChoice("tank"))
    assert dock.save()
    ds = ogr.Open(str(other))
    assert sorted(ds.GetLayer(i).GetName() for i in range(ds.GetLayerCount())) == ["geo_r1_annotations", "results"]
    ds = None


def _iface(canvas, raster):
    """The shared fake interface (``_real_engine.FakeIface``) with ``raster`` the active layer."""
    from _real_engine import FakeIface

    iface = FakeIface(canvas)
    iface.setActiveLayer(raster)
    assert iface.activeLayer() is raster
    return iface


def test_the_annotate_toolbar_button_opens_the_dock_over_the_active_raster(
    qgis_app, isolated_settings, canvas, raster, tmp_path
):
    """The button as a user clicks it: QAction.triggered sends a bool, which once went in as the raster
    (TypeError in the raster box's setLayer; found by the desktop screenshots run)."""
    from geo_r1_qgis.plugin import GeoR1Plugin
    from geo_r1_qgis.settings import PluginSettings

    PluginSettings().with_values(annotation_gpkg=str(tmp_path / "a.gpkg")).save()
    iface = _iface(canvas, raster)
    plugin = GeoR1Plugin(iface)
    plugin.initGui()
    try:
        assert plugin.annotate_action in iface.toolbar
        plugin.annotate_action.trigger()  # triggered(False), as a click sends it
        dock = plugin.annotation_dock
        assert dock is not None and not dock.isHidden()  # shown (the test window itself is never on screen)
        assert dock.raster_combo.currentLayer() is raster and canvas.mapTool() is dock.tool
    finally:
        if plugin.annotation_dock is not None:
            plugin.annotation_dock.stop_annotating()
        plugin.unload()
        QgsProject.instance().removeAllMapLayers()
        QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
        gc.collect()


def test_the_annotate_action_opens_the_dock_with_the_tool_on(qgis_app, isolated_settings, canvas, raster, tmp_path):
    """The plugin's "Annotate" entry, with the parts of QGIS's interface it uses."""
    from geo_r1_qgis.plugin import GeoR1Plugin
    from geo_r1_qgis.settings import PluginSettings

    PluginSettings().with_values(annotation_gpkg=str(tmp_path / "a.gpkg")).save()

    plugin = GeoR1Plugin(_iface(canvas, raster))
    try:
        dock = plugin.annotate()
        assert dock.raster_combo.currentLayer() is raster and canvas.mapTool() is dock.tool
        assert dock.annotation_path() == tmp_path / "a.gpkg"
        assert plugin.annotate() is dock  # one dock

        class PanelRecorder:  # the wiring only; the panel's set_annotation_file is test_finetune's
            def __init__(self) -> None:
                self.files: list = []

            def set_annotation_file(self, path) -> None:
                self.files.append(path)

        plugin.dock = PanelRecorder()
        plugin.annotate()
        assert plugin.dock.files == [tmp_path / "a.gpkg"]  # the Fine-tune section trains on this file
        dock.file_widget.setFilePath(str(tmp_path / "b.gpkg"))  # another file, chosen later in the dock
        assert plugin.dock.files == [tmp_path / "a.gpkg", tmp_path / "b.gpkg"]
        plugin.dock = None
    finally:
        dock = plugin.annotation_dock
        dock.stop_annotating()
        assert canvas.mapTool() is not dock.tool
        plugin.iface.removeDockWidget(dock)
        dock.deleteLater()
        plugin.annotation_dock = None
        QgsProject.instance().removeAllMapLayers()
        QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
        gc.collect()


def test_the_layer_removed_from_the_map_stays_off_until_the_next_box(dock, raster):
    from geo_r1_qgis.gui.annotation_dock import AnnotationChoice

    dock.raster_combo.setLayer(raster)
    c = raster.extent().center()
    dock.box_drawn(QgsRectangle(c.x(), c.y(), c.x() + 3000, c.y() + 3000), raster.crs(), AnnotationChoice("tank"))
    assert dock.save()
    layer = dock.store.loaded_layer()
    assert layer is not None and layer.name() == "Geo-R1 annotations"
    QgsProject.instance().removeMapLayer(layer.id())
    QCoreApplication.processEvents()
    assert dock.store.loaded_layer() is None  # not put back by the list's refresh...
    assert [f.annotation.expression for f in dock.features()] == ["tank"]  # ...which reads the file
    assert dock.tree.topLevelItem(0).text(0) == "tank"
    mine = QgsVectorLayer(f"{dock.annotation_path()}|layername=geo_r1_annotations", "mine", "ogr")
    QgsProject.instance().addMapLayer(mine)  # the user's own copy of the layer is the one edited
    dock.box_drawn(QgsRectangle(c.x(), c.y(), c.x() + 6000, c.y() + 6000), raster.crs(), AnnotationChoice("ship"))
    assert dock.store.loaded_layer() is mine and mine.isEditable() and mine.featureCount() == 2
    assert len([lyr for lyr in QgsProject.instance().mapLayers().values() if isinstance(lyr, QgsVectorLayer)]) == 1


def test_the_import_dialog_and_the_delete_key(dock, raster):
    from qgis.PyQt.QtGui import QKeyEvent

    dock.raster_combo.setLayer(raster)
    layer = _memory_polygons("EPSG:4326", [(_square_4326(raster, 100 + 40 * i, 200, 12), (name, split))
                                           for i, (name, split) in enumerate([("tank", "train"), ("ship", "val")])],
                             fields=("label", "split"))  # fmt: skip

    def fill():
        d = dock.dialog
        d.layer_combo.setLayer(layer)
        d.field_radio.setChecked(True)
        d.field_combo.setField("label")
        d.split_field_combo.setField("split")
        d.accept()

    QTimer.singleShot(0, fill)
    dock.import_button.click()
    got = [(f.annotation.expression, f.annotation.split) for f in dock.features()]
    assert got == [("tank", "train"), ("ship", "val")]
    assert "Imported 2 annotation(s) from labels" in dock.status_label.text()
    fid = dock.features()[0].fid
    dock.item_of(fid).setSelected(True)
    QCoreApplication.sendEvent(dock.tree, QKeyEvent(QEvent.Type.KeyPress, Qt.Key.Key_Delete,
                                                    Qt.KeyboardModifier.NoModifier))  # fmt: skip
    assert [f.annotation.expression for f in dock.features()] == ["ship"]


def test_the_default_file_is_beside_the_project_and_a_chosen_one_is_remembered(qgis_app, isolated_settings, canvas,
                                                                               tmp_path):  # fmt: skip
    from geo_r1_qgis.gui.annotation_dock import AnnotationDock
    from geo_r1_qgis.settings import PluginSettings

    PluginSettings().save()  # nothing chosen yet
    project = QgsProject.instance()
    d = AnnotationDock(None, canvas=canvas)
    try:
        assert d.annotation_path() == Path.home() / "geo_r1_annotations.gpkg"  # no project: the home folder
        project.setFileName(str(tmp_path / "site.qgz"))
        assert d.annotation_path() == tmp_path / "geo_r1_annotations.gpkg"  # beside the project
        chosen = tmp_path / "chosen" / "mine.gpkg"
        d.file_widget.setFilePath(str(chosen))  # as the file dialog sets it
        assert d.annotation_path() == chosen and PluginSettings.load().annotation_gpkg == str(chosen)
        project.setFileName(str(tmp_path / "elsewhere" / "other.qgz"))
        assert d.annotation_path() == chosen  # a chosen file stays chosen
    finally:
        project.setFileName("")
        d.deleteLater()
        QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
        PluginSettings().save()


def test_a_box_edited_by_hand_into_a_bad_split_is_an_error_in_check(dock, raster):
    from geo_r1_qgis.gui.annotation_dock import INVALID, AnnotationChoice

    dock.raster_combo.setLayer(raster)
    c = raster.extent().center()
    (fid,) = dock.box_drawn(QgsRectangle(c.x(), c.y(), c.x() + 9000, c.y() + 9000), raster.crs(),
                            AnnotationChoice("tank"))  # fmt: skip
    layer = dock.store.loaded_layer()
    assert layer.changeAttributeValue(fid, layer.fields().indexOf("split"), "holdout")  # the attribute table's way
    first = dock.check()[0]
    assert first.code == INVALID and first.level == "error" and first.fids == (fid,)
    assert "split 'holdout'; use one of train, val, test" in first.message and "attribute table" in first.message
