"""Tests of geo_r1_qgis/core/finetune.py: the fine-tune request, its texts, the curves' scaling and the metrics."""

from __future__ import annotations

import json
import math

import pytest

from geo_r1_qgis.core.errors import ConfigError
from geo_r1_qgis.core.finetune import (
    FinetuneRequest,
    PlotFrame,
    adapter_summary,
    curve_series,
    duration_text,
    error_sentence,
    job_label,
    metric_rows,
    nice_ticks,
    progress_percent,
    progress_text,
    read_adapter_manifest,
    tick_text,
)


@pytest.fixture
def gpkg(tmp_path):
    path = tmp_path / "boxes.gpkg"
    path.write_bytes(b"SQLite format 3\x00")
    return path


# -- the request ---------------------------------------------------------------------------------------


def test_a_request_gives_the_jobs_body_with_an_absolute_path(gpkg, monkeypatch):
    monkeypatch.chdir(gpkg.parent)
    req = FinetuneRequest(annotations=gpkg.name, recipe="sft", max_steps=20, gsd=0.5, chip=336, name=" tanks ")
    assert req.body() == {"annotations": str(gpkg.resolve()), "recipe": "sft", "max_steps": 20, "max_seconds": None,
                          "gsd": 0.5, "chip": 336, "name": "tanks", "init_adapter": None}  # fmt: skip
    assert FinetuneRequest(annotations=gpkg, max_seconds=600).body()["recipe"] == "grpo"
    tuned = FinetuneRequest(annotations=gpkg, max_steps=2, options={"lora_r": 8}, eval_max_new_tokens=32).body()
    assert tuned["options"] == {"lora_r": 8} and tuned["eval_max_new_tokens"] == 32


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"annotations": ""}, "choose the annotation GeoPackage"),
        ({"annotations": "/no/such/file.gpkg"}, "does not exist"),
        ({"recipe": "ppo"}, "unknown recipe 'ppo'"),
        ({"max_steps": None}, "as steps or as minutes"),
        ({"max_seconds": 60.0}, "as steps or as minutes"),
        ({"max_steps": 0}, "steps must be between 1"),
        ({"gsd": -1.0}, "ground resolution must be > 0"),
        ({"chip": 10}, "chip must be between 28"),
        ({"options": ["lora_r"]}, "must be a mapping"),
        ({"eval_max_new_tokens": 0}, "eval_max_new_tokens must be >= 1"),
    ],
)
def test_a_bad_request_says_what_to_fix(gpkg, changes, words):
    values = {"annotations": gpkg, "max_steps": 10, **changes}
    with pytest.raises(ConfigError, match=words):
        FinetuneRequest(**values)


def test_a_file_that_is_not_a_geopackage_is_refused(tmp_path):
    other = tmp_path / "boxes.shp"
    other.write_bytes(b"x")
    with pytest.raises(ConfigError, match="not a GeoPackage"):
        FinetuneRequest(annotations=other, max_steps=5)


# -- texts ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0 s"),
        (44.6, "45 s"),
        (200, "3 min 20 s"),
        (3900, "1 h 05 min"),
        (None, ""),
        (-1, ""),
        (math.inf, ""),
        ("12", ""),
    ],
)
def test_duration_text(seconds, text):
    assert duration_text(seconds) == text


def test_progress_text_and_percent_follow_the_record():
    running = {"state": "training", "step": 3, "max_steps": 12, "elapsed_s": 12.2, "eta_s": 40}
    assert progress_text(running) == "training, step 3 of 12, 12 s so far, about 40 s left"
    assert progress_percent(running) == 25
    assert progress_text({"state": "queued", "step": 0, "max_steps": 12}) == "queued (waiting for the engine)"
    done = {"state": "done", "step": 12, "max_steps": 12, "elapsed_s": 75, "eta_s": 0}
    assert progress_text(done) == "done, step 12 of 12, took 1 min 15 s"
    assert progress_percent(done) == 100
    assert progress_percent({"state": "training", "step": 5, "max_steps": None}) == 0  # a time budget: no steps
    assert progress_percent({"state": "training", "step": 50, "max_steps": 10}) == 100


def test_job_label():
    rec = {"id": "j1", "name": "tanks", "recipe": "grpo", "state": "done", "created": "2026-12-03T09:10:11Z"}
    assert job_label(rec) == "tanks (grpo, done, 2026-12-03 09:10)"
    assert job_label({"id": "j2"}) == "j2"


@pytest.mark.parametrize(
    ("status", "payload", "error", "text"),
    [
        (422, {"detail": "the annotation file has no geo_r1_annotations layer"}, "the engine refused (HTTP 422): x",
         "Starting failed: The annotation file has no geo_r1_annotations layer."),
        (503, {"error": {"message": "install geo-r1[train] in the engine's venv.", "type": "x", "code": 503}}, "",
         "Starting failed: Install geo-r1[train] in the engine's venv."),
        (422, {"detail": [{"loc": ["body", "recipe"], "msg": "Input should be 'sft', 'grpo' or 'dapo'"}]}, None,
         "Starting failed: Input should be 'sft', 'grpo' or 'dapo'."),
        (404, None, "the engine does not know what was asked for (HTTP 404): no job 'x'",
         "Starting failed: No job 'x'."),
    ],
)  # fmt: skip
def test_error_sentence_shows_the_engines_detail_not_an_http_dump(status, payload, error, text):
    assert error_sentence(status, payload, error, "Starting") == text


# -- curves --------------------------------------------------------------------------------------------


def test_curve_series_keeps_finite_points_against_their_step():
    curves = {"step": [1, 2, 3], "reward": [0.1, None, 0.5], "format": [1.0, 1.0, float("nan")], "iou": [],
              "loss": [2.0, 1.5, 1.0]}  # fmt: skip
    series = curve_series(curves)
    assert [(key, label) for key, label, _, _ in series] == [("reward", "reward"), ("format", "format")]
    assert series[0][3] == [(1.0, 0.1), (3.0, 0.5)]
    assert series[1][3] == [(1.0, 1.0), (2.0, 1.0)]
    assert curve_series(None) == [] and curve_series({"step": [], "reward": []}) == []


@pytest.mark.parametrize(
    ("lo", "hi", "ticks"),
    [
        (0, 1, [0.0, 0.5, 1.0]),
        (0, 37, [0, 10, 20, 30, 40]),
        (-0.13, 1.2, [-0.5, 0.0, 0.5, 1.0, 1.5]),
        (5, 5, [5.0, 5.5, 6.0]),
        (3, 1, [1.0, 1.5, 2.0, 2.5, 3.0]),
    ],
)
def test_nice_ticks_cover_the_range_with_round_steps(lo, hi, ticks):
    got = nice_ticks(lo, hi)
    assert got == pytest.approx(ticks)
    assert got[0] <= min(lo, hi) and got[-1] >= max(lo, hi)


def test_plot_frame_maps_the_data_into_the_pixel_rectangle_y_upwards():
    frame = PlotFrame.fit([[(1.0, 0.2), (11.0, 0.8)]], left=30, top=10, width=200, height=100)
    assert (frame.x_lo, frame.x_hi, frame.y_lo, frame.y_hi) == (1.0, 11.0, 0.0, 1.0)
    assert frame.to_pixel(1.0, 0.0) == (30.0, 110.0)  # bottom left
    assert frame.to_pixel(11.0, 1.0) == (230.0, 10.0)  # top right
    assert frame.to_pixel(6.0, 0.5) == (130.0, 60.0)
    one = PlotFrame.fit([[(4.0, 0.5)]], 0, 0, 10, 10)
    assert one.x_hi - one.x_lo == 1  # one step still spans a range
    wide = PlotFrame.fit([[(0.0, -0.4), (1.0, 1.7)]], 0, 0, 10, 10)
    assert wide.y_lo <= -0.4 and wide.y_hi >= 1.7
    with pytest.raises(ConfigError, match="increasing"):
        PlotFrame(1, 1, 0, 1, 0, 0, 10, 10)


def test_tick_text():
    assert [tick_text(v) for v in (0.0, 10.0, 0.5, 0.125, 1e-4)] == ["0", "10", "0.5", "0.125", "0.0001"]


# -- metrics -------------------------------------------------------------------------------------------


def test_metric_rows_use_geo_r1_names_in_order_for_a_job_and_a_manifest():
    job = {"base": {"queries": 8, "mean_iou": 0.31, "acc50": 0.5, "format": None},
           "adapter": {"queries": 8, "mean_iou": 0.5, "acc50": 0.75, "format": 1.0}}  # fmt: skip
    assert metric_rows(job) == [("Acc@0.5", "50.0 %", "75.0 %"), ("mIoU", "31.0 %", "50.0 %"),
                                ("Format", "–", "100.0 %"), ("Queries", "8", "8")]  # fmt: skip
    manifest = {"before": {"mAP": 12.5, "AP50": 30.0, "f_score": 0.4}, "after": {"mAP": 20.0, "AP50": 41.25}}
    assert metric_rows(manifest) == [("mAP", "12.5 %", "20.0 %"), ("AP50", "30.0 %", "41.2 %"),
                                     ("f_score", "0.4", "–")]  # fmt: skip
    breakdown = {"base": {"acc@0.5": {"overall": 40.0, "unique": 50.0}}, "adapter": {"acc@0.5": {"overall": 60.0}}}
    assert metric_rows(breakdown) == [("Acc@0.5", "40.0 %", "60.0 %")]
    assert metric_rows(None) == [] and metric_rows({"base": None, "adapter": None}) == []


def test_adapter_summary_from_its_manifest(tmp_path):
    scores = {"before": {"acc50": 0.25, "queries": 4}, "after": {"acc50": 0.5, "queries": 4}}
    manifest = {"method": "grpo", "task": "rec", "steps": 20, "metrics": scores}
    (tmp_path / "geo_r1_adapter.json").write_text(json.dumps(manifest), encoding="utf-8")
    read = read_adapter_manifest(tmp_path)
    assert adapter_summary(read) == "GRPO rec 20 steps; Acc@0.5 25.0 % -> 50.0 %"
    assert read_adapter_manifest(tmp_path / "none") == {} and adapter_summary({}) == ""
    (tmp_path / "geo_r1_adapter.json").write_text("{oops", encoding="utf-8")
    assert read_adapter_manifest(tmp_path) == {}
