"""The QGIS side end to end: ``geor1:ground`` through Processing against a real engine, and the raster reader.

Runs under QGIS's Python (``QT_QPA_PLATFORM=offscreen /usr/bin/python3 -m pytest``): PyQGIS, the
standard library and numpy. The engine is a real ``geo-r1 serve`` process from the project's venv,
serving the format-trained tiny model (built once, cached under ``<repo>/.cache``). The reader is
compared with the command line's own reader (``engine/rasters.py``), run in the venv's Python in a
subprocess, tile for tile.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

qgis_core = pytest.importorskip("qgis.core", reason="PyQGIS is not importable; run under /usr/bin/python3")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _real_engine import (  # noqa: E402  (the real-engine helpers the plugin tests share)
    REPO,
    SHARED,
    VENV_BIN,
    feature_rings,
    free_port,
    host_exec,
    sample_data,
    venv_env,
)

from geo_r1_qgis.core.errors import ConfigError, EmptyRasterError, NotGeoreferencedError, RasterError  # noqa: E402
from geo_r1_qgis.core.geometry import PixelBox, Tile, TileGridSpec, box_to_polygon, make_tile_grid  # noqa: E402
from geo_r1_qgis.core.merge import Detection  # noqa: E402
from geo_r1_qgis.core.pipeline import MapDetection, RunSummary  # noqa: E402

pytestmark = pytest.mark.qgis


#: raster -> what the reader must do with it; compared tile by tile with engine/rasters.py
RASTERS = {
    "utm": ("sample", "utm.tif"),
    "wgs84": ("sample", "wgs84.tif"),
    "webmercator": ("sample", "webmercator.tif"),
    "naip": ("shared", "naip_m_4709963_se_14_20200831.tif"),
    "rgb_byte": ("shared", "RGB.byte.tif"),
    "cog": ("shared", "cog.tif"),
    "single_band": ("shared", "rgb1_fake_nir_epsg3857.tif"),
    "all_nodata": ("shared", "all-nodata.tif"),
    "float_nan": ("shared", "float_nan.tif"),
}
GRID = TileGridSpec(tile_size=224, overlap=32)
COARSE = TileGridSpec(tile_size=224, overlap=32, scale=2.5)  # a downsampled tile, as the coarse pass reads


# --------------------------------------------------------------------------------------------------
# QGIS, once per module
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# A real engine (stdlib only: this Python has no httpx)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_engine):
    return tiny_engine  # the session's tiny-model engine (conftest)


# --------------------------------------------------------------------------------------------------
# Rasters and the command line's reading of them
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    return sample_data(tmp_path_factory.mktemp("qgis-samples"))


def _path(sample_dir: Path, name: str) -> Path:
    where, file = RASTERS[name]
    path = (sample_dir if where == "sample" else SHARED) / file
    if not path.is_file():
        pytest.skip(f"{path} is missing (the shared rasters live in <repo>/../shared/data)")
    return path


_REFERENCE_SCRIPT = """
import sys, numpy as np
from engine.rasters import RasterioSource
from geo_r1_qgis.core.geometry import TileGridSpec, make_tile_grid
out = {}
for name, path in zip(sys.argv[2::2], sys.argv[3::2]):
    try:
        src = RasterioSource(path)
    except Exception as exc:
        out[name + "|error"] = np.array(type(exc).__name__)
        continue
    with src:
        out[name + "|bands"] = np.array(src.bands)
        out[name + "|stretch"] = np.array(src._stretch or [], dtype=float)
        for grid, spec in (("n", TileGridSpec(224, 32, 1.0)), ("c", TileGridSpec(224, 32, 2.5))):
            for t in make_tile_grid(src.transform, src.width, src.height, spec):
                img, frac = src.read(t)
                out[f"{name}|{grid}|{t.id}"] = img
                out[f"{name}|{grid}|{t.id}|frac"] = np.array(frac)
np.savez_compressed(sys.argv[1], **out)
"""


@pytest.fixture(scope="module")
def reference(sample_dir, tmp_path_factory) -> dict:
    """engine/rasters.py's tiles of every raster (native 224 px grid and a 2.5x coarse grid), from the venv."""
    args = []
    for name in RASTERS:
        where, file = RASTERS[name]
        path = (sample_dir if where == "sample" else SHARED) / file
        if path.is_file():
            args += [name, str(path)]
    out = tmp_path_factory.mktemp("reference") / "tiles.npz"
    proc = host_exec.run(
        [str(VENV_BIN / "python"), "-c", _REFERENCE_SCRIPT, str(out), *args], cwd=REPO, timeout=120, env=venv_env(),
    )  # fmt: skip
    assert proc.returncode == 0, f"reading with engine/rasters.py failed:\n{proc.stderr[-3000:]}"
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


# --------------------------------------------------------------------------------------------------
# QgisRasterSource
# --------------------------------------------------------------------------------------------------

READABLE = ["utm", "wgs84", "webmercator", "naip", "rgb_byte", "cog", "single_band"]
EXPECTED_BANDS = {"naip": (1, 2, 3), "single_band": (1, 1, 1), "cog": (1, 2, 3), "rgb_byte": (1, 2, 3)}


@pytest.mark.parametrize("name", READABLE)
def test_raster_source_reads_what_the_command_line_reads(qgis, sample_dir, reference, name):
    from geo_r1_qgis.qgis_io.rasters import QgisRasterSource

    layer = qgis.raster(_path(sample_dir, name))
    src = QgisRasterSource(layer)
    assert src.bands == tuple(reference[f"{name}|bands"].tolist())
    if name in EXPECTED_BANDS:
        assert src.bands == EXPECTED_BANDS[name]
    ref_stretch = reference[f"{name}|stretch"]
    if ref_stretch.size == 0:
        assert src._stretch is None
    else:  # float64 cog.tif: stretched from the same decimated read
        assert src._stretch is not None
        assert np.allclose(np.array(src._stretch), ref_stretch, rtol=1e-6)
    ext = layer.extent()
    assert src.transform.apply(0, 0) == pytest.approx((ext.xMinimum(), ext.yMaximum()))
    assert src.crs_wkt and qgis_core.QgsCoordinateReferenceSystem.fromWkt(src.crs_wkt) == layer.crs()

    # Native resolution: exactly the command line's pixels and valid fractions.
    skipped = 0
    for tile in make_tile_grid(src.transform, src.width, src.height, GRID):
        img, frac = src.read(tile)
        assert img.shape == (tile.size[1], tile.size[0], 3) and img.dtype == np.uint8
        assert np.array_equal(img, reference[f"{name}|n|{tile.id}"]), tile.id
        assert frac == pytest.approx(float(reference[f"{name}|n|{tile.id}|frac"]), abs=1e-12)
        skipped += frac == 0.0
    if name == "rgb_byte":
        partial = [float(v) for k, v in reference.items() if k.startswith("rgb_byte|n|") and k.endswith("|frac")]
        assert any(0.0 < f < 1.0 for f in partial), "RGB.byte.tif's nodata border gives partly valid tiles"

    # Downsampled (the coarse pass): QGIS's block() only decimates, so we box-average supersamples
    # where GDAL averages; close, not equal.
    for tile in make_tile_grid(src.transform, src.width, src.height, COARSE):
        img, frac = src.read(tile)
        ref = reference[f"{name}|c|{tile.id}"]
        assert img.shape == ref.shape
        assert frac == pytest.approx(float(reference[f"{name}|c|{tile.id}|frac"]), abs=0.01)
        both = (img.max(axis=-1) > 0) & (ref.max(axis=-1) > 0)
        diff = np.abs(img.astype(int) - ref.astype(int))[both]
        assert diff.mean() < 4.0, (tile.id, diff.mean())


def test_raster_source_errors(qgis, sample_dir, reference):
    from geo_r1_qgis.qgis_io.rasters import QgisRasterSource

    assert str(reference["all_nodata|error"]) == "EmptyRasterError"
    with pytest.raises(EmptyRasterError, match="nodata"):
        QgisRasterSource(qgis.raster(_path(sample_dir, "all_nodata")))
    assert str(reference["float_nan|error"]) == "NotGeoreferencedError"
    with pytest.raises(NotGeoreferencedError, match="no CRS"):
        QgisRasterSource(qgis.raster(_path(sample_dir, "float_nan")))
    with pytest.raises(RasterError, match="not valid"):
        QgisRasterSource(qgis.raster(sample_dir / "missing.tif"))
    with pytest.raises(ConfigError, match=r"numbered 1\.\.3"):
        QgisRasterSource(qgis.raster(_path(sample_dir, "utm")), bands=(1, 2, 4))


def test_raster_source_band_choice(qgis, sample_dir):
    from geo_r1_qgis.qgis_io.rasters import QgisRasterSource, parse_bands

    naip = qgis.raster(_path(sample_dir, "naip"))
    assert QgisRasterSource(naip, bands=parse_bands("4, 3, 2")).bands == (4, 3, 2)
    assert QgisRasterSource(naip, bands=parse_bands("4")).bands == (4, 4, 4)
    assert parse_bands("") is None and parse_bands(None) is None
    with pytest.raises(ConfigError, match=r"e\.g\. 1,2,3"):
        parse_bands("red,green")


def test_raster_source_expands_a_colour_table(qgis, tmp_path):
    """Issue 8.4: a paletted raster reached the model as its indices 0..3, a nearly black image."""
    from osgeo import gdal

    from geo_r1_qgis.qgis_io.rasters import QgisRasterSource

    path = str(tmp_path / "palette.tif")
    ds = gdal.GetDriverByName("GTiff").Create(path, 64, 64, 1, gdal.GDT_Byte)
    ds.SetGeoTransform((500000, 1, 0, 4000000, 0, -1))
    ds.SetProjection('PROJCS["WGS 84 / UTM zone 33N",GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,'
                     '298.257223563]],PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433]],PROJECTION['
                     '"Transverse_Mercator"],PARAMETER["central_meridian",15],PARAMETER["scale_factor",0.9996],'
                     'PARAMETER["false_easting",500000],PARAMETER["false_northing",0],UNIT["metre",1]]')  # fmt: skip
    idx = np.zeros((64, 64), np.uint8)
    idx[:, 16:32], idx[:, 32:48], idx[:, 48:] = 1, 2, 3
    band = ds.GetRasterBand(1)
    table = gdal.ColorTable()
    for i, c in enumerate([(200, 0, 0, 255), (0, 200, 0, 255), (0, 0, 200, 255), (255, 255, 255, 255)]):
        table.SetColorEntry(i, c)
    band.SetRasterColorTable(table)  # before the pixels: GDAL 3.10 refuses it after
    band.SetRasterColorInterpretation(gdal.GCI_PaletteIndex)
    band.WriteArray(idx)
    ds = None
    src = QgisRasterSource(qgis.raster(Path(path)))
    tile = make_tile_grid(src.transform, src.width, src.height, TileGridSpec(56, 0))[0]
    rgb, frac = src.read(tile)
    assert frac == 1.0
    assert rgb[10, 5].tolist() == [200, 0, 0] and rgb[10, 20].tolist() == [0, 200, 0]
    assert rgb[10, 40].tolist() == [0, 0, 200] and rgb[10, 50].tolist() == [255, 255, 255]


class _NoBoxes:
    """A GroundingClient that records the tiles it is sent and finds nothing."""

    def __init__(self) -> None:
        self.images: list = []

    def ground(self, tiles, expression, task="multi", reasoning=True, max_new_tokens=256):
        from geo_r1_qgis.core.client import GroundResult

        self.images.extend(tiles)
        return [GroundResult((), 0.0, None, "None", "ok") for _ in tiles]


def test_nodata_border_tiles_are_skipped_not_sent(qgis, sample_dir):
    from geo_r1_qgis.core.pipeline import GroundingJob, run_grounding
    from geo_r1_qgis.qgis_io.rasters import FeatureSinkResultSink, QgisRasterSource

    src = QgisRasterSource(qgis.raster(_path(sample_dir, "rgb_byte")))
    layer = qgis_core.QgsVectorLayer("Polygon?crs=EPSG:32618", "out", "memory")
    qgis.layers.append(layer)
    sink = FeatureSinkResultSink(layer.dataProvider(), {"expression": "x", "mode": "all"})
    client = _NoBoxes()
    job = GroundingJob(expression="lakes", tile_size=64, overlap=0, batch_size=64)
    summary = run_grounding(job, src, sink, client)
    assert summary.status == "done" and summary.tiles_skipped > 0
    assert len(client.images) == summary.tiles_total - summary.tiles_skipped
    assert sum(status == "skipped" for status in sink.statuses.values()) == summary.tiles_skipped
    assert layer.featureCount() == 0


# --------------------------------------------------------------------------------------------------
# FeatureSinkResultSink
# --------------------------------------------------------------------------------------------------


def test_feature_sink_writes_one_feature_per_final_detection(qgis):
    from geo_r1_qgis.core.geometry import Affine
    from geo_r1_qgis.qgis_io.rasters import FIELD_NAMES, FeatureSinkResultSink, make_fields

    layer = qgis_core.QgsVectorLayer("Polygon?crs=EPSG:32614", "out", "memory")
    qgis.layers.append(layer)
    assert layer.dataProvider().addAttributes(make_fields().toList())
    layer.updateFields()
    meta = {"expression": "tanks", "mode": "all", "model": "m", "adapter": "", "prompt_version": "p1"}
    sink = FeatureSinkResultSink(layer.dataProvider(), meta, run_id="run1")
    transform = Affine(0.5, 0.0, 630000.0, 0.0, -0.5, 4250000.0)
    det = Detection(PixelBox(10, 20, 30, 60), 0.8, 0.9, "tank", "I see a tank.", "r0c0", False)
    ring = box_to_polygon(det.box, transform)
    tile = Tile(0, 0, 0, PixelBox(0, 0, 224, 224), (224, 224), transform)
    sink.write_tile("r0c0", tile, [MapDetection(det, ring)], "done")
    sink.commit()
    assert sink.done_tiles() == {}  # no resume in Processing
    sink.finish([MapDetection(det, ring)], RunSummary(status="done"))
    feats = list(layer.getFeatures())
    assert len(feats) == 1 and sink.features_written == 1
    assert [f.name() for f in layer.fields()] == list(FIELD_NAMES)
    f = feats[0]
    assert (f["expression"], f["mode"], f["label"], f["reasoning"], f["tile_id"], f["run_id"]) == (
        "tanks", "all", "tank", "I see a tank.", "r0c0", "run1",
    )  # fmt: skip
    assert f["score"] == pytest.approx(0.8) and f["presence"] == pytest.approx(0.9) and f["truncated"] == 0
    assert f["prompt_version"] == "p1" and f["created"].isValid()
    vertices = [(v.x(), v.y()) for v in f.geometry().vertices()]
    assert vertices == pytest.approx(list(ring))


# --------------------------------------------------------------------------------------------------
# geor1:ground through Processing
# --------------------------------------------------------------------------------------------------


def _params(sample_dir: Path, engine, **kw) -> dict:
    return {
        "INPUT": str(sample_dir / "utm.tif"),
        "EXPRESSION": "all storage tanks",
        "MODE": 1,
        "TILE_SIZE": 224,
        "OVERLAP": 32,
        "MAX_NEW_TOKENS": 96,
        "ENGINE_URL": engine.url if engine else "http://127.0.0.1:9",
        "TOKEN_FILE": str(engine.token_file) if engine else "",
        "OUTPUT": "TEMPORARY_OUTPUT",
        **kw,
    }


def test_algorithm_is_registered(qgis):
    alg = qgis_core.QgsApplication.processingRegistry().algorithmById("geor1:ground")
    assert alg is not None and alg.displayName() == "Ground an expression on a raster"
    assert alg.provider().name() == "Geo-R1" and not alg.provider().icon().isNull()
    names = [p.name() for p in alg.parameterDefinitions()]
    for name in ("INPUT", "EXPRESSION", "MODE", "TILE_SIZE", "OVERLAP", "BANDS", "EXTENT", "GROUND_RESOLUTION",
                 "AREA", "ENGINE_URL", "TOKEN_FILE", "MAX_NEW_TOKENS", "OUTPUT"):  # fmt: skip
        assert name in names
    assert "reasoning" in alg.shortHelpString() and "geo-r1 serve" in alg.shortHelpString()


def test_the_toolbox_finds_the_algorithms_by_what_users_type(qgis):
    reg = qgis_core.QgsApplication.processingRegistry()
    for alg_id in ("geor1:ground", "geor1:filter"):
        alg = reg.algorithmById(alg_id)
        assert alg is not None and not alg.icon().isNull()
        assert {"detect", "find", "object"} <= set(alg.tags()), alg.tags()


def _result_layer(rows):
    """A memory layer shaped like a Geo-R1 result: polygons with a score field."""
    layer = qgis_core.QgsVectorLayer("Polygon?crs=EPSG:32633&field=score:double&field=label:string", "r", "memory")
    feats = []
    for (x1, y1, x2, y2), score, label in rows:
        f = qgis_core.QgsFeature(layer.fields())
        f.setGeometry(qgis_core.QgsGeometry.fromRect(qgis_core.QgsRectangle(x1, y1, x2, y2)))
        f.setAttributes([score, label])
        feats.append(f)
    assert layer.dataProvider().addFeatures(feats)[0]
    return layer


def test_filter_keeps_strong_detections_and_merges_duplicates(qgis):
    import processing

    layer = _result_layer([
        ((0, 0, 10, 10), 0.9, "a"),      # an object ...
        ((1, 0, 11, 10), 0.6, "a-dup"),  # ... found again in an overlap: merged into the 0.9 one
        ((50, 50, 60, 60), 0.2, "weak"),  # under the minimum score: dropped
        ((100, 0, 104, 4), 0.8, "b"),    # another object: kept
    ])  # fmt: skip
    qgis.layers.append(layer)
    context = qgis_core.QgsProcessingContext()
    result = processing.run("geor1:filter", {"INPUT": layer, "MIN_SCORE": 0.5, "IOU": 0.5, "CONTAINMENT": 0.7,
                                             "OUTPUT": "memory:"}, context=context)  # fmt: skip
    out = result["OUTPUT"]
    if isinstance(out, str):
        out = qgis_core.QgsProcessingUtils.mapLayerFromString(out, context).clone()
    qgis.layers.append(out)
    got = sorted((f["label"], round(f["score"], 2)) for f in out.getFeatures())
    assert got == [("a", 0.9), ("b", 0.8)]
    with pytest.raises(qgis_core.QgsProcessingException, match="score"):
        bad = qgis_core.QgsVectorLayer("Polygon?crs=EPSG:32633&field=x:int", "bad", "memory")
        qgis.layers.append(bad)
        processing.run("geor1:filter", {"INPUT": bad, "OUTPUT": "memory:"})


def test_ground_all_on_utm(qgis, sample_dir, engine):
    from geo_r1_qgis.qgis_io.rasters import FIELD_NAMES

    raster = qgis.raster(sample_dir / "utm.tif")
    out = qgis.run(_params(sample_dir, engine))
    assert out is not None and out.isValid()
    assert out.crs() == raster.crs()
    assert [f.name() for f in out.fields()] == list(FIELD_NAMES)
    feats = list(out.getFeatures())
    assert feats, "the format-trained tiny model answers with boxes on the sample raster"
    extent = raster.extent()
    extent.grow(1e-6)
    for f in feats:
        assert extent.contains(f.geometry().boundingBox()), f.geometry().asWkt()
        assert f["expression"] == "all storage tanks" and f["mode"] == "all"
        assert f["prompt_version"] == engine.info["prompt_version"]
        assert f["model"] == engine.info["model"]
        assert f["reasoning"], "the model reasoned (<think>): its reasoning is stored per feature"
        assert 0.0 <= f["score"] <= f["presence"] <= 1.0
        assert f["tile_id"].startswith("r") and f["run_id"] and f["created"].isValid()
    assert len({f["run_id"] for f in feats}) == 1


def test_ground_one_in_an_extent(qgis, sample_dir, engine):
    raster = qgis.raster(sample_dir / "utm.tif")
    ext = raster.extent()
    # The top-left 400 x 400 pixels (0.5 m pixels), in the "xmin,xmax,ymin,ymax [crs]" form Processing takes.
    xmin, ymax = ext.xMinimum(), ext.yMaximum()
    extent = f"{xmin},{xmin + 200},{ymax - 200},{ymax} [EPSG:32614]"
    out = qgis.run(_params(sample_dir, engine, MODE=0, EXTENT=extent))
    feats = list(out.getFeatures())
    assert len(feats) <= 1
    for f in feats:
        assert f["mode"] == "one"
        bbox = f.geometry().boundingBox()
        assert bbox.xMinimum() >= xmin - 1e-6 and bbox.yMaximum() <= ymax + 1e-6
        assert bbox.xMaximum() <= xmin + 200 + 1e-6 and bbox.yMinimum() >= ymax - 200 - 1e-6


def test_unreachable_engine_says_how_to_start_it(qgis, sample_dir, tmp_path):
    token = tmp_path / "engine.token"
    token.write_text("whatever")
    params = _params(sample_dir, None, ENGINE_URL=f"http://127.0.0.1:{free_port()}", TOKEN_FILE=str(token))
    with pytest.raises(qgis_core.QgsProcessingException, match="geo-r1 serve --model"):
        qgis.run(params)


def test_wrong_token_is_reported(qgis, sample_dir, engine, tmp_path):
    wrong = tmp_path / "wrong.token"
    wrong.write_text("not-the-token")
    with pytest.raises(qgis_core.QgsProcessingException, match="token") as exc:
        qgis.run(_params(sample_dir, engine, TOKEN_FILE=str(wrong)))
    assert "401" in str(exc.value) and "--token-file" in str(exc.value)


def test_raster_and_band_errors_become_processing_errors(qgis, sample_dir, engine):
    with pytest.raises(qgis_core.QgsProcessingException, match="nodata"):
        qgis.run(_params(sample_dir, engine, INPUT=str(_path(sample_dir, "all_nodata"))))
    with pytest.raises(qgis_core.QgsProcessingException, match="band"):
        qgis.run(_params(sample_dir, engine, BANDS="1,2,9"))


def test_the_toolbox_run_shows_progress_and_a_styled_layer_named_after_the_raster(qgis, sample_dir, engine):
    """Run from the toolbox (results loaded into the project): the progress bar moves from 0 to 100 %, and the
    loaded layer has the Geo-R1 score style (not QGIS's default fill) and a name with the expression, the raster
    and the mode."""
    import processing

    class Feedback(qgis_core.QgsProcessingFeedback):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[float] = []
            self.progressChanged.connect(self.seen.append)

    qgis.raster(sample_dir / "utm.tif")
    context = qgis_core.QgsProcessingContext()
    context.setProject(qgis_core.QgsProject.instance())
    feedback = Feedback()
    result = processing.runAndLoadResults("geor1:ground", _params(sample_dir, engine), feedback=feedback,
                                          context=context)  # fmt: skip
    layer = qgis_core.QgsProject.instance().mapLayer(result["OUTPUT"])
    try:
        assert layer is not None and layer.featureCount() >= 1
        inner = [p for p in feedback.seen if 0 < p < 100]
        assert inner and inner == sorted(inner) and max(feedback.seen) == 100, feedback.seen[:20]
        assert layer.renderer().type() == "graduatedSymbol" and layer.renderer().classAttribute() == "score"
        assert layer.labelsEnabled() and "score" in layer.mapTipTemplate()
        assert layer.name().startswith("all storage tanks on utm (all, "), layer.name()
    finally:
        qgis_core.QgsProject.instance().removeAllMapLayers()


# --------------------------------------------------------------------------------------------------
# With a model that sees: the sample model on a scene it never saw, checked against the scene's truth
# --------------------------------------------------------------------------------------------------

# sample_engine and unseen_scene: conftest.py (test_panel.py uses them too)


def test_ground_finds_the_storage_tanks_of_a_scene_the_model_never_saw(qgis, unseen_scene, sample_engine):
    """processing.run with the sample model: the polygons match the truth on the map (IoU > 0.5). The tile is the
    model's own (TILE_SIZE 0: its manifest's 224 px, from GET /info). Measured: 5 of 7 tanks, 8 detections, as
    geo-r1 ground finds them."""
    from geo_r1_qgis.core.truth import match_objects, read_truth

    assert sample_engine.info["tile"] == 224
    qgis.raster(unseen_scene / "utm.tif")
    out = qgis.run(_params(unseen_scene, sample_engine, TILE_SIZE=0, OVERLAP=64, MAX_NEW_TOKENS=384))
    assert out is not None and out.isValid()
    truth = read_truth(unseen_scene / "utm.objects.geojson", "tank")
    m = match_objects(feature_rings(out), [t.ring for t in truth])
    assert m.n_truth == 7 and m.found >= 4 and m.precision >= 0.4, m
    assert all("storage tank" in f["reasoning"] for f in out.getFeatures())
