"""``geo-r1 sample-sam build``: train the project's own small SAM 2 on its synthetic scenes.

No SAM weights can be downloaded here, and a randomly initialised SAM (``geo-r1 tiny-sam``) outlines nothing. So,
as :mod:`train.sample_model` does for the VLM, the project trains a ``transformers.Sam2Model`` of the tiny
builder's shape (:func:`engine.runtime.tiny_sam.tiny_sam_config`) from scratch on chips of
:mod:`train.sample_data` scenes, and ships it as an ordinary checkpoint directory (fp16 ``model.safetensors``,
``config.json``, ``preprocessor_config.json`` and the manifest ``geo_r1_sample_sam.json``) that
:meth:`engine.runtime.sam.SamMasker.load` reads through its ordinary path (``geo-r1 serve --sam DIR``).

Choices, and why:

- **Input 224 px** (the tiny builder's is 128): the sample VLM's serving tile is 224 px, so a tile reaches SAM
  unresized, and the smallest tanks (radius 14 px at the scenes' 0.5 m) are 7 cells across in SAM's 56² low-
  resolution mask instead of 4 at 128 px. The backbone's shape is the tiny builder's (about 0.35 M parameters).
- **Prompts as the engine sends them.** Each chip is ``image_size`` pixels of a scene (a quarter read from a
  window up to 2× larger and downsampled, like coarser ``--gsd`` tiles); each object visible in it (at least
  ``min_area_px`` pixels) is prompted with the box of its visible part, moved by up to ``box_jitter`` of its
  side (the VLM's boxes are not exact), and on ``point_fraction`` of the steps with two positive keypoints
  inside the object (Geo-R1's GRES answer). Every category of the scene is prompted (tanks, buildings, fields,
  the river, roads); the chip is centred on an object drawn by :data:`CATEGORY_WEIGHTS`.
- **Targets**: the object's true mask (:func:`train.sample_data.render_scene_with_masks`: what is visible of it)
  clipped to the prompt box as :func:`engine.runtime.sam.clip_to_box` clips at inference. The loss is BCE +
  dice on the logits upsampled to the chip (what :class:`~engine.runtime.sam.SamMasker` thresholds), counted
  inside the box only: the engine clears everything outside it.
- **Optimisation**: from scratch, AdamW (β 0.9 / 0.999), linear warm-up then linear decay to 0 (on steps or the
  time budget, whichever is further along), gradient clip 1; ``multimask_output=False``, as the engine asks.
- **Data seeds**: training scenes 0..N-1, held-out scenes 9000 onwards, never trained on (the sample VLM's
  held-out range; the tests' unseen scene 9100 is beyond it). Held-out scores are mask IoU per object and
  category on the engine's tile grid (tile ``image_size``, overlap 64), the checkpoint loaded through
  ``SamMasker.load``, beside the box-as-mask baseline (the box's pixels as the mask), so a reader sees what SAM
  adds: nothing on rectangles (buildings, fields), much on disks and bands (tanks, the river, roads).

torch and transformers are imported inside functions only.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geo_r1_qgis.core.errors import ConfigError
from train.sample_model import HELDOUT_SEED0 as HELDOUT_SEED0
from train.sample_model import SceneRunConfig

log = logging.getLogger(__name__)

#: The manifest's file name in the checkpoint directory.
SAM_MANIFEST = "geo_r1_sample_sam.json"
#: Grid overlap of the held-out tiles (the engine's default).
GRID_OVERLAP = 64
#: How often the chip is centred on an object of each category (the rest of the chip's objects are prompted too).
CATEGORY_WEIGHTS = {"tank": 0.4, "building": 0.2, "field": 0.1, "river": 0.15, "road": 0.15}
CATEGORIES = tuple(CATEGORY_WEIGHTS)


@dataclass(frozen=True)
class SampleSamConfig(SceneRunConfig):
    """One ``geo-r1 sample-sam build`` run. Checked on construction; every message names the fix."""

    out_dir: Path = field(metadata={"help": "directory to write the checkpoint into", "flags": ("-o", "--output")})
    steps: int = field(default=4000, metadata={"help": "optimiser steps (the time budget may stop it earlier)"})
    seed: int = field(default=0, metadata={"help": "seed of the weights and of the chip stream"})
    image_size: int = field(default=224, metadata={"help": "SAM's square input and the chip side (a multiple of 32)"})
    batch_size: int = field(default=8, metadata={"help": "chips per step"})
    prompts_per_chip: int = field(default=6, metadata={"help": "objects prompted per chip (repeated when fewer)"})
    learning_rate: float = field(default=2e-3, metadata={"help": "peak AdamW learning rate"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps"})
    point_fraction: float = field(default=0.5, metadata={"help": "share of steps whose prompts carry 2 keypoints"})
    box_jitter: float = field(default=0.05, metadata={"help": "prompt boxes' sides moved by up to this share"})
    downsampled_fraction: float = field(
        default=0.25, metadata={"help": "share of chips read from a larger window and downsampled"}
    )
    max_downsample: float = field(default=2.0, metadata={"help": "the largest such window, in chips"})
    min_area_px: int = field(default=12, metadata={"help": "objects with fewer visible chip pixels are not prompted"})
    train_scenes: int = field(default=200, metadata={"help": "training scenes: seeds 0..N-1"})
    heldout_scenes: int = field(default=8, metadata={"help": "held-out scenes for the final evaluation: 9000.."})
    scene_size: int = field(default=1024, metadata={"help": "side of the sample scenes in pixels"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    time_budget_s: float | None = field(
        default=None, metadata={"help": "stop training after this many seconds (the final evaluation follows)"}
    )
    eval_every_s: float = field(default=600.0, metadata={"help": "checkpoint + quick held-out score every N seconds"})
    force: bool = field(default=False, metadata={"help": "overwrite a non-empty out_dir"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        for name in ("steps", "batch_size", "prompts_per_chip", "train_scenes", "heldout_scenes", "scene_size",
                     "threads", "image_size", "min_area_px"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a whole number >= 1, got {value!r}")
        for name in ("seed", "warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a whole number >= 0, got {value!r}")
        if self.image_size % 32 or self.image_size < 64:
            raise ConfigError(f"--image-size must be a multiple of 32 (the backbone's stride), >= 64, got "
                              f"{self.image_size}; e.g. 224")  # fmt: skip
        if self.image_size >= self.scene_size:
            raise ConfigError(f"--image-size {self.image_size} must be smaller than --scene-size {self.scene_size}")
        if not (isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate < 1):
            raise ConfigError(f"--learning-rate must be in (0, 1), got {self.learning_rate!r}; e.g. 2e-3")
        for name in ("point_fraction", "downsampled_fraction"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1], got {value!r}")
        if not (isinstance(self.box_jitter, (int, float)) and 0 <= self.box_jitter < 0.5):
            raise ConfigError(f"--box-jitter must be in [0, 0.5), got {self.box_jitter!r}")
        if not (isinstance(self.max_downsample, (int, float)) and self.max_downsample >= 1):
            raise ConfigError(f"--max-downsample must be >= 1 (1: native resolution only), got {self.max_downsample!r}")
        self.check_run_limits()


# --------------------------------------------------------------------------------------------------
# Scenes, chips and prompts
# --------------------------------------------------------------------------------------------------


class MaskBank:
    """Sample scenes with their label maps, rendered on first use and kept."""

    def __init__(self, seeds: Sequence[int], size: int) -> None:
        self.seeds = list(seeds)
        self.size = size
        self._cache: dict[int, tuple[np.ndarray, list[Any], np.ndarray]] = {}

    def scene(self, seed: int) -> tuple[np.ndarray, list[Any], np.ndarray]:
        """(image, objects, labels): :func:`train.sample_data.render_scene_with_masks`."""
        if seed not in self._cache:
            from train.sample_data import render_scene_with_masks

            self._cache[seed] = render_scene_with_masks(self.size, seed)
        return self._cache[seed]


@dataclass(frozen=True)
class ObjectPrompt:
    """One object of a chip: its category, the box of its visible part and its mask (chip pixels)."""

    category: str
    box: tuple[int, int, int, int]
    mask: np.ndarray


def read_window(image: np.ndarray, labels: np.ndarray, window: Sequence[int],
                side: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The chip's RGB (bilinear, as the sample VLM's chips) and its labels (nearest) at ``side`` pixels."""
    from PIL import Image

    x1, y1, x2, y2 = (int(v) for v in window)
    rgb = np.ascontiguousarray(image[y1:y2, x1:x2])
    lab = labels[y1:y2, x1:x2]
    if rgb.shape[:2] != (side, side):
        rgb = np.asarray(Image.fromarray(rgb).resize((side, side), Image.Resampling.BILINEAR))
        idx_y = ((np.arange(side) + 0.5) * (y2 - y1) / side).astype(np.int64)
        idx_x = ((np.arange(side) + 0.5) * (x2 - x1) / side).astype(np.int64)
        lab = lab[idx_y][:, idx_x]
    return rgb, np.ascontiguousarray(lab)


def chip_objects(labels: np.ndarray, objects: Sequence[Any], min_area: int) -> list[ObjectPrompt]:
    """Every object with at least ``min_area`` visible pixels in the chip, with its visible box and mask."""
    out = []
    for k in np.unique(labels):
        if k == 0:
            continue
        mask = labels == k
        if int(mask.sum()) < min_area:
            continue
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
        out.append(ObjectPrompt(objects[int(k) - 1].category, box, mask))
    return out


def jitter_box(box: Sequence[float], amount: float, side: int, rng: random.Random) -> tuple[float, ...]:
    """``box`` with each side moved by up to ``amount`` of the box's width/height (and up to 1 px), in the chip."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    dx, dy = amount * w + 1.0, amount * h + 1.0
    nx1 = min(max(0.0, x1 + rng.uniform(-dx, dx)), side - 1.0)
    ny1 = min(max(0.0, y1 + rng.uniform(-dy, dy)), side - 1.0)
    nx2 = max(min(float(side), x2 + rng.uniform(-dx, dx)), nx1 + 1.0)
    ny2 = max(min(float(side), y2 + rng.uniform(-dy, dy)), ny1 + 1.0)
    return (nx1, ny1, nx2, ny2)


def keypoints(mask: np.ndarray, n: int, rng: random.Random) -> tuple[tuple[float, float], ...]:
    """``n`` positive points inside the object: centres of random pixels of its mask."""
    ys, xs = np.nonzero(mask)
    picks = [rng.randrange(len(xs)) for _ in range(n)]
    return tuple((float(xs[i]) + 0.5, float(ys[i]) + 0.5) for i in picks)


def sample_chip(bank: MaskBank, rng: random.Random, config: SampleSamConfig) -> tuple[np.ndarray, list[ObjectPrompt]]:
    """A training chip (RGB) and its objects, centred near an object drawn by :data:`CATEGORY_WEIGHTS`."""
    size, side = bank.size, config.image_size
    for _ in range(100):
        image, objects, labels = bank.scene(rng.choice(bank.seeds))
        category = rng.choices(CATEGORIES, weights=[CATEGORY_WEIGHTS[c] for c in CATEGORIES])[0]
        candidates = [o for o in objects if o.category == category]
        if not candidates:
            continue
        target = rng.choice(candidates)
        window_side = side
        if rng.random() < config.downsampled_fraction:
            window_side = min(size, round(side * rng.uniform(1.0, config.max_downsample)))
        bx1, by1, bx2, by2 = target.box.as_tuple()
        # a random point of the object's box lands at a random place of the window
        px, py = rng.uniform(bx1, bx2), rng.uniform(by1, by2)
        x1 = int(min(max(0, px - rng.uniform(0.1, 0.9) * window_side), size - window_side))
        y1 = int(min(max(0, py - rng.uniform(0.1, 0.9) * window_side), size - window_side))
        rgb, lab = read_window(image, labels, (x1, y1, x1 + window_side, y1 + window_side), side)
        found = chip_objects(lab, objects, config.min_area_px)
        if found:
            return rgb, found
    raise RuntimeError("no chip with an object in 100 draws")  # the scenes always have objects


# --------------------------------------------------------------------------------------------------
# Model, batches, loss
# --------------------------------------------------------------------------------------------------


def sample_sam_config(image_size: int) -> Any:
    """The sample SAM's ``Sam2Config``: the tiny builder's shape at ``image_size`` pixels."""
    from engine.runtime.tiny_sam import tiny_sam_config

    return tiny_sam_config(image_size=image_size)


def make_batch(bank: MaskBank, rng: random.Random, config: SampleSamConfig, masker: Any, with_points: bool) -> dict:
    """One step's tensors: pixel values (B, 3, S, S), boxes (B, K, 4), points (B, K, 2, 2) when asked, the
    clipped targets (B, K, S, S) and the in-box weights (B, K, S, S)."""
    import torch

    from engine.runtime.sam import clip_to_box

    k = config.prompts_per_chip
    side = config.image_size
    pixels, boxes, points, targets, inside = [], [], [], [], []
    for _ in range(config.batch_size):
        rgb, found = sample_chip(bank, rng, config)
        rng.shuffle(found)
        chosen = [found[i % len(found)] for i in range(k)]
        pixels.append(masker.pixel_values(rgb))
        for obj in chosen:
            box = jitter_box(obj.box, config.box_jitter, side, rng)
            boxes.append(box)
            points.append(keypoints(obj.mask, 2, rng))
            targets.append(clip_to_box(obj.mask, box))
            weight = clip_to_box(np.ones_like(obj.mask), box)
            inside.append(weight)
    b = config.batch_size
    batch = {
        "pixel_values": torch.cat(pixels),
        "input_boxes": torch.tensor(boxes, dtype=torch.float32).view(b, k, 4),
        "targets": torch.from_numpy(np.stack(targets)).float().view(b, k, side, side),
        "weights": torch.from_numpy(np.stack(inside)).float().view(b, k, side, side),
    }
    if with_points:
        batch["input_points"] = torch.tensor(points, dtype=torch.float32).view(b, k, 2, 2)
        batch["input_labels"] = torch.ones((b, k, 2), dtype=torch.int64)
    return batch


def mask_loss(logits: Any, targets: Any, weights: Any) -> Any:
    """BCE + dice of (B, K, S, S) logits against clipped targets, both counted inside the box only."""
    import torch.nn.functional as F

    n_in = weights.sum(dim=(-2, -1)).clamp_min(1.0)
    bce = (F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * weights).sum(dim=(-2, -1)) / n_in
    prob = logits.sigmoid() * weights
    dice = 1 - (2 * (prob * targets).sum(dim=(-2, -1)) + 1) / (prob.sum(dim=(-2, -1)) + targets.sum(dim=(-2, -1)) + 1)
    return (bce + dice).mean()


def forward_logits(model: Any, batch: dict) -> Any:
    """The decoder's single-mask logits upsampled to the chip (bilinear, as ``SamMasker.masks``): (B, K, S, S)."""
    import torch.nn.functional as F

    kwargs = {k: batch[k] for k in ("pixel_values", "input_boxes", "input_points", "input_labels") if k in batch}
    low = model(multimask_output=False, **kwargs).pred_masks[:, :, 0]  # (B, K, h, w)
    b, k, h, w = low.shape
    side = batch["pixel_values"].shape[-1]
    return F.interpolate(low.reshape(b * k, 1, h, w), (side, side), mode="bilinear", align_corners=False).view(
        b, k, side, side
    )


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int(np.logical_or(a, b).sum())
    return int(np.logical_and(a, b).sum()) / union if union else 1.0


def evaluate(masker: Any, seeds: Sequence[int], scene_size: int, tile: int, min_area: int) -> dict[str, Any]:
    """Held-out mask IoU per category on the engine's tile grid: SAM prompted with each visible object's box
    (``box``), with the box and two keypoints inside the object (``box+points``), and the box's own pixels as the
    mask (``box_as_mask``, the baseline). ``mean_iou`` averages objects; ``cumulative_iou`` sums intersections
    and unions (cIoU)."""
    from engine.runtime.sam import MaskPrompt
    from geo_r1_qgis.core.geometry import Affine, TileGridSpec, make_tile_grid

    t0 = time.perf_counter()
    bank = MaskBank(seeds, scene_size)
    grid = make_tile_grid(Affine.identity(), scene_size, scene_size, TileGridSpec(tile_size=tile, overlap=GRID_OVERLAP))
    kinds = ("box", "box+points", "box_as_mask")
    ious: dict[str, dict[str, list[float]]] = {k: {c: [] for c in CATEGORIES} for k in kinds}
    sums: dict[str, dict[str, list[int]]] = {k: {c: [0, 0] for c in CATEGORIES} for k in kinds}
    for seed in seeds:
        image, objects, labels = bank.scene(seed)
        rng = random.Random(seed)
        for t in grid:
            rgb, lab = read_window(image, labels, [int(v) for v in t.window.as_tuple()], tile)
            found = chip_objects(lab, objects, min_area)
            if not found:
                continue
            box_prompts = [MaskPrompt(o.box) for o in found]
            point_prompts = [MaskPrompt(o.box, keypoints(o.mask, 2, rng)) for o in found]
            preds = {"box": masker.masks(rgb, box_prompts), "box+points": masker.masks(rgb, point_prompts)}
            for o, box_mask, point_mask in zip(found, preds["box"], preds["box+points"], strict=True):
                x1, y1, x2, y2 = o.box
                as_mask = np.zeros_like(o.mask)
                as_mask[y1:y2, x1:x2] = True
                for kind, pred in (("box", box_mask), ("box+points", point_mask), ("box_as_mask", as_mask)):
                    ious[kind][o.category].append(mask_iou(pred, o.mask))
                    sums[kind][o.category][0] += int(np.logical_and(pred, o.mask).sum())
                    sums[kind][o.category][1] += int(np.logical_or(pred, o.mask).sum())
    result: dict[str, Any] = {"scenes": len(seeds), "tile": tile, "overlap": GRID_OVERLAP}
    for kind in kinds:
        per = {}
        for c in CATEGORIES:
            values = ious[kind][c]
            inter, union = sums[kind][c]
            per[c] = {"objects": len(values), "mean_iou": round(float(np.mean(values)), 4) if values else None,
                      "cumulative_iou": round(inter / union, 4) if union else None}  # fmt: skip
        result[kind] = per
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def metrics_line(metrics: dict[str, Any]) -> str:
    parts = []
    for c in CATEGORIES:
        b, p, base = (metrics[k][c]["mean_iou"] for k in ("box", "box+points", "box_as_mask"))
        parts.append(f"{c} {b:.3f}/{p:.3f} (box {base:.3f})" if b is not None else f"{c} -")
    return "mean mask IoU, SAM box/box+points (box as mask): " + ", ".join(parts) + f"; {metrics['seconds']} s"


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


def save_checkpoint(model: Any, out: Path, manifest: dict[str, Any]) -> Path:
    """The fp16 weights, config, preprocessor_config.json and the manifest (with the weights' sha256)."""
    import copy

    import torch

    from engine.runtime.tiny_sam import preprocessor_config
    from train.sample_model import write_manifest

    out.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model).to("cpu").to(torch.float16).save_pretrained(out)
    size = int(model.config.prompt_encoder_config.image_size)
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(size), indent=2), encoding="utf-8")
    return write_manifest(out, manifest, SAM_MANIFEST)


def build(config: SampleSamConfig, command: str | None = None) -> dict[str, Any]:
    """Train the sample SAM and write it into ``config.out_dir``; return the manifest."""
    import torch
    from transformers import Sam2Model

    from engine.runtime.sam import IMAGENET_MEAN, IMAGENET_STD, SamMasker
    from train.sample_model import _hardware, _versions, lr_factor, prepare_out

    prepare_out(config.out_dir, config.force)
    torch.set_num_threads(config.threads)
    rng = random.Random(config.seed * 7919 + 3)
    torch.manual_seed(config.seed)
    model = Sam2Model(sample_sam_config(config.image_size)).to(torch.float32)
    masker = SamMasker(model, "training", IMAGENET_MEAN, IMAGENET_STD, "cpu")
    n_params = sum(p.numel() for p in model.parameters())
    log.info("sample SAM: %d parameters, input %d px, %d thread(s)", n_params, config.image_size, config.threads)
    bank = MaskBank(config.train_seeds, config.scene_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    manifest: dict[str, Any] = {
        "generator": "geo-r1 sample-sam build",
        "command": command or command_line(config),
        "config": config.to_dict(),
        "data": {
            "generator": "train.sample_data.render_scene_with_masks",
            "scene_size": config.scene_size,
            "train_seeds": [config.train_seeds.start, config.train_seeds.stop - 1],
            "heldout_seeds": [config.heldout_seeds.start, config.heldout_seeds.stop - 1],
            "category_weights": CATEGORY_WEIGHTS,
        },
        "model": {"parameters": n_params, "image_size": config.image_size, "architecture": "Sam2Model"},
        "why": __doc__.split("Choices, and why:", 1)[1].split("torch and transformers", 1)[0].strip(),
        "hardware": _hardware("cpu"),
        "versions": _versions(),
        "evaluations": [],
    }
    quick = [config.heldout_seeds.start]
    t0 = last_eval = time.perf_counter()
    losses: list[float] = []
    stop_reason, steps_done = "steps", config.steps
    model.train()
    for step in range(config.steps):
        elapsed = time.perf_counter() - t0
        if config.time_budget_s is not None and elapsed >= config.time_budget_s:
            stop_reason, steps_done = "time budget", step
            break
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * lr_factor(step, config.steps, config.warmup_steps, elapsed,
                                                           config.time_budget_s)  # fmt: skip
        batch = make_batch(bank, rng, config, masker, with_points=rng.random() < config.point_fraction)
        loss = mask_loss(forward_logits(model, batch), batch["targets"], batch["weights"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % 25 == 0:
            recent = losses[-25:]
            log.info("step %d: loss %.4f (mean of last %d: %.4f), lr %.2e, %.2f s/step", step + 1, losses[-1],
                     len(recent), sum(recent) / len(recent), optimizer.param_groups[0]["lr"],
                     (time.perf_counter() - t0) / (step + 1))  # fmt: skip
        if time.perf_counter() - last_eval >= config.eval_every_s:
            model.eval()
            metrics = evaluate(masker, quick, config.scene_size, config.image_size, config.min_area_px)
            model.train()
            manifest["evaluations"].append({"step": step + 1, "train_seconds": round(time.perf_counter() - t0, 1),
                                            "loss": sum(losses[-50:]) / len(losses[-50:]), **metrics})  # fmt: skip
            log.info("checkpoint at step %d: %s", step + 1, metrics_line(metrics))
            save_checkpoint(model, config.out_dir, dict(manifest, steps=step + 1, final=False))
            last_eval = time.perf_counter()
    train_seconds = time.perf_counter() - t0
    manifest.update(steps=steps_done, stop_reason=stop_reason, final=True, train_seconds=round(train_seconds, 1),
                    final_loss=sum(losses[-50:]) / len(losses[-50:]) if losses else None)  # fmt: skip
    save_checkpoint(model, config.out_dir, manifest)
    log.info("training stopped (%s) after %d steps, %.0f s; held-out evaluation of the saved checkpoint on %d "
             "scenes", stop_reason, steps_done, train_seconds, config.heldout_scenes)  # fmt: skip
    saved = SamMasker.load(config.out_dir, "cpu", local_files_only=True)  # the fp16 file, through the ordinary path
    metrics = evaluate(saved, config.heldout_seeds, config.scene_size, config.image_size, config.min_area_px)
    log.info("held-out: %s", metrics_line(metrics))
    manifest["heldout"] = metrics
    manifest["wall_seconds"] = round(time.perf_counter() - t0, 1)
    save_checkpoint(model, config.out_dir, manifest)
    return json.loads((config.out_dir / SAM_MANIFEST).read_text(encoding="utf-8"))


def command_line(config: SampleSamConfig) -> str:
    """The ``geo-r1 sample-sam build`` command that makes ``config`` (``-o`` and every non-default value)."""
    from engine.cli.options import command_words

    return command_words(["geo-r1", "sample-sam", "build", "-o", str(config.out_dir)], config)
