"""Tests of engine/gpkg.py: one layer per run, never overwriting, transactions, resume, reprojection."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyogrio
import pytest
from pyproj import Transformer

from engine.gpkg import RAW_SUFFIX, RUNS_TABLE, TILES_TABLE, CrsTransform, GeoPackageSink, ring_from_wkb
from geo_r1_qgis.core.errors import ConfigError, OutputError
from geo_r1_qgis.core.geometry import Affine, PixelBox, Tile, box_to_polygon
from geo_r1_qgis.core.merge import Detection
from geo_r1_qgis.core.pipeline import MapDetection, RunSummary

REPO = Path(__file__).resolve().parents[2]
UTM_WKT = Transformer.from_crs("EPSG:32633", "EPSG:4326").source_crs.to_wkt()
T = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 5200000.0)


def det(x1, y1, x2, y2, tile_id="r0c0", score=0.5) -> MapDetection:
    d = Detection(PixelBox(x1, y1, x2, y2), score=score, presence=0.9, label="tank", reasoning="round", tile_id=tile_id)
    return MapDetection(d, box_to_polygon(d.box, T))


def tile(i: int) -> Tile:
    return Tile(i, 0, i, PixelBox(i * 100, 0, i * 100 + 100, 100), (100, 100), T)


def open_sink(path: Path, resume: bool = False, layer: str | None = None, dst: str | None = None) -> GeoPackageSink:
    return GeoPackageSink.open_run(
        path,
        expression="all tanks",
        mode="all",
        parameters={"p": 1},
        raster={"path": "/x.tif", "width": 10, "height": 10, "transform": list(T.to_tuple())},
        engine={"model": "tiny", "prompt_version": "v1"},
        crs=CrsTransform(UTM_WKT, dst),
        layer=layer,
        resume=resume,
    )


def test_a_run_writes_its_layers_and_tables(tmp_path):
    out = tmp_path / "o.gpkg"
    sink = open_sink(out)
    sink.write_tile("r0c0", tile(0), [det(10, 10, 20, 20)], "done")
    sink.write_tile("r0c1", tile(1), [], "skipped")
    sink.commit()
    sink.finish([det(10, 10, 20, 20, score=0.7)], RunSummary(status="done"))
    layers = dict(pyogrio.list_layers(out))
    assert layers[sink.layer] == "Polygon" and layers[sink.layer + RAW_SUFFIX] == "Polygon"
    assert layers[RUNS_TABLE] is None and layers[TILES_TABLE] is None
    meta, _, geoms, fields = pyogrio.raw.read(out, layer=sink.layer)
    row = dict(zip(meta["fields"], (f[0] for f in fields), strict=True))
    assert row["expression"] == "all tanks" and row["model"] == "tiny" and row["prompt_version"] == "v1"
    assert row["score"] == pytest.approx(0.7) and row["run_id"] == sink.run_id and row["tile_id"] == "r0c0"
    assert {"mode", "presence", "label", "reasoning", "adapter", "created"} <= set(meta["fields"])
    assert ring_from_wkb(geoms[0]) == box_to_polygon(PixelBox(10, 10, 20, 20), T)
    with sqlite3.connect(out) as con:
        assert con.execute(f"SELECT status FROM {RUNS_TABLE}").fetchall() == [("done",)]
        assert sorted(con.execute(f"SELECT tile_id, status FROM {TILES_TABLE}")) == [
            ("r0c0", "done"),
            ("r0c1", "skipped"),
        ]


def test_a_second_run_adds_a_layer_and_never_overwrites(tmp_path):
    out = tmp_path / "o.gpkg"
    a = open_sink(out, layer="mine")
    a.finish([det(0, 0, 5, 5)], RunSummary(status="done"))
    with pytest.raises(OutputError, match="never overwritten"):
        open_sink(out, layer="mine")
    b = open_sink(out)
    b.finish([], RunSummary(status="done"))
    layers = [n for n, _ in pyogrio.list_layers(out)]
    assert "mine" in layers and b.layer in layers
    assert pyogrio.read_info(out, layer="mine")["features"] == 1
    with pytest.raises(OutputError, match="already complete"):
        open_sink(out, resume=True, layer="mine")


def test_not_a_geopackage_is_left_untouched(tmp_path):
    out = tmp_path / "o.gpkg"
    out.write_text("hello")
    with pytest.raises(OutputError, match="not a GeoPackage"):
        open_sink(out)
    assert out.read_text() == "hello"
    with pytest.raises(ConfigError, match=r"\.gpkg"):
        open_sink(tmp_path / "o.shp")


def test_resume_drops_raw_rows_of_unfinished_tiles(tmp_path):
    out = tmp_path / "o.gpkg"
    sink = open_sink(out)
    sink.write_tile("r0c0", tile(0), [det(10, 10, 20, 20)], "done")
    sink.commit()
    # A kill between the two writes of a commit: raw rows on disk, the tile not marked done.
    sink._write_features(sink.raw_layer, [(det(110, 10, 120, 20, tile_id="r0c1"), sink_time())], raw=True)
    again = open_sink(out, resume=True)
    assert again.run_id == sink.run_id and again.layer == sink.layer
    assert set(again.done_tiles()) == {"r0c0"}
    (d,) = again.done_tiles()["r0c0"]
    assert d.box == PixelBox(10, 10, 20, 20) and d.label == "tank" and d.score == pytest.approx(0.5)
    assert pyogrio.read_info(out, layer=sink.raw_layer)["features"] == 1


def sink_time():
    from engine.gpkg import now_utc

    return now_utc()


def test_dst_crs_reprojects_every_vertex(tmp_path):
    out = tmp_path / "o.gpkg"
    sink = open_sink(out, dst="EPSG:4326")
    sink.finish([det(0, 0, 100, 100)], RunSummary(status="done"))
    info = pyogrio.read_info(out, layer=sink.layer)
    assert info["crs"] == "EPSG:4326"
    _, _, geoms, _ = pyogrio.raw.read(out, layer=sink.layer)
    ring = ring_from_wkb(geoms[0])
    tr = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    for (x, y), (lon, lat) in zip(box_to_polygon(PixelBox(0, 0, 100, 100), T), ring, strict=True):
        assert tr.transform(x, y) == pytest.approx((lon, lat), abs=1e-9)
    with pytest.raises(ConfigError, match="--dst-crs"):
        CrsTransform(UTM_WKT, "EPSG:99999999")


WRITER = """
import sys, time
from tests.engine.test_gpkg import open_sink, det, tile
sink = open_sink(__import__("pathlib").Path(sys.argv[1]))
print(sink.run_id, flush=True)
i = 0
while True:
    sink.write_tile(f"r0c{i}", tile(i), [det(i, 0, i + 5, 5, tile_id=f"r0c{i}")] * 20, "done")
    sink.commit()
    i += 1
"""


@pytest.mark.slow
def test_a_killed_writer_leaves_a_valid_resumable_file(tmp_path):
    out = tmp_path / "o.gpkg"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    time.sleep(1.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # the run's WAL hold (a child process, core/gpkg_schema.WalHold) sees its pipe close and takes the file out of
    # WAL; until then this process's two SQLite libraries (Python's, pyogrio's GDAL) can read different snapshots
    wal = out.with_name(out.name + "-wal")
    deadline = time.monotonic() + 30
    while wal.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    # closed before anything else opens the file: pyogrio's GDAL carries its own SQLite, and a connection of
    # Python's sqlite3 left open in the same process makes it read a stale WAL snapshot (core/gpkg_schema.WalHold)
    with contextlib.closing(sqlite3.connect(out)) as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    again = open_sink(out, resume=True)
    done = again.done_tiles()
    assert len(done) > 2 and all(len(v) == 20 for v in done.values())
    assert pyogrio.read_info(out, layer=again.raw_layer)["features"] == 20 * len(done)


def test_the_plugin_builds_the_same_run_parameters_as_the_command_line(tmp_path, monkeypatch):
    """A run started by either side is found by the other's --resume: same parameters, same raster path."""
    from engine.ground import GroundConfig
    from engine.rasters import RasterioSource
    from geo_r1_qgis.core.gpkg_schema import canonical_raster_path, job_parameters, parameters_json
    from geo_r1_qgis.core.pipeline import GroundingJob

    raster = REPO.parent / "shared" / "data" / "naip_m_4709963_se_14_20200831.tif"
    if not raster.is_file():
        pytest.skip(f"{raster} is missing (the shared rasters live in <repo>/../shared/data)")
    monkeypatch.chdir(tmp_path)
    relative = os.path.relpath(raster)
    cfg = GroundConfig(raster=relative, expression="all farmsteads", output=tmp_path / "o.gpkg",
                       tile_size=112, overlap=16, max_new_tokens=96, batch_size=1)  # fmt: skip
    job = GroundingJob(expression="all farmsteads", tile_size=112, overlap=16, max_new_tokens=96, batch_size=1)
    with RasterioSource(relative) as src:
        described = src.describe()["path"]
        cli = cfg.run_parameters(described, src.bands, 1.0)
        assert described == canonical_raster_path(relative) == str(raster.resolve())
        assert parameters_json(job_parameters(job, raster=relative, bands=src.bands)) == parameters_json(cli)
