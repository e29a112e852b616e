"""Benchmark of ``geo-r1 ground --ray``: throughput against the number of Ray workers, with the stand-in server.

Usage:  .venv/bin/python scripts/bench_ray.py [--tmp /tmp/geo-r1-bench-ray] [--delay 1.0] [--workers 1,2,4]
            [--concurrency 8] [--batch 8] [--size 4800] [--cpus 4]

It builds the 4800 × 4800 noise GeoTIFF of ``scripts/bench_scale.py`` (121 tiles of 504, overlap 64), starts
the stand-in OpenAI-compatible server (``scripts/stand_in_openai.py``: every chat completion takes ``--delay``
seconds, any number at once) and a one-node Ray cluster on this machine (``ray start --head`` with ``--cpus``
logical CPUs, ``tests/engine/_ray_helpers.py``), then runs ``geo-r1 ground --ray ADDRESS --base-url STAND_IN
--ray-workers N --concurrency C --batch B`` once per N, each into a new GeoPackage. Each actor keeps
min(B, C) requests in flight (one batch at a time).

For each run it prints one JSON line: N, the wall time of the ``geo-r1 ground`` process (its Python and Ray
start included), the run's own time (its report's "N s": the Ray dataset from its start, actors' start
included, to the last tile written), tiles per second over the run's own time, and the completions in flight
at the stand-in at most, and the steady rate: tiles per second after the first answer came back (the
actors' start left out; the run's report line "ray: ...").
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests" / "engine"))
from _ray_helpers import RayCluster  # noqa: E402
from bench_scale import make_noise_raster, start_stand_in, stats  # noqa: E402


def ground_once(cluster: RayCluster, tmp: Path, raster: Path, stand_in: str, workers: int, args: argparse.Namespace):
    out = tmp / f"run-{workers}-{time.time_ns()}.gpkg"
    stats(stand_in, reset=True)
    t0 = time.perf_counter()
    proc = cluster.ground(raster, "all storage tanks", "-o", out, "--no-progress", "--base-url", stand_in,
                          "--ray-workers", str(workers), "--ray-cpus", str(args.ray_cpus), "--concurrency",
                          str(args.concurrency), "--batch", str(args.batch))  # fmt: skip
    wall = time.perf_counter() - t0
    text = proc.output
    if proc.returncode != 0:
        raise RuntimeError(f"geo-r1 ground failed ({proc.returncode}): {text[-2000:]}")
    tiles = int(re.search(r"(\d+) tile\(s\):", text).group(1))  # type: ignore[union-attr]
    run_s = float(re.search(r"^\s+([\d.]+) s: engine", text, re.M).group(1))  # type: ignore[union-attr]
    first = re.search(r"first answer after ([\d.]+) s, then ([\d.]+) tiles/s", text)
    served = stats(stand_in)
    return {"workers": workers, "concurrency_per_worker": min(args.batch, args.concurrency), "tiles": tiles,
            "wall_s": round(wall, 1), "run_s": run_s, "tiles_per_s": round(tiles / run_s, 2),
            "first_answer_s": float(first.group(1)) if first else None,
            "steady_tiles_per_s": float(first.group(2)) if first else None,
            "peak_in_flight": served.get("peak_in_flight")}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tmp", type=Path, default=Path("/tmp/geo-r1-bench-ray"))
    parser.add_argument("--delay", type=float, default=1.0, help="seconds per chat completion at the stand-in")
    parser.add_argument("--workers", default="1,2,4", help="comma-separated --ray-workers values")
    parser.add_argument("--concurrency", type=int, default=8, help="geo-r1 ground --concurrency (per actor)")
    parser.add_argument("--batch", type=int, default=8, help="geo-r1 ground --batch (tiles per actor call)")
    parser.add_argument("--ray-cpus", type=float, default=0.5, help="geo-r1 ground --ray-cpus (per actor)")
    parser.add_argument("--cpus", type=float, default=4, help="logical CPUs of the Ray node")
    parser.add_argument("--size", type=int, default=4800, help="side of the noise raster in pixels")
    args = parser.parse_args()
    args.tmp.mkdir(parents=True, exist_ok=True)
    raster = args.tmp / f"noise-{args.size}.tif"
    make_noise_raster(raster, args.size)
    stand_in, base_url = start_stand_in(args.delay, [])
    cluster = RayCluster(head_cpus=args.cpus, worker_cpus=())
    try:
        head = {
            "stand_in": base_url,
            "delay_s": args.delay,
            "ray": cluster.address,
            "ray_cpus": args.cpus,
            "batch": args.batch,
            "concurrency": args.concurrency,
        }
        print(json.dumps(head), flush=True)
        for n in (int(v) for v in args.workers.split(",")):
            print(json.dumps(ground_once(cluster, args.tmp, raster, base_url, n, args)), flush=True)
    finally:
        cluster.stop()
        stand_in.terminate()
        stand_in.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
