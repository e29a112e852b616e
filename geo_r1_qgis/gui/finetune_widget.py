"""The panel's Fine-tune section: start a fine-tune on an annotation GeoPackage, watch it, use its adapter.

The engine trains (its jobs API, ``POST /jobs`` and friends); this widget only asks and shows, through
:mod:`.jobs_client` on the GUI thread (QNetworkAccessManager, never a blocking call). Before a job starts it
refuses, with a plain sentence, what would fail: no engine, an engine without the training tools (``/info``'s
``training`` false; "Set up the training tools…" opens the engine installer with them ticked), no or a bad
annotation file, and whatever the engine refuses (its detail, as a sentence).

While a job runs: its state, a progress bar (step of max_steps, the time left), the learning curves
(:class:`~geo_r1_qgis.gui.curve_plot.CurvePlot`), the log tail and Cancel. The job id is kept in the settings, so
closing the panel (or QGIS) loses nothing: the widget takes the job up again, and "Earlier jobs" lists the
engine's jobs to reopen one. When it ends: the base model against the adapter (Geo-R1's metric names), Open
report, and Use this adapter (loaded and made active on the engine through the engine manager, as the engine
section's adapter list does, and that list refreshed). Every text shown is plain text.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from qgis.PyQt import sip
from qgis.PyQt.QtCore import Qt, QUrl, pyqtSignal
from qgis.PyQt.QtGui import QDesktopServices
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..core.errors import GeoR1Error
from ..core.finetune import (
    DEFAULT_RECIPE,
    FINAL_STATES,
    RECIPES,
    FinetuneRequest,
    job_label,
    metric_rows,
    progress_percent,
    progress_text,
)
from ..core.rules.coords import QWEN_FACTOR
from ..engine_control.engine_process import EngineManager, shared_manager
from ..engine_control.jobs_client import JobsClient, JobWatcher
from ..settings import MODEL_TILE_TEXT, PluginSettings
from .curve_plot import CurvePlot
from .widgets import gpkg_file_widget, narrow, resolution_spin, stretch_row, wrapping_form

log = logging.getLogger(__name__)

TRAIN_EXTRA_HINT = (
    "This engine has no training tools. Install geo-r1[train] in the engine venv: click 'Set up the "
    "training tools…' (the engine installer, with 'Also install the training tools' ticked), or run "
    "in a terminal:  <engine venv>/bin/pip install 'geo-r1[train]'; then restart the engine"
)
LOG_TAIL_LINES = 200


def _plain(label: QLabel) -> QLabel:
    label.setTextFormat(Qt.TextFormat.PlainText)
    label.setWordWrap(True)
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    return label


class FinetuneWidget(QWidget):
    """The Fine-tune section. ``engine_widget`` (the panel's engine section) gets its adapter list refreshed when
    an adapter is put to use."""

    #: a job was started (its record)
    jobStarted = pyqtSignal(dict)
    #: the watched job ended (its record)
    jobEnded = pyqtSignal(dict)
    #: an adapter was made active on the engine (its name)
    adapterActivated = pyqtSignal(str)

    def __init__(self, manager: EngineManager | None = None, engine_widget: Any = None,
                 parent: QWidget | None = None) -> None:  # fmt: skip
        super().__init__(parent)
        self.manager = manager or shared_manager()
        self.engine_widget = engine_widget
        self.client = JobsClient(self.manager, self)
        self.watcher: JobWatcher | None = None
        self.record: dict[str, Any] = {}
        self._starting = False
        #: training options sent with every job beyond the recipe's (none by default; the engine's names)
        self.training_options: dict[str, Any] = {}
        #: tokens the evaluation generates at most (None: the engine's default)
        self.eval_max_new_tokens: int | None = None
        s = PluginSettings.load(self.manager.qsettings)

        # the request
        self.annotation_widget = gpkg_file_widget(self, s.finetune_annotations, save=False)
        self.annotation_widget.setToolTip("The GeoPackage with your boxes (layer geo_r1_annotations): draw them with "
                                          "Annotate, or pick a file")  # fmt: skip
        self.recipe_combo = QComboBox(self)
        for key, text in RECIPES:
            self.recipe_combo.addItem(text, key)
        self.recipe_combo.setCurrentIndex(self.recipe_combo.findData(DEFAULT_RECIPE))
        narrow(self.recipe_combo, 10)
        self.budget_spin = QSpinBox(self)
        self.budget_spin.setRange(1, 100_000)
        self.budget_spin.setValue(100)
        self.budget_unit = QComboBox(self)
        self.budget_unit.addItem("steps", "steps")
        self.budget_unit.addItem("minutes", "minutes")
        self.gsd_spin = resolution_spin(self, "Ground resolution the training chips are cut at; 'native' uses the "
                                              "raster's own")  # fmt: skip
        self.chip_spin = QSpinBox(self)
        self.chip_spin.setRange(0, 4096)
        self.chip_spin.setSingleStep(QWEN_FACTOR)
        self.chip_spin.setSpecialValueText(MODEL_TILE_TEXT)
        self.chip_spin.setSuffix(" px")
        self.chip_spin.setToolTip(f"Side of the training chips (a multiple of {QWEN_FACTOR}); at the bottom of the "
                                  "range, the tile the engine's model serves")  # fmt: skip
        self.name_edit = QLineEdit(self)
        self.name_edit.setPlaceholderText("optional: a name for the adapter")
        self.finetune_button = QPushButton("Fine-tune", self)
        self.finetune_button.setToolTip("Train a LoRA adapter on the annotations, on the engine")
        self.cancel_button = QPushButton("Cancel", self)
        self.cancel_button.setEnabled(False)
        self.resume_button = QPushButton("Resume", self)
        self.resume_button.setToolTip("Continue the cancelled or failed job from its last checkpoint")
        self.resume_button.setEnabled(False)
        self.setup_button = QPushButton("Set up the training tools…", self)
        self.setup_button.setVisible(False)

        # earlier jobs
        self.jobs_combo = QComboBox(self)
        narrow(self.jobs_combo, 10)
        self.jobs_combo.setToolTip("The engine's fine-tune jobs; choose one to show it")
        self.refresh_jobs_button = QPushButton("Refresh", self)

        # watching
        self.state_label = _plain(QLabel("", self))
        self.progress = QProgressBar(self)
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        self.plot = CurvePlot(self)
        self.log_view = QPlainTextEdit(self)
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(LOG_TAIL_LINES)
        self.log_view.setMaximumHeight(self.log_view.fontMetrics().lineSpacing() * 7 + 10)
        self.log_view.setPlaceholderText("the job's log")

        # when it ends
        self.metrics_table = QTableWidget(0, 3, self)
        self.metrics_table.setHorizontalHeaderLabels(["Metric", "Base model", "Adapter"])
        self.metrics_table.verticalHeader().setVisible(False)
        self.metrics_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.metrics_table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.metrics_table.setMaximumHeight(self.metrics_table.fontMetrics().lineSpacing() * 8)
        self.metrics_table.setVisible(False)
        self.report_button = QPushButton("Open report", self)
        self.use_button = QPushButton("Use this adapter", self)
        self.use_button.setToolTip("Load the adapter on the engine and make it the active one")
        self.report_button.setEnabled(False)
        self.use_button.setEnabled(False)
        self.message_label = _plain(QLabel("", self))

        # layout
        form = wrapping_form()
        form.addRow("Annotations", self.annotation_widget)
        form.addRow("Recipe", self.recipe_combo)
        form.addRow("Budget", stretch_row(self.budget_spin, self.budget_unit))
        form.addRow("Ground resolution", self.gsd_spin)
        form.addRow("Chip", self.chip_spin)
        form.addRow("Name", self.name_edit)
        buttons = QHBoxLayout()
        buttons.addWidget(self.finetune_button)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.resume_button)
        form_jobs = wrapping_form()
        form_jobs.addRow("Earlier jobs", stretch_row(self.jobs_combo, self.refresh_jobs_button))
        end_row = QHBoxLayout()
        end_row.addWidget(self.report_button)
        end_row.addWidget(self.use_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.setup_button)
        layout.addLayout(form_jobs)
        layout.addWidget(self.state_label)
        layout.addWidget(self.progress)
        layout.addWidget(self.plot)
        layout.addWidget(self.metrics_table)
        layout.addLayout(end_row)
        layout.addWidget(self.log_view)
        layout.addWidget(self.message_label)

        # wiring
        self.finetune_button.clicked.connect(self.start_finetune)
        self.cancel_button.clicked.connect(self.cancel_job)
        self.resume_button.clicked.connect(self.resume_job)
        self.setup_button.clicked.connect(self.open_setup)
        self.refresh_jobs_button.clicked.connect(lambda: self.refresh_jobs())
        self.jobs_combo.activated.connect(self._job_chosen)
        self.report_button.clicked.connect(self.open_report)
        self.use_button.clicked.connect(self.use_adapter)
        self.budget_unit.currentIndexChanged.connect(self._unit_changed)
        self.jobStarted.connect(lambda _record: self.refresh_jobs(quiet=True))
        self.jobEnded.connect(lambda _record: self.refresh_jobs(quiet=True))
        if s.finetune_job:  # a job started earlier (before the panel was closed, or QGIS quit): taken up again
            self.watch(s.finetune_job)
        self.refresh_jobs(quiet=True)

    # -- the request ----------------------------------------------------------------------------------
    def set_annotation_file(self, path: str | Path) -> None:
        """The annotation GeoPackage to fine-tune on (the annotation dock calls it with the file it writes)."""
        self.annotation_widget.setFilePath(str(path))

    def annotation_file(self) -> str:
        return self.annotation_widget.filePath().strip()

    def _unit_changed(self) -> None:
        minutes = self.budget_unit.currentData() == "minutes"
        self.budget_spin.setValue(30 if minutes else 100)

    def build_request(self) -> FinetuneRequest:
        """The job the fields describe. Raises GeoR1Error saying what to fix."""
        steps = self.budget_unit.currentData() == "steps"
        return FinetuneRequest(
            annotations=self.annotation_file(),
            recipe=self.recipe_combo.currentData(),
            max_steps=self.budget_spin.value() if steps else None,
            max_seconds=None if steps else self.budget_spin.value() * 60.0,
            gsd=self.gsd_spin.value() or None,
            chip=self.chip_spin.value() or None,
            name=self.name_edit.text().strip() or None,
            options=dict(self.training_options) or None,
            eval_max_new_tokens=self.eval_max_new_tokens,
        )

    def show_message(self, text: str) -> None:
        self.message_label.setText(text)
        self.message_label.setToolTip(text)
        if text:
            log.info("%s", text)

    def _busy(self) -> bool:
        return self._starting or (self.watcher is not None and self.watcher.active)

    # -- starting -------------------------------------------------------------------------------------
    def start_finetune(self) -> None:
        """Check, then ask the engine: the annotation file, the engine and its training tools, then ``POST /jobs``.
        A refusal is a sentence in the message line; nothing is started."""
        if self._busy():
            self.show_message("A fine-tune is running: wait for it to end, or cancel it first.")
            return
        self.setup_button.setVisible(False)
        try:
            request = self.build_request()
        except GeoR1Error as exc:
            self.show_message(_sentence(str(exc)))
            return
        self._starting = True
        self.finetune_button.setEnabled(False)
        self.show_message("Asking the engine …")

        def info_answer(payload: Any, sentence: str | None, status: int | None = None) -> None:
            if sentence is not None or not isinstance(payload, dict):
                self._refused(sentence or "The engine's /info was not readable.")
                return
            if not payload.get("training"):
                why = str(payload.get("training_error") or "").strip().rstrip(".")
                if why and "geo-r1[train]" not in why and "import" not in why and "install" not in why:
                    self._refused(f"This engine cannot fine-tune: {why}.")  # e.g. a remote backend
                    return
                log.info("the engine cannot train: %s", why)
                self.setup_button.setVisible(True)
                self._refused(TRAIN_EXTRA_HINT + ".")
                return
            self.show_message("Starting the fine-tune …")
            self.client.submit(request, submitted)

        def submitted(payload: Any, sentence: str | None, status: int | None = None) -> None:
            if sentence is not None or not isinstance(payload, dict) or not payload.get("id"):
                self._refused(sentence or "The engine did not answer with a job.")
                return
            self._starting = False
            self._remember(finetune_job=str(payload["id"]), finetune_annotations=str(request.annotations))
            self.show_message(f"Fine-tune {payload.get('name') or payload['id']} started.")
            self.jobStarted.emit(payload)
            self.watch(str(payload["id"]), payload)

        self.client.info(info_answer)

    def _refused(self, sentence: str) -> None:
        self._starting = False
        self.finetune_button.setEnabled(True)
        self.show_message(sentence)

    def _remember(self, **values: str) -> None:
        PluginSettings.load(self.manager.qsettings).with_values(**values).save(self.manager.qsettings)

    def open_setup(self) -> None:
        """The engine installer with "Also install the training tools" ticked."""
        try:
            from ..engine_control.setup.dialog import SetupDialog
        except ImportError:
            self.show_message(TRAIN_EXTRA_HINT + ".")
            return
        dialog = SetupDialog(self)
        dialog.train_check.setChecked(True)
        dialog.exec()

    # -- watching -------------------------------------------------------------------------------------
    def watch(self, job_id: str, record: dict[str, Any] | None = None) -> None:
        """Show job ``job_id`` and poll it until it ends."""
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher.deleteLater()
        self.record = {}
        self.metrics_table.setRowCount(0)
        self.metrics_table.setVisible(False)
        self.report_button.setEnabled(False)
        self.use_button.setEnabled(False)
        self.resume_button.setEnabled(False)
        self.log_view.clear()
        self.plot.set_curves(None)
        self.progress.setValue(0)
        self.state_label.setText(f"fine-tune {job_id}: asking the engine …")
        if record:
            self.show_record(record)
        self.watcher = JobWatcher(self.client, job_id, self)
        self.watcher.updated.connect(self.show_record)
        self.watcher.ended.connect(self._ended)
        self.watcher.problem.connect(self._problem)
        self.finetune_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.watcher.start()

    def show_record(self, record: dict[str, Any]) -> None:
        """Show what a ``GET /jobs/{id}`` record says: state, progress, curves, log tail (and the end, if ended)."""
        self.record = dict(record)
        name = record.get("name") or record.get("id")
        note = record.get("device_note") if record.get("state") == "training" else None
        self.state_label.setText(f"{name}: {progress_text(record)}" + (f"\n{note}" if note else ""))
        self.progress.setValue(progress_percent(record))
        listed = self.jobs_combo.findData(str(record.get("id") or ""))
        if listed >= 0:  # its line in Earlier jobs follows it (it said "queued" until the next GET /jobs)
            self.jobs_combo.setItemText(listed, job_label(record))
        if "curves" in record:
            self.plot.set_curves(record.get("curves"))
        if "log_tail" in record:
            lines = [str(line) for line in (record.get("log_tail") or [])]
            if self.log_view.toPlainText().splitlines() != lines:
                self.log_view.setPlainText("\n".join(lines))
                bar = self.log_view.verticalScrollBar()
                bar.setValue(bar.maximum())
        if record.get("state") in FINAL_STATES:
            self._show_end(record)

    def _show_end(self, record: dict[str, Any]) -> None:
        self.finetune_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        rows = metric_rows(record.get("metrics"))
        self.metrics_table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, text in enumerate(row):
                item = QTableWidgetItem(text)
                if c:
                    item.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))
                self.metrics_table.setItem(r, c, item)
        self.metrics_table.setVisible(bool(rows))
        self.report_button.setEnabled(bool(record.get("report")))
        self.use_button.setEnabled(record.get("state") == "done" and bool(record.get("adapter")))
        state = record.get("state")
        resumable = bool(record.get("resumable")) and state in ("failed", "cancelled")
        self.resume_button.setEnabled(resumable)
        again = " Resume continues it from its last checkpoint." if resumable else ""
        if state == "failed":
            self.show_message(f"The fine-tune failed: {str(record.get('error') or 'no reason given').rstrip('.')}. "
                              f"Its log is below.{again}")  # fmt: skip
        elif state == "cancelled":
            self.show_message(f"The fine-tune was cancelled at step {record.get('step') or 0}; no adapter was "
                              f"written.{again}")  # fmt: skip
        elif state == "done":
            self.show_message("The fine-tune is done: compare the metrics, then click 'Use this adapter'.")

    def _ended(self, record: dict[str, Any]) -> None:
        self.jobEnded.emit(record)

    def _problem(self, sentence: str) -> None:
        if self.watcher is not None and not self.watcher.active:  # given up (the engine does not know the job)
            self.finetune_button.setEnabled(True)
            self.cancel_button.setEnabled(False)
            self._remember(finetune_job="")
        self.show_message(sentence)

    def cancel_job(self) -> None:
        job_id = self.watcher.job_id if self.watcher is not None else self.record.get("id")
        if not job_id:
            return
        self.show_message("Cancelling the fine-tune …")

        def done(payload: Any, sentence: str | None, status: int | None = None) -> None:
            if sentence is not None:
                self.show_message(sentence)
                return
            self.show_message("Cancel sent: the job stops within a training step.")
            if self.watcher is not None and not self.watcher.active and isinstance(payload, dict):
                self.show_record(payload)

        self.client.cancel(str(job_id), done)

    def resume_job(self) -> None:
        """A cancelled or failed job continues from its last checkpoint, and is watched again."""
        job_id = self.record.get("id")
        if not job_id or self._busy():
            return
        self.resume_button.setEnabled(False)
        self._starting = True
        self.show_message("Resuming the fine-tune …")

        def done(payload: Any, sentence: str | None, status: int | None = None) -> None:
            self._starting = False
            if sentence is not None or not isinstance(payload, dict):
                self.resume_button.setEnabled(True)
                self.show_message(sentence or "The engine did not answer with the job.")
                return
            self.show_message(f"Fine-tune {payload.get('name') or job_id} resumed.")
            self._remember(finetune_job=str(job_id))
            self.watch(str(job_id), payload)

        self.client.resume(str(job_id), done)

    # -- earlier jobs ---------------------------------------------------------------------------------
    def refresh_jobs(self, quiet: bool = False) -> None:
        """``GET /jobs`` into Earlier jobs (asked when the section is built and when a job starts or ends, quietly:
        a failure then says nothing; Refresh says why)."""

        def done(payload: Any, sentence: str | None, status: int | None = None) -> None:
            if sentence is not None or not isinstance(payload, dict):
                if not quiet:
                    self.show_message(sentence or "The engine's job list was not readable.")
                return
            self.fill_jobs(payload.get("jobs") or [])

        self.client.jobs(done)

    def fill_jobs(self, jobs: list[dict[str, Any]]) -> None:
        """The combo from ``GET /jobs``: newest first; the watched job chosen."""
        current = self.watcher.job_id if self.watcher is not None else ""
        self.jobs_combo.blockSignals(True)
        self.jobs_combo.clear()
        for rec in sorted(jobs, key=lambda r: str(r.get("created") or ""), reverse=True):
            if not rec.get("id"):
                continue
            self.jobs_combo.addItem(job_label(rec), str(rec["id"]))
        index = self.jobs_combo.findData(current)
        self.jobs_combo.setCurrentIndex(index if index >= 0 else -1)
        self.jobs_combo.blockSignals(False)

    def _job_chosen(self, index: int) -> None:
        job_id = self.jobs_combo.itemData(index)
        if job_id and (self.watcher is None or job_id != self.watcher.job_id or not self.record):
            self._remember(finetune_job=str(job_id))
            self.watch(str(job_id))

    # -- when it ends ---------------------------------------------------------------------------------
    def open_report(self) -> bool:
        report = self.record.get("report")
        if not report or not Path(report).is_file():
            self.show_message(f"The job's report {report or ''} is not there (yet).".replace("  ", " "))
            return False
        return bool(QDesktopServices.openUrl(QUrl.fromLocalFile(str(report))))

    def adapter_name(self) -> str:
        """The name the adapter is loaded under on the engine: the job's name (else its id), engine-safe."""
        import re

        raw = str(self.record.get("name") or self.record.get("id") or "adapter")
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw).strip("_") or "adapter"

    def use_adapter(self) -> None:
        """Load the job's adapter on the engine and make it active (``POST /adapters``, ``POST /adapters/active``,
        through the engine manager), then refresh the engine section's adapter list. An adapter the engine has
        already loaded from the same folder is only made active; a name another folder took gets a suffix."""
        path = self.record.get("adapter")
        if not path or self.record.get("state") != "done":
            self.show_message("This job has no adapter to use: only a finished job has one.")
            return
        self.use_button.setEnabled(False)
        self.show_message("Loading the adapter on the engine …")

        def activated(status: int | None, payload: Any, error: str | None, name: str) -> None:
            if sip.isdeleted(self):
                return
            self.use_button.setEnabled(True)
            if error is not None:
                self.show_message(f"The adapter {name} could not be made active: {error}")
                return
            if self.engine_widget is not None and isinstance(payload, dict):
                self.engine_widget.fill_adapters(payload)
            self.show_message(f"Adapter {name} is active: every run from now on uses it (its layer records it).")
            self.adapterActivated.emit(name)

        def loaded(status: int | None, payload: Any, error: str | None, name: str) -> None:
            if sip.isdeleted(self):
                return
            if error is not None:
                self.use_button.setEnabled(True)
                self.show_message(f"The adapter {name} could not be loaded: {error}")
                return
            self.manager.activate_adapter(name, lambda st, pl, err: activated(st, pl, err, name))

        def listed(status: int | None, payload: Any, error: str | None) -> None:
            if sip.isdeleted(self):
                return
            if error is not None or not isinstance(payload, dict):
                self.use_button.setEnabled(True)
                self.show_message(f"The engine's adapters could not be listed: {error}")
                return
            available = {str(k): str(v) for k, v in (payload.get("available") or {}).items()}
            same = [n for n, p in available.items() if _same_folder(p, str(path))]
            if same:
                self.manager.activate_adapter(same[0], lambda st, pl, err: activated(st, pl, err, same[0]))
                return
            name = base = self.adapter_name()
            n = 2
            while name in available:
                name, n = f"{base}_{n}", n + 1
            self.show_message(f"Loading adapter {name} on the engine …")
            self.manager.load_adapter(name, str(path), lambda st, pl, err: loaded(st, pl, err, name))

        self.manager.adapters(listed)


def _same_folder(a: str, b: str) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, RuntimeError):
        return a == b


def _sentence(text: str) -> str:
    text = " ".join(text.split()).rstrip(".")
    return (text[:1].upper() + text[1:] + ".") if text else ""
