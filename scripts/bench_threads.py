"""The engine on a shared CPU: seconds per item at torch's default thread count vs the engine's default
(cores - 1, passive OpenMP waits), with busy processes beside it (QGIS, a browser, a compile...).

    .venv/bin/python scripts/bench_threads.py --model .cache/tiny-format-model-seed0-steps300-<hash> --hogs 2

Each configuration runs in a fresh process, because OpenMP reads its wait policy when torch is imported.
Generation length is fixed (EOS disabled). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
from PIL import Image
import numpy as np
from engine.runtime.threads import configure_torch_threads
from engine.runtime.backend import GenerationSettings, GroundItem
from engine.runtime.loading import LoadConfig
from engine.runtime.local import LocalBackend
args = json.loads(sys.argv[1])
import torch
if args["threads"] == "torch-default":
    n = torch.get_num_threads()
else:
    n = configure_torch_threads(None if args["threads"] == "engine-default" else int(args["threads"]))
backend = LocalBackend(LoadConfig(model=args["model"], device="cpu"), batch_size=args["batch"])
backend.loaded.model.generation_config.eos_token_id = None
backend.eos_ids = set()
rng = np.random.default_rng(0)
side = args["tile"]
images = [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(args["items"])]
settings = GenerationSettings(max_new_tokens=args["tokens"])
backend.ground_batched([GroundItem(image=images[0], expression="tanks")], settings)  # warm-up
t0 = time.perf_counter()
for i in range(0, len(images), args["batch"]):
    backend.ground_batched([GroundItem(image=im, expression="tanks") for im in images[i:i + args["batch"]]], settings)
print(json.dumps({"threads": n, "s_per_item": (time.perf_counter() - t0) / len(images)}))
"""


def hog(stop_at: float) -> None:
    x = 0
    while time.time() < stop_at:
        x += 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--hogs", type=int, default=2, help="busy processes beside the engine")
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--tile", type=int, default=504)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    configs = [
        ("torch default threads, OpenMP default (active) waits", "torch-default", {}),
        ("engine default: cores - 1, passive waits", "engine-default", {"OMP_WAIT_POLICY": "PASSIVE"}),
    ]
    rows = []
    for batch in (1, 8):
        for label, threads, extra_env in configs:
            stop_at = time.time() + 3600
            hogs = [multiprocessing.Process(target=hog, args=(stop_at,), daemon=True) for _ in range(args.hogs)]
            for h in hogs:
                h.start()
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
            env.update(extra_env)
            spec = {"model": str(args.model), "threads": threads, "batch": batch, "items": args.items,
                    "tile": args.tile, "tokens": args.tokens}  # fmt: skip
            try:
                out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], env=env, capture_output=True,
                                     text=True, timeout=3600, check=True)  # fmt: skip
            finally:
                for h in hogs:
                    h.terminate()
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((batch, label, result["threads"], result["s_per_item"]))
    print(f"| batch | configuration ({args.hogs} busy processes beside it) | threads | s per item |")
    print("| --- | --- | ---: | ---: |")
    for batch, label, n, s in rows:
        print(f"| {batch} | {label} | {n} | {s:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
