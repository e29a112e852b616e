"""The GRES reward's cost per GRPO group on the CPU: one SAM call per chip (what ``GresMaskReward`` does) against
one call per completion, with the tiny SAM 2 and a real-size SAM 2.1-tiny built from its config (random weights:
the cost is the real model's, the masks mean nothing).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_gres_reward.py [--group 8] [--chip 504] [--repeats 3]

Prints one line per model: seconds per group both ways and their ratio, measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    import torch

    from engine.runtime.sam import SamMasker
    from engine.runtime.tiny_sam import build_tiny_sam
    from train.rewards import GresMaskReward, gres_mask_iou

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (Geo-R1: 8)")
    ap.add_argument("--chip", type=int, default=504, help="chip side in pixels")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (args.chip, args.chip, 3), dtype=np.uint8)
    chip = Image.fromarray(rgb, "RGB")
    s = args.chip / 112
    outline = [[[[20 * s, 30 * s], [60 * s, 30 * s], [60 * s, 60 * s], [20 * s, 60 * s]]]]
    texts = []
    for k in range(args.group):  # two items per completion, boxes jittered per completion
        d = int(k * s)
        items = [
            {"bbox_2d": [int(20 * s) + d, int(30 * s), int(60 * s), int(60 * s) + d],
             "keypoint1": [int(40 * s), int(45 * s)], "keypoint2": [int(30 * s), int(50 * s)]},
            {"bbox_2d": [int(70 * s), int(70 * s), int(100 * s), int(100 * s)],
             "keypoint1": [int(85 * s), int(85 * s)], "keypoint2": [int(75 * s), int(95 * s)]},
        ]  # fmt: skip
        texts.append(f"<think> t </think> <answer>```json\n{json.dumps(items)}\n```</answer>")
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    columns = {"image": [chip] * args.group, "outlines": [json.dumps([outline])] * args.group,
               "image_size": [[args.chip, args.chip]] * args.group}  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        for name, real in (("tiny SAM 2 (128 px input)", False), ("SAM 2.1-tiny size (1024 px, random)", True)):
            t0 = time.perf_counter()
            masker = SamMasker.load(build_tiny_sam(Path(tmp) / name.split()[0] / str(real), real_size=real))
            build = time.perf_counter() - t0
            reward = GresMaskReward(masker)
            reward(completions, **columns)  # warm-up
            grouped, alone = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                a = reward(completions, **columns)
                grouped.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                b = [gres_mask_iou(t, [outline], chip, masker, (args.chip, args.chip)) for t in texts]
                alone.append(time.perf_counter() - t0)
            assert a == b, "grouped and per-completion rewards differ"
            g, p = min(grouped), min(alone)
            print(
                f"{name}: build+load {build:.1f} s; group of {args.group} on a {args.chip} px chip: one SAM call "
                f"{g:.3f} s, one call per completion {p:.3f} s ({p / g:.1f}x); {args.threads} thread(s)"
            )


if __name__ == "__main__":
    main()
