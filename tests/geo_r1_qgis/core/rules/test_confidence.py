"""Confidence definitions on literal token streams (engine/confidence.py)."""

import math

import pytest

from geo_r1_qgis.core.rules.confidence import (
    branch_char_index,
    confidence_from_tokens,
    is_none_piece,
    span_score,
    token_offsets,
)
from geo_r1_qgis.core.rules.parsing import parse_output


@pytest.mark.parametrize(
    ("piece", "expected"),
    [
        ("None", True),
        (" None", True),
        ("N", True),
        ("No", True),
        ("null", True),
        (" n", True),
        ("[", False),
        ("{", False),
        ("```", False),
        ("North", False),
        ("", False),
        ("  ", False),
    ],
)
def test_is_none_piece(piece, expected):
    assert is_none_piece(piece) is expected


def _stream(pieces, lp=-0.1, none_at=None, p_none=0.0):
    logprobs = [lp] * len(pieces)
    none_probs = [0.0] * len(pieces)
    if none_at is not None:
        none_probs[none_at] = p_none
    return list(pieces), logprobs, none_probs


def test_box_score_is_geometric_mean_of_coordinate_tokens():
    pieces = [
        "<think>",
        " tank",
        " </think>",
        " <answer>",
        "[",
        "1",
        "0",
        ",",
        " 2",
        "0",
        ",",
        " 3",
        "0",
        ",",
        " 4",
        "0",
        "]",
        "</answer>",
    ]
    logprobs = [-5.0] * len(pieces)
    # coordinate-list tokens "[" .. "]" (indices 4..16) get known log-probs
    coords = list(range(4, 17))
    for k, i in enumerate(coords):
        logprobs[i] = -0.01 * (k + 1)
    text = "".join(pieces)
    parsed = parse_output(text, "rec")
    assert len(parsed.boxes) == 1
    scores, _ = confidence_from_tokens(pieces, logprobs, [0.0] * len(pieces), parsed)
    expected = math.exp(sum(logprobs[i] for i in coords) / len(coords))
    assert scores[0] == pytest.approx(expected)
    # the -5.0 tokens outside the box must not have leaked in
    assert scores[0] > math.exp(-1)


def test_presence_reads_the_branch_token_after_answer_and_fence():
    pieces = [
        "<think>",
        " x",
        "</think>",
        "<answer>",
        "```json",
        "\n",
        "[",
        '{"bbox_2d": [1, 2, 3, 4]}',
        "]",
        "\n```",
        "</answer>",
    ]
    p, lps, nps = _stream(pieces, none_at=6, p_none=0.3)
    parsed = parse_output("".join(p), "multi")
    scores, presence = confidence_from_tokens(p, lps, nps, parsed)
    assert presence == pytest.approx(0.7)
    assert len(scores) == len(parsed.boxes) == 1


def test_presence_of_a_none_answer_is_low_when_none_was_likely():
    pieces = ["<think>", " nothing", "</think>", " <answer>", "None", "</answer>"]
    p, lps, nps = _stream(pieces, none_at=4, p_none=0.95)
    parsed = parse_output("".join(p), "multi")
    scores, presence = confidence_from_tokens(p, lps, nps, parsed)
    assert scores == ()
    assert presence == pytest.approx(0.05)


def test_no_answer_and_no_box_means_zero_presence():
    pieces = ["garbage", " tokens", " only"]
    p, lps, nps = _stream(pieces, none_at=0, p_none=0.0)
    parsed = parse_output("".join(p), "multi")
    assert confidence_from_tokens(p, lps, nps, parsed) == ((), 0.0)


def test_without_answer_tag_the_first_box_is_the_branch():
    pieces = ["Sure", ": ", "[", "5", ", 6", ", 70", ", 80", "]"]
    p, lps, nps = _stream(pieces, none_at=2, p_none=0.4)
    parsed = parse_output("".join(p), "rec")
    assert parsed.boxes
    assert branch_char_index("".join(p), parsed) == len("Sure: ")
    _, presence = confidence_from_tokens(p, lps, nps, parsed)
    assert presence == pytest.approx(0.6)


def test_span_score_ignores_empty_special_token_pieces():
    pieces = ["", "[1, 2, 3, 4]", ""]
    offsets = token_offsets(pieces)
    assert span_score(offsets, [-9.0, -0.5, -9.0], (0, 12)) == pytest.approx(math.exp(-0.5))
    assert span_score(offsets, [-9.0, -0.5, -9.0], (50, 60)) == 0.0


def test_the_none_words_are_parsings_in_the_casings_models_write():
    from geo_r1_qgis.core.rules.confidence import NONE_CASINGS
    from geo_r1_qgis.core.rules.parsing import NONE_WORDS, ParseStatus, parse_output

    assert {w.lower() for w in NONE_CASINGS} == set(NONE_WORDS)
    for word in NONE_CASINGS:  # each one the confidence finds is one the parser reads as "no target"
        assert is_none_piece(word)
        assert parse_output(f"<think>x</think> <answer>{word}</answer>", "multi").status is ParseStatus.NONE
