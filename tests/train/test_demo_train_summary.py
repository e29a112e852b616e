"""scripts/demo_train_summary.py, the before-and-after page of `make demo-train` (issue 18 §2/§4), on
hand-written metrics.json files of the shape `geo-r1 eval --task multi` writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "demo_train_summary.py"


def _metrics(path: Path, scores: dict[str, tuple[float, float, float | None]]) -> None:
    models = {name: {"scores": {"mAP": m, "AP50": ap50, "format_ok": fmt,
                                "counts": {"queries": 4, "gt_boxes": 9, "pred_boxes": 7}}}
              for name, (m, ap50, fmt) in scores.items()}  # fmt: skip
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps({"models": models}), encoding="utf-8")


def _summary(report: Path) -> str:
    done = subprocess.run([sys.executable, str(SCRIPT), str(report), "--gsd", "1.5", "--shots", "10"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return done.stdout


def test_rows_verdicts_and_the_plain_no_gain_line(tmp_path):
    _metrics(tmp_path / "new", {"base": (0.6, 2.1, 97.0), "sft": (0.0, 0.0, None), "grpo": (1.1, 1.8, 100.0)})
    _metrics(tmp_path / "known", {"base": (37.5, 61.0, 100.0), "sft": (0.0, 0.0, None), "grpo": (10.9, 17.3, 100.0)})
    page = _summary(tmp_path)
    assert "| base | 0.6 / 2.1 | – | 97 | 37.5 / 61.0 | – | 100 |" in page
    assert "| sft | 0.0 / 0.0 | no change | – | 0.0 / 0.0 | worse | – |" in page  # within a point of 0.6
    assert "| grpo | 1.1 / 1.8 | no change | 100 | 10.9 / 17.3 | worse | 100 |" in page
    assert "**No arm improved on the base model in the few-shot domain**" in page
    assert "![examples](new/examples.png)" in page and "![examples](known/examples.png)" in page


def test_a_gain_names_the_best_arm_and_what_it_kept(tmp_path):
    _metrics(tmp_path / "new", {"base": (0.6, 2.1, 97.0), "sft": (4.0, 9.0, None), "dapo": (12.5, 30.0, 100.0)})
    _metrics(tmp_path / "known", {"base": (37.5, 61.0, 100.0), "sft": (30.0, 50.0, None), "dapo": (20.0, 40.0, 99.0)})
    page = _summary(tmp_path)
    assert "| sft | 4.0 / 9.0 | better |" in page
    assert "Best on the few-shot domain: **dapo**, 0.6 → 12.5 mAP; on the known tanks it has 20.0 (base 37.5)." in page
    assert "No arm improved" not in page
