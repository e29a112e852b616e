"""The engine's part of the Geo-R1 panel: its state, Start/Stop/Restart, model and adapters, its log.

Embedded by the dock panel (and usable in a dialog). Everything slow runs in :mod:`.engine_process`
(QProcess, QNetworkAccessManager); this widget only shows and asks. Every text it shows is plain text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qgis.core import QgsSettings
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QFileDialog,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPlainTextEdit,
    QPushButton,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ..core.checkpoints import KNOWN_MODELS, processor_for
from ..core.errors import GeoR1Error
from ..core.finetune import adapter_summary, read_adapter_manifest
from ..engine_control.engine_process import (
    CRASHED,
    EXTERNAL,
    HEALTHY,
    LOG_LINES,
    STARTING,
    STOPPED,
    STOPPING,
    EngineManager,
    EngineStartConfig,
    ModelDownload,
    shared_manager,
)
from ..engine_control.setup.venv import venv_python
from ..settings import PluginSettings
from .widgets import narrow, stretch_row, wrapping_form

#: state -> (label, colour)
STATE_STYLE = {
    STOPPED: ("stopped", "#7f7f7f"),
    STARTING: ("starting", "#d08000"),
    HEALTHY: ("running", "#2e7d32"),
    CRASHED: ("stopped with an error", "#c62828"),
    EXTERNAL: ("running (started outside the plugin)", "#1565c0"),
    STOPPING: ("stopping", "#d08000"),
}
BASE_MODEL_ITEM = "base model (no adapter)"


def _plain(label: QLabel) -> QLabel:
    label.setTextFormat(Qt.TextFormat.PlainText)
    label.setWordWrap(True)
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    return label


class EngineWidget(QWidget):
    """Engine line, Start/Stop/Restart, model/processor/adapter, Download, adapter switching, log and diagnostics."""

    def __init__(self, manager: EngineManager | None = None, settings: QgsSettings | None = None,
                 parent: QWidget | None = None) -> None:  # fmt: skip
        super().__init__(parent)
        self.manager = manager or shared_manager()
        self.qsettings = settings if settings is not None else self.manager.qsettings
        self.download: ModelDownload | None = None
        s = PluginSettings.load(self.qsettings)

        # the engine line
        self.state_label = _plain(QLabel())
        self.details_label = _plain(QLabel())
        self.countdown_label = _plain(QLabel())
        self.message_label = _plain(QLabel())
        self.start_button = QPushButton("Start")
        self.stop_button = QPushButton("Stop")
        self.restart_button = QPushButton("Restart")
        self.setup_button = QPushButton("Set up the engine…")
        self.start_button.setToolTip("Start the engine from the engine venv with the model below")
        self.stop_button.setToolTip("Stop the engine the plugin started (never one started elsewhere)")

        # model, processor, adapter at start
        self.model_combo = QComboBox()
        self.model_combo.setEditable(True)
        self.model_combo.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        for known in KNOWN_MODELS:
            self.model_combo.addItem(known.model_id)
            self.model_combo.setItemData(self.model_combo.count() - 1, known.description, Qt.ItemDataRole.ToolTipRole)
        self.model_combo.setEditText(s.engine_model)
        self.model_combo.lineEdit().setPlaceholderText("a Hugging Face id or a model directory")
        self.browse_model_button = QPushButton("Browse…")
        self.download_button = QPushButton("Download")
        self.download_button.setToolTip("Download the model into the Hugging Face cache, in the engine venv")
        self.processor_edit = QLineEdit(s.engine_processor)
        self.processor_edit.setPlaceholderText("empty: the model's own (filled in for known Geo-R1 checkpoints)")
        self.adapter_edit = QLineEdit(s.engine_adapter)
        self.adapter_edit.setPlaceholderText("optional: a LoRA adapter directory to start with")

        # adapters of the running engine
        self.adapter_combo = QComboBox()
        self.adapter_combo.addItem(BASE_MODEL_ITEM)
        self.load_adapter_button = QPushButton("Load adapter…")

        # the log
        self.log_toggle = QToolButton()
        self.log_toggle.setText("Engine log")
        self.log_toggle.setCheckable(True)
        self.log_toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.log_toggle.setArrowType(Qt.ArrowType.RightArrow)
        self.log_view = QPlainTextEdit()
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(LOG_LINES)
        self.log_view.setVisible(False)
        self.diagnostics_button = QPushButton("Copy diagnostics")
        self.diagnostics_button.setToolTip("Versions, device, settings and the last log lines (without the token)")

        # layout
        top = QHBoxLayout()
        top.addWidget(QLabel("Engine:"))
        top.addWidget(self.state_label, 1)
        # two rows of buttons and combos sized by a few characters, not their longest entry: the panel fits a
        # narrow dock without scrolling sideways (issue 16, 3.4)
        buttons = QGridLayout()
        for i, b in enumerate((self.start_button, self.stop_button, self.restart_button, self.setup_button)):
            buttons.addWidget(b, i // 2, i % 2)
        for combo in (self.model_combo, self.adapter_combo):
            narrow(combo, 8)
        model_row = stretch_row(self.model_combo, self.browse_model_button, self.download_button)
        adapters_row = stretch_row(self.adapter_combo, self.load_adapter_button)
        form = wrapping_form()
        form.addRow("Model", model_row)
        form.addRow("Processor", self.processor_edit)
        form.addRow("Adapter at start", self.adapter_edit)
        form.addRow("Active adapter", adapters_row)
        log_row = QHBoxLayout()
        log_row.addWidget(self.log_toggle)
        log_row.addStretch(1)
        log_row.addWidget(self.diagnostics_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(top)
        layout.addWidget(self.details_label)
        layout.addWidget(self.countdown_label)
        layout.addLayout(buttons)
        layout.addLayout(form)
        layout.addWidget(self.message_label)
        layout.addLayout(log_row)
        layout.addWidget(self.log_view)

        # wiring
        self.start_button.clicked.connect(self.start)
        self.stop_button.clicked.connect(self.manager.stop)
        self.restart_button.clicked.connect(self.restart)
        self.setup_button.clicked.connect(self.open_setup)
        self.model_combo.currentTextChanged.connect(self._model_changed)
        self.browse_model_button.clicked.connect(self._browse_model)
        self.download_button.clicked.connect(self.start_download)
        self.adapter_combo.activated.connect(self._adapter_chosen)
        self.load_adapter_button.clicked.connect(self._browse_adapter)
        self.log_toggle.toggled.connect(self._toggle_log)
        self.diagnostics_button.clicked.connect(self.copy_diagnostics)
        self.manager.stateChanged.connect(self._on_state)
        self.manager.logLines.connect(self._on_lines)
        self.manager.countdown.connect(self._on_countdown)
        self.manager.infoChanged.connect(self._on_info)
        self.log_view.setPlainText("\n".join(self.manager.log_lines))
        self._on_state(self.manager.state, self.manager.message)
        if self.manager.info:
            self._on_info(self.manager.info)

    # -- engine ---------------------------------------------------------------------------------------
    def _save_fields(self) -> PluginSettings:
        s = PluginSettings.load(self.qsettings).with_values(
            engine_model=self.model_combo.currentText().strip(),
            engine_processor=self.processor_edit.text().strip(),
            engine_adapter=self.adapter_edit.text().strip(),
        )
        s.save(self.qsettings)
        return s

    def start(self) -> None:
        s = self._save_fields()
        try:
            config = EngineStartConfig.from_settings(s)
        except GeoR1Error as exc:
            self.show_message(str(exc))
            return
        self.show_message("")
        self.manager.start(config)

    def restart(self) -> None:
        self._save_fields()
        self.manager.restart()

    def open_setup(self) -> None:
        try:
            from ..engine_control.setup.dialog import SetupDialog
        except ImportError:
            text = (
                "The engine setup is not part of this plugin version. Install the engine by hand (see the README) "
                "and choose its venv as Engine venv in Raster > Geo-R1 > Settings."
            )
            QMessageBox.information(self, "Geo-R1", text)
            return
        SetupDialog(self).exec()

    def show_message(self, text: str) -> None:
        self.message_label.setText(text)

    def _on_state(self, state: str, message: str) -> None:
        label, colour = STATE_STYLE.get(state, (state, "#7f7f7f"))
        self.state_label.setText(label)
        self.state_label.setStyleSheet(f"color: {colour}; font-weight: bold;")
        url, token_file = self.manager.endpoint()
        where = f"The panel looks for the engine at {url} (token file {token_file})"
        self.state_label.setToolTip(where + "; the engine URL and token file are in Raster > Geo-R1 > Settings")
        if state == CRASHED:
            details = self.manager.url or url
        elif url in message:
            details = message
        else:  # say where the panel is looking, whatever the state
            details = f"{message.rstrip('.')}; looking at {url}" if message else f"looking at {url}"
        self.details_label.setText(details)
        if state == CRASHED:
            self.show_message(message)
            self.log_toggle.setChecked(True)  # the last lines say why
        elif state in (HEALTHY, STOPPED):
            self.show_message("")
        if state != STARTING:
            self.countdown_label.setText("")
        owned = self.manager.owns_engine()
        self.start_button.setEnabled(state in (STOPPED, CRASHED))
        self.stop_button.setEnabled(owned and state in (STARTING, HEALTHY))
        self.restart_button.setEnabled(state in (HEALTHY, CRASHED) and state != EXTERNAL)
        usable = state in (HEALTHY, EXTERNAL)
        self.adapter_combo.setEnabled(usable)
        self.load_adapter_button.setEnabled(usable)
        if usable:
            self.refresh_adapters()

    def _on_countdown(self, seconds: int) -> None:
        if self.manager.state == STARTING:
            self.countdown_label.setText(f"waiting for the engine to answer: {seconds} s left")

    def _on_info(self, info: dict[str, Any]) -> None:
        if self.manager.state in (HEALTHY, EXTERNAL):
            adapter = info.get("adapter") or "none (base model)"
            self.details_label.setText(f"{self.manager.url}  model {info.get('model')}  adapter {adapter}  "
                                       f"{info.get('device')} {info.get('dtype')}")  # fmt: skip

    def _on_lines(self, lines: list) -> None:
        for line in lines:
            self.log_view.appendPlainText(str(line))

    def _toggle_log(self, shown: bool) -> None:
        self.log_view.setVisible(shown)
        self.log_toggle.setArrowType(Qt.ArrowType.DownArrow if shown else Qt.ArrowType.RightArrow)

    def copy_diagnostics(self) -> str:
        text = self.manager.copy_diagnostics()
        self.show_message("Diagnostics copied to the clipboard (the token is removed).")
        return text

    # -- model ----------------------------------------------------------------------------------------
    def _model_changed(self, text: str) -> None:
        self.processor_edit.setText(processor_for(text, self.processor_edit.text()))

    def _browse_model(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Model directory", self.model_combo.currentText())
        if path:
            self.model_combo.setEditText(path)

    def start_download(self) -> None:
        model = self.model_combo.currentText().strip()
        if not model or Path(model).expanduser().is_dir():
            self.show_message("Type a Hugging Face id to download (a local directory needs no download).")
            return
        try:
            self.download = ModelDownload(venv_python(PluginSettings.load(self.qsettings).venv_path()), model,
                                          parent=self)  # fmt: skip
        except GeoR1Error as exc:
            self.show_message(str(exc))
            return
        self.download_button.setEnabled(False)
        self.log_toggle.setChecked(True)
        self.download.line.connect(lambda line: self.log_view.appendPlainText(line))
        self.download.finished.connect(self._download_done)
        self.show_message(f"downloading {model} …")
        self.download.start()

    def _download_done(self, ok: bool, message: str) -> None:
        self.download_button.setEnabled(True)
        self.show_message(message)

    # -- adapters -------------------------------------------------------------------------------------
    def refresh_adapters(self) -> None:
        self.manager.adapters(self._adapters_answer)

    def _adapters_answer(self, status: int | None, payload: Any, error: str | None) -> None:
        if error is not None or not isinstance(payload, dict):
            self.show_message(f"The engine's adapters could not be listed: {error}")
            return
        self.fill_adapters(payload)

    def fill_adapters(self, payload: dict[str, Any]) -> None:
        """The combo from ``GET /adapters``: the base model first, then each loaded adapter; the active one chosen."""
        self.adapter_combo.blockSignals(True)
        self.adapter_combo.clear()
        self.adapter_combo.addItem(BASE_MODEL_ITEM, None)
        for name, path in sorted((payload.get("available") or {}).items()):
            summary = adapter_summary(read_adapter_manifest(path))  # its metrics, from its geo_r1_adapter.json
            self.adapter_combo.addItem(f"{name}: {summary}" if summary else name, name)
            self.adapter_combo.setItemData(self.adapter_combo.count() - 1, f"{path}\n{summary}".strip(),
                                           Qt.ItemDataRole.ToolTipRole)  # fmt: skip
        active = payload.get("active")
        index = self.adapter_combo.findData(active) if active else 0
        self.adapter_combo.setCurrentIndex(max(0, index))
        self.adapter_combo.blockSignals(False)

    def _adapter_chosen(self, index: int) -> None:
        name = self.adapter_combo.itemData(index)
        self.show_message(f"switching to {name or 'the base model'} …")
        self.manager.activate_adapter(name, self._switched)

    def _switched(self, status: int | None, payload: Any, error: str | None) -> None:
        if error is not None:
            self.show_message(f"switching the adapter failed: {error}")
            self.refresh_adapters()
            return
        self.fill_adapters(payload)
        self.show_message(f"active: {payload.get('active') or 'the base model'}")

    def _browse_adapter(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "LoRA adapter directory (adapter_config.json)")
        if path:
            self.load_adapter(path)

    def load_adapter(self, path: str, name: str | None = None) -> None:
        name = name or Path(path).name
        folder = Path(path).expanduser()
        if not (folder / "adapter_config.json").is_file():  # the engine runs on this machine: check it here first
            self.show_message(f"{folder} is not a LoRA adapter folder: it holds no adapter_config.json. Choose the "
                              "folder that training wrote the adapter to (adapter_config.json and "
                              "adapter_model.safetensors).")  # fmt: skip
            return
        self.show_message(f"loading adapter {name} …")

        def done(status: int | None, payload: Any, error: str | None) -> None:
            if error is not None:
                self.show_message(f"The adapter {name} could not be loaded: {error}")
                return
            self.fill_adapters(payload)
            self.show_message(f"adapter {name} loaded; choose it above to use it")

        self.manager.load_adapter(name, path, done)
