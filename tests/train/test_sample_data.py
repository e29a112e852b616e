"""Tests of train/sample_data.py (venv: numpy, rasterio)."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")

from engine.cli import main as cli_main  # noqa: E402
from geo_r1_qgis.core.errors import ConfigError  # noqa: E402
from geo_r1_qgis.core.geometry import ring_signed_area  # noqa: E402
from train.sample_data import SampleDataConfig, render_scene, render_scene_with_masks, write_samples  # noqa: E402

EXPECTED_EPSG = {"utm": 32614, "wgs84": 4326, "webmercator": 3857, "rotated": 32614}
SIZE = 512


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> tuple[Path, list[Path], dict]:
    out = tmp_path_factory.mktemp("samples")
    paths = write_samples(SampleDataConfig(out_dir=out, seed=7, size=SIZE))
    index = json.loads((out / "samples.json").read_text())
    return out, paths, index


def read_pixels(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def truth(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.objects.geojson").read_text())


def test_files_exist(samples):
    out, paths, index = samples
    exts = (".tif", ".objects.geojson", ".outlines.geojson")
    expected = {f"{n}{ext}" for n in EXPECTED_EPSG for ext in exts} | {"samples.json"}
    assert {p.name for p in paths} == expected
    assert all(p.is_file() and p.stat().st_size > 0 and p.parent == out for p in paths)
    assert [r["name"] for r in index["rasters"]] == list(EXPECTED_EPSG)
    for entry in index["rasters"]:
        assert (out / entry["path"]).is_file() and (out / entry["truth"]).is_file()
        assert (out / entry["outlines"]).is_file()
        assert (entry["width"], entry["height"]) == (SIZE, SIZE)


def test_rasters_are_tiled_deflated_rgb_uint8(samples):
    out, _, _ = samples
    for name in EXPECTED_EPSG:
        with rasterio.open(out / f"{name}.tif") as src:
            assert src.count == 3 and src.dtypes == ("uint8",) * 3
            assert (src.width, src.height) == (SIZE, SIZE)
            assert src.profile["tiled"] is True
            assert src.compression.name.lower() == "deflate"


def test_deterministic_for_a_seed(samples, tmp_path):
    out, _, _ = samples
    again = tmp_path / "again"
    write_samples(SampleDataConfig(out_dir=again, seed=7, size=SIZE))
    other = tmp_path / "other"
    write_samples(SampleDataConfig(out_dir=other, seed=8, size=SIZE))
    for name in EXPECTED_EPSG:
        first = read_pixels(out / f"{name}.tif")
        assert np.array_equal(first, read_pixels(again / f"{name}.tif"))
        assert (out / f"{name}.objects.geojson").read_bytes() == (again / f"{name}.objects.geojson").read_bytes()
        assert not np.array_equal(first, read_pixels(other / f"{name}.tif"))
    assert (out / "samples.json").read_bytes() == (again / "samples.json").read_bytes()


def test_crs_as_stated(samples):
    out, _, index = samples
    for entry in index["rasters"]:
        epsg = EXPECTED_EPSG[entry["name"]]
        with rasterio.open(out / entry["path"]) as src:
            assert src.crs.to_epsg() == epsg
            assert entry["crs"] == f"EPSG:{epsg}"
            assert tuple(entry["transform"]) == src.transform.to_gdal()
            assert tuple(entry["bounds"]) == pytest.approx(tuple(src.bounds), abs=1e-9)
        assert truth(out, entry["name"])["crs"]["properties"]["name"] == f"urn:ogc:def:crs:EPSG::{epsg}"


def test_pixel_sizes_as_stated(samples):
    out, _, _ = samples
    with rasterio.open(out / "utm.tif") as src:
        assert (src.transform.a, src.transform.e) == (0.5, -0.5)
    with rasterio.open(out / "wgs84.tif") as src:
        assert math.isclose(src.transform.a, 5e-6) and math.isclose(-src.transform.e, 5e-6)


def test_rotated_raster_has_rotation_terms(samples):
    out, _, index = samples
    with rasterio.open(out / "rotated.tif") as src:
        t = src.transform
    assert abs(t.b) > 0.1 and abs(t.d) > 0.1
    assert math.isclose(math.degrees(math.atan2(t.d, t.a)), 20.0, abs_tol=1e-9)
    assert math.isclose(math.hypot(t.a, t.d), 0.5, rel_tol=1e-12)
    assert [r["rotated"] for r in index["rasters"]] == [False, False, False, True]


@pytest.mark.parametrize("name", list(EXPECTED_EPSG))
def test_truth_polygons_match_rasterio_transform(samples, name):
    """Every polygon corner is what GDAL's geotransform gives for the pixel box corner."""
    out, _, _ = samples
    tol = 1e-9 if EXPECTED_EPSG[name] == 4326 else 0.01  # 1e-9 degree, or 1 cm
    with rasterio.open(out / f"{name}.tif") as src:
        t = src.transform
    features = truth(out, name)["features"]
    assert len(features) > 20
    for feat in features:
        x1, y1, x2, y2 = feat["properties"]["pixel_box"]
        ring = [tuple(p) for p in feat["geometry"]["coordinates"][0]]
        assert len(ring) == 5 and ring[0] == ring[-1]
        assert ring_signed_area(ring) > 0  # counter-clockwise, as GeoJSON wants
        corners = [t * (x, y) for x, y in ((x1, y1), (x2, y1), (x2, y2), (x1, y2))]
        for corner in corners:
            hits = [p for p in ring[:4] if abs(p[0] - corner[0]) <= tol and abs(p[1] - corner[1]) <= tol]
            assert len(hits) == 1, (feat["id"], corner, ring)


def test_features_are_well_formed(samples):
    out, _, index = samples
    feats = truth(out, "utm")["features"]
    ids = [f["properties"]["id"] for f in feats]
    assert len(ids) == len(set(ids)) and all(f["id"] == f["properties"]["id"] for f in feats)
    cats = {f["properties"]["category"] for f in feats}
    assert cats == {"tank", "building", "field", "river", "road"}
    for f in feats:
        x1, y1, x2, y2 = f["properties"]["pixel_box"]
        assert 0 <= x1 < x2 <= SIZE and 0 <= y1 < y2 <= SIZE
        assert f["properties"]["expression"] in f["properties"]["expressions"]
    by_id = {f["properties"]["id"]: f for f in feats}
    for query in index["queries"]:
        assert query["ids"], query
        assert all(by_id[i]["properties"]["category"] == query["category"] for i in query["ids"])
    (largest,) = [q for q in index["queries"] if q["expression"] == "the largest storage tank"]
    (all_tanks,) = [q for q in index["queries"] if q["expression"] == "all storage tanks"]
    assert largest["mode"] == "one" and len(largest["ids"]) == 1
    assert set(all_tanks["ids"]) == {f["properties"]["id"] for f in feats if f["properties"]["category"] == "tank"}
    assert len(all_tanks["ids"]) >= 5


def _boxes(out: Path, category: str) -> dict[str, tuple[int, int, int, int]]:
    return {
        f["properties"]["id"]: tuple(f["properties"]["pixel_box"])
        for f in truth(out, "utm")["features"]
        if f["properties"]["category"] == category
    }


def test_tank_pixels_are_inside_their_boxes(samples):
    out, _, index = samples
    img = read_pixels(out / "utm.tif").transpose(1, 2, 0).astype(int)
    tanks = _boxes(out, "tank")
    bright = img.min(axis=2) >= 215  # tank roofs, and nothing else in the scene
    tankish = img.min(axis=2) >= 185  # roofs and rims
    inside = np.zeros(bright.shape, bool)
    for x1, y1, x2, y2 in tanks.values():
        inside[y1:y2, x1:x2] = True
    assert bright.sum() > 0
    assert not (bright & ~inside).any(), "bright roof pixels outside every tank box"
    assert not (tankish & ~inside).any()
    for tank_id, (x1, y1, x2, y2) in tanks.items():
        box = bright[y1:y2, x1:x2]
        assert box.mean() > 0.5, tank_id  # a disk fills pi/4 of its box
        # Tight: each edge of the box holds tank pixels, the ring just outside holds none.
        t = tankish
        assert t[y1, x1:x2].any() and t[y2 - 1, x1:x2].any() and t[y1:y2, x1].any() and t[y1:y2, x2 - 1].any()
        assert not t[y1 - 1, x1 - 1 : x2 + 1].any() and not t[y2, x1 - 1 : x2 + 1].any()
        assert not t[y1 - 1 : y2 + 1, x1 - 1].any() and not t[y1 - 1 : y2 + 1, x2].any()
    # One tank is clearly the largest, and it is the one the expression names.
    areas = {k: (x2 - x1) * (y2 - y1) for k, (x1, y1, x2, y2) in tanks.items()}
    (largest_q,) = [q for q in index["queries"] if q["expression"] == "the largest storage tank"]
    biggest = max(areas, key=areas.get)
    assert largest_q["ids"] == [biggest]
    assert all(areas[biggest] >= 1.5 * a for k, a in areas.items() if k != biggest)


def test_river_pixels_are_inside_the_river_box(samples):
    out, _, _ = samples
    img = read_pixels(out / "utm.tif").transpose(1, 2, 0).astype(int)
    water = (img[..., 0] < 60) & (img[..., 2] - img[..., 0] > 35)
    ((x1, y1, x2, y2),) = _boxes(out, "river").values()
    assert water.sum() > 1000
    assert not water[:, :x1].any() and not water[:, x2:].any()
    assert water[:, x1].any() or water[:, x1 + 1].any()
    assert (y1, y2) == (0, SIZE)  # the river runs from the top edge to the bottom edge


def test_same_pixels_in_every_raster(samples):
    out, _, _ = samples
    first = read_pixels(out / "utm.tif")
    for name in ("wgs84", "webmercator", "rotated"):
        assert np.array_equal(first, read_pixels(out / f"{name}.tif"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"size": 100}, "--size"), ({"size": 1024.0}, "--size"), ({"seed": -1}, "--seed"), ({"seed": "1"}, "--seed")],
)
def test_config_validation(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SampleDataConfig(out_dir=tmp_path, **kwargs)


def test_out_dir_that_is_a_file(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        SampleDataConfig(out_dir=path)


def test_command_line(tmp_path, caplog):
    out = tmp_path / "cli" / "nested"
    with caplog.at_level(logging.INFO):
        assert cli_main(["sample-data", str(out), "--size", "300", "--seed", "3"]) == 0
    assert str(out.resolve()) in caplog.text
    index = json.loads((out / "samples.json").read_text())
    assert index["size"] == 300 and index["seed"] == 3
    with rasterio.open(out / "rotated.tif") as src:
        assert (src.width, src.height) == (300, 300)


def test_command_line_reports_bad_size(tmp_path, capsys):
    assert cli_main(["sample-data", str(tmp_path), "--size", "10"]) == 1
    assert "--size" in capsys.readouterr().err


def test_default_size_is_fast(tmp_path):
    t0 = time.perf_counter()
    write_samples(SampleDataConfig(out_dir=tmp_path))  # 4 x 1024 x 1024
    elapsed = time.perf_counter() - t0
    assert elapsed < 6.0, f"sample-data took {elapsed:.2f} s (about 1 s expected on an idle machine)"


def test_true_masks_leave_the_pixels_as_they_were():
    """The label map takes no random draws: the image is the one render_scene draws, and each object's mask
    has exactly its true box as bounding box."""
    for seed in (0, 9100):
        image, objects = render_scene(SIZE, seed)
        again, same_objects, labels = render_scene_with_masks(SIZE, seed)
        assert np.array_equal(image, again) and objects == same_objects
        for k, obj in enumerate(objects):
            rows, cols = np.flatnonzero((labels == k + 1).any(axis=1)), np.flatnonzero((labels == k + 1).any(axis=0))
            assert (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1) == tuple(int(v) for v in obj.box.as_tuple())


def _area(polygon) -> float:
    return sum(
        abs(ring_signed_area([tuple(p) for p in ring])) * (1 if k == 0 else -1) for k, ring in enumerate(polygon)
    )


@pytest.mark.parametrize("name", list(EXPECTED_EPSG))
def test_outlines_are_the_true_masks_on_the_map(samples, name):
    """Each object's outline has the area of its visible pixels (pixel area from the transform), lies in its
    true box, and a tank's is a disk: about pi/4 of its box, where a building's fills its box."""
    out, _, index = samples
    entry = next(r for r in index["rasters"] if r["name"] == name)
    _, a, b, _, d, e = entry["transform"]
    pixel_area = abs(a * e - b * d)
    _, objects, labels = render_scene_with_masks(SIZE, 7)
    outlines = json.loads((out / entry["outlines"]).read_text())["features"]
    boxes = {feat["properties"]["id"]: feat for feat in truth(out, name)["features"]}
    assert [o["properties"]["id"] for o in outlines] == [o.id for o in objects] == list(boxes)
    for k, (feat, obj) in enumerate(zip(outlines, objects, strict=True)):
        assert feat["geometry"]["type"] == "MultiPolygon" and feat["properties"]["category"] == obj.category
        area = sum(_area(p) for p in feat["geometry"]["coordinates"])
        assert area == pytest.approx(int((labels == k + 1).sum()) * pixel_area, rel=1e-6)
        box_area = abs(ring_signed_area([tuple(p) for p in boxes[obj.id]["geometry"]["coordinates"][0]]))
        ratio = area / box_area
        if obj.category == "tank":
            assert 0.70 < ratio < 0.82, (obj.id, ratio)
        if obj.category in ("building", "field"):
            assert ratio == pytest.approx(1.0)
        if obj.category == "river":
            assert ratio < 0.6


def test_the_smallest_tank_is_named_only_where_it_is_clearly_the_smallest():
    from train.sample_data import SMALLEST_TANK

    named = 0
    for seed in range(12):
        _, objects = render_scene(512, seed)
        tanks = sorted((o for o in objects if o.category == "tank"), key=lambda o: o.box.width * o.box.height)
        chosen = [o for o in objects if SMALLEST_TANK in o.expressions]
        assert len(chosen) <= 1, seed
        if chosen:
            named += 1
            assert chosen == [tanks[0]], seed
            # radius <= 0.85 x the next one's: area about 0.72 x, under 0.8 x with the boxes' rounding
            assert tanks[0].box.width * tanks[0].box.height < 0.8 * tanks[1].box.width * tanks[1].box.height, seed
            assert "all storage tanks" in chosen[0].expressions
    assert 0 < named < 12  # about a third of the scenes
