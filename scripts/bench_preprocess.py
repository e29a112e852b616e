"""Image preprocessing per 504x504 tile: the processor the engine loads (PIL-based without torchvision, the fast
torchvision one with it), and the engine's own path for tiles that need no resize (engine/runtime/preprocess.py).
Also the engine's answers on fixed tiles, to compare venvs.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_preprocess.py --model DIR --json out.json
    OMP_NUM_THREADS=1 .venv-tv/bin/python scripts/bench_preprocess.py --model DIR --json out-tv.json

Prints a Markdown table (median ms per tile over --tiles tiles, after a warm-up): the two paths, then the fast
path's steps and, as the floor any path pays, one plain copy of 6 MB (the size of a tile's pixel_values).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--tiles", type=int, default=40)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from engine.runtime.backend import GenerationSettings, GroundItem
    from engine.runtime.loading import LoadConfig, has_torchvision, load_processor
    from engine.runtime.local import LocalBackend
    from engine.runtime.preprocess import fast_inputs, normalised_planes, patch_pixels
    from geo_r1_qgis.core.rules.prompts import build_messages

    rng = np.random.default_rng(0)
    tiles = [Image.fromarray(rng.integers(0, 256, (504, 504, 3), dtype=np.uint8)) for _ in range(args.tiles)]
    processor = load_processor(str(args.model))
    text = processor.apply_chat_template(build_messages("all storage tanks", "multi", True), tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip

    def timed(fn) -> float:
        fn(tiles[0])
        out = []
        for im in tiles:
            t = time.perf_counter()
            fn(im)
            out.append((time.perf_counter() - t) * 1000)
        return statistics.median(out)

    kind = type(processor.image_processor).__name__
    rows = {
        f"processor ({kind})": timed(lambda im: processor(text=[text], images=[im], return_tensors="pt")),
        "engine fast path (no resize)": timed(lambda im: fast_inputs(processor, [text], [im])),
    }
    # The fast path's steps on a 504x504 tile (engine/runtime/preprocess.py), and a plain 6 MB copy
    ip = processor.image_processor
    patch, merge, temporal = int(ip.patch_size), int(ip.merge_size), int(ip.temporal_patch_size)
    a = [np.float32(ip.rescale_factor / s) for s in ip.image_std]
    b = [np.float32(-m / s) for m, s in zip(ip.image_mean, ip.image_std, strict=True)]
    n, area = (504 // patch) ** 2, patch * patch
    pixels = patch_pixels(tiles[0], patch, merge)
    planes = normalised_planes(pixels, a, b)
    frames = np.empty((n, 3, temporal, area), dtype=np.float32)
    src = np.ones(frames.size, dtype=np.float32)
    steps = {
        "  step: Pillow's RGBX bytes (`tobytes`)": lambda im: im.tobytes("raw", "RGBX"),
        "  step: bytes + patch reorder (`patch_pixels`)": lambda im: patch_pixels(im, patch, merge),
        "  step: channel planes, x*a+b (`normalised_planes`)": lambda im: normalised_planes(pixels, a, b),
        "  step: both temporal frames, one broadcast write": lambda im: np.copyto(
            np.empty_like(frames), planes.reshape(3, n, 1, area).transpose(1, 0, 2, 3)
        ),
        f"floor: np.copyto of {frames.nbytes / 2**20:.1f} MiB": lambda im: np.copyto(np.empty_like(src), src),
    }
    rows.update({name: timed(fn) for name, fn in steps.items()})
    ref = processor(text=[text], images=[tiles[0]], return_tensors="pt")
    fast = fast_inputs(processor, [text], [tiles[0]])
    diff = float((ref["pixel_values"] - fast["pixel_values"]).abs().max())

    backend = LocalBackend(LoadConfig(model=str(args.model), device="cpu"), batch_size=8)
    answers = backend.ground_batched([GroundItem(image=im, expression="all storage tanks") for im in tiles[:8]],
                                     GenerationSettings(max_new_tokens=48))  # fmt: skip
    backend.close()
    result = {
        "torch": torch.__version__,
        "torchvision": has_torchvision(),
        "image_processor": kind,
        "median_ms_per_tile": rows,
        "max_abs_diff_pixel_values": diff,
        "answers": [[r.raw_text, [[b.x1, b.y1, b.x2, b.y2] for b in r.boxes]] for r in answers],
    }
    print(f"torch {torch.__version__}, torchvision {'yes' if has_torchvision() else 'no'}; max |pixel diff| {diff:.2e}")
    print("| path | median ms per 504x504 tile |\n| --- | ---: |")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
