"""Turn a Geo-R1 / Qwen2.5-VL completion into reasoning, answer and boxes. Never raises.

:func:`parse_output` is lenient: it recovers what a careful reader would recover from real model output
(``<think>``/``<answer>`` present or missing, ``bbox_2d`` objects, lists of objects, bare
``[x1, y1, x2, y2]`` lists, ```` ```json ```` fences, floats, negatives, swapped corners, "None",
truncation). It reports how it got there in :class:`ParseStatus` and whether Geo-R1's format reward
would have accepted the text in ``format_ok``.

:func:`geo_r1_eval_box` is strict: it reproduces Geo-R1's REC evaluation parse exactly, for evaluation
fidelity only. So are the other upstream parses kept here, each byte-for-byte: the SFT baseline's
(:func:`sft_baseline_box`), the OVD evaluation's (:func:`ovd_eval_boxes`, with our reasoning-mode rule
:func:`ovd_answer_region` beside it) and VLM-R1's rewards' (:func:`vlm_r1_reward_box`; for ``odLength``
:func:`vlm_r1_od_answer` and :func:`vlm_r1_fenced_boxes`). ``train/metrics.py`` and ``train/rewards.py``
import them.

Coordinates are returned as the model wrote them (pixels of the smart-resized image);
:mod:`geo_r1_qgis.core.rules.coords` rescales them to the original image and clips them.

Rules (deliberate choices, documented here because sources differ)
-----------------------------------------------------------------
* The answer is the FIRST ``<answer>…</answer>`` (non-greedy), as in VLM-R1's REC reward and Geo-R1's
  evaluation (``re.search``). VLM-R1's OVD reward takes the last one; with one answer tag, as trained,
  both agree.
* Without an ``<answer>`` tag, boxes are read from the text after the last ``</think>`` (the whole text
  when there is no ``<think>``). A ``<think>`` that never closes means the output was cut off while
  reasoning: nothing is read from the reasoning, whose coordinates may describe other objects.
* A box is any list of exactly four numbers, ``[x1, y1, x2, y2]`` (ASCII digits, optional ``-`` and
  decimals). Lists of two numbers (GRES ``keypoint1``/``keypoint2``) or of more than four are not boxes.
  Its label is the ``"label"`` string of the enclosing ``{…}`` object, if any.
* ``"rec"`` keeps only the first box, as VLM-R1's REC reward does (``re.search`` of
  ``\\[(\\d+),\\s*(\\d+),\\s*(\\d+),\\s*(\\d+)]`` inside ``<answer>``). Note that Geo-R1's evaluation regex
  (:func:`geo_r1_eval_box`) is greedy and so picks the LAST ``{…[a, b, c, d]…}`` box instead; with one
  box, as a REC answer has, both agree.
* "None" (any case), "null" and "[]", alone (optionally fenced, quoted or followed by a full stop), mean
  the model explicitly found no target: status NONE. Any other text without a box is NO_BOX.
* ``format_ok`` is Geo-R1's format reward, exactly: REC, ``re.search`` with DOTALL of
  :data:`REC_FORMAT_PATTERN` (VLM-R1 ``format_reward_rec``); multi, ``re.fullmatch`` with DOTALL of
  :data:`GENERIC_FORMAT_PATTERN` (VLM-R1 ``grpo_jsonl.format_reward``, the "format" reward used with
  the ``odLength`` OVD task). Both demand ``<think>``, so SFT-baseline output is never ``format_ok``.
* GRES (:func:`gres_answer`) reads what Geo-R1's ``test_gres_eval.py`` (``parse_vlm_predictions_for_sam``)
  hands to SAM: the first fenced json block, else the greedy ``[...]`` inside the first ``<answer>``, else the
  whole answer; a JSON list of ``{"bbox_2d": [4], "keypoint1": [2], "keypoint2": [2]}`` items. Upstream
  turns every failure into "no prompts"; we tell "None" (an empty tuple) from unreadable text (None).
* The upstream regexes are kept as the definitions (``*_PATTERN``) but evaluated by linear scans that give
  exactly ``re``'s result (the regexes take minutes on some long strings); the tests compare both on
  thousands of strings.

This module is pure: standard library only.
"""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import dataclass

__all__ = [
    "EVAL_ANSWER_PATTERN",
    "EVAL_BBOX_PATTERN",
    "FENCED_JSON_PATTERN",
    "FENCE_OPEN_PATTERN",
    "GENERIC_FORMAT_PATTERN",
    "GRES_ARRAY_PATTERN",
    "NONE_WORDS",
    "OVD_LIST_PATTERN",
    "REC_FORMAT_PATTERN",
    "SFT_BBOX_PATTERN",
    "GresItem",
    "ParseStatus",
    "ParsedBox",
    "ParsedOutput",
    "format_ok",
    "geo_r1_eval_box",
    "gres_answer",
    "ovd_answer_region",
    "ovd_eval_boxes",
    "parse_output",
    "sft_baseline_box",
    "vlm_r1_fenced_boxes",
    "vlm_r1_od_answer",
    "vlm_r1_reward_box",
]

#: VLM-R1 ``Qwen2VLModule.format_reward_rec`` (used by Geo-R1 for REC): ``re.search``, DOTALL.
REC_FORMAT_PATTERN = r"<think>.*?</think>\s*<answer>.*?\{.*\[\d+,\s*\d+,\s*\d+,\s*\d+\].*\}.*?</answer>"
#: VLM-R1 ``grpo_jsonl.format_reward`` (any other task, OVD included): ``re.fullmatch``, DOTALL.
GENERIC_FORMAT_PATTERN = r"<think>.*?</think>\s*<answer>.*?</answer>"

#: Geo-R1 ``test_rec_r1_eval.py`` ``extract_bbox_answer``: the answer, then the box inside it.
EVAL_ANSWER_PATTERN = r"<answer>(.*?)</answer>"
EVAL_BBOX_PATTERN = r"\{.*\[(\d+),\s*(\d+),\s*(\d+),\s*(\d+)]\s*.*\}"

# The four upstream patterns above are the definitions. They backtrack polynomially on long inputs
# (a string of 50,000 "<answer>" takes minutes), so they are evaluated below by linear scans that
# return exactly what ``re`` would; tests/geo_r1_qgis/core/rules/test_parsing.py checks this against ``re`` itself.
_QUAD_RE = re.compile(r"\[(\d+),\s*(\d+),\s*(\d+),\s*(\d+)]")  # their common box, unicode \d as upstream
_WS_ANSWER_RE = re.compile(r"\s*<answer>")

#: Geo-R1 ``test_rec_baseline_eval.py`` ``extract_bbox_answer``: the first box anywhere, floats.
SFT_BBOX_PATTERN = r"\[(\s*-?\d*\.?\d+\s*),\s*(\s*-?\d*\.?\d+\s*),\s*(\s*-?\d*\.?\d+\s*),\s*(\s*-?\d*\.?\d+\s*)\]"
#: A fenced json block (DOTALL), its content read stripped: VLM-R1's ``odLength`` reward reads the last one
#: (``re.findall``), Geo-R1's ``test_ovd_nwpu_eval.py`` the first (``re.search``). Upstream writes the latter
#: with ``\s*`` around a lazy group, which captures exactly this group stripped (the tests compare both).
FENCED_JSON_PATTERN = r"```json(.*?)```"
#: Geo-R1 ``test_ovd_nwpu_eval.py`` without a fenced block: the greedy list over the whole response.
OVD_LIST_PATTERN = r"(\[[\s\S]*\])"
#: Geo-R1 ``test_gres_eval.py`` without a fenced block: the greedy list inside the first ``<answer>`` (DOTALL).
GRES_ARRAY_PATTERN = r"(\[.*\])"
#: The opening of a code fence in any language (three backticks, then ``json`` or another tag, or none).
FENCE_OPEN_PATTERN = r"```[A-Za-z]*"

_NUM = r"(-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
_BOX_RE = re.compile(r"\[\s*" + r"\s*,\s*".join([_NUM] * 4) + r"\s*\]")
_LABEL_RE = re.compile(r'"label"\s*:\s*"((?:[^"\\]|\\.)*)"', re.DOTALL)
_FENCE_RE = re.compile(r"^" + FENCE_OPEN_PATTERN + r"\s*|\s*```$")
_SFT_BBOX_RE = re.compile(SFT_BBOX_PATTERN)
_FENCED_JSON_RE = re.compile(FENCED_JSON_PATTERN, re.DOTALL)
_OVD_LIST_RE = re.compile(OVD_LIST_PATTERN)
_GRES_ARRAY_RE = re.compile(GRES_ARRAY_PATTERN, re.DOTALL)
#: The words by which a model answers that there is no target, compared lower-cased (an empty list ``[]`` too);
#: confidence.py finds them in the answer's tokens in the casings models write (``None``, ``null``, ``NONE`` …).
NONE_WORDS: tuple[str, ...] = ("none", "null")
_NONE_ANSWERS = frozenset({*NONE_WORDS, "[]"})

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"


class ParseStatus(str, enum.Enum):
    """How :func:`parse_output` read a completion.

    OK            A complete answer with at least one box (in ``<answer>`` tags, or untagged when the
                  prompt asked for no reasoning).
    NONE          The model explicitly answered that there is no target ("None", "null", "[]").
    NO_ANSWER_TAG A reasoning prompt was used but there is no ``<answer>`` tag; boxes were recovered
                  from the text after the reasoning.
    TRUNCATED     The output was cut off (``<answer>`` or ``<think>`` never closed, or an untagged answer
                  ends inside a JSON list or code fence); ``boxes`` holds the complete boxes before the cut.
    NO_BOX        An answer is there, but holds neither a box nor an explicit "None".
    EMPTY         The text is empty or only whitespace (or not a string at all).
    """

    OK = "ok"
    NONE = "none"
    NO_ANSWER_TAG = "no_answer_tag"
    TRUNCATED = "truncated"
    NO_BOX = "no_box"
    EMPTY = "empty"


@dataclass(frozen=True)
class ParsedBox:
    """One box as the model wrote it (model-image pixels), corners ordered: x1 <= x2, y1 <= y2.

    ``span`` is the half-open character range of the coordinate list in the parsed text:
    ``text[span[0]:span[1]] == "[199, 249, 245, 331]"``; it maps token log-probs onto boxes.
    """

    x1: float
    y1: float
    x2: float
    y2: float
    label: str | None
    span: tuple[int, int]

    def __post_init__(self) -> None:
        coords = (self.x1, self.y1, self.x2, self.y2)
        if not all(math.isfinite(c) for c in coords):
            raise ValueError(f"box coordinates must be finite numbers, got {coords}")
        if self.x1 > self.x2 or self.y1 > self.y2:
            raise ValueError(f"box corners must be ordered (x1 <= x2, y1 <= y2), got {coords}")
        if not (0 <= self.span[0] < self.span[1]):
            raise ValueError(f"span must be a non-empty (start, end) range, got {self.span}")

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        """The corners as a tuple."""
        return (self.x1, self.y1, self.x2, self.y2)


@dataclass(frozen=True)
class ParsedOutput:
    """What a completion says.

    ``reasoning``: the ``<think>`` content, stripped (up to the cut when unterminated), else None.
    ``answer``: the ``<answer>`` content, stripped (up to the cut when unterminated); without an answer
    tag, the text the boxes were read from (after the reasoning); None when that is empty.
    ``boxes``: in the order written; at most one for ``"rec"``.
    ``format_ok``: whether Geo-R1's format reward gives 1 for this text.
    """

    reasoning: str | None
    answer: str | None
    boxes: tuple[ParsedBox, ...]
    status: ParseStatus
    format_ok: bool


def format_ok(text: str, task: str) -> bool:
    """Geo-R1's format reward as a boolean.

    ``"rec"``: ``re.search(REC_FORMAT_PATTERN, text, re.DOTALL)``; any other task:
    ``re.fullmatch(GENERIC_FORMAT_PATTERN, text, re.DOTALL)`` (computed in linear time, same result).
    """
    if not isinstance(text, str):
        return False
    return _rec_format(text) if task == "rec" else _generic_format(text)


def _rec_format(text: str) -> bool:
    """``re.search(REC_FORMAT_PATTERN, text, re.DOTALL) is not None``.

    Every gap of the pattern is a free ``.*``/``.*?``, so a match exists iff the earliest choice at each
    step succeeds: first ``<think>``; first ``</think>`` after it that is followed by ``\\s*<answer>``;
    then the first ``{``, the first box after it, a ``}`` after the box and ``</answer>`` after that.
    """
    t = text.find(_THINK_OPEN)
    if t < 0:
        return False
    c = text.find(_THINK_CLOSE, t + len(_THINK_OPEN))
    while c >= 0:
        m = _WS_ANSWER_RE.match(text, c + len(_THINK_CLOSE))
        if m:
            brace = text.find("{", m.end())
            if brace < 0:
                return False
            quad = _QUAD_RE.search(text, brace + 1)
            if quad is None:
                return False
            close = text.find("}", quad.end())
            return close >= 0 and text.find(_ANSWER_CLOSE, close + 1) >= 0
        c = text.find(_THINK_CLOSE, c + 1)
    return False


def _generic_format(text: str) -> bool:
    """``re.fullmatch(GENERIC_FORMAT_PATTERN, text, re.DOTALL) is not None``."""
    if not (text.startswith(_THINK_OPEN) and text.endswith(_ANSWER_CLOSE)):
        return False
    last = len(text) - len(_ANSWER_CLOSE)  # where the final </answer> starts
    c = text.find(_THINK_CLOSE, len(_THINK_OPEN))
    while c >= 0:
        m = _WS_ANSWER_RE.match(text, c + len(_THINK_CLOSE))
        if m:  # the earliest answer leaves the most room; a later one cannot do better
            return m.end() <= last
        c = text.find(_THINK_CLOSE, c + 1)
    return False


def _first_answer(text: str) -> str | None:
    """Group 1 of ``re.search(EVAL_ANSWER_PATTERN, text, re.DOTALL)``, or None."""
    i = text.find(_ANSWER_OPEN)
    if i < 0:
        return None
    j = text.find(_ANSWER_CLOSE, i + len(_ANSWER_OPEN))
    return None if j < 0 else text[i + len(_ANSWER_OPEN) : j]


def _eval_bbox(content: str) -> re.Match[str] | None:
    """The box ``re.search(EVAL_BBOX_PATTERN, content, re.DOTALL)`` captures, as a match of _QUAD_RE.

    The match starts at the first ``{`` (a later ``{`` only has fewer boxes after it); greedy ``.*``
    then picks the LAST box after that ``{`` which still has a ``}`` somewhere after its end.
    """
    brace = content.find("{")
    if brace < 0:
        return None
    last_close = content.rfind("}")
    found = None
    for m in _QUAD_RE.finditer(content, brace + 1):
        if m.end() > last_close:
            break
        found = m
    return found


def geo_r1_eval_box(text: str) -> tuple[int, int, int, int]:
    """Geo-R1's REC evaluation parse, exactly; ``(0, 0, 0, 0)`` when it fails.

    First ``<answer>(.*?)</answer>`` (DOTALL), stripped; then
    ``\\{.*\\[(\\d+),\\s*(\\d+),\\s*(\\d+),\\s*(\\d+)]\\s*.*\\}`` (DOTALL, greedy: the LAST such box).
    Corners are not reordered and not rescaled, as upstream.
    """
    try:
        answer = _first_answer(text)
        if answer is not None:
            match = _eval_bbox(answer.strip())
            if match:
                x1, y1, x2, y2 = (int(match.group(i)) for i in range(1, 5))
                return (x1, y1, x2, y2)
    except (AttributeError, TypeError, ValueError):  # not a str; or a digit string int() rejects
        pass
    return (0, 0, 0, 0)


def vlm_r1_reward_box(text: str) -> tuple[int, int, int, int] | None:
    """The box VLM-R1's REC IoU reward reads, exactly; None when it finds none (the reward is then 0).

    First ``<answer>(.*?)</answer>`` (DOTALL), stripped; then the FIRST ``\\[(\\d+),\\s*(\\d+),\\s*(\\d+),\\s*(\\d+)]``
    in it (``re.search``), as ints. Unlike :func:`geo_r1_eval_box` (the evaluation's parse, the last box
    after a ``{``), no braces are needed. Corners are not reordered.
    """
    try:
        answer = _first_answer(text)
        if answer is not None:
            match = _QUAD_RE.search(answer.strip())
            if match:
                x1, y1, x2, y2 = (int(match.group(i)) for i in range(1, 5))
                return (x1, y1, x2, y2)
    except (AttributeError, TypeError, ValueError):
        pass
    return None


def sft_baseline_box(text: str) -> tuple[float, float, float, float] | tuple[int, int, int, int]:
    """Geo-R1's SFT-baseline REC parse, exactly: the FIRST ``[a, b, c, d]`` anywhere in ``text``
    (:data:`SFT_BBOX_PATTERN`), as floats (signed decimals allowed); ``(0, 0, 0, 0)`` when there is none
    (or ``text`` is not a str)."""
    if not isinstance(text, str):
        return (0, 0, 0, 0)
    m = _SFT_BBOX_RE.search(text)
    if not m:
        return (0, 0, 0, 0)
    try:
        x1, y1, x2, y2 = (float(m.group(i)) for i in range(1, 5))
    except ValueError:  # unreachable for this pattern, kept so the parse never raises
        return (0, 0, 0, 0)
    return (x1, y1, x2, y2)


def ovd_answer_region(text: str, reasoning: bool) -> str:
    """The reasoning-mode rule (ours): what an OVD parse reads of a response to the reasoning prompt.
    Upstream's evaluation prompt has no reasoning, and its parse reads the whole response (the headline
    numbers do too). With ``reasoning``: the first ``<answer>`` content when there is one, so brackets in
    the reasoning are not taken for the answer; else the whole response."""
    if not isinstance(text, str):
        return ""
    if reasoning:
        answer = _first_answer(text)
        if answer is not None:
            return answer
    return text


def ovd_eval_boxes(text: str) -> list[list[int]]:
    """Geo-R1 ``test_ovd_nwpu_eval.py`` ``extract_bboxes_from_response``: boxes ``[x1, y1, x2, y2]`` as
    ints. Never raises.

    The first fenced json block (:data:`FENCED_JSON_PATTERN`), else the greedy :data:`OVD_LIST_PATTERN`
    over the whole response, else no boxes; the block, stripped, equal to ``none`` (any case) gives no
    boxes; ``json.loads`` failing or not giving a list gives no boxes; each item with a ``bbox_2d`` list of
    4 values becomes ``[int(v) …]`` (an item whose values ``int()`` rejects is skipped). Deviation, only
    where upstream would crash: items that are not JSON objects are skipped, and so are coordinates
    ``int()`` cannot convert (``Infinity``).
    """
    if not isinstance(text, str):
        return []
    match = _FENCED_JSON_RE.search(text) or _OVD_LIST_RE.search(text)
    if not match:
        return []
    json_str = match.group(1).strip()
    if json_str.lower() == "none":
        return []
    try:
        data = json.loads(json_str)
    except (ValueError, RecursionError):
        return []
    if not isinstance(data, list):
        return []
    boxes = []
    for item in data:
        if not isinstance(item, dict):
            continue  # upstream: `'bbox_2d' in item` on a non-object raises or misreads; we skip it
        bbox = item.get("bbox_2d")
        if "bbox_2d" in item and isinstance(bbox, list) and len(bbox) == 4:
            try:
                boxes.append([int(v) for v in bbox])
            except (ValueError, TypeError, OverflowError):
                continue
    return boxes


def vlm_r1_od_answer(text: str) -> str | None:
    """The answer VLM-R1's ``odLength`` reward reads: the LAST ``<answer>(.*?)</answer>`` (``re.findall``,
    DOTALL), stripped; None when there is none (or ``text`` is not a str)."""
    if not isinstance(text, str):
        return None
    last, pos = None, 0
    while True:  # re.findall's non-overlapping matches, in linear time
        i = text.find(_ANSWER_OPEN, pos)
        if i < 0:
            break
        j = text.find(_ANSWER_CLOSE, i + len(_ANSWER_OPEN))
        if j < 0:
            break
        last, pos = text[i + len(_ANSWER_OPEN) : j], j + len(_ANSWER_CLOSE)
    return None if last is None else last.strip()


def vlm_r1_fenced_boxes(answer: str) -> list[list[int]] | None:
    """The boxes of the LAST fenced json block of ``answer``, as VLM-R1's ``odLength`` reward reads them:
    a list of ``{"bbox_2d": [4 numbers]}`` (one object counts as a list of one), each box as ints; items
    without such a box are skipped. None when there is no block or it is not a JSON list or object."""
    blocks = _FENCED_JSON_RE.findall(answer) if isinstance(answer, str) else []
    if not blocks:
        return None
    try:
        items = json.loads(blocks[-1].strip())
    except ValueError:
        return None
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list):
        return None
    boxes = []
    for item in items:
        bbox = item.get("bbox_2d") if isinstance(item, dict) else None
        if isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox):
            boxes.append([int(v) for v in bbox])
    return boxes


@dataclass(frozen=True)
class GresItem:
    """One GRES target as the model wrote it (model-image pixels): its ``bbox_2d`` and its keypoints.

    ``box`` is ``(x1, y1, x2, y2)`` exactly as written (corners are not reordered: upstream clips the mask to
    the box as written, so a reversed box gives an empty mask); ``points`` are the positive points that
    prompt SAM with the box (``keypoint1``, ``keypoint2``; none for a box given alone, as the engine's
    "refine to outline" does).
    """

    box: tuple[float, float, float, float]
    points: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        if len(self.box) != 4 or not all(_finite_number(v) for v in self.box):
            raise ValueError(f"a GRES box must be four finite numbers (x1, y1, x2, y2), got {self.box!r}")
        if not all(len(p) == 2 and all(_finite_number(v) for v in p) for p in self.points):
            raise ValueError(f"GRES keypoints must be (x, y) pairs of finite numbers, got {self.points!r}")
        object.__setattr__(self, "box", tuple(float(v) for v in self.box))
        object.__setattr__(self, "points", tuple((float(x), float(y)) for x, y in self.points))


def _finite_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _gres_json(text: str) -> str | None:
    """The JSON text Geo-R1's GRES evaluation reads: the first fenced json block (stripped); else, inside the
    first ``<answer>``, the greedy ``[...]`` (DOTALL) or the whole answer (stripped); else None."""
    fenced = _FENCED_JSON_RE.search(text)
    if fenced:
        return fenced.group(1).strip()
    answer = _first_answer(text)
    if answer is None:
        return None
    answer = answer.strip()
    array = _GRES_ARRAY_RE.search(answer)
    return array.group(1) if array else answer


def gres_answer(text: str) -> tuple[GresItem, ...] | None:
    """The GRES targets of a completion: their boxes and keypoints, as Geo-R1's ``test_gres_eval.py`` reads them
    for SAM. Never raises.

    The JSON (:func:`_gres_json`: the first fenced json block, else the greedy list inside the first
    ``<answer>``, else that answer) must be a list; each item with a ``bbox_2d`` of 4 numbers and
    ``keypoint1``/``keypoint2`` of 2 numbers each becomes a :class:`GresItem`; other items are skipped, as
    upstream. Returns:

    * an empty tuple when the model answered that there is no target: the JSON text is "None"/"null"/"[]"
      (any case, fenced, quoted or with a full stop, as :func:`parse_output` reads it), or an empty list;
    * None when nothing can be read: no block and no ``<answer>``, JSON that does not load, a JSON value that
      is not a list, or a non-empty list none of whose items is a valid target (upstream scores all of these
      as "no prompts", like "None"; we keep them apart so callers can report a broken answer).

    Deviations from upstream, where it would crash or misread: items that are not JSON objects are skipped;
    coordinates must be finite numbers (not ``true``, strings or ``Infinity``).
    """
    if not isinstance(text, str):
        return None
    try:
        json_str = _gres_json(text)
        if json_str is None:  # no block, no answer: only a bare "None" still says something
            return () if text.strip() and _is_none(text) else None
        if _is_none(json_str):
            return ()
        data = json.loads(json_str)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, list):
        return None
    items = []
    for item in data:
        if not isinstance(item, dict):
            continue
        box, kp1, kp2 = item.get("bbox_2d"), item.get("keypoint1"), item.get("keypoint2")
        if not (isinstance(box, list) and len(box) == 4 and isinstance(kp1, list) and len(kp1) == 2):
            continue
        if not (isinstance(kp2, list) and len(kp2) == 2):
            continue
        try:
            items.append(GresItem(tuple(box), (tuple(kp1), tuple(kp2))))
        except (ValueError, TypeError):
            continue
    if data and not items:
        return None
    return tuple(items)


def parse_output(text: str, task: str = "rec", reasoning: bool = True) -> ParsedOutput:
    """Parse a completion. Never raises, whatever ``text`` holds.

    ``task`` is ``"rec"`` (keep the first box) or ``"multi"`` (keep all; anything else is read as
    ``"multi"``). ``reasoning`` says whether the prompt asked for ``<think>``/``<answer>``: when False an
    untagged answer is normal (status OK rather than NO_ANSWER_TAG).
    """
    try:
        return _parse(text, task, reasoning)
    except Exception:  # the contract is "never raises": degrade to "nothing found"
        return ParsedOutput(None, None, (), ParseStatus.NO_BOX, False)


def _parse(text: str, task: str, reasoning: bool) -> ParsedOutput:
    if not isinstance(text, str) or not text.strip():
        return ParsedOutput(None, None, (), ParseStatus.EMPTY, False)
    fmt = format_ok(text, "rec" if task == "rec" else "multi")
    thought = _reasoning(text)

    truncated = False
    tagged = True
    a_open = text.find(_ANSWER_OPEN)
    if a_open >= 0:
        start = a_open + len(_ANSWER_OPEN)
        end = text.find(_ANSWER_CLOSE, start)
        if end < 0:
            truncated = True
            end = len(text)
    else:
        tagged = False
        t_open = text.find(_THINK_OPEN)
        t_close = text.rfind(_THINK_CLOSE)
        if t_open >= 0 and t_close < t_open:
            # cut off while reasoning: no answer yet
            return ParsedOutput(thought, None, (), ParseStatus.TRUNCATED, fmt)
        start = t_close + len(_THINK_CLOSE) if t_close >= 0 else 0
        end = len(text)

    region = text[start:end]
    if not tagged and _ends_open(region):
        truncated = True
    answer = region.strip() or None
    boxes = _find_boxes(text, start, end)
    if task == "rec":
        boxes = boxes[:1]

    if truncated:
        status = ParseStatus.TRUNCATED
    elif boxes:
        status = ParseStatus.OK if (tagged or not reasoning) else ParseStatus.NO_ANSWER_TAG
    elif answer is not None and _is_none(answer):
        status = ParseStatus.NONE
    else:
        status = ParseStatus.NO_BOX
    return ParsedOutput(thought, answer, tuple(boxes), status, fmt)


def _reasoning(text: str) -> str | None:
    t_open = text.find(_THINK_OPEN)
    if t_open < 0:
        return None
    start = t_open + len(_THINK_OPEN)
    end = text.find(_THINK_CLOSE, start)
    if end < 0:
        a_open = text.find(_ANSWER_OPEN, start)
        end = a_open if a_open >= 0 else len(text)
    return text[start:end].strip() or None


def _find_boxes(text: str, start: int, end: int) -> list[ParsedBox]:
    matches = list(_BOX_RE.finditer(text, start, end))
    boxes = []
    for k, m in enumerate(matches):
        try:
            x1, y1, x2, y2 = (float(m.group(i)) for i in range(1, 5))
        except ValueError:
            continue
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            continue  # e.g. 400 digits: float() gives inf
        # a box's object lies between its neighbours, which keeps the label search linear overall
        lo = matches[k - 1].end() if k > 0 else start
        hi = matches[k + 1].start() if k + 1 < len(matches) else end
        boxes.append(
            ParsedBox(
                min(x1, x2),
                min(y1, y2),
                max(x1, x2),
                max(y1, y2),
                _label_for(text, m.start(), m.end(), lo, hi),
                (m.start(), m.end()),
            )
        )
    return boxes


def _label_for(text: str, box_start: int, box_end: int, lo: int, hi: int) -> str | None:
    """The "label" string of the ``{...}`` object enclosing the box (searched within ``[lo, hi)``)."""
    left = text.rfind("{", lo, box_start)
    if left < 0 or text.find("}", left, box_start) >= 0:
        return None  # the box is not inside an open object
    right = text.find("}", box_end, hi)
    obj = text[left : (right + 1 if right >= 0 else hi)]
    m = _LABEL_RE.search(obj)
    if not m:
        return None
    try:
        label = json.loads('"' + m.group(1) + '"')
    except ValueError:
        label = m.group(1)
    return label if isinstance(label, str) else None


def _is_none(answer: str) -> bool:
    core = _FENCE_RE.sub("", answer.strip()).strip()
    core = core.strip("\"'`").rstrip(".").strip()
    core = re.sub(r"\s+", "", core).lower()
    return core in _NONE_ANSWERS


def _ends_open(region: str) -> bool:
    """True when an untagged answer stops inside a code fence or an unclosed JSON list/object.

    Quotes are only tracked inside brackets, so prose such as ``a 3" pipe`` does not count.
    """
    if region.count("```") % 2 == 1:
        return True
    depth = 0
    in_string = False
    escaped = False
    for ch in region:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"' and depth > 0:
            in_string = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth = max(0, depth - 1)
    return depth > 0
