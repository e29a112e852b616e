"""README's pictures of the few-shot loop in the QGIS desktop (issue 19 §4): docs/finetune.png and docs/report.png.

    /usr/bin/python3 scripts/finetune_screenshots.py [--out docs] [--steps 16] [--keep DIR]

Debian's desktop ``qgis`` (3.22) under a private Xvfb, driven as ``tests/geo_r1_qgis/test_desktop.py`` drives it
(its helpers: a fresh profile under a temporary folder with ``make plugin-zip`` unzipped and enabled, never the
user's; xdotool for the mouse), against a real ``geo-r1 serve`` with the project's sample model
(``resources/sample_model``) and its own ``--jobs-dir``. Two sample scenes it never saw (``geo-r1 sample-data``
seeds 9100 and 9101, as ``train.tif`` and ``test.tif``); ``scripts/finetune_desktop_driver.py`` inside QGIS
drags a box with the mouse around each storage tank (train on the first scene, test on the second), answers the
annotation dock's dialog, saves, starts a short GRPO job from the panel's Fine-tune section and saves the screen
while it trains (``finetune.png``) and, once it is done, its report.md in a Qt text browser (``report.png``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "geo_r1_qgis"))

log = logging.getLogger("finetune_screenshots")

SCENES = {"train": 9100, "test": 9101}  # scenes the sample model never saw (it trained on seeds 0-199)
#: a short job: 1 prompt x 4 completions of at most 96 tokens (a REC answer with its <think> is about 60)
OPTIONS = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "num_generations": 4,
           "max_completion_length": 96, "learning_rate": 1e-4}  # fmt: skip
CHIP = 224  # the tile the sample model serves


def _boxes(truth: Path, category: str) -> tuple[list[list[float]], list[float]]:
    """The ``category`` objects' boxes (a little loose, as drawn by hand) and a map extent around them all."""
    from geo_r1_qgis.core.truth import read_truth

    boxes = []
    for obj in read_truth(truth, category):
        xs, ys = [p[0] for p in obj.ring], [p[1] for p in obj.ring]
        pad = 0.1 * max(max(xs) - min(xs), max(ys) - min(ys))
        boxes.append([min(xs) - pad, min(ys) - pad, max(xs) + pad, max(ys) + pad])
    x1, y1 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x2, y2 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    margin = 0.35 * max(x2 - x1, y2 - y1)
    return boxes, [x1 - margin, y1 - margin, x2 + margin, y2 + margin]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "docs", help="folder of the two PNGs (default: docs)")
    ap.add_argument("--steps", type=int, default=16, help="GRPO steps of the job (default %(default)s)")
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: a temp one)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import _real_engine as real
    import test_desktop as desk

    desk._need_desktop()
    real.need_venv()
    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="finetune-shots-")
    root = (args.keep or Path(tmp.name)).resolve()
    root.mkdir(parents=True, exist_ok=True)
    try:
        make = subprocess.run(["make", "-s", "plugin-zip"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                              check=False)  # fmt: skip
        if make.returncode != 0:
            raise SystemExit(make.stdout + make.stderr)
        boxes, extents, rasters = {}, {}, []
        for split, seed in SCENES.items():
            scene = root / f"scene{seed}"
            proc = real.host_exec.run([str(real.GEO_R1), "sample-data", str(scene), "--seed", str(seed)], timeout=300,
                                      env=real.venv_env())  # fmt: skip
            if proc.returncode != 0:
                raise SystemExit(f"geo-r1 sample-data failed:\n{proc.stdout}\n{proc.stderr}")
            raster = root / f"{split}.tif"  # the layer's name in QGIS says which scene it is
            shutil.copy(scene / "utm.tif", raster)
            rasters.append(str(raster))
            found, extents[split] = _boxes(scene / "utm.objects.geojson", "tank")
            boxes[split] = [[b, split] for b in found]
        (root / "engine").mkdir(exist_ok=True)
        engine = real.Engine(root / "engine", real.SAMPLE_MODEL,
                             extra=("--threads", "1", "--jobs-dir", str(root / "jobs")))  # fmt: skip
        try:
            profile = desk._profile(root / "qgis", ROOT / "dist" / "geo_r1_qgis.zip", engine, root / "results.gpkg")
            ini = desk._ini(profile)
            ini.setValue("geo_r1/annotation_gpkg", str(root / "tanks.gpkg"))
            ini.sync()
            del ini
            home = root / "home"
            home.mkdir(exist_ok=True)
            config = root / "driver.json"
            status_path = root / "status.json"
            out = args.out.resolve()
            config.write_text(json.dumps({
                "boxes": boxes, "draw_extent": extents, "zoom": extents["train"], "shown": "train",
                "expression": "storage tank", "category": "tank", "steps": args.steps, "options": OPTIONS,
                "chip": CHIP, "name": "tanks", "finetune_png": str(out / "finetune.png"),
                "report_png": str(out / "report.png"), "status": str(status_path), "timeout_s": 1500,
            }))  # fmt: skip
            env = {k: v for k, v in os.environ.items() if not k.startswith(("QT_", "PYTHON", "XDG_"))}
            env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), XDG_DATA_HOME=str(home / ".local/share"),
                       XDG_CACHE_HOME=str(home / ".cache"), XDG_RUNTIME_DIR=str(root), GEO_R1_REPO=str(ROOT),
                       GEO_R1_DESKTOP_CONFIG=str(config), QT_QPA_PLATFORM="xcb", LANG="C.UTF-8",
                       LC_ALL="C.UTF-8")  # fmt: skip
            desk.TIMEOUT_S = 1600  # the whole QGIS session: the job trains and is evaluated in it
            desk.DRIVER = ROOT / "scripts" / "finetune_desktop_driver.py"
            with desk._xvfb(root / "xvfb.log") as display:
                env["DISPLAY"] = display
                status, _log = desk._qgis(root, env, rasters, status_path, root / "qgis.log")
        finally:
            engine.stop()
        log.info("wrote %s and %s: %d boxes, the picture at step %s (%s points), the job %s",
                 status["finetune_png"], status["report_png"], status["boxes_drawn"], status["step_at_picture"],
                 status["points_at_picture"], status["record"])  # fmt: skip
        log.info("the panel's table: %s", status["metrics_rows"])
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
