"""Cross-check the pure geometry against what GDAL and QGIS themselves make of our sample rasters.

Runs under QGIS's Python (/usr/bin/python3, PyQGIS, Debian's osgeo GDAL). The sample rasters are
written by the engine venv's ``geo-r1 sample-data`` command, in a subprocess, so the two
environments (rasterio's bundled GDAL and PROJ on one side, Debian's on the other) are compared.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

qgis_core = pytest.importorskip("qgis.core", reason="PyQGIS is not importable; run under /usr/bin/python3")
gdal = pytest.importorskip("osgeo.gdal", reason="osgeo.gdal is not importable; run under /usr/bin/python3")

from geo_r1_qgis.core.geometry import (  # noqa: E402
    Affine,
    PixelBox,
    box_to_polygon,
    raster_bounds,
    ring_signed_area,
    window_from_map_bbox,
)

pytestmark = pytest.mark.qgis

REPO = Path(__file__).resolve().parents[2]
GEO_R1 = REPO / ".venv" / "bin" / "geo-r1"
sys.path.insert(0, str(REPO / "tests"))
import host_exec  # noqa: E402  (the engine venv's commands, also from inside the QGIS 3.40 chroot)

EPSG = {"utm": 32614, "wgs84": 4326, "webmercator": 3857, "rotated": 32614}


def _tol(name: str) -> float:
    return 1e-9 if EPSG[name] == 4326 else 1e-6  # 1e-9 degree; 1 micrometre in metric CRSs


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    if not GEO_R1.exists():
        pytest.skip(f"{GEO_R1} is missing: build the engine venv first (make setup)")
    out = tmp_path_factory.mktemp("qgis-samples")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = host_exec.run([str(GEO_R1), "sample-data", str(out)], timeout=120, env=env)
    assert proc.returncode == 0, f"geo-r1 sample-data failed:\n{proc.stdout}\n{proc.stderr}"
    return out


@pytest.fixture(scope="module")
def index(sample_dir) -> dict:
    return json.loads((sample_dir / "samples.json").read_text())


class _Qgis:
    """Layers opened on the session's QgsApplication (conftest.py); deleted before exitQgis()."""

    def __init__(self) -> None:
        self.layers: list = []

    def raster(self, path: Path):
        layer = qgis_core.QgsRasterLayer(str(path), path.stem)
        assert layer.isValid(), f"QGIS cannot open {path}"
        self.layers.append(layer)
        return layer

    def vector(self, path: Path):
        layer = qgis_core.QgsVectorLayer(str(path), path.stem, "ogr")
        assert layer.isValid(), f"QGIS cannot open {path}"
        self.layers.append(layer)
        return layer

    def close(self) -> None:
        self.layers.clear()  # layers must die before exitQgis(), or the interpreter segfaults at exit
        gc.collect()


@pytest.fixture(scope="module")
def qgis(qgis_app):
    session = _Qgis()
    yield session
    session.close()


def _entries(index: dict) -> dict[str, dict]:
    return {e["name"]: e for e in index["rasters"]}


@pytest.mark.parametrize("name", list(EPSG))
def test_gdal_geotransform_equals_samples_json(sample_dir, index, name):
    entry = _entries(index)[name]
    ds = gdal.Open(str(sample_dir / entry["path"]))
    assert ds is not None
    assert ds.GetGeoTransform() == tuple(entry["transform"])
    assert (ds.RasterXSize, ds.RasterYSize) == (entry["width"], entry["height"])
    assert ds.RasterCount == 3
    ds = None


@pytest.mark.parametrize("name", ["utm", "wgs84", "webmercator"])
def test_qgis_extent_equals_raster_bounds(sample_dir, index, qgis, name):
    entry = _entries(index)[name]
    layer = qgis.raster(sample_dir / entry["path"])
    assert layer.crs().authid() == entry["crs"]
    assert (layer.width(), layer.height()) == (entry["width"], entry["height"])
    ext = layer.extent()
    ours = raster_bounds(Affine.from_gdal(entry["transform"]), entry["width"], entry["height"])
    got = (ext.xMinimum(), ext.yMinimum(), ext.xMaximum(), ext.yMaximum())
    assert got == pytest.approx(ours, abs=_tol(name), rel=0)


def test_qgis_extent_of_rotated_raster(sample_dir, index, qgis):
    """What QGIS 3.22 really does with a rotated geotransform.

    Its GDAL provider does not keep the rotation: it opens the file through GDAL's automatic warped
    VRT (``GDALAutoCreateWarpedVRT``, it logs "Creating Warped VRT."), a north-up grid anchored at
    the top-left of the four corners' bounding box with a whole number of square pixels. So the
    extent's xmin and ymax are exactly those of the corners' bounding box, while xmax and ymin fall
    short of it by less than one warped pixel; the layer's size is the VRT's, not the file's.
    """
    entry = _entries(index)["rotated"]
    path = sample_dir / entry["path"]
    transform = Affine.from_gdal(entry["transform"])
    assert not transform.is_rectilinear
    xmin, ymin, xmax, ymax = raster_bounds(transform, entry["width"], entry["height"])
    layer = qgis.raster(path)
    assert layer.crs().authid() == entry["crs"]
    ext = layer.extent()
    res_x = ext.width() / layer.width()
    res_y = ext.height() / layer.height()

    assert ext.xMinimum() == pytest.approx(xmin, abs=1e-6)
    assert ext.yMaximum() == pytest.approx(ymax, abs=1e-6)
    assert 0 <= xmax - ext.xMaximum() < res_x
    assert 0 <= ext.yMinimum() - ymin < res_y
    assert (layer.width(), layer.height()) != (entry["width"], entry["height"])  # resampled, not the file's grid

    # ... and that grid is exactly GDAL's own automatic warped VRT of the file.
    ds = gdal.Open(str(path))
    vrt = gdal.AutoCreateWarpedVRT(ds)
    c, a, b, f, d, e = vrt.GetGeoTransform()
    assert b == 0 and d == 0
    assert (layer.width(), layer.height()) == (vrt.RasterXSize, vrt.RasterYSize)
    vrt_bounds = (c, f + e * vrt.RasterYSize, c + a * vrt.RasterXSize, f)
    got = (ext.xMinimum(), ext.yMinimum(), ext.xMaximum(), ext.yMaximum())
    assert got == pytest.approx(vrt_bounds, abs=1e-6, rel=0)
    vrt = ds = None


@pytest.mark.parametrize("name", list(EPSG))
def test_truth_corners_through_gdal_geotransform(sample_dir, name):
    """A truth box's corners through Affine.from_gdal(GDAL's geotransform) give its GeoJSON polygon."""
    ds = gdal.Open(str(sample_dir / f"{name}.tif"))
    transform = Affine.from_gdal(ds.GetGeoTransform())
    width, height = ds.RasterXSize, ds.RasterYSize
    ds = None
    collection = json.loads((sample_dir / f"{name}.objects.geojson").read_text())
    assert collection["crs"]["properties"]["name"] == f"urn:ogc:def:crs:EPSG::{EPSG[name]}"
    tol = _tol(name)
    for feat in collection["features"]:
        box = PixelBox(*map(float, feat["properties"]["pixel_box"]))
        ring = [tuple(p) for p in feat["geometry"]["coordinates"][0]]
        assert ring_signed_area(ring) > 0
        for (x, y), expected in zip(ring, box_to_polygon(box, transform), strict=True):
            assert abs(x - expected[0]) <= tol and abs(y - expected[1]) <= tol, feat["id"]
        top_left = transform * (box.x1, box.y1)
        assert abs(ring[0][0] - top_left[0]) <= tol and abs(ring[0][1] - top_left[1]) <= tol
        # Back from the map: the window of the polygon's bbox covers the box, in whole pixels.
        xs, ys = zip(*ring, strict=True)
        window = window_from_map_bbox(min(xs), min(ys), max(xs), max(ys), transform, width, height)
        assert window.contains(box)


@pytest.mark.parametrize("name", list(EPSG))
def test_qgis_reads_truth_polygons_in_raster_crs(sample_dir, qgis, name):
    """QGIS (OGR's GeoJSON driver) reads the truth file in the raster's CRS, x/y (lon/lat) order."""
    layer = qgis.vector(sample_dir / f"{name}.objects.geojson")
    assert layer.crs().authid() == f"EPSG:{EPSG[name]}"
    collection = json.loads((sample_dir / f"{name}.objects.geojson").read_text())
    assert layer.featureCount() == len(collection["features"])
    by_id = {f["properties"]["id"]: f for f in collection["features"]}
    tol = _tol(name)
    for feature in layer.getFeatures():
        ring = [tuple(p) for p in by_id[feature["id"]]["geometry"]["coordinates"][0]]
        vertices = [(v.x(), v.y()) for v in feature.geometry().vertices()]
        assert len(vertices) == len(ring)
        for (qx, qy), (x, y) in zip(vertices, ring, strict=True):
            assert abs(qx - x) <= tol and abs(qy - y) <= tol


def test_qgis_transform_to_wgs84_places_rasters_together(sample_dir, index, qgis):
    """The rasters are anchored near the same spot (97.5 W, 38.4 N): a sanity check of the CRSs."""
    wgs84 = qgis_core.QgsCoordinateReferenceSystem("EPSG:4326")
    context = qgis_core.QgsProject.instance().transformContext()
    for entry in index["rasters"]:
        layer = qgis.raster(sample_dir / entry["path"])
        xform = qgis_core.QgsCoordinateTransform(layer.crs(), wgs84, context)
        centre = xform.transform(layer.extent().center())
        assert abs(centre.x() - -97.5) < 0.02 and abs(centre.y() - 38.4) < 0.02, (entry["name"], centre)
