"""geo_r1_qgis/core/rules/parsing.py on literal model outputs (GEO-R1.md's sample, realistic Qwen2.5-VL text, junk)."""

from __future__ import annotations

import random
import re
import time

import pytest

from geo_r1_qgis.core.rules import parsing
from geo_r1_qgis.core.rules.parsing import (
    ParsedBox,
    ParsedOutput,
    ParseStatus,
    format_ok,
    geo_r1_eval_box,
    ovd_answer_region,
    ovd_eval_boxes,
    parse_output,
    sft_baseline_box,
    vlm_r1_fenced_boxes,
    vlm_r1_od_answer,
    vlm_r1_reward_box,
)

S = ParseStatus

# GEO-R1.md's expected output, literally (with its "…" characters).
GEO_R1_SAMPLE = '<think> … </think> <answer>{"bbox_2d": [199, 249, 245, 331], "label": "…"}</answer>'

REC_REALISTIC = (
    "<think>The sentence asks for the large white storage tank located near the road in the lower left. "
    "There are two tanks; the larger one is at the bottom left, next to the road.</think>\n"
    '<answer>{"bbox_2d": [62, 301, 148, 389], "label": "large white storage tank"}</answer>'
)

MULTI_FENCED = """<think>I can see three storage tanks in the industrial zone: two in the top left and one at the bottom right.</think>
<answer>
```json
[
    {"bbox_2d": [12, 30, 88, 104], "label": "storage tank"},
    {"bbox_2d": [120, 35, 190, 110], "label": "storage tank"},
    {"bbox_2d": [300, 280, 360, 344], "label": "storage tank"}
]
```
</answer>"""  # noqa: E501

SFT_FENCED = '```json\n[\n\t{"bbox_2d": [10, 20, 30, 40]}\n]\n```'

OVD_NO_REASONING = """```json
[
    {"bbox_2d": [5, 6, 50, 60], "label": "airplane"},
    {"bbox_2d": [100, 110, 150, 170], "label": "airplane"}
]
```"""

GRES = (
    "<think>The question asks where cars could park.</think><answer>```json\n"
    '[{"bbox_2d": [10, 20, 30, 40], "keypoint1": [15, 25], "keypoint2": [20, 30]},\n'
    ' {"bbox_2d": [50, 60, 70, 80], "keypoint1": [55, 65], "keypoint2": [60, 70]}]\n```</answer>'
)


def boxes_of(out: ParsedOutput) -> list[tuple[float, float, float, float]]:
    return [b.xyxy for b in out.boxes]


def check_spans(text: str, out: ParsedOutput) -> None:
    for b in out.boxes:
        s = text[b.span[0] : b.span[1]]
        assert s.startswith("[") and s.endswith("]"), s
        nums = [float(v) for v in re.findall(r"-?(?:\d+(?:\.\d*)?|\.\d+)", s)]
        assert sorted(nums[0::2]) == [b.x1, b.x2] and sorted(nums[1::2]) == [b.y1, b.y2]


# ---------------------------------------------------------------------------------------------------
# The GEO-R1.md sample
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["rec", "multi"])
def test_geo_r1_sample(task: str) -> None:
    out = parse_output(GEO_R1_SAMPLE, task)
    assert out.status is S.OK
    assert out.reasoning == "…"
    assert out.answer == '{"bbox_2d": [199, 249, 245, 331], "label": "…"}'
    assert out.boxes == (ParsedBox(199.0, 249.0, 245.0, 331.0, "…", (39, 59)),)
    assert GEO_R1_SAMPLE[39:59] == "[199, 249, 245, 331]"
    assert out.format_ok is True
    assert geo_r1_eval_box(GEO_R1_SAMPLE) == (199, 249, 245, 331)


# ---------------------------------------------------------------------------------------------------
# Realistic outputs: expected boxes, labels and status
# ---------------------------------------------------------------------------------------------------

T1 = (62.0, 301.0, 148.0, 389.0)


@pytest.mark.parametrize(
    ("text", "task", "reasoning", "status", "boxes", "labels"),
    [
        (REC_REALISTIC, "rec", True, S.OK, [T1], ["large white storage tank"]),
        (
            MULTI_FENCED,
            "multi",
            True,
            S.OK,
            [(12, 30, 88, 104), (120, 35, 190, 110), (300, 280, 360, 344)],
            ["storage tank"] * 3,
        ),
        (MULTI_FENCED, "rec", True, S.OK, [(12, 30, 88, 104)], ["storage tank"]),
        (SFT_FENCED, "rec", False, S.OK, [(10, 20, 30, 40)], [None]),
        (SFT_FENCED, "rec", True, S.NO_ANSWER_TAG, [(10, 20, 30, 40)], [None]),
        (OVD_NO_REASONING, "multi", False, S.OK, [(5, 6, 50, 60), (100, 110, 150, 170)], ["airplane"] * 2),
        (GRES, "multi", True, S.OK, [(10, 20, 30, 40), (50, 60, 70, 80)], [None, None]),
        ("<answer>[10, 20, 30, 40]</answer>", "rec", True, S.OK, [(10, 20, 30, 40)], [None]),
        ("<answer>[[10, 20, 30, 40], [1, 2, 3, 4]]</answer>", "multi", True, S.OK,
         [(10, 20, 30, 40), (1, 2, 3, 4)], [None, None]),
        ("<answer>[ 10 ,20,  30 , 40 ]</answer>", "rec", True, S.OK, [(10, 20, 30, 40)], [None]),
        ('<answer>{"bbox_2d": [-3.5, 10.25, 40, 50.0]}</answer>', "rec", True, S.OK,
         [(-3.5, 10.25, 40, 50)], [None]),
        ('<answer>{"bbox_2d": [40, 50, 10, 20], "label": "swapped"}</answer>', "rec", True, S.OK,
         [(10, 20, 40, 50)], ["swapped"]),
        ('<answer>{"bbox_2d": [40, 20, 10, 50]}</answer>', "rec", True, S.OK, [(10, 20, 40, 50)], [None]),
        ('<answer>{"bbox_2d": [.5, 1., 3, 4]}</answer>', "rec", True, S.OK, [(0.5, 1, 3, 4)], [None]),
        ("Sure! The box is [10, 20, 30, 40]. Hope this helps.", "rec", False, S.OK, [(10, 20, 30, 40)], [None]),
        ("<think>tank at top</think> The answer is [1, 2, 3, 4]", "rec", True, S.NO_ANSWER_TAG,
         [(1, 2, 3, 4)], [None]),
        # coordinates in the reasoning are not read when there is an answer
        ("<think>maybe [9, 9, 99, 99]?</think><answer>[1, 2, 3, 4]</answer>", "rec", True, S.OK,
         [(1, 2, 3, 4)], [None]),
        # text after </answer> is ignored
        ("<think>a</think><answer>[1, 2, 3, 4]</answer> also [5, 6, 7, 8]", "multi", True, S.OK,
         [(1, 2, 3, 4)], [None]),
        # the FIRST answer tag is used
        ("<answer>[1, 2, 3, 4]</answer><answer>[5, 6, 7, 8]</answer>", "multi", True, S.OK,
         [(1, 2, 3, 4)], [None]),
        # lists of 2, 3, 5 or 8 numbers are not boxes
        ("<answer>[1, 2] [1, 2, 3] [1, 2, 3, 4, 5] [1, 2, 3, 4, 5, 6, 7, 8]</answer>", "multi", True, S.NO_BOX,
         [], []),
        ('<answer>{"label": "tank", "bbox_2d": [1, 2, 3, 4]}</answer>', "rec", True, S.OK, [(1, 2, 3, 4)],
         ["tank"]),
        ('<answer>[{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [5, 6, 7, 8], "label": "b"}]</answer>', "multi", True,
         S.OK, [(1, 2, 3, 4), (5, 6, 7, 8)], [None, "b"]),
        ('<answer>{"bbox_2d": [1, 2, 3, 4], "label": "tank \\"A\\" \\u50a8"}</answer>', "rec", True, S.OK,
         [(1, 2, 3, 4)], ['tank "A" 储']),
        ('<answer>{"bbox_2d": [1, 2, 3, 4], "label": "储罐 🛢"}</answer>', "rec", True, S.OK, [(1, 2, 3, 4)],
         ["储罐 🛢"]),
        ('<answer>{"bbox_2d": [1, 2, 3, 4], "label": 7}</answer>', "rec", True, S.OK, [(1, 2, 3, 4)], [None]),
        ('<answer>[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"label": "b", "bbox_2d": [5, 6, 7, 8]}, '
         '{"bbox_2d": [9, 9, 10, 10]}]</answer>', "multi", True, S.OK,
         [(1, 2, 3, 4), (5, 6, 7, 8), (9, 9, 10, 10)], ["a", "b", None]),
    ],
)  # fmt: skip
def test_realistic_outputs(
    text: str, task: str, reasoning: bool, status: ParseStatus, boxes: list, labels: list
) -> None:
    out = parse_output(text, task, reasoning)
    assert out.status is status
    assert boxes_of(out) == [tuple(float(v) for v in b) for b in boxes]
    assert [b.label for b in out.boxes] == labels
    check_spans(text, out)


def test_multi_fenced_reasoning_and_answer_fields() -> None:
    out = parse_output(MULTI_FENCED, "multi")
    assert out.reasoning is not None and out.reasoning.startswith("I can see three storage tanks")
    assert out.answer is not None and out.answer.startswith("```json\n[") and out.answer.endswith("]\n```")
    assert out.format_ok is True


def test_untagged_answer_is_the_text_after_reasoning() -> None:
    out = parse_output("<think>hmm</think>\n [1, 2, 3, 4] ", "rec")
    assert out.reasoning == "hmm"
    assert out.answer == "[1, 2, 3, 4]"


def test_spans_index_the_original_text_with_unicode_before() -> None:
    text = '<think>🛢🛢 储罐 é</think><answer>[{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [10, 20, 30, 40]}]</answer>'
    out = parse_output(text, "multi")
    assert [text[b.span[0] : b.span[1]] for b in out.boxes] == ["[1, 2, 3, 4]", "[10, 20, 30, 40]"]


# ---------------------------------------------------------------------------------------------------
# "None": the model says there is no target
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    ["None", "none", "NONE", "null", "Null", "[]", "[ ]", "None.", '"None"', "```json\nNone\n```", "```\n[]\n```",
     "  None  \n"],
)  # fmt: skip
@pytest.mark.parametrize("task", ["rec", "multi"])
def test_explicit_none_in_answer(answer: str, task: str) -> None:
    text = f"<think>There is no storage tank in this image.</think><answer>{answer}</answer>"
    out = parse_output(text, task)
    assert out.status is S.NONE
    assert out.boxes == ()
    assert out.answer == answer.strip()


@pytest.mark.parametrize("text", ["None", "none", "null", "[]", "```json\nNone\n```", "None."])
@pytest.mark.parametrize("reasoning", [True, False])
def test_explicit_none_without_tags(text: str, reasoning: bool) -> None:
    assert parse_output(text, "multi", reasoning).status is S.NONE


@pytest.mark.parametrize(
    "answer",
    ["", "There are no such targets", "Nonexistent", "None of them", "{}", "[[]]", '{"bbox_2d": null}',
     "the tank is at the top left"],
)  # fmt: skip
def test_answer_without_box_or_none_is_no_box(answer: str) -> None:
    out = parse_output(f"<think>t</think><answer>{answer}</answer>", "multi")
    assert out.status is S.NO_BOX
    assert out.boxes == ()


# ---------------------------------------------------------------------------------------------------
# Truncation
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reasoning", "boxes"),
    [
        # cut inside <answer>, half a JSON list: recover the complete box
        ('<think>two tanks</think><answer>[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6, 7',
         True, [(1, 2, 3, 4)]),
        # cut mid-number
        ('<think>t</think><answer>{"bbox_2d": [199, 249, 245, 33', True, []),
        ('<think>t</think><answer>{"bbox_2d": [199, 249, 245, 331', True, []),
        ('<think>t</think><answer>{"bbox_2d": [199, 249, 245, 331]', True, [(199, 249, 245, 331)]),
        ("<think>t</think><answer>", True, []),
        ("<think>t</think><answer>None", True, []),
        # cut while still reasoning: coordinates in the reasoning are not boxes
        ("<think>The tank at [10, 20, 30, 40] looks", True, []),
        ("<think>", True, []),
        # no tags (SFT baseline), cut inside the fence or the list
        ('```json\n[\n\t{"bbox_2d": [10, 20, 30, 40]},\n\t{"bbox_2d": [50', False, [(10, 20, 30, 40)]),
        ('```json\n[\n\t{"bbox_2d": [10, 20, 30, 40]}\n]\n', False, [(10, 20, 30, 40)]),
        ('[{"bbox_2d": [10, 20, 30, 40], "label": "ta', False, [(10, 20, 30, 40)]),
        ('[{"bbox_2d": [10, 20, 30, 40]}', True, [(10, 20, 30, 40)]),
    ],
)  # fmt: skip
def test_truncated(text: str, reasoning: bool, boxes: list) -> None:
    out = parse_output(text, "multi", reasoning)
    assert out.status is S.TRUNCATED
    assert boxes_of(out) == [tuple(float(v) for v in b) for b in boxes]
    assert out.format_ok is False
    check_spans(text, out)


def test_truncated_in_reasoning_keeps_reasoning() -> None:
    out = parse_output("<think>The image shows an airport with", "rec")
    assert out.reasoning == "The image shows an airport with"
    assert out.answer is None
    assert out.status is S.TRUNCATED


def test_truncated_answer_field_is_text_up_to_the_cut() -> None:
    out = parse_output('<think>a</think><answer>[{"bbox_2d": [1, 2, 3, 4]}, {"bb', "multi")
    assert out.answer == '[{"bbox_2d": [1, 2, 3, 4]}, {"bb'


@pytest.mark.parametrize(
    "text",
    ['The tank is 3" wide: [1, 2, 3, 4]', "Answer: [1, 2, 3, 4]}", "[1, 2, 3, 4] (see [note])"],
)
def test_prose_quotes_and_stray_closers_are_not_truncation(text: str) -> None:
    assert parse_output(text, "rec", reasoning=False).status is S.OK


# ---------------------------------------------------------------------------------------------------
# Empty, garbage, random bytes, long strings: never raises
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", " ", "\n\t \r\n", "\u3000"])
def test_empty(text: str) -> None:
    out = parse_output(text, "rec")
    assert out == ParsedOutput(None, None, (), S.EMPTY, False)


@pytest.mark.parametrize("text", [None, 12, b"<answer>[1, 2, 3, 4]</answer>", ["x"]])
def test_non_string_input_does_not_raise(text: object) -> None:
    out = parse_output(text, "rec")  # type: ignore[arg-type]
    assert out.status is S.EMPTY and out.boxes == ()


@pytest.mark.parametrize(
    "text",
    ["asdfghjkl", "<|im_end|>", "```", "[[[[", "}}}}", "<think></think>", "</think></answer>", "\x00\x01\xff",
     "🛢" * 100, "[1, 2, 3, 4e5]", "[1, 2, 3, NaN]", "[1, 2, 3, inf]", "[١, ٢, ٣, ٤]"],
)  # fmt: skip
@pytest.mark.parametrize("task", ["rec", "multi"])
def test_garbage_yields_no_box(text: str, task: str) -> None:
    out = parse_output(text, task)
    assert out.boxes == ()
    assert out.status in (S.NO_BOX, S.TRUNCATED)


def test_huge_number_is_skipped_not_inf() -> None:
    text = "<answer>[" + "9" * 400 + ", 1, 2, 3] [1, 2, 3, 4]</answer>"
    out = parse_output(text, "multi")
    assert boxes_of(out) == [(1.0, 2.0, 3.0, 4.0)]


_ALPHABET = [
    "<think>", "</think>", "<answer>", "</answer>", "[", "]", "{", "}", ",", ", ", " ", "\n", "-", ".",
    "0", "7", "42", "199", "3.5", '"bbox_2d": ', '"label": ', '"', "\\", "tank", "None", "null", "```json",
    "```", "é", "储", "🛢", "\x00", "\udcff", "keypoint1", ":",
]  # fmt: skip


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 60)))


@pytest.mark.parametrize("seed", range(5))
def test_fuzz_never_raises_and_invariants_hold(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(400):
        text = _random_text(rng)
        for task in ("rec", "multi"):
            for reasoning in (True, False):
                out = parsing._parse(text, task, reasoning)  # the real parser, not the safety net
                assert isinstance(out.status, ParseStatus)
                if task == "rec":
                    assert len(out.boxes) <= 1
                for b in out.boxes:
                    assert b.x1 <= b.x2 and b.y1 <= b.y2
                check_spans(text, out)
                assert out.format_ok == format_ok(text, task)


@pytest.mark.parametrize("seed", range(3))
def test_random_bytes_never_raise(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(200):
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
        for text in (raw.decode("latin-1"), raw.decode("utf-8", errors="replace")):
            out = parsing._parse(text, "multi", True)
            assert isinstance(out, ParsedOutput)
            geo_r1_eval_box(text)


@pytest.mark.parametrize(
    ("text", "n_boxes"),
    [
        ("<think>" + "a" * 1_000_000 + "</think><answer>[1, 2, 3, 4]</answer>", 1),
        ("[" * 200_000, 0),
        ("<answer>" * 50_000, 0),
        ("<think>" * 50_000 + "</think></answer>", 0),
        ("<answer>{" * 30_000 + "</answer>", 0),
        ("<answer>" + "[1, 2, 3, 4] " * 50_000 + "</answer>", 50_000),
        ("<think>" * 50_000, 0),
        ("<think>t</think><answer>{" + "[1, 2, 3, 4], " * 2_000 + "</answer>", 2_000),
        ('<think>t</think><answer>[{"bbox_2d": [1, 2, 3, 4], "label": "' + "x" * 200_000 + '"}]</answer>', 1),
    ],
)
def test_long_inputs_are_fast(text: str, n_boxes: int) -> None:
    t0 = time.perf_counter()
    out = parse_output(text, "multi")
    geo_r1_eval_box(text)
    format_ok(text, "rec")
    assert len(out.boxes) == n_boxes
    assert time.perf_counter() - t0 < 5.0


def test_safety_net_degrades_to_no_box(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(parsing, "_parse", boom)
    assert parse_output("<answer>[1, 2, 3, 4]</answer>", "rec") == ParsedOutput(None, None, (), S.NO_BOX, False)


# ---------------------------------------------------------------------------------------------------
# format_ok: Geo-R1's format reward regexes, exactly
# ---------------------------------------------------------------------------------------------------


def test_format_patterns_are_geo_r1s() -> None:
    assert parsing.REC_FORMAT_PATTERN == (
        r"<think>.*?</think>\s*<answer>.*?\{.*\[\d+,\s*\d+,\s*\d+,\s*\d+\].*\}.*?</answer>"
    )
    assert parsing.GENERIC_FORMAT_PATTERN == r"<think>.*?</think>\s*<answer>.*?</answer>"


@pytest.mark.parametrize(
    ("text", "rec_ok", "multi_ok"),
    [
        (GEO_R1_SAMPLE, True, True),
        (REC_REALISTIC, True, True),
        (MULTI_FENCED, True, True),
        ("<think>a</think>\n\n<answer>{[1, 2, 3, 4]}</answer>", True, True),
        ("<think>a</think><answer>None</answer>", False, True),
        ("<think>a</think><answer>[1, 2, 3, 4]</answer>", False, True),  # REC needs { }
        ('<think>a</think><answer>{"bbox_2d": [1.5, 2, 3, 4]}</answer>', False, True),  # REC needs ints
        ('<think>a</think><answer>{"bbox_2d": [-1, 2, 3, 4]}</answer>', False, True),
        ('<think>a</think><answer>{"bbox_2d": [1,2,3,4]}</answer>', True, True),
        ('<think>a</think><answer>{"bbox_2d": [1 ,2,3,4]}</answer>', False, True),  # \d+, needs no space
        ('Sure. <think>a</think><answer>{"bbox_2d": [1, 2, 3, 4]}</answer>', True, False),  # search vs full
        ('<think>a</think><answer>{"bbox_2d": [1, 2, 3, 4]}</answer>\n', True, False),
        ('<think>a</think> x <answer>{"bbox_2d": [1, 2, 3, 4]}</answer>', False, False),
        ('<answer>{"bbox_2d": [1, 2, 3, 4]}</answer>', False, False),
        ('{"bbox_2d": [1, 2, 3, 4]}', False, False),
        ('<think>a</think><answer>{"bbox_2d": [1, 2, 3, 4]}', False, False),
        ("", False, False),
    ],
)
def test_format_ok(text: str, rec_ok: bool, multi_ok: bool) -> None:
    assert parse_output(text, "rec").format_ok is rec_ok
    assert parse_output(text, "multi").format_ok is multi_ok
    assert format_ok(text, "rec") is rec_ok
    assert format_ok(text, "multi") is multi_ok


# ---------------------------------------------------------------------------------------------------
# geo_r1_eval_box: Geo-R1's evaluation parse, exactly (including its quirks)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GEO_R1_SAMPLE, (199, 249, 245, 331)),
        (REC_REALISTIC, (62, 301, 148, 389)),
        ('<answer> {"bbox_2d": [1,2,3,4]} </answer>', (1, 2, 3, 4)),
        # greedy ".*": the LAST box inside braces wins
        (MULTI_FENCED, (300, 280, 360, 344)),
        ('<answer>{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [5, 6, 7, 8]}</answer>', (5, 6, 7, 8)),
        # the first <answer> only
        ('<answer>None</answer><answer>{"bbox_2d": [1, 2, 3, 4]}</answer>', (0, 0, 0, 0)),
        # needs braces, integers, no space after "[" or before "]"
        ("<answer>[1, 2, 3, 4]</answer>", (0, 0, 0, 0)),
        ('<answer>{"bbox_2d": [1.5, 2, 3, 4]}</answer>', (0, 0, 0, 0)),
        ('<answer>{"bbox_2d": [-1, 2, 3, 4]}</answer>', (0, 0, 0, 0)),
        ('<answer>{"bbox_2d": [ 1, 2, 3, 4]}</answer>', (0, 0, 0, 0)),
        ('<answer>{"bbox_2d": [1, 2, 3, 4 ]}</answer>', (0, 0, 0, 0)),
        ('<answer>{"bbox_2d": [1, 2, 3, 4]</answer>', (0, 0, 0, 0)),  # no closing brace
        # swapped corners are NOT normalised by the evaluation
        ('<answer>{"bbox_2d": [40, 50, 10, 20]}</answer>', (40, 50, 10, 20)),
        # no / unterminated answer tag
        ('{"bbox_2d": [1, 2, 3, 4]}', (0, 0, 0, 0)),
        ('<think>t</think><answer>{"bbox_2d": [1, 2, 3, 4]}', (0, 0, 0, 0)),
        ("<answer>None</answer>", (0, 0, 0, 0)),
        ("", (0, 0, 0, 0)),
        # \d is Unicode-aware in Python's re, and int() accepts those digits: kept as upstream
        ('<answer>{"bbox_2d": [١, 2, 3, 4]}</answer>', (1, 2, 3, 4)),
    ],
)
def test_geo_r1_eval_box(text: str, expected: tuple[int, int, int, int]) -> None:
    got = geo_r1_eval_box(text)
    assert got == expected
    assert all(type(v) is int for v in got)


_EQUIV_ALPHABET = [
    "<think>", "</think>", "<answer>", "</answer>", "{", "}", "[", "]", ",", ", ", " ", "\n", "\t", "1", "23",
    "-", ".", "x", "[1, 2, 3, 4]", "[1,2,3,4]", "[5, 6, 7, 8]", "\u00a0", "\u3000", "١", "</think> ", " <answer>",
]  # fmt: skip


def _equiv_corpus() -> list[str]:
    rng = random.Random(1234)
    corpus = [
        GEO_R1_SAMPLE, REC_REALISTIC, MULTI_FENCED, GRES, "", "<think></think><answer></answer>",
        "<think></think>\u00a0<answer>{[1, 2, 3, 4]}</answer>",
        "<think></think></think> <answer>{[1, 2, 3, 4]}}</answer>",
        "<think><think></think>x</think><answer>{[1, 2, 3, 4]}</answer>", "<answer></answer>",
        "<think>a</think><answer>}{[1, 2, 3, 4]}</answer>", "<think>a</think><answer>{[1, 2, 3, 4]</answer>}</answer>",
        "<think></think><answer></answer></answer>", "<think></think><answer><answer></answer>",
        "<answer>{[1, 2, 3, 4]}[5, 6, 7, 8]}</answer>", "<answer>{[1, 2, 3, 4]}[5, 6, 7, 8]</answer>",
    ]  # fmt: skip
    for _ in range(6000):
        corpus.append("".join(rng.choice(_EQUIV_ALPHABET) for _ in range(rng.randint(0, 14))))
    # near-misses of well-formed answers: each part dropped, doubled or surrounded by noise at random
    parts = ["<think>", "t", "</think>", "\n", "<answer>", "{", '"bbox_2d": ', "[1, 2, 3, 4]", ", ",
             "[5,6,7,8]", "}", "</answer>"]  # fmt: skip
    for _ in range(6000):
        out = []
        for part in parts:
            r = rng.random()
            if r < 0.12:
                continue
            out.append(part * (2 if r > 0.94 else 1))
            if rng.random() < 0.1:
                out.append(rng.choice(_EQUIV_ALPHABET))
        corpus.append("".join(out))
    return corpus


def test_linear_scans_equal_the_upstream_regexes() -> None:
    rec_re = re.compile(parsing.REC_FORMAT_PATTERN, re.DOTALL)
    gen_re = re.compile(parsing.GENERIC_FORMAT_PATTERN, re.DOTALL)
    ans_re = re.compile(parsing.EVAL_ANSWER_PATTERN, re.DOTALL)
    box_re = re.compile(parsing.EVAL_BBOX_PATTERN, re.DOTALL)

    def upstream_eval(text: str) -> tuple[int, ...]:
        m = ans_re.search(text)
        if m:
            b = box_re.search(m.group(1).strip())
            if b:
                return tuple(int(b.group(i)) for i in range(1, 5))
        return (0, 0, 0, 0)

    hits = {"rec": 0, "gen": 0, "box": 0}
    for text in _equiv_corpus():
        rec, gen = rec_re.search(text) is not None, gen_re.fullmatch(text) is not None
        assert format_ok(text, "rec") is rec, text
        assert format_ok(text, "multi") is gen, text
        assert geo_r1_eval_box(text) == upstream_eval(text), text
        hits["rec"] += rec
        hits["gen"] += gen
        hits["box"] += upstream_eval(text) != (0, 0, 0, 0)
    assert min(hits.values()) >= 500, hits  # the corpus exercises the positive cases too


@pytest.mark.parametrize("text", [None, 5, b"<answer>{[1, 2, 3, 4]}</answer>"])
def test_geo_r1_eval_box_non_string(text: object) -> None:
    assert geo_r1_eval_box(text) == (0, 0, 0, 0)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# The evaluations' and the rewards' parses (Geo-R1's and VLM-R1's, exactly)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "box"),
    [
        ('```json\n[\n\t{"bbox_2d": [12, 34, 56, 78]}\n]\n```', (12.0, 34.0, 56.0, 78.0)),
        ("[ -1.5, 2, .3 , 4] and then [1, 2, 3, 4]", (-1.5, 2.0, 0.3, 4.0)),  # the first, signed decimals
        ("<think>x</think><answer>[1,2,3,4]</answer>", (1.0, 2.0, 3.0, 4.0)),  # anywhere, no braces needed
        ("None", (0, 0, 0, 0)),
        ("[1, 2, 3]", (0, 0, 0, 0)),
        ("[1, 2, 3, 4, 5]", (0, 0, 0, 0)),
        (None, (0, 0, 0, 0)),
    ],
)
def test_sft_baseline_box(text: object, box: tuple[float, ...]) -> None:
    got = sft_baseline_box(text)  # type: ignore[arg-type]
    assert got == box
    if box != (0, 0, 0, 0):
        assert all(isinstance(v, float) for v in got)


OVD_FENCED = (
    '```json\n[\n    {"bbox_2d": [10, 20, 30, 40], "label": "ship"},\n'
    '    {"bbox_2d": [50, 60, 70, 80], "label": "ship"}\n]\n```'
)
OVD_LATER = '```json\n[{"bbox_2d": [1, 2, 3, 4]}]\n```'


@pytest.mark.parametrize(
    ("text", "boxes"),
    [
        (OVD_FENCED, [[10, 20, 30, 40], [50, 60, 70, 80]]),
        ("Here: " + OVD_FENCED + " and again " + OVD_LATER, [[10, 20, 30, 40], [50, 60, 70, 80]]),  # the first block
        ('[{"bbox_2d": [1, 2, 3, 4], "label": "ship"}]', [[1, 2, 3, 4]]),  # no fence: the greedy list
        ('I see [{"bbox_2d": [1, 2, 3, 4]}] and [5]', []),  # the greedy list spans both: invalid JSON
        ("None", []),
        ("```json\nNone\n```", []),
        ("```json\nnone\n```", []),
        ('```json\n{"bbox_2d": [1, 2, 3, 4]}\n```', []),  # not a list
        ('```json\n[{"bbox_2d": [1.7, 2.2, "30", 40]}]\n```', [[1, 2, 30, 40]]),  # int() of each value
        ('```json\n[{"bbox_2d": [1, 2, 3]}, {"box": [1, 2, 3, 4]}, {"bbox_2d": [5, 6, 7, 8]}]\n```', [[5, 6, 7, 8]]),
        ('```json\n[{"bbox_2d": [1, 2, "x", 4]}, {"bbox_2d": [null, 2, 3, 4]}]\n```', []),  # int() rejects
        ('```json\n["bbox_2d", 3, {"bbox_2d": [1, 2, 3, 4]}]\n```', [[1, 2, 3, 4]]),  # non-objects skipped
        ('```json\n[{"bbox_2d": [Infinity, 2, 3, 4]}]\n```', []),
        ("", []),
        (None, []),
    ],
)
def test_ovd_eval_boxes(text: object, boxes: list[list[int]]) -> None:
    assert ovd_eval_boxes(text) == boxes


def test_ovd_answer_region() -> None:
    text = "<think>the list [a, b] is not JSON</think> <answer>" + OVD_FENCED + "</answer>"
    assert ovd_answer_region(text, reasoning=True) == OVD_FENCED
    assert ovd_answer_region(text, reasoning=False) == text
    assert ovd_answer_region("<think>x</think> None", reasoning=True) == "<think>x</think> None"
    assert ovd_eval_boxes(ovd_answer_region(text, True)) == [[10, 20, 30, 40], [50, 60, 70, 80]]


def test_ovd_whole_response_parse_with_brackets_in_the_reasoning() -> None:
    """Geo-R1's OVD parse reads the whole response: with a fenced block in the answer, brackets in the
    reasoning do not matter; without one, the greedy list starts at the reasoning's first bracket."""
    fenced = "<think> I see [two] ships. </think> <answer>" + OVD_FENCED + "</answer>"
    assert ovd_eval_boxes(fenced) == [[10, 20, 30, 40], [50, 60, 70, 80]]
    bare = '<think> the ship at [5, 5] is small </think> <answer>[{"bbox_2d": [1, 2, 3, 4]}]</answer>'
    assert ovd_eval_boxes(bare) == []  # Geo-R1's rule: '[5, 5] … [{…}]' is not JSON
    assert ovd_eval_boxes(ovd_answer_region(bare, reasoning=True)) == [[1, 2, 3, 4]]  # the reasoning-mode rule


def test_reward_box_is_the_first_box_of_the_first_answer() -> None:
    text = "<think>[9, 9, 9, 9]</think><answer>[1, 2, 3, 4] then [5, 6, 7, 8]</answer><answer>[0, 0, 1, 1]</answer>"
    assert vlm_r1_reward_box(text) == (1, 2, 3, 4)
    assert vlm_r1_reward_box("<answer>none</answer>") is None
    assert vlm_r1_reward_box("[1, 2, 3, 4]") is None  # outside any answer
    assert vlm_r1_reward_box("<answer>[1, 2, 3, 4]") is None  # unterminated


def test_od_answer_is_the_last_answer_stripped() -> None:
    assert vlm_r1_od_answer("<answer> None </answer> x <answer>\n[1]\n</answer>") == "[1]"
    assert vlm_r1_od_answer("<answer>a</answer><answer>b") == "a"  # the unterminated one is no answer
    assert vlm_r1_od_answer("<answer><answer>a</answer>") == "<answer>a"  # findall's first match starts early
    assert vlm_r1_od_answer("<answer></answer>") == ""
    assert vlm_r1_od_answer("no answer") is None
    assert vlm_r1_od_answer(None) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("answer", "boxes"),
    [
        ('```json\n[{"bbox_2d": [1, 2, 3, 4]}]\n``` then ```json\n[{"bbox_2d": [5, 6, 7, 8]}]\n```', [[5, 6, 7, 8]]),
        ('```json\n{"bbox_2d": [1.9, 2, 3, 4]}\n```', [[1, 2, 3, 4]]),  # one object: a list of one, int()
        (
            '```json\n[{"bbox_2d": [1, 2, "3", 4]}, {"bbox_2d": [1, 2, 3]}, 7, {"bbox_2d": [0, 0, 9, 9]}]```',
            [[0, 0, 9, 9]],
        ),  # items without 4 numbers are skipped
        ("```json\n[]\n```", []),
        ("```json\nNone\n```", None),  # not JSON
        ('```json\n"x"\n```', None),  # neither a list nor an object
        ('[{"bbox_2d": [1, 2, 3, 4]}]', None),  # no fence
        ("```\n[]\n```", None),  # a fence that is not json
    ],
)
def test_od_fenced_boxes_read_the_last_block(answer: str, boxes: list[list[int]] | None) -> None:
    assert vlm_r1_fenced_boxes(answer) == boxes


def test_fenced_json_pattern_is_upstreams_for_both_readers() -> None:
    """One fenced-json pattern serves both upstream readers: Geo-R1's OVD evaluation, which writes it
    ``\\s*`` around a lazy group (its group is ours stripped), and VLM-R1's reward, which writes ours;
    the answer scans equal ``re.findall`` of the answer pattern."""
    eval_fence = re.compile(r"```json\s*([\s\S]*?)\s*```")  # test_ovd_nwpu_eval.py, literally
    ours = re.compile(parsing.FENCED_JSON_PATTERN, re.DOTALL)
    answers = re.compile(parsing.EVAL_ANSWER_PATTERN, re.DOTALL)
    alphabet = ["`", "```", "```json", "json", " ", "\n", "\t", "\u3000", "\x1c", "[", "]", "{", "}", "a",
                "<answer>", "</answer>", "None"]  # fmt: skip
    rng = random.Random(7)
    hits = 0
    for _ in range(20000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        a, b = eval_fence.search(text), ours.search(text)
        assert (a is None) == (b is None), text
        if a is not None and b is not None:
            assert a.group(1).strip() == b.group(1).strip(), text
            hits += 1
        found = answers.findall(text)
        assert vlm_r1_od_answer(text) == (found[-1].strip() if found else None), text
    assert hits >= 1000  # the corpus has fenced blocks


# ---------------------------------------------------------------------------------------------------
# Value objects
# ---------------------------------------------------------------------------------------------------


def test_parse_status_values_are_documented_strings() -> None:
    assert {s.value for s in ParseStatus} == {"ok", "none", "no_answer_tag", "truncated", "no_box", "empty"}
    assert ParseStatus("ok") is S.OK
    assert S.TRUNCATED == "truncated"
    for s in ParseStatus:
        assert s.name in (ParseStatus.__doc__ or "")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((3.0, 0.0, 1.0, 1.0, None, (0, 5)), "ordered"),
        ((0.0, 3.0, 1.0, 1.0, None, (0, 5)), "ordered"),
        ((0.0, 0.0, float("inf"), 1.0, None, (0, 5)), "finite"),
        ((0.0, 0.0, float("nan"), 1.0, None, (0, 5)), "finite"),
        ((0.0, 0.0, 1.0, 1.0, None, (5, 5)), "span"),
        ((0.0, 0.0, 1.0, 1.0, None, (-1, 5)), "span"),
    ],
)
def test_parsed_box_validates(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ParsedBox(*args)


def test_value_objects_are_frozen() -> None:
    out = parse_output(GEO_R1_SAMPLE, "rec")
    with pytest.raises(AttributeError):
        out.status = S.NONE  # type: ignore[misc]
    with pytest.raises(AttributeError):
        out.boxes[0].x1 = 0.0  # type: ignore[misc]
    assert isinstance(out.boxes, tuple)
