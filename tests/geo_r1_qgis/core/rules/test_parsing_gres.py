"""gres_answer (geo_r1_qgis/core/rules/parsing.py) on literal GRES completions, and GresItem's checks."""

from __future__ import annotations

import json
import re

import pytest

from geo_r1_qgis.core.rules.parsing import FENCED_JSON_PATTERN, GRES_ARRAY_PATTERN, GresItem, gres_answer

FENCE = "```"

# A completion as Geo-R1's GRES prompt asks for it: reasoning, then a fenced list of box + two keypoints.
TWO_TANKS = (
    "<think> The question asks for the storage tanks beside the road. I see two round white tanks "
    "in the lower left. </think>\n<answer>\n"
    f"{FENCE}json\n[\n"
    '    {"bbox_2d": [35, 280, 112, 356], "keypoint1": [73, 318], "keypoint2": [60, 300]},\n'
    '    {"bbox_2d": [120, 290, 190, 360], "keypoint1": [155, 325], "keypoint2": [150.5, 340]}\n'
    f"]\n{FENCE}\n</answer>"
)


def upstream_parse(content: str) -> list:
    """Geo-R1 test_gres_eval.py's parse_vlm_predictions_for_sam, re-stated here from its text, to compare."""
    json_str = None
    m = re.search(r"```json\s*(.*?)\s*```", content, re.DOTALL)
    if m:
        json_str = m.group(1).strip()
    else:
        a = re.search(r"<answer>(.*?)</answer>", content, re.DOTALL)
        if a:
            answer = a.group(1).strip()
            arr = re.search(r"(\[.*\])", answer, re.DOTALL)
            json_str = arr.group(1) if arr else answer
    if not json_str:
        return []
    try:
        data = json.loads(json_str)
    except json.JSONDecodeError:
        return []
    if not isinstance(data, list):
        return []
    out = []
    for item in data:
        b, k1, k2 = item.get("bbox_2d"), item.get("keypoint1"), item.get("keypoint2")
        boxed = isinstance(b, list) and len(b) == 4
        if boxed and isinstance(k1, list) and len(k1) == 2 and isinstance(k2, list) and len(k2) == 2:
            out.append({"box": b, "points": [k1, k2]})
    return out


def as_upstream(items: tuple[GresItem, ...] | None) -> list:
    return [{"box": list(i.box), "points": [list(p) for p in i.points]} for i in items or ()]


def test_two_targets_fenced() -> None:
    items = gres_answer(TWO_TANKS)
    assert items == (
        GresItem((35, 280, 112, 356), ((73, 318), (60, 300))),
        GresItem((120, 290, 190, 360), ((155, 325), (150.5, 340))),
    )
    assert all(isinstance(v, float) for i in items for v in i.box)


@pytest.mark.parametrize(
    "text",
    [
        "<think> No tank is visible. </think> <answer>None</answer>",
        "<think> nothing </think>\n<answer>\nNone.\n</answer>",
        f"<think> t </think><answer>{FENCE}json\nNone\n{FENCE}</answer>",
        "<think> t </think><answer>[]</answer>",
        f"<think> t </think><answer>{FENCE}json\n[]\n{FENCE}</answer>",
        "<think> t </think><answer>null</answer>",
        "None",
    ],
)
def test_none_is_an_empty_tuple(text: str) -> None:
    assert gres_answer(text) == ()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "<think> I am still thinking about the",  # cut off while reasoning
        "<think> t </think> the tank is at the bottom left",  # no answer tag, no block
        "<think> t </think><answer>the tank on the left</answer>",  # prose, not JSON
        '<think> t </think><answer>[{"bbox_2d": [1, 2, 3, 4], "keypoint1": [2, 3],</answer>',  # truncated JSON
        '<think> t </think><answer>{"bbox_2d": [1, 2, 3, 4], "keypoint1": [2, 3], "keypoint2": [2, 2]}</answer>',
        '<think> t </think><answer>[{"bbox_2d": [1, 2, 3, 4]}]</answer>',  # no keypoints: no valid target
        '<think> t </think><answer>[{"bbox_2d": [1, 2, 3], "keypoint1": [2, 3], "keypoint2": [2, 2]}]</answer>',
        '<think> t </think><answer>[{"bbox_2d": [1, 2, 3, 4], "keypoint1": [true, 3], "keypoint2": [2, 2]}]</answer>',
        '<think> t </think><answer>[{"bbox_2d": [1, 2, 3, Infinity], "keypoint1": [2, 3], '
        '"keypoint2": [2, 2]}]</answer>',
        "<think> t </think><answer>[1, 2, 3, 4]</answer>",  # a REC-style bare box
        None,
        42,
    ],
)
def test_unreadable_is_none(text: object) -> None:
    assert gres_answer(text) is None  # type: ignore[arg-type]


def test_invalid_items_are_skipped_and_valid_ones_kept() -> None:
    text = (
        "<think> t </think><answer>["
        '{"bbox_2d": [1, 2, 3, 4]}, "junk", '
        '{"bbox_2d": [10, 20, 30, 40], "keypoint1": [15, 25], "keypoint2": [20, 30], "label": "tank"}, '
        '{"bbox_2d": [5, 5, 9, 9], "keypoint1": [6, 6], "keypoint2": [7]}'
        "]</answer>"
    )
    assert gres_answer(text) == (GresItem((10, 20, 30, 40), ((15, 25), (20, 30))),)


def test_first_fenced_block_wins_even_in_the_reasoning() -> None:
    # Upstream searches the fenced block before the answer tag, over the whole text.
    text = (
        f"<think> e.g. {FENCE}json\n"
        '[{"bbox_2d": [1, 1, 5, 5], "keypoint1": [2, 2], "keypoint2": [3, 3]}]\n'
        f"{FENCE} </think><answer>"
        '[{"bbox_2d": [50, 50, 90, 90], "keypoint1": [60, 60], "keypoint2": [70, 70]}]</answer>'
    )
    assert gres_answer(text) == (GresItem((1, 1, 5, 5), ((2, 2), (3, 3))),)


def test_unfenced_answer_takes_the_greedy_list() -> None:
    text = (
        "<think> two </think><answer>Here: "
        '[{"bbox_2d": [1, 1, 5, 5], "keypoint1": [2, 2], "keypoint2": [3, 3]}] and '
        '[{"bbox_2d": [6, 6, 9, 9], "keypoint1": [7, 7], "keypoint2": [8, 8]}]</answer>'
    )
    # the greedy [...] spans both lists, which is not one JSON value: upstream reads nothing either
    assert gres_answer(text) is None
    assert upstream_parse(text) == []


def test_reversed_box_is_kept_as_written() -> None:
    text = '<answer>[{"bbox_2d": [30, 40, 10, 20], "keypoint1": [15, 25], "keypoint2": [20, 30]}]</answer>'
    assert gres_answer(text) == (GresItem((30, 40, 10, 20), ((15, 25), (20, 30))),)


@pytest.mark.parametrize(
    "text",
    [
        TWO_TANKS,
        '<think> t </think><answer>[{"bbox_2d": [1, 2, 3, 4], "keypoint1": [2, 3], "keypoint2": [2, 2]}]</answer>',
        '<think> t </think><answer>Answer: [{"bbox_2d": [0, 0, 10, 10], "keypoint1": [5, 5], '
        '"keypoint2": [6, 6]}, {"bbox_2d": [1, 2, 3, 4]}]. Done.</answer>',
        f'<answer>{FENCE}json\n{{"bbox_2d": [1, 2, 3, 4], "keypoint1": [2, 3], "keypoint2": [2, 2]}}\n{FENCE}</answer>',
        "<think> t </think><answer>None</answer>",
    ],
)
def test_agrees_with_upstream_on_what_reaches_sam(text: str) -> None:
    assert as_upstream(gres_answer(text)) == upstream_parse(text)


def test_patterns_are_upstreams() -> None:
    assert GRES_ARRAY_PATTERN == r"(\[.*\])"
    assert FENCED_JSON_PATTERN == r"```json(.*?)```"


@pytest.mark.parametrize(
    "box, points",
    [((1, 2, 3), ()), ((1, 2, 3, float("nan")), ()), ((1, 2, 3, 4), ((1,),)), ((1, 2, 3, 4), ((1, float("inf")),))],
)
def test_gres_item_rejects_bad_values(box: tuple, points: tuple) -> None:
    with pytest.raises(ValueError, match="GRES"):
        GresItem(box, points)


def test_gres_item_box_alone() -> None:
    item = GresItem((1, 2, 3, 4))
    assert item.points == () and item.box == (1.0, 2.0, 3.0, 4.0)
