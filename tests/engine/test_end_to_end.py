"""The whole chain with a model that sees: raster -> tiles -> the sample model -> boxes -> polygons on the map,
checked against the scene's truth polygon against polygon (``geo-r1 ground`` and ``geo-r1 match``, real engines).

Scene seed 9100 was never trained on (the sample model saw seeds 0-199). Measured with the shipped model
(resources/sample_model, third run): "all storage tanks" finds 5 of the scene's 7 tanks (8 detections) on each of
the four rasters; "the largest storage tank" finds the largest one. The thresholds below leave one tank of margin.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _serve_helpers import serving

from geo_r1_qgis.core.geometry import ring_signed_area
from geo_r1_qgis.core.gpkg_schema import find_runs
from geo_r1_qgis.core.truth import match_objects, read_result_rings, read_truth

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "resources" / "sample_model"
SEED = 9100
RASTERS = ("utm", "wgs84", "webmercator", "rotated")
MODEL_TILE = json.loads((MODEL / "geo_r1_sample_model.json").read_text(encoding="utf-8"))["tile"]


def _geo_r1(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600, check=False)  # fmt: skip


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> list[str]:
    """One ``geo-r1 serve`` of the shipped model for the module's runs, started as ``geo-r1 ground --model`` starts
    its own (batch 8, one OpenMP thread), so that a dozen runs do not load the model a dozen times
    (``--model`` itself: tests/engine/test_ground.py::test_model_starts_its_own_engine)."""
    args = ["--model", str(MODEL), "--batch-size", "8"]
    for e in serving(tmp_path_factory.mktemp("e2e-engine"), args, env={"OMP_NUM_THREADS": "1"}):
        yield ["--engine", e.url, "--token-file", str(e.token_file)]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("e2e")
    r = _geo_r1("sample-data", str(out), "--seed", str(SEED))
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def _ground(engine: list[str], scenes: Path, raster: str, expression: str, mode: str, *extra: str) -> tuple[list, list]:
    gpkg = scenes / f"{raster}-{mode}{''.join(extra)}.gpkg"
    gpkg.unlink(missing_ok=True)  # one run per file: each test grounds afresh
    # no --tile: the run takes the tile the model serves, from its manifest through GET /info
    r = _geo_r1("ground", str(scenes / f"{raster}.tif"), expression, "-o", str(gpkg), "--mode", mode,
                *engine, "--overlap", "64", "--max-new-tokens", "384", *extra)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = find_runs(gpkg)
    assert json.loads(run.parameters)["tile"] == MODEL_TILE, run.parameters
    return read_result_rings(gpkg, run.layer), read_truth(scenes / f"{raster}.objects.geojson", "tank")


def test_all_storage_tanks_are_found_on_each_raster_and_the_same_ones(engine, scenes):
    found = {}
    for raster in RASTERS:
        predicted, truth = _ground(engine, scenes, raster, "all storage tanks", "all")
        m = match_objects(predicted, [t.ring for t in truth])
        assert m.n_truth == 7
        assert m.found >= 4, (raster, m)  # measured 5 of 7
        assert m.precision >= 0.4, (raster, m)  # measured 5 of 8
        found[raster] = sorted(truth[j].id for j in m.matched_truth())
    assert len({tuple(v) for v in found.values()}) == 1, found  # the same pixels: the same tanks


def test_the_largest_storage_tank_is_the_largest_one_on_each_raster(engine, scenes):
    """Full tiling (measured on the UTM raster of six unseen scenes, 9100-9105: the largest tank 6 of 6)."""
    for raster in RASTERS:
        predicted, truth = _ground(engine, scenes, raster, "the largest storage tank", "one", "--no-coarse-to-fine")
        assert len(predicted) == 1, raster
        largest = max(range(len(truth)), key=lambda j: abs(ring_signed_area(truth[j].ring)))
        m = match_objects(predicted, [t.ring for t in truth])
        assert m.matched_truth() == {largest}, (raster, m)


@pytest.mark.xfail(strict=True, reason=(
    "measured with the shipped sample model: coarse to fine finds the largest tank in 1 of 6 unseen scenes "
    "(9100-9105), the full tiling in 6 of 6; its coarse pass reads the raster at about half the resolution, where "
    "this model localises tanks poorly (BENCHMARKS.md, 'Sample model'). strict: a model that fixes it fails here, "
    "to turn the test back on"))  # fmt: skip
def test_coarse_to_fine_finds_the_same_largest_tank_as_the_full_tiling(engine, scenes):
    coarse, truth = _ground(engine, scenes, "utm", "the largest storage tank", "one")
    full, _ = _ground(engine, scenes, "utm", "the largest storage tank", "one", "--no-coarse-to-fine")
    rings = [t.ring for t in truth]
    largest = max(range(len(truth)), key=lambda j: abs(ring_signed_area(truth[j].ring)))
    assert match_objects(coarse, rings).matched_truth() == match_objects(full, rings).matched_truth() == {largest}


def test_at_twice_the_ground_resolution_the_largest_tank_is_still_found(engine, scenes):
    """--gsd 1.0 on the 0.5 m raster: tiles read at half the resolution (scale 2; 9 tiles, so a full tiling).
    Measured: mode one finds the largest tank; mode all finds 1 of 7 there (the small tanks are 12-25 px then;
    BENCHMARKS.md)."""
    predicted, truth = _ground(engine, scenes, "utm", "the largest storage tank", "one", "--gsd", "1.0")
    largest = max(range(len(truth)), key=lambda j: abs(ring_signed_area(truth[j].ring)))
    assert match_objects(predicted, [t.ring for t in truth]).matched_truth() == {largest}


def test_geo_r1_match_prints_what_it_found(engine, scenes):
    _ground(engine, scenes, "utm", "all storage tanks", "all")
    r = _geo_r1("match", str(scenes / "utm-all.gpkg"), str(scenes / "utm.objects.geojson"), "--category", "tank")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("found ") and " of 7 storage tanks" in r.stdout, r.stdout
    r = _geo_r1("match", str(scenes / "missing.gpkg"), str(scenes / "utm.objects.geojson"))
    assert r.returncode != 0 and "does not exist" in r.stderr


def test_the_shipped_models_held_out_scores_rescore_the_same_with_geo_r1_eval(tmp_path):
    """Stage 1 of issue 18, re-measured: 'sample-model eval' on held-out scenes, then Geo-R1's REC scoring of the
    same answers by 'geo-r1 eval --predictions'. Measured on all 30 scenes: Acc@0.5 1.000; here on 4."""
    r = _geo_r1("sample-model", "eval", str(MODEL), "-o", str(tmp_path), "--scenes", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    held = json.loads((tmp_path / "heldout.json").read_text(encoding="utf-8"))
    assert held["scenes"] == 4 and held["largest_tank"]["queries"] == 8
    assert held["largest_tank"]["acc@0.5"] >= 0.8
    r = _geo_r1("eval", "--predictions", str(tmp_path / "rec_results.json"), "-o", str(tmp_path / "report"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"Acc@0.5 {100 * held['largest_tank']['acc@0.5']:.2f}" in r.stdout, r.stdout
