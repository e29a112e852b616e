"""The PNG plots of ``geo-r1 eval`` (matplotlib, Agg backend): accuracy bars, per-query IoU histograms,
an example grid of chips with true (green) and predicted (red) boxes, and learning curves from the
trainers' ``train_log.jsonl``. Each function returns the PNG's path, or None when there is nothing to draw.
"""

from __future__ import annotations

import json
import logging
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TRUE_COLOUR = "#1db954"
PRED_COLOUR = "#e8202a"
#: learning-curve keys drawn first, in this order; the other numeric keys follow alphabetically
CURVE_PRIORITY = ("loss", "reward", "format", "iou", "od", "kl", "lr", "learning_rate", "reward_std", "entropy",
                  "grad_norm", "completions/mean_length", "frac_reward_zero_std")  # fmt: skip
#: not curves: the x axis, clocks, and the trainer's end-of-run summary row
CURVE_SKIP = ("step", "epoch", "seconds", "global_step", "total_flos")
CURVE_SKIP_PREFIXES = ("train_",)
MAX_CURVES = 12


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, png: Path) -> Path:
    fig.savefig(png, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return png


def accuracy_bars(runs: Sequence[Any], png: Path) -> Path | None:
    """Grouped bars, one colour per model: Acc@0.5 / Acc@0.7 Overall, Unique, Non-unique (rec), or
    mAP / AP50 (multi)."""
    if not runs:
        return None
    plt = _pyplot()
    if runs[0].task == "rec":
        splits = [("Overall", "overall")] + [
            (label, key) for label, key in (("Unique", "unique"), ("Non-unique", "non_unique"))
            if any(r.scores["counts"][key] for r in runs)  # a split no model has is left out
        ]  # fmt: skip
        groups = [(f"Acc@{t}\n{label}", f"acc@{t}", key) for t in ("0.5", "0.7") for label, key in splits]
        values = [[r.scores[metric][key] for _, metric, key in groups] for r in runs]
        counts = [r.scores["counts"] for r in runs]
        labels = [g[0] for g in groups]
        ylabel = "% of queries (IoU > t)"
    elif runs[0].task == "gres":
        labels = ["gIoU", "cIoU", "LISA\ngIoU", "LISA\ncIoU"]
        values = [[r.scores["gIoU"], r.scores["cIoU"], r.scores["lisa"]["gIoU"], r.scores["lisa"]["cIoU"]]
                  for r in runs]  # fmt: skip
        counts = None
        ylabel = "mask IoU (%)"
    else:
        labels = ["mAP\nAP@[.5:.95]", "AP50", "mAP with\nnegatives"]
        values = [[r.scores["mAP"], r.scores["AP50"], r.scores["with_negatives"]["mAP"]] for r in runs]
        counts = None
        ylabel = "COCO AP (%)"
    n = len(runs)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(labels) + 0.5 * n * len(labels) * 0.3), 4.2))
    cmap = plt.get_cmap("tab10")
    for i, (run, vals) in enumerate(zip(runs, values, strict=True)):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(labels))]
        bars = ax.bar(xs, vals, width * 0.92, label=f"{run.name} ({run.mode})", color=cmap(i % 10))
        for bar, v in zip(bars, vals, strict=True):
            ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")  # fmt: skip
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel(ylabel)
    top = max((v for vals in values for v in vals), default=0.0)
    ax.set_ylim(0, min(105.0, max(10.0, top * 1.15 + 2)))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    if counts is not None:
        title = "REC accuracy (Geo-R1 counting)"
    elif runs[0].task == "gres":
        title = f"GRES masks through SAM: {runs[0].scores['counts']['queries']} queries"
    else:
        title = f"OVD COCO AP: {runs[0].scores['counts']['queries']} positive queries"
    if counts is not None:
        c = counts[0]
        title += f": N={c['overall']}, unique {c['unique']}, non-unique {c['non_unique']}"
    ax.set_title(title, fontsize=10)
    return _save(fig, png)


def value_histograms(runs: Sequence[Any], png: Path) -> Path | None:
    """One histogram per model of the per-query IoU (rec) or AP@[.5:.95] (multi), 0.05 bins."""
    runs = [r for r in runs if r.values]
    if not runs:
        return None
    plt = _pyplot()
    n = len(runs)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False, sharex=True)
    bins = [i / 20 for i in range(21)]
    rec = runs[0].task == "rec"
    from matplotlib.ticker import MaxNLocator

    for ax, run in zip(axes.flat, runs, strict=False):
        ax.hist([min(max(v, 0.0), 1.0) for v in run.values], bins=bins, color="#4c72b0", edgecolor="white")
        if rec:
            for t in (0.5, 0.7):
                ax.axvline(t, color="grey", ls="--", lw=0.8)
        mean = sum(run.values) / len(run.values)
        ax.set_title(f"{run.name} ({run.mode}): mean {mean:.3f}", fontsize=9)
        ax.set_xlim(0, 1)
        label = {"rec": "IoU with the true box", "gres": "mask IoU (Geo-R1's)"}.get(run.task, "AP@[.5:.95] per query")
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("queries", fontsize=8)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    return _save(fig, png)


def _boxes(value: Any, task: str) -> list[list[float]]:
    if not isinstance(value, list) or not value:
        return []
    items = [value] if task == "rec" else value
    items = [b.get("bbox_2d") if isinstance(b, dict) else b for b in items]  # gres: {"bbox_2d", "keypoint1", ...}
    return [list(map(float, b)) for b in items if isinstance(b, list) and len(b) == 4]


def _query_key(result: Mapping[str, Any]) -> tuple[Any, ...]:
    """The same query across models: its image and record id; the question only where there is no id (an
    SFT-mode model is asked the paper's baseline prompt, so its question differs from the others')."""
    if result.get("id") is not None:
        return (result.get("image"), result.get("id"))
    return (result.get("image"), result.get("question"))


def example_grid(runs: Sequence[Any], data_dir: Path | None, png: Path, count: int = 8) -> Path | None:
    """Rows: models; columns: the first ``count`` queries of the first model. Each chip with its true
    boxes (green) and the model's boxes (red, as written: not rescaled)."""
    if not runs or count <= 0 or data_dir is None:
        return None
    from PIL import Image

    pool = runs[0].results
    if len(pool) > count > 1:  # spread over the whole set, deterministically
        pool = [pool[round(i * (len(pool) - 1) / (count - 1))] for i in range(count)]
    first = pool[:count]
    keys = [_query_key(r) for r in first]
    images = []
    for r in first:
        path = Path(data_dir) / str(r.get("image"))
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except OSError:
            log.warning("example grid: cannot read %s; no example grid", path)
            return None
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    cols, rows = len(first), len(runs)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.35 * rows + 0.3), squeeze=False)
    for i, run in enumerate(runs):
        by_key = {_query_key(r): r for r in run.results}
        for j, key in enumerate(keys):
            ax = axes[i][j]
            ax.imshow(images[j], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            w, h = images[j].size
            ax.set_xlim(-0.5, w - 0.5)
            ax.set_ylim(h - 0.5, -0.5)
            res = by_key.get(key)
            if res is None:
                ax.set_title("(not scored)", fontsize=7)
                continue
            task = run.task
            # the truth wide and solid, the prediction dashed on top: both stay visible when they coincide
            styles = ((TRUE_COLOUR, _boxes(res.get("ground_truth"), task), 2.6, "-"),
                      (PRED_COLOUR, _boxes(res.get("extracted_answer"), task), 1.3, "--"))  # fmt: skip
            for colour, boxes, lw, ls in styles:
                for b in boxes:
                    if b == [0.0, 0.0, 0.0, 0.0]:
                        continue  # the failed-parse placeholder
                    ax.add_patch(Rectangle((b[0] - 0.5, b[1] - 0.5), b[2] - b[0], b[3] - b[1], fill=False,
                                           edgecolor=colour, lw=lw, ls=ls))  # fmt: skip
            if task == "gres":
                iou = res.get("iou")
                ax.set_title(f"mask IoU {iou:.2f}" if isinstance(iou, (int, float)) else "", fontsize=7)
            elif task == "rec":
                iou = res.get("iou")
                no_box = _boxes(res.get("extracted_answer"), task) in ([], [[0.0] * 4])
                ax.set_title("no box" if no_box else f"IoU {iou:.2f}" if iou is not None else "", fontsize=7)
            else:
                ax.set_title(f"{len(_boxes(res.get('extracted_answer'), task))} pred / "
                             f"{len(_boxes(res.get('ground_truth'), task))} true", fontsize=7)  # fmt: skip
            if j == 0:
                ax.set_ylabel(f"{run.name}\n({run.mode})", fontsize=8)
    for j, r in enumerate(first):
        text = str(r.get("expression") or r.get("category") or "")
        axes[0][j].annotate("\n".join(textwrap.wrap(text, 24)[:2]), (0.5, 1.18), xycoords="axes fraction",
                            ha="center", va="bottom", fontsize=7, style="italic")  # fmt: skip
    fig.suptitle("green: truth   red: prediction (model pixels, not rescaled)", fontsize=9, y=1.0)
    fig.tight_layout()
    return _save(fig, png)


def read_log(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL training log; malformed lines are skipped with a warning."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            log.warning("%s:%d is not JSON; skipped", path, n)
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def curve_keys(rows_by_run: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """The numeric keys to plot: :data:`CURVE_PRIORITY` first, then the others alphabetically."""
    keys = {k for rows in rows_by_run.values() for r in rows for k, v in r.items()
            if k not in CURVE_SKIP and not k.startswith(CURVE_SKIP_PREFIXES) and _number(v) is not None}  # fmt: skip
    ordered = [k for k in CURVE_PRIORITY if k in keys] + sorted(keys - set(CURVE_PRIORITY))
    chosen, seen = [], set()
    for k in ordered:  # a series logged twice (trl's key and the trainer's short alias) is drawn once
        series = tuple((name, tuple(_number(r.get(k)) for r in rows)) for name, rows in rows_by_run.items())
        if series not in seen:
            seen.add(series)
            chosen.append(k)
    return chosen[:MAX_CURVES]


def learning_curves(logs: Mapping[str, Path], png: Path) -> Path | None:
    """One panel per numeric key, one line per run, against ``step`` (else the line number)."""
    rows_by_run = {name: read_log(path) for name, path in logs.items()}
    rows_by_run = {k: v for k, v in rows_by_run.items() if v}
    keys = curve_keys(rows_by_run)
    if not keys:
        return None
    plt = _pyplot()
    cols = min(len(keys), 4)
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False)
    cmap = plt.get_cmap("tab10")
    from matplotlib.ticker import MaxNLocator

    for ax, key in zip(axes.flat, keys, strict=False):
        for i, (name, run_rows) in enumerate(rows_by_run.items()):
            pts = [(_number(r.get("step")) if _number(r.get("step")) is not None else n, _number(r.get(key)))
                   for n, r in enumerate(run_rows)]  # fmt: skip
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                style = "-" if len(pts) > 1 else "o"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, lw=1.2, ms=3, color=cmap(i % 10), label=name)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6), fontsize=8,
                   bbox_to_anchor=(0.5, 1.04))  # fmt: skip
    fig.tight_layout()
    return _save(fig, png)
