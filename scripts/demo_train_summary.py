"""The before and after of ``make demo-train`` (scripts/demo_train.sh): the base model and each arm on the
few-shot domain (REPORT/new) and on what the sample model already knew (REPORT/known), read from the
``metrics.json`` each ``geo-r1 eval`` wrote, as a Markdown page with both reports' example chips.
Usage: ``demo_train_summary.py REPORT_DIR --gsd GSD --shots K``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fewshot_table import arm_scores

SETS = {"new": "few-shot domain: tanks at {gsd} m", "known": "known: tanks at 0.5 m (forgetting)"}


def _cell(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def verdict(base: dict[str, float], arm: dict[str, float]) -> str:
    """A plain word on one arm against the base, in mAP points (1 point either way counts as no change)."""
    gain = arm["mAP"] - base["mAP"]
    return "better" if gain >= 1.0 else "worse" if gain <= -1.0 else "no change"


def main(report: Path, gsd: float, shots: int) -> str:
    scores = {name: arm_scores(report / name / "metrics.json") for name in SETS}
    arms = list(scores["new"])
    lines = [f"# make demo-train: before and after ({shots} shots of 'all storage tanks' at {gsd} m)", "",
             "COCO mAP / AP50 in percent (`geo-r1 eval --task multi`, Geo-R1's OVD metric) on held-out chips; "
             "'vs base' compares mAP (±1 point: no change); format ok: answers in Geo-R1's format.", "",
             "| model | " + " | ".join(f"{SETS[s].format(gsd=gsd)}: mAP / AP50 | vs base | format ok %"
                                        for s in SETS) + " |",
             "|---|" + "---:|---|---:|" * len(SETS)]  # fmt: skip
    for arm in arms:
        row = []
        for name in SETS:
            s, base = scores[name].get(arm), scores[name].get("base")
            if s is None:
                row += ["–", "–", "–"]
                continue
            versus = "–" if arm == "base" or base is None else verdict(base, s)
            row += [f"{_cell(s['mAP'])} / {_cell(s['AP50'])}", versus, _cell(s["format_ok"], 0)]
        lines.append(f"| {arm} | " + " | ".join(row) + " |")
    best = max((a for a in arms if a != "base"), key=lambda a: scores["new"][a]["mAP"], default=None)
    lines.append("")
    if best is not None and verdict(scores["new"]["base"], scores["new"][best]) == "better":
        lines.append(f"Best on the few-shot domain: **{best}**, {scores['new']['base']['mAP']:.1f} → "
                     f"{scores['new'][best]['mAP']:.1f} mAP; on the known tanks it has "
                     f"{scores['known'][best]['mAP']:.1f} (base {scores['known']['base']['mAP']:.1f}).")  # fmt: skip
    else:
        lines.append("**No arm improved on the base model in the few-shot domain** in this budget.")
    for name in SETS:
        lines += [
            "",
            f"## {SETS[name].format(gsd=gsd)} (green: truth, red: prediction)",
            "",
            f"![examples]({name}/examples.png)",
            "",
            f"Full report: [{name}/report.md]({name}/report.md)",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("--gsd", type=float, required=True)
    ap.add_argument("--shots", type=int, required=True)
    args = ap.parse_args()
    sys.stdout.write(main(args.report, args.gsd, args.shots))
