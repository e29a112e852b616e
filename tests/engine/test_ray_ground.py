"""Tests of engine/ray_ground.py: ``geo-r1 ground --ray`` on a real Ray cluster of two nodes on this machine.

The cluster is started by the tests (``ray start --head`` and a worker node, each ``--block`` in its own
process group, in a temporary folder, on free ports, with a token of their own) and stopped at the end. The
actors load the format-trained tiny model (``tiny_format_model_dir``: it answers with boxes, so there are
features to compare). The reference is the single-process ``geo-r1 ground --model`` run of the same rasters
(real ones, from ../shared/data): the Ray run must write the same features, tile for tile, also when it is
interrupted (Ctrl-C) and resumed, and when the worker node is killed in the middle of the run.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyogrio
import pytest
from _ray_helpers import RayCluster, free_port

from engine.gpkg import RUNS_TABLE, TILES_TABLE
from geo_r1_qgis.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
RASTERS = [SHARED / "RGB.byte.tif", SHARED / "cog.tif"]  # nodata borders (skipped tiles); float64 (the stretch)
# --batch 1: a tile's numbers then never depend on which tiles share its batch (float sums in another order
# move scores in the 7th digit), so the runs can be compared exactly
RUN = ["all storage tanks", "--tile", "224", "--overlap", "32", "--max-new-tokens", "96", "--batch", "1",
       "--no-progress", "--device", "cpu"]  # fmt: skip

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not there"),
]


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("ray.data", reason="the Ray extra is not installed: pip install -e '.[ray]' (make setup does)")
    c = RayCluster()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def reference(tiny_format_model_dir, tmp_path_factory) -> Path:
    """The single-process runs of RASTERS (``geo-r1 ground --model``, an engine of its own), one layer each."""
    out = tmp_path_factory.mktemp("reference") / "single.gpkg"
    for raster in RASTERS:
        cmd = [sys.executable, "-m", "engine.cli", "ground", raster, *RUN, "-o", out, "--model", tiny_format_model_dir]
        done = subprocess.run(list(map(str, cmd)), cwd=REPO, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        assert done.returncode == 0, done.stderr
    return out


def _runs(path: Path) -> dict[str, str]:
    """raster -> layer of each finished run in a GeoPackage."""
    with sqlite3.connect(path) as con:
        rows = con.execute(f"SELECT raster_path, layer, status FROM {RUNS_TABLE}").fetchall()
    assert all(status == "done" for _, _, status in rows), rows
    return {raster: layer for raster, layer, _ in rows}


def _features(path: Path, layer: str) -> list[tuple]:
    """A layer's features without what differs between two runs of the same thing (run id, time), sorted."""
    meta, _, geometry, fields = pyogrio.raw.read(path, layer=layer)
    keep = [i for i, name in enumerate(meta["fields"]) if name not in ("run_id", "created")]
    rows = [(bytes(g), *(fields[i][k] for i in keep)) for k, g in enumerate(geometry)]
    return sorted(rows, key=repr)


def _tiles(path: Path, layer: str) -> list[tuple]:
    with sqlite3.connect(path) as con:
        (run_id,) = con.execute(f"SELECT run_id FROM {RUNS_TABLE} WHERE layer = ?", (layer,)).fetchone()
        return sorted(con.execute(f"SELECT tile_id, status, n_boxes, window FROM {TILES_TABLE} WHERE run_id = ?",
                                  (run_id,)).fetchall())  # fmt: skip


def assert_same_run(ray_out: Path, single: Path, raster: Path) -> int:
    """The Ray run of ``raster`` wrote what the single-process run wrote: tiles, per-tile boxes and final
    features; returns the number of final features (so a test can see there was something to compare)."""
    ray_layer, single_layer = _runs(ray_out)[str(raster)], _runs(single)[str(raster)]
    assert _tiles(ray_out, ray_layer) == _tiles(single, single_layer)
    with sqlite3.connect(ray_out) as con:  # each asked tile records the actor that answered it
        engines = {e for (e,) in con.execute(f"SELECT engine FROM {TILES_TABLE} WHERE status = 'done'")}
    assert engines and all(e.startswith("ray:") for e in engines), engines
    for suffix in ("_tiles_raw", ""):
        assert _features(ray_out, ray_layer + suffix) == _features(single, single_layer + suffix), suffix
    return len(_features(ray_out, ray_layer))


# -- without a cluster -----------------------------------------------------------------------------------


def test_rasters_from_a_glob_or_a_list(tmp_path):
    from engine.ray_ground import expand_rasters

    for name in ("b.tif", "a.tif", "sub/c.tif"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert expand_rasters(tmp_path / "*.tif") == [str(tmp_path / "a.tif"), str(tmp_path / "b.tif")]
    assert expand_rasters(f"{tmp_path}/**/*.tif")[-1] == str(tmp_path / "sub" / "c.tif")
    (tmp_path / "list.txt").write_text("# two rasters\nb.tif\n\n/vsicurl/https://example.org/x.tif\n")
    assert expand_rasters(f"@{tmp_path / 'list.txt'}") == [
        str(tmp_path / "b.tif"),
        "/vsicurl/https://example.org/x.tif",
    ]
    assert expand_rasters("/vsizip/a.zip/x[1].tif") == ["/vsizip/a.zip/x[1].tif"]  # GDAL paths are GDAL's
    with pytest.raises(ConfigError, match="no file matches"):
        expand_rasters(tmp_path / "*.jp2")
    with pytest.raises(ConfigError, match="cannot read the raster list"):
        expand_rasters(f"@{tmp_path / 'missing.txt'}")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ray"], "--model M .* or --base-url URL"),
        (["--ray", "--model", "m", "--base-url", "http://h:8000/v1"], "not both"),
        (["--ray", "--engine", "http://127.0.0.1:8731"], "--engine is one running engine"),
        (["--ray", "--base-url", "h:8000"], "must be an http"),
        (["--base-url", "http://h:8000/v1"], "add --ray"),
        (["--ray", "--model", "m", "--ray-workers", "0"], "--ray-workers must be an integer >= 1"),
        (["--ray", "--model", "m", "--mode", "one"], "--no-coarse-to-fine"),
        (["--ray", "--model", "m", "--outline"], "not on Ray yet"),
    ],
)
def test_bad_ray_options_are_one_clear_line(tmp_path, capsys, argv, message):
    from engine.cli import main as cli

    assert cli(["ground", str(RASTERS[0]), "tanks", "-o", str(tmp_path / "o.gpkg"), *argv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "o.gpkg").exists()


def test_an_unreachable_cluster_is_a_clear_error_and_no_geopackage(tmp_path, tiny_model_dir, capsys):
    pytest.importorskip("ray.data", reason="the Ray extra is not installed: pip install -e '.[ray]' (make setup does)")
    from engine.cli import main as cli

    out = tmp_path / "o.gpkg"
    rc = cli(["ground", str(RASTERS[1]), "tanks", "-o", str(out), "--model", str(tiny_model_dir),
              "--ray", f"127.0.0.1:{free_port()}"])  # fmt: skip
    assert rc == 1
    assert "does not answer" in capsys.readouterr().err
    assert not out.exists()


# -- on the cluster ------------------------------------------------------------------------------------


def _first_tiles(out: Path, proc: subprocess.Popen) -> int:
    """Wait until the run has written its first tiles; how many it has then (0 if it ended first)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists():
            with contextlib.suppress(sqlite3.Error), sqlite3.connect(f"file:{out}?mode=ro", uri=True) as con:
                done = con.execute(f"SELECT count(*) FROM {TILES_TABLE}").fetchone()[0]
                if done:
                    return int(done)
        time.sleep(0.1)
    return 0


def test_ray_run_equals_the_single_process_run_also_interrupted_and_resumed(
    cluster, reference, tiny_format_model_dir, tmp_path
):
    """Two rasters (an @FILE list) on two nodes and two actors, Ctrl-C after the first tiles, then --resume:
    the same tiles, boxes and features as the single-process runs."""
    listing = tmp_path / "rasters.txt"
    listing.write_text("".join(f"{r}\n" for r in RASTERS))
    out = tmp_path / "ray.gpkg"
    argv = (f"@{listing}", *RUN, "-o", out, "--model", tiny_format_model_dir, "--ray-workers", "2", "--ray-cpus", "0.5")
    proc = cluster.ground(*argv, wait=False)
    assert _first_tiles(out, proc), f"the run ended before it wrote a tile: {proc.communicate()[0]}"
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "run the same command with --resume" in output, output
    proc = cluster.ground(*argv, "--resume")
    assert proc.returncode == 0, proc.output
    resumed = [int(n) for n in re.findall(r"(\d+) resumed", proc.output)]
    assert len(resumed) == len(RASTERS) and sum(resumed) > 0, proc.output
    assert sum(assert_same_run(out, reference, r) for r in RASTERS) > 0  # features there were, and they match


def test_a_worker_node_killed_mid_run_is_survived(cluster, reference, tiny_format_model_dir, tmp_path):
    """The worker node (raylet, object store, its actor) is SIGKILLed once the first tiles are written; Ray
    restarts the actor on the head and re-runs what was lost, and the file is the single-process run's."""
    out = tmp_path / "ray.gpkg"
    proc = cluster.ground(RASTERS[0], *RUN, "-o", out, "--model", tiny_format_model_dir, "--ray-workers", "2",
                          "--ray-cpus", "0.5", wait=False)  # fmt: skip
    done_at_kill = _first_tiles(out, proc)
    assert proc.poll() is None, f"the run ended before the kill: {proc.communicate()[0]}"
    cluster.kill("worker")
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output
    total = len(_tiles(reference, _runs(reference)[str(RASTERS[0])]))
    assert 0 < done_at_kill < total
    assert assert_same_run(out, reference, RASTERS[0]) > 0
