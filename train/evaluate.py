"""``geo-r1 eval``: score a base model and its LoRA adapters on a dataset, Geo-R1's way, and write a report.

::

    geo-r1 eval --data DIR --model M [--processor P] [--adapter NAME=PATH ...] [--split test|val]
                [--task rec|multi] [--mode geo-r1|sft] [--batch-size 8] [--max-new-tokens N] [--limit N]
                -o REPORT_DIR [--predictions [NAME=]FILE ...] [--logs NAME=TRAIN_LOG.jsonl ...]

What it does, top to bottom (:func:`run`):

1. Reads the ``split``/``task`` records of the dataset directory (``train/data_format.py``).
2. Loads the base model once (``engine.runtime.loading.load_model``: CUDA bfloat16, else CPU float32), registers
   every adapter, and evaluates the base model (named ``base``) and then each adapter (``activate``), in
   the order given. Generation is greedy, batched with left padding, and decodes the whole generated
   sequence at once (``train.generation.generate_texts``); 256 new tokens for rec, 1024 for multi.
3. The mode picks the prompt and the parse. ``geo-r1``: the reasoning prompt (``PromptSpec(expr, task,
   True)``) and Geo-R1's evaluation parse. ``sft``: the SFT-baseline prompt (``reasoning=False``) and the
   SFT-baseline parse (REC: the first ``[a, b, c, d]`` anywhere). An adapter whose directory holds the
   trainer's ``geo_r1_adapter.json`` is scored in the mode it was trained for (its ``"reasoning"`` key), as
   the paper scores its SFT baseline with the SFT prompt; ``--mode`` applies to the others and to the base.
4. Scores with ``train/metrics.py`` (its docstring states exactly how Geo-R1 counts), writes one
   ``<name>_results.json`` per model in Geo-R1's results format, ``metrics.json`` with every number, PNG
   plots and ``report.md``.

``--predictions FILE`` re-scores results files without any model (torch is never imported on that path):
REC records are re-scored from their ``extracted_answer`` exactly as ``recal_rec_acc_unique.py`` does,
with the unique flags joined from ``<split>_rec_with_unique.json`` when ``--data`` holds one, else taken
from the records' own ``is_unique`` (with no flag at all, the report and the summary say why Unique and
Non-unique are "–"). Odd records score as upstream scores them (IoU 0), or are refused in one line naming
the record (:func:`rescore_rec_results`). A file's mode is its ``mode`` key, else ``--mode``, else sft when
no output holds ``<answer>`` (:func:`results_mode`); sft runs get no format rate. OVD records are scored
under their ``image_id`` (COCO ties are ranked by image id, so the row order never matters), and with
``--data`` the dataset's positive queries missing from the file are added as misses, as Geo-R1 counts
them. Every results file written here carries each row's ``image_id``.
Training logs (``train_log.jsonl``) found in adapter directories are
plotted as learning curves; ``--logs NAME=FILE`` adds others.

Coordinates: Geo-R1's evaluation never rescales predictions, and neither does the headline number here.
Our chips are multiples of 28, so the model sees them unresized and nothing needs rescaling. For other
image sizes the report counts them, and gives a "rescaled" mean IoU (predictions mapped back from the
model's ``smart_resize`` frame, ``geo_r1_qgis.core.rules.coords.model_to_image_box``) as our extension.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from geo_r1_qgis.core.errors import ConfigError, OutputError
from geo_r1_qgis.core.rules.coords import model_input_size
from geo_r1_qgis.core.rules.parsing import format_ok
from geo_r1_qgis.core.rules.prompts import PROMPT_VERSION, PromptSpec
from train.data_format import SPLITS, TASKS, ChipRecord, assign_image_ids, eval_json_name, read_records
from train.metrics import (
    MODES,
    OvdQuery,
    RecResult,
    coco_map_single,
    coco_scores,
    extract_rec_box,
    finite_box,
    gres_scores,
    mean_iou,
    ovd_answer_region,
    ovd_eval_boxes,
    read_results,
    rec_scores,
    recal_iou,
    rescaled_iou,
    score_results,
)

log = logging.getLogger(__name__)

#: Written by the trainer beside each adapter (train/trainer.py).
ADAPTER_MANIFEST = "geo_r1_adapter.json"
#: One JSON object per logged step, in each adapter directory (train/trainer.py).
TRAIN_LOG = "train_log.jsonl"
BASE_NAME = "base"
DEFAULT_MAX_NEW_TOKENS = {"rec": 256, "multi": 1024, "gres": 1024}
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def _parse_adapters(items: list[str] | None) -> dict[str, str]:
    from engine.runtime.loading import parse_adapters

    return parse_adapters(items)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """One evaluation. Validated when built; every message names the fix."""

    out_dir: Path = dataclasses.field(
        metadata={"flags": ("-o", "--output"), "aliases": ("--out",), "metavar": "REPORT_DIR",
                  "help": "report directory (created; files in it are replaced)"},
    )  # fmt: skip
    data: Path | None = dataclasses.field(
        default=None, metadata={"help": "dataset directory (what 'geo-r1 dataset' writes)"}
    )
    model: str | None = dataclasses.field(
        default=None, metadata={"help": "base model: Hugging Face id or local directory"}
    )
    processor: str | None = dataclasses.field(
        default=None, metadata={"help": "processor source if it differs (Geo-R1 checkpoints: the base Qwen)"}
    )
    adapters: Mapping[str, str] = dataclasses.field(
        default_factory=dict,
        metadata={"flags": ("--adapter",), "action": "append", "metavar": "NAME=PATH", "parse": _parse_adapters,
                  "help": "a LoRA adapter to evaluate beside the base model (repeatable)"},
    )  # fmt: skip
    split: str = dataclasses.field(
        default="test", metadata={"choices": ("test", "val", "train"), "help": "split to score"}
    )
    task: str = dataclasses.field(
        default="rec",
        metadata={"choices": TASKS,
                  "help": "rec: one box; multi: all boxes (OVD); gres: boxes and keypoints, masks through --sam "
                          "(gIoU / cIoU)"},
    )  # fmt: skip
    mode: str | None = dataclasses.field(
        default=None,
        metadata={"choices": MODES,
                  "help": "prompt and parse: geo-r1 (reasoning, the default) or sft (baseline); an adapter's "
                  f"{ADAPTER_MANIFEST} overrides it for that adapter; for --predictions, the mode of a file "
                  "without a 'mode' key (default: sft when no output holds <answer>, else geo-r1)"},
    )  # fmt: skip
    batch_size: int = dataclasses.field(default=8, metadata={"help": "queries per generate call"})
    max_new_tokens: int | None = dataclasses.field(
        default=None, metadata={"help": "default: 256 for rec, 1024 for multi (Geo-R1's)"}
    )
    limit: int | None = dataclasses.field(default=None, metadata={"help": "score only the first N queries"})
    predictions: Mapping[str, Path] = dataclasses.field(
        default_factory=dict,
        metadata={"action": "append", "metavar": "[NAME=]FILE",
                  "parse": lambda items: _named_paths(items, "--predictions", _results_name),
                  "help": "re-score a results file without running a model (repeatable)"},
    )  # fmt: skip
    logs: Mapping[str, Path] = dataclasses.field(
        default_factory=dict,
        metadata={"action": "append", "metavar": "NAME=TRAIN_LOG.jsonl",
                  "parse": lambda items: _named_paths(items, "--logs", lambda p: p.parent.name or p.stem),
                  "help": "a training log to plot (adapters' own train_log.jsonl are found)"},
    )  # fmt: skip
    with_unique: Path | None = dataclasses.field(
        default=None,
        metadata={"metavar": "FILE", "help": "Geo-R1 …_with_unique.json to join --predictions on (default: --data's)"},
    )
    sam: str | None = dataclasses.field(
        default=None,
        metadata={"metavar": "MODEL",
                  "help": "the frozen SAM 2 (directory or Hugging Face id, offline) that turns GRES answers into "
                          "masks; needed by --task gres with --model"},
    )  # fmt: skip
    device: str = dataclasses.field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N or mps"})
    dtype: str = dataclasses.field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16"})
    examples: int = dataclasses.field(default=8, metadata={"help": "chips in the example grid (0: none)"})
    include_base: bool = dataclasses.field(
        default=True, metadata={"flags": ("--no-base",), "action": "store_false", "help": "score only the adapters"}
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.data is not None:
            object.__setattr__(self, "data", Path(self.data))
        if self.with_unique is not None:
            object.__setattr__(self, "with_unique", Path(self.with_unique))
        object.__setattr__(self, "adapters", MappingProxyType({str(k): str(v) for k, v in self.adapters.items()}))
        object.__setattr__(self, "predictions", MappingProxyType({k: Path(v) for k, v in self.predictions.items()}))
        object.__setattr__(self, "logs", MappingProxyType({k: Path(v) for k, v in self.logs.items()}))
        if self.split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {self.split!r}; use --split test or --split val")
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {self.task!r}; use --task {' or --task '.join(TASKS)}")
        if self.task == "gres" and self.mode == "sft" and self.model is not None:
            raise ConfigError("--task gres has only Geo-R1's reasoning prompt (test_gres_eval.py); drop --mode sft")
        if self.task == "gres" and self.model is not None and not self.sam:
            raise ConfigError("--task gres scores masks: pass --sam MODEL, the SAM 2 that turns the model's boxes and "
                              "keypoints into masks (e.g. a directory from 'geo-r1 tiny-sam')")  # fmt: skip
        if self.mode is not None and self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}; use --mode geo-r1 or --mode sft")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}; try --batch-size 8")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}; leave it unset for the default")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}; leave --limit out to score every query")
        if self.examples < 0:
            raise ConfigError(f"examples must be >= 0, got {self.examples}")
        if self.model is None and not self.predictions:
            raise ConfigError("nothing to evaluate: pass --model M (with --data DIR) or --predictions RESULTS.json")
        if self.model is not None and self.data is None:
            raise ConfigError("--model needs --data DIR, the dataset directory to score it on")
        if self.adapters and self.model is None:
            raise ConfigError("--adapter needs --model, the base model the adapters were trained on")
        if self.model is not None and not self.include_base and not self.adapters:
            raise ConfigError("--no-base leaves nothing to evaluate; add --adapter NAME=PATH or drop --no-base")
        names = [BASE_NAME] if self.model is not None and self.include_base else []
        names += list(self.adapters) + list(self.predictions)
        if BASE_NAME in self.adapters or (self.model is not None and BASE_NAME in self.predictions):
            raise ConfigError(f"the name {BASE_NAME!r} is the base model's; name the adapter or predictions otherwise")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"two models are named {dupes[0]!r}; give each adapter and predictions file a NAME=")

    @property
    def model_mode(self) -> str:
        """The mode models are scored in (an adapter's manifest may override it): ``--mode``, else geo-r1."""
        return self.mode or "geo-r1"

    @property
    def new_tokens(self) -> int:
        return self.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[self.task]


def adapter_manifest(path: str | Path) -> dict[str, Any]:
    """The trainer's ``geo_r1_adapter.json`` of an adapter directory, or {} when there is none."""
    file = Path(path).expanduser() / ADAPTER_MANIFEST
    if not file.is_file():
        return {}
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{file} is not valid JSON ({exc}); re-train the adapter or delete the file") from exc
    if not isinstance(manifest, dict):
        raise ConfigError(f"{file} must hold a JSON object; re-train the adapter or delete the file")
    if "reasoning" in manifest and not isinstance(manifest["reasoning"], bool):
        raise ConfigError(f"{file}: 'reasoning' must be true or false, got {manifest['reasoning']!r}")
    return manifest


def mode_for_adapter(manifest: Mapping[str, Any], default: str) -> str:
    """The adapter's own mode when its manifest says whether it was trained with reasoning."""
    if "reasoning" in manifest:
        return "geo-r1" if manifest["reasoning"] else "sft"
    return default


# --------------------------------------------------------------------------------------------------
# Scoring (pure: records and outputs in, results records and numbers out)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelRun:
    """One evaluated model: how it was prompted, its results records and its numbers."""

    name: str
    mode: str
    source: str
    task: str
    results: list[dict[str, Any]]
    scores: dict[str, Any]
    #: per query: the IoU (rec) or the AP@[.5:.95] of a positive query (multi), for the histogram
    values: list[float]
    method: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    results_file: str | None = None


#: why Unique and Non-unique are empty ("–"), by cause; ``{f}`` is the flag's name as the output writes it
_UNIQUE_WHY = {
    "no_flags": "no record carries an {f} flag: pass --with-unique FILE (Geo-R1's …_with_unique.json) or --data DIR",
    "no_match": "no record matched an {f} flag of the unique file on (image, question): check that it belongs "
    "to these results",
    "dataset_no_flags": "the dataset's records carry no {f} flag",
}


def unique_why(scores: Mapping[str, Any], markdown: bool = False) -> str | None:
    """Why a REC run's Unique and Non-unique are empty, in words (None when they are not)."""
    why = scores.get("unique_missing")
    return _UNIQUE_WHY[why].format(f="`is_unique`" if markdown else "is_unique") if why in _UNIQUE_WHY else None


def _image_size(value: Any) -> tuple[int, int] | None:
    """A record's ``image_size`` when it is two positive whole numbers, else None (unknown)."""
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return (value[0], value[1])
    return None


def _is_box(value: Any) -> bool:
    return finite_box(value) is not None


def _format_rate(outputs: Sequence[Any], task: str, mode: str) -> float | None:
    """Geo-R1's format reward over the outputs, in %: only for reasoning prompts (geo-r1 mode) and only
    when the file holds outputs; None otherwise (an SFT-baseline output never has the reasoning format)."""
    if mode != "geo-r1" or not any(isinstance(o, str) for o in outputs):
        return None
    return sum(format_ok(o, task) for o in outputs if isinstance(o, str)) / len(outputs) * 100


def _rec_extras(results: Sequence[Mapping[str, Any]], ious: Sequence[float], mode: str) -> dict[str, Any]:
    rescaled = [r.get("rescaled_iou") for r in results]
    sizes = [_image_size(r.get("image_size")) for r in results]
    off_grid = sum(1 for s in sizes if s and tuple(model_input_size(s)) != s)
    known_rescaled = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rescaled)
    return {
        "rescaled_mean_iou": mean_iou(rescaled) if rescaled and known_rescaled else None,
        "images_not_multiple_of_28": off_grid,
        "images_of_known_size": sum(1 for s in sizes if s),
        # no box at all (Geo-R1 writes [0, 0, 0, 0] for a failed parse; odd values are no box either)
        "failed_parses": sum(
            1
            for r in results
            if not _is_box(r.get("extracted_answer")) or all(v == 0 for v in r.get("extracted_answer"))
        ),
        "format_ok": _format_rate([r.get("model_output") for r in results], "rec", mode),
        "ious_above_0": sum(1 for v in ious if v > 0),
    }


def _unique_missing(scores: Mapping[str, Any], cause: str) -> str | None:
    counts = scores["counts"]
    return cause if counts["overall"] and not counts["unique"] and not counts["non_unique"] else None


def score_rec_run(records: Sequence[ChipRecord], outputs: Sequence[str], mode: str) -> tuple[list[dict], dict, list]:
    """Score REC outputs: Geo-R1's results records (each with its image's COCO id), the numbers and the
    per-query IoUs."""
    results, pairs = [], []
    for r, text in zip(assign_image_ids(records), outputs, strict=True):
        box = extract_rec_box(text, mode)
        gt = r.boxes[0]
        iou = recal_iou(list(box), list(gt))
        res = RecResult(
            image=r.image,
            question=r.question,
            ground_truth=tuple(gt),
            model_output=text,
            extracted_answer=tuple(box),
            iou=iou,
            is_unique=r.is_unique,
            image_size=r.image_size,
            rescaled_iou=rescaled_iou(list(box), list(gt), r.image_size),
            extra={"id": r.id, "image_id": r.image_id, "expression": r.expression, "category": r.category},
        )
        results.append(res.to_json())
        pairs.append((iou, r.is_unique))
    scores = rec_scores(pairs).to_json()
    ious = [p[0] for p in pairs]
    scores.update(_rec_extras(results, ious, mode))
    scores["unique_missing"] = _unique_missing(scores, "dataset_no_flags")
    return results, scores, ious


def rescore_rec_results(results: Sequence[Mapping[str, Any]], with_unique: Any = None,
                        mode: str = "geo-r1") -> tuple[dict, list]:  # fmt: skip
    """Re-score REC results records as ``recal_rec_acc_unique.py`` does (see train/metrics.py). Odd
    values score as upstream scores them: an ``extracted_answer`` or ``ground_truth`` that is not a list
    of 4 (a number, a string, a boolean, a nested list) has IoU 0, and so has a box holding a NaN (upstream:
    nan, which is no hit either); a record that is not an object, or a box value ``float()`` rejects (where
    upstream crashes), is refused with its number."""
    rec, ious = score_results(results, with_unique)
    scores = rec.to_json()
    fixed = []
    for r in results:  # the rescaled IoU needs the image size, which only our results files carry
        r = dict(r)
        size = _image_size(r.get("image_size"))
        if size and r.get("rescaled_iou") is None:
            r["rescaled_iou"] = rescaled_iou(r.get("extracted_answer"), r.get("ground_truth"), size)
        fixed.append(r)
    scores.update(_rec_extras(fixed, ious, mode))
    scores["unique_flags_from"] = "with_unique file" if with_unique is not None else "records' is_unique"
    scores["unique_missing"] = _unique_missing(scores, "no_match" if with_unique is not None else "no_flags")
    return scores, ious


def _ovd_queries(results: Sequence[Any], boxes_key: str = "extracted_answer") -> list[OvdQuery]:
    """One :class:`OvdQuery` per results record (its ``image_id`` the image's COCO id); a record that
    cannot be one is refused with its number."""
    queries = []
    for n, r in enumerate(results, 1):
        if not isinstance(r, Mapping):
            raise ConfigError(f"record {n} is not a JSON object ({str(r)[:80]}); fix the results file")
        image, image_id = r.get("image"), r.get("image_id")
        if image is None and image_id is None:
            raise ConfigError(f"record {n} has neither an image nor an image_id; fix the results file")
        name = str(image) if image is not None else f"image_id {image_id}"
        category = str(r.get("category") or r.get("question"))
        gt, pred = r.get("ground_truth"), r.get(boxes_key)
        try:
            queries.append(OvdQuery(name, category, [] if gt is None else gt, [] if pred is None else pred, image_id))
        except ConfigError as exc:
            raise ConfigError(f"record {n} ({name}): {exc}") from None
    return queries


def _multi_scores(results: Sequence[Mapping[str, Any]], mode: str = "geo-r1") -> tuple[dict, list]:
    queries = _ovd_queries(results)
    with_neg = coco_scores(queries)  # first: its refusals number the records as the file does
    positives = [q for q in queries if q.gt_boxes]
    negatives = [q for q in queries if not q.gt_boxes]
    scores = coco_scores(positives).to_json()
    scores["with_negatives"] = {"mAP": with_neg.mAP * 100, "AP50": with_neg.AP50 * 100}
    scores["negatives"] = {
        "queries": len(negatives),
        "answered_none": sum(1 for q in negatives if not q.pred_boxes),
    }
    missing = [r for r in results if r.get("missing")]
    if missing:
        scores["missing_from_results"] = {
            "queries": len(missing),
            "gt_boxes": sum(len(r.get("ground_truth") or []) for r in missing),
        }
    scores["format_ok"] = _format_rate([r.get("model_output") for r in results if not r.get("missing")], "multi", mode)
    if results and all(isinstance(r.get("answer_region_boxes"), list) or r.get("missing") for r in results):
        region = coco_scores(q for q in _ovd_queries(results, "answer_region_boxes") if q.gt_boxes)
        scores["answer_region"] = {
            "mAP": region.mAP * 100,
            "AP50": region.AP50 * 100,
            "queries_differing": sum(
                1 for r in results if not r.get("missing") and r.get("answer_region_boxes") != r.get("extracted_answer")
            ),
        }
    values = [coco_map_single(q.pred_boxes, q.gt_boxes) for q in positives]
    return scores, values


def score_multi_run(records: Sequence[ChipRecord], outputs: Sequence[str], mode: str) -> tuple[list[dict], dict, list]:
    """Score OVD-style outputs: results records (boxes per query, each with its image's COCO id), COCO
    numbers and per-query APs.

    The boxes (``extracted_answer``) are read from the whole response in both modes, as Geo-R1's
    ``test_ovd_nwpu_eval.py`` reads them (its prompt has no reasoning). In geo-r1 mode the prompt asks for
    reasoning, and brackets in ``<think>`` can then be taken for the answer; our reasoning-mode rule reads
    only the first ``<answer>`` region (``train.metrics.ovd_answer_region``): each record also keeps those
    boxes (``answer_region_boxes``), scored beside Geo-R1's numbers as ``answer_region``, never instead."""
    results = []
    for r, text in zip(assign_image_ids(records), outputs, strict=True):
        row = {
            "image": r.image,
            "image_id": r.image_id,
            "question": PromptSpec(r.expression, "multi", mode == "geo-r1").text,
            "ground_truth": [list(b) for b in r.boxes],
            "model_output": text,
            "extracted_answer": ovd_eval_boxes(text),
            "category": r.category,
            "negative": r.negative,
            "id": r.id,
            "expression": r.expression,
            "image_size": list(r.image_size),
        }
        if mode == "geo-r1":
            row["answer_region_boxes"] = ovd_eval_boxes(ovd_answer_region(text, reasoning=True))
        results.append(row)
    scores, values = _multi_scores(results, mode)
    return results, scores, values


def _gres_item_json(item: Any) -> dict[str, Any]:
    return {"bbox_2d": list(item.box), **{f"keypoint{k + 1}": list(p) for k, p in enumerate(item.points)}}


def score_gres_run(records: Sequence[ChipRecord], outputs: Sequence[str], mode: str, masker: Any,
                   data: Path) -> tuple[list[dict], dict, list]:  # fmt: skip
    """Score GRES outputs as Geo-R1's ``test_gres_eval.py`` does: each answer (``parsing.gres_answer``) prompts
    the frozen SAM ``masker`` box by box with its keypoints, each mask clipped to its box, OR-ed
    (``train.rewards.gres_pred_mask``, as written: never rescaled), against the true mask of the record's
    outlines (``core/rules/gres_truth.truth_mask``); no items is ``I = 0, U = |truth|``. Results records carry
    ``intersection``, ``union`` and ``truth_pixels``, so :func:`rescore_gres_results` re-scores them without
    SAM."""
    import numpy as np
    from PIL import Image

    from geo_r1_qgis.core.rules.gres_truth import truth_mask
    from geo_r1_qgis.core.rules.parsing import gres_answer
    from train.metrics import mask_counts
    from train.rewards import gres_pred_mask

    results = []
    for r, text in zip(assign_image_ids(records), outputs, strict=True):
        if r.outlines is None:
            raise ConfigError(f"record {r.id} has no outlines; rebuild the dataset (gres records carry each "
                              "object's outline)")  # fmt: skip
        truth = truth_mask(r.outlines, r.image_size)
        items = gres_answer(text)
        pred = np.zeros(truth.shape, dtype=bool)
        if items:
            with Image.open(Path(data) / r.image) as im:
                rgb = np.asarray(im.convert("RGB"))
            pred = gres_pred_mask(items, rgb, masker)
        inter, union = mask_counts(pred, truth)
        results.append({
            "image": r.image, "image_id": r.image_id, "question": r.question,
            "ground_truth": [list(b) for b in r.boxes], "model_output": text,
            "extracted_answer": [_gres_item_json(it) for it in items or ()],
            "parsed": items is not None, "intersection": inter, "union": union, "truth_pixels": int(truth.sum()),
            "iou": inter / union if union > 0 else 0.0,
            "category": r.category, "negative": r.negative, "id": r.id, "expression": r.expression,
            "image_size": list(r.image_size),
        })  # fmt: skip
    scores, values = _gres_scores(results, mode)
    return results, scores, values


def _gres_count(r: Mapping[str, Any], n: int) -> tuple[int, int, int, bool]:
    def whole(key: str, default: Any = None) -> int:
        v = r.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < 0:
            raise ConfigError(f"record {n} ({r.get('image')}): {key} must be a whole number of pixels >= 0, got "
                              f"{v!r}; GRES results need each query's intersection and union (geo-r1 eval writes "
                              "them)")  # fmt: skip
        return int(v)

    inter, union = whole("intersection"), whole("union")
    truth = whole("truth_pixels", union - inter) if "truth_pixels" in r else union - inter
    if inter > union or truth > union:
        raise ConfigError(f"record {n} ({r.get('image')}): intersection {inter} and truth pixels {truth} cannot "
                          f"exceed the union {union}; fix the results file")  # fmt: skip
    return inter, union, truth, bool(r.get("parsed", True))


def _gres_scores(results: Sequence[Any], mode: str = "geo-r1") -> tuple[dict, list]:
    counts = []
    for n, r in enumerate(results, 1):
        if not isinstance(r, Mapping):
            raise ConfigError(f"record {n} is not a JSON object ({str(r)[:80]}); fix the results file")
        counts.append(_gres_count(r, n))
    scores_obj, values = gres_scores(counts)
    scores = scores_obj.to_json()
    by_class: dict[str, list[tuple[int, int, int, bool]]] = {}
    for r, c in zip(results, counts, strict=True):
        by_class.setdefault(str(r.get("category") or r.get("expression") or r.get("question")), []).append(c)
    scores["per_class"] = {
        k: {"gIoU": s.giou * 100, "cIoU": s.ciou * 100, "queries": s.n}
        for k, (s, _) in sorted((k, gres_scores(v)) for k, v in by_class.items())
    }
    scores["format_ok"] = _format_rate([r.get("model_output") for r in results], "multi", mode)
    return scores, values


def rescore_gres_results(results: Sequence[Any], mode: str = "geo-r1") -> tuple[dict, list]:
    """Re-score GRES results records from their ``intersection`` / ``union`` counts (no SAM, no model)."""
    return _gres_scores(results, mode)


def _nested_boxes(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(b, list) for b in value)


def infer_task(data: Mapping[str, Any]) -> str:
    """The task of a results file: its ``task`` key; else multi when every record's ``ground_truth`` is a
    list of boxes (and at least one holds one); else rec, Geo-R1's only results format (a REC file with
    an odd record, e.g. a nested truth first, stays REC and that record scores 0, as upstream scores it)."""
    if data.get("task") in TASKS:
        return data["task"]
    rows = data.get("results", [])
    if rows and all(isinstance(r, Mapping) and "intersection" in r and "union" in r for r in rows):
        return "gres"
    rows = data.get("results", [])
    gts = [r.get("ground_truth") if isinstance(r, Mapping) else None for r in rows]
    if gts and all(_nested_boxes(g) for g in gts) and any(g for g in gts):
        return "multi"
    return "rec"


# --------------------------------------------------------------------------------------------------
# Running models
# --------------------------------------------------------------------------------------------------


def _generate(loaded: Any, data: Path, records: Sequence[ChipRecord], cfg: EvalConfig, mode: str, name: str) -> list:
    from train.generation import generate_texts

    outputs: list[str] = []
    step = cfg.batch_size * 4
    for i in range(0, len(records), step):
        chunk = records[i : i + step]
        outputs += generate_texts(loaded.model, loaded.processor, data, chunk, reasoning=mode == "geo-r1",
                                  max_new_tokens=cfg.new_tokens, batch_size=cfg.batch_size)  # fmt: skip
        log.info("%s: %d/%d queries", name, len(outputs), len(records))
    return outputs


def _model_runs(cfg: EvalConfig, records: Sequence[ChipRecord]) -> list[ModelRun]:
    from engine.runtime.loading import LoadConfig, load_model

    loaded = load_model(LoadConfig(model=cfg.model, processor=cfg.processor, device=cfg.device, dtype=cfg.dtype))
    manifests = {}
    for name, path in cfg.adapters.items():
        manifests[name] = adapter_manifest(path)
        loaded.adapters.register(name, path)
    log.info("evaluating on %s (%s)", loaded.device, loaded.dtype)
    plan: list[tuple[str, str | None]] = [(BASE_NAME, None)] if cfg.include_base else []
    plan += [(name, name) for name in cfg.adapters]
    runs = []
    masker = None  # the frozen SAM of --task gres, loaded once
    for name, adapter in plan:
        manifest = manifests.get(adapter, {}) if adapter else {}
        mode = mode_for_adapter(manifest, cfg.model_mode)
        notes = []
        if adapter and "reasoning" in manifest:
            notes.append(f"mode {mode} from {ADAPTER_MANIFEST} (reasoning={manifest['reasoning']})")
        if manifest.get("task") and manifest["task"] != cfg.task:
            notes.append(f"trained for task {manifest['task']!r}, scored on {cfg.task!r}")
            log.warning("adapter %s was trained for task %s, scored on %s", name, manifest["task"], cfg.task)
        loaded.adapters.activate(adapter)
        outputs = _generate(loaded, cfg.data, records, cfg, mode, name)
        if cfg.task == "gres":
            if masker is None:
                from engine.runtime.sam import SamMasker

                masker = SamMasker.load(cfg.sam, loaded.device)
            results, scores, values = score_gres_run(records, outputs, mode, masker, cfg.data)
        else:
            score = score_rec_run if cfg.task == "rec" else score_multi_run
            results, scores, values = score(records, outputs, mode)
        source = f"adapter {cfg.adapters[adapter]}" if adapter else f"base model {cfg.model}"
        runs.append(ModelRun(name, mode, source, cfg.task, results, scores, values, manifest.get("method"), notes))
    return runs


def _prediction_runs(cfg: EvalConfig) -> list[ModelRun]:
    with_unique = None
    path = cfg.with_unique
    if path is None and cfg.data is not None:
        path = cfg.data / eval_json_name(cfg.split, with_unique=True)
        path = path if path.is_file() else None
    if path is not None:
        try:
            with_unique = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist; pass Geo-R1's …_with_unique.json evaluation file") from None
        except ValueError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}); pass Geo-R1's …_with_unique.json") from exc
        if not isinstance(with_unique, list):
            raise ConfigError(f"{path} must hold a JSON list of {{image, problem, solution, is_unique}} items")
    runs = []
    for name, file in cfg.predictions.items():
        data = read_results(file)
        results = list(data.get("results", []))
        task = infer_task(data)
        mode, mode_note = results_mode(data, cfg.mode)  # a label (and the format rate) only: never re-parsed
        notes = ["re-scored from the results file; no model was run", mode_note]
        if task == "rec":
            scores, values = rescore_rec_results(results, with_unique, mode)
        elif task == "gres":
            scores, values = rescore_gres_results(results, mode)
        else:
            if cfg.data is not None:
                results, data_notes = _with_missing_queries(cfg, results, mode)
                notes += data_notes
            scores, values = _multi_scores(results, mode)
        runs.append(ModelRun(name, mode, f"predictions {file}", task, results, scores, values,
                             data.get("method"), notes))  # fmt: skip
    return runs


def results_mode(data: Mapping[str, Any], given: str | None) -> tuple[str, str]:
    """The mode of a results file, and how it was decided: the file's own ``mode`` key; else ``--mode``;
    else sft when none of its outputs holds ``<answer>`` (Geo-R1's ``test_rec_baseline_eval.py`` writes
    no mode and its outputs have no tags), geo-r1 otherwise."""
    if data.get("mode") in MODES:
        return data["mode"], f"mode {data['mode']} from the file's mode key"
    if given is not None:
        return given, f"mode {given} from --mode"
    rows = [r for r in data.get("results", []) if isinstance(r, Mapping)]
    outputs = [r.get("model_output") for r in rows if isinstance(r.get("model_output"), str)]
    outputs = [o for o in outputs if o.strip()]
    if not outputs:
        return "geo-r1", "mode geo-r1 assumed: the file has no mode key and no outputs (pass --mode to say)"
    if not any("<answer>" in o for o in outputs):
        return "sft", "mode sft: no output holds <answer>, as in an SFT-baseline file (pass --mode to say otherwise)"
    return "geo-r1", "mode geo-r1: the outputs hold <answer> (pass --mode to say otherwise)"


def _with_missing_queries(cfg: EvalConfig, results: list[Any], mode: str) -> tuple[list[Any], list[str]]:
    """The OVD results with every positive query of ``--data`` (its split) that they lack added as a
    miss (its true boxes, no prediction, ``"missing": true``), as Geo-R1 scores against the whole
    annotation file; rows without an ``image_id`` take the dataset's. Returns the rows and notes."""
    records = [r for r in assign_image_ids(read_records(cfg.data, cfg.split, "multi")) if r.boxes]
    ids = {r.image: r.image_id for r in records}
    rows: list[Any] = []
    have, have_positive = set(), set()
    for r in results:
        if isinstance(r, Mapping):
            if r.get("image_id") is None and r.get("image") in ids:
                r = {**r, "image_id": ids[r["image"]]}
            key = (r.get("image"), str(r.get("category") or r.get("question")))
            have.add(key)
            if r.get("ground_truth"):
                have_positive.add(key)
        rows.append(r)
    known = {(r.image, r.category) for r in records}
    missing = [r for r in records if (r.image, r.category) not in have]
    for r in missing:
        rows.append({
            "image": r.image, "image_id": r.image_id,
            "question": PromptSpec(r.expression, "multi", mode == "geo-r1").text,
            "ground_truth": [list(b) for b in r.boxes], "model_output": None, "extracted_answer": [],
            "category": r.category, "negative": False, "id": r.id, "expression": r.expression,
            "image_size": list(r.image_size), "missing": True,
        })  # fmt: skip
    notes = []
    if missing:
        notes.append(f"{len(missing)} queries of the dataset ({cfg.split}) are missing from the results: "
                     "counted as misses, as Geo-R1 counts them")  # fmt: skip
    else:
        notes.append(f"every positive query of the dataset ({cfg.split}) is in the results")
    strangers = sum(1 for key in have_positive if key not in known)
    if strangers:
        notes.append(f"{strangers} (image, category) pairs of the results are not positive queries of the dataset "
                     f"({cfg.split}): check --data and --split")  # fmt: skip
    return rows, notes


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def safe_name(name: str) -> str:
    return _SAFE_NAME.sub("_", name).strip("_") or "model"


def write_results(run: ModelRun, out_dir: Path, cfg: EvalConfig) -> Path:
    """``<name>_results.json`` in Geo-R1's format (``accuracy`` + ``results``), plus our keys."""
    path = out_dir / f"{safe_name(run.name)}_results.json"
    if run.task == "rec":
        head: dict[str, Any] = {"accuracy": run.scores["acc@0.5"]["overall"], "accuracy_metric": "Acc@0.5 (%)"}
    elif run.task == "gres":
        head = {
            "accuracy": run.scores["gIoU"],
            "accuracy_metric": "gIoU (%)",
            "overall_gIoU": run.scores["gIoU"] / 100,
            "overall_cIoU": run.scores["cIoU"] / 100,
        }  # fmt: skip (Geo-R1's key names, as fractions)
    else:
        head = {"accuracy": run.scores["mAP"], "accuracy_metric": "COCO mAP (%)", "AP50": run.scores["AP50"]}
    payload = {**head, "task": run.task, "mode": run.mode, "name": run.name, "source": run.source,
               "method": run.method, "prompt_version": PROMPT_VERSION, "split": cfg.split,
               "results": run.results}  # fmt: skip
    path.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def find_logs(cfg: EvalConfig) -> dict[str, Path]:
    """``train_log.jsonl`` of each adapter directory, then the ``--logs`` files (which must exist)."""
    logs: dict[str, Path] = {}
    for name, path in cfg.adapters.items():
        candidate = Path(path).expanduser() / TRAIN_LOG
        if candidate.is_file():
            logs[name] = candidate
    for name, path in cfg.logs.items():
        if not path.is_file():
            raise ConfigError(f"training log {path} (--logs {name}=…) does not exist; pass a train_log.jsonl")
        logs[name] = path
    return logs


def _pct(v: Any, total: int | None = None) -> str:
    return "–" if v is None or total == 0 else f"{v:.2f}"


def _rec_table(runs: Sequence[ModelRun]) -> list[str]:
    lines = [
        "| model | mode | method | N | Acc@0.5 Overall | Unique | Non-unique | Acc@0.7 Overall | Unique | Non-unique "
        "| mean IoU | rescaled mean IoU | failed parses | format ok % |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        s = r.scores
        a5, a7, c = s["acc@0.5"], s["acc@0.7"], s["counts"]
        nu, nn = c["unique"], c["non_unique"]
        rescaled = s.get("rescaled_mean_iou")
        lines.append(
            f"| {r.name} | {r.mode} | {r.method or '–'} | {c['overall']} | {_pct(a5['overall'])} "
            f"| {_pct(a5['unique'], nu)} | {_pct(a5['non_unique'], nn)} | {_pct(a7['overall'])} "
            f"| {_pct(a7['unique'], nu)} | {_pct(a7['non_unique'], nn)} "
            f"| {s['mean_iou']:.3f} | {'–' if rescaled is None else f'{rescaled:.3f}'} | {s['failed_parses']} "
            f"| {_pct(s['format_ok']) if r.mode == 'geo-r1' else '–'} |"
        )
    for r in runs:
        why = unique_why(r.scores, markdown=True)
        if why:
            lines += ["", f"Unique and Non-unique show – for {r.name}: {why}."]
    return lines


def _multi_table(runs: Sequence[ModelRun]) -> list[str]:
    lines = [
        "| model | mode | method | queries | mAP | AP50 | mAP with negatives | negatives answered None | format ok % |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        s = r.scores
        neg = s["negatives"]
        lines.append(
            f"| {r.name} | {r.mode} | {r.method or '–'} | {s['counts']['queries']} | {_pct(s['mAP'])} "
            f"| {_pct(s['AP50'])} | {_pct(s['with_negatives']['mAP'])} | {neg['answered_none']}/{neg['queries']} "
            f"| {_pct(s['format_ok']) if r.mode == 'geo-r1' else '–'} |"
        )
    return lines


def _gres_table(runs: Sequence[ModelRun]) -> list[str]:
    lines = [
        "| model | mode | method | queries | gIoU | cIoU | LISA gIoU | LISA cIoU | Pr@0.5 | Pr@0.7 | Pr@0.9 "
        "| empty truth | failed parses | format ok % |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        s, lisa, c = r.scores, r.scores["lisa"], r.scores["counts"]
        lines.append(
            f"| {r.name} | {r.mode} | {r.method or '–'} | {c['queries']} | {_pct(s['gIoU'])} | {_pct(s['cIoU'])} "
            f"| {_pct(lisa['gIoU'])} | {_pct(lisa['cIoU'])} | {_pct(lisa['Pr@0.5'])} | {_pct(lisa['Pr@0.7'])} "
            f"| {_pct(lisa['Pr@0.9'])} | {c['empty_truth']} | {c['failed_parses']} "
            f"| {_pct(s['format_ok']) if r.mode == 'geo-r1' and s.get('format_ok') is not None else '–'} |"
        )
    lines += [
        "",
        "gIoU is the mean of the per-query mask IoU, cIoU the summed intersection over the summed union, as "
        "Geo-R1's `test_gres_eval.py` counts them: the answer's boxes and keypoints prompt the frozen SAM, each mask "
        "clipped to its box, OR-ed, against the union of the query's true outlines; a query whose union is empty "
        "(no object, answered with no mask) scores 0 there. *LISA gIoU / cIoU* and *Pr@t* (IoU > t) count as LISA "
        "and EarthReason do: such a query scores 1, and the IoU is I / (U + 1e-5); a failed parse scores 0 in both.",
    ]
    return lines + _per_class_table(runs, "gIoU", "cIoU")


def _per_class_table(runs: Sequence[ModelRun], first: str, second: str) -> list[str]:
    """The per-class table of the runs' ``per_class`` scores: ``first / second`` per class (none: no lines)."""
    classes = sorted({c for r in runs for c in r.scores.get("per_class", {})})
    if not classes:
        return []
    lines = ["", f"Per class ({first} / {second}):", "", "| model | " + " | ".join(classes) + " |",
             "| --- |" + " ---: |" * len(classes)]  # fmt: skip
    for r in runs:
        pc = r.scores.get("per_class", {})
        cells = [f"{pc[c][first]:.1f} / {pc[c][second]:.1f}" if c in pc else "–" for c in classes]
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    return lines


def write_report(cfg: EvalConfig, runs: Sequence[ModelRun], plots: Mapping[str, Path | None], logs: Mapping[str, Path],
                 n_records: int | None) -> Path:  # fmt: skip
    """``report.md``: what was scored, how, the numbers and the plots."""
    task = runs[0].task if runs else cfg.task
    lines = [
        "# Geo-R1 evaluation",
        "",
        f"- date: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- dataset: `{cfg.data}` split `{cfg.split}`, task `{task}`"
        + (f", {n_records} queries" if n_records is not None else "")
        + (f" (--limit {cfg.limit})" if cfg.limit else ""),
    ]
    if cfg.model:
        lines.append(f"- base model: `{cfg.model}`" + (f", processor `{cfg.processor}`" if cfg.processor else ""))
        lines.append(f"- greedy decoding, max_new_tokens {cfg.new_tokens}, batch size {cfg.batch_size}")
    lines += [f"- prompt version: `{PROMPT_VERSION}`", ""]
    for r in runs:
        extra = f" ({'; '.join(r.notes)})" if r.notes else ""
        lines.append(f"- **{r.name}**: {r.source}, mode `{r.mode}`{extra}; results: `{r.results_file}`")
    lines += ["", "## Results", ""]
    if task == "rec":
        lines += _rec_table(runs)
        off = max((r.scores.get("images_not_multiple_of_28", 0) for r in runs), default=0)
        known = min((r.scores.get("images_of_known_size", 0) for r in runs), default=0)
        n_rows = max((len(r.results) for r in runs), default=0)
        counts = "; ".join(
            f"{r.name}: {c['overall']} overall, {c['unique']} unique, {c['non_unique']} non-unique, "
            f"{c['unflagged']} unflagged"
            for r in runs
            for c in [r.scores["counts"]]
        )
        lines += [
            "",
            f"Queries: {counts}.",
            "",
            "Acc@t is the percentage of queries with IoU **>** t (strict: an IoU of exactly 0.5 is a miss), over "
            "**all** queries (a failed parse is [0, 0, 0, 0], a miss), as Geo-R1's `recal_rec_acc_unique.py` "
            "counts. Unique / Non-unique use only the queries with an `is_unique` flag (unflagged queries count "
            "in Overall only). The IoU is Geo-R1's inclusive-pixel IoU. Geo-R1 mode parses the last box of the "
            "first `<answer>`; sft mode the first `[a, b, c, d]` anywhere. Mean IoU is our addition. "
            "*format ok* is Geo-R1's REC format reward (reasoning prompts only).",
            "",
            "Predictions are compared in the pixels the model wrote, without rescaling, as Geo-R1 does. "
            + (
                f"{off} image(s) here are not multiples of 28, so the model saw them resized: for those the "
                "unrescaled score is Geo-R1's, and the *rescaled mean IoU* (predictions mapped back from the "
                "model's frame, our extension) is the geometrically right one."
                if off
                else "The results do not record the image sizes, so the frame cannot be checked here."
                if known < n_rows
                else "Every image here has sides that are multiples of 28, so the model saw it unresized and the "
                "rescaled mean IoU equals the mean IoU."
            ),
        ]
    elif task == "gres":
        lines += _gres_table(runs)
    else:
        lines += _multi_table(runs)
        lines += [
            "",
            "COCO mAP (AP@[.5:.95]) and AP50 with pycocotools over the queries whose chip holds the category, "
            "every box scored 1.0, each image under its COCO id (`image_id`: COCOeval ranks boxes of equal score "
            "by image id, so the row order does not matter), as Geo-R1's `test_ovd_nwpu_eval.py`; boxes are read "
            "from the first fenced json block of the whole response, else the greedy `[...]`, in both modes, as "
            "Geo-R1 reads them. *mAP with negatives* also counts boxes given on negative chips as false positives "
            "(our addition). With `--data`, the dataset's queries missing from the results count as misses.",
        ]
        for r in runs:
            region = r.scores.get("answer_region")
            if region:
                lines += ["", f"Reasoning-mode rule (ours), {r.name}: reading only the first `<answer>` region, so "
                          "that brackets in `<think>` are not taken for the answer, gives mAP "
                          f"{_pct(region['mAP'])} / AP50 {_pct(region['AP50'])}; its boxes differ from Geo-R1's "
                          f"parse on {region['queries_differing']} of {len(r.results)} queries."]  # fmt: skip
            gone = r.scores.get("missing_from_results")
            if gone:
                lines += ["", f"{r.name}: {gone['queries']} queries of the dataset ({gone['gt_boxes']} true boxes) "
                          "are missing from the results and count as misses."]  # fmt: skip
        lines += _per_class_table(runs, "AP50", "mAP")
    titles = {
        "accuracy": "Accuracy",
        "iou_hist": "IoU per query" if task in ("rec", "gres") else "AP@[.5:.95] per query",
        "examples": "Examples (green: truth, red: prediction)",
        "curves": "Learning curves",
    }
    for key, title in titles.items():
        png = plots.get(key)
        if png is not None:
            lines += ["", f"## {title}", "", f"![{title}]({png.name})"]
    if logs:
        lines += ["", "Training logs: " + ", ".join(f"{n} (`{p}`)" for n, p in logs.items())]
    lines += ["", "All numbers: `metrics.json`.", ""]
    path = cfg.out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def write_metrics(cfg: EvalConfig, runs: Sequence[ModelRun], plots: Mapping[str, Path | None],
                  logs: Mapping[str, Path], n_records: int | None) -> Path:  # fmt: skip
    payload = {
        "dataset": str(cfg.data) if cfg.data else None,
        "split": cfg.split,
        "task": runs[0].task if runs else cfg.task,
        "queries": n_records,
        "limit": cfg.limit,
        "model": cfg.model,
        "processor": cfg.processor,
        "max_new_tokens": cfg.new_tokens if cfg.model else None,
        "prompt_version": PROMPT_VERSION,
        "models": {
            r.name: {
                "mode": r.mode,
                "source": r.source,
                "method": r.method,
                "task": r.task,
                "notes": r.notes,
                "results_file": r.results_file,
                "scores": r.scores,
            }
            for r in runs
        },
        "logs": {n: str(p) for n, p in logs.items()},
        "plots": {k: p.name for k, p in plots.items() if p is not None},
    }
    path = cfg.out_dir / "metrics.json"
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def run(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate, write every file into ``cfg.out_dir`` and return what ``metrics.json`` holds."""
    from train import eval_plots

    records: list[ChipRecord] = []
    if cfg.model is not None:
        records = assign_image_ids(read_records(cfg.data, cfg.split, cfg.task))[: cfg.limit]
        if not records:
            raise ConfigError(
                f"{cfg.data} has no {cfg.split} {cfg.task} records; pick another --split/--task or rebuild the dataset"
            )
    try:
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the report directory {cfg.out_dir} ({exc}); choose another -o") from exc
    logs = find_logs(cfg)

    runs = _model_runs(cfg, records) if cfg.model is not None else []
    runs += _prediction_runs(cfg)
    tasks = {r.task for r in runs}
    if len(tasks) > 1:
        raise ConfigError(f"the results mix tasks {sorted(tasks)}; evaluate rec and multi in separate reports")
    for r in runs:
        target = cfg.out_dir / f"{safe_name(r.name)}_results.json"
        if r.name in cfg.predictions and target.resolve() == cfg.predictions[r.name].resolve():
            r.results_file = target.name  # re-scoring a file in place: leave the input as it is
            continue
        r.results_file = write_results(r, cfg.out_dir, cfg).name

    plots = {
        "accuracy": eval_plots.accuracy_bars(runs, cfg.out_dir / "accuracy.png"),
        "iou_hist": eval_plots.value_histograms(runs, cfg.out_dir / "iou_hist.png"),
        "examples": eval_plots.example_grid(runs, cfg.data, cfg.out_dir / "examples.png", cfg.examples),
        "curves": eval_plots.learning_curves(logs, cfg.out_dir / "learning_curves.png"),
    }
    n_records = len(records) if records else (len(runs[0].results) if runs else None)
    write_report(cfg, runs, plots, logs, n_records)
    write_metrics(cfg, runs, plots, logs, n_records)
    log.info("report written to %s", cfg.out_dir / "report.md")
    return json.loads((cfg.out_dir / "metrics.json").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------------
# Command-line values (engine/cli/eval.py)
# --------------------------------------------------------------------------------------------------


def _named_paths(values: Sequence[str] | None, flag: str, default_name: Any) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep:
            name, path = default_name(Path(v)), v
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise ConfigError(f"{flag} takes NAME=PATH or PATH, got {v!r}")
        if name in out:
            raise ConfigError(f"two {flag} values are named {name!r}; name them: {flag} NAME=PATH")
        out[name] = Path(path).expanduser()
    return out


def _results_name(path: Path) -> str:
    stem = path.stem
    return stem[: -len("_results")] if stem.endswith("_results") and len(stem) > len("_results") else stem


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """One console line per scored model of :func:`run`'s metrics."""
    lines: list[str] = []
    for name, m in metrics["models"].items():
        s = m["scores"]
        if m["task"] == "rec":
            c = s["counts"]
            parts = [
                f"Acc@{t} {a['overall']:.2f} (unique {_pct(a['unique'], c['unique'])}, "
                f"non-unique {_pct(a['non_unique'], c['non_unique'])})"
                for t in ("0.5", "0.7")
                for a in [s[f"acc@{t}"]]
            ]
            why = unique_why(s)
            lines.append(f"{name} ({m['mode']}): {', '.join(parts)}, mean IoU {s['mean_iou']:.3f}"
                         + (f"; unique/non-unique –: {why}" if why else ""))  # fmt: skip
        elif m["task"] == "gres":
            lines.append(f"{name} ({m['mode']}): gIoU {s['gIoU']:.2f}, cIoU {s['cIoU']:.2f} (LISA's counting: gIoU "
                         f"{s['lisa']['gIoU']:.2f}, cIoU {s['lisa']['cIoU']:.2f})")  # fmt: skip
        else:
            gone = s.get("missing_from_results")
            lines.append(f"{name} ({m['mode']}): mAP {s['mAP']:.2f}, AP50 {s['AP50']:.2f}"
                         + (f" ({gone['queries']} missing queries counted as misses)" if gone else ""))  # fmt: skip
    return lines
