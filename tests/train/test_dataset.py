"""Tests of train/dataset.py (``geo-r1 dataset``) on real files: annotation GeoPackages written over the
synthetic sample rasters (their truth is in map coordinates) and over a real NAIP tile."""

from __future__ import annotations

import json
import logging
import math
import sqlite3
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
pyogrio = pytest.importorskip("pyogrio")
shapely = pytest.importorskip("shapely")

from pyproj import Transformer  # noqa: E402

from engine.cli import main as cli_main  # noqa: E402
from geo_r1_qgis.core.annotations import LAYER_NAME, Annotation  # noqa: E402
from geo_r1_qgis.core.errors import ConfigError, NotGeoreferencedError, OutputError, RasterError  # noqa: E402
from geo_r1_qgis.core.geometry import Affine  # noqa: E402
from train import chips as cm  # noqa: E402
from train.data_format import SPLITS, read_manifest, read_records  # noqa: E402
from train.dataset import (  # noqa: E402
    CHIPS_INDEX,
    BuildConfig,
    FromJsonConfig,
    ImportConfig,
    SyntheticConfig,
    build_dataset,
    build_synthetic,
    expression_of,
    read_annotations,
    run_from_json,
    run_import,
    write_annotations,
)
from train.sample_data import SampleDataConfig, write_samples  # noqa: E402

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
NAIP = SHARED / "naip_m_4709963_se_14_20200831.tif"
NO_CRS = SHARED / "float_nan.tif"
RGB_BYTE = SHARED / "RGB.byte.tif"
CHIP = 112
EPS = 1e-6


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("samples")
    write_samples(SampleDataConfig(out_dir=out, seed=3, size=512))
    return out


def truth(samples: Path, name: str) -> dict:
    return json.loads((samples / f"{name}.objects.geojson").read_text())


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def import_truth(samples: Path, name: str, out: Path) -> Path:
    """The truth boxes of one sample raster as an annotation GeoPackage (expression = category)."""
    run_import(
        ImportConfig(
            layer=samples / f"{name}.objects.geojson",
            raster=samples / f"{name}.tif",
            expression_field="category",
            output=out,
        )
    )
    return out


@pytest.fixture(scope="module")
def utm_ann(samples, tmp_path_factory) -> Path:
    return import_truth(samples, "utm", tmp_path_factory.mktemp("ann") / "utm.gpkg")


@pytest.fixture(scope="module")
def utm_ds(utm_ann, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "utm"
    build_dataset(BuildConfig(annotations=(utm_ann,), out_dir=out, chip=CHIP, seed=1, negatives=2))
    return out


def expected_chip_boxes(features: list[dict], transform: Affine, chip: int) -> list[tuple[int, int, int, int]]:
    """Independently of the builder: map polygons -> chip pixels through the chip's own affine, the boxes
    more than half inside, floor/ceil, clipped."""
    inv = transform.inverse()
    out = []
    for f in features:
        pts = [inv * tuple(p) for p in f["geometry"]["coordinates"][0]]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        box = (min(xs), min(ys), max(xs), max(ys))
        if cm.inside_fraction(box, (0, 0, chip, chip)) <= 0.5:
            continue
        out.append(
            (
                max(0, math.floor(box[0] + EPS)),
                max(0, math.floor(box[1] + EPS)),
                min(chip, math.ceil(box[2] - EPS)),
                min(chip, math.ceil(box[3] - EPS)),
            )
        )
    return sorted(out)


def check_against_truth(ds: Path, feats: list[dict], chip: int) -> int:
    chips = {c["id"]: c for c in jsonl(ds / CHIPS_INDEX)}
    by_cat: dict[str, list[dict]] = {}
    for f in feats:
        by_cat.setdefault(f["properties"]["category"], []).append(f)
    n = 0
    for split in SPLITS:
        multi = read_records(ds, split, "multi")
        rec = {r.id.rsplit("-", 1)[0]: r for r in read_records(ds, split, "rec")}
        for r in multi:
            chip_id = r.id.rsplit("-", 1)[0]
            entry = chips[chip_id]
            assert r.image == entry["image"] and (ds / r.image).is_file()
            assert r.image_size == (chip, chip)
            expected = expected_chip_boxes(by_cat[r.expression], Affine(*entry["transform"]), chip)
            assert list(r.boxes) == expected, (chip_id, r.expression)
            assert r.negative == (not expected)
            if chip_id in rec:
                assert len(expected) == 1 and rec[chip_id].boxes == r.boxes and rec[chip_id].is_unique is True
            elif len(expected) > 1:
                assert r.is_unique is False
            n += 1
    return n


# --------------------------------------------------------------------------------------------------
# build: boxes, pixels, manifest
# --------------------------------------------------------------------------------------------------


def test_boxes_match_the_map_truth_to_the_pixel(utm_ds, samples):
    n = check_against_truth(utm_ds, truth(samples, "utm")["features"], CHIP)
    assert n > 50


@pytest.mark.parametrize(("name", "gsd"), [("rotated", None), ("utm", 1.0)])
def test_boxes_match_truth_rotated_and_resampled(samples, tmp_path, name, gsd):
    ann = import_truth(samples, name, tmp_path / "a.gpkg")
    out = tmp_path / "ds"
    manifest = build_dataset(BuildConfig(annotations=(ann,), out_dir=out, chip=CHIP, gsd=gsd, negatives=1))
    assert check_against_truth(out, truth(samples, name)["features"], CHIP) > 20
    if gsd:
        assert manifest["gsd_m"] == pytest.approx(gsd)
        assert all(c["window"][2] - c["window"][0] == 224 for c in jsonl(out / CHIPS_INDEX))


def test_chip_pixels_are_the_raster_window(utm_ds, samples):
    from PIL import Image

    with rasterio.open(samples / "utm.tif") as src:
        for c in jsonl(utm_ds / CHIPS_INDEX)[:10]:
            x1, y1, x2, y2 = c["window"]
            window = src.read(window=rasterio.windows.Window(x1, y1, x2 - x1, y2 - y1))
            png = np.asarray(Image.open(utm_ds / c["image"]))
            assert png.shape == (CHIP, CHIP, 3)
            assert np.array_equal(png, window.transpose(1, 2, 0))


def test_targets_not_always_centred(utm_ds):
    offsets = set()
    for r in read_records(utm_ds, "train", "rec") + read_records(utm_ds, "val", "rec"):
        b = r.boxes[0]
        offsets.add(((b[0] + b[2]) // 8, (b[1] + b[3]) // 8))
    assert len(offsets) > 3


def test_manifest(utm_ds, utm_ann):
    m = read_manifest(utm_ds)
    assert m["frame"] == "image" and "multiples of 28" in m["frame_note"]
    assert m["chip"] == CHIP and m["seed"] == 1 and m["crs"] == "EPSG:32614"
    assert m["gsd_m"] == pytest.approx(0.5)
    assert m["sources"][0]["native_gsd_m"] == pytest.approx(0.5)
    assert m["annotations_sha256"] == read_annotations(utm_ann).sha256
    assert m["command"]["config"]["chip"] == CHIP
    for split in SPLITS:
        for task in ("rec", "multi"):
            assert sum(m["counts"][split][task].values()) == len(read_records(utm_ds, split, task))
    assert m["skipped"]["bigger than a chip"] == 3  # the river and two roads


def test_eval_json(utm_ds):
    for split in ("val", "test"):
        recs = read_records(utm_ds, split, "rec")
        plain = json.loads((utm_ds / f"{split}_rec.json").read_text())
        unique = json.loads((utm_ds / f"{split}_rec_with_unique.json").read_text())
        assert [p["image"] for p in plain] == [r.image for r in recs]
        assert [p["problem"] for p in plain] == [r.question for r in recs]
        assert [p["solution"] for p in plain] == [list(r.boxes[0]) for r in recs]
        assert [u["is_unique"] for u in unique] == [r.is_unique for r in recs]
    assert read_records(utm_ds, "val", "rec"), "the default val fraction gives val queries"


def test_negatives(utm_ds):
    chips = {c["id"]: c for c in jsonl(utm_ds / CHIPS_INDEX)}
    negs = [r for s in SPLITS for r in read_records(utm_ds, s, "multi") if r.negative]
    assert negs
    for r in negs:
        assert r.boxes == () and "None" in r.solution_text
        assert chips[r.id.rsplit("-", 1)[0]]["annotation"] is None


def test_big_targets_are_named_in_a_warning(utm_ann, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="train.dataset"):
        build_dataset(BuildConfig(annotations=(utm_ann,), out_dir=tmp_path / "ds", chip=CHIP, negatives=0))
    text = caplog.text
    assert "('river') of utm.gpkg" in text and "bigger than a 112-pixel chip" in text and "--gsd" in text


def test_determinism(utm_ann, utm_ds, tmp_path):
    again = tmp_path / "again"
    build_dataset(BuildConfig(annotations=(utm_ann,), out_dir=again, chip=CHIP, seed=1, negatives=2))
    names = [p.name for p in utm_ds.glob("*.jsonl")] + [
        p.name for p in utm_ds.glob("*.json") if p.name != "dataset.json"
    ]
    assert len(names) >= 9
    for name in names:
        assert (again / name).read_bytes() == (utm_ds / name).read_bytes(), name
    pngs = sorted(p.relative_to(utm_ds) for p in utm_ds.glob("images/*/*.png"))
    assert pngs == sorted(p.relative_to(again) for p in again.glob("images/*/*.png"))
    assert all((again / p).read_bytes() == (utm_ds / p).read_bytes() for p in pngs)
    other = tmp_path / "other"
    build_dataset(BuildConfig(annotations=(utm_ann,), out_dir=other, chip=CHIP, seed=2, negatives=2))
    assert (other / CHIPS_INDEX).read_bytes() != (utm_ds / CHIPS_INDEX).read_bytes()


# --------------------------------------------------------------------------------------------------
# import and the spatial split on a real NAIP tile
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def naip_layer(tmp_path_factory) -> tuple[Path, list[list[tuple[float, float]]], list[str]]:
    """40 random boxes on the NAIP tile, written as an RFC 7946 GeoJSON (EPSG:4326), with a split field."""
    with rasterio.open(NAIP) as src:
        t, crs, w, h = src.transform, src.crs, src.width, src.height
    rng = np.random.default_rng(0)
    to_ll = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    feats, rings, splits = [], [], []
    for k in range(40):
        bw, bh = rng.integers(6, 20, 2)
        x, y = int(rng.integers(10, w - bw - 10)), int(rng.integers(10, h - bh - 10))
        ring = [t * p for p in ((x, y), (x + bw, y), (x + bw, y + bh), (x, y + bh), (x, y))]
        ll = [list(to_ll.transform(*p)) for p in ring]
        split = "test" if k % 10 == 0 else "train"
        feats.append(
            {
                "type": "Feature",
                "properties": {"kind": "farm patch" if k % 2 else "field corner", "part": split},
                "geometry": {"type": "Polygon", "coordinates": [ll]},
            }
        )
        rings.append(ring)
        splits.append(split)
    path = tmp_path_factory.mktemp("naip") / "patches.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path, rings, splits


@pytest.fixture(scope="module")
def naip_ann(naip_layer, tmp_path_factory) -> Path:
    layer, _, _ = naip_layer
    out = tmp_path_factory.mktemp("naip-ann") / "ann.gpkg"
    n = run_import(
        ImportConfig(
            layer=layer, raster=NAIP, expression_field="kind", split_field="part", category="patch", output=out
        )
    )
    assert n == 40
    return out


def test_import_reprojects_to_the_raster_crs(naip_ann, naip_layer):
    _, rings, splits = naip_layer
    aset = read_annotations(naip_ann)
    assert aset.crs == "EPSG:26914"
    assert len(aset.features) == 40
    for f, ring, split in zip(aset.features, rings, splits, strict=True):
        got = shapely.get_coordinates(f.geometry)
        assert len(got) == len(ring)
        assert shapely.hausdorff_distance(shapely.Polygon(ring), f.geometry) < 1e-3  # metres
        assert f.annotation.raster == str(NAIP.resolve())
        assert f.annotation.category == "patch" and f.annotation.split == split


def test_import_appends(naip_layer, tmp_path):
    layer, _, _ = naip_layer
    out = tmp_path / "ann.gpkg"
    for _ in range(2):
        run_import(ImportConfig(layer=layer, raster=NAIP, expression="patch", output=out))
    assert len(read_annotations(out).features) == 80


def test_import_appending_another_crs_is_refused(naip_layer, samples, tmp_path):
    layer, _, _ = naip_layer
    out = tmp_path / "ann.gpkg"
    run_import(ImportConfig(layer=layer, raster=NAIP, expression="patch", output=out))
    with pytest.raises(OutputError, match="another annotation file"):
        run_import(
            ImportConfig(layer=samples / "utm.objects.geojson", raster=samples / "utm.tif", expression="x", output=out)
        )


def test_import_from_wgs84_onto_a_utm_raster(samples, tmp_path):
    utm = truth(samples, "utm")
    to_ll = Transformer.from_crs("EPSG:32614", "EPSG:4326", always_xy=True)
    for f in utm["features"]:
        f["geometry"]["coordinates"] = [[list(to_ll.transform(*p)) for p in f["geometry"]["coordinates"][0]]]
    del utm["crs"]  # RFC 7946: longitude, latitude
    layer = tmp_path / "ll.geojson"
    layer.write_text(json.dumps(utm))
    ann = tmp_path / "ll.gpkg"
    run_import(ImportConfig(layer=layer, raster=samples / "utm.tif", expression_field="category", output=ann))
    original = truth(samples, "utm")["features"]
    got = read_annotations(ann).features
    assert len(got) == len(original)
    for f, o in zip(got, original, strict=True):
        assert shapely.hausdorff_distance(shapely.Polygon(o["geometry"]["coordinates"][0]), f.geometry) < 1e-3
    # and the chips built from it still match the map truth to the pixel
    ds = tmp_path / "ds"
    build_dataset(BuildConfig(annotations=(ann,), out_dir=ds, chip=CHIP, negatives=0, val_fraction=0.0))
    assert check_against_truth(ds, original, CHIP) > 20


def test_spatial_split_never_overlaps(naip_ann, tmp_path):
    out = tmp_path / "ds"
    manifest = build_dataset(
        BuildConfig(
            annotations=(naip_ann,), out_dir=out, chip=56, chips_per_box=3, val_fraction=0.3, cell_chips=2, negatives=3
        )
    )
    chips = jsonl(out / CHIPS_INDEX)
    by_split = {s: [c["window"] for c in chips if c["split"] == s] for s in SPLITS}
    assert all(by_split[s] for s in SPLITS), {s: len(v) for s, v in by_split.items()}
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                for wa in by_split[a]:
                    assert cm.disjoint_from(wa, by_split[b]), (a, b, wa)
    assert manifest["val_fraction"] == 0.3 and manifest["crs"] == "EPSG:26914"
    # the split field decided the test annotations; nothing else is test
    test_fids = {c["annotation"]["fid"] for c in chips if c["split"] == "test" and c["annotation"]}
    assert test_fids and test_fids <= {1, 11, 21, 31}
    assert manifest["sources"][0]["native_gsd_m"] == pytest.approx(5.0)


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_import_raster_without_crs(naip_layer, tmp_path, capsys):
    layer, _, _ = naip_layer
    with pytest.raises(NotGeoreferencedError, match="no CRS"):
        run_import(ImportConfig(layer=layer, raster=NO_CRS, expression="x", output=tmp_path / "a.gpkg"))
    rc = cli_main(
        ["dataset", "import", str(layer), "--raster", str(NO_CRS), "--expression", "x", "-o", str(tmp_path / "a.gpkg")]
    )
    assert rc == 1
    assert "no CRS" in one_line_error(capsys)
    assert not (tmp_path / "a.gpkg").exists()


@pytest.mark.filterwarnings("ignore:'crs' was not provided")
def test_import_layer_without_crs(tmp_path):
    layer = tmp_path / "nocrs.gpkg"
    pyogrio.raw.write(
        layer,
        np.array([shapely.to_wkb(shapely.box(0, 0, 1, 1))], dtype=object),
        [np.array(["x"], dtype=object)],
        ["name"],
        layer="boxes",
        driver="GPKG",
        geometry_type="Polygon",
    )
    with pytest.raises(ConfigError, match=r"has no CRS.*ogr2ogr -a_srs"):
        run_import(ImportConfig(layer=layer, raster=NAIP, expression="x", output=tmp_path / "a.gpkg"))


def test_import_layer_outside_the_raster(samples, tmp_path):
    with pytest.raises(ConfigError, match="all outside"):
        run_import(
            ImportConfig(
                layer=samples / "wgs84.objects.geojson", raster=NAIP, expression="x", output=tmp_path / "a.gpkg"
            )
        )


def test_import_needs_one_expression_source(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of --expression"):
        ImportConfig(layer=tmp_path / "l.gpkg", raster=NAIP, output=tmp_path / "a.gpkg")
    with pytest.raises(ConfigError, match=r"\.gpkg"):
        ImportConfig(layer=tmp_path / "l.gpkg", raster=NAIP, output=tmp_path / "a.json", expression="x")


def test_unwritable_output(utm_ann, tmp_path, capsys):
    blocker = tmp_path / "somefile.txt"
    blocker.write_text("not a folder")
    rc = cli_main(["dataset", "build", str(utm_ann), "-o", str(blocker / "sub"), "--chip", "112"])
    assert rc == 1
    assert "cannot create the output folder" in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["somefile.txt"]


def test_existing_output_is_not_overwritten(utm_ann, tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputError, match="--overwrite"):
        build_dataset(BuildConfig(annotations=(utm_ann,), out_dir=out, chip=CHIP))
    build_dataset(BuildConfig(annotations=(utm_ann,), out_dir=out, chip=CHIP, overwrite=True, negatives=0))
    assert not (out / "keep.txt").exists() and (out / "dataset.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_chip_must_be_a_multiple_of_28(utm_ann, tmp_path, capsys):
    with pytest.raises(ConfigError, match="476 or 504"):
        BuildConfig(annotations=(utm_ann,), out_dir=tmp_path / "ds", chip=500)
    assert cli_main(["dataset", "build", str(utm_ann), "-o", str(tmp_path / "ds"), "--chip", "500"]) == 1
    assert "476 or 504" in one_line_error(capsys)


def _ann_file(path: Path, raster: str, boxes: list[tuple[float, float, float, float]], crs: str) -> Path:
    items = [
        (Annotation(expression="thing", raster=raster, created="2025-01-01T00:00:00+00:00"), shapely.box(*b))
        for b in boxes
    ]
    write_annotations(path, items, crs)
    return path


def test_missing_raster(tmp_path):
    ann = _ann_file(tmp_path / "a.gpkg", str(tmp_path / "gone.tif"), [(0, 0, 1, 1)], "EPSG:32614")
    with pytest.raises(RasterError, match="does not exist"):
        build_dataset(BuildConfig(annotations=(ann,), out_dir=tmp_path / "ds"))
    assert not (tmp_path / "ds").exists() and not (tmp_path / "ds.tmp").exists()


def test_build_raster_without_crs(tmp_path):
    ann = _ann_file(tmp_path / "a.gpkg", str(NO_CRS), [(0, 0, 1, 1)], "EPSG:32614")
    with pytest.raises(NotGeoreferencedError, match="no CRS"):
        build_dataset(BuildConfig(annotations=(ann,), out_dir=tmp_path / "ds"))


def test_empty_layer(tmp_path):
    ann = _ann_file(tmp_path / "a.gpkg", str(NAIP), [(0, 0, 1, 1)], "EPSG:26914")
    with sqlite3.connect(ann) as con:
        con.execute(f'DELETE FROM "{LAYER_NAME}"')
    with pytest.raises(ConfigError, match="empty"):
        build_dataset(BuildConfig(annotations=(ann,), out_dir=tmp_path / "ds"))


def test_not_an_annotation_file(naip_layer, tmp_path):
    layer, _, _ = naip_layer
    with pytest.raises(ConfigError, match="dataset import"):
        build_dataset(BuildConfig(annotations=(layer,), out_dir=tmp_path / "ds"))


def test_outside_and_nodata_only_are_skipped(tmp_path, caplog):
    with rasterio.open(RGB_BYTE) as src:
        t = src.transform
    corner = (*(t * (2, 10)), *(t * (10, 2)))  # in the nodata border
    centre = (*(t * (380, 390)), *(t * (390, 380)))
    far = (0.0, 0.0, 10.0, 10.0)
    ann = _ann_file(tmp_path / "a.gpkg", str(RGB_BYTE), [corner, centre, far], "EPSG:32618")
    with caplog.at_level(logging.WARNING, logger="train.dataset"):
        m = build_dataset(BuildConfig(annotations=(ann,), out_dir=tmp_path / "ds", chip=56, negatives=0))
    assert m["skipped"]["outside the raster"] == 1
    assert m["skipped"]["nodata only"] >= 1
    assert "outside the raster" in caplog.text
    assert read_records(tmp_path / "ds", "train", "multi") or read_records(tmp_path / "ds", "val", "multi")


def test_hash_ignores_feature_order(tmp_path):
    boxes = [(0, 0, 1, 1), (5, 5, 7, 8), (2, 3, 4, 5)]
    a = _ann_file(tmp_path / "a.gpkg", str(NAIP), boxes, "EPSG:26914")
    b = _ann_file(tmp_path / "b.gpkg", str(NAIP), boxes[::-1], "EPSG:26914")
    c = _ann_file(tmp_path / "c.gpkg", str(NAIP), [*boxes[:2], (2, 3, 4, 6)], "EPSG:26914")
    assert read_annotations(a).sha256 == read_annotations(b).sha256 != read_annotations(c).sha256


# --------------------------------------------------------------------------------------------------
# synthetic and from-json
# --------------------------------------------------------------------------------------------------


def _train_targets(ds: Path) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for c in jsonl(ds / CHIPS_INDEX):
        if c["split"] == "train" and c["annotation"] and not c["negative"]:
            out.setdefault(c["expression"], set()).add(c["annotation"]["fid"])
    return out


def test_synthetic_few_shot(tmp_path):
    ten = build_synthetic(SyntheticConfig(out_dir=tmp_path / "k10", shots=10, seed=4))
    build_synthetic(SyntheticConfig(out_dir=tmp_path / "k2", shots=2, seed=4))
    t10, t2 = _train_targets(tmp_path / "k10"), _train_targets(tmp_path / "k2")
    assert set(t10) == set(t2) == {"storage tank", "building"}
    for e in t10:
        assert len(t10[e]) == 10 and len(t2[e]) == 2
        assert t2[e] <= t10[e]  # the 2-shot set is a subset of the 10-shot set
    assert ten["frame"] == "image" and ten["chip"] == 112 and ten["kind"] == "synthetic"
    chips = jsonl(tmp_path / "k10" / CHIPS_INDEX)
    rasters = {s: {c["raster"] for c in chips if c["split"] == s} for s in SPLITS}
    assert not rasters["train"] & rasters["val"] and not rasters["train"] & rasters["test"]
    assert not rasters["val"] & rasters["test"]
    for split in SPLITS:
        assert read_records(tmp_path / "k10", split, "rec"), split
        for r in read_records(tmp_path / "k10", split, "rec"):
            b = r.boxes[0]
            assert 0.1 * CHIP <= max(b[2] - b[0], b[3] - b[1]) <= 0.55 * CHIP
    assert (tmp_path / "k10" / "annotations.gpkg").is_file()
    build_synthetic(SyntheticConfig(out_dir=tmp_path / "k2-again", shots=2, seed=4))
    for name in ("train_rec.jsonl", "train_multi.jsonl", "val_rec.json", "test_multi.jsonl", CHIPS_INDEX):
        assert (tmp_path / "k2" / name).read_bytes() == (tmp_path / "k2-again" / name).read_bytes()
    assert "k2.tmp" not in (tmp_path / "k2" / "dataset.json").read_text()
    assert read_manifest(tmp_path / "k10")["sources"][0]["path"].startswith("rasters/")


def test_synthetic_held_out_category_in_the_sample_models_words(tmp_path):
    """The few-shot miniature's set (issue 18 §4): buildings only, in the sample model's "all ..." words, two
    test scenes, and a cross-resolution copy read at a coarser ground resolution."""
    config = SyntheticConfig(out_dir=tmp_path / "b", shots=1, seed=2, categories="building", style="all",
                             test_scenes=2)  # fmt: skip
    assert config.categories == ("building",)
    build_synthetic(config)
    chips = jsonl(tmp_path / "b" / CHIPS_INDEX)
    assert {c["expression"] for c in chips} == {"all buildings"}
    rasters = {s: {c["raster"] for c in chips if c["split"] == s} for s in SPLITS}
    assert len(rasters["test"]) == 2 and len(rasters["val"]) == 1
    assert len(_train_targets(tmp_path / "b")["all buildings"]) == 1
    build_synthetic(replace(config, out_dir=tmp_path / "coarse", gsd=0.75))
    native = read_records(tmp_path / "b", "test", "multi")
    wider = read_records(tmp_path / "coarse", "test", "multi")
    size = lambda rs: sorted(b[2] - b[0] for r in rs for b in r.boxes)  # noqa: E731
    assert size(wider)[len(size(wider)) // 2] < size(native)[len(size(native)) // 2]  # objects look smaller


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"categories": "tank,river"}, "--categories must name"), ({"style": "long"}, "--style must be"),
     ({"test_scenes": 0}, "--test-scenes"), ({"gsd": -1.0}, "--gsd must be")],
)  # fmt: skip
def test_synthetic_refuses_bad_options(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SyntheticConfig(out_dir=tmp_path / "x", shots=1, **kwargs)


def test_expression_of():
    prefix = "Please provide the bounding box coordinate of the region this sentence describes: "
    assert expression_of(prefix + "the red car") == "the red car"
    assert expression_of("  the red car ") == "the red car"


def test_from_json(tmp_path):
    from PIL import Image

    images = tmp_path / "imgs"
    (images / "a").mkdir(parents=True)
    (images / "b").mkdir()
    Image.new("RGB", (500, 375), (10, 20, 30)).save(images / "a" / "one.png")
    Image.new("RGB", (640, 480), (10, 20, 30)).save(images / "b" / "two.jpg")
    prefix = "Please provide the bounding box coordinate of the region this sentence describes: "
    items = [
        {"image": "a/one.png", "problem": prefix + "the red car", "solution": [10, 20, 50, 60]},
        {"image": "b/two.jpg", "problem": "the white building", "solution": [100, 100, 200, 150]},
        {"image": "a/one.png", "problem": "the shadow", "solution": [480, 300, 520, 400]},
    ]
    (tmp_path / "eval.json").write_text(json.dumps(items))
    (tmp_path / "eval_with_unique.json").write_text(json.dumps([{**items[0], "is_unique": True}]))
    out = tmp_path / "ds"
    rc = cli_main(
        [
            "dataset", "from-json", str(tmp_path / "eval.json"), "--images", str(images), "-o", str(out),
            "--unique", str(tmp_path / "eval_with_unique.json"),
        ]
    )  # fmt: skip
    assert rc == 0
    recs = read_records(out, "test", "rec")
    assert [r.expression for r in recs] == ["the red car", "the white building", "the shadow"]
    assert [r.image_size for r in recs] == [(500, 375), (640, 480), (500, 375)]
    assert [r.is_unique for r in recs] == [True, None, None]
    assert recs[2].boxes == ((480, 300, 500, 375),)  # clipped to the image
    assert all((out / r.image).is_file() for r in recs)
    assert recs[1].image == "images/test/b/two.jpg"
    plain = json.loads((out / "test_rec.json").read_text())
    assert plain[0] == {
        "image": "images/test/a/one.png",
        "problem": prefix + "the red car",
        "solution": [10, 20, 50, 60],
    }
    assert len(json.loads((out / "test_rec_with_unique.json").read_text())) == 1
    assert read_manifest(out)["frame"] == "image"


def test_from_json_missing_image(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "eval.json").write_text(json.dumps([{"image": "x.png", "problem": "a car", "solution": [0, 0, 1, 1]}]))
    with pytest.raises(ConfigError, match="does not exist"):
        run_from_json(
            FromJsonConfig(eval_json=tmp_path / "eval.json", images=tmp_path / "imgs", out_dir=tmp_path / "o")
        )
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.tmp").exists()


def test_cli_build_prints_a_summary(utm_ann, tmp_path, capsys):
    rc = cli_main(["dataset", "build", str(utm_ann), "-o", str(tmp_path / "ds"), "--chip", "112", "--seed", "3"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "dataset written to" in out and "train" in out and "multi" in out


def test_drawn_negative_areas_become_none_chips(samples, tmp_path):
    with rasterio.open(samples / "utm.tif") as src:
        t = src.transform
    tanks = [f for f in truth(samples, "utm")["features"] if f["properties"]["category"] == "tank"]
    items = [
        (
            Annotation(expression="tank", raster=str(samples / "utm.tif"), created="2025-01-01T00:00:00+00:00"),
            shapely.Polygon(f["geometry"]["coordinates"][0]),
        )
        for f in tanks
    ]
    empty = shapely.box(*(t * (60, 380)), *(t * (90, 350)))  # among the fields, far from the tank pad
    items.append(
        (
            Annotation(
                expression="tank", raster=str(samples / "utm.tif"), negative=True, created="2025-01-01T00:00:00+00:00"
            ),
            empty,
        )
    )
    ann = tmp_path / "a.gpkg"
    write_annotations(ann, items, "EPSG:32614")
    out = tmp_path / "ds"
    build_dataset(BuildConfig(annotations=(ann,), out_dir=out, chip=CHIP, negatives=0, val_fraction=0.0))
    chips = {c["id"]: c for c in jsonl(out / CHIPS_INDEX)}
    drawn = [c for c in chips.values() if c["annotation"] and c["annotation"]["fid"] == len(items)]
    assert len(drawn) == 4 and all(c["negative"] for c in drawn)
    negs = {r.id.rsplit("-", 1)[0]: r for r in read_records(out, "train", "multi") if r.negative}
    assert {c["id"] for c in drawn} <= set(negs)
    for c in drawn:
        x1, y1, x2, y2 = c["window"]
        assert x1 <= 60 and x2 >= 90 and y1 <= 350 and y2 >= 380
        assert expected_chip_boxes(tanks, Affine(*c["transform"]), CHIP) == []


# --------------------------------------------------------------------------------------------------
# gres: outlines in chip pixels, masks and keypoints
# --------------------------------------------------------------------------------------------------


def check_gres_against_truth(ds: Path, feats: list[dict], chip: int) -> tuple[int, dict[str, float]]:
    """Each gres record's outlines against the map truth mapped independently through the chip's own affine;
    the keypoints inside their object's mask; the same boxes as the chip's multi record. Returns the number of
    objects checked and, per expression, the mean share of its box that an object's mask fills."""
    from geo_r1_qgis.core.rules.gres_truth import object_mask, truth_mask
    from geo_r1_qgis.core.rules.parsing import gres_answer

    chips = {c["id"]: c for c in jsonl(ds / CHIPS_INDEX)}
    by_cat: dict[str, list[dict]] = {}
    for f in feats:
        by_cat.setdefault(f["properties"]["category"], []).append(f)
    objects, ratios = 0, {}
    for split in SPLITS:
        multi = {r.id.rsplit("-", 1)[0]: r for r in read_records(ds, split, "multi")}
        gres = read_records(ds, split, "gres")
        assert len(gres) == len(multi)
        for r in gres:
            chip_id = r.id.rsplit("-", 1)[0]
            assert multi[chip_id].boxes == r.boxes and r.negative == multi[chip_id].negative
            inv = Affine(*chips[chip_id]["transform"]).inverse()
            expected = {}
            for f in by_cat[r.expression]:
                pts = [inv * tuple(p) for p in f["geometry"]["coordinates"][0]]
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                box = (min(xs), min(ys), max(xs), max(ys))
                if cm.inside_fraction(box, (0, 0, chip, chip)) > 0.5:
                    expected[cm.chip_box(box, (0, 0, chip, chip), chip)] = pts
            assert sorted(expected) == list(r.boxes)
            for box, outline, (k1, k2) in zip(r.boxes, r.outlines, r.keypoints, strict=True):
                ring = outline[0][0]  # the sample objects are single polygons without holes
                assert len(outline) == 1 and len(outline[0]) == 1
                assert np.allclose(ring, expected[box], atol=0.006), (chip_id, box)
                mask = object_mask(outline, r.image_size)
                assert mask[k1[1], k1[0]] and mask[k2[1], k2[0]], (chip_id, box, k1, k2)
                ys_, xs_ = np.nonzero(mask)
                assert box[0] <= xs_.min() and xs_.max() < box[2] and box[1] <= ys_.min() and ys_.max() < box[3]
                ratios.setdefault(r.expression, []).append(mask.sum() / ((box[2] - box[0]) * (box[3] - box[1])))
                objects += 1
            # the target answer reads back, through the engine's GRES parse, as these boxes and keypoints
            items = gres_answer(f"<think> t </think> <answer>{r.solution_text}</answer>")
            assert [tuple(map(int, it.box)) for it in items] == list(r.boxes)
            assert [tuple(tuple(map(int, p)) for p in it.points) for it in items] == list(r.keypoints)
            assert truth_mask(r.outlines, r.image_size).any() == bool(r.boxes)
    return objects, {k: sum(v) / len(v) for k, v in ratios.items()}


def test_gres_outlines_match_the_map_truth(utm_ds, samples):
    n, fill = check_gres_against_truth(utm_ds, truth(samples, "utm")["features"], CHIP)
    assert n > 50
    assert min(fill.values()) > 0.8  # the sample scenes' outlines are rectangles: their masks fill their boxes


def test_gres_masks_follow_the_outline_not_the_box(samples, tmp_path):
    """A disc and a triangle drawn on the UTM raster: their masks fill pi/4 and 1/2 of their boxes."""
    with rasterio.open(samples / "utm.tif") as src:
        t, crs = src.transform, src.crs.to_wkt()
    x0, y0 = t * (200, 200)  # map coordinates of raster pixel (200, 200)
    px = t.a  # metres per pixel
    disc = shapely.Point(x0, y0).buffer(20 * px, quad_segs=32)  # 40 pixels across
    tri = shapely.Polygon([(x0 + 60 * px, y0), (x0 + 100 * px, y0), (x0 + 60 * px, y0 - 40 * px)])
    items = [(Annotation(expression=e, raster=str(samples / "utm.tif"), split="train"), g)
             for e, g in (("disc", disc), ("triangle", tri))]  # fmt: skip
    write_annotations(tmp_path / "a.gpkg", items, crs)
    build_dataset(BuildConfig(annotations=(tmp_path / "a.gpkg",), out_dir=tmp_path / "ds", chip=CHIP, negatives=0,
                              val_fraction=0.0, chips_per_box=2))  # fmt: skip
    feats = [{"properties": {"category": e}, "geometry": shapely.geometry.mapping(g)} for (a, g), e in
             zip(items, ("disc", "triangle"), strict=True)]  # fmt: skip
    n, fill = check_gres_against_truth(tmp_path / "ds", feats, CHIP)
    assert n == 4
    assert fill["disc"] == pytest.approx(math.pi / 4, abs=0.03)
    assert fill["triangle"] == pytest.approx(0.5, abs=0.03)


def test_gres_negatives_are_answered_none(utm_ds):
    negatives = [r for s in SPLITS for r in read_records(utm_ds, s, "gres") if r.negative]
    assert negatives
    assert all(r.boxes == () and r.outlines == () and r.keypoints == () and r.solution_text == "None"
               for r in negatives)  # fmt: skip
