"""The rewards on literal model output (GEO-R1.md's samples and the edge cases)."""

from __future__ import annotations

import pytest

from train.rewards import (
    REWARDS,
    TASK_REWARDS,
    format_reward,
    iou_reward,
    length_penalty,
    od_length_reward,
    od_reward_one,
    od_sqrt_reward,
    ovd_format_reward,
    rescale_to_image,
)

GOOD = (
    '<think> The tank is at the top left. </think> <answer>{"bbox_2d": [199, 249, 245, 331], "label": "tank"}</answer>'
)


def msg(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (GOOD, 1.0),
        ('<think>x</think><answer>{"bbox_2d": [1, 2, 3, 4]}</answer>', 1.0),
        ('<think>x</think>\n\n<answer>[{"bbox_2d": [1,2,3,4]}]</answer>', 1.0),
        ("<think>x</think> <answer>[1, 2, 3, 4]</answer>", 0.0),  # no braces
        ('<answer>{"bbox_2d": [1, 2, 3, 4]}</answer>', 0.0),  # no think
        ('<think>x</think> <answer>{"bbox_2d": [1.5, 2, 3, 4]}</answer>', 0.0),  # decimals
        ('<think>x</think> <answer>{"bbox_2d": [1, 2, 3, 4]}', 0.0),  # truncated
        ("", 0.0),
    ],
)
def test_format_reward(text: str, want: float) -> None:
    assert format_reward([msg(text)]) == [want]
    assert format_reward([text]) == [want]  # plain strings too


def test_iou_reward_values() -> None:
    sol = [[199, 249, 245, 331]]
    # exact box -> 1; 112x112 chip is not resized
    assert iou_reward([msg(GOOD)], solution=[sol], image_size=[[504, 504]]) == [1.0]
    # half-overlap by hand: pred [0,0,10,10] vs gt [5,0,15,10]: inter cols 5..9 (5) x rows 0..9 (10) = 50,
    # union 100 + 100 - 50 = 150
    text = "<think>a</think><answer>{[0, 0, 10, 10]}</answer>"
    assert iou_reward([text], solution=[[[5, 0, 15, 10]]], image_size=[[112, 112]]) == [pytest.approx(1 / 3)]
    # no answer, no box, or a degenerate box: 0
    assert iou_reward(["no answer"], solution=[sol]) == [0.0]
    assert iou_reward(["<answer>None</answer>"], solution=[sol]) == [0.0]
    assert iou_reward(["<answer>[3, 3, 3, 3]</answer>"], solution=[[[3, 3, 3, 3]]]) == [0.0]
    # a flat solution box is accepted too
    assert iou_reward([GOOD], solution=[[199, 249, 245, 331]]) == [1.0]


def test_iou_reward_rescales_from_the_model_frame() -> None:
    # a 100x130 image is seen as 112x140 (smart_resize); the model answers in that frame
    assert rescale_to_image([112, 140, 112, 140], (100, 130)) == pytest.approx((100, 130, 100, 130))
    gt = [10, 13, 60, 91]
    model_box = [round(10 * 112 / 100), round(13 * 140 / 130), round(60 * 112 / 100), round(91 * 140 / 130)]
    text = f"<think>t</think><answer>{model_box}</answer>"
    with_rescale = iou_reward([text], solution=[[gt]], image_size=[[100, 130]])[0]
    without = iou_reward([text], solution=[[gt]])[0]
    assert with_rescale > 0.95
    assert without < with_rescale - 0.1


def test_iou_reward_is_identity_on_multiples_of_28() -> None:
    text = "<think>t</think><answer>[28, 28, 84, 56]</answer>"
    assert iou_reward([text], solution=[[[28, 28, 84, 56]]], image_size=[[112, 112]]) == [1.0]


FENCED = '<think>t</think> <answer>```json\n[\n    {"bbox_2d": [0, 0, 10, 10], "label": "car"}\n]\n```</answer>'


def test_ovd_reward_none_cases() -> None:
    assert od_reward_one("<think>t</think><answer>None</answer>", []) == 1.0
    assert od_reward_one("<think>t</think><answer>None</answer>", [[0, 0, 10, 10]]) == 0.0
    assert od_reward_one(FENCED, []) == 0.0  # one side empty
    assert od_reward_one("no answer at all", []) == 0.0
    assert od_reward_one("<answer>garbage</answer>", [[0, 0, 10, 10]]) == 0.0
    empty = "<answer>```json\n[]\n```</answer>"
    assert od_reward_one(empty, []) == 1.0  # both lists empty


def test_ovd_reward_takes_the_last_answer() -> None:
    text = "<answer>None</answer> " + FENCED
    assert od_reward_one(text, [[0, 0, 10, 10]]) == pytest.approx(1.0)
    assert od_length_reward([msg(FENCED)], solution=[[[0, 0, 10, 10]]]) == [pytest.approx(1.0)]


def test_ovd_length_penalty() -> None:
    assert length_penalty(2, 1) == 1.0
    assert length_penalty(2, 2) == 1.0
    assert length_penalty(1, 4) == 0.25
    assert length_penalty(1, 4, sqrt=True) == 0.5
    two = (
        '<answer>```json\n[{"bbox_2d": [0, 0, 10, 10], "label": "car"}, '
        '{"bbox_2d": [50, 50, 60, 60], "label": "car"}]\n```</answer>'
    )
    # one true box found exactly + one false positive: AP 1.0 (all scores equal, the match ranks first
    # or second; COCO's interpolated precision at recall 1 is 0.5 when the false positive comes first),
    # times the penalty 1/2 (linear) or sqrt(1/2)
    linear = od_length_reward([two], solution=[[[0, 0, 10, 10]]])[0]
    root = od_sqrt_reward([two], solution=[[[0, 0, 10, 10]]])[0]
    assert 0 < linear < root <= 1
    assert root / linear == pytest.approx(2**0.5)


def test_ovd_format_reward() -> None:
    assert ovd_format_reward([FENCED.replace("</think> ", "</think>")]) == [1.0]
    assert ovd_format_reward(["<think>t</think><answer>None</answer> trailing"]) == [0.0]


def test_registry() -> None:
    from train.rewards import MASK_REWARDS

    assert set(TASK_REWARDS) == {"rec", "multi", "gres"}
    for names in TASK_REWARDS.values():
        for name in names:
            assert callable(MASK_REWARDS[name] if name in MASK_REWARDS else REWARDS[name])  # built with a SAM
    assert REWARDS["format"] is format_reward
    assert REWARDS["iou"] is iou_reward
