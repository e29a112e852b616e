"""One QgsApplication for the whole test session (QGIS's Python only; imported lazily).

``exitQgis()`` unloads GDAL's drivers for the whole process, so it may run once, at the very end,
after every layer is gone (or the interpreter segfaults at exit). Modules that need QGIS ask for the
``qgis_app`` fixture first; their own helpers then find the running instance and never exit it.
"""

from __future__ import annotations

import gc
import os
import sys

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


@pytest.fixture(autouse=True)
def _collect_garbage_in_the_main_thread():
    """After each test, free what it left in reference cycles here, in Qt's thread.

    A manager a test dropped still owns its network manager and the replies in flight. Left to Python's
    collector, it may be freed from another thread (a test's reader thread) or in the middle of one of its
    own replies' ``finished`` handlers, and Qt then reads a deleted reply: a segfault in a later test
    (``engine_process.py ... on_finished`` during test_gpkg_ogr, in one CI run)."""
    yield
    if "qgis.core" not in sys.modules:
        return  # no Qt here (the pure core's tests in the venv): nothing to free in its thread, and a full
        # collection over torch's heap costs 0.3 s a test (4 of the core suite's 4.3 min)
    from qgis.PyQt.QtCore import QCoreApplication, QEvent

    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    QCoreApplication.processEvents()
    gc.collect()


@pytest.fixture(scope="module")
def isolated_settings(qgis_app, request):
    """QgsSettings of a throw-away application name (one per test module), so the tests never touch a user's QGIS
    settings; it starts from the plugin's defaults and is cleared at the end."""
    from qgis.core import QgsSettings
    from qgis.PyQt.QtCore import QCoreApplication

    from geo_r1_qgis.settings import PluginSettings

    old = QCoreApplication.applicationName()
    QCoreApplication.setApplicationName(f"geo-r1-tests-{request.module.__name__}-{os.getpid()}")
    PluginSettings().save()
    yield
    QgsSettings().clear()
    QCoreApplication.setApplicationName(old)


@pytest.fixture(scope="module")
def qgis(qgis_app):
    """Processing with the Geo-R1 provider, one session per test module; the module's map layers go at its end."""
    import _real_engine as rx
    from qgis.core import QgsProject

    session = rx.ProcessingSession()
    yield session
    QgsProject.instance().removeAllMapLayers()
    session.close()


def _engine_for_the_session(tmp_path_factory, name: str, model, *args: str):
    """A real ``geo-r1 serve`` started once for the session (the fixtures below), stopped at its end."""
    import _real_engine as rx

    rx.need_venv()
    eng = rx.Engine(tmp_path_factory.mktemp(name), model, tuple(args))
    yield eng
    eng.stop()


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory):
    """One real ``geo-r1 serve`` of the format-trained tiny model, shared by every plugin test module that only asks
    it to ground (each module used to start its own, 7-15 s each, under each of the three QGIS versions). A test that
    stops, kills or swaps an engine starts its own; one that freezes this one (SIGSTOP) thaws it before it ends."""
    import _real_engine as rx

    yield from _engine_for_the_session(tmp_path_factory, "tiny-engine", rx.tiny_format_model())


@pytest.fixture(scope="session")
def tiny_sam_engine(tmp_path_factory):
    """The tiny model with the random tiny SAM 2 (``--sam``), shared by the outline modules (panel, Processing)."""
    import _real_engine as rx

    yield from _engine_for_the_session(tmp_path_factory, "tiny-sam-engine", rx.tiny_format_model(), "--sam",
                                       str(rx.tiny_sam()))  # fmt: skip


@pytest.fixture(scope="session")
def sample_engine(tmp_path_factory):
    """A real ``geo-r1 serve`` of the shipped sample model (one thread), shared by the modules that ground with it."""
    import _real_engine as rx

    yield from _engine_for_the_session(tmp_path_factory, "sample-engine", rx.SAMPLE_MODEL, "--threads", "1")


@pytest.fixture(scope="module")
def unseen_scene(tmp_path_factory):
    """The sample rasters of a scene the sample model never saw (seed ``UNSEEN_SEED``)."""
    import _real_engine as rx

    return rx.sample_data(tmp_path_factory.mktemp("unseen-scene"), "--seed", str(rx.UNSEEN_SEED))


def pytest_collection_modifyitems(config, items):
    """Every test name carries the QGIS version it ran under, so a failure on one version says which."""
    try:
        from qgis.core import Qgis

        label = f"[QGIS {'.'.join(Qgis.QGIS_VERSION.split('.')[:2])}]"
    except ImportError:
        return
    for item in items:
        item._nodeid = f"{item._nodeid} {label}"
