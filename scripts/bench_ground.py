"""Benchmark of ``geo-r1 ground`` outside the model: per-tile overhead, memory, coarse to fine.

Usage:  .venv/bin/python scripts/bench_ground.py [--tmp /tmp/geo-r1-bench] [--model .cache/tiny-model-...]

1. **Per-tile overhead outside the model.** The real reader (rasterio, windowed), the real client
   (base64 + JSON over HTTP), the real merge and the real GeoPackage writer, against a *null
   engine*: a stdlib HTTP server in this process that decodes each request (JSON + base64, as the
   engine does) and answers two fixed boxes per tile without running any model. So the figure is
   read + encode + send + parse + merge + write, and nothing of the model.
2. **Peak memory** (``VmHWM`` of a fresh subprocess) reading every tile of a 4000×4000 and a
   40000×40000 tiled, deflate-compressed uint8 GeoTIFF through the pipeline (512 px tiles, no
   overlap) with a sink that only counts.
3. **Coarse to fine** (mode ``one``): wall time of the full tiling and of coarse to fine against a
   real engine (``geo-r1 serve`` with the tiny model, CPU), and agreement of the two strategies on
   the synthetic ground truth over many scenes with a truth oracle (it answers the true tanks it
   can see: boxes seen under 4 tile pixels are invisible, scores are box area with ±2 % noise).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from geo_r1_qgis.core.client import Box, EngineClient, GroundResult  # noqa: E402
from geo_r1_qgis.core.geometry import PixelBox  # noqa: E402
from geo_r1_qgis.core.pipeline import GroundingJob, run_grounding  # noqa: E402


class NullBackend:
    """A backend with no model: two fixed boxes per item. Only for measuring everything around the model."""

    kind = "null"

    def info(self):
        return {"backend": "null", "model": "null", "adapter": None}

    def ground(self, items, settings):
        from engine.runtime.backend import ItemResult
        from geo_r1_qgis.core.client import Box

        out = []
        for it in items:
            w, h = it.image.size
            boxes = (Box(10, 10, 60, 60, 0.8, "x"), Box(w - 40, h - 40, w - 1, h - 1, 0.6, "x"))
            out.append(ItemResult(boxes, 0.9, "r", "a", "", "ok", True, (w, h), (w, h), 0))
        return out

    def adapters(self):
        return {"active": None, "available": {}}


def serve_null(port: int, token_file: Path) -> int:
    """The real engine app (uvicorn, middleware, decoding) around :class:`NullBackend`."""
    import uvicorn

    from engine.server.app import ServeConfig, create_app
    from engine.server.security import ensure_token

    config = ServeConfig(model="null", port=port, token_file=token_file)
    app = create_app(NullBackend(), config, ensure_token(token_file))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
    return 0


def start_null_engine(tmp: Path) -> tuple[subprocess.Popen, EngineClient]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    token_file = tmp / "null.token"
    token_file.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, __file__, "--serve-null", str(port), str(token_file)])
    deadline = time.monotonic() + 60
    while not token_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    client = EngineClient(f"http://127.0.0.1:{port}", token=token_file.read_text().strip())
    client.wait_until_ready(60)
    return proc, client


def bench_overhead(tmp: Path) -> dict:
    from engine.gpkg import CrsTransform, GeoPackageSink
    from engine.rasters import RasterioSource

    raster = tmp / "overhead.tif"
    make_raster(raster, 4096, pattern=True)
    proc, client = start_null_engine(tmp)
    out = tmp / "overhead.gpkg"
    out.unlink(missing_ok=True)
    with RasterioSource(raster) as src:
        sink = GeoPackageSink.open_run(
            out,
            expression="x",
            mode="all",
            parameters={},
            raster=src.describe(),
            engine={},
            crs=CrsTransform(src.crs_wkt, None),
        )
        job = GroundingJob("x", mode="all", tile_size=TILE, overlap=64, batch_size=8)
        t0 = time.perf_counter()
        s = run_grounding(job, src, sink, client)
        wall = time.perf_counter() - t0
    proc.terminate()
    proc.wait(timeout=30)
    n = s.tiles_processed
    return {
        "tiles": n,
        "ms_per_tile": 1000 * wall / n,
        "read_ms": 1000 * s.read_s / n,
        "http_ms": 1000 * s.engine_s / n,
        "write_ms": 1000 * s.write_s / n,
        "merge_ms": 1000 * s.merge_s / n,
        "boxes": s.detections_raw,
    }


def make_raster(path: Path, size: int, pattern: bool = False) -> None:
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    if path.exists():
        return
    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32633",
        "transform": from_origin(500000, 5200000, 0.5, 0.5),
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
        "BIGTIFF": "YES",
    }
    block = np.zeros((3, 512, 512), np.uint8)
    block[0] = 90
    block[1] = (np.arange(512)[None, :] // 16 % 2 * 60 + 60) if pattern else 120
    block[2] = 30
    with rasterio.open(path, "w", **profile) as ds:
        for r in range(0, size, 512):
            for c in range(0, size, 512):
                w, h = min(512, size - c), min(512, size - r)
                ds.write(block[:, :h, :w], window=Window(c, r, w, h))


MEM_CHILD = """
import resource, sys
sys.path.insert(0, sys.argv[2])
from engine.rasters import RasterioSource
from geo_r1_qgis.core.geometry import TileGridSpec, make_tile_grid
with RasterioSource(sys.argv[1]) as src:
    n = 0
    for t in make_tile_grid(src.transform, src.width, src.height, TileGridSpec(TILE, 0)):
        src.read(t); n += 1
hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
print(n, hwm)
"""


def bench_memory(tmp: Path) -> dict:
    out = {}
    for size in (4000, 40000):
        path = tmp / f"mem{size}.tif"
        t0 = time.perf_counter()
        make_raster(path, size)
        made = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = subprocess.run(
            [sys.executable, "-c", MEM_CHILD, str(path), str(REPO)], capture_output=True, text=True, check=True
        )
        n, rss_kb = map(int, res.stdout.split())
        out[size] = {"tiles": n, "peak_rss_mb": rss_kb / 1024, "seconds": time.perf_counter() - t0, "make_s": made}
    out["ratio"] = out[40000]["peak_rss_mb"] / out[4000]["peak_rss_mb"]
    return out


class TruthOracle:
    """Sees the true tanks in each tile it is sent (in read order); see the module docstring."""

    def __init__(self, truth: list[PixelBox], reads: list, seed: int) -> None:
        self.truth, self.reads, self.rng = truth, reads, random.Random(seed)

    def ground(self, tiles, expression, task="multi", reasoning=True, max_new_tokens=256):
        out = []
        for _ in tiles:
            tile = self.reads.pop(0)
            boxes = []
            for b in self.truth:
                inside = b.intersection(tile.window)
                if inside is None:
                    continue
                tb = tile.to_tile(inside)
                if tb.width < 4 or tb.height < 4:
                    continue
                boxes.append(Box(*tb.as_tuple(), score=min(1.0, b.area / 1e6 * self.rng.uniform(0.98, 1.02))))
            boxes.sort(key=lambda x: -x.score)
            if task == "rec":
                boxes = boxes[:1]
            out.append(GroundResult(tuple(boxes), 1.0 if boxes else 0.0, "", "", "ok"))
        return out


class _Count:
    def done_tiles(self):
        return {}

    def write_tile(self, *a):
        pass

    def commit(self):
        pass

    def finish(self, final, summary):
        self.final = final


def bench_agreement(tmp: Path, n_scenes: int) -> dict:
    from engine.rasters import RasterioSource
    from train.sample_data import SampleDataConfig, write_samples

    agree = hit_full = hit_fast = 0
    tiles_full = tiles_fast = 0
    for seed in range(n_scenes):
        d = tmp / f"scene{seed}"
        if not (d / "utm.tif").exists():
            write_samples(SampleDataConfig(out_dir=d, seed=seed, size=2048))
        truth_fc = json.loads((d / "utm.objects.geojson").read_text())
        tanks = [
            PixelBox(*f["properties"]["pixel_box"])
            for f in truth_fc["features"]
            if f["properties"]["category"] == "tank"
        ]
        largest = max(tanks, key=lambda b: b.area)
        answers = []
        for c2f in (False, True):
            with RasterioSource(d / "utm.tif") as src:
                reads: list = []
                orig = src.read
                src.read = lambda t, o=orig, r=reads: (r.append(t), o(t))[1]
                sink = _Count()
                job = GroundingJob(
                    "the largest storage tank", mode="one", tile_size=C2F_TILE, overlap=C2F_OVERLAP, coarse_to_fine=c2f
                )
                s = run_grounding(job, src, sink, TruthOracle(tanks, reads, seed))
            answers.append(sink.final[0].detection.box if sink.final else None)
            if c2f:
                tiles_fast += s.tiles_total
            else:
                tiles_full += s.tiles_total
        full, fast = answers
        agree += bool(full and fast and full.iou(fast) >= 0.5)
        hit_full += bool(full and full.iou(largest) >= 0.5)
        hit_fast += bool(fast and fast.iou(largest) >= 0.5)
    return {
        "scenes": n_scenes,
        "agree": agree,
        "full_correct": hit_full,
        "c2f_correct": hit_fast,
        "tiles_full": tiles_full / n_scenes,
        "tiles_c2f": tiles_fast / n_scenes,
    }


def bench_c2f_time(tmp: Path, model: Path, repeats: int = 3) -> dict:
    """Pipeline wall time of both strategies against one real engine (a tiny model on the CPU).

    With the format-trained tiny model (``geo-r1 tiny-model DIR --learn-format 300``) every tile answers with
    boxes, so the coarse pass finds candidates and coarse to fine really runs; with the purely random
    model it finds nothing and falls back to the full tiling.
    """
    from engine.ground import GroundConfig, engine_for
    from engine.rasters import RasterioSource

    raster = tmp / "scene0" / "utm.tif"
    cfg = GroundConfig(raster=raster, expression="x", output=tmp / "unused.gpkg", model=str(model), device="cpu")
    out: dict = {}
    with engine_for(cfg) as (client, _):
        for c2f in (False, True, False, True) * (repeats // 2 + 1):
            with RasterioSource(raster) as src:
                job = GroundingJob(
                    "the largest storage tank",
                    mode="one",
                    tile_size=C2F_TILE,
                    overlap=C2F_OVERLAP,
                    coarse_to_fine=c2f,
                    max_new_tokens=96,
                )
                s = run_grounding(job, src, _Count(), client)
            key = "c2f" if c2f else "full"
            out.setdefault(key, []).append(round(s.seconds, 2))
            out[key + "_tiles"] = s.tiles_total
            out[key + "_engine_s"] = round(s.engine_s, 2)
            out[key + "_strategy"] = s.strategy
    return out


#: tile sizes (the command line's defaults; --tile and --c2f-tile change them)
TILE = 504
C2F_TILE = 224
C2F_OVERLAP = 32


def main() -> int:
    global TILE, C2F_TILE, C2F_OVERLAP
    p = argparse.ArgumentParser()
    p.add_argument("--tile", type=int, default=504, help="tile size of the overhead and memory runs")
    p.add_argument("--c2f-tile", type=int, default=224, help="tile size of the coarse-to-fine runs")
    p.add_argument("--c2f-overlap", type=int, default=32)
    p.add_argument("--tmp", type=Path, default=Path("/tmp/geo-r1-bench"))
    p.add_argument("--model", type=Path, help="tiny model directory for the coarse-to-fine timing")
    p.add_argument("--scenes", type=int, default=20)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--serve-null", nargs=2, metavar=("PORT", "TOKEN_FILE"), help=argparse.SUPPRESS)
    p.add_argument("--only-overhead", action="store_true")
    a = p.parse_args()
    TILE, C2F_TILE, C2F_OVERLAP = a.tile, a.c2f_tile, a.c2f_overlap
    if a.serve_null:
        return serve_null(int(a.serve_null[0]), Path(a.serve_null[1]))
    a.tmp.mkdir(parents=True, exist_ok=True)
    results = {"overhead": bench_overhead(a.tmp)}
    print(json.dumps(results, indent=1), flush=True)
    if a.only_overhead:
        return 0
    results["agreement"] = bench_agreement(a.tmp, a.scenes)
    print(json.dumps(results["agreement"], indent=1), flush=True)
    if a.model:
        results["c2f_time_s"] = bench_c2f_time(a.tmp, a.model)
        print(json.dumps(results["c2f_time_s"], indent=1), flush=True)
    if not a.skip_memory:
        results["memory"] = bench_memory(a.tmp)
    print(json.dumps(results, indent=1))
    print("self peak rss MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return 0


if __name__ == "__main__":
    sys.exit(main())
