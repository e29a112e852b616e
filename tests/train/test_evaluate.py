"""Tests of train/evaluate.py (``geo-r1 eval``): re-scoring fixed results files, the report files, and
real runs of the tiny model with LoRA adapters on a tiny dataset written here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.cli import main as cli_main
from geo_r1_qgis.core.errors import ConfigError
from train.data_format import MANIFEST, ChipRecord, eval_json_name, write_records
from train.evaluate import (
    EvalConfig,
    adapter_manifest,
    infer_task,
    mode_for_adapter,
    score_multi_run,
    score_rec_run,
)

REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parent / "data"
FIXED_RESULTS = DATA / "rec_results_fixed.json"
FIXED_UNIQUE = DATA / "rec_with_unique_fixed.json"


def _eval(*argv: str) -> int:
    return cli_main(["eval", *[str(a) for a in argv]])


# --------------------------------------------------------------------------------------------------
# A tiny dataset: 112x112 chips (and one 100x130 chip, not a multiple of 28)
# --------------------------------------------------------------------------------------------------


def write_tiny_dataset(out: Path) -> Path:
    from PIL import Image, ImageDraw

    (out / "images" / "test").mkdir(parents=True)
    specs = [  # (name, size, box, is_unique)
        ("c0", (112, 112), (28, 28, 56, 56), True),
        ("c1", (112, 112), (56, 0, 84, 28), False),
        ("c2", (112, 112), (0, 56, 28, 84), None),
        ("c3", (100, 130), (10, 13, 50, 65), True),
    ]
    records = []
    for name, size, box, unique in specs:
        image = Image.new("RGB", size, (30, 40, 35))
        ImageDraw.Draw(image).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(235, 235, 220))
        rel = f"images/test/{name}.png"
        image.save(out / rel)
        common = dict(image=rel, split="test", expression="the white square", category="white square",
                      image_size=size)  # fmt: skip
        records.append(ChipRecord(id=name, task="rec", boxes=(box,), is_unique=unique, **common))
        records.append(ChipRecord(id=f"{name}-m", task="multi", boxes=(box,), **common))
    Image.new("RGB", (112, 112), (30, 40, 35)).save(out / "images/test/neg.png")
    records.append(ChipRecord(id="neg", image="images/test/neg.png", split="test", task="multi",
                              expression="the white square", category="white square", boxes=(),
                              image_size=(112, 112), negative=True))  # fmt: skip
    write_records(out, records)
    rec = [r for r in records if r.task == "rec"]
    items = [{"image": r.image, "problem": r.question, "solution": list(r.boxes[0])} for r in rec]
    (out / eval_json_name("test")).write_text(json.dumps(items), encoding="utf-8")
    with_unique = [{**item, "is_unique": r.is_unique} for item, r in zip(items, rec, strict=True)]
    (out / eval_json_name("test", with_unique=True)).write_text(json.dumps(with_unique), encoding="utf-8")
    (out / MANIFEST).write_text(json.dumps({"chip_size": 112, "seed": 0}), encoding="utf-8")
    return out


@pytest.fixture()
def tiny_dataset(tmp_path: Path) -> Path:
    return write_tiny_dataset(tmp_path / "data")


def _threads() -> None:
    import torch

    torch.set_num_threads(1)


def make_lora(model_dir: Path, out: Path, seed: int, manifest: dict | None = None,
              log_rows: list | None = None) -> Path:  # fmt: skip
    """A LoRA adapter on the language model's linear layers, with random (non-zero) B matrices so it
    changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    base = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=64,
        target_modules=r".*language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj",
        init_lora_weights=False,
    )
    get_peft_model(base, config).save_pretrained(out)
    if manifest is not None:
        (out / "geo_r1_adapter.json").write_text(json.dumps(manifest), encoding="utf-8")
    if log_rows is not None:
        (out / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log_rows), encoding="utf-8")
    return out


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        EvalConfig(out_dir=tmp_path)
    with pytest.raises(ConfigError, match="--data"):
        EvalConfig(out_dir=tmp_path, model="m")
    with pytest.raises(ConfigError, match="base"):
        EvalConfig(out_dir=tmp_path, model="m", data=tmp_path, adapters={"base": "x"})
    with pytest.raises(ConfigError, match="--mode"):
        EvalConfig(out_dir=tmp_path, model="m", data=tmp_path, mode="greedy")
    with pytest.raises(ConfigError, match="--limit"):
        EvalConfig(out_dir=tmp_path, model="m", data=tmp_path, limit=0)
    with pytest.raises(ConfigError, match="two models"):
        EvalConfig(out_dir=tmp_path, model="m", data=tmp_path, adapters={"a": "x"}, predictions={"a": "y"})
    cfg = EvalConfig(out_dir=tmp_path, predictions={"p": FIXED_RESULTS}, task="multi")
    assert cfg.new_tokens == 1024
    assert EvalConfig(out_dir=tmp_path, predictions={"p": FIXED_RESULTS}).new_tokens == 256


def test_adapter_manifest_picks_the_mode(tmp_path):
    assert adapter_manifest(tmp_path) == {}
    assert mode_for_adapter({}, "geo-r1") == "geo-r1"
    assert mode_for_adapter({"reasoning": False, "task": "rec"}, "geo-r1") == "sft"
    assert mode_for_adapter({"reasoning": True}, "sft") == "geo-r1"
    (tmp_path / "geo_r1_adapter.json").write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        adapter_manifest(tmp_path)
    (tmp_path / "geo_r1_adapter.json").write_text('{"reasoning": "yes"}')
    with pytest.raises(ConfigError, match="true or false"):
        adapter_manifest(tmp_path)


def test_infer_task():
    assert infer_task({"task": "multi", "results": []}) == "multi"
    assert infer_task({"results": [{"ground_truth": [1, 2, 3, 4]}]}) == "rec"
    assert infer_task({"results": [{"ground_truth": [[1, 2, 3, 4]]}]}) == "multi"
    assert infer_task({"results": [{"ground_truth": [[1, 2, 3, 4]]}, {"ground_truth": []}]}) == "multi"
    # Geo-R1's REC results with one odd row first: still REC (its only results format), the row a miss
    assert infer_task({"results": [{"ground_truth": [[1, 2, 3, 4]]}, {"ground_truth": [1, 2, 3, 4]}]}) == "rec"
    assert infer_task({"results": [7, {"ground_truth": None}]}) == "rec"


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert _eval("--predictions", tmp_path / "missing.json", "-o", tmp_path / "r") == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------------
# --predictions: re-scoring without a model
# --------------------------------------------------------------------------------------------------


def test_predictions_rescore_fixed_file(tmp_path, capsys):
    out = tmp_path / "report"
    assert _eval("--predictions", f"grpo={FIXED_RESULTS}", "--with-unique", FIXED_UNIQUE, "-o", out) == 0
    assert "grpo (geo-r1): Acc@0.5 72.73" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    s = metrics["models"]["grpo"]["scores"]
    # the hand counts of tests/train/test_metrics.py::test_fixed_results_file_matches_upstream_counting
    assert s["counts"] == {"overall": 11, "unique": 5, "non_unique": 4, "unflagged": 2}
    assert s["correct@0.5"] == {"overall": 8, "unique": 5, "non_unique": 1}
    assert s["correct@0.7"] == {"overall": 6, "unique": 4, "non_unique": 1}
    assert s["acc@0.5"]["overall"] == pytest.approx(800 / 11)
    assert s["unique_flags_from"] == "with_unique file"
    for name in ("report.md", "metrics.json", "grpo_results.json", "accuracy.png", "iou_hist.png"):
        assert (out / name).is_file(), name
    assert not (out / "examples.png").exists()  # no --data: no images to draw
    written = json.loads((out / "grpo_results.json").read_text())
    assert written["accuracy"] == pytest.approx(800 / 11)
    assert [r["extracted_answer"] for r in written["results"]] == [
        r["extracted_answer"] for r in json.loads(FIXED_RESULTS.read_text())["results"]
    ]
    report = (out / "report.md").read_text()
    assert "| grpo | geo-r1 |" in report and "72.73" in report and "IoU **>** t" in report
    assert "![Accuracy](accuracy.png)" in report


def test_predictions_without_flags_use_the_records_own(tmp_path):
    out = tmp_path / "report"
    assert _eval("--predictions", FIXED_RESULTS, "-o", out) == 0
    s = json.loads((out / "metrics.json").read_text())["models"]["rec_results_fixed"]["scores"]
    assert s["counts"] == {"overall": 11, "unique": 0, "non_unique": 0, "unflagged": 11}
    assert s["unique_flags_from"] == "records' is_unique"
    assert "| – |" in (out / "report.md").read_text()  # an empty split shows as –, not 0.00


def test_predictions_path_never_imports_torch(tmp_path):
    code = (
        "import sys; from engine.cli import main; "
        f"rc = main(['eval', '--predictions', {str(FIXED_RESULTS)!r}, '-o', {str(tmp_path / 'r')!r}]); "
        "assert rc == 0; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_predictions_join_the_datasets_unique_file(tmp_path, tiny_dataset):
    """Our own results file re-scored with --data: the flags come from test_rec_with_unique.json."""
    recs = [json.loads(line) for line in (tiny_dataset / "test_rec.jsonl").read_text().splitlines()]
    results = []
    for r in recs:
        x1, y1, x2, y2 = r["solution"][0]
        question = r["conversations"][0]["value"].removeprefix("<image>")  # Geo-R1's "problem"
        results.append({"image": r["image"], "question": question, "ground_truth": [x1, y1, x2, y2],
                        "model_output": "", "extracted_answer": [x1, y1, x2, y2], "correct": 1,
                        "image_size": r["image_size"]})  # fmt: skip
    file = tmp_path / "ours_results.json"
    file.write_text(json.dumps({"accuracy": 100.0, "results": results}))
    out = tmp_path / "report"
    assert _eval("--data", tiny_dataset, "--predictions", file, "-o", out) == 0
    s = json.loads((out / "metrics.json").read_text())["models"]["ours"]["scores"]
    assert s["counts"] == {"overall": 4, "unique": 2, "non_unique": 1, "unflagged": 1}
    assert s["acc@0.7"]["overall"] == 100.0
    # the 100x130 chip: the truth, read as model pixels and scaled back, is no longer the truth
    assert s["images_not_multiple_of_28"] == 1
    assert s["rescaled_mean_iou"] < s["mean_iou"] == 1.0
    assert (out / "examples.png").is_file()  # --data gives the images
    assert "not multiples of 28" in (out / "report.md").read_text()


# --------------------------------------------------------------------------------------------------
# Real runs on the tiny model
# --------------------------------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_tiny_model_with_adapters(tmp_path, tiny_rope10_dir, tiny_dataset, capsys):
    _threads()
    log_rows = [{"step": s, "loss": 2.0 / s, "reward": 0.1 * s, "rewards/iou": 0.05 * s, "kl": 0.01 * s,
                 "learning_rate": 1e-4, "seconds": s * 1.5} for s in range(1, 6)]  # fmt: skip
    grpo = make_lora(tiny_rope10_dir, tmp_path / "grpo", seed=1,
                     manifest={"method": "grpo", "task": "rec", "reasoning": True}, log_rows=log_rows)  # fmt: skip
    sft = make_lora(tiny_rope10_dir, tmp_path / "sft", seed=2, manifest={"method": "sft", "task": "rec",
                                                                          "reasoning": False})  # fmt: skip
    plain = make_lora(tiny_rope10_dir, tmp_path / "plain", seed=3)
    extra_log = tmp_path / "other_log.jsonl"
    extra_log.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\nnot json\n" + json.dumps({"step": 2, "loss": 0.5}))
    out = tmp_path / "report"
    rc = _eval("--data", tiny_dataset, "--model", tiny_rope10_dir, "--adapter", f"grpo={grpo}",
               "--adapter", f"sft={sft}", "--adapter", f"plain={plain}", "--limit", 4, "--max-new-tokens", 6,
               "--batch-size", 3, "--logs", f"other={extra_log}", "--device", "cpu", "-o", out)  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert all(f"{n} (" in printed for n in ("base", "grpo", "sft", "plain"))
    metrics = json.loads((out / "metrics.json").read_text())
    models = metrics["models"]
    assert list(models) == ["base", "grpo", "sft", "plain"]
    # the manifest's "reasoning" picks the mode per adapter; --mode (geo-r1) applies to the others
    assert {n: m["mode"] for n, m in models.items()} == {"base": "geo-r1", "grpo": "geo-r1", "sft": "sft",
                                                         "plain": "geo-r1"}  # fmt: skip
    assert models["grpo"]["method"] == "grpo" and models["sft"]["method"] == "sft"
    assert metrics["max_new_tokens"] == 6 and metrics["queries"] == 4
    results = {n: json.loads((out / f"{n}_results.json").read_text()) for n in models}
    for n, r in results.items():
        assert len(r["results"]) == 4
        assert set(r) >= {"accuracy", "results"}
        first = r["results"][0]
        assert set(first) >= {"image", "question", "ground_truth", "model_output", "extracted_answer", "correct"}
        assert r["mode"] == models[n]["mode"]
        assert models[n]["scores"]["counts"] == {"overall": 4, "unique": 2, "non_unique": 1, "unflagged": 1}
    # the question is the REC question (Geo-R1's join key), the ground truth the chip's box
    assert results["base"]["results"][0]["question"].startswith("Please provide the bounding box")
    assert results["base"]["results"][0]["ground_truth"] == [28, 28, 56, 56]
    # adapters are really switched: the same prompt gives other outputs with another adapter
    outputs = {n: [x["model_output"] for x in r["results"]] for n, r in results.items()}
    assert outputs["plain"] != outputs["base"]
    assert outputs["grpo"] != outputs["plain"]
    # learning curves from grpo's own train_log.jsonl and the --logs file
    assert set(metrics["logs"]) == {"grpo", "other"}
    for name in ("report.md", "accuracy.png", "iou_hist.png", "examples.png", "learning_curves.png"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "## Learning curves" in report and "sft" in report and "not multiples of 28" in report


def test_example_grid_shows_an_sft_mode_answer_beside_the_others(tmp_path, monkeypatch):
    """An SFT-mode model is asked the paper's baseline OVD prompt, so its results' question differs from the
    reasoning models'; the grid pairs the answers by image and record id (it drew "(not scored)" before)."""
    import matplotlib.axes
    from PIL import Image

    from train.eval_plots import example_grid

    Image.new("RGB", (56, 56)).save(tmp_path / "a.png")
    box = [[1, 1, 9, 9]]
    row = {"image": "a.png", "id": "test-00000-multi", "ground_truth": box, "extracted_answer": box}
    runs = [
        SimpleNamespace(name="base", mode="geo-r1", task="multi", results=[{**row, "question": "reasoning"}]),
        SimpleNamespace(name="sft", mode="sft", task="multi", results=[{**row, "question": "baseline"}]),
    ]
    titles: list[str] = []
    real = matplotlib.axes.Axes.set_title
    spy = lambda ax, t, *a, **k: titles.append(t) or real(ax, t, *a, **k)  # noqa: E731
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", spy)
    assert example_grid(runs, tmp_path, tmp_path / "ex.png", count=1).is_file()
    assert titles == ["1 pred / 1 true", "1 pred / 1 true"]


@pytest.mark.timeout(600)
def test_tiny_model_base_is_deterministic_and_matches_the_generation_helper(tmp_path, tiny_rope10_dir, tiny_dataset):
    """Greedy, batched with left padding: batch size 1 and 4 give the same texts."""
    _threads()
    outs = []
    for bs in (1, 4):
        out = tmp_path / f"r{bs}"
        assert _eval("--data", tiny_dataset, "--model", tiny_rope10_dir, "--limit", 4, "--max-new-tokens", 5,
                     "--batch-size", bs, "--examples", 0, "--mode", "sft", "-o", out) == 0  # fmt: skip
        outs.append([r["model_output"] for r in json.loads((out / "base_results.json").read_text())["results"]])
        assert not (out / "examples.png").exists()
    assert outs[0] == outs[1]


@pytest.mark.timeout(600)
def test_tiny_model_multi(tmp_path, tiny_rope10_dir, tiny_dataset):
    _threads()
    out = tmp_path / "report"
    assert _eval("--data", tiny_dataset, "--model", tiny_rope10_dir, "--task", "multi", "--max-new-tokens", 6,
                 "--device", "cpu", "-o", out) == 0  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    s = metrics["models"]["base"]["scores"]
    assert metrics["task"] == "multi" and metrics["queries"] == 5
    assert s["counts"]["queries"] == 4 and s["negatives"]["queries"] == 1
    assert 0.0 <= s["mAP"] <= 100.0 and "white square" in s["per_class"]
    written = json.loads((out / "base_results.json").read_text())
    assert written["task"] == "multi" and written["results"][-1]["negative"] is True
    assert (out / "accuracy.png").is_file()
    # and the multi results file re-scores to the same numbers without the model
    again = tmp_path / "again"
    assert _eval("--predictions", f"again={out / 'base_results.json'}", "-o", again) == 0
    s2 = json.loads((again / "metrics.json").read_text())["models"]["again"]["scores"]
    assert s2["mAP"] == s["mAP"] and s2["negatives"] == s["negatives"]


def test_rescoring_in_place_leaves_the_input_alone(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    target = out / "fixed_results.json"
    shutil.copy(FIXED_RESULTS, target)
    before = target.read_bytes()
    assert _eval("--predictions", target, "-o", out) == 0
    assert target.read_bytes() == before
    assert json.loads((out / "metrics.json").read_text())["models"]["fixed"]["results_file"] == "fixed_results.json"


# --------------------------------------------------------------------------------------------------
# OVD: COCO image ids, the whole-response parse, queries missing from the results
# --------------------------------------------------------------------------------------------------

SQ = [0, 0, 10, 10]
FAR = [50, 50, 60, 60]
# tests/train/test_metrics.py::COCO_ID_ORDER_AP, by hand: in COCO id order the detections are FP, TP, TP
COCO_ID_ORDER_AP = 67 * (2 / 3) / 101
OVD_ROWS = [  # three images of one class; the miss is on z.png, the image with the lowest COCO id
    {"image": "z.png", "image_id": 11, "category": "ship", "ground_truth": [SQ], "extracted_answer": [FAR]},
    {"image": "y.png", "image_id": 12, "category": "ship", "ground_truth": [SQ], "extracted_answer": [SQ]},
    {"image": "x.png", "image_id": 13, "category": "ship", "ground_truth": [SQ], "extracted_answer": [SQ]},
]


def _ovd_file(path: Path, rows: list[dict], **head) -> Path:
    rows = [{"question": "q", "model_output": "", **r} for r in rows]
    path.write_text(json.dumps({"accuracy": 0.0, "task": "multi", **head, "results": rows}))
    return path


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 2, 0)])
def test_rescoring_a_shuffled_ovd_file_gives_the_same_numbers(tmp_path, order, capsys):
    """COCOeval ranks tied detections (all scores 1.0) by image id: the rows' own COCO ids decide, not
    their order (numbered by position, (2, 1, 0) gives 67/101: TP, TP, FP) nor their names (67/101 too)."""
    file = _ovd_file(tmp_path / "ovd_results.json", [OVD_ROWS[i] for i in order])
    out = tmp_path / "r"
    assert _eval("--predictions", file, "-o", out) == 0
    s = json.loads((out / "metrics.json").read_text())["models"]["ovd"]["scores"]
    assert s["mAP"] == pytest.approx(COCO_ID_ORDER_AP * 100)
    assert s["AP50"] == pytest.approx(COCO_ID_ORDER_AP * 100)
    assert f"ovd (geo-r1): mAP {COCO_ID_ORDER_AP * 100:.2f}" in capsys.readouterr().out
    written = json.loads((out / "ovd_results.json").read_text())["results"]
    assert [r["image_id"] for r in written] == [OVD_ROWS[i]["image_id"] for i in order]


def test_rows_without_an_image_id_are_numbered_by_image_name(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "image_id"} for r in reversed(OVD_ROWS)]
    out = tmp_path / "r"
    assert _eval("--predictions", _ovd_file(tmp_path / "bare_results.json", rows), "-o", out) == 0
    s = json.loads((out / "metrics.json").read_text())["models"]["bare"]["scores"]
    # numbered by name, x.png, y.png, z.png: TP, TP, FP, so precision 1 up to recall 2/3: 67/101
    assert s["mAP"] == pytest.approx(67 / 101 * 100)


def _multi_record(name: str, box=(0, 0, 28, 28), image_id: int | None = None) -> ChipRecord:
    return ChipRecord(id=name, image=f"images/test/{name}.png", split="test", task="multi", expression="ship",
                      category="ship", boxes=(box,), image_size=(112, 112), image_id=image_id)  # fmt: skip


def test_every_results_row_we_write_carries_the_image_id():
    recs = [_multi_record("b", image_id=5), _multi_record("a")]
    results, _, _ = score_multi_run(recs, ["None", "None"], "sft")
    assert [r["image_id"] for r in results] == [5, 6]  # a.png had none: the next id after the dataset's
    rec = ChipRecord(id="r", image="images/test/r.png", split="test", task="rec", expression="ship",
                     category="ship", boxes=((0, 0, 28, 28),), image_size=(112, 112), image_id=9)  # fmt: skip
    results, _, _ = score_rec_run([rec], ["[0, 0, 28, 28]"], "sft")
    assert results[0]["image_id"] == 9


def test_geo_r1_mode_reads_the_whole_response_as_geo_r1s_ovd_script():
    """Brackets in the reasoning: Geo-R1's parse (the whole response) finds no JSON list; the reasoning-mode
    rule (only the first <answer>) finds the box, and is reported beside it, not instead of it."""
    text = '<think> the ship at [5, 5] is small </think> <answer>[{"bbox_2d": [0, 0, 28, 28]}]</answer>'
    results, scores, _ = score_multi_run([_multi_record("a", image_id=1)], [text], "geo-r1")
    assert results[0]["extracted_answer"] == []
    assert results[0]["answer_region_boxes"] == [[0, 0, 28, 28]]
    assert scores["mAP"] == 0.0
    assert scores["answer_region"]["mAP"] == pytest.approx(100.0)
    assert scores["answer_region"]["queries_differing"] == 1
    # a fenced block in the answer: both rules agree, brackets in the reasoning or not
    fenced = '<think> [a] </think> <answer>```json\n[{"bbox_2d": [0, 0, 28, 28]}]\n```</answer>'
    results, scores, _ = score_multi_run([_multi_record("a", image_id=1)], [fenced], "geo-r1")
    assert results[0]["extracted_answer"] == [[0, 0, 28, 28]] and scores["answer_region"]["queries_differing"] == 0


def test_ovd_queries_missing_from_the_results_count_as_misses_with_data(tmp_path, tiny_dataset):
    """The dataset's four positive queries, results for two of them (both exact): without --data mAP is
    100; with --data the other two true boxes are misses, so the recall stops at 1/2: by hand, precision 1
    on COCO's recall points 0.00 … 0.50 (51 of 101), AP = 51/101 at every threshold."""
    recs = [json.loads(line) for line in (tiny_dataset / "test_multi.jsonl").read_text().splitlines()]
    positives = [r for r in recs if not r["negative"]]
    rows = [{"image": r["image"], "category": r["category"], "ground_truth": r["solution"],
             "extracted_answer": r["solution"]} for r in positives[:2]]  # fmt: skip
    file = _ovd_file(tmp_path / "part_results.json", rows)
    out = tmp_path / "alone"
    assert _eval("--predictions", file, "-o", out) == 0
    assert json.loads((out / "metrics.json").read_text())["models"]["part"]["scores"]["mAP"] == pytest.approx(100)
    out = tmp_path / "with_data"
    assert _eval("--data", tiny_dataset, "--predictions", file, "-o", out) == 0
    s = json.loads((out / "metrics.json").read_text())["models"]["part"]["scores"]
    assert s["mAP"] == pytest.approx(51 / 101 * 100) and s["AP50"] == pytest.approx(51 / 101 * 100)
    assert s["missing_from_results"] == {"queries": 2, "gt_boxes": 2}
    assert s["counts"]["gt_boxes"] == 4
    assert "2 queries of the dataset" in (out / "report.md").read_text()
    # the written file holds them (marked), so it re-scores to the same numbers without --data
    again = tmp_path / "again"
    assert _eval("--predictions", f"again={out / 'part_results.json'}", "-o", again) == 0
    assert json.loads((again / "metrics.json").read_text())["models"]["again"]["scores"]["mAP"] == s["mAP"]


# --------------------------------------------------------------------------------------------------
# Odd records: scored as Geo-R1 scores them, or refused in one line naming the record
# --------------------------------------------------------------------------------------------------


def _cli(*argv) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([str(REPO / ".venv/bin/geo-r1"), "eval", *[str(a) for a in argv]], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)  # fmt: skip


def test_odd_rec_records_are_scored_as_geo_r1_through_the_cli(tmp_path):
    gt = [0, 0, 10, 10]
    rows = [
        {"image": "a.png", "question": "Q", "ground_truth": [gt], "extracted_answer": gt},  # nested truth first
        {"image": "b.png", "question": "Q", "ground_truth": gt, "extracted_answer": 5},
        {"image": "c.png", "question": "Q", "ground_truth": gt, "extracted_answer": "[0, 0, 10, 10]"},
        {"image": "d.png", "question": "Q", "ground_truth": gt, "extracted_answer": True},
        {"image": "e.png", "question": "Q", "ground_truth": gt, "extracted_answer": [0, 0, float("nan"), 10]},
        {"image": "f.png", "question": "Q", "ground_truth": gt, "extracted_answer": gt, "image_size": "big"},
    ]
    file = tmp_path / "odd_results.json"
    file.write_text(json.dumps({"accuracy": 0.0, "results": rows}))  # Geo-R1's format: no task key
    done = _cli("--predictions", file, "-o", tmp_path / "r")
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    s = m["models"]["odd"]["scores"]
    # upstream's iou(): 0.0 for the nested truth and for every answer that is not a 4-item list; nan for
    # the NaN box, a miss; only f.png's answer hits
    assert m["task"] == "rec" and s["counts"]["overall"] == 6
    assert s["correct@0.5"]["overall"] == 1 and s["correct@0.7"]["overall"] == 1
    assert s["mean_iou"] == pytest.approx(1 / 6)
    assert s["failed_parses"] == 4  # 5, the string, True and the NaN box are no box


@pytest.mark.parametrize(
    ("task", "rows", "named"),
    [
        ("rec", [{"image": "a.png", "ground_truth": [0, 0, 1, 1], "extracted_answer": [0, 0, 1, 1]},
                 {"image": "b.png", "ground_truth": [0, 0, 1, 1], "extracted_answer": [0, None, 1, 1]}],
         "record 2 (b.png)"),
        ("rec", [7], "record 1"),
        ("multi", [{"image": "a.png", "category": "ship", "ground_truth": [[0, 0, "x", 1]], "extracted_answer": []}],
         "record 1 (a.png)"),
        ("multi", [{"image": "a.png", "category": "ship", "ground_truth": 3, "extracted_answer": []}],
         "record 1 (a.png)"),
    ],
)  # fmt: skip
def test_records_that_cannot_be_scored_are_refused_in_one_line(tmp_path, task, rows, named):
    file = tmp_path / "bad_results.json"
    file.write_text(json.dumps({"accuracy": 0.0, "task": task, "results": rows}))
    done = _cli("--predictions", file, "-o", tmp_path / "r")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and named in done.stderr, done.stderr


# --------------------------------------------------------------------------------------------------
# What the report and the summary say
# --------------------------------------------------------------------------------------------------


def test_unique_dashes_say_why(tmp_path, capsys):
    out = tmp_path / "r"
    assert _eval("--predictions", FIXED_RESULTS, "-o", out) == 0
    stdout = capsys.readouterr().out
    assert "unique/non-unique –: no record carries an is_unique flag" in stdout and "--with-unique" in stdout
    report = (out / "report.md").read_text()
    assert "Unique and Non-unique show – for rec_results_fixed: no record carries an `is_unique` flag" in report
    assert "--with-unique" in report


def test_summary_line_gives_unique_and_non_unique_at_both_thresholds(tmp_path, capsys):
    assert _eval("--predictions", f"grpo={FIXED_RESULTS}", "--with-unique", FIXED_UNIQUE, "-o", tmp_path / "r") == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("grpo"))
    # the hand counts of test_predictions_rescore_fixed_file: @0.7 unique 4/5, non-unique 1/4
    assert "Acc@0.7 54.55 (unique 80.00, non-unique 25.00)" in line, line


def test_an_sft_baseline_file_is_labelled_sft_without_a_format_rate(tmp_path, capsys):
    """A results file of Geo-R1's test_rec_baseline_eval.py: no mode key, outputs without <answer>."""
    rows = [
        {
            "image": f"{i}.png",
            "question": "Q",
            "ground_truth": [0, 0, 10, 10],
            "model_output": f'```json\n[{{"bbox_2d": [0, 0, 10, {h}], "label": "tank"}}]\n```',
            "extracted_answer": [0.0, 0.0, 10.0, float(h)],
            "correct": int(h > 5),
        }
        for i, h in enumerate((10, 4))
    ]
    file = tmp_path / "sft_results.json"
    file.write_text(json.dumps({"accuracy": 50.0, "results": rows}))
    out = tmp_path / "r"
    assert _eval("--predictions", file, "-o", out) == 0
    assert "sft (sft): Acc@0.5 50.00" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())["models"]["sft"]
    assert m["mode"] == "sft" and m["scores"]["format_ok"] is None
    assert any("no output holds <answer>" in n for n in m["notes"])
    report = (out / "report.md").read_text()
    row = next(ln for ln in report.splitlines() if ln.startswith("| sft |"))
    assert row.startswith("| sft | sft |") and row.rstrip().endswith("| – |")
    # --mode says it outright (a file's own mode key would win over both)
    assert _eval("--predictions", file, "--mode", "geo-r1", "-o", tmp_path / "r2") == 0
    assert json.loads((tmp_path / "r2" / "metrics.json").read_text())["models"]["sft"]["mode"] == "geo-r1"


# --------------------------------------------------------------------------------------------------
# GRES: results re-scored from their counts (the model runs are in test_gres_eval.py)
# --------------------------------------------------------------------------------------------------


def _gres_rows() -> list[dict]:
    # the hand-computed queries of test_metrics.py::test_giou_and_ciou_by_hand, two categories
    counts = [(4, 12, 8, True, "tank"), (0, 0, 0, True, "tank"), (0, 5, 0, True, "tank"), (0, 6, 6, True, "roof"),
              (10, 10, 10, True, "roof"), (0, 0, 0, False, "roof")]  # fmt: skip
    return [
        {"image": f"images/test/g{i}.png", "image_id": i + 1, "question": "q", "model_output": "<think> t </think> "
         "<answer>None</answer>", "extracted_answer": [], "intersection": inter, "union": union,
         "truth_pixels": truth, "parsed": parsed, "category": cat}
        for i, (inter, union, truth, parsed, cat) in enumerate(counts)
    ]  # fmt: skip


def test_gres_predictions_are_rescored_from_their_counts(tmp_path, capsys):
    file = tmp_path / "gres_results.json"
    file.write_text(json.dumps({"results": _gres_rows()}), encoding="utf-8")  # no task key: told by the counts
    out = tmp_path / "report"
    assert _eval("--predictions", f"grpo={file}", "-o", out) == 0
    assert "grpo (geo-r1): gIoU 22.22, cIoU 42.42" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "gres"
    s = metrics["models"]["grpo"]["scores"]
    assert s["gIoU"] == pytest.approx((4 / 12 + 1.0) / 6 * 100) and s["cIoU"] == pytest.approx(1400 / 33)
    assert s["lisa"]["gIoU"] == pytest.approx((4 / (12 + 1e-5) + 1.0 + 10 / (10 + 1e-5)) / 6 * 100)
    assert s["counts"] == {"queries": 6, "empty_truth": 3, "failed_parses": 1, "intersection": 14, "union": 33}
    # per class, Geo-R1's counting: tank (4/12 + 0 + 0) / 3 and 4 / 17; roof (0 + 1 + 0) / 3 and 10 / 16
    tank, roof = s["per_class"]["tank"], s["per_class"]["roof"]
    assert tank["gIoU"] == pytest.approx(100 / 9) and tank["cIoU"] == pytest.approx(400 / 17)
    assert roof["gIoU"] == pytest.approx(100 / 3) and roof["cIoU"] == pytest.approx(62.5)
    assert s["format_ok"] == pytest.approx(100.0)
    report = (out / "report.md").read_text()
    assert "| grpo | geo-r1 |" in report and "22.22" in report and "LISA gIoU" in report and "Per class" in report
    written = json.loads((out / "grpo_results.json").read_text())
    assert written["task"] == "gres" and written["overall_gIoU"] == pytest.approx((4 / 12 + 1.0) / 6)
    assert (out / "accuracy.png").is_file() and (out / "iou_hist.png").is_file()


@pytest.mark.parametrize(
    ("bad", "named"),
    [({"union": None}, "union must be a whole number"), ({"intersection": 20}, "cannot exceed the union")],
)
def test_gres_records_that_cannot_be_scored_are_refused(tmp_path, capsys, bad, named):
    rows = _gres_rows()
    rows[2].update(bad)
    file = tmp_path / "gres_results.json"
    file.write_text(json.dumps({"results": rows}), encoding="utf-8")
    assert _eval("--predictions", file, "-o", tmp_path / "r") != 0
    err = capsys.readouterr().err
    assert "record 3" in err and named in err
