"""The GRES reward (train/rewards.py) on literal completions, through the real tiny SAM 2 (engine/runtime/tiny_sam.py).

A random SAM's masks are noise shaped by the prompts, so the tests check what holds whatever its weights: the
clip to each box (a box away from the object scores exactly 0), the OR of the masks, the counts against the
rasterised outline, "None" and unreadable answers, and that the trl-facing class gives the same numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.runtime.sam import MaskPrompt, SamMasker
from geo_r1_qgis.core.rules.gres_truth import truth_mask
from train.metrics import lisa_iou, mask_counts
from train.rewards import MASK_REWARDS, TASK_REWARDS, GresMaskReward, gres_mask_iou, gres_pred_mask

SIZE = 112  # a chip: a multiple of 28, so the model's frame is the chip's
#: one object's outline (one polygon of one ring): a 40 x 30 rectangle at (20, 30); a second object at (70, 70)
RECT = [[[[20, 30], [60, 30], [60, 60], [20, 60]]]]
OTHER = [[[[70, 70], [100, 70], [100, 100], [70, 100]]]]


@pytest.fixture(scope="module")
def masker(tiny_sam_dir: Path) -> SamMasker:
    return SamMasker.load(tiny_sam_dir)


@pytest.fixture(scope="module")
def chip() -> Image.Image:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 60, (SIZE, SIZE, 3), dtype=np.uint8)
    rgb[30:60, 20:60] = (200, 60, 50)  # the object, bright
    return Image.fromarray(rgb, "RGB")


def answer(*items: tuple[list[int], list[int], list[int]]) -> str:
    body = ",\n    ".join(
        f'{{"bbox_2d": {json.dumps(b)}, "keypoint1": {json.dumps(k1)}, "keypoint2": {json.dumps(k2)}}}'
        for b, k1, k2 in items
    )
    return f"<think> The building is on the left. </think> <answer>```json\n[\n    {body}\n]\n```</answer>"


def expected_iou(masker: SamMasker, chip: Image.Image, prompts: list[MaskPrompt], objects: list) -> float:
    """The reward computed by hand: the masker's masks OR-ed, against the rasterised outlines."""
    rgb = np.asarray(chip)
    pred = np.zeros((SIZE, SIZE), dtype=bool)
    for m in masker.masks(rgb, prompts):
        pred |= m
    return lisa_iou(*mask_counts(pred, truth_mask(objects, (SIZE, SIZE))))


def test_a_box_on_the_object_scores_the_clipped_masks_iou(masker, chip):
    text = answer(([20, 30, 60, 60], [40, 45], [30, 50]))
    got = gres_mask_iou(text, [RECT], chip, masker, (SIZE, SIZE))
    want = expected_iou(masker, chip, [MaskPrompt((20, 30, 60, 60), ((40, 45), (30, 50)))], [RECT])
    assert got == want
    # the mask is clipped to the box, which is the object: the IoU is its share of the object's 1200 pixels
    pred = gres_pred_mask(((_item([20, 30, 60, 60], [40, 45], [30, 50])),), np.asarray(chip), masker)
    assert not pred[:30].any() and not pred[60:].any() and not pred[:, :20].any() and not pred[:, 60:].any()
    assert pred.any(), "the tiny SAM drew nothing: the test proves nothing"
    assert got == pytest.approx(pred.sum() / 1200, abs=1e-6)


def test_a_box_away_from_the_object_scores_zero(masker, chip):
    # whatever SAM draws, the clip keeps it inside the box, which misses the object
    text = answer(([70, 0, 110, 25], [90, 10], [80, 20]))
    assert gres_mask_iou(text, [RECT], chip, masker, (SIZE, SIZE)) == 0.0
    pred = gres_pred_mask((_item([70, 0, 110, 25], [90, 10], [80, 20]),), np.asarray(chip), masker)
    assert pred.any() and not pred[25:].any() and not pred[:, :70].any()  # a mask, inside its box


def test_two_items_are_ored_against_two_objects(masker, chip):
    text = answer(([20, 30, 60, 60], [40, 45], [30, 50]), ([70, 70, 100, 100], [85, 85], [75, 95]))
    got = gres_mask_iou(text, [RECT, OTHER], chip, masker, (SIZE, SIZE))
    prompts = [MaskPrompt((20, 30, 60, 60), ((40, 45), (30, 50))), MaskPrompt((70, 70, 100, 100), ((85, 85), (75, 95)))]
    assert got == expected_iou(masker, chip, prompts, [RECT, OTHER])
    # only the first object answered: the second's pixels stay in the union
    first = gres_mask_iou(answer(([20, 30, 60, 60], [40, 45], [30, 50])), [RECT, OTHER], chip, masker)
    assert first == expected_iou(masker, chip, prompts[:1], [RECT, OTHER])


@pytest.mark.parametrize(
    ("text", "objects", "reward"),
    [
        ("<think> No building here. </think> <answer>None</answer>", [], 1.0),  # right: nothing there
        ("<think> No building here. </think> <answer>None</answer>", [RECT], 0.0),  # missed the object
        ("<think> hmm </think> <answer>a building, I think</answer>", [], 0.0),  # unreadable: never scores
        ("<think> hmm </think> <answer>a building, I think</answer>", [RECT], 0.0),
        ('<think> t </think> <answer>[{"bbox_2d": [20, 30, 60, 60]}]</answer>', [RECT], 0.0),  # no keypoints
    ],
)
def test_none_and_unreadable_answers(masker, chip, text, objects, reward):
    assert gres_mask_iou(text, objects, chip, masker, (SIZE, SIZE)) == reward


def test_a_reversed_box_gives_no_mask(masker, chip):
    # upstream's clip of a box written x2 < x1 keeps nothing; here it is never sent to SAM
    assert gres_mask_iou(answer(([60, 30, 20, 60], [40, 45], [30, 50])), [RECT], chip, masker) == 0.0


def test_a_mask_on_a_chip_without_objects(masker, chip):
    # false pixels against an empty truth: I = 0, U = the mask's pixels, so 0; an empty mask would be U = 0: 1
    pred = gres_pred_mask((_item([20, 30, 60, 60], [40, 45], [30, 50]),), np.asarray(chip), masker)
    got = gres_mask_iou(answer(([20, 30, 60, 60], [40, 45], [30, 50])), [], chip, masker)
    assert got == (0.0 if pred.any() else 1.0)


def test_the_trl_reward_reads_the_dataset_columns(masker, chip):
    reward = MASK_REWARDS["gres_mask"](masker)
    assert isinstance(reward, GresMaskReward) and reward.__name__ == "gres_mask_reward"
    assert TASK_REWARDS["gres"] == ("ovd_format", "gres_mask")
    texts = [answer(([20, 30, 60, 60], [40, 45], [30, 50])), "<think> t </think> <answer>None</answer>",
             "<think> t </think> <answer>None</answer>"]  # fmt: skip
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    outlines = [json.dumps([RECT]), json.dumps([RECT]), json.dumps([])]  # the trainer's column: JSON text
    got = reward(completions, image=[chip] * 3, outlines=outlines, image_size=[[SIZE, SIZE]] * 3, solution=[[]] * 3)
    assert got == [gres_mask_iou(texts[0], [RECT], chip, masker, (SIZE, SIZE)), 0.0, 1.0]


def _item(box, k1, k2):
    from geo_r1_qgis.core.rules.parsing import GresItem

    return GresItem(tuple(box), (tuple(k1), tuple(k2)))


def test_a_group_on_one_chip_shares_one_sam_call(tiny_sam_dir, chip):
    """GRPO's completions of one prompt share its chip: one SAM call (one image encoding) for all of them, and
    the same rewards as scoring each completion alone."""

    class Counting(SamMasker):
        calls = 0

        def masks(self, rgb, prompts):
            Counting.calls += 1
            return super().masks(rgb, prompts)

    base = SamMasker.load(tiny_sam_dir)
    counting = Counting(base.model, base.source, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), base.device)
    texts = [
        answer(([20, 30, 60, 60], [40, 45], [30, 50])),
        answer(([18, 28, 62, 62], [35, 40], [50, 55]), ([70, 70, 100, 100], [85, 85], [75, 95])),
        "<think> t </think> <answer>None</answer>",
        "not an answer",
    ]
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    other = Image.fromarray(np.asarray(chip)[::-1].copy())  # a second chip: a second call
    images = [chip, chip, chip, chip, other]
    completions.append([{"role": "assistant", "content": texts[0]}])
    outlines = [json.dumps([RECT])] * 5
    got = GresMaskReward(counting)(completions, image=images, outlines=outlines, image_size=[[SIZE, SIZE]] * 5)
    assert Counting.calls == 2
    alone = [gres_mask_iou(t, [RECT], im, base, (SIZE, SIZE)) for t, im in zip([*texts, texts[0]], images, strict=True)]
    assert got == alone  # the decoder's batch does not change a prompt's mask
    assert got[2] == got[3] == 0.0 and got[0] > 0 and got[1] > 0
