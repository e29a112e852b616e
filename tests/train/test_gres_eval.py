"""``geo-r1 eval --task gres`` with real models: the tiny Qwen2.5-VL and the tiny SAM 2, on a synthetic dataset whose
gres records come from the sample scenes' outlines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.runtime.sam import MaskPrompt, SamMasker
from geo_r1_qgis.core.rules.gres_truth import truth_mask
from train.data_format import read_records
from train.evaluate import EvalConfig, run, score_gres_run
from train.metrics import mask_counts


@pytest.fixture(scope="module")
def gres_data(tmp_path_factory) -> Path:
    from train.dataset import SyntheticConfig, build_synthetic

    out = tmp_path_factory.mktemp("gres") / "data"
    build_synthetic(SyntheticConfig(out_dir=out, shots=1, negatives=1, chips_per_box=1))
    return out


def test_oracle_answers_score_their_sam_masks(gres_data, tiny_sam_dir):
    """The dataset's own target answers, scored: each positive query's counts are those of the SAM masks of its
    true boxes and keypoints (computed here independently), the negatives' "None" has I = U = 0."""
    masker = SamMasker.load(tiny_sam_dir)
    records = read_records(gres_data, "test", "gres")
    assert any(r.negative for r in records) and any(r.boxes for r in records)
    outputs = [f"<think> I look. </think> <answer>{r.solution_text}</answer>" for r in records]
    results, scores, values = score_gres_run(records, outputs, "geo-r1", masker, gres_data)
    assert len(results) == len(records) == len(values)
    for r, row in zip(records, results, strict=True):
        truth = truth_mask(r.outlines, r.image_size)
        assert row["parsed"] and row["truth_pixels"] == int(truth.sum())
        assert [item["bbox_2d"] for item in row["extracted_answer"]] == [list(map(float, b)) for b in r.boxes]
        if r.negative:
            assert (row["intersection"], row["union"], row["iou"]) == (0, 0, 0.0)
            continue
        rgb = np.asarray(Image.open(gres_data / r.image).convert("RGB"))
        pred = np.zeros(truth.shape, dtype=bool)
        for m in masker.masks(rgb, [MaskPrompt(b, k) for b, k in zip(r.boxes, r.keypoints, strict=True)]):
            pred |= m
        assert (row["intersection"], row["union"]) == mask_counts(pred, truth)
    n_neg = sum(r.negative for r in records)
    assert scores["counts"]["queries"] == len(records) and scores["counts"]["empty_truth"] == n_neg
    assert scores["counts"]["failed_parses"] == 0 and scores["format_ok"] == 100.0
    # Geo-R1 scores the negatives 0, LISA 1: LISA's gIoU is higher by n_neg / N exactly (up to its 1e-5)
    assert scores["lisa"]["gIoU"] - scores["gIoU"] == pytest.approx(100 * n_neg / len(records), abs=1e-3)


def test_eval_task_gres_with_the_tiny_models_and_rescoring(gres_data, tiny_format_model_dir, tiny_sam_dir, tmp_path):
    import torch

    torch.set_num_threads(1)
    out = tmp_path / "report"
    cfg = EvalConfig(out_dir=out, data=gres_data, model=str(tiny_format_model_dir), task="gres",
                     sam=str(tiny_sam_dir), limit=4, max_new_tokens=48, examples=2)  # fmt: skip
    metrics = run(cfg)
    s = metrics["models"]["base"]["scores"]
    assert metrics["task"] == "gres" and metrics["max_new_tokens"] == 48 and s["counts"]["queries"] == 4
    rows = json.loads((out / "base_results.json").read_text())["results"]
    records = {r.id: r for r in read_records(gres_data, "test", "gres")}
    for row in rows:
        assert 0 <= row["intersection"] <= row["union"]
        truth = truth_mask(records[row["id"]].outlines, records[row["id"]].image_size)
        assert row["truth_pixels"] == int(truth.sum()) and row["truth_pixels"] <= row["union"]
        assert row["iou"] == (row["intersection"] / row["union"] if row["union"] else 0.0)
    for name in ("report.md", "metrics.json", "accuracy.png", "iou_hist.png", "examples.png"):
        assert (out / name).is_file(), name
    # the results file re-scored from its counts, without SAM or a model: the same numbers
    again = run(EvalConfig(out_dir=tmp_path / "again", predictions={"base": out / "base_results.json"}))
    s2 = again["models"]["base"]["scores"]
    assert {k: s2[k] for k in ("gIoU", "cIoU", "lisa", "counts")} == {
        k: s[k] for k in ("gIoU", "cIoU", "lisa", "counts")
    }


def test_gres_needs_a_sam(tmp_path, gres_data):
    from geo_r1_qgis.core.errors import ConfigError

    with pytest.raises(ConfigError, match="--sam MODEL"):
        EvalConfig(out_dir=tmp_path, data=gres_data, model="m", task="gres")
    with pytest.raises(ConfigError, match="only Geo-R1's reasoning prompt"):
        EvalConfig(out_dir=tmp_path, data=gres_data, model="m", task="gres", sam="s", mode="sft")
