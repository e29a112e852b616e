"""Benchmark of ``geo-r1 ground`` in front of a remote GPU server: tiles in flight, and the client's CPU per tile.

Usage:  .venv/bin/python scripts/bench_scale.py [--tmp /tmp/geo-r1-scale] [--delay 1.0] [--concurrency 64]
            [--run "default" --run "--batch 32" --run "--in-flight 64" ...] [--encode]

It builds a 4800 × 4800 noise GeoTIFF (121 tiles of 504 with the default overlap of 64), starts the stand-in
OpenAI-compatible server (``scripts/stand_in_openai.py``: every chat completion takes ``--delay`` seconds, any
number at once), starts ``geo-r1 serve --backend openai --concurrency C`` in front of it, and runs
``geo-r1 ground`` once per ``--run`` (its extra flags; ``default`` for none), each into a new GeoPackage.

For each run it prints one JSON line: the wall time of the ``geo-r1 ground`` process and the run's own time
(its report's "N s", from the first tile to the answer layer), the completions in flight at the stand-in at
most (its ``/stats``), and the CPU seconds of the ``geo-r1 ground`` process and of the engine process, per
tile in milliseconds (``client_cpu_ms_per_tile`` is their sum: everything on this machine but the server).
``--encode`` adds the engine's per-tile encoding cost (tile to request bytes) on the NAIP tile of
``../shared/data`` and on noise.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
NAIP = REPO.parent / "shared" / "data" / "naip_m_4709963_se_14_20200831.tif"


#: the checkout whose geo-r1 is measured (--code; default this one)
CODE = REPO


def geo_r1() -> list[str]:
    return [sys.executable, "-m", "engine.cli"]


def code_env() -> dict[str, str]:
    """The environment of the measured processes: the measured checkout first on the path, one torch thread."""
    return {**os.environ, "PYTHONPATH": str(CODE), "OMP_NUM_THREADS": "1"}


def make_noise_raster(path: Path, size: int = 4800) -> None:
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    if path.exists():
        return
    rng = np.random.default_rng(0)
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8", "crs": "EPSG:32633",
               "transform": from_origin(500000, 5200000, 0.5, 0.5), "tiled": True, "blockxsize": 512,
               "blockysize": 512}  # fmt: skip
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(rng.integers(0, 256, (3, size, size), dtype=np.uint8))


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    """User + system CPU seconds of this process's finished (waited-for) children."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def start_stand_in(delay: float, extra: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, str(REPO / "scripts" / "stand_in_openai.py"), "--delay", str(delay), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    m = re.search(r"(http://\S+/v1)", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"the stand-in did not start: {line!r}")
    return proc, m.group(1)


def start_engine(tmp: Path, base_url: str, concurrency: int) -> tuple[subprocess.Popen, str, Path]:
    from tests.engine._serve_helpers import free_port  # the same free-port helper as the tests

    port = free_port()
    token_file = tmp / "engine.token"
    cmd = [*geo_r1(), "serve", "--backend", "openai", "--base-url", base_url, "--concurrency", str(concurrency),
           "--port", str(port), "--token-file", str(token_file)]  # fmt: skip
    log = open(tmp / "engine.log", "wb")  # noqa: SIM115 - the engine's log for the benchmark's life
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=code_env(), cwd=CODE)
    url = f"http://127.0.0.1:{port}"
    from geo_r1_qgis.core.client import EngineClient, read_token

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the engine exited: {(tmp / 'engine.log').read_text()[-2000:]}")
        if token_file.exists():
            try:
                EngineClient(url, token=read_token(token_file)).wait_until_ready(2.0)
                return proc, url, token_file
            except Exception:  # still starting
                pass
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError("the engine did not start within 120 s")


def stats(base_url: str, reset: bool = False) -> dict:
    import urllib.request

    root = base_url.rsplit("/v1", 1)[0]
    req = urllib.request.Request(root + ("/stats/reset" if reset else "/stats"), data=b"{}" if reset else None)
    with urllib.request.urlopen(req, timeout=10) as r:  # nosec B310 - the local stand-in
        return json.loads(r.read())


def ground_once(tmp: Path, raster: Path, url: str, token_file: Path, engine_pid: int, stand_in: str,
                flags: str, k: int) -> dict:  # fmt: skip
    out = tmp / f"run{k}.gpkg"
    out.unlink(missing_ok=True)
    extra = [] if flags == "default" else shlex.split(flags)
    cmd = [*geo_r1(), "ground", str(raster), "all storage tanks", "-o", str(out), "--engine", url,
           "--token-file", str(token_file), "--no-progress", *extra]  # fmt: skip
    stats(stand_in, reset=True)
    engine_cpu0, ground_cpu0 = cpu_s(engine_pid), children_cpu_s()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=code_env(), cwd=CODE)
    _, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    engine_cpu, ground_cpu = cpu_s(engine_pid) - engine_cpu0, children_cpu_s() - ground_cpu0
    served = stats(stand_in)
    m = re.search(r"\n\s+([\d.]+) s: engine", stderr)
    tiles = re.search(r"(\d+) processed", stderr)
    run_cpu = re.search(r"this process's CPU ([\d.]+) s", stderr)
    n = int(tiles.group(1)) if tiles else 0
    return {"run": flags, "status": proc.returncode, "wall_s": round(wall, 2),
            "run_s": float(m.group(1)) if m else None, "tiles": n, "peak_in_flight": served["peak_in_flight"],
            "completions": served["answered"], "faults": served["faults"],
            "ground_process_cpu_ms_per_tile": round(1000 * ground_cpu / n, 1) if n else None,
            "ground_cpu_ms_per_tile": round(1000 * float(run_cpu.group(1)) / n, 1) if n and run_cpu else None,
            "engine_cpu_ms_per_tile": round(1000 * engine_cpu / n, 1) if n else None,
            "error": None if proc.returncode == 0 else stderr.strip().splitlines()[-1:]}  # fmt: skip


def encode_costs() -> dict:
    """The engine's per-tile cost from tile to request bytes (and the PNG's size), NAIP and noise."""
    import numpy as np
    import rasterio

    from engine.runtime.remote import image_data_uri

    with rasterio.open(NAIP) as ds:
        naip = np.ascontiguousarray(ds.read((1, 2, 3), window=((0, 504), (0, 504))).transpose(1, 2, 0))
    noise = np.random.default_rng(0).integers(0, 256, (504, 504, 3), dtype=np.uint8)
    out = {}
    for name, arr in (("naip", naip), ("noise", noise)):
        from PIL import Image

        im = Image.fromarray(arr)
        image_data_uri(im)
        t0 = time.process_time()
        for _ in range(50):
            uri = image_data_uri(im)
        out[name] = {"encode_ms": round((time.process_time() - t0) / 50 * 1000, 2), "bytes": len(uri)}
        t0 = time.process_time()
        for _ in range(10):  # what the engine did before: Pillow's PNG (adaptive filters), level 1, then base64
            buf = io.BytesIO()
            im.save(buf, format="PNG", compress_level=1)
            base64.b64encode(buf.getvalue())
        out[name]["pillow_level1_ms"] = round((time.process_time() - t0) / 10 * 1000, 2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tmp", type=Path, default=Path("/tmp/geo-r1-scale"))
    parser.add_argument("--delay", type=float, default=1.0, help="seconds per chat completion at the stand-in")
    parser.add_argument("--concurrency", type=int, default=64, help="geo-r1 serve --concurrency")
    parser.add_argument("--run", action="append", help="flags of one geo-r1 ground run ('default': none)")
    parser.add_argument("--stand-in-arg", action="append", default=[], help="an extra stand-in flag (faults)")
    parser.add_argument("--encode", action="store_true", help="also the per-tile encoding cost")
    parser.add_argument(
        "--code",
        type=Path,
        default=REPO,
        help="the checkout to measure, e.g. an earlier commit's `git archive` (default: this one)",
    )
    args = parser.parse_args()
    global CODE
    CODE = args.code.resolve()
    args.tmp.mkdir(parents=True, exist_ok=True)
    raster = args.tmp / "noise4800.tif"
    make_noise_raster(raster)
    stand_in, base_url = start_stand_in(args.delay, args.stand_in_arg)
    engine = None
    try:
        engine, url, token_file = start_engine(args.tmp, base_url, args.concurrency)
        print(
            json.dumps(
                {
                    "stand_in": base_url,
                    "delay_s": args.delay,
                    "concurrency": args.concurrency,
                    "load_average": os.getloadavg(),
                }
            )
        )
        for k, flags in enumerate(args.run or ["default"]):
            row = ground_once(args.tmp, raster, url, token_file, engine.pid, base_url, flags, k)
            if row["tiles"]:
                ground_ms = row["ground_cpu_ms_per_tile"] or row["ground_process_cpu_ms_per_tile"]  # older code: none
                row["client_cpu_ms_per_tile"] = round(ground_ms + row["engine_cpu_ms_per_tile"], 1)
            row["load_average_1min"] = round(os.getloadavg()[0], 1)
            print(json.dumps(row), flush=True)
        if args.encode:
            print(json.dumps({"encode": encode_costs()}))
    finally:
        for p in (engine, stand_in):
            if p is not None:
                p.terminate()
                p.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
