"""Tests of geo_r1_qgis/core/gpkg_schema.py: names, fields, run parameters and the resumable run, pure.

The run's logic (new run, commit, interruption between the two appends, resume, finish) is exercised with
:class:`SqlWriter`, a :class:`FeatureWriter` that appends with plain SQL to GeoPackage-shaped tables
(``gpkg_contents`` and the tables, geometry kept as WKB): the bookkeeping reads and updates through
``sqlite3`` exactly as on a real file. The two real writers (GDAL through pyogrio and through
``osgeo.ogr``) are tested in tests/engine/test_gpkg.py and tests/geo_r1_qgis/test_gpkg_ogr.py.
"""

from __future__ import annotations

import json
import re
import sqlite3
from datetime import datetime
from pathlib import Path

import pytest

from geo_r1_qgis.core.area import AreaPolygon, area_digest
from geo_r1_qgis.core.errors import ConfigError, OutputError
from geo_r1_qgis.core.geometry import Affine, PixelBox, Tile, box_to_polygon
from geo_r1_qgis.core.gpkg_schema import (
    ANSWER_FIELDS,
    DATETIME,
    FIELD_TYPES,
    RAW_FIELDS,
    RAW_SUFFIX,
    RUNS_FIELDS,
    RUNS_TABLE,
    TILES_FIELDS,
    TILES_TABLE,
    Field,
    GeoPackageRun,
    SameCrs,
    canonical_raster_path,
    check_layer_name,
    find_runs,
    iso_ms,
    job_parameters,
    layer_name_for,
    list_tables,
    now_utc,
    parameters_json,
    run_parameters,
    with_adapter,
)
from geo_r1_qgis.core.merge import Detection
from geo_r1_qgis.core.pipeline import GroundingJob, MapDetection, RunSummary
from geo_r1_qgis.core.results import OUTPUT_FIELDS

T = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 5200000.0)
WKT = 'PROJCRS["WGS 84 / UTM zone 33N"]'
SQL_TYPES = {"String": "TEXT", "Real": "REAL", "Integer": "MEDIUMINT", "Integer64": "INTEGER", "DateTime": "DATETIME"}


class SqlWriter:
    """A FeatureWriter on plain SQL (see the module docstring); counts its appends, can fail on one table."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.appends: list[tuple[str, int]] = []
        self.fail_on = fail_on

    def append(self, path, table, fields, rows, geometries=None, crs_wkt=None) -> None:
        if table == self.fail_on:
            raise OutputError(f"simulated failure writing {table}")
        with sqlite3.connect(path) as con:
            con.execute("CREATE TABLE IF NOT EXISTS gpkg_contents (table_name TEXT PRIMARY KEY, data_type TEXT)")
            if not con.execute("SELECT 1 FROM gpkg_contents WHERE table_name = ?", (table,)).fetchone():
                cols = ", ".join(f'"{f.name}" {SQL_TYPES[f.type]}' for f in fields)
                geom = ', "geom" BLOB' if geometries is not None else ""
                con.execute(f'CREATE TABLE "{table}" (fid INTEGER PRIMARY KEY AUTOINCREMENT{geom}, {cols})')
                kind = "features" if geometries is not None else "attributes"
                con.execute("INSERT INTO gpkg_contents VALUES (?, ?)", (table, kind))
            names = [f.name for f in fields] + (["geom"] if geometries is not None else [])
            for i, row in enumerate(rows):
                values = [iso_ms(v) if f.type == DATETIME else v for f, v in zip(fields, row, strict=True)]
                values += [geometries[i]] if geometries is not None else []
                marks = ", ".join("?" * len(names))
                quoted = ", ".join(f'"{n}"' for n in names)
                con.execute(f'INSERT INTO "{table}" ({quoted}) VALUES ({marks})', values)
        self.appends.append((table, len(rows)))


def det(x1, y1, x2, y2, tile_id="r0c0", score=0.5) -> MapDetection:
    d = Detection(PixelBox(x1, y1, x2, y2), score=score, presence=0.9, label="tank", reasoning="round", tile_id=tile_id)
    return MapDetection(d, box_to_polygon(d.box, T))


def tile(i: int) -> Tile:
    return Tile(i, 0, i, PixelBox(i * 100, 0, i * 100 + 100, 100), (100, 100), T)


def open_run(path: Path, writer=None, resume=False, layer=None, parameters=None) -> GeoPackageRun:
    return GeoPackageRun.open_run(
        path,
        writer=writer or SqlWriter(),
        expression="all tanks",
        mode="all",
        parameters=parameters or {"p": 1},
        raster={"path": "/x.tif", "width": 10, "height": 10, "transform": list(T.to_tuple())},
        engine={"model": "tiny", "prompt_version": "v1"},
        crs=SameCrs(WKT),
        layer=layer,
        resume=resume,
    )


def rows(path: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(path) as con:
        return con.execute(sql).fetchall()


# --------------------------------------------------------------------------------------------------
# Names and fields
# --------------------------------------------------------------------------------------------------


def test_the_layers_fields_follow_the_output_fields_with_their_types():
    assert tuple(f.name for f in ANSWER_FIELDS) == OUTPUT_FIELDS
    types = {f.name: f.type for f in RAW_FIELDS}
    assert [f.name for f in RAW_FIELDS] == [*OUTPUT_FIELDS, "px_x1", "px_y1", "px_x2", "px_y2"]
    assert types["score"] == types["presence"] == types["px_x1"] == "Real"
    assert types["created"] == "DateTime" and types["truncated"] == "Integer"
    assert {types[n] for n in ("expression", "label", "reasoning", "tile_id", "run_id")} == {"String"}
    assert [f.name for f in TILES_FIELDS] == ["run_id", "tile_id", "status", "n_boxes", "window", "written", "engine"]
    runs = {f.name: f.type for f in RUNS_FIELDS}
    assert runs["raster_width"] == runs["raster_height"] == "Integer64"
    assert runs["started"] == runs["finished"] == "String", "ISO text, as the command line has always written"
    for fields in (ANSWER_FIELDS, RAW_FIELDS, TILES_FIELDS, RUNS_FIELDS):
        assert len({f.name for f in fields}) == len(fields) and all(f.type in FIELD_TYPES for f in fields)


def test_a_field_of_an_unknown_type_is_refused():
    with pytest.raises(ConfigError, match="Boolean"):
        Field("x", "Boolean")


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("all storage tanks", "all_storage_tanks_RUN"),
        ("3 red cars!", "q_3_red_cars_RUN"),
        ("   ", "ground_RUN"),
        ("Flughafen München — Terminal 2", "flughafen_m_nchen_terminal_2_RUN"),
        ("x" * 80, "x" * 40 + "_RUN"),
    ],
)
def test_layer_names_are_safe_identifiers(expression, expected):
    name = layer_name_for(expression, "RUN")
    assert name == expected
    assert check_layer_name(name) == name


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("1abc", "not a usable layer name"),
        ("a b", "not a usable layer name"),
        ("gpkg_x", "not a usable layer name"),
        ("a" * 64, "not a usable layer name"),
        (RUNS_TABLE, "reserved"),
        (TILES_TABLE, "reserved"),
    ],
)
def test_unusable_layer_names_are_refused_with_the_rule(name, match):
    with pytest.raises(ConfigError, match=match):
        check_layer_name(name)
    with pytest.raises(ConfigError, match=r"^layer name"):
        check_layer_name(name, option="layer name")


# --------------------------------------------------------------------------------------------------
# Parameters, paths and times
# --------------------------------------------------------------------------------------------------


def test_job_parameters_equal_the_command_lines_for_the_same_run(tmp_path):
    raster = tmp_path / "a.tif"
    raster.write_bytes(b"")
    job = GroundingJob(expression="all tanks", tile_size=224, overlap=32, max_new_tokens=96, top_k=2)
    cli = run_parameters(
        raster=str(raster.resolve()), expression="all tanks", mode="all", gsd=None, tile=224, overlap=32,
        bands=(1, 2, 3), bbox=None, dst_crs=None, max_new_tokens=96, reasoning=True, coarse_to_fine=True,
        top_k=2, min_score=0.0, scale=1.0,
    )  # fmt: skip
    ours = job_parameters(job, raster=str(tmp_path / "." / "a.tif"), bands=[1, 2, 3])
    assert parameters_json(ours) == parameters_json(cli)
    assert json.loads(parameters_json(cli))["bands"] == [1, 2, 3]
    other = job_parameters(
        GroundingJob(expression="all tanks", tile_size=224, overlap=64), raster=raster, bands=[1, 2, 3]
    )
    assert parameters_json(other) != parameters_json(cli), "another overlap is another run"


def test_a_polygon_area_is_part_of_the_parameters():
    area = (AreaPolygon(((0.0, 0.0), (50.0, 0.0), (50.0, 50.0))),)
    job = GroundingJob(expression="x", area_polygons=area)
    params = job_parameters(job, raster="/vsimem/a.tif", bands=[1, 1, 1])
    assert params["area"] == area_digest(area)
    assert "area" not in job_parameters(GroundingJob(expression="x"), raster="/vsimem/a.tif", bands=[1, 1, 1])


@pytest.mark.parametrize(
    "text",
    ["/vsizip/a.zip/b.tif", "https://example.org/cog.tif", "GPKG:/data/x.gpkg:layer", "/vsicurl/http://h/x.tif"],
)
def test_gdal_paths_are_kept_as_given(text):
    assert canonical_raster_path(text) == text


def test_local_paths_are_resolved(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    monkeypatch.chdir(tmp_path / "d")
    assert canonical_raster_path("../x.tif") == str(tmp_path.resolve() / "x.tif")


def test_times_are_naive_utc_in_milliseconds():
    t = now_utc()
    assert t.tzinfo is None and t.microsecond % 1000 == 0
    assert iso_ms(datetime(2025, 1, 2, 3, 4, 5, 678000)) == "2025-01-02T03:04:05.678"


# --------------------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------------------


def test_list_tables(tmp_path):
    assert list_tables(tmp_path / "none.gpkg") == []
    text = tmp_path / "t.gpkg"
    text.write_text("hello")
    with pytest.raises(OutputError, match="not a GeoPackage; it is left untouched"):
        list_tables(text)
    assert text.read_text() == "hello"
    plain = tmp_path / "plain.gpkg"
    with sqlite3.connect(plain) as con:
        con.execute("CREATE TABLE t (x)")
    with pytest.raises(OutputError, match="cannot be read as a GeoPackage"):
        list_tables(plain)


def test_a_new_run_writes_its_row_and_an_empty_raw_layer(tmp_path):
    out = tmp_path / "o.gpkg"
    writer = SqlWriter()
    sink = open_run(out, writer)
    assert writer.appends == [(RUNS_TABLE, 1), (sink.raw_layer, 0)]
    assert list_tables(out) == [RUNS_TABLE, sink.layer + RAW_SUFFIX]
    assert re.fullmatch(r"all_tanks_\d{8}T\d{6}_[0-9a-f]{6}", sink.layer) and sink.layer.endswith(sink.run_id)
    (run,) = find_runs(out)
    assert (run.run_id, run.layer, run.status, run.expression, run.mode) == (
        sink.run_id, sink.layer, "running", "all tanks", "all",
    )  # fmt: skip
    assert run.parameters == '{"p": 1}' and run.resumable and run.raw_layer == sink.raw_layer
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}", run.started) and run.finished == ""
    (row,) = rows(out, f'SELECT raster_crs, output_crs, raster_width, engine FROM "{RUNS_TABLE}"')
    assert row == (WKT, WKT, 10, '{"model": "tiny", "prompt_version": "v1"}')


def test_commit_writes_raw_rows_then_tiles_and_finish_writes_the_answer(tmp_path):
    out = tmp_path / "o.gpkg"
    writer = SqlWriter()
    sink = open_run(out, writer)
    sink.write_tile("r0c0", tile(0), [det(10, 10, 20, 20), det(30, 30, 40, 40)], "done")
    sink.write_tile("r0c1", tile(1), [], "skipped")
    assert writer.appends[2:] == [], "nothing is written before commit"
    sink.commit()
    assert writer.appends[2:] == [(sink.raw_layer, 2), (TILES_TABLE, 2)]
    sink.commit()
    assert len(writer.appends) == 4, "an empty commit writes nothing"
    assert rows(out, f'SELECT tile_id, status, n_boxes, "window" FROM "{TILES_TABLE}"') == [
        ("r0c0", "done", 2, "[0, 0, 100, 100]"),
        ("r0c1", "skipped", 0, "[100, 0, 200, 100]"),
    ]
    sink.finish([det(10, 10, 20, 20, score=0.7)], RunSummary(status="done", tiles_total=2))
    ((score, run_id, created),) = rows(out, f'SELECT score, run_id, created FROM "{sink.layer}"')
    assert (score, run_id) == (0.7, sink.run_id) and re.fullmatch(r"[\d\-T:.]{23}", created)
    (run,) = find_runs(out)
    assert run.status == "done" and not run.resumable and run.finished
    (summary,) = rows(out, f'SELECT summary FROM "{RUNS_TABLE}"')[0]
    assert json.loads(summary)["tiles_total"] == 2


def test_resume_drops_raw_rows_of_unfinished_tiles_and_reads_the_rest(tmp_path):
    out = tmp_path / "o.gpkg"
    sink = open_run(out)
    sink.write_tile("r0c0", tile(0), [det(10, 10, 20, 20)], "done")
    sink.write_tile("r0c1", tile(1), [], "skipped")
    sink.commit()
    # A kill between the two appends of a commit: raw rows on disk, the tile not marked done.
    killed = GeoPackageRun(out, writer=SqlWriter(fail_on=TILES_TABLE), run_id=sink.run_id, layer=sink.layer,
                           meta=sink.meta, crs=sink.crs, resume=False)  # fmt: skip
    killed.write_tile("r0c2", tile(2), [det(210, 10, 220, 20, tile_id="r0c2")] * 3, "done")
    with pytest.raises(OutputError):
        killed.commit()
    assert len(rows(out, f'SELECT * FROM "{sink.raw_layer}"')) == 4
    again = open_run(out, resume=True)
    assert (again.run_id, again.layer) == (sink.run_id, sink.layer)
    assert dict(again.done_tiles()) == {
        "r0c0": [det(10, 10, 20, 20).detection],
        "r0c1": [],
    }
    assert rows(out, f'SELECT tile_id FROM "{sink.raw_layer}"') == [("r0c0",)]
    assert not again.final_exists


def test_resume_finds_the_run_with_the_same_parameters_only(tmp_path, caplog):
    out = tmp_path / "o.gpkg"
    a = open_run(out, parameters={"p": 1})
    b = open_run(out, resume=True, parameters={"p": 2})
    assert b.run_id != a.run_id and "nothing to resume" in caplog.text
    assert open_run(out, resume=True, parameters={"p": 1}).run_id == a.run_id
    assert open_run(out, resume=True, parameters={"p": 1}, layer=a.layer).run_id == a.run_id
    a.finish([], RunSummary(status="done"))
    with pytest.raises(OutputError, match="already complete"):
        open_run(out, resume=True, parameters={"p": 1})
    assert [r.status for r in find_runs(out)] == ["done", "running"]


def test_the_engines_adapter_is_a_run_parameter_and_resume_needs_the_same_one(tmp_path, caplog):
    out = tmp_path / "o.gpkg"

    def opened(adapter, resume=False):
        return GeoPackageRun.open_run(out, writer=SqlWriter(), expression="all tanks", mode="all", parameters={"p": 1},
                                      raster={"path": "/x.tif", "width": 10, "height": 10},
                                      engine={"model": "tiny", "adapter": adapter}, crs=SameCrs(WKT),
                                      resume=resume)  # fmt: skip

    tuned = opened("tanks_grpo")
    base = opened(None)
    recorded = {r.run_id: json.loads(r.parameters) for r in find_runs(out)}
    assert recorded[tuned.run_id] == {"p": 1, "adapter": "tanks_grpo"}
    assert recorded[base.run_id] == {"p": 1}, "the base model adds no key: older files' runs still resume"
    assert opened("tanks_grpo", resume=True).run_id == tuned.run_id
    assert opened(None, resume=True).run_id == base.run_id
    other = opened("other", resume=True)
    assert other.run_id not in (tuned.run_id, base.run_id) and "nothing to resume" in caplog.text
    assert with_adapter({"p": 1}, {"adapter": ""}) == {"p": 1}


def test_an_answer_layer_already_written_is_not_written_twice(tmp_path):
    out = tmp_path / "o.gpkg"
    sink = open_run(out)
    sink.write_tile("r0c0", tile(0), [det(10, 10, 20, 20)], "done")
    sink.commit()
    sink._write_features(sink.layer, [(det(10, 10, 20, 20), now_utc())], raw=False)  # killed before the mark
    writer = SqlWriter()
    again = open_run(out, writer, resume=True)
    assert again.final_exists
    again.finish([det(10, 10, 20, 20)], RunSummary(status="done"))
    assert writer.appends == [] and len(rows(out, f'SELECT * FROM "{sink.layer}"')) == 1
    assert find_runs(out)[0].status == "done"


def test_an_empty_answer_layer_is_written_again(tmp_path):
    out = tmp_path / "o.gpkg"
    sink = open_run(out)
    sink._write_features(sink.layer, [], raw=False)  # the layer created, its features not yet written
    again = open_run(out, resume=True)
    assert not again.final_exists
    again.finish([det(10, 10, 20, 20)], RunSummary(status="done"))
    assert len(rows(out, f'SELECT * FROM "{sink.layer}"')) == 1


def test_layers_are_never_overwritten_and_files_must_be_geopackages(tmp_path):
    out = tmp_path / "o.gpkg"
    open_run(out, layer="mine")
    with pytest.raises(OutputError, match="never overwritten"):
        open_run(out, layer="mine")
    with pytest.raises(ConfigError, match=r"\.gpkg"):
        open_run(tmp_path / "o.shp")
    with pytest.raises(OutputError, match="does not exist"):
        open_run(tmp_path / "missing" / "o.gpkg")


def test_mark_records_a_cancel(tmp_path):
    out = tmp_path / "o.gpkg"
    sink = open_run(out)
    sink.mark("canceled", {"tiles_processed": 3})
    (run,) = find_runs(out)
    assert run.status == "canceled" and run.resumable and run.finished
    (summary,) = rows(out, f'SELECT summary FROM "{RUNS_TABLE}"')[0]
    assert json.loads(summary) == {"tiles_processed": 3}


class InterruptedAfter(SqlWriter):
    """Ctrl-C right after the append to ``table`` is on disk, before the writer returns."""

    def __init__(self, table: str) -> None:
        super().__init__()
        self.table = table

    def append(self, path, table, fields, rows, geometries=None, crs_wkt=None) -> None:
        super().append(path, table, fields, rows, geometries, crs_wkt)
        if table == self.table:
            raise KeyboardInterrupt


@pytest.mark.parametrize("after", ["raw", TILES_TABLE])
def test_a_commit_interrupted_by_ctrl_c_is_never_written_twice(tmp_path, after):
    """geo-r1 ground commits again when Ctrl-C lands (to keep finished tiles): that must not duplicate rows."""
    out = tmp_path / "o.gpkg"
    sink = open_run(out)
    sink.writer = InterruptedAfter(sink.raw_layer if after == "raw" else TILES_TABLE)
    sink.write_tile("r0c0", tile(0), [det(10, 10, 20, 20)], "done")
    with pytest.raises(KeyboardInterrupt):
        sink.commit()
    sink.commit()
    sink.mark("interrupted")
    assert len(rows(out, f'SELECT * FROM "{sink.raw_layer}"')) == 1
    marked = rows(out, f'SELECT tile_id FROM "{TILES_TABLE}"') if TILES_TABLE in list_tables(out) else []
    assert marked == ([("r0c0",)] if after == TILES_TABLE else [])
    again = open_run(out, resume=True)
    assert dict(again.done_tiles()) == ({"r0c0": [det(10, 10, 20, 20).detection]} if after == TILES_TABLE else {})
    assert len(rows(out, f'SELECT * FROM "{sink.raw_layer}"')) == (1 if after == TILES_TABLE else 0)


@pytest.mark.parametrize("separate", [False, True], ids=["here", "child-process"])
def test_a_wal_hold_keeps_the_file_in_wal_until_released(tmp_path, separate):
    """While held, another process cannot take the file out of WAL (what QGIS does when it closes its last
    handle of a GeoPackage); released and alone, the file is one file in ``delete`` mode again."""
    import subprocess
    import sys

    from geo_r1_qgis.core.gpkg_schema import WalHold

    path = tmp_path / "f.gpkg"
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE t (x)")
    con.close()
    other = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1], timeout=0.2)\n"
             "try: print(c.execute('PRAGMA journal_mode = DELETE').fetchone()[0])\n"
             "except sqlite3.OperationalError as e: print(e)")  # fmt: skip
    hold = WalHold(path, separate=separate)
    assert hold.acquire() and hold.held and hold.acquire()
    try:
        out = subprocess.run([sys.executable, "-c", other, str(path)], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "database is locked"
        with sqlite3.connect(path) as con:  # a writer goes on meanwhile (WAL: readers and a writer at once)
            con.execute("INSERT INTO t VALUES (1)")
            assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        con.close()
    finally:
        hold.release()
    assert not hold.held
    hold.release()  # twice is fine
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert con.execute("SELECT x FROM t").fetchall() == [(1,)]
    con.close()
    assert not (tmp_path / "f.gpkg-wal").exists()
    assert not WalHold(tmp_path / "missing.gpkg").acquire()


def test_a_released_wal_hold_leaves_no_unclosed_pipe(tmp_path):
    """The desktop test saw a ResourceWarning in QGIS's log after every run: the child's stdout was never closed."""
    import gc
    import warnings

    from geo_r1_qgis.core.gpkg_schema import WalHold

    path = tmp_path / "f.gpkg"
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE t (x)")
    con.close()
    gc.collect()  # other tests' garbage (Python 3.13 also warns of unclosed sqlite3 connections) is not ours
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", ResourceWarning)
        hold = WalHold(path, separate=True)
        assert hold.acquire()
        hold.release()
        del hold
        gc.collect()
    leaks = [str(w.message) for w in seen if issubclass(w.category, ResourceWarning)]
    assert not leaks, leaks
