"""Tests of train/metrics.py: Geo-R1's REC accuracy and OVD COCO mAP on literal strings and fixed files."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import pytest

from geo_r1_qgis.core.errors import ConfigError
from geo_r1_qgis.core.rules.parsing import sft_baseline_box
from train.metrics import (
    OvdQuery,
    coco_map_single,
    coco_scores,
    extract_rec_box,
    ovd_image_ids,
    read_results,
    rec_scores,
    recal_iou,
    rescaled_iou,
    score_rec,
    score_results,
    uniqueness_map,
)

DATA = Path(__file__).parent / "data"
GT = [0, 0, 10, 10]  # area 100: a box [0, 0, 10, h] has Geo-R1 IoU h / 10 with it


def geo_r1_answer(*boxes: list[int]) -> str:
    items = ", ".join(f'{{"bbox_2d": [{b[0]}, {b[1]}, {b[2]}, {b[3]}], "label": "storage tank"}}' for b in boxes)
    return f"<think> The storage tank is in the top-left corner. </think> <answer>{items}</answer>"


# --------------------------------------------------------------------------------------------------
# IoU and parses
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "expected"),
    [
        ([0, 0, 10, 10], 1.0),
        ([0, 0, 10, 5], 0.5),  # inter 10 x 5 = 50, union 100
        ([0, 0, 10, 7], 0.7),
        ([0, 0, 10, 8], 0.8),
        ([0, 0, 0, 0], 0.0),  # the failed parse
        ([0.5, 0, 10.5, 10], 95 / 105),  # floats (SFT parse): inter 9.5 x 10, union 100 + 100 - 95
        ([0, 0, 10, 1], 0.0),  # an overlap 1 px high counts as 0 in Geo-R1's IoU
        (None, 0.0),  # recal's iou: not a list
        ([0, 0, 10], 0.0),  # not 4 items
    ],
)
def test_recal_iou(pred, expected):
    assert recal_iou(pred, GT) == pytest.approx(expected, abs=1e-12)


def test_exact_threshold_ious_are_exact_floats():
    # the edge cases below rely on these being exactly 0.5 and 0.7, not 0.5000001
    assert recal_iou([0, 0, 10, 5], GT) == 0.5
    assert recal_iou([0, 0, 10, 7], GT) == 0.7


def test_recal_iou_rejects_non_numbers():
    with pytest.raises(ConfigError, match="not a number"):
        recal_iou(["a", 0, 1, 1], GT)


@pytest.mark.parametrize(
    ("text", "box"),
    [
        (geo_r1_answer([1, 2, 30, 40]), (1, 2, 30, 40)),
        # several boxes in one answer: Geo-R1's greedy regex takes the LAST one
        (geo_r1_answer([1, 2, 30, 40], [5, 6, 70, 80]), (5, 6, 70, 80)),
        # no <answer>: failed parse, even with a box in the text
        ('<think> here </think> {"bbox_2d": [1, 2, 30, 40]}', (0, 0, 0, 0)),
        ("<answer>I cannot find it.</answer>", (0, 0, 0, 0)),
        # a box without braces inside the answer is not read by the evaluation regex
        ("<answer>[1, 2, 30, 40]</answer>", (0, 0, 0, 0)),
        # only the first <answer> is read
        ('<answer>none</answer><answer>{"bbox_2d": [1, 2, 3, 4]}</answer>', (0, 0, 0, 0)),
        # negative numbers do not match \d+
        ('<answer>{"bbox_2d": [-1, 2, 30, 40]}</answer>', (0, 0, 0, 0)),
    ],
)
def test_geo_r1_mode_parse(text, box):
    assert extract_rec_box(text, "geo-r1") == box


@pytest.mark.parametrize("text", ['```json\n[\n\t{"bbox_2d": [12, 34, 56, 78]}\n]\n```', "None", None])
def test_sft_mode_parse_is_the_baseline_parse(text):
    # the parse's own table (sft_baseline_box) is in tests/geo_r1_qgis/core/rules/test_parsing.py
    assert extract_rec_box(text, "sft") == sft_baseline_box(text)


def test_unknown_mode():
    with pytest.raises(ConfigError, match="geo-r1"):
        extract_rec_box("x", "greedy")


def test_rescaled_iou():
    # multiples of 28: the model sees the image as it is, so both IoUs agree
    assert rescaled_iou([0, 0, 10, 7], GT, (112, 112)) == recal_iou([0, 0, 10, 7], GT)
    # 100x130 is seen as 112x140 (smart_resize): the box in model pixels scales back to the truth
    gt = [10, 13, 50, 65]
    model_box = [11.2, 14, 56, 70]  # gt x 1.12 horizontally, x 140/130 vertically
    assert rescaled_iou(model_box, gt, (100, 130)) == pytest.approx(1.0)
    assert recal_iou(model_box, gt) < 0.8
    assert rescaled_iou([0, 0, 0, 0], gt, (100, 130)) == 0.0  # degenerate after clipping
    assert rescaled_iou(None, gt, (100, 130)) == 0.0


# --------------------------------------------------------------------------------------------------
# REC counting
# --------------------------------------------------------------------------------------------------


def test_score_rec_hand_computed():
    items = [
        (geo_r1_answer([0, 0, 10, 10]), GT, True),  # IoU 1.0
        (geo_r1_answer([0, 0, 10, 5]), GT, False),  # exactly 0.5: a miss at 0.5
        (geo_r1_answer([0, 0, 10, 7]), GT, True),  # exactly 0.7: a hit at 0.5, a miss at 0.7
        ("<think>hm</think> <answer>no idea</answer>", GT, False),  # failed parse: [0,0,0,0], a miss
        (geo_r1_answer([0, 0, 10, 5], [0, 0, 10, 8]), GT, None),  # the last box counts: 0.8; unflagged
        ('<think>x</think> {"bbox_2d": [0, 0, 10, 10]}', GT, True),  # no <answer>: a miss
    ]
    scores, ious = score_rec(items, "geo-r1")
    assert ious == pytest.approx([1.0, 0.5, 0.7, 0.0, 0.8, 0.0])
    # Overall: every query is in the denominator, the failed parses included
    assert (scores.overall[0.5].correct, scores.overall[0.5].total) == (3, 6)
    assert (scores.overall[0.7].correct, scores.overall[0.7].total) == (2, 6)
    assert scores.overall[0.5].percent == 50.0
    assert scores.overall[0.7].percent == pytest.approx(100 / 3)
    # Unique: queries 1, 3, 6; Non-unique: 2, 4; the unflagged query 5 is only in Overall
    assert (scores.unique[0.5].correct, scores.unique[0.5].total) == (2, 3)
    assert (scores.unique[0.7].correct, scores.unique[0.7].total) == (1, 3)
    assert (scores.non_unique[0.5].correct, scores.non_unique[0.5].total) == (0, 2)
    assert (scores.n, scores.n_unique, scores.n_non_unique, scores.n_unflagged) == (6, 3, 2, 1)
    assert scores.mean_iou == pytest.approx(3.0 / 6)
    js = scores.to_json()
    assert js["acc@0.5"] == {"overall": 50.0, "unique": pytest.approx(200 / 3), "non_unique": 0.0}
    assert js["counts"] == {"overall": 6, "unique": 3, "non_unique": 2, "unflagged": 1}


def test_score_rec_sft_mode():
    items = [
        ("The box is [0, 0, 10, 8] and also [0, 0, 10, 10]", GT, True),  # the first: 0.8
        ('```json\n[\n\t{"bbox_2d": [-1.5, 0, 10.5, 10]}\n]\n```', GT, False),  # 100 / 120
        ("None", GT, False),
    ]
    scores, ious = score_rec(items, "sft")
    assert ious == pytest.approx([0.8, 100 / 120, 0.0])
    assert scores.overall[0.5].correct == 2
    assert scores.overall[0.7].correct == 2
    # the same outputs under Geo-R1's parse: no <answer>, every one a miss
    assert score_rec(items, "geo-r1")[0].overall[0.5].correct == 0


def test_empty_groups_report_zero():
    scores = rec_scores([])
    assert scores.overall[0.5].percent == 0.0 and scores.unique[0.7].total == 0 and scores.mean_iou == 0.0
    only_unflagged = rec_scores([(0.9, None)])
    assert only_unflagged.overall[0.5].percent == 100.0
    assert only_unflagged.unique[0.5].total == 0 and only_unflagged.non_unique[0.5].total == 0


def test_custom_thresholds_are_strict():
    scores = rec_scores([(0.3, True), (0.31, True)], thresholds=(0.3,))
    assert scores.overall[0.3].correct == 1


# --------------------------------------------------------------------------------------------------
# The fixed results file against a transcription of recal_rec_acc_unique.py
# --------------------------------------------------------------------------------------------------


def _upstream_iou(box1, box2):
    # recal_rec_acc_unique.py `iou`, line by line
    if not (isinstance(box1, list) and len(box1) == 4 and isinstance(box2, list) and len(box2) == 4):
        return 0.0
    box1 = [float(c) for c in box1]
    box2 = [float(c) for c in box2]
    inter_x1 = max(box1[0], box2[0])
    inter_y1 = max(box1[1], box2[1])
    inter_x2 = min(box1[2] - 1, box2[2] - 1)
    inter_y2 = min(box1[3] - 1, box2[3] - 1)
    if inter_x1 < inter_x2 and inter_y1 < inter_y2:
        inter = (inter_x2 - inter_x1 + 1) * (inter_y2 - inter_y1 + 1)
    else:
        inter = 0
    union = (box1[2] - box1[0]) * (box1[3] - box1[1]) + (box2[2] - box2[0]) * (box2[3] - box2[1]) - inter
    if union <= 0:
        return 0.0
    return float(inter) / union


def _upstream_accuracies(results_list, iou_thresholds):
    # recal_rec_acc_unique.py `calculate_accuracies_at_thresholds`, line by line
    if not results_list:
        return {thresh: (0.0, 0) for thresh in iou_thresholds}, 0
    total_samples = len(results_list)
    correct_counts = {threshold: 0 for threshold in iou_thresholds}
    for result in results_list:
        current_iou = _upstream_iou(result.get("extracted_answer"), result.get("ground_truth"))
        for threshold in iou_thresholds:
            if current_iou > threshold:
                correct_counts[threshold] += 1
    report = {}
    for threshold, count in correct_counts.items():
        accuracy = (count / total_samples * 100) if total_samples > 0 else 0
        report[threshold] = (accuracy, count)
    return report, total_samples


def _upstream_by_uniqueness(results_path, original_test_set_path, iou_thresholds):
    # recal_rec_acc_unique.py `analyze_by_uniqueness_multi_iou` (its counting; the prints dropped)
    uniqueness_map_ = {}
    with open(original_test_set_path, encoding="utf-8") as f:
        original_data = json.load(f)
    for item in original_data:
        key = (item.get("image"), item.get("problem"))
        uniqueness_map_[key] = item.get("is_unique", False)
    with open(results_path, encoding="utf-8") as f:
        results_data = json.load(f).get("results", [])
    unique_results = []
    non_unique_results = []
    for result in results_data:
        key = (result.get("image"), result.get("question"))
        is_unique_flag = uniqueness_map_.get(key)
        if is_unique_flag is None:
            continue
        if is_unique_flag:
            unique_results.append(result)
        else:
            non_unique_results.append(result)
    return _upstream_accuracies(unique_results, iou_thresholds), _upstream_accuracies(
        non_unique_results, iou_thresholds
    )


def _upstream_overall(results_path, iou_thresholds):
    # recal_rec_acc_unique.py `recalculate_accuracy_at_thresholds` (its counting; the prints dropped)
    with open(results_path, encoding="utf-8") as f:
        data = json.load(f)
    all_results = data.get("results", [])
    correct_counts = {threshold: 0 for threshold in iou_thresholds}
    total_samples = len(all_results)
    for result in all_results:
        current_iou = _upstream_iou(result.get("extracted_answer"), result.get("ground_truth"))
        for threshold in iou_thresholds:
            if current_iou > threshold:
                correct_counts[threshold] += 1
    return {t: ((c / total_samples * 100) if total_samples > 0 else 0, c) for t, c in correct_counts.items()}, (
        total_samples
    )


def test_fixed_results_file_matches_upstream_counting():
    """The fixed file holds every join case: exact 0.5 and 0.7, a failed parse, float boxes, a null
    extracted_answer, a duplicate record, a record absent from the unique file, an item without the
    is_unique key (non-unique upstream), an item with is_unique null (skipped), a repeated key (the last
    wins)."""
    results_path = DATA / "rec_results_fixed.json"
    unique_path = DATA / "rec_with_unique_fixed.json"
    thresholds = [0.5, 0.7]
    (unique_report, n_unique), (non_unique_report, n_non_unique) = _upstream_by_uniqueness(
        results_path, unique_path, thresholds
    )
    overall_report, n_overall = _upstream_overall(results_path, thresholds)

    data = read_results(results_path)
    scores, _ = score_results(data["results"], json.loads(unique_path.read_text()))
    assert (scores.n, scores.n_unique, scores.n_non_unique) == (n_overall, n_unique, n_non_unique)
    for t in thresholds:
        assert (scores.overall[t].percent, scores.overall[t].correct) == overall_report[t]
        assert (scores.unique[t].percent, scores.unique[t].correct) == unique_report[t]
        assert (scores.non_unique[t].percent, scores.non_unique[t].correct) == non_unique_report[t]
    # and the numbers themselves, counted by hand (see the file's comments in the test of its contents)
    assert (n_overall, n_unique, n_non_unique) == (11, 5, 4)
    assert [scores.overall[t].correct for t in thresholds] == [8, 6]
    assert [scores.unique[t].correct for t in thresholds] == [5, 4]
    assert [scores.non_unique[t].correct for t in thresholds] == [1, 1]
    assert scores.mean_iou == pytest.approx((1 + 0.5 + 0.7 + 0 + 0.8 + 1 + 0.6 + 95 / 105 + 0 + 1 + 0.9) / 11)
    # the file's own "accuracy" (test_rec_r1_eval.py: correct = iou > 0.5) is Overall Acc@0.5
    assert data["accuracy"] == pytest.approx(scores.overall[0.5].percent)
    assert sum(r["correct"] for r in data["results"]) == scores.overall[0.5].correct


def test_uniqueness_map_rules():
    table = uniqueness_map(json.loads((DATA / "rec_with_unique_fixed.json").read_text()))
    assert table[("c.png", "Q1")] is False  # no is_unique key: non-unique
    assert table[("d.png", "Q1")] is None  # null: skipped by the join
    assert table[("f.png", "Q1")] is True  # repeated key: the last item wins
    assert ("c.png", "Q2") not in table


def test_score_results_uses_record_flags_without_a_unique_file():
    results = [
        {"ground_truth": GT, "extracted_answer": [0, 0, 10, 10], "is_unique": True},
        {"ground_truth": GT, "extracted_answer": [0, 0, 10, 8], "is_unique": False},
        {"ground_truth": GT, "extracted_answer": [0, 0, 10, 9]},  # no flag: only in Overall
    ]
    scores, _ = score_results(results)
    assert (scores.n, scores.n_unique, scores.n_non_unique, scores.n_unflagged) == (3, 1, 1, 1)
    assert scores.overall[0.7].correct == 3


def test_read_results_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_results(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_results(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a Geo-R1 results file"):
        read_results(bad)


# --------------------------------------------------------------------------------------------------
# OVD
# --------------------------------------------------------------------------------------------------


def test_coco_map_single_hand_computed():
    box = [0, 0, 10, 10]
    assert coco_map_single([box], [box]) == pytest.approx(1.0)
    # a duplicate detection after a true positive does not lower the interpolated precision
    assert coco_map_single([box, box], [box]) == pytest.approx(1.0)
    # one of two objects found: precision 1 up to recall 0.5, i.e. 51 of COCO's 101 recall points
    assert coco_map_single([box], [box, [20, 20, 30, 30]]) == pytest.approx(51 / 101)
    # COCO IoU 0.82 matches at thresholds 0.50 ... 0.80: 7 of 10
    assert coco_map_single([[0, 0, 10, 8.2]], [box]) == pytest.approx(0.7)
    assert coco_map_single([[50, 50, 60, 60]], [box]) == 0.0
    assert coco_map_single([], [box]) == 0.0
    assert coco_map_single([box], []) == 0.0
    with pytest.raises(ConfigError, match="4 finite numbers"):
        coco_map_single([[0, 0, 1]], [box])


def test_coco_map_single_is_quiet(capsys):
    coco_map_single([[0, 0, 10, 10]], [[0, 0, 10, 10]])
    assert capsys.readouterr().out == ""


def test_coco_scores_hand_computed(capsys):
    box = [0, 0, 10, 10]
    queries = [
        OvdQuery("a.png", "ship", [box], [box]),  # perfect
        OvdQuery("a.png", "tank", [box], [[0, 0, 10, 8.2]]),  # IoU 0.82: AP50 1, mAP 0.7
        OvdQuery("b.png", "ship", [[20, 20, 30, 30]], []),  # missed: ship recall 0.5
    ]
    scores = coco_scores(queries)
    assert capsys.readouterr().out == ""
    assert scores.per_class["tank"] == {"AP50": pytest.approx(1.0), "mAP": pytest.approx(0.7)}
    assert scores.per_class["ship"] == {"AP50": pytest.approx(51 / 101), "mAP": pytest.approx(51 / 101)}
    ap50 = scores.AP50
    assert ap50 == pytest.approx((1 + 51 / 101) / 2)
    assert scores.mAP == pytest.approx((0.7 + 51 / 101) / 2)
    assert (scores.n_queries, scores.n_gt, scores.n_pred) == (3, 3, 2)
    js = scores.to_json()
    assert js["mAP"] == pytest.approx(scores.mAP * 100)


def test_coco_scores_edge_cases():
    box = [0, 0, 10, 10]
    empty = coco_scores([OvdQuery("a.png", "ship", [box], [])])
    assert (empty.mAP, empty.AP50, empty.per_class) == (0.0, 0.0, {"ship": {"AP50": 0.0, "mAP": 0.0}})
    # swapped corners are not reordered: a negative area lies outside COCO's area range, so it is ignored
    swapped = coco_scores([OvdQuery("a.png", "ship", [box], [[10, 10, 0, 0]])])
    assert swapped.mAP == 0.0
    # a false positive on a query with no true box (a negative chip) lowers the precision
    with_negative = coco_scores([OvdQuery("a.png", "ship", [box], [box]), OvdQuery("b.png", "ship", [], [box])])
    assert 0.0 < with_negative.mAP < 1.0
    assert math.isfinite(with_negative.AP50)
    with pytest.raises(ConfigError, match="4 values"):
        OvdQuery("a.png", "ship", [[1, 2, 3]], [])


# --------------------------------------------------------------------------------------------------
# OVD: COCO image ids (ties are ranked by image id) and odd records
# --------------------------------------------------------------------------------------------------

BOX = [0, 0, 10, 10]
FAR = [50, 50, 60, 60]
# Three images of one class, one true box each: the detection on image 1 misses, those on 2 and 3 hit.
# Every score is 1.0, so COCOeval ranks the detections by image id (a stable sort over the images in id
# order). By hand, in id order FP, TP, TP: precision after each detection 0, 1/2, 2/3 and recall 0, 1/3, 2/3;
# the interpolated precision is 2/3 at every recall point 0.00 … 0.66 (67 of COCO's 101) and 0 above, so
# AP = 67 * (2/3) / 101 at every IoU threshold (the boxes are exact): mAP = AP50 = 44.67 %.
# Numbered by row position instead, the order TP, TP, FP gives 67 / 101 (66.3 %) and TP, FP, TP gives
# (34 * 1 + 33 * 2/3) / 101 (55.4 %).
COCO_ID_ORDER_AP = 67 * (2 / 3) / 101
THREE_IMAGES = [
    OvdQuery("x.png", "ship", [BOX], [FAR], image_id=1),
    OvdQuery("y.png", "ship", [BOX], [BOX], image_id=2),
    OvdQuery("z.png", "ship", [BOX], [BOX], image_id=3),
]


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_coco_scores_rank_tied_detections_by_the_coco_image_id(order):
    scores = coco_scores([THREE_IMAGES[i] for i in order])
    assert scores.mAP == pytest.approx(COCO_ID_ORDER_AP)
    assert scores.to_json()["AP50"] == pytest.approx(COCO_ID_ORDER_AP * 100)
    assert scores.per_class["ship"]["AP50"] == pytest.approx(COCO_ID_ORDER_AP)


def test_coco_scores_ids_decide_the_ranking():
    # the same rows, the miss now on the image with the highest id: TP, TP, FP
    moved = [dataclasses.replace(q, image_id=i) for q, i in zip(THREE_IMAGES, (3, 1, 2), strict=True)]
    assert coco_scores(moved).mAP == pytest.approx(67 / 101)
    moved = [dataclasses.replace(q, image_id=i) for q, i in zip(THREE_IMAGES, (2, 1, 3), strict=True)]
    assert coco_scores(moved).mAP == pytest.approx((34 + 33 * 2 / 3) / 101)


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_coco_scores_without_ids_number_the_images_by_name(order):
    """Rows without an image_id: the images are numbered in the sorted order of their names (stable
    under any shuffle), never by row position."""
    bare = [dataclasses.replace(q, image_id=None) for q in THREE_IMAGES]
    assert coco_scores([bare[i] for i in order]).mAP == pytest.approx(COCO_ID_ORDER_AP)
    assert ovd_image_ids([bare[i] for i in order]) == {"x.png": 1, "y.png": 2, "z.png": 3}


def test_ovd_image_ids_share_an_image_and_follow_the_carried_ones():
    queries = [
        OvdQuery("b.png", "tank", [BOX], []),  # no id, but b.png has one on another row
        OvdQuery("b.png", "ship", [BOX], [], image_id=7),
        OvdQuery("c.png", "ship", [BOX], []),  # new: after the largest carried id
        OvdQuery("a.png", "ship", [BOX], []),
    ]
    assert ovd_image_ids(queries) == {"b.png": 7, "a.png": 8, "c.png": 9}


def test_ovd_image_ids_refuse_contradictions():
    with pytest.raises(ConfigError, match=r"b\.png.*image_id 1"):
        ovd_image_ids([OvdQuery("a.png", "ship", [BOX], [], image_id=1),
                       OvdQuery("b.png", "ship", [BOX], [], image_id=1)])  # fmt: skip
    with pytest.raises(ConfigError, match=r"a\.png.*image_id"):
        ovd_image_ids([OvdQuery("a.png", "ship", [BOX], [], image_id=1),
                       OvdQuery("a.png", "tank", [BOX], [], image_id=2)])  # fmt: skip
    with pytest.raises(ConfigError, match="image_id must be a whole number"):
        OvdQuery("a.png", "ship", [BOX], [], image_id="1")
    with pytest.raises(ConfigError, match="image_id must be a whole number"):
        OvdQuery("a.png", "ship", [BOX], [], image_id=True)
    with pytest.raises(ConfigError, match=r"twice.*ship.*a\.png"):
        coco_scores([OvdQuery("a.png", "ship", [BOX], [BOX], image_id=1),
                     OvdQuery("a.png", "ship", [BOX], [], image_id=1)])  # fmt: skip


def test_ovd_query_refuses_boxes_that_are_not_finite_numbers():
    with pytest.raises(ConfigError, match="finite"):
        OvdQuery("a.png", "ship", [[0, 0, float("nan"), 10]], [])
    with pytest.raises(ConfigError, match="finite"):
        OvdQuery("a.png", "ship", [BOX], [[0, "x", 10, 10]])


# --------------------------------------------------------------------------------------------------
# REC: odd records, scored as recal_rec_acc_unique.py scores them
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pred", [5, "0, 0, 10, 10", True, {"bbox_2d": BOX}, [[0, 0, 10, 10]]])
def test_odd_extracted_answers_are_misses(pred):
    # upstream's iou(): anything but a 4-item list is 0.0
    assert recal_iou(pred, GT) == 0.0
    scores, ious = score_results([{"ground_truth": GT, "extracted_answer": pred}])
    assert ious == [0.0] and scores.overall[0.5].correct == 0


def test_a_nan_in_a_box_is_a_miss_and_the_mean_iou_stays_a_number():
    # upstream: the IoU is nan, and nan > 0.5 is False: a miss; ours scores it 0.0, the same miss
    assert recal_iou([0, 0, float("nan"), 10], GT) == 0.0
    assert recal_iou(GT, [0, float("nan"), 10, 10]) == 0.0
    scores, ious = score_results([
        {"ground_truth": GT, "extracted_answer": [0, 0, float("nan"), 10]},
        {"ground_truth": GT, "extracted_answer": GT},
    ])  # fmt: skip
    assert ious == [0.0, 1.0] and scores.mean_iou == 0.5 and scores.overall[0.5].correct == 1


def test_score_results_names_the_record_it_refuses():
    with pytest.raises(ConfigError, match=r"record 2 \(b.png\).*not a number"):
        score_results([{"image": "a.png", "ground_truth": GT, "extracted_answer": GT},
                       {"image": "b.png", "ground_truth": GT, "extracted_answer": [0, None, 1, 1]}])  # fmt: skip
    with pytest.raises(ConfigError, match="record 1 is not a JSON object"):
        score_results([5])


# --------------------------------------------------------------------------------------------------
# GRES: gIoU and cIoU (LISA / EarthReason), hand-computed
# --------------------------------------------------------------------------------------------------


def _masks(shape, *slices):
    import numpy as np

    m = np.zeros(shape, dtype=bool)
    for s in slices:
        m[s] = True
    return m


def test_mask_counts_and_lisa_iou():
    from train.metrics import LISA_IOU_EPS, geo_r1_mask_iou, lisa_iou, mask_counts

    gt = _masks((4, 4), (slice(0, 2), slice(0, 4)))  # the top 2 rows: 8 pixels
    pred = _masks((4, 4), (slice(1, 3), slice(0, 4)))  # rows 1-2: 8 pixels, 4 shared
    assert mask_counts(pred, gt) == (4, 12)
    assert lisa_iou(4, 12) == 4 / (12 + LISA_IOU_EPS)
    assert lisa_iou(0, 0) == 1.0  # empty truth, empty prediction: LISA's "no-object target"
    assert lisa_iou(0, 5) == 0.0  # empty truth, 5 predicted pixels
    assert geo_r1_mask_iou(4, 12) == 4 / 12 and geo_r1_mask_iou(0, 0) == 0.0  # Geo-R1: no epsilon, U = 0 is 0
    with pytest.raises(ConfigError, match="shape"):
        mask_counts(pred, gt[:3])
    with pytest.raises(ConfigError):
        lisa_iou(5, 4)


def test_giou_and_ciou_by_hand():
    from train.metrics import gres_scores

    # (I, U, truth pixels, parsed): a partial hit 4/12, "None" on an empty truth (U = 0), false pixels on a
    # negative chip, a missed object (I = 0, U = |truth|), a perfect hit, and a failed parse on a negative
    queries = [(4, 12, 8, True), (0, 0, 0, True), (0, 5, 0, True), (0, 6, 6, True), (10, 10, 10, True),
               (0, 0, 0, False)]  # fmt: skip
    scores, ious = gres_scores(queries)
    # Geo-R1's test_gres_eval.py: I / U, and 0 where U is 0 (an empty truth never scores)
    assert ious == [4 / 12, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert scores.giou == pytest.approx((4 / 12 + 1.0) / 6, abs=1e-15)
    assert scores.ciou == 14 / 33  # (4 + 10) / (12 + 5 + 6 + 10)
    # LISA / EarthReason: I / (U + 1e-5), 1.0 where U is 0; our failed parse is 0 even there
    eps = 1e-5
    lisa = [4 / (12 + eps), 1.0, 0.0, 0.0, 10 / (10 + eps), 0.0]
    assert scores.lisa_giou == pytest.approx(sum(lisa) / 6, abs=1e-15)
    assert scores.lisa_ciou == pytest.approx(14 / (33 + 1e-10), abs=1e-15)
    assert scores.precision[0.5] == pytest.approx(2 / 6)  # 1.0 and 0.999999: strictly > 0.5
    assert scores.precision[0.9] == pytest.approx(2 / 6)
    assert (scores.n, scores.n_empty_truth, scores.failed_parses) == (6, 3, 1)
    j = scores.to_json()
    assert j["gIoU"] == pytest.approx(scores.giou * 100) and j["cIoU"] == pytest.approx(1400 / 33)
    assert j["lisa"]["gIoU"] == pytest.approx(scores.lisa_giou * 100) and "Pr@0.7" in j["lisa"]
    assert j["counts"]["union"] == 33 and j["counts"]["intersection"] == 14


def test_giou_weighs_queries_and_ciou_weighs_pixels():
    from train.metrics import gres_scores

    # a small object found perfectly and a large one half found: gIoU = (1 + 0.5) / 2, cIoU = 51 / 101
    scores, _ = gres_scores([(1, 1, 1, True), (50, 100, 100, True)])
    assert scores.giou == 0.75 and scores.ciou == 51 / 101
    assert scores.lisa_giou == pytest.approx((1 / (1 + 1e-5) + 50 / (100 + 1e-5)) / 2)
    assert scores.precision[0.5] == pytest.approx(0.5)  # LISA's 0.4999995 is not > 0.5


def test_only_empty_truths_answered_none():
    from train.metrics import gres_scores

    scores, _ = gres_scores([(0, 0, 0, True), (0, 0, 0, True)])
    assert (scores.giou, scores.ciou) == (0.0, 0.0)  # Geo-R1: U = 0 scores 0, and sum(U) = 0 gives cIoU 0
    assert (scores.lisa_giou, scores.lisa_ciou) == (1.0, 0.0)  # LISA: both "no-object targets" score 1


def test_gres_scores_of_nothing_and_bad_counts():
    from train.metrics import gres_scores

    scores, ious = gres_scores([])
    assert (scores.giou, scores.ciou, ious) == (0.0, 0.0, [])
    with pytest.raises(ConfigError):
        gres_scores([(1, 2, 3, True)])  # more truth pixels than the union
