"""``geo-r1 sample-model build``: train the project's own small Qwen2.5-VL on its synthetic scenes.

No real Geo-R1 weights can be had here, so the project trains a model of the same architecture from scratch
(``Qwen2_5_VLForConditionalGeneration`` built from a config by :mod:`engine.runtime.tiny_model`) on chips of
:mod:`train.sample_data` scenes, answering Geo-R1's byte-exact prompts
(:mod:`geo_r1_qgis.core.rules.prompts`) in Geo-R1's
format. The result is an ordinary checkpoint directory (fp16 ``model.safetensors``, the processor files and a
``geo_r1_sample_model.json`` manifest) that the engine loads through its normal path (``geo-r1 serve --model DIR``).

Choices, and why (the measurements behind them are in the feasibility notes, SAMPLE-MODEL-NOTES.md):

- **Size.** The tiny builder's default shape (text 64 × 2 layers, vision depth 2 × 32; about 0.3 M parameters
  with the number tokens). A 4.5× larger model was *worse* at the same CPU wall time: steps count more than
  capacity on this budget. ``rope_theta`` 10, so that a model this small tells x positions apart.
- **Whole-number tokens** (``TinyModelConfig.number_tokens``): 0..1000 and ", " are single tokens, so a box costs
  9 tokens instead of 19. Shorter answers are cheaper steps, and a coordinate is one prediction, not three digits
  that must agree.
- **Narrowed task set first:** "the largest storage tank" (REC, one box) and "all storage tanks" (multi, mode
  ``all``, with "None" negatives: chips without tanks). Both tasks are in every batch stream, always (replay of
  every task in every phase: a focused phase erased the other tasks in the feasibility run).
- **Serving tile size.** Chips are ``tile`` pixels (default 224, the manifest's ``"tile"``; a multiple of 28 so
  the model sees them unresized). Most chips are read at the raster's own resolution (what ``geo-r1 ground``
  tiles at by default); a quarter (``--downsampled-fraction``) are read from a window up to 2×
  (``--max-downsample``) larger and downsampled (coarser ``--gsd``, and the coarse pass of mode ``one``).
  Objects cut by a chip edge follow :mod:`train.chips` (the dataset builder's rule): an object with more than
  half of its box inside counts, with its box clipped to the chip (the piece the tile sees; the pipeline's merge
  joins pieces and prefers whole boxes), and a chip that cuts an object with half or less inside is redrawn.
  Held-out multi chips are the engine's own tile grid (:func:`geo_r1_qgis.core.geometry.make_tile_grid`, overlap
  64), so cut objects do occur there: a prediction on one of them is neither a hit nor a false positive.
- **A templated ``<think>`` that is true of the chip:** what was looked for, how many storage tanks the chip holds
  and where (:func:`train.data_format.place_words`), then the answer.
- **Optimisation:** full training from scratch, AdamW (β 0.9 / 0.98), linear warm-up, then linear decay to 0 over
  the run (measured on steps or on the time budget, whichever is further along), gradient clip 1, batch 16.
- **Data seeds:** training scenes 0..N-1, held-out scenes 9000 onwards (never trained on; the config refuses an
  overlap). Scores use the project's rules:
  :func:`geo_r1_qgis.core.rules.parsing.geo_r1_eval_box` (Geo-R1's REC parse) and
  :func:`train.metrics.ovd_eval_boxes` (Geo-R1's OVD parse), :func:`geo_r1_qgis.core.rules.coords.geo_r1_iou`, strict
  ``> 0.5``.

torch and transformers are imported inside functions only, so that ``geo-r1 --help`` stays fast.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import platform
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.runtime.loading import MODEL_MANIFEST
from geo_r1_qgis.core.errors import ConfigError, OutputError
from geo_r1_qgis.core.rules.coords import geo_r1_iou
from geo_r1_qgis.core.rules.parsing import geo_r1_eval_box
from geo_r1_qgis.core.rules.prompts import PROMPT_VERSION, build_messages
from train import chips
from train.data_format import answer_json, place_words
from train.sample_data import LARGEST_TANK

log = logging.getLogger(__name__)

MANIFEST = MODEL_MANIFEST  # the engine reads its "tile" (GET /info)
#: Held-out scenes start here; training seeds must stay below.
HELDOUT_SEED0 = 9000
REC_EXPRESSION = LARGEST_TANK
MULTI_EXPRESSION = "all storage tanks"
LABEL = "storage tank"
TANK = "tank"
#: The engine's default tile overlap: the held-out tile grid uses it.
GRID_OVERLAP = 64
DEVICES = ("cpu", "cuda")


class SceneRunConfig:
    """What the sample builders' configs share (this one's and :class:`train.sample_sam.SampleSamConfig`):
    training scenes are seeds 0..N-1, held-out scenes start at :data:`HELDOUT_SEED0`, the time budget and the
    checkpoint interval are checked alike, and the manifest records the fields as JSON."""

    train_scenes: int
    heldout_scenes: int
    time_budget_s: float | None
    eval_every_s: float

    def check_run_limits(self) -> None:
        if self.train_scenes > HELDOUT_SEED0:
            raise ConfigError(
                f"--train-scenes {self.train_scenes} would train on held-out seeds (>= {HELDOUT_SEED0}); use at most "
                f"{HELDOUT_SEED0}"
            )
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ConfigError(f"--time-budget-s must be > 0 seconds, got {self.time_budget_s!r}")
        if not self.eval_every_s > 0:
            raise ConfigError(f"--eval-every-s must be > 0 seconds, got {self.eval_every_s!r}")

    @property
    def train_seeds(self) -> range:
        return range(self.train_scenes)

    @property
    def heldout_seeds(self) -> range:
        return range(HELDOUT_SEED0, HELDOUT_SEED0 + self.heldout_scenes)

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}  # type: ignore[call-overload]


@dataclass(frozen=True)
class SampleModelConfig(SceneRunConfig):
    """One ``geo-r1 sample-model build`` run. Checked on construction; every message names the fix."""

    out_dir: Path = field(
        metadata={
            "help": "directory to write the checkpoint into",
            "flags": ("-o", "--output"),
            "aliases": ("--out-dir",),
        }
    )
    steps: int = field(default=6000, metadata={"help": "optimiser steps (the time budget may stop it earlier)"})
    seed: int = field(default=0, metadata={"help": "seed of the weights and of the chip stream"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    tile: int = field(default=224, metadata={"help": "chip and serving tile side in pixels (a multiple of 28)"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    time_budget_s: float | None = field(
        default=None, metadata={"help": "stop training after this many seconds (the final evaluation follows)"}
    )
    init: Path | None = field(default=None, metadata={"help": "continue from this sample-model checkpoint"})
    batch_size: int = field(default=16, metadata={"help": "chips per step"})
    learning_rate: float = field(default=3e-3, metadata={"help": "peak AdamW learning rate"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps"})
    rec_fraction: float = field(default=0.4, metadata={"help": "share of steps on the REC task (the rest: multi)"})
    negative_fraction: float = field(default=0.2, metadata={"help": "share of multi chips without any tank"})
    downsampled_fraction: float = field(
        default=0.25, metadata={"help": "share of chips read from a larger window and downsampled (a coarser --gsd)"}
    )
    max_downsample: float = field(
        default=2.0, metadata={"help": "the largest such window, in tiles (2: up to twice the native ground size)"}
    )
    train_scenes: int = field(default=200, metadata={"help": "training scenes: seeds 0..N-1"})
    heldout_scenes: int = field(default=30, metadata={"help": "held-out scenes for the final evaluation: 9000.."})
    checkpoint_heldout_scenes: int = field(
        default=6, metadata={"help": "held-out scenes scored at each checkpoint (the first of the final ones)"}
    )
    eval_every_s: float = field(default=600.0, metadata={"help": "checkpoint + held-out score every N seconds"})
    scene_size: int = field(default=1024, metadata={"help": "side of the sample scenes in pixels"})
    multi_max_new_tokens: int = field(default=384, metadata={"help": "generation limit of a multi answer in eval"})
    force: bool = field(default=False, metadata={"help": "overwrite a non-empty out_dir"})
    # Model shape (TinyModelConfig fields; a new model only)
    hidden_size: int = field(default=64, metadata={"help": "text hidden size"})
    num_hidden_layers: int = field(default=2, metadata={"help": "text layers"})
    vision_depth: int = field(default=2, metadata={"help": "vision blocks"})
    vision_hidden_size: int = field(default=32, metadata={"help": "vision hidden size"})
    rope_theta: float = field(default=10.0, metadata={"help": "text rotary base (10: x positions are resolvable)"})
    number_tokens: bool = field(default=True, metadata={"help": "whole numbers 0..1000 and ', ' as single tokens"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.init is not None:
            object.__setattr__(self, "init", Path(self.init))
            if not (self.init / "config.json").is_file():
                raise ConfigError(f"--init {self.init} holds no config.json; pass a sample-model checkpoint directory")
        for name in ("steps", "batch_size", "threads", "train_scenes", "heldout_scenes", "checkpoint_heldout_scenes",
                     "scene_size", "multi_max_new_tokens", "hidden_size", "num_hidden_layers", "vision_depth",
                     "vision_hidden_size"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a whole number >= 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"--seed must be a whole number >= 0, got {self.seed!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"--warmup-steps must be a whole number >= 0, got {self.warmup_steps!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        chips.check_chip_size(self.tile, "--tile")
        if self.tile >= self.scene_size:
            raise ConfigError(f"--tile {self.tile} must be smaller than --scene-size {self.scene_size}")
        self.check_run_limits()
        if self.checkpoint_heldout_scenes > self.heldout_scenes:
            raise ConfigError(
                f"--checkpoint-heldout-scenes {self.checkpoint_heldout_scenes} exceeds --heldout-scenes "
                f"{self.heldout_scenes}"
            )
        if not (isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate < 1):
            raise ConfigError(f"--learning-rate must be in (0, 1), got {self.learning_rate!r}; e.g. 3e-3")
        if not (isinstance(self.max_downsample, (int, float)) and self.max_downsample >= 1):
            raise ConfigError(f"--max-downsample must be >= 1 (1: native resolution only), got {self.max_downsample!r}")
        for name in ("rec_fraction", "negative_fraction", "downsampled_fraction"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1], got {value!r}")
        if not self.rope_theta > 0:
            raise ConfigError(f"--rope-theta must be > 0, got {self.rope_theta!r}")


# --------------------------------------------------------------------------------------------------
# Chips
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chip:
    """One training or held-out example: the chip's pixels and what is true of it (chip pixels)."""

    image: Any  # PIL image, tile x tile
    task: str  # "rec" or "multi"
    boxes: tuple[tuple[int, int, int, int], ...]  # the answer: the largest tank (rec) or every tank counted
    n_tanks: int  # storage tanks counted in the chip (more than half inside)
    ignore: tuple[tuple[int, int, int, int], ...] = ()  # tanks cut with half or less inside (held-out grid only)
    seed: int = -1
    window: tuple[int, int, int, int] = (0, 0, 0, 0)

    @property
    def expression(self) -> str:
        return REC_EXPRESSION if self.task == "rec" else MULTI_EXPRESSION


class SceneBank:
    """Sample scenes rendered on first use and kept (a 1024 px scene is 3 MB)."""

    def __init__(self, seeds: Sequence[int], size: int) -> None:
        self.seeds = list(seeds)
        self.size = size
        self._cache: dict[int, tuple[np.ndarray, list[tuple[float, float, float, float]], int]] = {}

    def scene(self, seed: int) -> tuple[np.ndarray, list[tuple[float, float, float, float]], int]:
        """(image, tank boxes in raster pixels, index of the largest tank)."""
        if seed not in self._cache:
            from train.sample_data import render_scene

            image, objects = render_scene(self.size, seed)
            tanks = [o for o in objects if o.category == TANK]
            boxes = [o.box.as_tuple() for o in tanks]
            largest = next(i for i, o in enumerate(tanks) if REC_EXPRESSION in o.expressions)
            self._cache[seed] = (image, boxes, largest)
        return self._cache[seed]


def _read_chip(image: np.ndarray, window: Sequence[int], tile: int) -> Any:
    from PIL import Image

    x1, y1, x2, y2 = (int(v) for v in window)
    chip = Image.fromarray(np.ascontiguousarray(image[y1:y2, x1:x2]))
    if chip.size != (tile, tile):
        chip = chip.resize((tile, tile), Image.Resampling.BILINEAR)
    return chip


def _sorted_boxes(boxes: Sequence[Sequence[int]]) -> tuple[tuple[int, int, int, int], ...]:
    """Reading order: top to bottom, then left to right."""
    return tuple(sorted((tuple(int(v) for v in b) for b in boxes), key=lambda b: (b[1], b[0])))  # type: ignore[misc]


def _tank_area(tanks: Sequence[Sequence[float]]) -> tuple[float, float, float, float]:
    return (min(b[0] for b in tanks), min(b[1] for b in tanks), max(b[2] for b in tanks), max(b[3] for b in tanks))


def sample_chip(bank: SceneBank, rng: random.Random, task: str, tile: int, negative_fraction: float,
                downsampled_fraction: float = 0.25, max_downsample: float = 2.0) -> Chip:  # fmt: skip
    """One training chip of ``task`` from a random scene of ``bank`` (see the module docstring for the rules)."""
    size = bank.size
    for _ in range(100):
        seed = rng.choice(bank.seeds)
        image, tanks, largest = bank.scene(seed)
        native = rng.random() < 1.0 - downsampled_fraction
        side = tile if native else min(size, round(tile * rng.uniform(1.0, max_downsample)))
        negative = task == "multi" and rng.random() < negative_fraction
        if task == "rec":
            window = chips.random_window_around(tanks[largest], side, size, size, rng)
        elif negative:
            window = chips.random_window_inside((0, 0, size, size), side, size, size, rng)
        else:
            ax1, ay1, ax2, ay2 = _tank_area(tanks)
            window = chips.random_window_inside((ax1 - side / 4, ay1 - side / 4, ax2 + side / 4, ay2 + side / 4),
                                                side, size, size, rng)  # fmt: skip
        if window is None:
            continue
        inside, cut = chips.classify(window, tanks)
        if cut or (negative and inside) or (task == "multi" and not negative and not inside):
            continue
        boxes = [chips.chip_box(tanks[i], window, tile) for i in inside]
        if any(b is None for b in boxes):
            continue
        answer = [chips.chip_box(tanks[largest], window, tile)] if task == "rec" else boxes
        return Chip(_read_chip(image, window, tile), task, _sorted_boxes(answer), len(inside),  # type: ignore[arg-type]
                    seed=seed, window=tuple(window))  # fmt: skip
    raise RuntimeError("no chip could be placed in 100 draws")  # the scenes always allow one


def heldout_chips(seeds: Sequence[int], tile: int, scene_size: int, rec_per_scene: int = 2,
                  negatives_per_scene: int = 3) -> tuple[list[Chip], list[Chip]]:  # fmt: skip
    """Held-out (rec, multi) chips: REC chips hold the scene's largest tank at a random place (native
    resolution); multi chips are the engine's tile grid over the scene (tile ``tile``, overlap 64): every tile
    touching a tank, and a few without any. Deterministic for the seeds."""
    from geo_r1_qgis.core.geometry import Affine, TileGridSpec, make_tile_grid

    bank = SceneBank(seeds, scene_size)
    grid = make_tile_grid(Affine.identity(), scene_size, scene_size, TileGridSpec(tile_size=tile, overlap=GRID_OVERLAP))
    rec: list[Chip] = []
    multi: list[Chip] = []
    for seed in seeds:
        rng = random.Random(seed * 31 + tile)
        image, tanks, largest = bank.scene(seed)
        made = 0
        for _ in range(200):
            if made == rec_per_scene:
                break
            window = chips.random_window_around(tanks[largest], tile, scene_size, scene_size, rng)
            if window is None:
                break
            inside, cut = chips.classify(window, tanks)
            if cut:
                continue
            box = chips.chip_box(tanks[largest], window, tile)
            rec.append(Chip(_read_chip(image, window, tile), "rec", (box,), len(inside), seed=seed,  # type: ignore[arg-type]
                            window=tuple(window)))  # fmt: skip
            made += 1
        empty = []
        for t in grid:
            window = tuple(int(v) for v in t.window.as_tuple())
            inside, cut = chips.classify(window, tanks)
            if not inside and not cut:
                empty.append(window)
                continue
            boxes = [chips.chip_box(tanks[i], window, tile) for i in inside]
            ignore = [chips.chip_box(tanks[i], window, tile) for i in cut]
            multi.append(Chip(_read_chip(image, window, tile), "multi", _sorted_boxes(boxes), len(inside),
                              ignore=_sorted_boxes([b for b in ignore if b]), seed=seed, window=window))  # fmt: skip
        for window in rng.sample(empty, min(negatives_per_scene, len(empty))):
            multi.append(Chip(_read_chip(image, window, tile), "multi", (), 0, seed=seed, window=window))
    return rec, multi


# --------------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------------


def _count(n: int) -> str:
    return "1 storage tank" if n == 1 else f"{n} storage tanks"


def think_text(chip: Chip, tile: int) -> str:
    """The templated reasoning, true of the chip: what is looked for, how many there are, where."""
    size = (tile, tile)
    if chip.task == "rec":
        where = place_words(chip.boxes[0], size)
        if chip.n_tanks == 1:
            return f"I look for the largest storage tank. There is 1 storage tank in the image, {where}."
        return (f"I look for the largest storage tank. There are {_count(chip.n_tanks)} in the image; "
                f"the largest one is {where}.")  # fmt: skip
    if not chip.boxes:
        return "I look for storage tanks. There is none in the image."
    places = ", ".join(place_words(b, size) for b in chip.boxes)
    verb = "is" if len(chip.boxes) == 1 else "are"
    return f"I look for storage tanks. There {verb} {_count(len(chip.boxes))} in the image: {places}."


def target_text(chip: Chip, tile: int) -> str:
    """Geo-R1's answer format: ``<think> … </think> <answer>…</answer>``, with the project's JSON answers
    (:func:`train.data_format.answer_json` for multi; a one-item grounding list for REC)."""
    think = think_text(chip, tile)
    if chip.task == "rec":
        b = chip.boxes[0]
        answer = f'[{{"bbox_2d": [{b[0]}, {b[1]}, {b[2]}, {b[3]}], "label": {json.dumps(LABEL)}}}]'
    elif chip.boxes:
        answer = answer_json(chip.boxes, LABEL)
    else:
        answer = "None"
    return f"<think> {think} </think> <answer>{answer}</answer>"


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def _generate(model: Any, processor: Any, chip_list: Sequence[Chip], max_new_tokens: int, batch: int = 8) -> list[str]:
    import torch

    tokenizer = processor.tokenizer
    saved, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    outputs: list[str] = []
    try:
        for i in range(0, len(chip_list), batch):
            part = chip_list[i : i + batch]
            texts = [processor.apply_chat_template(build_messages(c.expression, c.task, True), tokenize=False,
                                                   add_generation_prompt=True) for c in part]  # fmt: skip
            inputs = processor(text=texts, images=[c.image for c in part], return_tensors="pt", padding=True)
            inputs = {k: v.to(device) for k, v in inputs.items()}
            with torch.no_grad():
                seq = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = seq[:, inputs["input_ids"].shape[1] :]
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = saved
    return outputs


def match_boxes(pred: Sequence[Sequence[int]], truth: Sequence[Sequence[int]],
                ignore: Sequence[Sequence[int]] = ()) -> tuple[int, int]:  # fmt: skip
    """(true positives, false positives): greedy one-to-one matching by IoU, strict ``> 0.5``
    (:func:`geo_r1_iou`); a prediction matching an ``ignore`` box (an object cut by the tile edge) is neither."""
    from geo_r1_qgis.core.truth import greedy_match

    used_p = {i for i, _, _ in greedy_match(pred, truth, geo_r1_iou, 0.5).pairs}
    fp = sum(1 for i, p in enumerate(pred) if i not in used_p and not any(geo_r1_iou(p, g) > 0.5 for g in ignore))
    return len(used_p), fp


def evaluate(model: Any, processor: Any, rec: Sequence[Chip], multi: Sequence[Chip],
             multi_max_new_tokens: int = 384, keep_outputs: bool = False) -> dict[str, Any]:  # fmt: skip
    """Held-out scores with the project's rules: "the largest storage tank" Acc@0.5 (Geo-R1's REC parse, strict
    ``> 0.5``) and "all storage tanks" recall / precision at IoU 0.5 (Geo-R1's OVD parse of the answer)."""
    from train.metrics import ovd_answer_region, ovd_eval_boxes

    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    rec_out = _generate(model, processor, rec, 256)
    multi_out = _generate(model, processor, multi, multi_max_new_tokens)
    if was_training:
        model.train()
    ious = [geo_r1_iou(geo_r1_eval_box(text), c.boxes[0]) for c, text in zip(rec, rec_out, strict=True)]
    tp = fp = n_truth = neg_none = n_neg = 0
    for c, text in zip(multi, multi_out, strict=True):
        pred = ovd_eval_boxes(ovd_answer_region(text, reasoning=True))
        t, f = match_boxes(pred, c.boxes, c.ignore)
        tp, fp, n_truth = tp + t, fp + f, n_truth + len(c.boxes)
        if not c.boxes and not c.ignore:
            n_neg += 1
            neg_none += not pred
    result = {
        "largest_tank": {
            "queries": len(rec),
            "acc@0.5": sum(v > 0.5 for v in ious) / len(rec) if rec else 0.0,
            "mean_iou": sum(ious) / len(ious) if ious else 0.0,
        },
        "all_tanks": {
            "tiles": len(multi),
            "true_tanks": n_truth,
            "recall@0.5": tp / n_truth if n_truth else 0.0,
            "precision@0.5": tp / (tp + fp) if tp + fp else 0.0,
            "negative_tiles": n_neg,
            "negatives_without_boxes": neg_none,
        },
        "seconds": round(time.perf_counter() - t0, 1),
        "examples": {"rec": rec_out[:2], "multi": multi_out[:2]},
    }
    if keep_outputs:
        result["outputs"] = {"rec": rec_out, "multi": multi_out}
    return result


def rec_results_file(rec: Sequence[Chip], outputs: Sequence[str]) -> dict[str, Any]:
    """The held-out REC answers as a Geo-R1 results file (``{"accuracy", "results"}``, the records
    :class:`train.metrics.RecResult` writes), which ``geo-r1 eval --predictions`` re-scores."""
    from train.metrics import RecResult, rec_scores, recal_iou

    results, pairs = [], []
    for c, text in zip(rec, outputs, strict=True):
        box, gt = geo_r1_eval_box(text), c.boxes[0]
        iou = recal_iou(list(box), list(gt))
        window = "_".join(str(v) for v in c.window)
        results.append(RecResult(image=f"sample-scene-{c.seed}/{window}.png", question=c.expression,
                                 ground_truth=tuple(gt), model_output=text, extracted_answer=tuple(box), iou=iou,
                                 image_size=(c.image.width, c.image.height),
                                 extra={"seed": c.seed, "window": list(c.window)}).to_json())  # fmt: skip
        pairs.append((iou, None))
    scores = rec_scores(pairs).to_json()
    return {"accuracy": scores.get("overall", {}).get("acc@0.5"), "mode": "geo-r1", "scores": scores,
            "results": results}  # fmt: skip


@dataclass(frozen=True)
class SampleEvalConfig:
    """``geo-r1 sample-model eval``: a built model on the held-out scenes its manifest names."""

    model: Path = field(
        metadata={"positional": True, "metavar": "MODEL_DIR",
                  "help": "a directory 'sample-model build' wrote (e.g. resources/sample_model)"})  # fmt: skip
    out_dir: Path = field(
        metadata={"flags": ("-o", "--output"), "help": "folder for heldout.json and rec_results.json"}
    )
    scenes: int | None = field(default=None, metadata={"help": "held-out scenes (default: the manifest's)"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", Path(self.model))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if not (self.model / MANIFEST).is_file():
            raise ConfigError(f"{self.model} has no {MANIFEST}: pass a folder 'geo-r1 sample-model build' wrote")
        if self.scenes is not None and self.scenes < 1:
            raise ConfigError(f"--scenes must be >= 1, got {self.scenes}")


def evaluate_model(config: SampleEvalConfig) -> dict[str, Any]:
    """Score ``config.model`` on the held-out scenes of its manifest, at its tile; write ``heldout.json`` (the
    numbers) and ``rec_results.json`` (Geo-R1's results file for ``geo-r1 eval --predictions``)."""
    manifest = json.loads((config.model / MANIFEST).read_text(encoding="utf-8"))
    built = manifest["config"]
    first = manifest["data"]["heldout_seeds"][0]
    n = config.scenes or built["heldout_scenes"]
    rec, multi = heldout_chips(range(first, first + n), manifest["tile"], built["scene_size"])
    model, processor = load_checkpoint(config.model)
    metrics = evaluate(model, processor, rec, multi, built["multi_max_new_tokens"], keep_outputs=True)
    outputs = metrics.pop("outputs")
    metrics["scenes"] = n
    config.out_dir.mkdir(parents=True, exist_ok=True)
    (config.out_dir / "heldout.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    results = rec_results_file(rec, outputs["rec"])
    (config.out_dir / "rec_results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return metrics


def metrics_line(metrics: dict[str, Any]) -> str:
    r, m = metrics["largest_tank"], metrics["all_tanks"]
    return (f"largest tank Acc@0.5 {r['acc@0.5']:.3f} (mIoU {r['mean_iou']:.3f}, n {r['queries']}); all tanks "
            f"recall {m['recall@0.5']:.3f} precision {m['precision@0.5']:.3f} (n {m['true_tanks']} tanks in "
            f"{m['tiles']} tiles, negatives without boxes {m['negatives_without_boxes']}/{m['negative_tiles']}); "
            f"{metrics['seconds']} s")  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Model, batches, training
# --------------------------------------------------------------------------------------------------


def tiny_config(config: SampleModelConfig) -> Any:
    from engine.runtime.tiny_model import TinyModelConfig

    return TinyModelConfig(
        out_dir=config.out_dir, seed=config.seed, number_tokens=config.number_tokens, rope_theta=config.rope_theta,
        hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers, vision_depth=config.vision_depth,
        vision_hidden_size=config.vision_hidden_size, intermediate_size=2 * config.hidden_size,
        vision_intermediate_size=2 * config.vision_hidden_size,
    )  # fmt: skip


def new_model(config: SampleModelConfig) -> tuple[Any, Any]:
    """A fresh model and processor from the tiny builder (random weights of ``config.seed``)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from engine.runtime.tiny_model import build_processor, generation_config, model_config

    tcfg = tiny_config(config)
    processor = build_processor(tcfg)
    torch.manual_seed(config.seed)
    model = Qwen2_5_VLForConditionalGeneration(model_config(tcfg, processor.tokenizer)).to(torch.float32)
    model.generation_config = generation_config(processor.tokenizer)
    return model, processor


def load_checkpoint(path: Path) -> tuple[Any, Any]:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from engine.runtime.loading import load_processor

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    return model, load_processor(str(path), padding_side="right")


class Batcher:
    """Training batches: ``(inputs, labels)`` of one task each; only the answer tokens are supervised."""

    def __init__(self, processor: Any, config: SampleModelConfig) -> None:
        self.processor = processor
        self.config = config
        self.bank = SceneBank(config.train_seeds, config.scene_size)
        self.rng = random.Random(config.seed * 7919 + 1)
        self.heads = {task: self._head(task) for task in ("rec", "multi")}
        self.head_len = {task: self._head_len(head) for task, head in self.heads.items()}

    def _head(self, task: str) -> str:
        expression = REC_EXPRESSION if task == "rec" else MULTI_EXPRESSION
        return self.processor.apply_chat_template(build_messages(expression, task, True), tokenize=False,
                                                  add_generation_prompt=True)  # fmt: skip

    def _head_len(self, head: str) -> int:
        from PIL import Image

        blank = Image.new("RGB", (self.config.tile, self.config.tile))
        return int(self.processor(text=[head], images=[blank], return_tensors="pt")["input_ids"].shape[1])

    def chips(self, task: str, n: int) -> list[Chip]:
        c = self.config
        return [sample_chip(self.bank, self.rng, task, c.tile, c.negative_fraction, c.downsampled_fraction,
                            c.max_downsample) for _ in range(n)]  # fmt: skip

    def batch(self, step: int) -> tuple[str, dict[str, Any], Any]:
        task = "rec" if self.rng.random() < self.config.rec_fraction else "multi"
        chip_list = self.chips(task, self.config.batch_size)
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "right"
        texts = [self.heads[task] + target_text(c, self.config.tile) + "<|im_end|>\n" for c in chip_list]
        inputs = self.processor(text=texts, images=[c.image for c in chip_list], return_tensors="pt", padding=True)
        labels = inputs["input_ids"].clone()
        labels[:, : self.head_len[task]] = -100
        labels[inputs["attention_mask"] == 0] = -100
        return task, inputs, labels


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "tokenizers", "numpy", "pillow", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _hardware(device: str) -> str:
    import torch

    if device == "cuda":
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s)"


def save_checkpoint(model: Any, processor: Any, out: Path, manifest: dict[str, Any]) -> Path:
    """Write the fp16 weights, generation config, processor files and the manifest (with the weights' sha256)."""
    import torch

    from engine.runtime.tiny_model import save_processor

    out.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(model).to("cpu").to(torch.float16)
    half.save_pretrained(out)
    save_processor(processor, out)
    return write_manifest(out, manifest, MANIFEST)


def write_manifest(out: Path, manifest: dict[str, Any], name: str) -> Path:
    """``manifest`` with the sha256 and size of ``out/model.safetensors``, written as ``out/name``; ``out``."""
    weights = out / "model.safetensors"
    manifest = dict(manifest, sha256={"model.safetensors": _sha256(weights)},
                    size_bytes={"model.safetensors": weights.stat().st_size})  # fmt: skip
    (out / name).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out


def prepare_out(out: Path, force: bool, init: Path | None = None) -> None:
    """Make ``out`` ready for a build: refused if it is a file, or a non-empty directory without ``force`` (or the
    ``init`` checkpoint itself); emptied with ``force``."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a directory; choose another -o")
    if out.is_dir() and any(out.iterdir()):
        if init is not None and out.resolve() == init.resolve():
            raise OutputError(f"-o {out} is the --init checkpoint; write the continued model elsewhere")
        if not force:
            raise OutputError(f"{out} is not empty; pass --force to overwrite it, or choose another -o")
        shutil.rmtree(out)


def lr_factor(step: int, steps: int, warmup: int, elapsed: float, budget: float | None) -> float:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at the end of the run, the end being
    ``steps`` or the time budget, whichever is nearer."""
    progress = step / steps
    if budget:
        progress = max(progress, elapsed / budget)
    return min(1.0, (step + 1) / max(1, warmup)) * max(0.0, 1.0 - progress)


def lineage(init: Path | None) -> list[dict[str, Any]]:
    """The runs a model continues, oldest first: each one's command, steps, seconds and held-out scores, from the
    manifest of ``--init`` (and the lineage it records). Empty for a model trained from scratch."""
    manifest_file = Path(init) / MANIFEST if init else None
    if manifest_file is None or not manifest_file.is_file():
        return []
    try:
        before = json.loads(manifest_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{manifest_file} cannot be read ({exc}); pass an --init the builder wrote") from None
    held = before.get("heldout") or {}
    run = {key: before.get(key) for key in ("command", "steps", "train_seconds", "hardware", "sha256")}
    run["heldout"] = {k: held.get(k) for k in ("scenes", "largest_tank", "all_tanks")}
    return [*before.get("lineage", []), run]


def build(config: SampleModelConfig, command: str | None = None) -> dict[str, Any]:
    """Train (or continue) the sample model and write it into ``config.out_dir``; return the manifest."""
    import torch

    prepare_out(config.out_dir, config.force, config.init)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but torch sees no CUDA device here; use --device cpu")
    torch.set_num_threads(config.threads)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    model, processor = load_checkpoint(config.init) if config.init else new_model(config)
    model.to(config.device)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("sample model: %d parameters, vocabulary %d, tile %d, device %s, %d thread(s)", n_params,
             len(processor.tokenizer), config.tile, config.device, config.threads)  # fmt: skip
    rec_eval, multi_eval = heldout_chips(config.heldout_seeds, config.tile, config.scene_size)
    n_ck = config.checkpoint_heldout_scenes
    ck_seeds = set(config.heldout_seeds[:n_ck])
    rec_ck = [c for c in rec_eval if c.seed in ck_seeds]
    multi_ck = [c for c in multi_eval if c.seed in ck_seeds]
    batcher = Batcher(processor, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(0.9, 0.98), weight_decay=0.0)
    manifest: dict[str, Any] = {
        "generator": "geo-r1 sample-model build",
        "command": command or command_line(config),
        "config": config.to_dict(),
        "init": str(config.init) if config.init else None,
        "lineage": lineage(config.init),
        "tile": config.tile,
        "tasks": [
            {"expression": REC_EXPRESSION, "task": "rec", "mode": "one"},
            {"expression": MULTI_EXPRESSION, "task": "multi", "mode": "all"},
        ],
        "prompt_version": PROMPT_VERSION,
        "reasoning": True,
        "data": {
            "generator": "train.sample_data.render_scene",
            "scene_size": config.scene_size,
            "train_seeds": [config.train_seeds.start, config.train_seeds.stop - 1],
            "heldout_seeds": [config.heldout_seeds.start, config.heldout_seeds.stop - 1],
            "checkpoint_heldout_seeds": [config.heldout_seeds.start, config.heldout_seeds.start + n_ck - 1],
            "heldout_chips": {"rec": len(rec_eval), "multi_tiles": len(multi_eval)},
            "chip_rules": "train.chips: > 0.5 of a box inside counts (clipped); cut with <= 0.5 inside: redrawn "
            "(training), ignored (held-out tile grid, overlap 64)",
        },
        "model": {
            "parameters": n_params,
            "vocabulary": len(processor.tokenizer),
            "number_tokens": config.number_tokens,
            "rope_theta": config.rope_theta,
        },
        "why": __doc__.split("Choices, and why", 1)[1].split("torch and transformers", 1)[0].strip(),
        "hardware": _hardware(config.device),
        "versions": _versions(),
        "evaluations": [],
    }
    t0 = time.perf_counter()
    last_eval = t0
    model.train()
    step = 0
    losses: list[float] = []
    stop_reason = "steps"
    for step in range(config.steps):
        elapsed = time.perf_counter() - t0
        if config.time_budget_s is not None and elapsed >= config.time_budget_s:
            stop_reason = "time budget"
            break
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * lr_factor(step, config.steps, config.warmup_steps, elapsed,
                                                           config.time_budget_s)  # fmt: skip
        task, inputs, labels = batcher.batch(step)
        inputs = {k: v.to(config.device) for k, v in inputs.items()}
        out = model(**inputs, labels=labels.to(config.device))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(out.loss.detach()))
        if step % 25 == 0:
            recent = losses[-25:]
            log.info("step %d: %s loss %.4f (mean of last %d: %.4f), lr %.2e, %.2f s/step", step + 1, task,
                     losses[-1], len(recent), sum(recent) / len(recent), optimizer.param_groups[0]["lr"],
                     (time.perf_counter() - t0) / (step + 1))  # fmt: skip
        if time.perf_counter() - last_eval >= config.eval_every_s:
            metrics = evaluate(model, processor, rec_ck, multi_ck, config.multi_max_new_tokens)
            entry = {"step": step + 1, "train_seconds": round(time.perf_counter() - t0, 1),
                     "scenes": n_ck, "loss": sum(losses[-50:]) / len(losses[-50:]), **metrics}  # fmt: skip
            manifest["evaluations"].append(entry)
            log.info("checkpoint at step %d: %s", step + 1, metrics_line(metrics))
            save_checkpoint(model, processor, config.out_dir, dict(manifest, steps=step + 1, final=False,
                            wall_seconds=round(time.perf_counter() - t0, 1)))  # fmt: skip
            last_eval = time.perf_counter()
    else:
        step = config.steps
    steps_done = step if stop_reason == "time budget" else config.steps
    train_seconds = time.perf_counter() - t0
    log.info("training stopped (%s) after %d steps, %.0f s; final held-out evaluation on %d scenes", stop_reason,
             steps_done, train_seconds, config.heldout_scenes)  # fmt: skip
    metrics = evaluate(model, processor, rec_eval, multi_eval, config.multi_max_new_tokens)
    log.info("final: %s", metrics_line(metrics))
    manifest.update(
        steps=steps_done, stop_reason=stop_reason, final=True, train_seconds=round(train_seconds, 1),
        wall_seconds=round(time.perf_counter() - t0, 1),
        final_loss=sum(losses[-50:]) / len(losses[-50:]) if losses else None,
        heldout={"scenes": config.heldout_scenes, **metrics},
    )  # fmt: skip
    save_checkpoint(model, processor, config.out_dir, manifest)
    log.info("wrote %s", config.out_dir)
    return json.loads((config.out_dir / MANIFEST).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------------
# The command that rebuilds a config (engine/cli/sample_model.py derives its flags from the fields)
# --------------------------------------------------------------------------------------------------


def command_line(config: SampleModelConfig) -> str:
    """The ``geo-r1 sample-model build`` command that makes ``config``: ``-o`` and every value that differs from
    its default (so the manifest's command reruns the same build whatever the caller typed)."""
    from engine.cli.options import command_words

    return command_words(["geo-r1", "sample-model", "build", "-o", str(config.out_dir)], config)
