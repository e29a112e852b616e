"""Tests of engine/ground.py: ``geo-r1 ground`` end to end against a real engine process.

The engine is ``geo-r1 serve`` with the tiny random checkpoint (``tiny_model_dir``): its boxes are
meaningless, so the geometry evidence (known pixels -> known map coordinates on the four synthetic
rasters) runs the real reader and writer with a client that answers known boxes, and the command
tests check exit codes, messages, files, resume and no-overwrite.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import pyogrio
import pytest

from engine.cli import main as cli
from engine.gpkg import RUNS_TABLE, TILES_TABLE, CrsTransform, GeoPackageSink, ring_from_wkb
from engine.rasters import RasterioSource
from geo_r1_qgis.core.client import Box, EngineClient, GroundResult
from geo_r1_qgis.core.geometry import PixelBox, box_to_polygon
from geo_r1_qgis.core.pipeline import GroundingJob, run_grounding

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
FAST = ["--tile", "224", "--overlap", "32", "--max-new-tokens", "8", "--no-progress"]

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_engine(model: Path, tmp: Path) -> tuple[subprocess.Popen, str, Path]:
    port = _free_port()
    token = tmp / f"token-{port}"
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--model", str(model), "--port", str(port)]
    cmd += ["--token-file", str(token), "--device", "cpu", "--batch-size", "8"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if token.exists():
            try:
                EngineClient(url, token.read_text().strip()).health(timeout_s=1)
                return proc, url, token
            except Exception:
                pass
        assert proc.poll() is None, "the engine exited while starting"
        time.sleep(0.25)
    proc.kill()
    raise AssertionError("the engine did not start")


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    proc, url, token = start_engine(tiny_model_dir, tmp_path_factory.mktemp("engine"))
    yield ["--engine", url, "--token-file", str(token)]
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    from train.sample_data import SampleDataConfig, write_samples

    out = tmp_path_factory.mktemp("samples")
    write_samples(SampleDataConfig(out_dir=out, size=256))
    return out


def ground(*argv: str) -> int:
    return cli(["ground", *map(str, argv)])


def tile_ids(path: Path) -> list[str]:
    with sqlite3.connect(path) as con:
        return [r[0] for r in con.execute(f"SELECT tile_id FROM {TILES_TABLE}")]


# -- known pixels -> known map coordinates, through the real reader and writer -------------------------


class TruthClient:
    """Answers, for each tile read, the true boxes that lie wholly inside it (in tile pixels)."""

    def __init__(self, truth: list[PixelBox], read_log: deque) -> None:
        self.truth, self.read_log = truth, read_log

    def ground(self, tiles, expression, task="multi", reasoning=True, max_new_tokens=256):
        out = []
        for _ in tiles:
            tile = self.read_log.popleft()
            boxes = tuple(
                Box(*tile.to_tile(b).as_tuple(), score=0.9, label="tank") for b in self.truth if tile.window.contains(b)
            )
            out.append(GroundResult(boxes, 1.0 if boxes else 0.0, "known", "", "ok"))
        return out


@pytest.mark.parametrize(("name", "tol"), [("utm", 0.01), ("wgs84", 1e-9), ("webmercator", 0.01), ("rotated", 0.01)])
def test_known_pixels_land_on_known_map_coordinates(samples, tmp_path, name, tol):
    truth_fc = json.loads((samples / f"{name}.objects.geojson").read_text())
    feats = [f for f in truth_fc["features"] if f["properties"]["category"] == "tank"]
    truth = [PixelBox(*f["properties"]["pixel_box"]) for f in feats]
    read_log: deque = deque()
    with RasterioSource(samples / f"{name}.tif") as src:
        original = src.read
        src.read = lambda t: (read_log.append(t), original(t))[1]  # type: ignore[method-assign]
        sink = GeoPackageSink.open_run(
            tmp_path / "o.gpkg",
            expression="all storage tanks",
            mode="all",
            parameters={},
            raster=src.describe(),
            engine={},
            crs=CrsTransform(src.crs_wkt, None),
        )
        job = GroundingJob("all storage tanks", mode="all", tile_size=112, overlap=48)
        summary = run_grounding(job, src, sink, TruthClient(truth, read_log))
        transform = src.transform
    assert summary.detections_final == len(truth) > 0
    _, _, geoms, _fields = pyogrio.raw.read(tmp_path / "o.gpkg", layer=sink.layer, columns=["tile_id"])
    got = sorted(ring_from_wkb(g) for g in geoms)
    # the truth file's polygons, written by the sample generator from the same pixel boxes
    want = sorted(tuple(tuple(p) for p in f["geometry"]["coordinates"][0]) for f in feats)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        for p in w:
            assert min(abs(p[0] - q[0]) + abs(p[1] - q[1]) for q in g) <= tol
    for b in truth:  # and the pixel corners by hand through the full affine
        ring = box_to_polygon(b, transform)
        assert any(
            all(abs(a[0] - c[0]) <= tol and abs(a[1] - c[1]) <= tol for a, c in zip(ring, g, strict=True)) for g in got
        )


# -- the command -------------------------------------------------------------------------------------------

SHARED_EXPECT = {
    "naip_m_4709963_se_14_20200831.tif": (0, ""),
    "RGB.byte.tif": (0, ""),
    "cog.tif": (0, ""),
    "rgb1_fake_nir_epsg3857.tif": (0, ""),
    "all-nodata.tif": (1, "nodata"),
    "float_nan.tif": (1, "no CRS"),
}


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not there")
@pytest.mark.parametrize("name", sorted(SHARED_EXPECT))
def test_every_shared_raster(engine, tmp_path, capsys, name):
    out = tmp_path / "o.gpkg"
    rc = ground(SHARED / name, "all buildings", "-o", out, "--mode", "all", *FAST, *engine)
    err = capsys.readouterr().err
    code, message = SHARED_EXPECT[name]
    assert rc == code, err
    if code:
        assert message in err and not out.exists()
    else:
        with sqlite3.connect(out) as con:
            (status, layer, _raster) = con.execute(f"SELECT status, layer, raster_info FROM {RUNS_TABLE}").fetchone()
        assert status == "done"
        info = pyogrio.read_info(out, layer=layer)
        assert info["geometry_type"] == "Polygon"
        assert len(tile_ids(out)) == len(set(tile_ids(out))) > 0


def test_bad_inputs_leave_no_geopackage(engine, samples, tmp_path, capsys):
    out = tmp_path / "o.gpkg"
    raster = samples / "utm.tif"
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00" + b"\x00" * 64)
    cases = [
        ([raster, "x", "-o", out, "--bbox", "0,0,10,10", *engine], "does not overlap"),
        ([raster, "x", "-o", out, "--bbox", "630000,4249900,630000,4250000", *engine], "empty"),
        ([corrupt, "x", "-o", out, *engine], "corrupt"),
        (
            [raster, "x", "-o", out, "--engine", f"http://127.0.0.1:{_free_port()}", "--token-file", engine[-1]],
            "cannot reach the engine",
        ),
        ([raster, "x", "-o", out, "--dst-crs", "EPSG:99999999", *engine], "--dst-crs"),
    ]
    for argv, message in cases:
        assert ground(*argv, *FAST) == 1
        err = capsys.readouterr().err
        assert message in err and not out.exists(), err


def test_existing_layers_are_never_overwritten(engine, samples, tmp_path, capsys):
    out = tmp_path / "o.gpkg"
    args = [samples / "utm.tif", "all storage tanks", "-o", out, "--mode", "all", *FAST, *engine]
    assert ground(*args, "--layer", "tanks") == 0
    assert ground(*args, "--layer", "tanks") == 1
    assert "never overwritten" in capsys.readouterr().err
    assert ground(*args) == 0  # a new run: a new layer beside the first
    layers = {n for n, g in pyogrio.list_layers(out) if g == "Polygon"}
    assert "tanks" in layers and len([n for n in layers if not n.endswith("_tiles_raw")]) == 2


def test_dst_crs_and_mode_one(engine, samples, tmp_path):
    out = tmp_path / "o.gpkg"
    assert (
        ground(
            samples / "utm.tif",
            "the largest storage tank",
            "-o",
            out,
            "--dst-crs",
            "EPSG:4326",
            "--mode",
            "one",
            *FAST,
            *engine,
        )
        == 0
    )
    with sqlite3.connect(out) as con:
        layer, params = con.execute(f"SELECT layer, parameters FROM {RUNS_TABLE}").fetchone()
    assert pyogrio.read_info(out, layer=layer)["crs"] == "EPSG:4326"
    assert json.loads(params)["mode"] == "one"
    assert pyogrio.read_info(out, layer=layer)["features"] <= 1


def test_engine_killed_mid_run_then_resume(tiny_model_dir, samples, tmp_path, capsys):
    proc, url, token = start_engine(tiny_model_dir, tmp_path)
    out = tmp_path / "o.gpkg"
    args = [
        samples / "rotated.tif",
        "all storage tanks",
        "-o",
        out,
        "--mode",
        "all",
        "--tile",
        "56",
        "--overlap",
        "8",
        "--batch",
        "1",
        "--max-new-tokens",
        "8",
        "--no-progress",
    ]

    def kill_when_started() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if out.exists() and len(tile_ids(out)) >= 3:
                    break
            except sqlite3.Error:
                pass
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_started)
    killer.start()
    rc = ground(*args, "--engine", url, "--token-file", token)
    killer.join()
    proc.wait()
    err = capsys.readouterr().err
    assert rc == 1 and "--resume" in err, err
    with sqlite3.connect(out) as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    done_before = len(tile_ids(out))
    assert done_before >= 3
    proc2, url2, token2 = start_engine(tiny_model_dir, tmp_path)
    try:
        assert ground(*args, "--engine", url2, "--token-file", token2, "--resume") == 0
    finally:
        proc2.terminate()
        proc2.wait(timeout=30)
    ids = tile_ids(out)
    assert len(ids) == len(set(ids)) > done_before
    with sqlite3.connect(out) as con:
        assert con.execute(f"SELECT count(*), min(status) FROM {RUNS_TABLE}").fetchone() == (1, "done")


def test_model_starts_its_own_engine(tiny_model_dir, samples, tmp_path, capsys):
    out = tmp_path / "o.gpkg"
    rc = ground(
        samples / "webmercator.tif",
        "all storage tanks",
        "-o",
        out,
        "--mode",
        "all",
        *FAST,
        "--model",
        tiny_model_dir,
        "--device",
        "cpu",
    )
    assert rc == 0, capsys.readouterr().err
    assert pyogrio.read_info(out, layer=RUNS_TABLE)["features"] == 1


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        text = (task / "children").read_text() if (task / "children").exists() else ""
        out += [int(c) for c in text.split()]
    return out


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            stat = Path(f"/proc/{pid}/stat").read_text().split()
            if stat[2] == "Z":  # a zombie: it has exited
                return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGHUP])
def test_an_engine_started_for_a_run_dies_with_it(tiny_model_dir, samples, tmp_path, sig):
    """Issue 8.1: before, the engine kept running under PID 1 (and its token folder stayed) after the
    command was killed by anything but Ctrl-C."""
    import tempfile

    cmd = [sys.executable, "-m", "engine.cli", "ground", str(samples / "utm.tif"), "all storage tanks", "-o",
           str(tmp_path / "o.gpkg"), *map(str, FAST), "--model", str(tiny_model_dir), "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 120
        engine_pid = None
        while engine_pid is None and time.monotonic() < deadline and proc.poll() is None:
            kids = _children(proc.pid)
            engine_pid = kids[0] if kids else None
            time.sleep(0.2)
        assert engine_pid, "the run never started its engine"
        time.sleep(2.0)  # let it load
        proc.send_signal(sig)
        proc.wait(timeout=30)
        assert _gone(engine_pid, within_s=15), f"the engine (PID {engine_pid}) outlived the run killed by {sig!r}"
    finally:
        if proc.poll() is None:
            proc.kill()
    # a later run cleans up the folder a killed run left
    from engine.ground import ENGINE_DIR_PREFIX, OWNER_FILE, remove_stale_engine_dirs

    stale = Path(tempfile.mkdtemp(prefix=ENGINE_DIR_PREFIX))
    (stale / OWNER_FILE).write_text(str(proc.pid))  # that PID has exited
    assert stale in remove_stale_engine_dirs()
    assert not stale.exists()


def test_checks_that_fail_every_time_come_before_the_geopackage(engine, samples, tmp_path, capsys):
    """Issue 8.6: a 10,000-character expression (refused by the engine) and an unreadable first tile used to
    leave a GeoPackage with a "failed" run, and advice to --resume that could never work."""
    out = tmp_path / "o.gpkg"
    assert ground(samples / "utm.tif", "tank " * 2000, "-o", out, *engine, *FAST) == 1
    err = capsys.readouterr().err
    assert "characters long" in err and "--resume" not in err and not out.exists(), err


def _truncated_tiff(path: Path, keep: float) -> Path:
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    profile = {"driver": "GTiff", "width": 512, "height": 512, "count": 3, "dtype": "uint8", "tiled": True,
               "blockxsize": 128, "blockysize": 128, "crs": "EPSG:32633",
               "transform": from_origin(500000, 4000000, 1, 1)}  # fmt: skip
    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(rng.integers(0, 255, (3, 512, 512), dtype=np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def test_an_unreadable_block_names_the_tile_the_window_and_gdals_message(engine, tmp_path, capsys):
    raster = _truncated_tiff(tmp_path / "truncated.tif", keep=0.5)
    out = tmp_path / "o.gpkg"
    assert ground(raster, "tanks", "-o", out, *engine, "--tile", "224", "--overlap", "0", "--max-new-tokens", "8",
                  "--no-progress", "--no-coarse-to-fine") == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "cannot read tile" in err and "columns" in err and "rows" in err, err
    assert "see previous exception" not in err.lower() or "<-" in err, err  # GDAL's own words are shown
    assert "with --resume" not in err and "--resume cannot mend this" in err, err
    assert "IReadBlock failed" in err or "TIFFRead" in err, err


def test_gdal_virtual_paths_reach_gdal_unchanged(engine, samples, tmp_path, capsys):
    """Issue 8.8: /vsizip/ and /vsicurl/ paths got "does not exist", and the URL was mangled (https:/)."""
    import zipfile

    from engine.rasters import RasterioSource, is_gdal_path
    from geo_r1_qgis.core.errors import RasterError

    archive = tmp_path / "scene.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(samples / "utm.tif", "inside/utm.tif")
    out = tmp_path / "o.gpkg"
    assert ground(f"/vsizip/{archive}/inside/utm.tif", "tanks", "-o", out, *engine, *FAST) == 0, capsys.readouterr().err
    assert out.exists()
    url = "/vsicurl/https://127.0.0.1:9/nothing/here.tif"
    assert is_gdal_path(url) and is_gdal_path("GPKG:/data/x.gpkg:layer") and not is_gdal_path("/data/x.tif")
    with pytest.raises(RasterError) as err:
        RasterioSource(url)
    assert "https://127.0.0.1:9/nothing/here.tif" in str(err.value) and "does not exist" not in str(err.value)


_AS_NOBODY = os.geteuid() == 0 and bool(shutil.which("setpriv"))


@pytest.mark.skipif(not _AS_NOBODY, reason="needs root and setpriv to run the command as the user 'nobody'")
def test_an_unwritable_output_is_one_line_and_changes_nothing(samples, tmp_path):
    """Issue 8.5: as an unprivileged user, -o in a read-only folder or a read-only .gpkg gave a 30-line
    pyogrio traceback."""
    work = tmp_path / "w"
    work.mkdir()
    shutil.copy(samples / "utm.tif", work / "utm.tif")
    locked = work / "locked"
    locked.mkdir()
    readonly = work / "ro.gpkg"
    readonly.write_bytes(b"")
    for p, mode in ((tmp_path, 0o755), (work, 0o755), (locked, 0o555), (readonly, 0o444), (work / "utm.tif", 0o644)):
        p.chmod(mode)
    for parent in tmp_path.parents:  # nobody must be able to reach the raster
        if parent.stat().st_mode & 0o005 != 0o005:
            parent.chmod(parent.stat().st_mode | 0o005)
    for out, words in ((locked / "out.gpkg", "not writable"), (readonly, "not writable")):
        cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-m", "engine.cli",
               "ground", str(work / "utm.tif"), "tanks", "-o", str(out), "--engine", "http://127.0.0.1:9"]  # fmt: skip
        env = {**os.environ, "HOME": str(work), "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 1 and len(lines) == 1 and words in lines[0], proc.stderr
    assert not (locked / "out.gpkg").exists() and readonly.read_bytes() == b""
