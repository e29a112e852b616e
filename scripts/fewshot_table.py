"""The table of ``scripts/bench_fewshot_sample.sh``: mean and spread over seeds of each arm's scores, as
``geo-r1 eval`` writes them and Geo-R1 reports them (multi: COCO mAP and AP50 in percent; rec: Acc@0.5 in percent
and the mean IoU), on the held-out set, what the base model knew (forgetting) and the cross-resolution set, read
from the ``metrics.json`` files ``geo-r1 eval`` wrote.
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
METRICS = ("mAP", "AP50", "Acc@0.5", "mIoU")


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
                for metric, value in scores.items():
                    if metric in METRICS and value is not None:
                        values[(k, arm, name, metric)].append(value)
    return values


def arm_scores(metrics_json: Path) -> dict[str, dict[str, float | None]]:
    """{model name: scores} from one ``metrics.json``: a ``--task multi`` evaluation gives "mAP" and "AP50"
    (percent), a ``--task rec`` one "Acc@0.5" (percent) and "mIoU"; both give "format_ok" (percent or None) and
    "queries"."""
    models = json.loads(metrics_json.read_text(encoding="utf-8"))["models"]
    out: dict[str, dict[str, float | None]] = {}
    for arm, entry in models.items():
        scores, counts = entry["scores"], entry["scores"].get("counts", {})
        fmt = scores.get("format_ok")
        row: dict[str, float | None] = {"format_ok": None if fmt is None else float(fmt)}
        if "acc@0.5" in scores:  # rec
            row |= {"Acc@0.5": float(scores["acc@0.5"]["overall"]), "mIoU": float(scores["mean_iou"]),
                    "queries": counts.get("overall")}  # fmt: skip
        else:
            row |= {"mAP": float(scores["mAP"]), "AP50": float(scores["AP50"]), "pred_boxes": counts.get("pred_boxes"),
                    "gt_boxes": counts.get("gt_boxes"), "queries": counts.get("queries")}  # fmt: skip
        out[arm] = row
    return out


def cell(xs: list[float], digits: int = 1) -> str:
    if not xs:
        return "–"
    spread = f" ± {statistics.stdev(xs):.{digits}f}" if len(xs) > 1 else ""
    return f"{statistics.mean(xs):.{digits}f}{spread} (n {len(xs)})"


def main(out: Path) -> str:
    values = collect(out)
    ks = sorted({k for k, *_ in values})
    metrics = [m for m in METRICS if any(key[3] == m for key in values)]
    lines = [
        "| K | arm | " + " | ".join(f"{s} {m}" for s in SETS for m in metrics) + " |",
        "|---|---|" + "---|" * (len(SETS) * len(metrics)),
    ]
    for k in ks:
        for arm in ARMS:
            row = [cell(values.get((k, arm, s, m), []), 3 if m == "mIoU" else 1) for s in SETS for m in metrics]
            if any(c != "–" for c in row):
                lines.append(f"| {k} | {arm} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(main(Path(sys.argv[1])))
