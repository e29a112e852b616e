"""The QGIS side of Geo-R1: menu entries and the Processing provider.

Runs in QGIS's Python: PyQGIS, the standard library and numpy only. Everything that needs the model
happens in the engine process, reached through :mod:`geo_r1_qgis.core.client`.
"""

from __future__ import annotations

import logging

from qgis.core import QgsApplication, QgsMessageLog

from .compat import MSG_INFO, MSG_SUCCESS, MSG_WARNING, QAction
from .icon import plugin_icon as _icon

log = logging.getLogger(__name__)

PLUGIN_NAME = "Geo-R1"


class MessageLogHandler(logging.Handler):
    """The plugin's log records (``geo_r1_qgis.*``) in QGIS's message log, tab "Geo-R1": the technical detail of
    what the panel says in words (routes, statuses, engine messages) is found there."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # a broken record must never raise into QGIS
            return
        level = MSG_WARNING if record.levelno >= logging.WARNING else MSG_INFO
        QgsMessageLog.logMessage(text, PLUGIN_NAME, level)


def install_message_log() -> MessageLogHandler:
    """Route ``geo_r1_qgis``'s log records (INFO and up) to QGIS's message log; returns the handler to remove."""
    handler = MessageLogHandler(logging.INFO)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    package = logging.getLogger("geo_r1_qgis")
    package.addHandler(handler)
    if package.level == logging.NOTSET or package.level > logging.INFO:
        package.setLevel(logging.INFO)
    return handler


class GeoR1Plugin:
    """Created by QGIS through ``classFactory``."""

    def __init__(self, iface) -> None:
        self.iface = iface
        self.actions: list[QAction] = []
        self.provider = None
        self.dock = None
        self.toolbar_action: QAction | None = None
        self.annotation_dock = None
        self.annotate_action: QAction | None = None
        self.log_handler: MessageLogHandler | None = None

    def initProcessing(self) -> None:
        from .processing_provider import GeoR1Provider

        self.provider = GeoR1Provider()
        QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self) -> None:
        self.log_handler = install_message_log()
        self.initProcessing()
        from .compat import RIGHT_DOCK
        from .gui.panel import GeoR1Dock

        self.dock = GeoR1Dock(self.iface, parent=self.iface.mainWindow())
        self.iface.addDockWidget(RIGHT_DOCK, self.dock)  # also listed in View > Panels
        self.dock.hide()
        self.toolbar_action = self.dock.toggleViewAction()
        self.toolbar_action.setIcon(_icon())
        self.toolbar_action.setText("Geo-R1 panel")
        self.toolbar_action.setToolTip("Geo-R1: find objects by describing them")
        self.iface.addToolBarIcon(self.toolbar_action)
        self.iface.addPluginToRasterMenu(PLUGIN_NAME, self.toolbar_action)
        self.annotate_action = QAction(_icon(), "Annotate", self.iface.mainWindow())
        self.annotate_action.setToolTip("Geo-R1: draw boxes on a raster to fine-tune the model")
        self.annotate_action.triggered.connect(lambda _checked=False: self.annotate())  # not triggered's bool
        self.iface.addToolBarIcon(self.annotate_action)
        self.iface.addPluginToRasterMenu(PLUGIN_NAME, self.annotate_action)
        for text, slot in (
            ("Settings…", self.open_settings),
            ("Set up the engine…", self.open_engine_setup),
            ("Check the Geo-R1 engine", self.check_engine),
        ):
            action = QAction(_icon(), text, self.iface.mainWindow())
            action.triggered.connect(slot)
            self.iface.addPluginToRasterMenu(PLUGIN_NAME, action)
            self.actions.append(action)

    def annotate(self, raster=None):
        """Show the annotation dock with its box tool on (over ``raster`` when given); returns the dock."""
        if self.annotation_dock is None:
            from .compat import RIGHT_DOCK
            from .gui.annotation_dock import AnnotationDock

            self.annotation_dock = AnnotationDock(self.iface, parent=self.iface.mainWindow())
            self.annotation_dock.fileOpened.connect(self._annotation_file_opened)
            self.iface.addDockWidget(RIGHT_DOCK, self.annotation_dock)
        self.annotation_dock.show()
        self.annotation_dock.raise_()
        if raster is None:
            from qgis.core import QgsRasterLayer

            active = self.iface.activeLayer()
            raster = active if isinstance(active, QgsRasterLayer) else None
        self.annotation_dock.start_annotating(raster)
        self._annotation_file_opened(self.annotation_dock.annotation_path())
        return self.annotation_dock

    def _annotation_file_opened(self, path) -> None:
        """The panel's Fine-tune section trains on the file being annotated: when Annotate starts, and whenever
        another file is chosen in the annotation dock."""
        if self.dock is not None:
            self.dock.set_annotation_file(path)

    def open_settings(self) -> None:
        from .gui.settings_dialog import SettingsDialog

        SettingsDialog(self.iface.mainWindow()).exec()

    def unload(self) -> None:
        for action in self.actions:
            self.iface.removePluginRasterMenu(PLUGIN_NAME, action)
        self.actions.clear()
        if self.toolbar_action is not None:
            self.iface.removeToolBarIcon(self.toolbar_action)
            self.iface.removePluginRasterMenu(PLUGIN_NAME, self.toolbar_action)
            self.toolbar_action = None
        if self.annotate_action is not None:
            self.iface.removeToolBarIcon(self.annotate_action)
            self.iface.removePluginRasterMenu(PLUGIN_NAME, self.annotate_action)
            self.annotate_action = None
        if self.annotation_dock is not None:
            self.annotation_dock.stop_annotating()
            self.iface.removeDockWidget(self.annotation_dock)
            self.annotation_dock.deleteLater()
            self.annotation_dock = None
        if self.dock is not None:
            if self.dock.task is not None:
                self.dock.task.cancel()
            self.iface.removeDockWidget(self.dock)
            self.dock.deleteLater()
            self.dock = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        from .engine_control.engine_process import release_shared_manager

        release_shared_manager()  # stops the engine the plugin started, unless it was started to keep running
        if self.log_handler is not None:
            logging.getLogger("geo_r1_qgis").removeHandler(self.log_handler)
            self.log_handler = None

    def open_engine_setup(self) -> None:
        from .engine_control.setup.dialog import SetupDialog

        SetupDialog(self.iface.mainWindow()).exec()

    def check_engine(self) -> None:
        """Asks the engine in the background (a few seconds at most); QGIS never waits for it."""
        from .engine_control.engine_process import message_bar_text, shared_manager

        def done(ok: bool, text: str, _info: dict) -> None:
            level = MSG_SUCCESS if ok else MSG_WARNING
            QgsMessageLog.logMessage(text, PLUGIN_NAME, level)
            self.iface.messageBar().pushMessage(PLUGIN_NAME, message_bar_text(text), level=level, duration=10)

        # the panel's own look: where it looks (its engine, else the settings' URL), and its engine line follows
        shared_manager().recheck(done)
