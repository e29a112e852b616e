"""QGIS 4 (Qt6) readiness, checked against PyQt6 without QGIS: run by scripts/check_qt6.sh in a throwaway venv.

1. Every ``from qgis.PyQt.<Module> import <name>`` in the plugin names something PyQt6's module has, and every
   attribute chain on such a name (``Qt.AlignmentFlag.AlignLeft``, ``QMessageBox.StandardButton.Yes``) resolves
   in PyQt6, as far as it goes through classes, enums and modules (a call or an instance ends the chain).
2. Every plugin module that needs nothing of QGIS beyond ``qgis.PyQt`` is imported for real, with ``qgis.PyQt``
   mapped onto PyQt6 the way QGIS 4 maps it (``from PyQt6.QtCore import *``): class bodies, signals and module-level
   Qt objects are built. Modules that import qgis.core/gui are reported as needing QGIS (checked by 1 only).
Not checked: anything of the QGIS 4 API itself (qgis.core, qgis.gui), which has no package here.
Exit 0 when clean, 1 with one line per problem.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import sys
import tempfile
from pathlib import Path

QT_MODULES = ("QtCore", "QtGui", "QtWidgets", "QtNetwork", "QtSvg", "QtXml", "QtSql", "QtTest", "QtPrintSupport")


def _shim(root: Path) -> None:
    """A ``qgis`` package holding only ``qgis.PyQt``, mapped onto PyQt6 as in QGIS 4."""
    pyqt = root / "qgis" / "PyQt"
    pyqt.mkdir(parents=True)
    (root / "qgis" / "__init__.py").write_text("")
    (pyqt / "__init__.py").write_text("from PyQt6 import sip  # noqa: F401\n")
    for mod in QT_MODULES:
        (pyqt / f"{mod}.py").write_text(f"from PyQt6.{mod} import *  # noqa: F403\n")


def _chain(node: ast.Attribute) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def static_problems(path: Path, rel: str) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    # imports in an ``except ImportError:`` branch are the Qt5 fallbacks of a try that Qt6 takes
    fallbacks = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for h in t.handlers
                 if isinstance(h.type, ast.Name) and h.type.id == "ImportError" for n in ast.walk(h)}  # fmt: skip
    names: dict[str, object] = {}
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qgis.PyQt") \
                and id(node) not in fallbacks:  # fmt: skip
            sub = node.module.removeprefix("qgis.PyQt").lstrip(".")
            target = importlib.import_module(f"PyQt6.{sub}" if sub else "PyQt6")
            for alias in node.names:
                if sub == "" and alias.name == "sip":
                    names[alias.asname or alias.name] = importlib.import_module("PyQt6.sip")
                elif not hasattr(target, alias.name):
                    problems.append(f"{rel}:{node.lineno}: PyQt6.{sub} has no {alias.name}")
                else:
                    names[alias.asname or alias.name] = getattr(target, alias.name)
    seen = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain = _chain(node)
        if not chain or chain[0] not in names or tuple(chain) in seen:
            continue
        seen.add(tuple(chain))
        obj = names[chain[0]]
        for i, attr in enumerate(chain[1:], 1):
            if not (inspect.isclass(obj) or inspect.ismodule(obj)):
                break  # a method or an enum value: what follows is not Qt's static API
            if not hasattr(obj, attr):
                problems.append(f"{rel}:{node.lineno}: {'.'.join(chain[: i + 1])} does not exist in PyQt6")
                break
            obj = getattr(obj, attr)
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("plugin", type=Path, help="the plugin package folder (geo_r1_qgis)")
    args = ap.parse_args(argv)
    plugin = args.plugin.resolve()
    files = sorted(p for p in plugin.rglob("*.py") if "__pycache__" not in p.parts)
    problems: list[str] = []
    for path in files:
        problems += static_problems(path, str(path.relative_to(plugin.parent)))
    imported, need_qgis = [], []
    with tempfile.TemporaryDirectory() as tmp:
        _shim(Path(tmp))
        sys.path[:0] = [tmp, str(plugin.parent)]
        for path in files:
            rel = path.relative_to(plugin.parent).with_suffix("")
            name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            try:
                importlib.import_module(name)
                imported.append(name)
            except ModuleNotFoundError as exc:
                if exc.name and exc.name.split(".")[0] == "qgis" and exc.name != "qgis.PyQt":
                    need_qgis.append(f"{name} ({exc.name})")
                else:
                    problems.append(f"{name}: import failed: {exc!r}")
            except Exception as exc:  # every failure is a finding
                problems.append(f"{name}: import failed under PyQt6: {exc!r}")
    from PyQt6.QtCore import PYQT_VERSION_STR, QT_VERSION_STR

    print(f"PyQt6 {PYQT_VERSION_STR} (Qt {QT_VERSION_STR}); {len(files)} plugin files scanned statically")
    print(f"imported under PyQt6 ({len(imported)}): {', '.join(imported)}")
    print(f"need QGIS, static check only ({len(need_qgis)}): {', '.join(need_qgis)}")
    for p in problems:
        print(f"PROBLEM {p}")
    print("clean" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
