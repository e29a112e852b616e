"""The dataset directory: one definition of its files and records, for the builder, trainer and evaluator.

A dataset directory (what ``geo-r1 dataset build|synthetic|from-json`` writes, and what ``geo-r1 train``
and ``geo-r1 eval`` read) holds:

- ``dataset.json``: the manifest (sources, CRS, GSD, chip size, counts, seed, annotation hash).
- ``images/<split>/<id>.png``: the chips, RGB, sides multiples of 28 (the model sees them unresized).
- ``<split>_<task>.jsonl`` for split in train/val/test and task in rec/multi/gres: VLM-R1's training JSONL
  (``id``, ``image``, ``conversations``), each line with our extra keys (``expression``, ``category``,
  ``solution``, ``image_size``, ``is_unique``, ``negative``, ``split``, ``task``). Boxes are integer
  ``[x1, y1, x2, y2]`` in chip pixels.
- ``<split>_rec.json`` and ``<split>_rec_with_unique.json`` (val/test): Geo-R1's REC evaluation JSON.

``rec`` records have exactly one box (the expression names one object in the chip); ``multi`` records
have zero (a negative chip: the answer is "None") or more boxes; ``gres`` records have the ``multi`` record's
boxes plus each object's ``outlines`` (its polygons in chip pixels) and ``keypoints`` (two pixels inside its
mask), by the rules of ``geo_r1_qgis/core/rules/gres_truth.py``; their answer is Geo-R1's GRES list of
``{"bbox_2d", "keypoint1", "keypoint2"}`` (:func:`gres_answer_json`).

Each record carries ``image_id``, its image's COCO id: every record of one image has the same id, and the
OVD evaluation numbers the images by it (COCOeval ranks detections of equal score by image id, so the
numbers must not depend on the order of the rows). :func:`write_records` gives the images that have none
the next ids after the largest one given, in the sorted order of their paths (:func:`assign_image_ids`);
records read from a dataset written before the key existed get theirs the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from geo_r1_qgis.core.errors import ConfigError
from geo_r1_qgis.core.rules.prompts import GRES_TEMPLATE, OVD_TEMPLATE, REC_QUESTION_PREFIX, TASKS

MANIFEST = "dataset.json"
SPLITS = ("train", "val", "test")
IMAGES_DIR = "images"

Box = tuple[int, int, int, int]
#: One object's outline: its polygons, each an exterior ring then its holes, each ring ``(x, y)`` points in chip
#: pixels (``geo_r1_qgis.core.rules.gres_truth``'s convention).
Outline = tuple[tuple[tuple[tuple[float, float], ...], ...], ...]
Point = tuple[int, int]
#: Decimals kept of an outline's chip-pixel coordinates in the records.
OUTLINE_DECIMALS = 2


def jsonl_name(split: str, task: str) -> str:
    """``train_rec.jsonl`` and the like."""
    _check(split, task)
    return f"{split}_{task}.jsonl"


def eval_json_name(split: str, with_unique: bool = False) -> str:
    """Geo-R1's REC evaluation file of ``split`` (``val_rec.json``, ``val_rec_with_unique.json``)."""
    _check(split, "rec")
    return f"{split}_rec{'_with_unique' if with_unique else ''}.json"


def _check(split: str, task: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    if task not in TASKS:
        raise ConfigError(f"task must be one of {TASKS}, got {task!r}")


def answer_json(boxes: Iterable[Box], label: str) -> str:
    """The multi-target answer as Qwen2.5-VL grounding writes it: a fenced JSON list, or ``None``."""
    items = [f'{{"bbox_2d": [{b[0]}, {b[1]}, {b[2]}, {b[3]}], "label": {json.dumps(label)}}}' for b in boxes]
    return _fenced(items)


def _fenced(items: Sequence[str]) -> str:
    if not items:
        return "None"
    return "```json\n[\n    " + ",\n    ".join(items) + "\n]\n```"


def gres_answer_json(boxes: Iterable[Box], keypoints: Iterable[tuple[Point, Point]]) -> str:
    """The GRES answer in the GRES prompt's own format: a fenced JSON list of ``{"bbox_2d", "keypoint1",
    "keypoint2"}`` items (four-space indent, as the prompt shows it), or ``None``."""
    items = [
        f'{{"bbox_2d": [{b[0]}, {b[1]}, {b[2]}, {b[3]}], "keypoint1": [{k1[0]}, {k1[1]}], '
        f'"keypoint2": [{k2[0]}, {k2[1]}]}}'
        for b, (k1, k2) in zip(boxes, keypoints, strict=True)
    ]
    return _fenced(items)


def _outline(value: Any) -> Outline:
    """An outline as nested tuples of floats rounded to :data:`OUTLINE_DECIMALS`."""
    return tuple(
        tuple(tuple((round(float(p[0]), OUTLINE_DECIMALS), round(float(p[1]), OUTLINE_DECIMALS)) for p in ring)
              for ring in polygon)
        for polygon in value
    )  # fmt: skip


@dataclass(frozen=True)
class ChipRecord:
    """One training or evaluation query: a chip, an expression and its true boxes in chip pixels."""

    id: str
    image: str  # relative to the dataset directory
    split: str
    task: str
    expression: str
    category: str
    boxes: tuple[Box, ...]
    image_size: tuple[int, int]  # (width, height)
    is_unique: bool | None = None
    negative: bool = False
    #: the image's COCO id (None: not given; :func:`assign_image_ids` gives one)
    image_id: int | None = None
    #: gres: each object's outline in chip pixels (:data:`Outline`), in the order of ``boxes``
    outlines: tuple[Outline, ...] | None = None
    #: gres: each object's two keypoints ``((col, row), (col, row))``, in the order of ``boxes``
    #: (``geo_r1_qgis.core.rules.gres_truth.keypoints`` of the object's mask)
    keypoints: tuple[tuple[Point, Point], ...] | None = None

    def __post_init__(self) -> None:
        _check(self.split, self.task)
        if self.image_id is not None and (isinstance(self.image_id, bool) or not isinstance(self.image_id, int)):
            raise ConfigError(f"record {self.id}: image_id must be a whole number (a COCO id), got {self.image_id!r}")
        object.__setattr__(self, "boxes", tuple(tuple(int(v) for v in b) for b in self.boxes))
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        if not self.expression.strip():
            raise ConfigError(f"record {self.id}: the expression is empty")
        if self.task == "rec" and len(self.boxes) != 1:
            raise ConfigError(f"record {self.id}: a rec record has exactly one box, got {len(self.boxes)}")
        if self.negative and self.boxes:
            raise ConfigError(f"record {self.id}: a negative record has no boxes")
        if self.outlines is not None:
            from geo_r1_qgis.core.rules.gres_truth import check_polygons

            for n, o in enumerate(self.outlines):
                check_polygons(o, f"record {self.id}, object {n + 1}")
            object.__setattr__(self, "outlines", tuple(_outline(o) for o in self.outlines))
        if self.keypoints is not None:
            try:
                kps = tuple(tuple((int(p[0]), int(p[1])) for p in pair) for pair in self.keypoints)
            except (TypeError, ValueError, IndexError):
                raise ConfigError(f"record {self.id}: keypoints must be [[x, y], [x, y]] per object") from None
            if any(len(pair) != 2 for pair in kps):
                raise ConfigError(f"record {self.id}: each object has exactly two keypoints")
            object.__setattr__(self, "keypoints", kps)
        if self.task == "gres":
            if self.outlines is None or self.keypoints is None:
                raise ConfigError(f"record {self.id}: a gres record needs each object's outline and keypoints")
            if not len(self.outlines) == len(self.keypoints) == len(self.boxes):
                raise ConfigError(f"record {self.id}: {len(self.boxes)} boxes, {len(self.outlines)} outlines and "
                                  f"{len(self.keypoints)} keypoint pairs; each object has one of each")  # fmt: skip
        w, h = self.image_size
        for b in self.boxes:
            if len(b) != 4 or not (0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h):
                raise ConfigError(f"record {self.id}: box {list(b)} is not inside the {w}x{h} chip")

    @property
    def question(self) -> str:
        """The human turn's text without ``<image>``: the REC question or the OVD problem."""
        if self.task == "rec":
            return REC_QUESTION_PREFIX + self.expression
        if self.task == "gres":  # Geo-R1's GRES prompt (it always holds the reasoning instruction)
            return GRES_TEMPLATE.format(Question=self.expression)
        return OVD_TEMPLATE.format(category=self.expression)

    @property
    def solution_text(self) -> str:
        """The ``gpt`` turn: ``[x1, y1, x2, y2]`` for rec (VLM-R1's REC JSONL), the JSON answer for multi, the
        boxes with their keypoints for gres (:func:`gres_answer_json`)."""
        if self.task == "rec":
            b = self.boxes[0]
            return f"[{b[0]}, {b[1]}, {b[2]}, {b[3]}]"
        if self.task == "gres":
            return gres_answer_json(self.boxes, self.keypoints or ())
        return answer_json(self.boxes, self.expression)

    def to_json(self) -> dict[str, Any]:
        """The JSONL line: VLM-R1's keys first, then ours."""
        return {
            "id": self.id,
            "image": self.image,
            **({} if self.image_id is None else {"image_id": self.image_id}),
            "conversations": [
                {"from": "human", "value": "<image>" + self.question},
                {"from": "gpt", "value": self.solution_text},
            ],
            "split": self.split,
            "task": self.task,
            "expression": self.expression,
            "category": self.category,
            "solution": [list(b) for b in self.boxes],
            "image_size": list(self.image_size),
            "is_unique": self.is_unique,
            "negative": self.negative,
            **({} if self.outlines is None else {"outlines": _lists(self.outlines)}),
            **({} if self.keypoints is None else {"keypoints": _lists(self.keypoints)}),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ChipRecord:
        try:
            return cls(
                id=str(d["id"]),
                image=str(d["image"]),
                split=d["split"],
                task=d["task"],
                expression=d["expression"],
                category=d.get("category") or d["expression"],
                boxes=tuple(tuple(b) for b in d["solution"]),
                image_size=tuple(d["image_size"]),
                is_unique=d.get("is_unique"),
                negative=bool(d.get("negative", False)),
                image_id=d.get("image_id"),
                outlines=d.get("outlines"),
                keypoints=d.get("keypoints"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"a dataset record is malformed ({type(exc).__name__}: {exc}): {str(d)[:200]}") from exc


def _lists(value: Any) -> Any:
    """Nested tuples as nested lists (JSON)."""
    return [_lists(v) for v in value] if isinstance(value, (list, tuple)) else value


def assign_image_ids(records: Sequence[ChipRecord]) -> list[ChipRecord]:
    """``records`` with every image's COCO id: the ids given are kept (one image, one id: a contradiction
    is refused); an image without one takes the id another record of it has, else the next id after the
    largest given, in the sorted order of the image paths (never the order of the records)."""
    ids: dict[str, int] = {}
    owners: dict[int, str] = {}
    for r in records:
        if r.image_id is None:
            continue
        if ids.get(r.image, r.image_id) != r.image_id or owners.get(r.image_id, r.image) != r.image:
            raise ConfigError(
                f"record {r.id}: image {r.image} with image_id {r.image_id} contradicts another record "
                "(one image, one id); fix the dataset's image_id keys"
            )
        ids[r.image], owners[r.image_id] = r.image_id, r.image
    nxt = max(ids.values(), default=0) + 1
    for image in sorted({r.image for r in records} - ids.keys()):
        ids[image] = nxt
        nxt += 1
    return [r if r.image_id == ids[r.image] else replace(r, image_id=ids[r.image]) for r in records]


def write_records(directory: Path, records: Iterable[ChipRecord]) -> dict[str, int]:
    """Write every record to its ``<split>_<task>.jsonl`` (all files of all splits and tasks are created,
    empty ones included), each with its image's COCO id (:func:`assign_image_ids`); return the count per
    file name."""
    directory = Path(directory)
    files = {jsonl_name(s, t): [] for s in SPLITS for t in TASKS}
    for r in assign_image_ids(list(records)):
        files[jsonl_name(r.split, r.task)].append(json.dumps(r.to_json(), ensure_ascii=False))
    for name, lines in files.items():
        (directory / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return {name: len(lines) for name, lines in files.items()}


def read_records(directory: Path, split: str, task: str) -> list[ChipRecord]:
    """The records of one split and task; a clear error when the directory is not a dataset."""
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        raise ConfigError(
            f"{directory} is not a Geo-R1 dataset (no {MANIFEST}); make one with 'geo-r1 dataset build' "
            "or 'geo-r1 dataset synthetic'"
        )
    path = directory / jsonl_name(split, task)
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(ChipRecord.from_json(json.loads(line)))
            except ValueError as exc:
                raise ConfigError(f"{path}:{n}: {exc}") from exc
    return out


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{directory} is not a Geo-R1 dataset (no {MANIFEST})") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); rebuild the dataset") from exc


def place_words(box: Box, image_size: tuple[int, int]) -> str:
    """Where a box lies in the image, in words ("in the top left", "in the centre"), from its centre."""
    w, h = image_size
    cx, cy = (box[0] + box[2]) / 2 / w, (box[1] + box[3]) / 2 / h
    vertical = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    horizontal = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "centre"
    if vertical == "middle" and horizontal == "centre":
        return "in the centre"
    if vertical == "middle":
        return f"on the {horizontal}"
    if horizontal == "centre":
        return f"at the {vertical}"
    return f"in the {vertical} {horizontal}"


def _looked_for(expression: str) -> str:
    """The expression after "I look for": as it is when it starts with an article or "all" ("the largest storage
    tank", "all buildings"), else with "the" ("the storage tank")."""
    first = expression.split(" ", 1)[0].lower()
    return expression if first in ("the", "a", "an", "all") else f"the {expression}"


def target_text(record: ChipRecord, reasoning: bool) -> str:
    """The supervised answer for ``record``.

    Without reasoning (the paper's SFT baseline): the JSON answer the SFT prompt asks for (a fenced list of
    ``{"bbox_2d", "label"}``), or ``None``. With reasoning (a warm start before GRPO): a short templated
    ``<think>`` that says where the objects are (worded like the tiny model's format lessons), then ``<answer>``
    holding ``[{"bbox_2d": …, "label": …}]`` for rec (Qwen2.5-VL's grounding list; Geo-R1's format reward and
    both parses accept it) or the fenced list / ``None`` for multi.
    """
    if not reasoning:
        return answer_json(record.boxes, record.expression) if record.task != "gres" else record.solution_text
    if not record.boxes:
        think = f"I look for {_looked_for(record.expression)}. There is none in the image."
        return f"<think> {think} </think> <answer>None</answer>"
    places = " and ".join(place_words(b, record.image_size) for b in record.boxes)
    think = f"I look for {_looked_for(record.expression)}. It is {places} of the image."
    if record.task == "rec":
        b = record.boxes[0]
        answer = f'[{{"bbox_2d": [{b[0]}, {b[1]}, {b[2]}, {b[3]}], "label": {json.dumps(record.expression)}}}]'
    else:  # multi: the fenced list; gres: the fenced list of boxes and keypoints
        answer = record.solution_text
    return f"<think> {think} </think> <answer>{answer}</answer>"
