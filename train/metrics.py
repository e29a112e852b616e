"""Geo-R1's evaluation metrics, reproduced exactly: REC Acc@0.5 / Acc@0.7, OVD COCO mAP / AP50, and GRES
gIoU / cIoU over masks as Geo-R1's ``test_gres_eval.py`` counts them, with LISA's and EarthReason's counting
beside them (the GRES section at the end says how each treats empty masks).

Pure functions over strings, boxes and results records; tested on literal strings and fixed files.
pycocotools is imported only by the OVD functions.

REC: what Geo-R1's ``run_scripts/recal_rec_acc_unique.py`` does, exactly
-----------------------------------------------------------------------
The REC evaluation is two scripts. ``test_rec_r1_eval.py`` (``test_rec_baseline_eval.py`` for the SFT
baseline) generates, parses each output into ``extracted_answer`` and writes the results file
``{"accuracy", "results": [{image, question, ground_truth, model_output, extracted_answer, correct}]}``
with ``correct = 1 if iou(extracted, gt) > 0.5`` and ``accuracy = sum(correct) / len(data) * 100``.
``recal_rec_acc_unique.py`` then re-scores that file; it never re-parses ``model_output``:

1. **IoU** ``iou(box1, box2)``: ``0.0`` unless both are Python *lists* of exactly 4 items; the items are
   converted with ``float()``; then the inclusive-pixel IoU (``geo_r1_qgis.core.rules.coords.geo_r1_iou``: intersection
   ``[max(a0,b0), min(a2-1,b2-1)]`` inclusive, counted only when start < end on both axes; union of the
   exclusive areas; ``union <= 0`` gives 0.0). It is computed between ``extracted_answer`` and
   ``ground_truth`` of each results record.
2. **"Correct" at a threshold** t is ``iou > t``, strictly: an IoU of exactly 0.5 is a miss at 0.5.
   A failed parse was written as ``[0, 0, 0, 0]`` (IoU 0 against any box), so it is a miss, never dropped.
3. **Overall** (``recalculate_accuracy_at_thresholds``): ``count(iou > t) / len(results) * 100`` over
   *every* record of the results file (the denominator is all queries).
4. **Unique / Non-unique** (``analyze_by_uniqueness_multi_iou``): a lookup table is built from the
   ``…_with_unique.json`` evaluation file, key ``(item["image"], item["problem"])`` and value
   ``item.get("is_unique", False)`` (an item *without* the key counts as non-unique; an item whose value
   is ``null`` gives None; a repeated key keeps the last item). Each results record is joined on
   ``(record["image"], record["question"])``: a record whose flag is None (no such key in the table, or
   a ``null`` value) is skipped (``continue``) and counted in neither split; a truthy flag puts it in
   Unique, any other flag (``False``) in Non-unique. Each split's accuracy is
   ``count(iou > t) / len(split) * 100``; an empty split reports 0.0 over 0. So Unique + Non-unique may
   be fewer records than Overall: records without a flag count only in Overall.
5. Thresholds are ``[0.5, 0.7]``. Duplicate results records are each counted. An empty results list:
   upstream prints a warning and no numbers; we report 0.0 over 0.

:func:`score_results` reproduces steps 1–5 (:func:`recal_iou` is step 1, :func:`uniqueness_map` the table
of step 4). :func:`rec_scores` is the counting alone, over ``(iou, is_unique)`` pairs, which is how
records scored in this process are counted (their flag comes from our dataset record:
``ChipRecord.is_unique``, None when unknown). ``tests/train/test_metrics.py`` checks every number
against a literal transcription of the upstream counting on a fixed results file.

Parses (which box a model output gives), all in ``geo_r1_qgis.core.rules.parsing``:

- Geo-R1 mode: ``geo_r1_eval_box`` (the first ``<answer>``, then the greedy
  ``\\{.*\\[a, b, c, d]\\s*.*\\}``, i.e. the LAST box of the answer, as ints; else ``[0, 0, 0, 0]``).
- SFT-baseline mode: ``sft_baseline_box``, ``test_rec_baseline_eval.py``'s ``extract_bbox_answer``:
  the FIRST ``[a, b, c, d]`` anywhere (signed decimals, spaces allowed inside the brackets) as floats;
  else ``[0, 0, 0, 0]``.

No rescaling, reordering or clipping in either mode: the prediction is compared in the pixels the model
wrote. Our extension, reported beside it, is :func:`rescaled_iou`: the prediction scaled from the model's
``smart_resize`` frame back to the image (``geo_r1_qgis.core.rules.coords.model_to_image_box``), which only differs for
images whose sides are not multiples of 28. :func:`mean_iou` is our extension too (upstream reports none).

OVD: what Geo-R1's ``run_scripts/test_ovd_nwpu_eval.py`` does
------------------------------------------------------------
One query per (image, category present in the image), the OVD prompt without reasoning, greedy, 1024
new tokens. ``geo_r1_qgis.core.rules.parsing.ovd_eval_boxes`` is its (second, effective)
``extract_bboxes_from_response``, exactly (its docstring says how it reads a response).
Detections get score 1.0 and ``[x, y, w, h]`` with ``w = x2 - x1`` (no reordering), and COCOeval
("bbox") scores them against every true box. mAP is ``stats[0]`` (AP@[.5:.95]), AP50 ``stats[1]``;
per class, the mean of ``precision[t, :, k, 0, -1]`` over entries > -1 (0.0 when none), as upstream.
An empty prediction list scores 0 everywhere (upstream skips the evaluation; VLM-R1's
``ovd_coco_evaluation.py`` returns zeros).

**Image ids.** Every detection scores 1.0, so COCOeval ranks tied detections by image id (its images
in id order, then a stable sort by score): the ids change mAP, not only which boxes match. Upstream uses
the annotation file's COCO ids. :func:`coco_scores` uses the ``image_id`` each query carries (our results
records carry the dataset's, ``train.data_format.assign_image_ids``); a query without one is numbered by
:func:`ovd_image_ids`: the id another query of the same image has, else the next ids after the largest
given, in the sorted order of the image names. So re-scoring a shuffled file gives the same numbers, and
never depends on row positions. One image with two ids, one id on two images, or an (image, category)
queried twice (upstream asks each once) is refused. Queries missing from a results file are upstream's
misses (its truth is the whole annotation file); ``geo-r1 eval --data`` adds them (train/evaluate.py).

**The reasoning-mode rule (ours, reported separately).** Upstream's OVD prompt has no reasoning and its
parse reads the whole response; ``geo-r1 eval`` follows it in both modes. With the reasoning prompt,
brackets in ``<think>`` can then be taken for the answer: ``parsing.ovd_answer_region`` reads only the first
``<answer>`` region, and the evaluator scores those boxes beside upstream's numbers, never instead.

Odd REC records score as upstream scores them: anything but a 4-item list is IoU 0, and a box holding a
NaN gives upstream an IoU of nan, no hit at any threshold; :func:`recal_iou` returns 0.0 for it (the same
miss, and a mean IoU that stays a number). A value ``float()`` rejects (upstream crashes) or a record that
is not an object is refused with the record's number.

:func:`coco_map_single` is AP@[.5:.95] on one image, one category, all scores 1.0, as VLM-R1's
``calculate_map`` (``score_type=0``) computes it for its ``odLength`` reward; the reward decides what
empty lists score, and this function returns 0.0 when either list is empty.

This module imports the project's pure rules (coords, parsing) and the standard library.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geo_r1_qgis.core.errors import ConfigError
from geo_r1_qgis.core.rules.coords import geo_r1_iou, model_input_size, model_to_image_box
from geo_r1_qgis.core.rules.parsing import (  # the parses live in the rules; evaluate.py reads them here too
    geo_r1_eval_box,
    ovd_answer_region,
    ovd_eval_boxes,
    sft_baseline_box,
)

__all__ = [
    "GRES_THRESHOLDS",
    "MODES",
    "REC_THRESHOLDS",
    "Accuracy",
    "GresScores",
    "OvdQuery",
    "OvdScores",
    "RecResult",
    "RecScores",
    "coco_map_single",
    "coco_scores",
    "extract_rec_box",
    "finite_box",
    "geo_r1_mask_iou",
    "gres_scores",
    "lisa_iou",
    "mask_counts",
    "mean_iou",
    "ovd_answer_region",
    "ovd_eval_boxes",
    "ovd_image_ids",
    "read_results",
    "rec_scores",
    "recal_iou",
    "rescaled_iou",
    "score_rec",
    "score_results",
    "sft_baseline_box",
    "uniqueness_map",
]

#: Geo-R1's REC thresholds (strict ``>``).
REC_THRESHOLDS: tuple[float, ...] = (0.5, 0.7)
#: Evaluation modes: Geo-R1's reasoning prompt and parse, or the SFT baseline's.
MODES: tuple[str, ...] = ("geo-r1", "sft")

Box = Sequence[float]


# --------------------------------------------------------------------------------------------------
# REC: parses and IoU
# --------------------------------------------------------------------------------------------------


def finite_box(box: Any) -> tuple[float, ...] | None:
    """``box`` as a tuple when it is 4 finite numbers (bools excluded), else None."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return None
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        return None
    return tuple(box)


def extract_rec_box(text: str, mode: str = "geo-r1") -> tuple[float, float, float, float]:
    """The box a REC evaluation reads from a model output: Geo-R1's parse or the SFT baseline's."""
    if mode == "geo-r1":
        return geo_r1_eval_box(text)
    if mode == "sft":
        return sft_baseline_box(text)
    raise ConfigError(f"mode must be one of {MODES}, got {mode!r}: 'geo-r1' (reasoning) or 'sft' (baseline)")


def recal_iou(pred: Any, gt: Any) -> float:
    """``recal_rec_acc_unique.py``'s ``iou``: 0.0 unless both are 4-item lists, values as floats, then
    Geo-R1's IoU. Tuples count as lists (JSON only ever gives lists; our in-memory boxes are tuples)."""
    if not (isinstance(pred, (list, tuple)) and len(pred) == 4 and isinstance(gt, (list, tuple)) and len(gt) == 4):
        return 0.0
    try:
        a = [float(c) for c in pred]
        b = [float(c) for c in gt]
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"a box holds a value that is not a number ({exc}): prediction {list(pred)!r}, truth {list(gt)!r}; "
            "fix the results file"
        ) from None
    value = geo_r1_iou(a, b)
    # upstream: a NaN (or inf - inf) in a box gives an IoU of nan, and ``nan > t`` is False: a miss. 0.0 is
    # the same miss at every threshold, and keeps the mean IoU a number.
    return value if math.isfinite(value) else 0.0


def rescaled_iou(pred: Any, gt: Any, image_size: Sequence[int]) -> float:
    """Our extension: the IoU after scaling ``pred`` from the model's ``smart_resize`` frame to the image
    (``geo_r1_qgis.core.rules.coords.model_to_image_box``, which also clips it). Equals :func:`recal_iou` when the image
    sides are multiples of 28 (the model sees the image unresized). A box outside the image scores 0."""
    size = (int(image_size[0]), int(image_size[1]))
    model_size = model_input_size(size)
    if model_size == size:
        return recal_iou(pred, gt)
    if finite_box(pred) is None:  # not 4 finite numbers: no box (recal_iou's 0.0, or upstream's nan miss)
        return 0.0
    box = model_to_image_box([float(v) for v in pred], model_size, size)
    if box is None:
        return 0.0
    return recal_iou([box.x1, box.y1, box.x2, box.y2], gt)


# --------------------------------------------------------------------------------------------------
# REC: counting
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Accuracy:
    """``correct`` of ``total`` queries had IoU > the threshold; ``percent`` as upstream (0.0 when empty)."""

    correct: int
    total: int

    @property
    def percent(self) -> float:
        return self.correct / self.total * 100 if self.total > 0 else 0.0


@dataclass(frozen=True)
class RecScores:
    """Acc@t per threshold, Overall / Unique / Non-unique, and the mean IoU (ours) over all queries."""

    overall: Mapping[float, Accuracy]
    unique: Mapping[float, Accuracy]
    non_unique: Mapping[float, Accuracy]
    mean_iou: float
    n: int
    n_unique: int
    n_non_unique: int
    n_unflagged: int

    def to_json(self) -> dict[str, Any]:
        """``{"acc@0.5": {"overall": %, "unique": %, "non_unique": %}, …, "counts": …, "mean_iou"}``."""
        out: dict[str, Any] = {}
        for t in self.overall:
            out[f"acc@{t}"] = {
                "overall": self.overall[t].percent,
                "unique": self.unique[t].percent,
                "non_unique": self.non_unique[t].percent,
            }
            out[f"correct@{t}"] = {
                "overall": self.overall[t].correct,
                "unique": self.unique[t].correct,
                "non_unique": self.non_unique[t].correct,
            }
        out["counts"] = {
            "overall": self.n,
            "unique": self.n_unique,
            "non_unique": self.n_non_unique,
            "unflagged": self.n_unflagged,
        }
        out["mean_iou"] = self.mean_iou
        return out


def rec_scores(pairs: Iterable[tuple[float, bool | None]], thresholds: Sequence[float] = REC_THRESHOLDS) -> RecScores:
    """Count ``(iou, is_unique)`` pairs as ``recal_rec_acc_unique.py`` does (see the module docstring):
    Overall over every pair, Unique over truthy flags, Non-unique over other non-None flags, ``iou > t``."""
    pairs = [(float(iou), flag) for iou, flag in pairs]
    groups: dict[str, list[float]] = {"overall": [], "unique": [], "non_unique": []}
    unflagged = 0
    for iou, flag in pairs:
        groups["overall"].append(iou)
        if flag is None:
            unflagged += 1
        elif flag:
            groups["unique"].append(iou)
        else:
            groups["non_unique"].append(iou)

    def count(ious: list[float]) -> dict[float, Accuracy]:
        return {t: Accuracy(sum(1 for v in ious if v > t), len(ious)) for t in thresholds}

    return RecScores(
        overall=count(groups["overall"]),
        unique=count(groups["unique"]),
        non_unique=count(groups["non_unique"]),
        mean_iou=mean_iou(groups["overall"]),
        n=len(groups["overall"]),
        n_unique=len(groups["unique"]),
        n_non_unique=len(groups["non_unique"]),
        n_unflagged=unflagged,
    )


def mean_iou(ious: Iterable[float]) -> float:
    """Our extension: the mean IoU (failed parses count as 0); 0.0 for no queries."""
    values = list(ious)
    return sum(values) / len(values) if values else 0.0


@dataclass(frozen=True)
class RecResult:
    """One scored REC query: Geo-R1's results record, plus our keys (iou, is_unique, image_size…)."""

    image: str
    question: str
    ground_truth: tuple[float, ...]
    model_output: str
    extracted_answer: tuple[float, ...]
    iou: float
    is_unique: bool | None = None
    image_size: tuple[int, int] | None = None
    rescaled_iou: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def correct(self) -> int:
        """Geo-R1's ``correct``: 1 when IoU > 0.5."""
        return int(self.iou > 0.5)

    def to_json(self) -> dict[str, Any]:
        """Geo-R1's keys first (``image, question, ground_truth, model_output, extracted_answer,
        correct``), then ours."""
        out: dict[str, Any] = {
            "image": self.image,
            "question": self.question,
            "ground_truth": list(self.ground_truth),
            "model_output": self.model_output,
            "extracted_answer": list(self.extracted_answer),
            "correct": self.correct,
            "iou": self.iou,
            "is_unique": self.is_unique,
        }
        if self.image_size is not None:
            out["image_size"] = list(self.image_size)
        if self.rescaled_iou is not None:
            out["rescaled_iou"] = self.rescaled_iou
        out.update(self.extra)
        return out


def score_rec(
    items: Iterable[tuple[str, Sequence[float], bool | None]], mode: str = "geo-r1"
) -> tuple[RecScores, list[float]]:
    """Score ``(model_output, ground_truth, is_unique)`` triples: parse each output (``mode``), take the
    IoU with its truth and count. Returns the scores and the per-query IoUs."""
    ious, pairs = [], []
    for output, gt, flag in items:
        iou = recal_iou(list(extract_rec_box(output, mode)), list(gt))
        ious.append(iou)
        pairs.append((iou, flag))
    return rec_scores(pairs), ious


def uniqueness_map(eval_items: Iterable[Mapping[str, Any]]) -> dict[tuple[Any, Any], Any]:
    """``recal_rec_acc_unique.py``'s lookup table: ``(image, problem) -> item.get("is_unique", False)``
    (a missing key means non-unique; ``null`` stays None; a repeated key keeps the last item)."""
    table = {}
    for n, item in enumerate(eval_items, 1):
        if not isinstance(item, Mapping):
            raise ConfigError(f"item {n} of the unique file is not a JSON object ({str(item)[:80]})")
        key = (item.get("image"), item.get("problem"))
        try:
            table[key] = item.get("is_unique", False)
        except TypeError:  # an image or problem that is a list or an object: upstream crashes here
            raise ConfigError(f"item {n} of the unique file: image and problem must be text, got {key!r}") from None
    return table


def read_results(path: Path) -> dict[str, Any]:
    """A results file (``{"accuracy", "results": [...]}``), with a clear error when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"results file {path} does not exist; pass a *_results.json written by 'geo-r1 eval'"
        ) from None
    except ValueError as exc:
        raise ConfigError(f"results file {path} is not valid JSON ({exc}); pass a Geo-R1 results file") from None
    if not isinstance(data, dict) or not isinstance(data.get("results", []), list):
        raise ConfigError(f"{path} is not a Geo-R1 results file: expected {{'accuracy', 'results': [...]}}")
    return data


def score_results(
    results: Sequence[Mapping[str, Any]],
    with_unique: Iterable[Mapping[str, Any]] | None = None,
    thresholds: Sequence[float] = REC_THRESHOLDS,
) -> tuple[RecScores, list[float]]:
    """Re-score Geo-R1 results records exactly as ``recal_rec_acc_unique.py`` does: the IoU of
    ``extracted_answer`` against ``ground_truth`` (never re-parsed). The unique flag comes from joining
    ``with_unique`` (Geo-R1's ``…_with_unique.json`` items) on (image, question) when it is given, else
    from each record's own ``is_unique`` key (our results files carry it; missing means no flag)."""
    table = uniqueness_map(with_unique) if with_unique is not None else None
    ious, pairs = [], []
    for n, rec in enumerate(results, 1):
        if not isinstance(rec, Mapping):
            raise ConfigError(f"record {n} is not a JSON object ({str(rec)[:80]}); fix the results file")
        try:
            iou = recal_iou(rec.get("extracted_answer"), rec.get("ground_truth"))
        except ConfigError as exc:
            raise ConfigError(f"record {n} ({rec.get('image')}): {exc}") from None
        if table is not None:
            key = (rec.get("image"), rec.get("question"))
            try:
                flag = table.get(key)
            except TypeError:  # a list or an object: upstream crashes here
                raise ConfigError(f"record {n}: image and question must be text to join the unique file, "
                                  f"got {key!r}") from None  # fmt: skip
        else:
            flag = rec.get("is_unique")
        ious.append(iou)
        pairs.append((iou, flag))
    return rec_scores(pairs, thresholds), ious


# --------------------------------------------------------------------------------------------------
# OVD
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OvdQuery:
    """One OVD query: an image, a category, its true boxes and the predicted boxes (all xyxy).

    ``image_id`` is the image's COCO id (the dataset's), which decides how COCOeval ranks tied
    detections; None: numbered by :func:`ovd_image_ids` from the image's name."""

    image: str
    category: str
    gt_boxes: tuple[tuple[float, ...], ...]
    pred_boxes: tuple[tuple[float, ...], ...]
    image_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("gt_boxes", "pred_boxes"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"query {self.image} / {self.category}: {name} must be a list of boxes, "
                                  f"got {value!r}")  # fmt: skip
            boxes = []
            for b in value:
                box = finite_box(b)
                if box is None:
                    raise ConfigError(
                        f"query {self.image} / {self.category}: box {b!r} needs 4 values x1, y1, x2, y2, "
                        "each a finite number"
                    )
                boxes.append(box)
            object.__setattr__(self, name, tuple(boxes))
        if self.image_id is not None and (isinstance(self.image_id, bool) or not isinstance(self.image_id, int)):
            raise ConfigError(
                f"query {self.image} / {self.category}: image_id must be a whole number (the image's COCO id), "
                f"got {self.image_id!r}"
            )


def ovd_image_ids(queries: Iterable[OvdQuery]) -> dict[str, int]:
    """The COCO image id of every image of ``queries``: the ids the queries carry (the dataset's COCO
    ids); an image no query gives an id gets the next ids after the largest carried one, in the sorted
    order of the image names (stable under any reordering of the rows, never the row position). An image
    with two ids, or an id on two images, is refused."""
    ids: dict[str, int] = {}
    images: dict[int, str] = {}
    queries = list(queries)
    for q in queries:
        if q.image_id is None:
            continue
        if ids.get(q.image, q.image_id) != q.image_id:
            raise ConfigError(f"image {q.image} has image_id {ids[q.image]} and image_id {q.image_id}; "
                              "each image has one COCO id: fix the results file")  # fmt: skip
        if images.get(q.image_id, q.image) != q.image:
            raise ConfigError(f"images {images[q.image_id]} and {q.image} both have image_id {q.image_id}; "
                              "each image has its own COCO id: fix the results file")  # fmt: skip
        ids[q.image], images[q.image_id] = q.image_id, q.image
    nxt = max(ids.values(), default=0) + 1
    for name in sorted({q.image for q in queries} - ids.keys()):
        ids[name] = nxt
        nxt += 1
    return ids


@dataclass(frozen=True)
class OvdScores:
    """COCO AP@[.5:.95] (``mAP``) and AP50, overall and per category, as fractions in [0, 1]."""

    mAP: float
    AP50: float
    per_class: Mapping[str, Mapping[str, float]]
    n_queries: int
    n_gt: int
    n_pred: int

    def to_json(self) -> dict[str, Any]:
        """Percentages, as upstream prints them."""
        return {
            "mAP": self.mAP * 100,
            "AP50": self.AP50 * 100,
            "per_class": {k: {m: v * 100 for m, v in d.items()} for k, d in self.per_class.items()},
            "counts": {"queries": self.n_queries, "gt_boxes": self.n_gt, "pred_boxes": self.n_pred},
        }


def _xywh(b: Sequence[float]) -> list[float]:
    return [b[0], b[1], b[2] - b[0], b[3] - b[1]]


def _gt_annotation(ann_id: int, image_id: int, category_id: int, box: Sequence[float]) -> dict[str, Any]:
    """A COCO ground-truth box; its area is the box's, as in VLM-R1's ``calculate_map``."""
    xywh = _xywh(box)
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": xywh,
            "area": xywh[2] * xywh[3], "iscrowd": 0}  # fmt: skip


def _coco_eval(gt: dict[str, Any], dets: list[dict[str, Any]]) -> Any:
    """Run COCOeval ("bbox") on in-memory ground truth and detections, its chatter swallowed."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        coco_eval = COCOeval(coco_gt, coco_dt, "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def _mean_valid(values: Any) -> float:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else 0.0


def coco_scores(queries: Iterable[OvdQuery]) -> OvdScores:
    """COCO mAP and AP50 of OVD queries, as ``test_ovd_nwpu_eval.py`` computes them (scores 1.0, no
    rescaling; per class as its table), each image under its COCO id (:func:`ovd_image_ids`). Each
    (image, category) is queried once, as upstream does; a second query of one is refused. No detections
    at all: every number is 0.0."""
    queries = list(queries)
    image_ids = ovd_image_ids(queries)
    seen: dict[tuple[int, str], int] = {}
    for n, q in enumerate(queries, 1):
        key = (image_ids[q.image], q.category)
        if key in seen:
            raise ConfigError(f"queries {seen[key]} and {n} ask twice for {q.category!r} on image {q.image}; "
                              "Geo-R1 asks each (image, category) once: drop the repeated row")  # fmt: skip
        seen[key] = n
    categories = sorted({q.category for q in queries})
    cat_ids = {name: i + 1 for i, name in enumerate(categories)}
    gt: dict[str, Any] = {
        "images": [{"id": i, "file_name": name} for name, i in sorted(image_ids.items(), key=lambda kv: kv[1])],
        "categories": [{"id": cat_ids[c], "name": c} for c in categories],
        "annotations": [],
    }
    dets = []
    for q in queries:
        image_id = image_ids[q.image]
        for b in q.gt_boxes:
            gt["annotations"].append(_gt_annotation(len(gt["annotations"]) + 1, image_id, cat_ids[q.category], b))
        for b in q.pred_boxes:
            dets.append({"image_id": image_id, "category_id": cat_ids[q.category], "bbox": _xywh(b), "score": 1.0})
    n_gt, n_pred = len(gt["annotations"]), len(dets)
    if not dets or not gt["annotations"]:
        zero = {c: {"AP50": 0.0, "mAP": 0.0} for c in categories}
        return OvdScores(0.0, 0.0, zero, len(queries), n_gt, n_pred)
    ev = _coco_eval(gt, dets)
    precision = ev.eval["precision"]  # [T, R, K, A, M]
    per_class = {}
    for k, name in enumerate(categories):  # COCOeval's category axis: sorted ids, i.e. sorted names
        per_class[name] = {
            "AP50": _mean_valid(precision[0, :, k, 0, -1]),
            "mAP": _mean_valid(precision[:, :, k, 0, -1]),
        }
    m_ap, ap50 = float(ev.stats[0]), float(ev.stats[1])
    return OvdScores(max(m_ap, 0.0), max(ap50, 0.0), per_class, len(queries), n_gt, n_pred)


def coco_map_single(pred_boxes: Sequence[Box], gt_boxes: Sequence[Box]) -> float:
    """COCO AP@[.5:.95] of ``pred_boxes`` against ``gt_boxes`` on one image, one category, every score
    1.0 (VLM-R1's ``calculate_map``, ``score_type=0``). Boxes are ``[x1, y1, x2, y2]``. Returns 0.0 when
    either list is empty (what the reward gives "both empty" is the reward's business)."""
    if not pred_boxes or not gt_boxes:
        return 0.0
    for b in (*pred_boxes, *gt_boxes):
        if len(b) != 4 or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in b):
            raise ConfigError(f"box {list(b)!r} must be 4 finite numbers x1, y1, x2, y2")
    gt = {
        "images": [{"id": 1}],
        "categories": [{"id": 1, "name": "target"}],
        "annotations": [_gt_annotation(i + 1, 1, 1, b) for i, b in enumerate(gt_boxes)],
    }
    dets = [{"image_id": 1, "category_id": 1, "bbox": _xywh(b), "score": 1.0} for b in pred_boxes]
    return max(float(_coco_eval(gt, dets).stats[0]), 0.0)


# --------------------------------------------------------------------------------------------------
# GRES: gIoU and cIoU over masks
# --------------------------------------------------------------------------------------------------
#
# Three public definitions, read in their code (not copied); all three count the pixels of one query's
# predicted mask against its true mask, ``I`` (intersection) and ``U`` (union), and differ where ``U`` is 0
# (an empty truth answered with an empty mask):
#
# - **Geo-R1** (Geo-R1/geo-r1, ``run_scripts/test_gres_eval.py``, ``run_inference_and_calc_iou`` and
#   ``run_final_evaluation``): the answer's items (``parse_vlm_predictions_for_sam``) prompt SAM 2.1, each mask
#   is clipped to its box, the masks are OR-ed; no items (a "None", or nothing readable) is ``I = 0``,
#   ``U = |truth|``. The per-query IoU is ``I / U if U > 0 else 0``: an empty truth scores **0** whatever the
#   answer. gIoU is the mean of those over all queries, cIoU ``sum(I) / sum(U)`` (0 when ``sum(U)`` is 0);
#   both per category too.
# - **LISA** (dvlab-research/LISA, ``train_ds.py`` ``validate``, ``utils/utils.py`` ``intersectionAndUnionGPU``):
#   per mask ``I / (U + 1e-5)``, and ``+ 1.0`` where ``U`` is 0 ("no-object target"): an empty truth answered
#   with an empty mask scores **1**. gIoU is the mean over every mask of the set, cIoU
#   ``sum(I) / (sum(U) + 1e-10)``.
# - **EarthReason** (earth-insights/SegEarth-R1, ``segearth_r1/eval_and_test/eval.py`` ``compute_metric``):
#   LISA's counting, one mask per query (the best-scoring one where the model gives several), and Pr@t for t
#   in 0.5 ... 0.9: the share of queries whose (LISA) IoU is strictly above t.
#
# :func:`gres_scores` reports Geo-R1's gIoU and cIoU as the headline (they are the numbers of the paper's
# EarthReason-FS table) and LISA's / EarthReason's beside them, all from the same ``(I, U)`` per query, so a
# results file is re-scored from its counts without SAM. A query whose answer does not parse counts as
# Geo-R1 counts it (``I = 0``, ``U = |truth|``); in the LISA numbers it scores 0 even on an empty truth (our
# rule: a broken answer never scores; LISA has masks, not answers).

#: LISA's and EarthReason's epsilons: per-mask ``I / (U + 1e-5)``, cumulative ``sum I / (sum U + 1e-10)``.
LISA_IOU_EPS = 1e-5
CIOU_EPS = 1e-10
#: EarthReason's Pr@t thresholds (strict ``>``).
GRES_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)


def mask_counts(pred: Any, gt: Any) -> tuple[int, int]:
    """``(intersection, union)`` pixel counts of two boolean masks of the same shape (anything numpy
    reads as an array; non-zero is foreground)."""
    import numpy as np

    p, g = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    if p.shape != g.shape:
        raise ConfigError(f"a predicted mask of shape {p.shape} cannot be scored against a true mask of shape "
                          f"{g.shape}; both must be the chip's height x width")  # fmt: skip
    return int(np.count_nonzero(p & g)), int(np.count_nonzero(p | g))


def _check_counts(intersection: int, union: int) -> None:
    if union < 0 or intersection < 0 or intersection > union:
        raise ConfigError(f"mask counts must have 0 <= intersection <= union, got {intersection}, {union}")


def geo_r1_mask_iou(intersection: int, union: int) -> float:
    """One query's IoU as Geo-R1's ``test_gres_eval.py`` counts it: ``I / U``, and 0.0 when ``U`` is 0."""
    _check_counts(intersection, union)
    return intersection / union if union > 0 else 0.0


def lisa_iou(intersection: int, union: int) -> float:
    """One query's IoU as LISA and EarthReason count it: ``I / (U + 1e-5)``, and 1.0 when ``U`` is 0 (both
    masks empty)."""
    _check_counts(intersection, union)
    return 1.0 if union == 0 else intersection / (union + LISA_IOU_EPS)


@dataclass(frozen=True)
class GresScores:
    """Geo-R1's gIoU and cIoU (the headline), LISA's gIoU and cIoU, EarthReason's Pr@t; fractions in [0, 1]."""

    giou: float
    ciou: float
    lisa_giou: float
    lisa_ciou: float
    precision: Mapping[float, float]
    n: int
    n_empty_truth: int
    failed_parses: int
    intersection: int
    union: int

    def to_json(self) -> dict[str, Any]:
        """Percentages (×100), as the papers print them."""
        return {
            "gIoU": self.giou * 100,
            "cIoU": self.ciou * 100,
            "lisa": {"gIoU": self.lisa_giou * 100, "cIoU": self.lisa_ciou * 100,
                     **{f"Pr@{t}": v * 100 for t, v in self.precision.items()}},
            "counts": {"queries": self.n, "empty_truth": self.n_empty_truth, "failed_parses": self.failed_parses,
                       "intersection": self.intersection, "union": self.union},
        }  # fmt: skip


def gres_scores(
    counts: Iterable[tuple[int, int, int, bool]], thresholds: Sequence[float] = GRES_THRESHOLDS
) -> tuple[GresScores, list[float]]:
    """Score queries given as ``(intersection, union, truth_pixels, parsed)`` (see the comment above):
    Geo-R1's gIoU and cIoU, LISA's, and EarthReason's Pr@t. ``parsed`` False is an answer that did not parse;
    ``truth_pixels`` counts the queries with an empty truth. Returns the scores and the per-query IoUs
    (Geo-R1's). No queries: every number 0.0."""
    ious: list[float] = []
    lisa: list[float] = []
    total_i = total_u = empty = failed = 0
    for inter, union, truth, parsed in counts:
        inter, union, truth = int(inter), int(union), int(truth)
        if not 0 <= truth <= union:
            raise ConfigError(f"mask counts must have 0 <= truth pixels <= union, got {truth}, {union}")
        ious.append(geo_r1_mask_iou(inter, union))
        lisa.append(lisa_iou(inter, union) if parsed else 0.0)
        failed += not parsed
        empty += truth == 0
        total_i += inter
        total_u += union
    n = len(ious)
    scores = GresScores(
        giou=sum(ious) / n if n else 0.0,
        ciou=total_i / total_u if total_u > 0 else 0.0,
        lisa_giou=sum(lisa) / n if n else 0.0,
        lisa_ciou=total_i / (total_u + CIOU_EPS) if n else 0.0,
        precision={t: (sum(1 for v in lisa if v > t) / n if n else 0.0) for t in thresholds},
        n=n,
        n_empty_truth=empty,
        failed_parses=failed,
        intersection=total_i,
        union=total_u,
    )
    return scores, ious
