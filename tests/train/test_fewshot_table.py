"""scripts/fewshot_table.py, the few-shot benchmark's table (issue 18 §4), on hand-written metrics.json files of
the shapes `geo-r1 eval --task rec` and `--task multi` write: mean and spread over the seeds, per K and arm."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fewshot_table.py"


def _rec(path: Path, scores: dict[str, tuple[float, float]]) -> None:
    models = {name: {"scores": {"acc@0.5": {"overall": acc, "unique": acc, "non_unique": None}, "mean_iou": miou,
                                "format_ok": 100.0, "counts": {"overall": 32, "unique": 32, "non_unique": 0}}}
              for name, (acc, miou) in scores.items()}  # fmt: skip
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps({"models": models}), encoding="utf-8")


def _table(out: Path) -> list[str]:
    done = subprocess.run([sys.executable, str(SCRIPT), str(out)], capture_output=True, text=True, check=True)
    return done.stdout.splitlines()


def test_rec_runs_give_accuracy_and_mean_iou_with_the_spread_over_seeds(tmp_path):
    for seed, sft in ((1, 20.0), (2, 30.0)):
        for name in ("new", "forget", "cross"):
            _rec(tmp_path / f"s{seed}-k5" / f"eval-{name}", {"base": (0.0, 0.02), "sft": (sft, sft / 100)})
    _rec(tmp_path / "s1-k1" / "eval-new", {"base": (0.0, 0.02)})
    (tmp_path / "notes").mkdir()  # not a run: ignored
    lines = _table(tmp_path)
    assert lines[0] == (
        "| K | arm | new Acc@0.5 | new mIoU | forget Acc@0.5 | forget mIoU | cross Acc@0.5 | cross mIoU |"
    )
    assert "| 1 | base | 0.0 (n 1) | 0.020 (n 1) | – | – | – | – |" in lines
    # mean 25.0, sample standard deviation 7.1 over the two seeds; mean IoU to three places
    assert "| 5 | sft | 25.0 ± 7.1 (n 2) | 0.250 ± 0.071 (n 2) | 25.0 ± 7.1 (n 2) | 0.250 ± 0.071 (n 2) " \
           "| 25.0 ± 7.1 (n 2) | 0.250 ± 0.071 (n 2) |" in lines  # fmt: skip
    assert not any(line.startswith("| 5 | grpo") for line in lines)  # an arm with no scores has no row


def test_multi_runs_give_map_and_ap50(tmp_path):
    path = tmp_path / "s3-k10" / "eval-new"
    path.mkdir(parents=True)
    scores = {"mAP": 0.4, "AP50": 1.5, "format_ok": None, "counts": {"queries": 48, "gt_boxes": 90, "pred_boxes": 3}}
    (path / "metrics.json").write_text(json.dumps({"models": {"sft": {"scores": scores}}}), encoding="utf-8")
    lines = _table(tmp_path)
    assert lines[0].startswith("| K | arm | new mAP | new AP50 | forget mAP |")
    assert "| 10 | sft | 0.4 (n 1) | 1.5 (n 1) | – | – | – | – |" in lines
