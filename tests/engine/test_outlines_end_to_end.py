"""Outlines that land on the objects: ``geo-r1 serve --model resources/sample_model --sam resources/sample_sam`` and
``geo-r1 ground --outline`` on the four rasters of a scene neither model saw (seed 9100), checked against the
scene's true outlines (``<name>.outlines.geojson``) polygon against polygon, on the map, in the raster's CRS.

Tanks are disks, so their boxes are poor outlines (a disk covers pi/4 of its box); the sample SAM's outlines must
match the true outlines better than the boxes do. Measured figures are in the constants below; each threshold
leaves a margin (one tank, or a few hundredths of IoU)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from _serve_helpers import serving

from engine.cli import main as cli
from geo_r1_qgis.core.gpkg_schema import OUTLINE_SUFFIX, find_runs

shapely = pytest.importorskip("shapely", reason="polygon IoU on the map is computed with shapely (the [train] extra)")
pyogrio = pytest.importorskip("pyogrio", reason="the GeoPackage layers are read with pyogrio")
from shapely.geometry import shape  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "resources" / "sample_model"
SAM = ROOT / "resources" / "sample_sam"
SEED = 9100  # tests/geo_r1_qgis/_real_engine.UNSEEN_SEED: beyond both models' training (0-199) and held-out seeds
EPSG = {"utm": 32614, "wgs84": 4326, "webmercator": 3857, "rotated": 32614}
RASTERS = tuple(EPSG)
OPTS = ["--mode", "all", "--overlap", "64", "--max-new-tokens", "384", "--outline", "--no-progress"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    from train.sample_data import SampleDataConfig, write_samples

    out = tmp_path_factory.mktemp("outline-e2e")
    write_samples(SampleDataConfig(out_dir=out, seed=SEED))
    return out


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = ["--model", str(MODEL), "--sam", str(SAM), "--device", "cpu"]
    for e in serving(tmp_path_factory.mktemp("outline-engine"), args):
        yield ["--engine", e.url, "--token-file", str(e.token_file)]


def _layer(path: Path, layer: str) -> list:
    from pyogrio.raw import read

    _, _, geometry, _ = read(path, layer=layer)
    return [shapely.from_wkb(g) for g in geometry]


def ground(scenes: Path, engine: list[str], raster: str, expression: str) -> tuple[list, list, str]:
    """(boxes, outlines) on the map, and the run's CRS as WKT."""
    gpkg = scenes / f"{raster}-{expression.replace(' ', '_')}.gpkg"
    gpkg.unlink(missing_ok=True)
    assert cli(["ground", str(scenes / f"{raster}.tif"), expression, "-o", str(gpkg), *OPTS, *engine]) == 0
    (run,) = find_runs(gpkg)
    assert json.loads(run.parameters)["outline"] is True
    layers = set(pyogrio.list_layers(gpkg)[:, 0])
    outlines = _layer(gpkg, run.layer + OUTLINE_SUFFIX) if run.layer + OUTLINE_SUFFIX in layers else []
    crs = pyogrio.read_info(gpkg, layer=run.layer)["crs"]
    if outlines:
        assert pyogrio.read_info(gpkg, layer=run.layer + OUTLINE_SUFFIX)["crs"] == crs
    return _layer(gpkg, run.layer), outlines, crs


def true_outlines(scenes: Path, raster: str, category: str) -> list:
    features = json.loads((scenes / f"{raster}.outlines.geojson").read_text(encoding="utf-8"))["features"]
    return [shape(f["geometry"]) for f in features if f["properties"]["category"] == category]


def iou(a, b) -> float:
    union = a.union(b).area
    return a.intersection(b).area / union if union else 0.0


def best_ious(predicted: list, truth: list) -> list[float]:
    """For each true object, its best IoU with any predicted polygon (0 when none touches it)."""
    return [max((iou(p, t) for p in predicted), default=0.0) for t in truth]


def test_tank_outlines_land_on_the_tanks_on_each_raster(scenes, engine):
    """Measured (resources/sample_sam with the shipped sample model): on each raster the boxes find 5 of the 7
    tanks (8 boxes, 7 outlines: SAM leaves one false box empty); the outlines of those 5 have IoU 0.947-0.982 with
    the true disks (mean 0.966), the boxes 0.633-0.789 (mean 0.726). The same figures on all four rasters.
    Another category cannot be checked end to end here: the sample VLM knows only tanks (for "all buildings" it
    answers tank boxes); the sample SAM's held-out IoU per category is in its manifest."""
    found = {}
    for raster in RASTERS:
        boxes, outlines, crs = ground(scenes, engine, raster, "all storage tanks")
        assert crs == f"EPSG:{EPSG[raster]}", crs  # the outline layer's CRS is the box layer's, the raster's
        truth = true_outlines(scenes, raster, "tank")
        assert len(truth) == 7
        box_iou, outline_iou = best_ious(boxes, truth), best_ious(outlines, truth)
        hit = [j for j, v in enumerate(box_iou) if v > 0.5]  # the tanks the model found
        assert len(hit) >= 4, (raster, box_iou)
        on_target = [j for j in hit if outline_iou[j] > 0.85]
        assert len(on_target) >= len(hit) - 1, (raster, outline_iou)  # measured: every found tank
        mean_box = sum(box_iou[j] for j in hit) / len(hit)
        mean_outline = sum(outline_iou[j] for j in hit) / len(hit)
        assert mean_outline > mean_box + 0.15, (raster, mean_box, mean_outline)  # measured 0.966 vs 0.726
        assert all(o.is_valid for o in outlines)
        found[raster] = [round(outline_iou[j], 2) for j in hit]
    assert len({tuple(v) for v in found.values()}) == 1, found  # the same pixels: the same outlines


def test_the_largest_tank_outline_is_its_disk(scenes, engine):
    """REC ("the largest storage tank", mode one, full tiling) with --outline: measured IoU 0.983 with the true
    disk for the outline, 0.790 for the box."""
    gpkg = scenes / "largest.gpkg"
    gpkg.unlink(missing_ok=True)
    argv = ["ground", str(scenes / "utm.tif"), "the largest storage tank", "-o", str(gpkg), "--mode", "one",
            "--no-coarse-to-fine", *OPTS[2:], *engine]  # fmt: skip
    assert cli(argv) == 0
    (run,) = find_runs(gpkg)
    (box,) = _layer(gpkg, run.layer)
    (outline,) = _layer(gpkg, run.layer + OUTLINE_SUFFIX)
    truth = true_outlines(scenes, "utm", "tank")
    largest = max(truth, key=lambda t: t.area)
    assert iou(outline, largest) > 0.85 and iou(outline, largest) > iou(box, largest) + 0.1
