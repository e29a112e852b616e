"""Tests of train/data_format.py: the records' COCO image ids, GRES records, the warm start's reasoning targets."""

from __future__ import annotations

import json

import pytest

from geo_r1_qgis.core.errors import ConfigError
from train.data_format import MANIFEST, ChipRecord, assign_image_ids, read_records, target_text, write_records


def _record(name: str, image: str, task: str = "multi", image_id: int | None = None) -> ChipRecord:
    return ChipRecord(id=name, image=image, split="test", task=task, expression="ship", category="ship",
                      boxes=((0, 0, 28, 28),), image_size=(112, 112), image_id=image_id)  # fmt: skip


def test_assign_image_ids_one_id_per_image_in_path_order():
    recs = [_record("c", "images/test/c.png"), _record("a-rec", "images/test/a.png", "rec"),
            _record("a", "images/test/a.png"), _record("b", "images/test/b.png", image_id=4)]  # fmt: skip
    ids = {r.id: r.image_id for r in assign_image_ids(recs)}
    # b.png keeps its id; a.png and c.png take the next ones, in path order (not record order)
    assert ids == {"b": 4, "a": 5, "a-rec": 5, "c": 6}
    assert [r.id for r in assign_image_ids(list(reversed(recs)))] == [r.id for r in reversed(recs)]
    assert {r.id: r.image_id for r in assign_image_ids(list(reversed(recs)))} == ids


def test_assign_image_ids_refuses_contradictions():
    with pytest.raises(ConfigError, match="contradicts"):
        assign_image_ids([_record("a", "a.png", image_id=1), _record("b", "b.png", image_id=1)])
    with pytest.raises(ConfigError, match="whole number"):
        _record("a", "a.png", image_id="1")


def test_written_records_carry_their_image_id(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({}))
    write_records(tmp_path, [_record("b", "images/test/b.png"), _record("a", "images/test/a.png")])
    lines = [json.loads(line) for line in (tmp_path / "test_multi.jsonl").read_text().splitlines()]
    assert [(d["id"], d["image_id"]) for d in lines] == [("b", 2), ("a", 1)]
    assert [(r.id, r.image_id) for r in read_records(tmp_path, "test", "multi")] == [("b", 2), ("a", 1)]


def _gres(**over):
    values = dict(id="g", image="images/test/g.png", split="test", task="gres", expression="roof", category="roof",
                  boxes=((2, 3, 10, 9),), image_size=(112, 112),
                  outlines=([[[[2.004, 3], [10, 3], [10, 9], [2, 9]]]],), keypoints=(((5, 5), (8, 7)),))  # fmt: skip
    values.update(over)
    return ChipRecord(**values)


def test_gres_records_round_trip_with_outlines_and_keypoints(tmp_path):
    r = _gres()
    assert r.outlines == (((((2.0, 3.0), (10.0, 3.0), (10.0, 9.0), (2.0, 9.0)),),),)  # rounded to 2 decimals
    assert r.solution_text == (
        '```json\n[\n    {"bbox_2d": [2, 3, 10, 9], "keypoint1": [5, 5], "keypoint2": [8, 7]}\n]\n```'
    )
    assert r.question.endswith("simply respond with None.") and "answer: roof. Based on" in r.question
    (tmp_path / MANIFEST).write_text(json.dumps({}))
    write_records(tmp_path, [r, _gres(id="n", boxes=(), outlines=(), keypoints=(), negative=True)])
    back = read_records(tmp_path, "test", "gres")
    assert [(b.outlines, b.keypoints) for b in back] == [(r.outlines, r.keypoints), ((), ())]
    assert back[1].solution_text == "None"


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"outlines": None}, "needs each object's outline"),
        ({"keypoints": ()}, "each object has one of each"),
        ({"outlines": ([[[[0, 0], [1, 1]]]],)}, "at least 3"),
        ({"keypoints": (((5, 5),),)}, "exactly two keypoints"),
    ],
)
def test_gres_records_check_themselves(over, needle):
    with pytest.raises(ConfigError, match=needle):
        _gres(**over)


@pytest.mark.parametrize(
    ("expression", "looked_for"),
    [("ship", "the ship"), ("the smallest storage tank", "the smallest storage tank"),
     ("all buildings", "all buildings"), ("an airport", "an airport")],
)  # fmt: skip
def test_reasoning_targets_name_the_expression_without_a_second_article(expression, looked_for):
    rec = ChipRecord(id="a", image="a.png", split="train", task="rec", expression=expression, category=expression,
                     boxes=((10, 12, 40, 44),), image_size=(224, 224))  # fmt: skip
    assert target_text(rec, True) == (
        f"<think> I look for {looked_for}. It is in the top left of the image. </think> "
        f'<answer>[{{"bbox_2d": [10, 12, 40, 44], "label": "{expression}"}}]</answer>'
    )
    empty = ChipRecord(id="b", image="b.png", split="train", task="multi", expression=expression,
                       category=expression, boxes=(), image_size=(224, 224), negative=True)  # fmt: skip
    assert target_text(empty, True) == (
        f"<think> I look for {looked_for}. There is none in the image. </think> <answer>None</answer>"
    )
