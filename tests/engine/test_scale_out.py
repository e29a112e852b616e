"""Scale-out end to end (issue 20 §1-2): ``geo-r1 ground`` with tiles in flight, retries and several engines.

Real processes throughout: the stand-in OpenAI-compatible server (``scripts/stand_in_openai.py``, deterministic
answers, fault injection) behind ``geo-r1 serve --backend openai``, and ``geo-r1 serve`` engines running the
tiny format-trained model. Each test compares a GeoPackage with the one a clean single-engine run writes,
feature for feature.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from engine.cli import main as cli
from engine.gpkg import RUNS_TABLE, TILES_TABLE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _serve_helpers import start_engine
from _stand_in import start_stand_in

pytestmark = pytest.mark.slow

FAST = ["--tile", "224", "--overlap", "32", "--no-progress"]


def ground(*argv: object) -> int:
    return cli(["ground", *map(str, argv)])


@pytest.fixture(scope="module")
def noise_raster(tmp_path_factory) -> Path:
    """A 900 × 800 noise GeoTIFF: 5 × 4 = 20 tiles of 224 with an overlap of 32."""
    import rasterio
    from rasterio.transform import from_origin

    path = tmp_path_factory.mktemp("raster") / "noise.tif"
    data = np.random.default_rng(7).integers(0, 256, (3, 800, 900), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=900, height=800, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(500000, 5200000, 0.5, 0.5)) as ds:  # fmt: skip
        ds.write(data)
    return path


def features(path: Path) -> dict[str, list]:
    """What a run wrote, without what differs between runs (run id, layer name, times, engine): the raw
    detections per tile and the answer layer's polygons and scores, sorted; every tile's status and box count."""
    with sqlite3.connect(path) as con:
        (layer,) = con.execute(f"SELECT layer FROM {RUNS_TABLE}").fetchone()
        raw = con.execute(f'SELECT tile_id, px_x1, px_y1, px_x2, px_y2, score, label FROM "{layer}_tiles_raw"')
        answer = con.execute(f'SELECT geom, score, label, tile_id FROM "{layer}"')
        tiles = con.execute(f"SELECT tile_id, status, n_boxes FROM {TILES_TABLE}")
        return {"raw": sorted(raw.fetchall()), "answer": sorted(answer.fetchall()), "tiles": sorted(tiles.fetchall())}


def tiles_by_engine(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as con:
        return dict(con.execute(f"SELECT engine, count(*) FROM {TILES_TABLE} GROUP BY engine").fetchall())


def tile_count(path: Path) -> int:
    """Tiles written so far (read-only: connecting must not create the file before the run does)."""
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
            return int(con.execute(f"SELECT count(*) FROM {TILES_TABLE}").fetchone()[0])
    except sqlite3.Error:
        return 0


def when(condition, then, timeout_s: float = 120.0) -> threading.Thread:
    """Run ``then()`` in a thread once ``condition()`` holds (or after the timeout)."""

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not condition():
            time.sleep(0.02)
        then()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


# -- a remote server with faults ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """The stand-in (0.05 s per completion) and two engines in front of it: one that retries each completion
    (the default) and one that does not (``--remote-retries 0``: its 502s reach the client, which retries)."""
    stand_in = start_stand_in("--delay", "0.05")
    tmp = tmp_path_factory.mktemp("remote")
    engines = []
    try:
        for name, extra in (("retrying", []), ("plain", ["--remote-retries", "0"])):
            engines.append(start_engine(tmp / name, ["--backend", "openai", "--base-url", stand_in.base_url,
                                                     "--concurrency", "16", *extra]))  # fmt: skip
        yield stand_in, engines[0], engines[1]
    finally:
        for e in engines:
            e.stop()
        stand_in.stop()


@pytest.fixture(scope="module")
def clean_run(remote, noise_raster, tmp_path_factory) -> dict[str, list]:
    stand_in, engine, _ = remote
    stand_in.control(fault_every=0)
    out = tmp_path_factory.mktemp("clean") / "clean.gpkg"
    assert ground(noise_raster, "all storage tanks", "-o", out, *FAST, "--engine", engine.url,
                  "--token-file", engine.token_file) == 0  # fmt: skip
    result = features(out)
    assert len(result["tiles"]) == 20 and result["raw"], "the stand-in answers boxes for most tiles"
    return result


def test_tiles_in_flight_reach_the_remote_servers_concurrency(remote, noise_raster, clean_run, tmp_path):
    stand_in, engine, _ = remote
    stand_in.control(fault_every=0, delay=1.0)  # long enough for every request of a round to be in flight at once
    stand_in.reset()
    out = tmp_path / "o.gpkg"
    # the engine's /info says 16 (its --concurrency): 16 tiles in flight, in requests of 4
    try:
        assert ground(noise_raster, "all storage tanks", "-o", out, *FAST, "--batch", "4", "--engine", engine.url,
                      "--token-file", engine.token_file) == 0  # fmt: skip
    finally:
        stand_in.control(delay=0.05)
    assert stand_in.stats()["peak_in_flight"] == 16
    assert features(out) == clean_run
    assert tiles_by_engine(out) == {engine.url: 20}


def test_transient_faults_are_retried_and_change_nothing(remote, noise_raster, clean_run, tmp_path, capsys):
    stand_in, engine, plain = remote
    # Every 3rd completion fails: a dropped connection, then 502, 503 and 429 (Retry-After 0) in turn.
    stand_in.control(fault="drop,502,503,429", fault_every=3, retry_after=0)
    stand_in.reset()
    out = tmp_path / "retried-by-the-engine.gpkg"
    assert ground(noise_raster, "all storage tanks", "-o", out, *FAST, "--engine", engine.url,
                  "--token-file", engine.token_file) == 0, capsys.readouterr().err  # fmt: skip
    assert set(stand_in.stats()["faults"]) == {"drop", "502", "503", "429"}
    assert features(out) == clean_run
    # The engine that does not retry answers 502 or 503: the client retries the request (one tile each).
    stand_in.control(fault="drop,502,503,429", fault_every=4)
    stand_in.reset()
    out = tmp_path / "retried-by-the-client.gpkg"
    assert ground(noise_raster, "all storage tanks", "-o", out, *FAST, "--batch", "1", "--engine", plain.url,
                  "--token-file", plain.token_file) == 0, capsys.readouterr().err  # fmt: skip
    assert sum(stand_in.stats()["faults"].values()) >= 4
    assert features(out) == clean_run
    stand_in.control(fault_every=0)


def test_a_persistent_fault_stops_the_run_cleanly_and_resume_completes_it(remote, noise_raster, clean_run,
                                                                          tmp_path, capsys):  # fmt: skip
    stand_in, engine, _ = remote
    stand_in.control(fault_every=0)
    out = tmp_path / "o.gpkg"
    args = [noise_raster, "all storage tanks", "-o", out, *FAST, "--batch", "2", "--in-flight", "4",
            "--engine", engine.url, "--token-file", engine.token_file]  # fmt: skip
    # once some tiles are written, every completion fails with 502 from then on
    watcher = when(lambda: tile_count(out) >= 4, lambda: stand_in.control(fault="502", fault_every=1))
    rc = ground(*args)
    watcher.join()
    err = capsys.readouterr().err
    assert rc == 1 and "502" in err and "--resume" in err, err
    done = tile_count(out)
    assert 4 <= done < 20
    with sqlite3.connect(out) as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert con.execute(f"SELECT status FROM {RUNS_TABLE}").fetchone() == ("failed",)
    stand_in.control(fault_every=0)
    assert ground(*args, "--resume") == 0
    assert features(out) == clean_run  # no tile twice, none missing


# -- several engines --------------------------------------------------------------------------------------


def test_three_engines_one_killed_mid_run_give_the_single_engines_output(tiny_format_model_dir, tmp_path, capsys):
    from train.sample_data import SampleDataConfig, write_samples

    write_samples(SampleDataConfig(out_dir=tmp_path / "samples", size=256))
    raster = tmp_path / "samples" / "utm.tif"
    token = "shared-token-of-three-engines-0123456789"  # one token for the three (each proves it holds it)
    engines = []
    try:
        for k in range(3):
            own = tmp_path / f"e{k}" / "config" / "geo-r1" / "engine.token"  # where start_engine points serve
            own.parent.mkdir(parents=True, mode=0o700)
            own.write_text(token + "\n")
            own.chmod(0o600)
            args = ["--model", str(tiny_format_model_dir), "--device", "cpu", "--batch-size", "1", "--threads", "1"]
            engines.append(start_engine(tmp_path / f"e{k}", args))
        token_file = engines[0].token_file
        # 9 tiles of 112, one a request (an engine's batch of one answers as it would alone)
        args = [raster, "all storage tanks", "--no-progress", "--tile", "112", "--overlap", "16", "--batch", "1",
                "--max-new-tokens", "96", "--token-file", token_file]  # fmt: skip
        single = tmp_path / "single.gpkg"
        assert ground(*args, "-o", single, "--engine", engines[0].url) == 0
        assert features(single)["raw"], "the format-trained tiny model writes boxes: the comparison has content"
        several = tmp_path / "several.gpkg"
        victim = engines[1]
        killer = when(lambda: tile_count(several) >= 2, lambda: os.kill(victim.proc.pid, signal.SIGKILL))
        rc = ground(*args, "-o", several, *(a for e in engines for a in ("--engine", e.url)))
        killer.join()
        err = capsys.readouterr().err
        assert rc == 0, err
        assert victim.proc.wait(timeout=10) == -signal.SIGKILL
        assert f"engine {victim.url} failed during the run" in err, err
        by_engine = tiles_by_engine(several)
        assert set(by_engine) <= {e.url for e in engines} and len(by_engine) >= 2, by_engine
        assert by_engine[engines[0].url] > 0 and by_engine[engines[2].url] > 0, by_engine
        assert features(several) == features(single)
    finally:
        for e in engines:
            e.stop()
