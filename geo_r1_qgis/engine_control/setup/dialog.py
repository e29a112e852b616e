"""The "Set up the Geo-R1 engine" dialog: pick a Python, the torch build and the source; Install, Check, Repair.

Opened from the plugin menu ("Set up the engine…"), the panel and the settings dialog with
``SetupDialog(parent).exec()`` or ``.show()``. The work runs in a :class:`.task.SetupTask`; the dialog only shows
its progress and log. Every message is plain text.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ...core.errors import ConfigError
from ...settings import PluginSettings, plugin_settings_dir
from .installer import GpuInfo, Interpreter, SetupConfig, detect_gpu, find_interpreters, probe_interpreter
from .task import CheckTask, SetupTask
from .venv import installed_state, plugin_version

TITLE = "Set up the Geo-R1 engine"
SOURCES = (("index", "Package index (pip)"), ("wheel", "Wheel file (.whl)"),
           ("wheelhouse", "Wheelhouse folder (offline)"))  # fmt: skip
TORCH = (("auto", "Automatic"), ("cpu", "CPU"), ("cuda", "CUDA (NVIDIA GPU)"))
INTRO = (
    "The Geo-R1 engine runs in its own Python environment (a venv), separate from QGIS. This installs it:"
    " a venv made with a Python 3.10 or newer from this computer, then torch, then geo-r1. Nothing is"
    " installed into QGIS's own Python. For a computer without internet, make a wheelhouse folder on a"
    " connected one with 'geo-r1 wheelhouse DIR' and choose it as the source."
)


def _row(*widgets: QWidget) -> QWidget:
    box = QWidget()
    lay = QHBoxLayout(box)
    lay.setContentsMargins(0, 0, 0, 0)
    for w in widgets:
        lay.addWidget(w, 1 if isinstance(w, (QLineEdit, QComboBox)) else 0)
    return box


class SetupDialog(QDialog):
    def __init__(self, parent: QWidget | None = None, settings: PluginSettings | None = None,
                 gpu: GpuInfo | None = None) -> None:  # fmt: skip
        super().__init__(parent)
        self.setWindowTitle(TITLE)
        self.settings = settings or PluginSettings.load()
        self.task: SetupTask | None = None
        self.check_task: CheckTask | None = None
        self.last_ok: bool | None = None
        self.gpu = gpu or detect_gpu()
        self._build()
        self._fill()

    # -- layout ----------------------------------------------------------------------------------
    def _build(self) -> None:
        intro = QLabel(INTRO)
        intro.setWordWrap(True)
        intro.setTextFormat(Qt.TextFormat.PlainText)

        self.python_combo = QComboBox()
        self.python_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.python_combo.setMinimumContentsLength(40)
        self.python_browse = QPushButton("Browse…")
        self.python_browse.clicked.connect(self._browse_python)
        self.python_note = QLabel()
        self.python_note.setWordWrap(True)
        self.python_note.setTextFormat(Qt.TextFormat.PlainText)

        self.torch_combo = QComboBox()
        for key, label in TORCH:
            self.torch_combo.addItem(label, key)
        self.gpu_note = QLabel(self.gpu.text)
        self.gpu_note.setWordWrap(True)
        self.gpu_note.setTextFormat(Qt.TextFormat.PlainText)

        self.source_combo = QComboBox()
        for key, label in SOURCES:
            self.source_combo.addItem(label, key)
        self.source_path = QLineEdit()
        self.source_path.setPlaceholderText("the geo_r1-*.whl file or the wheelhouse folder")
        self.source_browse = QPushButton("Browse…")
        self.source_browse.clicked.connect(self._browse_source)
        self.source_combo.currentIndexChanged.connect(self._source_changed)

        self.venv_edit = QLineEdit()
        self.venv_browse = QPushButton("Browse…")
        self.venv_browse.clicked.connect(self._browse_venv)

        self.constraints_edit = QLineEdit()
        self.constraints_edit.setPlaceholderText("optional: a pip constraints file (default: the pins in the wheel)")
        self.pip_args_edit = QLineEdit()
        self.pip_args_edit.setPlaceholderText("optional: extra pip options, e.g. --proxy http://proxy:3128")
        self.torch_index_edit = QLineEdit()
        self.torch_index_edit.setPlaceholderText("optional: the index torch comes from (PyTorch's CPU or CUDA index)")
        self.train_check = QCheckBox("Also install the training tools (geo-r1[train])")

        form = QFormLayout()
        form.addRow("Python", _row(self.python_combo, self.python_browse))
        form.addRow("", self.python_note)
        form.addRow("torch", self.torch_combo)
        form.addRow("", self.gpu_note)
        form.addRow("Source", self.source_combo)
        form.addRow("", _row(self.source_path, self.source_browse))
        form.addRow("Engine venv", _row(self.venv_edit, self.venv_browse))
        form.addRow("Constraints", self.constraints_edit)
        form.addRow("pip options", self.pip_args_edit)
        form.addRow("torch index", self.torch_index_edit)
        form.addRow("", self.train_check)

        self.status = QLabel()
        self.status.setWordWrap(True)
        self.status.setTextFormat(Qt.TextFormat.PlainText)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.log_view = QPlainTextEdit()
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(5000)
        self.log_view.setMinimumHeight(160)

        self.install_button = QPushButton("Install")
        self.check_button = QPushButton("Check")
        self.repair_button = QPushButton("Repair")
        self.cancel_button = QPushButton("Cancel")
        self.close_button = QPushButton("Close")
        self.install_button.clicked.connect(lambda: self.start_install(repair=False))
        self.repair_button.clicked.connect(lambda: self.start_install(repair=True))
        self.check_button.clicked.connect(self.start_check)
        self.cancel_button.clicked.connect(self.cancel_install)
        self.close_button.clicked.connect(self.reject)
        buttons = _row(self.install_button, self.check_button, self.repair_button, self.cancel_button,
                       self.close_button)  # fmt: skip

        lay = QVBoxLayout(self)
        lay.addWidget(intro)
        lay.addLayout(form)
        lay.addWidget(self.status)
        lay.addWidget(self.progress)
        lay.addWidget(self.log_view, 1)
        lay.addWidget(buttons)
        self.resize(820, 680)
        self._set_running(False)

    def _fill(self) -> None:
        self.venv_edit.setText(str(self.settings.venv_path()))
        found = find_interpreters()
        if self.settings.setup_python and not any(str(i.path) == self.settings.setup_python for i in found):
            found.insert(0, probe_interpreter(self.settings.setup_python))
        for interp in found:
            self._add_interpreter_item(interp)
        preferred = self.settings.setup_python
        index = next((i for i in range(self.python_combo.count())
                      if preferred and str(self.python_combo.itemData(i)) == preferred), 0)  # fmt: skip
        self.python_combo.setCurrentIndex(index)
        self.python_combo.currentIndexChanged.connect(self._python_changed)
        self._python_changed()
        state = installed_state(self.settings.venv_path())
        if state is not None and state.record is not None:  # Repair reinstalls what was installed
            rec = state.record
            self._select(self.source_combo, rec.source)
            self.source_path.setText(rec.source_path)
            self._select(self.torch_combo, rec.torch)
            self.train_check.setChecked("train" in rec.extras)
            self.status.setText(f"An engine is installed (geo-r1 {rec.geo_r1_version}, {rec.installed_at}). Press"
                                " Check to test it, Repair to reinstall it.")  # fmt: skip
        elif state is not None:
            self.status.setText(f"There is a venv at {state.venv} without an install record. Press Repair.")
        else:
            self.status.setText("No engine is installed yet. Choose a Python and press Install.")
        self._source_changed()

    # -- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _select(combo: QComboBox, key: str) -> None:
        i = combo.findData(key)
        if i >= 0:
            combo.setCurrentIndex(i)

    def _add_interpreter_item(self, interp: Interpreter) -> int:
        self.python_combo.addItem(interp.label, str(interp.path))
        i = self.python_combo.count() - 1
        self.python_combo.setItemData(i, interp.problem, Qt.ItemDataRole.ToolTipRole)
        self._interpreters = {**getattr(self, "_interpreters", {}), str(interp.path): interp}
        return i

    def add_interpreter(self, path: str | Path) -> Interpreter:
        """Probe ``path`` and select it (what Browse… does)."""
        interp = probe_interpreter(path)
        existing = self.python_combo.findData(str(interp.path))
        if existing >= 0:
            self.python_combo.removeItem(existing)
        self.python_combo.setCurrentIndex(self._add_interpreter_item(interp))
        self._python_changed()
        return interp

    def current_interpreter(self) -> Interpreter | None:
        path = self.python_combo.currentData()
        return self._interpreters.get(str(path)) if path else None

    def _python_changed(self) -> None:
        interp = self.current_interpreter()
        if interp is None:
            self.python_note.setText("No Python 3.10 or newer was found. Install one (python.org, or your system's"
                                     " python3 and python3-venv packages) and press Browse… to choose it.")  # fmt: skip
        elif interp.problem:
            self.python_note.setText(f"This Python cannot be used: {interp.problem}.")
        else:
            v = ".".join(map(str, interp.version))
            self.python_note.setText(f"Found Python {v} at {interp.path}: the venv is made with it.")

    def _source_changed(self) -> None:
        needs_path = self.source_combo.currentData() != "index"
        self.source_path.setEnabled(needs_path)
        self.source_browse.setEnabled(needs_path)

    def _browse_python(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose a Python 3 interpreter", "/usr/bin")
        if path:
            self.add_interpreter(path)

    def _browse_source(self) -> None:
        if self.source_combo.currentData() == "wheel":
            path, _ = QFileDialog.getOpenFileName(self, "Choose the geo-r1 wheel", "", "Wheels (*.whl)")
        else:
            path = QFileDialog.getExistingDirectory(self, "Choose the wheelhouse folder")
        if path:
            self.source_path.setText(path)

    def _browse_venv(self) -> None:
        start = str(plugin_settings_dir())
        path = QFileDialog.getExistingDirectory(self, "Choose the folder for the engine venv", start)
        if path:
            self.venv_edit.setText(str(Path(path) / "engine-venv"))

    def torch_choice(self) -> str:
        key = self.torch_combo.currentData()
        return self.gpu.torch if key == "auto" else key

    def config(self) -> SetupConfig:
        """The form as a SetupConfig (raises ConfigError with a plain message)."""
        interp = self.current_interpreter()
        if interp is None:
            raise ConfigError("no Python chosen: press Browse… next to Python and choose a python3 (3.10 or newer)")
        if interp.problem:
            raise ConfigError(f"the Python {interp.path} cannot be used: {interp.problem}")
        try:
            pip_args = tuple(shlex.split(self.pip_args_edit.text()))
        except ValueError as exc:
            raise ConfigError(f"the pip options cannot be read ({exc}); check their quotes") from exc
        venv = Path(self.venv_edit.text().strip()).expanduser()
        return SetupConfig(
            python=interp.path,
            venv=venv,
            torch=self.torch_choice(),
            source=self.source_combo.currentData(),
            source_path=self.source_path.text().strip(),
            torch_index_url=self.torch_index_edit.text().strip(),
            constraints=self.constraints_edit.text().strip(),
            pip_args=pip_args,
            extras=("train",) if self.train_check.isChecked() else (),
            version=plugin_version(),
            log_path=venv.parent / "engine-setup.log",
        )

    def _set_running(self, running: bool) -> None:
        for w in (self.install_button, self.check_button, self.repair_button, self.close_button):
            w.setEnabled(not running)
        self.cancel_button.setEnabled(running)

    def append_log(self, line: str) -> None:
        self.log_view.appendPlainText(line)

    # -- actions ---------------------------------------------------------------------------------
    def start_install(self, repair: bool = False) -> SetupTask | None:
        try:
            cfg = self.config()
        except ConfigError as exc:
            self.status.setText(f"Cannot start: {exc}.")
            return None
        self.last_ok = None
        self.log_view.clear()
        self.progress.setValue(0)
        what = "Reinstalling" if repair else "Installing"
        self.status.setText(f"{what} the engine into {cfg.venv} (torch for {cfg.torch.upper()}, from {cfg.source}).")
        task = SetupTask(cfg)
        task.lineLogged.connect(self.append_log)
        task.stepStarted.connect(self._step_started)
        task.progressChanged.connect(lambda p: self.progress.setValue(int(p)))
        task.done.connect(self._install_done)
        self.task = task
        self._set_running(True)
        QgsApplication.taskManager().addTask(task)
        return task

    def _step_started(self, index: int, count: int, title: str) -> None:
        self.status.setText(f"Step {index + 1} of {count}: {title}…")

    def _install_done(self, ok: bool, message: str, tail: str) -> None:
        self.task = None
        self.last_ok = ok
        self._set_running(False)
        if ok:
            self.progress.setValue(100)
            interp = self.current_interpreter()
            changes = {"engine_venv": "" if Path(self.venv_edit.text()) == self.settings.venv_path()
                       and not self.settings.engine_venv else self.venv_edit.text().strip()}  # fmt: skip
            if interp is not None:
                changes["setup_python"] = str(interp.path)
            self.settings = self.settings.with_values(**changes)
            self.settings.save()
            self.status.setText(message)
        else:
            self.status.setText(message + ("\n\nThe last lines of the log:\n" + tail if tail else ""))

    def cancel_install(self) -> None:
        if self.task is not None:
            self.status.setText("Cancelling…")
            self.task.cancel()

    def start_check(self) -> CheckTask:
        self.status.setText(f"Checking the engine venv at {self.venv_edit.text()}…")
        task = CheckTask(Path(self.venv_edit.text().strip()).expanduser(), plugin_version())
        task.done.connect(self._check_done)
        self.check_task = task
        self._set_running(True)
        self.cancel_button.setEnabled(False)
        QgsApplication.taskManager().addTask(task)
        return task

    def _check_done(self, ok: bool, text: str) -> None:
        self.check_task = None
        self.last_ok = ok
        self._set_running(False)
        self.status.setText(text)
        self.append_log(text)

    def reject(self) -> None:
        if self.task is not None:  # closing while installing cancels the install
            self.task.cancel()
        super().reject()
