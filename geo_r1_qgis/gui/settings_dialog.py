"""Raster › Geo-R1 › Settings: the engine URL and token file, the engine venv, the default output, tile size,
overlap and max new tokens, stored in QgsSettings (:mod:`geo_r1_qgis.settings`). The panel, the engine check and
the Processing algorithms read the same values; OK makes the panel's engine line look again."""

from __future__ import annotations

from typing import Any

from qgis.core import QgsSettings
from qgis.gui import QgsFileWidget
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..core.client import default_token_path
from ..core.errors import ConfigError
from ..core.rules.coords import QWEN_FACTOR
from ..core.run_spec import MAX_IN_FLIGHT
from ..settings import MODEL_TILE_TEXT, PluginSettings, plugin_settings_dir


class SettingsDialog(QDialog):
    def __init__(self, parent: QWidget | None = None, settings: QgsSettings | None = None, manager: Any = None) -> None:
        """``settings``: where the values live (the user's QgsSettings); ``manager``: the EngineManager to re-check
        on OK (the plugin's shared one, if it exists)."""
        super().__init__(parent)
        self.setWindowTitle("Geo-R1 settings")
        self.setObjectName("GeoR1SettingsDialog")
        self.qsettings = settings
        self.manager = manager
        s = PluginSettings.load(settings)
        layout = QVBoxLayout(self)
        form = QFormLayout()
        self.url_edit = QLineEdit(s.engine_url, self)
        form.addRow("Engine URL", self.url_edit)
        self.more_engines_edit = QPlainTextEdit(s.more_engines, self)
        self.more_engines_edit.setObjectName("GeoR1MoreEngines")
        self.more_engines_edit.setPlaceholderText("none: runs use the engine above only")
        self.more_engines_edit.setToolTip(
            "More running engines a run spreads its tiles over, one URL a line (same "
            "model, same token file); one that fails mid-run is left to the others"
        )
        self.more_engines_edit.setMaximumHeight(self.url_edit.sizeHint().height() * 3)
        form.addRow("More engines", self.more_engines_edit)
        self.token_widget = QgsFileWidget(self)
        self.token_widget.setFilePath(s.token_file)
        self.token_widget.lineEdit().setPlaceholderText(str(default_token_path()))
        form.addRow("Token file", self.token_widget)
        self.venv_widget = QgsFileWidget(self)
        self.venv_widget.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.venv_widget.setFilePath(s.engine_venv)
        self.venv_widget.lineEdit().setPlaceholderText(str(plugin_settings_dir() / "engine-venv"))
        self.venv_widget.setToolTip("The venv the panel's Start runs geo-r1 from (Set up the engine... builds one)")
        form.addRow("Engine venv", self.venv_widget)
        self.output_widget = QgsFileWidget(self)
        self.output_widget.setStorageMode(QgsFileWidget.StorageMode.SaveFile)
        self.output_widget.setFilter("GeoPackage (*.gpkg)")
        self.output_widget.setFilePath(s.output_gpkg)
        self.output_widget.lineEdit().setPlaceholderText("geo_r1_results.gpkg beside the project (or in your home)")
        form.addRow("Default output", self.output_widget)
        self.tile_spin = QSpinBox(self)
        self.tile_spin.setRange(0, 4096)
        self.tile_spin.setSingleStep(QWEN_FACTOR)
        self.tile_spin.setSpecialValueText(MODEL_TILE_TEXT)  # shown at 0
        self.tile_spin.setSuffix(" px")
        self.tile_spin.setValue(s.tile_size)
        form.addRow("Tile size", self.tile_spin)
        self.overlap_spin = QSpinBox(self)
        self.overlap_spin.setRange(0, 2048)
        self.overlap_spin.setSuffix(" px")
        self.overlap_spin.setValue(s.overlap)
        form.addRow("Overlap", self.overlap_spin)
        self.tokens_spin = QSpinBox(self)
        self.tokens_spin.setRange(0, 8192)
        self.tokens_spin.setSpecialValueText("engine default (256 one / 1024 all)")
        self.tokens_spin.setValue(s.max_new_tokens)
        form.addRow("Max new tokens", self.tokens_spin)
        self.in_flight_spin = QSpinBox(self)
        self.in_flight_spin.setObjectName("GeoR1InFlight")
        self.in_flight_spin.setRange(0, MAX_IN_FLIGHT)
        self.in_flight_spin.setSpecialValueText("what the engines take")  # shown at 0
        self.in_flight_spin.setSuffix(" tiles")
        self.in_flight_spin.setToolTip(
            "Tiles asked at once over all engines (0: each engine's batch size, or a remote backend's --concurrency)"
        )
        self.in_flight_spin.setValue(s.in_flight)
        form.addRow("Tiles in flight", self.in_flight_spin)
        self.keep_check = QCheckBox("Keep an engine started by QGIS running when QGIS quits", self)
        self.keep_check.setChecked(s.keep_engine_running)
        form.addRow("", self.keep_check)
        layout.addLayout(form)
        self.setup_button = QPushButton("Set up the engine…", self)
        self.setup_button.clicked.connect(self._open_setup)
        layout.addWidget(self.setup_button)
        self.error_label = QLabel("", self)
        self.error_label.setTextFormat(Qt.TextFormat.PlainText)
        self.error_label.setWordWrap(True)
        layout.addWidget(self.error_label)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel, self)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout.addWidget(buttons)

    def values(self) -> PluginSettings:
        """The settings as entered; ConfigError says which value is wrong."""
        return PluginSettings.load(self.qsettings).with_values(
            engine_url=self.url_edit.text().strip(),
            token_file=self.token_widget.filePath().strip(),
            engine_venv=self.venv_widget.filePath().strip(),
            output_gpkg=self.output_widget.filePath().strip(),
            tile_size=self.tile_spin.value(),
            overlap=self.overlap_spin.value(),
            max_new_tokens=self.tokens_spin.value(),
            in_flight=self.in_flight_spin.value(),
            more_engines="\n".join(u.strip() for u in self.more_engines_edit.toPlainText().splitlines() if u.strip()),
            keep_engine_running=self.keep_check.isChecked(),
        )

    def accept(self) -> None:
        try:
            self.values().save(self.qsettings)
        except ConfigError as exc:
            self.error_label.setText(str(exc))
            return
        super().accept()
        from ..engine_control.engine_process import recheck_shared

        if self.manager is not None:  # the engine line looks again where the settings now point
            self.manager.recheck()
        else:
            recheck_shared()

    def _open_setup(self) -> None:
        try:
            from ..engine_control.setup.dialog import SetupDialog
        except ImportError:
            self.error_label.setText("The engine set-up is not part of this build; see the README to set it up.")
            return
        SetupDialog(self).exec()
