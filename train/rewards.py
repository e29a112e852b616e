"""Geo-R1's rewards: pure functions over completions, one dict from name to function.

Every reward follows trl's signature, ``reward(completions, **columns) -> list[float]``: ``completions``
are chat message lists (``[{"role": "assistant", "content": "<think>…"}]``) or plain strings, and every
dataset column arrives as a keyword argument (a list, one value per completion). The columns used here
are those the trainer builds from the dataset (``train/data_format.py``):

- ``solution``: the true boxes, a list of ``[x1, y1, x2, y2]`` in original-image (chip) pixels;
- ``image_size``: ``[width, height]`` of the original image.

The rules themselves live once, in ``geo_r1_qgis.core.rules``: the format regex (``parsing.format_ok``), what
the rewards read (``parsing.vlm_r1_reward_box``; ``parsing.vlm_r1_od_answer`` and ``vlm_r1_fenced_boxes``),
Geo-R1's IoU (``coords.geo_r1_iou``) and VLM-R1's ``resize_bbox`` out of Qwen's ``smart_resize`` frame
(``coords.rescale_to_image``; that frame, ``coords.model_input_size``, equals ``image_grid_thw[1:] * 14``).

Total reward = format + metric, unweighted (maximum 2), as in GEO-R1.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from geo_r1_qgis.core.rules.coords import geo_r1_iou, rescale_to_image
from geo_r1_qgis.core.rules.parsing import format_ok, vlm_r1_fenced_boxes, vlm_r1_od_answer, vlm_r1_reward_box

RewardFn = Callable[..., list[float]]


def completion_text(completion: Any) -> str:
    """The text of one completion: a plain string, or the content of the first message."""
    if isinstance(completion, str):
        return completion
    try:
        content = completion[0]["content"]
    except (IndexError, KeyError, TypeError):
        return ""
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


# --------------------------------------------------------------------------------------------------
# REC
# --------------------------------------------------------------------------------------------------


def format_reward(completions: Sequence[Any], **_: Any) -> list[float]:
    """Geo-R1's REC format reward: 1.0 when ``REC_FORMAT_PATTERN`` is found (``re.search``, DOTALL), else 0.0."""
    return [1.0 if format_ok(completion_text(c), "rec") else 0.0 for c in completions]


def rec_iou(text: str, solution: Sequence[int], image_size: Sequence[int] | None = None) -> float:
    """The REC metric for one completion: Geo-R1's IoU of the first box in the first ``<answer>`` (after
    rescaling from the model's frame when ``image_size`` is given) against ``solution``; 0.0 when no box."""
    box = vlm_r1_reward_box(text)
    if box is None:
        return 0.0
    pred = rescale_to_image(box, image_size) if image_size is not None else box
    return geo_r1_iou(pred, solution)


def iou_reward(
    completions: Sequence[Any],
    solution: Sequence[Any],
    image_size: Sequence[Sequence[int]] | None = None,
    **_: Any,
) -> list[float]:
    """VLM-R1's REC accuracy reward: the continuous IoU, no threshold.

    ``solution[i]`` is the true box, or a one-box list ``[[x1, y1, x2, y2]]`` (our dataset column).
    """
    out = []
    for i, c in enumerate(completions):
        sol = _one_box(solution[i])
        size = image_size[i] if image_size is not None else None
        out.append(rec_iou(completion_text(c), sol, size) if sol is not None else 0.0)
    return out


def _one_box(sol: Any) -> list[float] | None:
    if sol is None or len(sol) == 0:
        return None
    if isinstance(sol[0], (list, tuple)):
        return list(sol[0])
    return list(sol)


# --------------------------------------------------------------------------------------------------
# OVD (multi-target)
# --------------------------------------------------------------------------------------------------


def ovd_format_reward(completions: Sequence[Any], **_: Any) -> list[float]:
    """The generic format reward: ``re.fullmatch(r"<think>.*?</think>\\s*<answer>.*?</answer>", DOTALL)``."""
    return [1.0 if format_ok(completion_text(c), "multi") else 0.0 for c in completions]


def length_penalty(n_gt: int, n_pred: int, sqrt: bool = False) -> float:
    """VLM-R1's ``odLength`` penalty, ``1 if n_gt >= n_pred else n_gt / n_pred``; with ``sqrt``, the
    paper's Eq. 6, ``min(1, sqrt(n_gt / n_pred))``."""
    if n_pred <= n_gt:
        return 1.0
    ratio = n_gt / n_pred
    return min(1.0, math.sqrt(ratio)) if sqrt else ratio


def od_reward_one(text: str, gt_boxes: Sequence[Sequence[int]], image_size: Sequence[int] | None = None,
                  sqrt: bool = False) -> float:  # fmt: skip
    """The OVD metric for one completion, as GEO-R1.md describes VLM-R1's ``odLength``.

    The LAST ``<answer>`` block (none: 0). Both sides "None": 1. Otherwise the last fenced json block on
    the prediction's side (our ground truth is a box list already; an empty list is "None"). Both empty: 1;
    exactly one empty: 0; else COCO AP@[.5:.95] on one image (scores 1.0) times the length penalty.
    Where GEO-R1.md is silent, our choice: a prediction that is neither "None" nor a parseable fenced
    json list scores 0.
    """
    answer = vlm_r1_od_answer(text)
    if answer is None:
        return 0.0
    gt = [list(b) for b in gt_boxes]
    if answer == "None":
        return 1.0 if not gt else 0.0
    pred = vlm_r1_fenced_boxes(answer)
    if pred is None:
        return 0.0
    if image_size is not None:
        pred = [list(rescale_to_image(b, image_size)) for b in pred]
    if not pred and not gt:
        return 1.0
    if not pred or not gt:
        return 0.0
    from train.metrics import coco_map_single

    return coco_map_single(pred, gt) * length_penalty(len(gt), len(pred), sqrt)


def od_length_reward(completions: Sequence[Any], solution: Sequence[Any],
                     image_size: Sequence[Sequence[int]] | None = None, **_: Any) -> list[float]:  # fmt: skip
    """VLM-R1's ``odLength`` reward (linear length penalty)."""
    return [
        od_reward_one(completion_text(c), solution[i] or [], image_size[i] if image_size is not None else None)
        for i, c in enumerate(completions)
    ]


def od_sqrt_reward(completions: Sequence[Any], solution: Sequence[Any],
                   image_size: Sequence[Sequence[int]] | None = None, **_: Any) -> list[float]:  # fmt: skip
    """The paper's Eq. 6: the square-root length penalty."""
    return [
        od_reward_one(completion_text(c), solution[i] or [], image_size[i] if image_size is not None else None,
                      sqrt=True)
        for i, c in enumerate(completions)
    ]


#: name -> reward function; the trainer's ``reward_funcs`` are names from here.
REWARDS: dict[str, RewardFn] = {
    "format": format_reward,
    "iou": iou_reward,
    "ovd_format": ovd_format_reward,
    "od_length": od_length_reward,
    "od_sqrt": od_sqrt_reward,
}

#: The rewards of each task, as in Geo-R1 (format + metric).
TASK_REWARDS: dict[str, tuple[str, ...]] = {
    "rec": ("format", "iou"),
    "multi": ("ovd_format", "od_length"),
}
