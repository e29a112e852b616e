#!/usr/bin/env bash
# QGIS 4 (Qt6) readiness without QGIS 4: scripts/check_qt6.py against PyQt6 from PyPI, in a throwaway venv
# (never .venv; default ${TMPDIR:-/tmp}/geo-r1-qt6-venv, reused). README "QGIS versions" says what this covers.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GEO_R1_QT6_VENV:-${TMPDIR:-/tmp}/geo-r1-qt6-venv}
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c "import PyQt6.QtWidgets" 2>/dev/null; then
  echo "[qt6] a throwaway venv with PyQt6 (PyPI) in $VENV" >&2
  /usr/bin/python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q PyQt6 numpy >&2
fi
QT_QPA_PLATFORM=offscreen "$VENV/bin/python" scripts/check_qt6.py geo_r1_qgis
