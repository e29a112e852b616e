"""One QgsApplication for the whole test session (QGIS's Python only; imported lazily).

``exitQgis()`` unloads GDAL's drivers for the whole process, so it may run once, at the very end,
after every layer is gone (or the interpreter segfaults at exit). Modules that need QGIS ask for the
``qgis_app`` fixture first; their own helpers then find the running instance and never exit it.
"""

from __future__ import annotations

import gc
import os

import pytest


@pytest.fixture(scope="session")
def qgis_app():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    qgis_core = pytest.importorskip("qgis.core", reason="needs PyQGIS: run under QGIS's Python (/usr/bin/python3)")
    app = qgis_core.QgsApplication.instance()
    owned = app is None
    if owned:
        app = qgis_core.QgsApplication([], False)
        app.initQgis()
    yield app
    gc.collect()
    if owned:
        app.exitQgis()


def pytest_collection_modifyitems(config, items):
    """Every test name carries the QGIS version it ran under, so a failure on one version says which."""
    try:
        from qgis.core import Qgis

        label = f"[QGIS {'.'.join(Qgis.QGIS_VERSION.split('.')[:2])}]"
    except ImportError:
        return
    for item in items:
        item._nodeid = f"{item._nodeid} {label}"
