"""The plugin's GeoPackage writer (geo_r1_qgis/qgis_io/gpkg_ogr.py, ``osgeo.ogr``) against the command line's (pyogrio).

Runs under QGIS's Python. A run is written through the real pipeline (``core/pipeline.run_grounding``), a real
raster from ``../shared/data`` read by ``qgis_io.QgisRasterSource`` and a real engine process (the tiny
format-trained model). Cancelled midway, it is resumed by the plugin and by ``geo-r1 ground --resume``; a run
that ``geo-r1 ground`` wrote and was interrupted (Ctrl-C, SIGINT) is read by the plugin, compared with what
pyogrio reads in the engine venv, and resumed by the plugin. Both writers' files have the same schema.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
qgis_core = pytest.importorskip("qgis.core", reason="PyQGIS is not importable; run under /usr/bin/python3")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _real_engine as real  # noqa: E402  (the real-engine helpers the plugin tests share)
import host_exec  # noqa: E402

from geo_r1_qgis.core.client import EngineClient  # noqa: E402
from geo_r1_qgis.core.geometry import Affine, PixelBox, Tile, box_to_polygon, make_tile_grid  # noqa: E402
from geo_r1_qgis.core.gpkg_schema import (  # noqa: E402
    RAW_SUFFIX,
    RUNS_TABLE,
    TILES_TABLE,
    job_parameters,
)
from geo_r1_qgis.core.merge import Detection  # noqa: E402
from geo_r1_qgis.core.pipeline import GroundingJob, MapDetection, RunSummary, run_grounding  # noqa: E402
from geo_r1_qgis.qgis_io.gpkg_ogr import (  # noqa: E402
    OgrGeoPackageSink,
    describe_schema,
    list_runs,
    read_done_tiles,
    read_features,
    run_layers,
)

pytestmark = pytest.mark.qgis

RASTER = real.SHARED / "naip_m_4709963_se_14_20200831.tif"
EXPRESSION = "all farmsteads"
#: small tiles and short answers: many tiles, each quick with the tiny model
TILE, OVERLAP, MAX_NEW_TOKENS, BATCH = 112, 16, 96, 1
CANCEL_AFTER = 3


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_engine):
    return tiny_engine  # the session's tiny-model engine (conftest)


class _Raster:
    """The NAIP raster as a QGIS layer and its reader (layers die before the session ends)."""

    def __init__(self) -> None:
        from geo_r1_qgis.qgis_io.rasters import QgisRasterSource

        if not RASTER.is_file():
            pytest.skip(f"{RASTER} is missing (the shared rasters live in <repo>/../shared/data)")
        self.layer = qgis_core.QgsRasterLayer(str(RASTER), RASTER.stem)
        assert self.layer.isValid()
        self.source = QgisRasterSource(self.layer)


@pytest.fixture(scope="module")
def raster(qgis_app):
    r = _Raster()
    yield r
    r.source = None
    r.layer = None


def _job() -> GroundingJob:
    return GroundingJob(
        expression=EXPRESSION, tile_size=TILE, overlap=OVERLAP, max_new_tokens=MAX_NEW_TOKENS, batch_size=BATCH
    )


def _tile_ids(raster) -> list[str]:
    job = _job()
    src = raster.source
    return [t.id for t in make_tile_grid(src.transform, src.width, src.height, job.spec)]


def _open(raster, engine, out: Path, resume: bool) -> OgrGeoPackageSink:
    job, src = _job(), raster.source
    return OgrGeoPackageSink.open_run(
        out,
        expression=job.expression,
        mode=job.mode,
        parameters=job_parameters(job, raster=str(RASTER), bands=src.bands),
        raster={**src.describe(), "path": str(RASTER.resolve())},
        engine=engine.info,
        crs_wkt=src.crs_wkt,
        resume=resume,
    )


def _run(raster, engine, out: Path, resume: bool, cancel_after: int | None) -> tuple[OgrGeoPackageSink, RunSummary]:
    """One plugin run through the real pipeline; ``cancel_after`` tiles processed, is_canceled turns true."""
    sink = _open(raster, engine, out, resume)
    processed = Counter()
    done_before = len(sink.done_tiles())

    def progress(done: int, total: int, phase: str) -> None:
        processed["tiles"] = done - done_before

    def is_canceled() -> bool:
        return cancel_after is not None and processed["tiles"] >= cancel_after

    client = EngineClient(engine.url, token=engine.token)
    summary = run_grounding(_job(), raster.source, sink, client, progress=progress, is_canceled=is_canceled)
    if summary.status != "done":
        sink.mark(summary.status, summary.as_dict())
    return sink, summary


def _tiles_rows(out: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(out) as con:
        return list(con.execute(f'SELECT run_id, tile_id, status FROM "{TILES_TABLE}" ORDER BY fid'))


def _raw_keys(out: Path, raw_layer: str) -> list[tuple]:
    with sqlite3.connect(out) as con:
        return list(con.execute(f'SELECT run_id, tile_id, px_x1, px_y1, px_x2, px_y2 FROM "{raw_layer}"'))


@pytest.fixture(scope="module")
def plugin_run(raster, engine, tmp_path_factory):
    """A plugin run cancelled after a few tiles and resumed by the plugin; the file and what happened."""
    out = tmp_path_factory.mktemp("plugin-run") / "results.gpkg"
    first, s1 = _run(raster, engine, out, resume=False, cancel_after=CANCEL_AFTER)
    after_cancel = {
        "runs": list_runs(out),
        "tiles": _tiles_rows(out),
        "layers": [n for n in describe_schema(out)],
        "raw": _raw_keys(out, first.raw_layer),
    }
    second, s2 = _run(raster, engine, out, resume=True, cancel_after=None)
    return {"out": out, "first": first, "s1": s1, "after_cancel": after_cancel, "second": second, "s2": s2}


# --------------------------------------------------------------------------------------------------
# The plugin alone
# --------------------------------------------------------------------------------------------------


def test_a_cancelled_plugin_run_keeps_its_finished_tiles(plugin_run, raster):
    s1, first, seen = plugin_run["s1"], plugin_run["first"], plugin_run["after_cancel"]
    assert s1.status == "canceled"
    total = len(_tile_ids(raster))
    assert CANCEL_AFTER <= s1.tiles_processed + s1.tiles_skipped < total
    (run,) = seen["runs"]
    assert (run.run_id, run.layer, run.status, run.expression, run.mode) == (
        first.run_id, first.layer, "canceled", EXPRESSION, "all",
    )  # fmt: skip
    assert run.started and run.finished and run.resumable
    done = [t for _, t, _ in seen["tiles"]]
    assert len(done) == len(set(done)) == s1.tiles_processed + s1.tiles_skipped
    assert first.layer not in seen["layers"], "the answer layer is written only when the run is done"
    assert {k[1] for k in seen["raw"]} <= set(done), "raw rows only of tiles marked done"
    assert len(seen["raw"]) == s1.detections_raw


def test_the_plugin_resumes_its_own_run_without_duplicates(plugin_run, raster):
    out, first, second, s1, s2 = (plugin_run[k] for k in ("out", "first", "second", "s1", "s2"))
    assert s2.status == "done" and second.run_id == first.run_id and second.layer == first.layer
    assert s2.detections_raw > 0 and s2.detections_final > 0, "the tiny model answers with boxes on NAIP tiles"
    ids = _tile_ids(raster)
    assert s2.tiles_resumed == s1.tiles_processed + s1.tiles_skipped
    assert s2.tiles_resumed + s2.tiles_processed + s2.tiles_skipped == len(ids)
    tiles = _tiles_rows(out)
    assert sorted(t for _, t, _ in tiles) == sorted(ids), "every tile recorded exactly once"
    raw = _raw_keys(out, first.raw_layer)
    assert len(raw) == len(set(raw)) == s2.detections_raw
    (run,) = list_runs(out)
    assert run.status == "done" and not run.resumable
    assert json.loads(run.parameters)["raster"] == str(RASTER.resolve())
    feats = read_features(out, first.layer)
    assert len(feats) == s2.detections_final == len(s2.final)
    for (values, ring), m in zip(feats, s2.final, strict=True):
        assert values["run_id"] == first.run_id and values["tile_id"] == m.detection.tile_id
        assert values["score"] == pytest.approx(m.detection.score)
        assert [c for p in ring for c in p] == pytest.approx([c for p in m.ring for c in p])
    layers = run_layers(out, first.run_id)
    for uri in (layers.answer_uri, layers.raw_uri):
        lyr = qgis_core.QgsVectorLayer(uri, "check", "ogr")
        assert lyr.isValid(), uri
        assert lyr.crs() == raster.layer.crs()
    assert qgis_core.QgsVectorLayer(layers.answer_uri, "a", "ogr").featureCount() == len(feats)
    # read_done_tiles: what resuming starts from, equal to the raw layer's rows
    done = read_done_tiles(out, first.run_id)
    assert sorted(done) == sorted(ids)
    assert sum(len(v) for v in done.values()) == len(raw)


def test_resuming_a_finished_run_is_refused(plugin_run, raster, engine):
    from geo_r1_qgis.core.errors import OutputError

    with pytest.raises(OutputError, match="already complete"):
        _open(raster, engine, plugin_run["out"], resume=True)


# --------------------------------------------------------------------------------------------------
# Schema: the same tables, fields and types from both writers
# --------------------------------------------------------------------------------------------------

T = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 5200000.0)

_VENV_WRITE = """
import sys
from pathlib import Path
from engine.gpkg import CrsTransform, GeoPackageSink
from geo_r1_qgis.core.geometry import Affine, PixelBox, Tile, box_to_polygon
from geo_r1_qgis.core.merge import Detection
from geo_r1_qgis.core.pipeline import MapDetection, RunSummary
T = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 5200000.0)
d = Detection(PixelBox(10, 10, 20, 20), score=0.5, presence=0.9, label="tank", reasoning="round", tile_id="r0c0")
m = MapDetection(d, box_to_polygon(d.box, T))
sink = GeoPackageSink.open_run(Path(sys.argv[1]), expression="all tanks", mode="all", parameters={"p": 1},
    raster={"path": "/x.tif", "width": 10, "height": 10}, engine={"model": "tiny"},
    crs=CrsTransform(sys.argv[2], None))
sink.write_tile("r0c0", Tile(0, 0, 0, PixelBox(0, 0, 100, 100), (100, 100), T), [m], "done")
sink.commit()
sink.finish([m], RunSummary(status="done"))
"""


def _roles(schema: dict, layer: str) -> dict:
    """The schema by role (answer, raw, runs, tiles), so files whose layer names differ compare."""
    return {
        "answer": schema.get(layer),
        "raw": schema[layer + RAW_SUFFIX],
        "runs": schema[RUNS_TABLE],
        "tiles": schema[TILES_TABLE],
    }


def _ddl(path: Path, layer: str) -> dict[str, str]:
    """SQLite's own CREATE statements of the four tables, the run's layer name replaced by ``L``."""
    with sqlite3.connect(path) as con:
        rows = con.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL").fetchall()
    return {n.replace(layer, "L"): s.replace(layer, "L") for n, s in rows if n.startswith((layer, "geo_r1_"))}


def test_both_writers_create_the_same_schema(qgis_app, tmp_path):
    real.need_venv()
    from osgeo import osr

    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    wkt = srs.ExportToWkt()
    cli = tmp_path / "cli.gpkg"
    proc = host_exec.run([str(real.VENV_BIN / "python"), "-c", _VENV_WRITE, str(cli), wkt], cwd=real.REPO,
                         timeout=120, env=real.venv_env())  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = tmp_path / "plugin.gpkg"
    d = Detection(PixelBox(10, 10, 20, 20), score=0.5, presence=0.9, label="tank", reasoning="round", tile_id="r0c0")
    m = MapDetection(d, box_to_polygon(d.box, T))
    sink = OgrGeoPackageSink.open_run(
        ours, expression="all tanks", mode="all", parameters={"p": 1},
        raster={"path": "/x.tif", "width": 10, "height": 10}, engine={"model": "tiny"}, crs_wkt=wkt,
    )  # fmt: skip
    sink.write_tile("r0c0", Tile(0, 0, 0, PixelBox(0, 0, 100, 100), (100, 100), T), [m], "done")
    sink.commit()
    sink.finish([m], RunSummary(status="done"))
    (cli_run,) = list_runs(cli)
    a, b = _roles(describe_schema(cli), cli_run.layer), _roles(describe_schema(ours), sink.layer)
    assert a == b
    assert [f[:2] for f in a["answer"]["fields"]][2:4] == [("score", "Real"), ("presence", "Real")]
    assert ("created", "DateTime") in [f[:2] for f in a["raw"]["fields"]]
    assert ("truncated", "Integer") in [f[:2] for f in a["raw"]["fields"]]
    assert ("raster_width", "Integer64") in [f[:2] for f in a["runs"]["fields"]]
    assert a["answer"]["geometry"] == "Polygon" and a["answer"]["srs"] == "EPSG:32633"
    assert a["runs"]["geometry"] == "None"
    # down to SQLite's column types (TEXT, REAL, MEDIUMINT, INTEGER, DATETIME), triggers and R-tree
    assert _ddl(cli, cli_run.layer) == _ddl(ours, sink.layer)
    with sqlite3.connect(cli) as c1, sqlite3.connect(ours) as c2:
        for sql in ("PRAGMA application_id", "PRAGMA user_version"):
            assert c1.execute(sql).fetchone() == c2.execute(sql).fetchone()
        created = [c.execute(f'SELECT created FROM "{n}"').fetchone()[0] for c, n in ((c1, cli_run.layer),
                                                                                     (c2, sink.layer))]  # fmt: skip
    iso = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?"
    assert all(re.fullmatch(iso, v) for v in created), created


# --------------------------------------------------------------------------------------------------
# Crosschecks with the command line, both ways, against the real engine
# --------------------------------------------------------------------------------------------------


def _cli(engine, out: Path, *extra: str) -> list[str]:
    return [
        str(real.GEO_R1), "ground", str(RASTER), EXPRESSION, "-o", str(out), "--engine", engine.url,
        "--token-file", str(engine.token_file), "--tile", str(TILE), "--overlap", str(OVERLAP),
        "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch", str(BATCH), "--no-progress", *extra,
    ]  # fmt: skip


def test_the_command_line_resumes_a_run_the_plugin_cancelled(raster, engine, tmp_path):
    out = tmp_path / "from-plugin.gpkg"
    first, s1 = _run(raster, engine, out, resume=False, cancel_after=CANCEL_AFTER)
    assert s1.status == "canceled"
    done_before = {t for _, t, _ in _tiles_rows(out)}
    proc = host_exec.run(_cli(engine, out, "--resume"), cwd=real.REPO, timeout=900, env=real.venv_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{len(done_before)} resumed" in proc.stderr, proc.stderr[-2000:]
    assert f"run {first.run_id}" in proc.stderr
    (run,) = list_runs(out)
    assert run.run_id == first.run_id and run.status == "done"
    ids = _tile_ids(raster)
    assert sorted(t for _, t, _ in _tiles_rows(out)) == sorted(ids)
    raw = _raw_keys(out, first.raw_layer)
    assert len(raw) == len(set(raw))
    with sqlite3.connect(out) as con:
        (summary,) = con.execute(f'SELECT summary FROM "{RUNS_TABLE}"').fetchone()
    assert json.loads(summary)["tiles_resumed"] == len(done_before)
    feats = read_features(out, first.layer)
    assert all(v["run_id"] == first.run_id for v, _ in feats)
    assert re.search(rf"{len(feats)} feature\(s\) in layer '{first.layer}'", proc.stderr), proc.stderr[-2000:]


_PYOGRIO_READ = """
import json, sys
import pyogrio
from engine.gpkg import RUNS_TABLE, TILES_TABLE, ring_from_wkb
path, layer = sys.argv[1], sys.argv[2]
def cols(table, names, geometry=False):
    meta, _, geoms, data = pyogrio.raw.read(path, layer=table, columns=names, read_geometry=geometry)
    by_name = dict(zip(meta["fields"], data))  # pyogrio returns the columns in the file's order
    rows = [[v.item() if hasattr(v, "item") else v for v in r] for r in zip(*(by_name[n] for n in names))]
    return rows, [list(map(list, ring_from_wkb(g))) for g in geoms] if geometry else None
runs, _ = cols(RUNS_TABLE, ["run_id", "layer", "status", "expression", "mode", "started"])
tiles, _ = cols(TILES_TABLE, ["run_id", "tile_id", "status"])
raw, rings = cols(layer + "_tiles_raw", ["tile_id", "px_x1", "px_y1", "px_x2", "px_y2", "score", "presence",
                                         "label", "reasoning", "truncated"], geometry=True)
print(json.dumps({"runs": runs, "tiles": tiles, "raw": raw, "rings": rings}))
"""


def test_the_plugin_reads_and_resumes_a_run_the_command_line_interrupted(raster, engine, plugin_run, tmp_path):
    out = tmp_path / "from-cli.gpkg"
    log_path = tmp_path / "cli.log"
    proc = host_exec.spawn(_cli(engine, out), log_path=log_path, env=real.venv_env())

    def done_tiles() -> int:
        if not out.exists():
            return 0
        try:  # read-only: never create the file nor lock it for long
            with sqlite3.connect(f"file:{out}?mode=ro", uri=True, timeout=5) as con:
                return int(con.execute(f'SELECT count(*) FROM "{TILES_TABLE}"').fetchone()[0])
        except sqlite3.Error:
            return 0

    deadline = time.monotonic() + 600
    while done_tiles() < CANCEL_AFTER and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"geo-r1 ground ended before it could be interrupted:\n{log_path.read_text()[-2000:]}"
    os.kill(proc.pid, signal.SIGINT)  # Ctrl-C
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() == 130, log_path.read_text()[-2000:]
    assert "--resume" in log_path.read_text()

    # Read back by the plugin, and by pyogrio in the engine venv: the same runs, tiles and detections.
    (run,) = list_runs(out)
    assert run.status == "interrupted" and run.resumable and run.expression == EXPRESSION
    ref = host_exec.run([str(real.VENV_BIN / "python"), "-c", _PYOGRIO_READ, str(out), run.layer], cwd=real.REPO,
                        timeout=120, env=real.venv_env())  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref = json.loads(ref.stdout)
    assert ref["runs"] == [[run.run_id, run.layer, run.status, run.expression, run.mode, run.started]]
    done = read_done_tiles(out, run.run_id)
    assert sorted(done) == sorted(t for _, t, _ in ref["tiles"]) and len(done) >= CANCEL_AFTER
    ours = [
        [d.tile_id, *d.box.as_tuple(), d.score, d.presence, d.label, d.reasoning, int(d.truncated)]
        for t in sorted(done, key=[r[1] for r in ref["tiles"]].index)
        for d in done[t]
    ]
    # raw rows of a tile with no progress row (Ctrl-C between a commit's two writes) do not count: resume asks the
    # tile again and deletes them (gpkg_schema's module doc), so both readers are compared on the done tiles
    ref_done = [r for r in ref["raw"] if r[0] in done]
    assert ref_done, "the tiles done before Ctrl-C hold detections, so the comparison means something"
    assert sorted(ours, key=repr) == sorted(ref_done, key=repr)
    rings = [[list(p) for p in ring] for _, ring in read_features(out, run.raw_layer)]
    assert rings == ref["rings"]

    # The schema of this command-line file equals that of the plugin's own file.
    cli_schema = _roles(describe_schema(out), run.layer)
    plugin_out, plugin_layer = plugin_run["out"], plugin_run["first"].layer
    plugin_schema = _roles(describe_schema(plugin_out), plugin_layer)
    cli_schema["answer"] = plugin_schema["answer"] = None  # the interrupted run has no answer layer yet
    assert cli_schema == plugin_schema
    cli_ddl, plugin_ddl = _ddl(out, run.layer), _ddl(plugin_out, plugin_layer)
    assert "L_tiles_raw" in cli_ddl and set(cli_ddl) < set(plugin_ddl)
    assert cli_ddl == {k: plugin_ddl[k] for k in cli_ddl}

    # Resumed by the plugin: only the other tiles are asked, nothing is duplicated.
    copy = tmp_path / "before-resume.gpkg"
    shutil.copy(out, copy)
    sink, summary = _run(raster, engine, out, resume=True, cancel_after=None)
    assert summary.status == "done" and sink.run_id == run.run_id
    assert summary.tiles_resumed == len(done)
    ids = _tile_ids(raster)
    assert sorted(t for _, t, _ in _tiles_rows(out)) == sorted(ids)
    raw = _raw_keys(out, run.raw_layer)
    assert len(raw) == len(set(raw)) == summary.detections_raw
    assert list_runs(out)[0].status == "done"
    assert len(read_features(out, run.layer)) == summary.detections_final


# --------------------------------------------------------------------------------------------------
# GDAL's exception mode, errors, and a worker thread
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exceptions", [False, True], ids=["return-codes", "UseExceptions"])
def test_the_writer_works_in_either_gdal_exception_mode_and_off_the_main_thread(qgis_app, tmp_path, exceptions):
    """The host decides ogr.UseExceptions() (QGIS 3.22 leaves it off); the writer must not care, and it runs in a
    worker thread as in a QgsTask. A write that cannot succeed is one OutputError saying what failed."""
    import threading

    from osgeo import gdal, ogr, osr

    from geo_r1_qgis.core.errors import OutputError
    from geo_r1_qgis.core.gpkg_schema import TILES_FIELDS, Field, now_utc
    from geo_r1_qgis.qgis_io.gpkg_ogr import OgrWriter

    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    before = (gdal.GetUseExceptions(), ogr.GetUseExceptions())
    errors: list[BaseException] = []
    out = tmp_path / "t.gpkg"

    def work() -> None:
        try:
            sink = OgrGeoPackageSink.open_run(out, expression="x", mode="all", parameters={}, raster={}, engine={},
                                              crs_wkt=srs.ExportToWkt())  # fmt: skip
            sink.write_tile("r0c0", Tile(0, 0, 0, PixelBox(0, 0, 10, 10), (10, 10), T), [], "skipped")
            sink.commit()
            with pytest.raises(OutputError, match=r"no field nope .*not a Geo-R1 table"):
                OgrWriter().append(out, TILES_TABLE, [*TILES_FIELDS, Field("nope", "String")], [[None] * 8])
            with pytest.raises(OutputError, match="could not write 1 row"):
                OgrWriter().append(tmp_path / "missing" / "x.gpkg", TILES_TABLE, TILES_FIELDS,
                                   [["r", "t", "done", 0, "[]", now_utc(), ""]])  # fmt: skip
        except BaseException as exc:  # reported on the main thread
            errors.append(exc)

    if exceptions:
        gdal.UseExceptions()
        ogr.UseExceptions()
    try:
        thread = threading.Thread(target=work)
        thread.start()
        thread.join(120)
    finally:
        if not exceptions:
            assert (gdal.GetUseExceptions(), ogr.GetUseExceptions()) == before, "the writer changed GDAL's mode"
        if not before[1]:  # undone in reverse order (GDAL keeps a stack of handlers)
            ogr.DontUseExceptions()
        if not before[0]:
            gdal.DontUseExceptions()
    assert not errors, errors
    assert _tiles_rows(out) == [(list_runs(out)[0].run_id, "r0c0", "skipped")]


def test_qgis_reads_a_file_while_the_command_line_writes_it(qgis_app, engine, tmp_path):
    """QGIS opens GeoPackage layers read-only without file locks (GDAL's NOLOCK), which read half-written pages
    while another process writes ("database disk image is malformed", "disk I/O error" in QGIS's log). With the
    file held in WAL mode by the run and by the panel (gpkg_ogr.hold_wal), QGIS reads it with locks: a layer kept
    open as the panel opens it, new layers of the file opened over and over, and ogrinfo, all while
    ``geo-r1 ground`` writes it, give no error, and every committed row is read back."""
    import subprocess
    import threading

    from osgeo import gdal

    from geo_r1_qgis.qgis_io import gpkg_ogr

    out = tmp_path / "shared.gpkg"
    first = host_exec.run(_cli(engine, out, "--tile", "504", "--overlap", "0"), timeout=300, env=real.venv_env())
    assert first.returncode == 0, first.stderr[-2000:]
    (done_run,) = list_runs(out)
    log_messages: list[tuple[str, str]] = []
    cpl_errors: list[str] = []

    def on_message(message, tag, level):
        if level >= qgis_core.Qgis.Warning:
            log_messages.append((tag, message))

    qgis_core.QgsApplication.messageLog().messageReceived.connect(on_message)
    gdal.SetErrorHandler(lambda cls, no, msg: cpl_errors.append(msg) if cls >= gdal.CE_Failure else None)
    stop = threading.Event()
    ogrinfo_errors: list[str] = []
    ogrinfo_runs = [0]

    def ogrinfo() -> None:  # another program reading the file, as the README invites
        while not stop.is_set():
            r = subprocess.run(["ogrinfo", "-ro", "-so", "-al", str(out)], capture_output=True, text=True,
                               check=False)  # fmt: skip
            ogrinfo_runs[0] += 1
            if r.returncode or "ERROR" in r.stderr:
                ogrinfo_errors.append(r.stderr[-300:])

    assert gpkg_ogr.hold_wal(out)  # what the panel does before it shows a layer of the file
    shown = qgis_core.QgsVectorLayer(f"{out}|layername={done_run.layer}", "shown", "ogr")
    assert shown.isValid()
    n_shown = shown.featureCount()
    reader = threading.Thread(target=ogrinfo) if shutil.which("ogrinfo") else None
    proc = host_exec.spawn(_cli(engine, out, "--tile", "56", "--overlap", "0"), log_path=tmp_path / "cli.log",
                           env=real.venv_env())  # fmt: skip
    reads = 0
    try:
        if reader is not None:
            reader.start()
        deadline = time.monotonic() + 400
        while proc.poll() is None and time.monotonic() < deadline:
            shown.dataProvider().reloadData()
            assert sum(1 for _ in shown.getFeatures()) == n_shown
            for rec in list_runs(out):  # layers opened during the run, as a user adds them
                lyr = qgis_core.QgsVectorLayer(f"{out}|layername={rec.layer}{RAW_SUFFIX}", "raw", "ogr")
                assert lyr.isValid(), log_messages[-3:]
                sum(1 for _ in lyr.getFeatures())
                del lyr
            reads += 1
            qgis_core.QgsApplication.processEvents()
    finally:
        stop.set()
        if reader is not None:
            reader.join(60)
        gdal.SetErrorHandler(None)
        qgis_core.QgsApplication.messageLog().messageReceived.disconnect(on_message)
    # the reading stops at its deadline; the run itself may take longer on a loaded machine (a CI run's 3.40
    # suite, beside the others, once needed more than 400 s): it is let finish, not judged by the clock
    while proc.poll() is None and time.monotonic() < deadline + 1800:
        time.sleep(1)
    assert proc.poll() == 0, (tmp_path / "cli.log").read_text()[-2000:]
    assert reads >= 5, reads
    assert not log_messages, log_messages[:5]
    assert not cpl_errors, cpl_errors[:5]
    assert not ogrinfo_errors and (reader is None or ogrinfo_runs[0] >= 2), ogrinfo_errors[:3]
    # the file is whole, and every row the command line committed reads back through QGIS's provider
    with sqlite3.connect(str(out)) as con:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        (run,) = [r for r in list_runs(out) if r.run_id != done_run.run_id]
        n_raw = con.execute(f'SELECT count(*) FROM "{run.raw_layer}"').fetchone()[0]
        n_tiles = con.execute(f"SELECT count(*) FROM {TILES_TABLE} WHERE run_id = ?", (run.run_id,)).fetchone()[0]
        (summary,) = con.execute(f"SELECT summary FROM {RUNS_TABLE} WHERE run_id = ?", (run.run_id,)).fetchone()
    con.close()  # an open WAL connection keeps its shared lock: the file could not return to delete mode below
    assert run.status == "done" and n_tiles == json.loads(summary)["tiles_total"] > 100
    for layer, n in ((run.raw_layer, n_raw), (done_run.layer, n_shown)):
        lyr = qgis_core.QgsVectorLayer(f"{out}|layername={layer}", "check", "ogr")
        assert lyr.isValid() and sum(1 for _ in lyr.getFeatures()) == n > 0
        del lyr
    del shown
    gpkg_ogr.release_wal()
    assert gpkg_ogr.held_files() == []
    with sqlite3.connect(str(out)) as con:  # nobody holds it: one file again, as QGIS leaves a file it closes
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert not Path(f"{out}-wal").exists()


def test_a_held_file_stays_in_wal_while_qgis_opens_and_closes_it(qgis_app, tmp_path):
    """A hold must survive what QGIS does in its own process: GDAL opens and closes the file to identify it
    (and QGIS, Python, anything else may read it), and closing any descriptor of a file drops every POSIX lock
    the process has on it, so a connection held in QGIS's process loses its shared lock. Another process (the
    command line's run ending, another QGIS closing its last layer of the file) could then take the file out of
    WAL and delete the log under QGIS's open WAL layers: "database disk image is malformed" (QGIS 3.40)."""
    import subprocess

    from osgeo import ogr

    from geo_r1_qgis.core.gpkg_schema import WalHold, hold_in_child
    from geo_r1_qgis.qgis_io import gpkg_ogr

    out = tmp_path / "held.gpkg"
    ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(out))
    ds.CreateLayer("points", geom_type=ogr.wkbPoint)
    ds = None
    other = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1], timeout=0.2)\n"
             "try: print(c.execute('PRAGMA journal_mode = DELETE').fetchone()[0])\n"
             "except sqlite3.OperationalError as e: print(e)")  # fmt: skip

    def another_process_takes_it_out_of_wal() -> str:
        r = subprocess.run([sys.executable, "-c", other, str(out)], capture_output=True, text=True, check=True)
        return r.stdout.strip()

    # the panel's hold, and the hold of a run the plugin writes (OgrWriter) while QGIS shows its layers
    run_hold = WalHold(out, separate=hold_in_child(gpkg_ogr.OgrWriter().shares_sqlite))
    for hold in ("panel", run_hold):
        assert gpkg_ogr.hold_wal(out) if hold == "panel" else hold.acquire()
        try:
            layer = qgis_core.QgsVectorLayer(f"{out}|layername=points", "shown", "ogr")
            assert layer.isValid()
            assert sum(1 for _ in layer.getFeatures()) == 0
            out.read_bytes()  # any other reader in the process
            assert another_process_takes_it_out_of_wal() == "database is locked"
            del layer
            assert another_process_takes_it_out_of_wal() == "database is locked"
        finally:
            gpkg_ogr.release_wal() if hold == "panel" else hold.release()
    with sqlite3.connect(str(out)) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    con.close()


def test_a_plugin_run_spreads_its_tiles_over_two_engines(raster, engine, tmp_path):
    """Issue 20 §2 in QGIS's Python: the core pipeline (stdlib threads, urllib) with two real engines and tiles in
    flight; the file records which engine answered each tile, and holds what a one-engine run writes."""
    from geo_r1_qgis.core.pipeline import connect_engines

    second_dir = tmp_path / "second"
    second_dir.mkdir()
    (second_dir / "engine.token").write_text(engine.token + "\n")  # the same token: one token file for both
    (second_dir / "engine.token").chmod(0o600)
    second = real.Engine(second_dir, real.tiny_format_model())
    try:
        outputs = {}
        # one tile at a time per engine in both runs (an engine batching two tiles rounds a little differently)
        for name, urls, in_flight in (("one", [engine.url], 1), ("two", [engine.url, second.url], 2)):
            job = GroundingJob(expression=EXPRESSION, tile_size=TILE, overlap=OVERLAP, max_new_tokens=MAX_NEW_TOKENS,
                               batch_size=BATCH, window=PixelBox(0, 0, 400, 300), in_flight=in_flight)  # fmt: skip
            out = tmp_path / f"{name}.gpkg"
            pool, info = connect_engines(urls, engine.token)
            sink = OgrGeoPackageSink.open_run(
                out, expression=EXPRESSION, mode="all", parameters=job_parameters(job, raster=str(RASTER),
                                                                                  bands=raster.source.bands),
                raster={**raster.source.describe(), "path": str(RASTER.resolve())}, engine=info,
                crs_wkt=raster.source.crs_wkt)  # fmt: skip
            summary = run_grounding(job, raster.source, sink, pool)
            assert summary.status == "done" and summary.tiles_processed == 12
            with sqlite3.connect(out) as con:
                layer = con.execute(f"SELECT layer FROM {RUNS_TABLE}").fetchone()[0]
                engines = dict(con.execute(f"SELECT engine, count(*) FROM {TILES_TABLE} GROUP BY engine").fetchall())
                raw = sorted(
                    con.execute(f'SELECT tile_id, px_x1, px_y1, px_x2, px_y2, score FROM "{layer}{RAW_SUFFIX}"')
                )
                answer = sorted(con.execute(f'SELECT geom, score, tile_id FROM "{layer}"'))
            outputs[name] = (raw, answer)
            assert engines == summary.engines and sum(engines.values()) == 12
            if name == "two":  # in flight 2 over two engines: one each (the most free slots), both answer
                assert set(engines) == {engine.url, second.url}, engines
                assert json.loads(_run_engine_info(out))["engines"][1]["url"] == second.url
        assert outputs["one"][0], "the format-trained tiny model writes boxes: the comparison has content"
        assert outputs["two"] == outputs["one"]
    finally:
        second.stop()


def _run_engine_info(out: Path) -> str:
    with sqlite3.connect(out) as con:
        return con.execute(f"SELECT engine FROM {RUNS_TABLE}").fetchone()[0]
