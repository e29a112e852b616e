"""The table of ``scripts/bench_fewshot_sample.sh``: mean and spread over seeds of each arm's COCO mAP and
AP50, in percent as ``geo-r1 eval`` writes them and Geo-R1 reports them, on the new category, the pretrained
one (forgetting) and the cross-resolution set, read from the ``metrics.json`` files ``geo-r1 eval`` wrote.
Usage: ``fewshot_table.py OUT_DIR``."""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

SETS = ("new", "forget", "cross")
ARMS = ("base", "sft", "grpo", "dapo")


def collect(out: Path) -> dict[tuple[int, str, str, str], list[float]]:
    """{(K, arm, set, metric): [value per seed]} from OUT/s<seed>-k<K>/eval-<set>/metrics.json."""
    values: dict[tuple[int, str, str, str], list[float]] = defaultdict(list)
    for run in sorted(out.glob("s*-k*")):
        match = re.fullmatch(r"s(\d+)-k(\d+)", run.name)
        if not match:
            continue
        k = int(match.group(2))
        for name in SETS:
            path = run / f"eval-{name}" / "metrics.json"
            if not path.is_file():
                continue
            for arm, scores in arm_scores(path).items():
                for metric in ("mAP", "AP50"):
                    values[(k, arm, name, metric)].append(scores[metric])
    return values


def arm_scores(metrics_json: Path) -> dict[str, dict[str, float]]:
    """{model name: {"mAP", "AP50" (percent, as ``geo-r1 eval`` writes them), "format_ok" (percent or None),
    "pred_boxes", "gt_boxes", "queries"}} from one ``metrics.json`` of a ``--task multi`` evaluation."""
    models = json.loads(metrics_json.read_text(encoding="utf-8"))["models"]
    out = {}
    for arm, entry in models.items():
        scores, counts = entry["scores"], entry["scores"].get("counts", {})
        fmt = scores.get("format_ok")
        out[arm] = {"mAP": float(scores["mAP"]), "AP50": float(scores["AP50"]),
                    "format_ok": None if fmt is None else float(fmt), "pred_boxes": counts.get("pred_boxes"),
                    "gt_boxes": counts.get("gt_boxes"), "queries": counts.get("queries")}  # fmt: skip
    return out


def cell(xs: list[float]) -> str:
    if not xs:
        return "–"
    spread = f" ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else ""
    return f"{statistics.mean(xs):.1f}{spread} (n {len(xs)})"


def main(out: Path) -> str:
    values = collect(out)
    ks = sorted({k for k, *_ in values})
    lines = [
        "| K | arm | " + " | ".join(f"{s} mAP | {s} AP50" for s in SETS) + " |",
        "|---|---|" + "---|---|" * len(SETS),
    ]
    for k in ks:
        for arm in ARMS:
            row = [cell(values.get((k, arm, s, m), [])) for s in SETS for m in ("mAP", "AP50")]
            if any(c != "–" for c in row):
                lines.append(f"| {k} | {arm} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(main(Path(sys.argv[1])))
