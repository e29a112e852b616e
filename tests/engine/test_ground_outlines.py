"""``geo-r1 ground --task gres`` and ``--outline`` end to end: a real engine with the tiny SAM 2 (random weights)
and the format-trained tiny Qwen, on the four georeferenced sample rasters of ../shared/data.

Random SAM weights outline nothing in particular: what is checked is that the outline layer exists beside the
box layer with the same fields, that its MultiPolygons are valid, in the raster's CRS, and inside their boxes."""

from __future__ import annotations

import itertools
import sqlite3
from pathlib import Path

import pyogrio
import pytest
from _serve_helpers import serving

from engine.cli import main as cli
from geo_r1_qgis.core.gpkg_schema import ANSWER_FIELDS, OUTLINE_SUFFIX, RUNS_TABLE, names

shapely = pytest.importorskip("shapely", reason="polygon validity is checked with shapely (the [train] extra)")
from shapely import wkb as shapely_wkb  # noqa: E402

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
RASTERS = ("naip_m_4709963_se_14_20200831.tif", "RGB.byte.tif", "cog.tif", "rgb1_fake_nir_epsg3857.tif")
OPTS = ["--tile", "448", "--overlap", "32", "--max-new-tokens", "160", "--no-progress", "--mode", "all"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(tiny_format_model_dir, tiny_sam_dir, tmp_path_factory):
    args = ["--model", str(tiny_format_model_dir), "--sam", str(tiny_sam_dir), "--batch-size", "8"]
    for e in serving(tmp_path_factory.mktemp("engine-ground-sam"), args):
        yield ["--engine", e.url, "--token-file", str(e.token_file)]


def features(path: Path, layer: str) -> list[tuple[dict, object]]:
    with sqlite3.connect(path) as con:
        con.row_factory = sqlite3.Row
        sql = "SELECT column_name FROM gpkg_geometry_columns WHERE table_name = ?"
        geom_col = con.execute(sql, (layer,)).fetchone()[0]
        rows = con.execute(f'SELECT * FROM "{layer}"').fetchall()
    out = []
    for r in rows:
        blob = bytes(r[geom_col])
        # GeoPackage binary: 'GP', version, flags, srs id, envelope (by flags), then WKB
        flags = blob[3]
        envelope = {0: 0, 1: 32, 2: 48, 3: 48, 4: 64}[(flags >> 1) & 0x07]
        out.append((dict(r), shapely_wkb.loads(blob[8 + envelope :])))
    return out


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not there")
@pytest.mark.parametrize("how", [["--task", "gres"], ["--outline"]], ids=["gres", "outline"])
def test_outline_layers_on_the_sample_rasters(engine, tmp_path, capsys, how):
    n_outlines = 0
    for name in RASTERS:
        out = tmp_path / f"{name}.gpkg"
        rc = cli(["ground", str(SHARED / name), "all buildings", "-o", str(out), *OPTS, *how, *engine])
        assert rc == 0, capsys.readouterr().err
        with sqlite3.connect(out) as con:
            layer, status, params = con.execute(f"SELECT layer, status, parameters FROM {RUNS_TABLE}").fetchone()
        assert status == "done"
        assert ('"task": "gres"' in params) if how[0] == "--task" else ('"outline": true' in params)
        boxes = features(out, layer)
        outline_layer = layer + OUTLINE_SUFFIX
        if outline_layer not in pyogrio.list_layers(out)[:, 0]:
            continue  # no box of this raster got an outline (none found, or SAM's masks were empty)
        info = pyogrio.read_info(out, layer=outline_layer)
        assert info["geometry_type"] == "MultiPolygon"
        assert info["crs"] == pyogrio.read_info(out, layer=layer)["crs"]
        field_names = set(names(ANSWER_FIELDS))
        assert field_names <= set(info["fields"])
        outlines = features(out, outline_layer)
        assert 0 < len(outlines) <= len(boxes)
        for row, geom in outlines:
            assert geom.geom_type == "MultiPolygon" and geom.is_valid and not geom.is_empty
            same = [g for r, g in boxes if all(r[k] == row[k] for k in ("tile_id", "score", "label", "run_id"))]
            assert same, row
            # inside its box, up to a pixel of simplification (the tolerance is one tile pixel)
            assert any(g.buffer(_pixel(name) * 1.01).contains(geom) for g in same)
        n_outlines += len(outlines)
    assert n_outlines > 0


def _pixel(name: str) -> float:
    import rasterio

    with rasterio.open(SHARED / name) as ds:
        return float(max(abs(ds.res[0]), abs(ds.res[1])))


def test_the_raster_crs_is_the_outline_crs(engine, tmp_path, capsys):
    import rasterio
    from pyproj import CRS

    name = RASTERS[0]
    out = tmp_path / "o.gpkg"
    rc = cli(["ground", str(SHARED / name), "tanks", "-o", str(out), *OPTS, "--outline", *engine])
    assert rc == 0, capsys.readouterr().err
    layers = [n for n in pyogrio.list_layers(out)[:, 0] if n.endswith(OUTLINE_SUFFIX)]
    assert layers, "no outline layer"
    with rasterio.open(SHARED / name) as ds:
        assert CRS.from_user_input(pyogrio.read_info(out, layer=layers[0])["crs"]).equals(CRS.from_wkt(ds.crs.to_wkt()))


def test_an_engine_started_with_model_and_sam(tiny_format_model_dir, tiny_sam_dir, tmp_path, capsys):
    out = tmp_path / "own.gpkg"
    argv = ["ground", str(SHARED / "cog.tif"), "all buildings", "-o", str(out), *OPTS, "--outline", "--device", "cpu",
            "--model", str(tiny_format_model_dir), "--sam", str(tiny_sam_dir)]  # fmt: skip
    assert cli(argv) == 0, capsys.readouterr().err
    with sqlite3.connect(out) as con:
        (engine_json,) = con.execute(f"SELECT engine FROM {RUNS_TABLE}").fetchone()
    assert '"sam": "' in engine_json  # the started engine's /info names its SAM
    assert cli(["ground", str(SHARED / "cog.tif"), "x", "-o", str(tmp_path / "b.gpkg"), "--sam", "s"]) == 1
    assert "--sam is for the engine --model starts" in capsys.readouterr().err


def test_outlines_on_a_rotated_raster_stay_inside_their_rotated_boxes(engine, tmp_path, capsys):
    from train.sample_data import SampleDataConfig, write_samples

    samples = tmp_path / "samples"
    write_samples(SampleDataConfig(out_dir=samples, size=448))
    out = tmp_path / "rot.gpkg"
    rc = cli(["ground", str(samples / "rotated.tif"), "all storage tanks", "-o", str(out), *OPTS, "--outline", *engine])
    assert rc == 0, capsys.readouterr().err
    with sqlite3.connect(out) as con:
        (layer,) = con.execute(f"SELECT layer FROM {RUNS_TABLE}").fetchone()
    boxes = features(out, layer)
    assert boxes
    pts = list(boxes[0][1].geoms[0].exterior.coords if hasattr(boxes[0][1], "geoms") else boxes[0][1].exterior.coords)
    slanted = [(b[0] - a[0]) * (b[1] - a[1]) for a, b in itertools.pairwise(pts)]
    assert all(abs(v) > 1e-9 for v in slanted)  # the boxes are rotated parallelograms on the map, not axis-aligned
    if layer + OUTLINE_SUFFIX not in pyogrio.list_layers(out)[:, 0]:
        pytest.fail("no outline on the rotated raster; the format model answered no box SAM could outline")
    for row, geom in features(out, layer + OUTLINE_SUFFIX):
        same = [g for r, g in boxes if all(r[k] == row[k] for k in ("tile_id", "score", "label"))]
        assert geom.is_valid and any(g.buffer(0.5 * 1.01).contains(geom) for g in same)  # 0.5 m pixels
