"""Qt6 / QGIS 4 readiness, checked statically over the plugin's source (issue 10).

No ``exec_()``; Qt only through ``qgis.PyQt``; every enum fully scoped (``Qt.TimeSpec.UTC``, not ``Qt.UTC``);
no ``QVariant`` field types outside ``geo_r1_qgis/compat.py`` (QGIS 3.38+ wants ``QMetaType``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PLUGIN = Path(__file__).resolve().parents[2] / "geo_r1_qgis"
FILES = sorted(p for p in PLUGIN.rglob("*.py"))

#: Class.Member where Member is an enum value (capitalised) and nothing more is scoped or called after it
_ENUM_OWNERS = (
    r"Qt|Qgis|QgsRaster|QgsWkbTypes|QgsProcessing|QgsProcessingParameter\w+|QgsFeatureSink|"
    r"QgsCoordinateReferenceSystem|QgsVectorFileWriter|QgsMapLayer|QgsField|QMessageBox|QSizePolicy"
)
UNSCOPED = re.compile(rf"\b(?:{_ENUM_OWNERS})\.([A-Z][A-Za-z0-9_]*)\b(?!\s*[.(\[])")
#: constants, and enum *types* used as objects (hasattr(Qgis.DataType, ...))
ALLOWED_CONSTANTS = {"QGIS_VERSION_INT", "QGIS_VERSION", "DataType"}


_STRING = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'")


def _code_lines(path: Path):
    """Code only: docstrings, string literals and comments removed (they may name old APIs)."""
    in_doc = False
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        quotes = line.count('"""')
        if in_doc or quotes:
            if quotes % 2:
                in_doc = not in_doc
            continue
        code = _STRING.sub('""', line).split("#", 1)[0]
        if code.strip():
            yield n, code


def test_the_scan_sees_the_plugin():
    assert len(FILES) >= 8 and any(p.name == "rasters.py" for p in FILES)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PLUGIN)))
def test_qt6_ready(path):
    problems = []
    for n, code in _code_lines(path):
        if "exec_(" in code:
            problems.append(f"{n}: exec_() (use exec())")
        if re.search(r"^\s*(from|import)\s+(PyQt5|PyQt6|sip)\b", code):
            problems.append(f"{n}: import Qt through qgis.PyQt")
        if "QVariant." in code and path.name != "compat.py":
            problems.append(f"{n}: QVariant type (use compat.field_type)")
        for m in UNSCOPED.finditer(code):
            if m.group(1) not in ALLOWED_CONSTANTS:
                problems.append(f"{n}: unscoped enum {m.group(0)} (scope it, or take it from compat.py)")
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


def test_the_scan_catches_what_it_should():
    bad = ["dialog.exec_()", "x = Qt.UTC", "QgsWkbTypes.Polygon)", "QgsProcessingParameterNumber.Integer,"]
    good = ["Qt.TimeSpec.UTC", "Qgis.MessageLevel.Success", "Qgis.QGIS_VERSION_INT", "QgsField(name, t)"]
    assert all(("exec_(" in b) or UNSCOPED.search(b) for b in bad)
    assert not any(m.group(1) not in ALLOWED_CONSTANTS for g in good for m in UNSCOPED.finditer(g))
