"""geo_r1_qgis/icon.py: the one icon, and no plugin module importing plugin.py (no import circle)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "geo_r1_qgis"


def _imports_of(path: Path) -> set[str]:
    """The modules ``path`` imports, relative ones as ``.name`` (at any depth in the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_only_the_package_entry_point_imports_plugin_py():
    """plugin.py imports the panel, the docks and the Processing provider; none of them may import it back."""
    importers = sorted(
        p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*.py")
        if {".plugin", "geo_r1_qgis.plugin", "..plugin"} & _imports_of(p)
    )
    assert importers == ["__init__.py"], importers
    assert ".icon" in _imports_of(PACKAGE / "processing_provider.py")


def test_the_icon_loads(qgis_app):
    from geo_r1_qgis.icon import ICON_PATH, plugin_icon

    assert not plugin_icon().isNull()
    assert ICON_PATH.name == "icon.png"
