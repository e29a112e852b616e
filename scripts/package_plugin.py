"""Build the QGIS plugin zip (the layout plugins.qgis.org and "Install from ZIP" expect).

    python3 scripts/package_plugin.py [--output dist/geo_r1_qgis.zip]

The zip holds one folder, ``geo_r1_qgis/``: the package's Python files, ``metadata.txt`` and the icon
from ``resources/``. Standard library only, so QGIS's Python can run it too.
"""

from __future__ import annotations

import argparse
import logging
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "geo_r1_qgis"
log = logging.getLogger("package_plugin")


def plugin_files(root: Path = ROOT) -> dict[str, Path]:
    """{path inside the zip: source file}."""
    files = {
        f"{PKG}/{p.relative_to(root / PKG).as_posix()}": p
        for p in sorted((root / PKG).rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
    }
    files[f"{PKG}/metadata.txt"] = root / "metadata.txt"
    for p in sorted((root / "resources").glob("*")):
        if p.is_file():
            files[f"{PKG}/{p.name}"] = p
    return files


def build(out: Path, root: Path = ROOT) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for arcname, src in plugin_files(root).items():
            zf.write(src, arcname)
    log.info("wrote %s (%d files)", out, len(plugin_files(root)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = ap.add_argument(
        "-o",
        "--output",
        "--out",
        dest="out",
        type=Path,
        default=ROOT / "dist" / f"{PKG}.zip",
        help="the zip to write (default: %(default)s)",
    )
    action.option_strings = ["-o", "--output"]  # --out, the old spelling, still parses (as geo-r1's hidden aliases)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
