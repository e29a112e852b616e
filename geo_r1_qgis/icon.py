"""The plugin's icon, shared by the toolbar and menus (plugin.py) and the Processing provider, which
imports it from here rather than from plugin.py (no import circle between the two)."""

from __future__ import annotations

from pathlib import Path

from qgis.PyQt.QtGui import QIcon

#: Installed plugins carry icon.png beside this file; in the source tree it lives in resources/.
ICON_PATH = Path(__file__).resolve().parent / "icon.png"


def plugin_icon() -> QIcon:
    """The Geo-R1 icon."""
    path = ICON_PATH if ICON_PATH.exists() else Path(__file__).resolve().parents[1] / "resources" / "icon.png"
    return QIcon(str(path))
