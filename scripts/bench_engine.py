"""Engine benchmark: time per stage per item, and batched vs one-at-a-time throughput.

Runs unchanged on this CPU with the tiny model and on a GPU with a model configuration of real size
(Qwen2.5-VL-3B dimensions) and random weights, which is enough for timing:

    .venv/bin/python scripts/bench_engine.py --model .cache/bench-tiny            # CPU, tiny model
    python scripts/bench_engine.py --real-size 3b --device cuda --items 32         # GPU

Generation length is fixed (EOS disabled) so that batched and single runs do the same work.
The figures go to stdout as a Markdown table and, with --json, to a file.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench_engine")

REAL_SIZES = {
    # Qwen2.5-VL-3B-Instruct's dimensions (config.json of the published checkpoint).
    "3b": {
        "text": dict(
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            max_position_embeddings=128000,
            rope_theta=1000000.0,
            vocab_size=151936,
        ),
        "vision": dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=2048,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
        ),
    },
}


def build_real_size(tiny_dir: Path, size: str, out_dir: Path, device: str) -> Path:
    """A random model of real dimensions, saved with the tiny model's processor (loaded the real way)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = json.loads((tiny_dir / "config.json").read_text())
    dims = REAL_SIZES[size]
    text = cfg["text_config"]
    text.update(dims["text"])
    text["rope_parameters"] = {"mrope_section": [16, 24, 24], "rope_theta": 1000000.0, "rope_type": "default"}
    text["layer_types"] = ["full_attention"] * text["num_hidden_layers"]
    text["max_window_layers"] = text["num_hidden_layers"]
    cfg["vision_config"].update(dims["vision"])
    cfg["dtype"] = "bfloat16"
    config = Qwen2_5_VLConfig.from_dict(cfg)
    torch.manual_seed(0)
    with torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir)
    for f in tiny_dir.iterdir():  # the tiny model's tokenizer, processor and generation config
        if f.suffix in (".json", ".jinja") and f.name != "config.json":
            (out_dir / f.name).write_text(f.read_text())
    log.info("random %s model: %.2fB parameters", size, sum(p.numel() for p in model.parameters()) / 1e9)
    del model
    return out_dir


def make_tiles(n: int, size: int) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
        out.append(buf.getvalue())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="model directory (default: build the tiny model)")
    ap.add_argument("--real-size", choices=sorted(REAL_SIZES), help="random weights of a real model's size")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from PIL import Image

    from engine.runtime.backend import GenerationSettings, GroundItem
    from engine.runtime.loading import LoadConfig
    from engine.runtime.local import LocalBackend
    from engine.runtime.tiny_model import TinyModelConfig, build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    model_dir = args.model
    if model_dir is None or args.real_size:
        tiny = build_tiny_model(TinyModelConfig(out_dir=tmp / "tiny"))
        model_dir = build_real_size(tiny, args.real_size, tmp / "real", args.device) if args.real_size else tiny
    backend = LocalBackend(LoadConfig(model=str(model_dir), device=args.device), batch_size=args.batch)
    backend.loaded.model.generation_config.eos_token_id = None  # fixed-length generation
    backend.eos_ids = set()
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    tiles = make_tiles(args.items, args.tile)

    def decode(png: bytes):
        t = time.perf_counter()
        im = Image.open(io.BytesIO(png)).convert("RGB")
        return im, (time.perf_counter() - t) * 1000

    # warm-up (first calls allocate and compile kernels)
    im0, _ = decode(tiles[0])
    backend.ground_batched([GroundItem(image=im0, expression="all storage tanks")], settings)

    def run(batch: int) -> tuple[float, list[dict[str, float]]]:
        stages: list[dict[str, float]] = []
        t0 = time.perf_counter()
        for start in range(0, len(tiles), batch):
            decoded = [decode(p) for p in tiles[start : start + batch]]
            items = [GroundItem(image=im, expression="all storage tanks") for im, _ in decoded]
            results = backend.ground_batched(items, settings)
            for (_, dec_ms), r in zip(decoded, results, strict=True):
                stages.append({"decode": dec_ms, **r.timings_ms})
        return time.perf_counter() - t0, stages

    single_s, single_stages = run(1)
    batch_s, batch_stages = run(args.batch)
    backend.close()

    def med(stages, key):
        return statistics.median(s[key] for s in stages)

    figures = {
        "model": str(args.real_size or model_dir),
        "device": backend.loaded.device,
        "dtype": backend.loaded.dtype,
        "items": args.items,
        "tile": args.tile,
        "max_new_tokens": args.max_new_tokens,
        "batch": args.batch,
        "single_items_per_s": args.items / single_s,
        "batched_items_per_s": args.items / batch_s,
        "speedup": single_s / batch_s,
        "per_item_ms_single": {k: med(single_stages, k) for k in ("decode", "preprocess", "generate", "parse")},
        "per_item_ms_batched": {k: med(batch_stages, k) for k in ("decode", "preprocess", "generate", "parse")},
    }
    out = sys.stdout
    out.write(
        f"model {figures['model']} on {figures['device']} ({figures['dtype']}), {args.items} tiles of "
        f"{args.tile}², {args.max_new_tokens} new tokens each\n\n"
    )
    out.write(f"| stage (median ms per item) | one at a time | batch {args.batch} |\n| --- | --- | --- |\n")
    for k in ("decode", "preprocess", "generate", "parse"):
        out.write(f"| {k} | {figures['per_item_ms_single'][k]:.2f} | {figures['per_item_ms_batched'][k]:.2f} |\n")
    out.write(
        f"\nthroughput: {figures['single_items_per_s']:.2f} items/s one at a time, "
        f"{figures['batched_items_per_s']:.2f} items/s at batch {args.batch}: "
        f"**{figures['speedup']:.2f}×**\n"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
