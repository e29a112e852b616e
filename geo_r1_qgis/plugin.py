"""The QGIS side of Geo-R1: menu entries and the Processing provider.

Runs in QGIS's Python: PyQGIS, the standard library and numpy only. Everything that needs the model
happens in the engine process, reached through :mod:`geo_r1_qgis.core.client`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from qgis.core import QgsApplication, QgsMessageLog
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction

from .compat import MSG_SUCCESS, MSG_WARNING

log = logging.getLogger(__name__)

PLUGIN_NAME = "Geo-R1"
ICON_PATH = Path(__file__).resolve().parent / "icon.png"


def _icon() -> QIcon:
    # Installed plugins carry icon.png beside this file; in the source tree it lives in resources/.
    path = ICON_PATH if ICON_PATH.exists() else Path(__file__).resolve().parents[1] / "resources" / "icon.png"
    return QIcon(str(path))


class GeoR1Plugin:
    """Created by QGIS through ``classFactory``."""

    def __init__(self, iface) -> None:
        self.iface = iface
        self.actions: list[QAction] = []
        self.provider = None
        self.dock = None
        self.toolbar_action: QAction | None = None

    def initProcessing(self) -> None:
        from .processing_provider import GeoR1Provider

        self.provider = GeoR1Provider()
        QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self) -> None:
        self.initProcessing()
        from .compat import RIGHT_DOCK
        from .panel import GeoR1Dock

        self.dock = GeoR1Dock(self.iface, parent=self.iface.mainWindow())
        self.iface.addDockWidget(RIGHT_DOCK, self.dock)  # also listed in View > Panels
        self.dock.hide()
        self.toolbar_action = self.dock.toggleViewAction()
        self.toolbar_action.setIcon(_icon())
        self.toolbar_action.setText("Geo-R1 panel")
        self.toolbar_action.setToolTip("Geo-R1: find objects by describing them")
        self.iface.addToolBarIcon(self.toolbar_action)
        self.iface.addPluginToRasterMenu(PLUGIN_NAME, self.toolbar_action)
        for text, slot in (("Settings…", self.open_settings), ("Set up the engine…", self.open_engine_setup),
                           ("Check the Geo-R1 engine", self.check_engine)):
            action = QAction(_icon(), text, self.iface.mainWindow())
            action.triggered.connect(slot)
            self.iface.addPluginToRasterMenu(PLUGIN_NAME, action)
            self.actions.append(action)

    def open_settings(self) -> None:
        from .settings_dialog import SettingsDialog

        SettingsDialog(self.iface.mainWindow()).exec()

    def unload(self) -> None:
        for action in self.actions:
            self.iface.removePluginRasterMenu(PLUGIN_NAME, action)
        self.actions.clear()
        if self.toolbar_action is not None:
            self.iface.removeToolBarIcon(self.toolbar_action)
            self.iface.removePluginRasterMenu(PLUGIN_NAME, self.toolbar_action)
            self.toolbar_action = None
        if self.dock is not None:
            if self.dock.task is not None:
                self.dock.task.cancel()
            self.iface.removeDockWidget(self.dock)
            self.dock.deleteLater()
            self.dock = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        from .engine_process import release_shared_manager

        release_shared_manager()  # stops the engine the plugin started, unless it was started to keep running

    def open_engine_setup(self) -> None:
        from .engine_setup.dialog import SetupDialog

        SetupDialog(self.iface.mainWindow()).exec()

    def check_engine(self) -> None:
        """Asks the engine in the background (a few seconds at most); QGIS never waits for it."""
        from .engine_process import EngineStatusCheck, message_bar_text
        from .settings import PluginSettings

        settings = PluginSettings.load()
        check = EngineStatusCheck(settings.engine_url, settings.token_path(), parent=self.iface.mainWindow())

        def done(ok: bool, text: str, _info: dict) -> None:
            level = MSG_SUCCESS if ok else MSG_WARNING
            QgsMessageLog.logMessage(text, PLUGIN_NAME, level)
            self.iface.messageBar().pushMessage(PLUGIN_NAME, message_bar_text(text), level=level, duration=10)
            check.deleteLater()

        check.finished.connect(done)
        check.start()
