"""Confidence scores from the token log-probabilities of a generation. Pure functions.

Geo-R1 itself has no confidence score; we add two, computed from the same generation that produced
the boxes, so the prompts and the answer format stay Geo-R1's.

Definitions (these are the API's documented meanings; docs/ARCHITECTURE.md repeats them):

**Box score.** For each box, the geometric mean of the probabilities of the generated tokens whose
characters overlap the box's coordinate list ``[x1, y1, x2, y2]`` in the output:
``score = exp(mean(log p(token_i)))``. ``p`` is the probability of the token that was actually
generated, under the distribution it was drawn from (after any temperature or penalties). A box the
model wrote with conviction scores near 1; a box whose digits were a coin toss scores low.

**Presence.** For each image, the probability that the model answers with at least one box rather
than "None": ``presence = 1 - P_none``, where ``P_none`` is the total probability, at the *branch
position*, of the tokens that start the word None (``None``, ``none``, ``null`` and their prefixes,
with or without a leading space). The branch position is the first content character of the
answer: just after ``<answer>``, skipping whitespace and an opening ```` ```json ```` fence; without an
``<answer>`` tag it is the first box's ``[`` (or, for a bare "None" answer, that word). If there is
neither an answer nor a box, presence is 0. This is the model's own probability of "something is
there", whatever it then chose.

Later stages rank boxes by ``score × presence`` and drop weak ones with thresholds on either.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Protocol

from .parsing import FENCE_OPEN_PATTERN, NONE_WORDS

#: parsing's None words in the casings models write them: lower, capitalised, upper
NONE_CASINGS: tuple[str, ...] = tuple(dict.fromkeys(c for w in NONE_WORDS for c in (w.capitalize(), w, w.upper())))

_ANSWER_OPEN = re.compile(r"<answer>", re.IGNORECASE)
_FENCE = re.compile(FENCE_OPEN_PATTERN)
_NONE_WORD = re.compile(r"\b(" + "|".join(NONE_CASINGS) + r")\b")


class _Span(Protocol):
    span: tuple[int, int]


class _Parsed(Protocol):
    @property
    def boxes(self) -> Sequence[_Span]: ...


def is_none_piece(piece: str) -> bool:
    """True if a token's text (leading whitespace ignored) starts one of the None words."""
    p = piece.strip()
    return bool(p) and any(word.startswith(p) or p.startswith(word) for word in NONE_CASINGS)


def token_offsets(pieces: Sequence[str]) -> list[tuple[int, int]]:
    """Character span of each token piece in ``"".join(pieces)``."""
    out, pos = [], 0
    for piece in pieces:
        out.append((pos, pos + len(piece)))
        pos += len(piece)
    return out


def branch_char_index(text: str, parsed: _Parsed) -> int | None:
    """Index of the first content character of the answer (see the module docstring)."""
    m = _ANSWER_OPEN.search(text)
    if m:
        i = m.end()
        while i < len(text) and text[i].isspace():
            i += 1
        fence = _FENCE.match(text, i)
        if fence:
            i = fence.end()
            while i < len(text) and text[i].isspace():
                i += 1
        return i if i < len(text) else None
    if parsed.boxes:
        return parsed.boxes[0].span[0]
    none = _NONE_WORD.search(text)
    return none.start() if none else None


def _token_at(offsets: list[tuple[int, int]], char_index: int) -> int | None:
    """The token covering ``char_index`` (or the first non-empty one after it)."""
    for k, (s, e) in enumerate(offsets):
        if e > s and e > char_index:
            return k
    return None


def span_score(offsets: list[tuple[int, int]], logprobs: Sequence[float], span: tuple[int, int]) -> float:
    """Geometric-mean probability of the tokens overlapping ``span`` (0 if none do)."""
    lo, hi = span
    lps = [lp for (s, e), lp in zip(offsets, logprobs, strict=False) if s < hi and e > lo and e > s]
    if not lps:
        return 0.0
    return float(math.exp(sum(lps) / len(lps)))


def confidence_from_tokens(
    pieces: Sequence[str],
    logprobs: Sequence[float],
    none_probs: Sequence[float],
    parsed: _Parsed,
) -> tuple[tuple[float, ...], float]:
    """Box scores (one per ``parsed.boxes``) and the presence probability.

    ``pieces[i]`` is the text of generated token i, ``logprobs[i]`` its log-probability and
    ``none_probs[i]`` the total probability of None-starting tokens at step i. ``parsed`` must be the
    parse of ``"".join(pieces)`` so that box spans index into the same text.
    """
    n = min(len(pieces), len(logprobs), len(none_probs))
    pieces, logprobs, none_probs = list(pieces[:n]), list(logprobs[:n]), list(none_probs[:n])
    text = "".join(pieces)
    offsets = token_offsets(pieces)
    scores = tuple(span_score(offsets, logprobs, box.span) for box in parsed.boxes)
    branch = branch_char_index(text, parsed)
    if branch is None:
        return scores, 0.0
    k = _token_at(offsets, branch)
    if k is None:
        return scores, 0.0
    presence = 1.0 - float(none_probs[k])
    return scores, min(1.0, max(0.0, presence))
