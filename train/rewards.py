"""Geo-R1's rewards: pure functions over completions, one dict from name to function.

Every reward follows trl's signature, ``reward(completions, **columns) -> list[float]``: ``completions``
are chat message lists (``[{"role": "assistant", "content": "<think>…"}]``) or plain strings, and every
dataset column arrives as a keyword argument (a list, one value per completion). The columns used here
are those the trainer builds from the dataset (``train/data_format.py``):

- ``solution``: the true boxes, a list of ``[x1, y1, x2, y2]`` in original-image (chip) pixels;
- ``image_size``: ``[width, height]`` of the original image;
- ``image`` and ``outlines`` (gres): the chip, and each object's outline in chip pixels.

The rules themselves live once, in ``geo_r1_qgis.core.rules``: the format regex (``parsing.format_ok``), what
the rewards read (``parsing.vlm_r1_reward_box``; ``parsing.vlm_r1_od_answer`` and ``vlm_r1_fenced_boxes``),
Geo-R1's IoU (``coords.geo_r1_iou``) and VLM-R1's ``resize_bbox`` out of Qwen's ``smart_resize`` frame
(``coords.rescale_to_image``; that frame, ``coords.model_input_size``, equals ``image_grid_thw[1:] * 14``).

Total reward = format + metric, unweighted (maximum 2), as in GEO-R1.md. The GRES metric needs a frozen SAM:
:class:`GresMaskReward` holds one (``MASK_REWARDS``; the trainer builds it with ``--sam``).
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
        od_reward_one(
            completion_text(c), solution[i] or [], image_size[i] if image_size is not None else None, sqrt=True
        )
        for i, c in enumerate(completions)
    ]


# --------------------------------------------------------------------------------------------------
# GRES (boxes + keypoints -> masks through a frozen SAM)
# --------------------------------------------------------------------------------------------------


def _point(p: Sequence[float], image_size: Sequence[int] | None) -> tuple[float, float]:
    if image_size is None:
        return (float(p[0]), float(p[1]))
    x, y, _, _ = rescale_to_image((p[0], p[1], p[0], p[1]), image_size)
    return (x, y)


def _rgb(image: Any) -> Any:
    import numpy as np

    if hasattr(image, "convert"):  # PIL, as trl hands the dataset's image column
        image = image.convert("RGB")
    rgb = np.asarray(image)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"the GRES reward needs the chip as an RGB image, got an array of {rgb.dtype} {rgb.shape}")
    return rgb


def gres_prompts(items: Sequence[Any], image_size: Sequence[int] | None = None) -> list[Any]:
    """The SAM prompts of a parsed GRES answer (``parsing.gres_answer``'s items): each item's box and keypoints
    (``engine.runtime.sam.MaskPrompt``). A box written with reversed corners is left out: upstream's clip of such
    a box keeps nothing. With ``image_size``, boxes and points are first rescaled from the model's frame
    (VLM-R1's ``resize_bbox``; the identity for chips whose sides are multiples of 28); without it they are used
    as written (Geo-R1's evaluation)."""
    from engine.runtime.sam import MaskPrompt

    prompts = []
    for it in items:
        box = rescale_to_image(it.box, image_size) if image_size is not None else tuple(it.box)
        if box[0] > box[2] or box[1] > box[3]:
            continue
        prompts.append(MaskPrompt(box, tuple(_point(p, image_size) for p in it.points)))
    return prompts


def _union(masks: Sequence[Any], shape: tuple[int, int]) -> Any:
    import numpy as np

    pred = np.zeros(shape, dtype=bool)
    for m in masks:
        pred |= np.asarray(m, dtype=bool)
    return pred


def gres_pred_mask(items: Sequence[Any], rgb: Any, masker: Any, image_size: Sequence[int] | None = None) -> Any:
    """The predicted mask of a parsed GRES answer on the chip ``rgb``: its prompts (:func:`gres_prompts`) through
    the frozen SAM ``masker`` (which clips each mask to its box, Eq. 7, as Geo-R1's ``clip_mask_to_bbox``), the
    masks OR-ed."""
    prompts = gres_prompts(items, image_size)
    return _union(masker.masks(rgb, prompts) if prompts else (), rgb.shape[:2])


def gres_mask_iou(text: str, outlines: Sequence[Any], image: Any, masker: Any,
                  image_size: Sequence[int] | None = None) -> float:  # fmt: skip
    """The GRES metric of one completion (Eq. 7): :func:`gres_pred_mask` of its answer against the true mask
    (``outlines`` rasterised by ``geo_r1_qgis.core.rules.gres_truth.truth_mask``), the IoU counted as LISA counts
    one sample (``train.metrics.lisa_iou``, the per-sample term of Eq. 7's gIoU): "None" (no items) scores 1
    on a chip with no object and 0 on one with objects; an answer that does not parse scores 0."""
    from geo_r1_qgis.core.rules.gres_truth import truth_mask
    from geo_r1_qgis.core.rules.parsing import gres_answer
    from train.metrics import lisa_iou, mask_counts

    items = gres_answer(text)
    if items is None:
        return 0.0
    rgb = _rgb(image)
    truth = truth_mask(outlines, (rgb.shape[1], rgb.shape[0]))
    return lisa_iou(*mask_counts(gres_pred_mask(items, rgb, masker, image_size), truth))


class GresMaskReward:
    """The GRES reward function for trl (``reward(completions, **columns)``), holding the frozen SAM masker
    (``engine.runtime.sam.SamMasker``) it prompts: one value per completion, :func:`gres_mask_iou`.

    Columns: ``image`` (the chip, PIL), ``outlines`` (each object's outline in chip pixels, as JSON text or
    lists; ``train/data_format.py``) and ``image_size``.

    How it differs from Geo-R1's Eq. 7 (GEO-R1.md): Eq. 7 is stated over a batch, as the mask gIoU (the mean
    of per-sample IoUs, LISA's); per completion that mean is the completion's own IoU, which is what this
    returns, so the group's mean reward is the group's gIoU. Geo-R1 publishes no training code for it; its
    evaluation (``test_gres_eval.py``) reads the answer as ``parsing.gres_answer`` does, prompts SAM 2.1 with
    each box and both keypoints, clips each mask to its box and OR-es them, as here. Where they differ: that
    evaluation scores an empty truth 0 whatever the answer (``I / U if U > 0 else 0``); this reward takes LISA's
    rule, 1 for "None" on a chip with no object (else GRPO could never learn to answer None), and 0 for a
    completion that does not parse.

    How it differs from Think2Seg-RS (``src/open-r1-multimodal/src/open_r1/geo_reward_func_ultra.py``,
    ``sam_reward_func_ultra``, read, not copied): there, each item's box and exactly two
    ``"positive_points"`` prompt SAM 2.1 (``multimask_output=False``), the masks are OR-ed **without clipping
    to the box**, and the IoU of the union with the truth is the reward, weighted by 2 (clipped to [0, 2]);
    items are de-duplicated by box NMS (IoU > 0.5, larger box kept) first, the answer must sit in a fenced
    ```json block (``json_repair`` mends broken JSON), an empty truth scores 1 only for an empty list, and a
    non-empty answer whose union is empty scores 0 (``union > 0`` else 0). Here each mask is clipped to its
    box (Eq. 7), the keys are Geo-R1's ``keypoint1``/``keypoint2``, there is no NMS, no JSON repair and no
    weight (format + metric, each at most 1, as Geo-R1's other tasks), and the IoU carries LISA's 1e-5 in
    the denominator, so the reward equals the evaluation's per-query IoU.
    """

    def __init__(self, masker: Any) -> None:
        self.masker = masker
        self.__name__ = "gres_mask_reward"  # trl names the reward's log keys after it

    def __call__(self, completions: Sequence[Any], image: Sequence[Any], outlines: Sequence[Any],
                 image_size: Sequence[Sequence[int]] | None = None, **_: Any) -> list[float]:  # fmt: skip
        """:func:`gres_mask_iou` of every completion; the completions of one chip (a GRPO group) share one SAM
        call, so its image encoder runs once per chip, not once per completion."""
        import hashlib
        import json

        from geo_r1_qgis.core.rules.gres_truth import truth_mask
        from geo_r1_qgis.core.rules.parsing import gres_answer
        from train.metrics import lisa_iou, mask_counts

        out = [0.0] * len(completions)
        chips: dict[bytes, tuple[Any, list[tuple[int, list[Any]]]]] = {}
        for i, c in enumerate(completions):
            items = gres_answer(completion_text(c))
            if items is None:
                continue  # unreadable: 0
            rgb = _rgb(image[i])
            key = hashlib.sha1(rgb.tobytes() + repr(rgb.shape).encode()).digest()
            size = image_size[i] if image_size is not None else None
            chips.setdefault(key, (rgb, []))[1].append((i, gres_prompts(items, size)))
        for rgb, members in chips.values():
            prompts = [p for _, ps in members for p in ps]
            masks = self.masker.masks(rgb, prompts) if prompts else []
            start = 0
            for i, ps in members:
                objects = json.loads(outlines[i]) if isinstance(outlines[i], str) else outlines[i]
                truth = truth_mask(objects or [], (rgb.shape[1], rgb.shape[0]))
                pred = _union(masks[start : start + len(ps)], truth.shape)
                start += len(ps)
                out[i] = lisa_iou(*mask_counts(pred, truth))
        return out


#: name -> reward function; the trainer's ``reward_funcs`` are names from here.
REWARDS: dict[str, RewardFn] = {
    "format": format_reward,
    "iou": iou_reward,
    "ovd_format": ovd_format_reward,
    "od_length": od_length_reward,
    "od_sqrt": od_sqrt_reward,
}

#: name -> reward class built with the frozen SAM masker (``TrainConfig.sam``): the rewards that need masks.
MASK_REWARDS: dict[str, Callable[[Any], RewardFn]] = {
    "gres_mask": GresMaskReward,
}

#: The rewards of each task, as in Geo-R1 (format + metric). GRES has no published format reward: it takes the
#: generic think/answer format, as VLM-R1's detection task does.
TASK_REWARDS: dict[str, tuple[str, ...]] = {
    "rec": ("format", "iou"),
    "multi": ("ovd_format", "od_length"),
    "gres": ("ovd_format", "gres_mask"),
}
