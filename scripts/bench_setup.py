"""Time the plugin's engine setup: a wheelhouse once, then the installer from it offline (``--no-index``).

    QT_QPA_PLATFORM=offscreen /usr/bin/python3 scripts/bench_setup.py [--work DIR] [--wheel dist/geo_r1-*.whl]

Runs under QGIS's Python (the installer is the plugin's). ``geo-r1 wheelhouse`` runs in the repository's venv;
then :class:`geo_r1_qgis.engine_control.setup.installer.Installer` builds a venv from the wheelhouse with pip's
``--no-index --find-links DIR`` (no index at all), each step timed. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    from geo_r1_qgis.engine_control.setup.installer import Installer, SetupConfig, find_interpreters
    from geo_r1_qgis.engine_control.setup.venv import check_venv, plugin_version

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None, help="a scratch folder (default: a temporary one)")
    ap.add_argument("--wheel", type=Path, default=ROOT / "dist" / f"geo_r1-{plugin_version()}-py3-none-any.whl")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="geo-r1-bench-setup-"))
    if not args.wheel.is_file():
        sys.exit(f"{args.wheel} is missing: run make wheel first")
    house = work / "wheelhouse"
    shutil.rmtree(house, ignore_errors=True)
    t0 = time.monotonic()
    cmd = [str(ROOT / ".venv" / "bin" / "geo-r1"), "wheelhouse", str(house), "--wheel", str(args.wheel)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"geo-r1 wheelhouse failed:\n{proc.stderr[-3000:]}")
    wheelhouse_s = time.monotonic() - t0
    manifest = json.loads((house / "geo-r1-wheelhouse.json").read_text())
    size_mb = sum(p.stat().st_size for p in house.iterdir()) / 2**20

    python = next(i.path for i in find_interpreters() if i.usable)
    venv = work / "engine-venv"
    shutil.rmtree(venv, ignore_errors=True)
    cfg = SetupConfig(python=python, venv=venv, source="wheelhouse", source_path=str(house))
    marks: list[tuple[str, float]] = []
    result = Installer(cfg, on_step=lambda i, n, title: marks.append((title, time.monotonic()))).run()
    end = time.monotonic()
    if not result.ok:
        sys.exit(f"{result.message}\n{result.tail}")
    ends = [t for _, t in marks[1:]] + [end]
    steps = {title: round(stop - start, 1) for (title, start), stop in zip(marks, ends, strict=True)}
    check = check_venv(venv)
    print(json.dumps({
        "wheelhouse_s": round(wheelhouse_s, 1), "wheelhouse_files": len(manifest["files"]),
        "wheelhouse_mb": round(size_mb), "offline_install_s": round(result.seconds, 1), "steps_s": steps,
        "check_ok": check.ok, "python": str(python),
    }, indent=2))  # fmt: skip
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
