"""Benchmark of outlines (issue 22 §4): SAM 2 per tile on the CPU, polygon counts against raster size, peak memory.

Usage:  OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_sam.py [--tmp DIR] [--parts sam,counts,memory]
            [--models tiny,real,sample]

1. **SAM per tile** (``engine.runtime.sam.SamMasker``, one torch thread): the image embedding, the mask decoder
   and the tracing (``core/outline.py``) for one 504×504 tile with 1 and 8 prompts (a box and two keypoints each),
   with the tiny random SAM 2 of the tests and with a random SAM 2 of SAM 2.1-tiny's real size (``geo-r1 tiny-sam
   --real-size``: Hiera-T, 1024 px input). Random weights cost what trained ones cost; their masks mean nothing.
   ``sample``: the trained sample SAM the project ships (``resources/sample_sam``, 224 px input); its masks of
   the random tile mean nothing either, its cost is what ``geo-r1 serve --sam resources/sample_sam`` pays.
2. **Polygons and vertices against raster size**: synthetic object masks (ellipses and rotated rectangles, one
   object per 128×128 px on average, 6–40 px across) on rasters of 512² to 4096², traced and simplified at one
   pixel: polygons, traced vertices, simplified vertices, time.
3. **Peak memory** (``VmHWM`` of a fresh process) of a whole ``run_grounding`` over a 4000² and a 40000²
   raster (bench_ground.py's tiled GeoTIFF, 504 px tiles, no overlap) with a client that answers 4 boxes per tile,
   each with a 48-vertex outline (what a simplified SAM outline of a building has), and a sink that keeps the
   final answer, and the same run without outlines: the cost of carrying outlines through reading, merging and
   placing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def bench_sam(tmp: Path, repeats: int, models: tuple[str, ...] = ("tiny", "real")) -> dict:
    import numpy as np
    import torch

    from engine.runtime.sam import MaskPrompt, SamMasker
    from engine.runtime.tiny_sam import build_tiny_sam
    from geo_r1_qgis.core.outline import mask_to_polygons

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, (504, 504, 3), dtype=np.uint8)
    out = {}
    chosen = {"tiny": ("tiny", False), "real": ("sam2.1-tiny size", True), "sample": ("sample SAM", None)}
    for name, real in (chosen[m] for m in models):
        path = REPO / "resources" / "sample_sam" if real is None else tmp / ("sam-real" if real else "sam-tiny")
        if real is not None and not (path / "model.safetensors").is_file():
            build_tiny_sam(path, real_size=real, force=True)
        sam = SamMasker.load(path)
        n_params = sum(p.numel() for p in sam.model.parameters())
        pixel_values = sam.pixel_values(tile)
        with torch.inference_mode():
            sam.model.get_image_embeddings(pixel_values)  # warm up
            embed = _median_ms(lambda s=sam: s.model.get_image_embeddings(s.pixel_values(tile)), repeats)
        row = {"parameters": n_params, "input_px": sam.size, "embedding_ms": embed}
        for n in (1, 8):
            prompts = []
            for _ in range(n):
                x, y = (float(v) for v in rng.uniform(40, 420, 2))
                w, h = (float(v) for v in rng.uniform(20, 80, 2))
                prompts.append(MaskPrompt((x, y, x + w, y + h), ((x + w / 2, y + h / 2), (x + w / 3, y + h / 3))))
            total = _median_ms(lambda p=prompts, s=sam: s.masks(tile, p), repeats)
            masks = sam.masks(tile, prompts)
            trace = _median_ms(lambda m=masks: [mask_to_polygons(k, 1.0) for k in m], repeats)
            polys = [mask_to_polygons(k, 1.0) for k in masks]
            row[f"{n}_prompts"] = {
                "masks_ms": total,
                "decoder_ms_per_prompt": (total - embed) / n,
                "trace_ms": trace,
                "polygons": sum(len(p) for p in polys),
                "vertices": sum(len(r) for p in polys for poly in p for r in poly),
            }
        out[name] = row
    return out


def synthetic_mask(size: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), bool)
    n = max(1, size * size // (128 * 128))
    for _ in range(n):
        cx, cy = rng.uniform(0, size, 2)
        a, b = rng.uniform(3, 20, 2)
        t = rng.uniform(0, np.pi)
        x0, x1 = int(max(0, cx - 25)), int(min(size, cx + 25))
        y0, y1 = int(max(0, cy - 25)), int(min(size, cy + 25))
        yy, xx = np.mgrid[y0:y1, x0:x1] + 0.5
        u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
        v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
        inside = (u / a) ** 2 + (v / b) ** 2 <= 1 if rng.random() < 0.5 else (abs(u) <= a) & (abs(v) <= b)
        mask[y0:y1, x0:x1] |= inside
    return mask


def bench_counts() -> dict:
    from geo_r1_qgis.core.outline import mask_to_polygons, trace_mask

    out = {}
    for size in (512, 1024, 2048, 4096):
        mask = synthetic_mask(size, size)
        t0 = time.perf_counter()
        traced = trace_mask(mask)
        t1 = time.perf_counter()
        simple = mask_to_polygons(mask, 1.0)
        t2 = time.perf_counter()
        out[size] = {
            "polygons": len(simple),
            "traced_vertices": sum(len(r) for p in traced for r in p),
            "simplified_vertices": sum(len(r) for p in simple for r in p),
            "trace_s": t1 - t0,
            "trace_and_simplify_s": t2 - t1,
        }
    return out


MEM_CHILD = r"""
import sys, math
sys.path.insert(0, sys.argv[2])
from engine.rasters import RasterioSource
from geo_r1_qgis.core.client import Box, GroundResult
from geo_r1_qgis.core.pipeline import GroundingJob, run_grounding

def ring(cx, cy, r, n=47):
    pts = [(cx + r * math.cos(2 * math.pi * k / n), cy + r * math.sin(2 * math.pi * k / n)) for k in range(n)]
    return tuple(pts + pts[:1])

class Client:
    def ground(self, tiles, expression, task="multi", reasoning=True, max_new_tokens=None, outline=None):
        out = []
        for t in tiles:
            boxes = tuple(Box(cx - 20, cy - 20, cx + 20, cy + 20, 0.8, "b",
                              outline=((ring(cx, cy, 19),),) if sys.argv[3] == "1" else ())
                          for cx, cy in ((60, 60), (200, 120), (330, 300), (440, 430)))
            out.append(GroundResult(boxes, 0.9, "", "", "ok"))
        return out

class Sink:
    def done_tiles(self): return {}
    def write_tile(self, *a, **k): pass
    def commit(self): pass
    def finish(self, final, summary): self.final = final

with RasterioSource(sys.argv[1]) as src:
    sink = Sink()
    job = GroundingJob("buildings", tile_size=504, overlap=0, outline=sys.argv[3] == "1", batch_size=8)
    summary = run_grounding(job, src, sink, Client())
hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
print(summary.tiles_total, len(sink.final), sum(len(m.outline) for m in sink.final), hwm)
"""


def bench_memory(tmp: Path) -> dict:
    from bench_ground import make_raster

    out: dict = {}
    for with_outlines in ("1", "0"):
        key = "outlines" if with_outlines == "1" else "boxes only"
        out[key] = {}
        for size in (4000, 40000):
            path = tmp / f"mem{size}.tif"
            make_raster(path, size)
            t0 = time.perf_counter()
            cmd = [sys.executable, "-c", MEM_CHILD, str(path), str(REPO), with_outlines]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(res.stderr[-2000:])
            tiles, final, outlines, rss_kb = map(int, res.stdout.split()[-4:])
            out[key][size] = {"tiles": tiles, "detections": final, "outlines": outlines, "peak_rss_mb": rss_kb / 1024,
                              "seconds": time.perf_counter() - t0}  # fmt: skip
        out[key]["ratio"] = out[key][40000]["peak_rss_mb"] / out[key][4000]["peak_rss_mb"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tmp", type=Path, default=Path("/tmp/geo-r1-bench-sam"))
    ap.add_argument("--parts", default="sam,counts,memory")
    ap.add_argument("--models", default="tiny,real,sample", help="SAMs timed by --parts sam: tiny, real, sample")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    args.tmp.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    result = {}
    if "sam" in parts:
        result["sam_per_tile"] = bench_sam(args.tmp, args.repeats, tuple(args.models.split(",")))
    if "counts" in parts:
        result["polygons_vs_raster"] = bench_counts()
    if "memory" in parts:
        result["peak_memory"] = bench_memory(args.tmp)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
