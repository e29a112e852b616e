"""The Geo-R1 dock panel: describe what to find, run it over a raster, read the results on the map.

View › Panels › Geo-R1, or the toolbar button. Inputs (raster, expression with history, mode, area,
ground resolution, tile size and overlap, the output GeoPackage), the engine line, Run / Cancel / Resume
with one progress bar, the list of every run since QGIS started, and the Fine-tune section
(:class:`~geo_r1_qgis.gui.finetune_widget.FinetuneWidget`: train an adapter on annotations, watch it, use it).
A run is a :class:`~geo_r1_qgis.engine_control.run_task.GroundingTask`; its detections are drawn as each engine
request is committed to the GeoPackage, and the final, merged layer replaces them when the run is done. A cancelled
or failed run keeps what it found (its per-tile layer from the GeoPackage) and can be resumed.

Every text the panel shows that comes from the model or the user is plain text or escaped HTML.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeature,
    QgsFeatureRequest,
    QgsGeometry,
    QgsLayerTreeGroup,
    QgsMapLayer,
    QgsPointXY,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.gui import QgsCollapsibleGroupBox, QgsDockWidget, QgsMapLayerComboBox, QgsRubberBand
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QMenu,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..compat import GEOMETRY_POLYGON, LAYER_FILTER_POLYGON, LAYER_FILTER_RASTER
from ..core.checkpoints import default_mode_for
from ..core.errors import ConfigError, GeoR1Error, OutputError
from ..core.geometry import tile_size_advice, window_from_map_bbox
from ..core.rules.coords import QWEN_FACTOR
from ..core.run_spec import spec_values
from ..engine_control.run_task import GroundingTask, LiveBatch, RunOutcome, RunRequest, run_display_name
from ..qgis_io.rasters import QgisRasterSource, make_fields, result_feature, utc_now
from ..qgis_io.results_style import first_line, style_result_layer
from ..settings import (
    EXAMPLE_EXPRESSIONS,
    MODEL_TILE_TEXT,
    PluginSettings,
    elided,
    expression_history,
    remember_expression,
)
from .widgets import gpkg_file_widget, narrow, resolution_spin, stretch_row

log = logging.getLogger(__name__)

GROUP_NAME = "Geo-R1"
#: a "Geo-R1" group's custom properties: the id and name of the raster it sits above
GROUP_RASTER_KEY, GROUP_RASTER_NAME_KEY = "geo_r1/raster", "geo_r1/raster_name"
AREA_CANVAS, AREA_LAYER, AREA_DRAWN, AREA_POLYGONS = "canvas", "layer", "drawn", "polygons"
AREA_CHOICES = (
    (AREA_CANVAS, "Map canvas extent"),
    (AREA_LAYER, "Whole raster layer"),
    (AREA_DRAWN, "Rectangle drawn on the map"),
    (AREA_POLYGONS, "Selected polygons of a layer"),
)
MODE_CHOICES = (("all", "all matching objects"), ("one", "the one best match"))
#: the Outlines choices: (text, (RunSpec.task, RunSpec.outline))
OUTLINE_CHOICES = (
    ("none: boxes", ("auto", False)),
    ("refine each box to its outline (SAM)", ("auto", True)),
    ("GRES: boxes and keypoints, then SAM (mode all)", ("gres", False)),
)
ROLE_RUN = Qt.ItemDataRole.UserRole
ROLE_FEATURE = Qt.ItemDataRole.UserRole + 1


def _outline_band(canvas: Any, colour: QColor) -> QgsRubberBand:
    """A polygon rubber band drawn as an outline only (the drawn area, a result's tile)."""
    band = QgsRubberBand(canvas, GEOMETRY_POLYGON)
    band.setStrokeColor(colour)
    band.setFillColor(QColor(0, 0, 0, 0))
    band.setWidth(2)
    return band


@dataclass
class RunEntry:
    """A run the panel knows of (kept for the whole QGIS session, across closing and reopening the panel)."""

    run_id: str
    expression: str
    mode: str
    output: Path
    layer: str  # the answer layer's table name in the GeoPackage
    display_name: str
    status: str = "running"  # running / done / canceled / failed
    request: RunRequest | None = None
    raster_layer_id: str = ""
    map_layer_id: str = ""  # the layer on the map (live, then final or per-tile)
    #: the user removed the run's layer from the map while it ran: it is not put back (double-click reopens it)
    removed_from_map: bool = False
    message: str = ""
    started: float = field(default_factory=time.perf_counter)
    first_feature_s: float | None = None
    #: the parameters JSON of a run found in a GeoPackage (not started in this session)
    file_parameters: str = ""
    #: the raster source the run read (a web layer's grid is the run's own), reused to resume it
    source: Any = None


#: the status line: at most this many characters and lines shown (the whole message in its tooltip and the log)
STATUS_CHARS, STATUS_LINES = 360, 6
_LONG_WORD = 40


def status_text(text: str, limit: int = STATUS_CHARS) -> str:
    """``text`` for the status line: cut to ``limit`` characters (``…``), and a zero-width space after every
    :data:`_LONG_WORD` characters of a word, so a path or URL wraps instead of widening the panel."""
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return " ".join("\u200b".join(w[i : i + _LONG_WORD] for i in range(0, len(w), _LONG_WORD)) for w in text.split(" "))


#: every run since QGIS started, newest last
RUNS: list[RunEntry] = []


def check_output_writable(output: Path) -> None:
    """The GeoPackage can be created or written, with SQLite's journal beside it: tried, not guessed from the
    permission bits (root passes those; an immutable or read-only folder does not). Nothing is left behind."""
    import tempfile

    folder = output.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if output.exists() and not output.is_file():
            raise OutputError(f"'Save to' {output} is a folder, not a GeoPackage file; choose a file name ending "
                              "in .gpkg")  # fmt: skip
        if output.exists():
            with open(output, "r+b"):
                pass
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(f"the results cannot be written to {output}: the folder {folder} is not writable "
                          f"({exc.strerror or exc}). Choose another 'Save to' file (a folder you can write "
                          "to), then click Run") from None  # fmt: skip


#: errors a later try can get past (the engine short of memory, a full disk, a slow answer): Resume is worth it
_TRANSIENT = ("no memory", "No space left", "disk I/O", "did not become ready", "timed out", "cannot reach")


def resume_advice(error: str, opened: bool) -> str:
    """What to say after a failed run: Resume only where it can help."""
    if not opened:
        return "Nothing was written; fix the cause above and click Run again"
    if any(marker in error for marker in _TRANSIENT):
        return "What was found is kept; once the cause is gone, select the run and click Resume to finish it"
    return (
        "What was found is kept; Resume would meet the same error, so fix the cause above and start a new run "
        "(click Run)"
    )


def engine_info(url: str, token_file: Path | str) -> dict[str, Any]:
    """The engine's ``/info`` at ``url``, asked before a run starts (a few seconds at most on loopback)."""
    from ..core.client import EngineClient, read_token
    from ..core.errors import EngineUnavailableError

    where = (f"No Geo-R1 engine answers at {url}. Start one in the Engine section above (Start), or run "
             "geo-r1 serve --model <model> in a terminal, or correct the engine URL in Raster > Geo-R1 > Settings; "
             "then click Run")  # fmt: skip
    try:
        client = EngineClient(url, None, timeout_s=3.0)
        client.health(timeout_s=3.0)
    except EngineUnavailableError:
        raise EngineUnavailableError(where) from None
    return EngineClient(url, read_token(token_file), timeout_s=5.0).info(timeout_s=5.0)


class GeoR1Dock(QgsDockWidget):
    """The panel. ``iface`` may be None in tests that drive it with a bare canvas."""

    runStarted = pyqtSignal(object)  # RunEntry
    runFinished = pyqtSignal(object)  # RunEntry

    def __init__(self, iface: Any, canvas: Any = None, parent: QWidget | None = None) -> None:
        super().__init__("Geo-R1", parent)
        self.setObjectName("GeoR1Dock")
        self.iface = iface
        self.canvas = canvas if canvas is not None else (iface.mapCanvas() if iface is not None else None)
        self.settings = PluginSettings.load()
        self.task: GroundingTask | None = None
        self.entry: RunEntry | None = None
        self.drawn_extent: tuple[QgsRectangle, QgsCoordinateReferenceSystem] | None = None
        self._extent_tool = None
        self._previous_tool = None
        self._rubber: QgsRubberBand | None = None
        self._area_band: QgsRubberBand | None = None  # the drawn rectangle, on the map while it is the area
        # before the Raster box's model connects to it: the box still shows the raster that is being removed
        QgsProject.instance().layersWillBeRemoved.connect(self._layers_leaving)
        self._build()
        self.refresh_history()
        self.refresh_results()
        QgsProject.instance().layersRemoved.connect(self._release_unused_files)

    # -- layout ------------------------------------------------------------------------------------
    def _build(self) -> None:
        body = QWidget(self)
        outer = QVBoxLayout(body)
        engine_group = QgsCollapsibleGroupBox("Engine", body)
        engine_layout = QVBoxLayout(engine_group)
        self.engine_box = self._engine_line(engine_group)
        engine_layout.addWidget(self.engine_box)
        outer.addWidget(engine_group)
        self.engine_group = engine_group
        self._shown_once = False
        manager = getattr(self.engine_box, "manager", None)
        if manager is not None:  # the group's title shows the engine's state (folded only before the panel shows)
            manager.stateChanged.connect(self._engine_state)
            self._engine_state(manager.state, "")
        search = QgsCollapsibleGroupBox("Find", body)
        form = QFormLayout(search)
        form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)  # a narrow dock puts labels above fields

        self.raster_combo = QgsMapLayerComboBox(body)
        self.raster_combo.setFilters(LAYER_FILTER_RASTER)
        form.addRow("Raster", self.raster_combo)
        band_row = QHBoxLayout()
        self.band_combos = []
        for colour in ("Red", "Green", "Blue"):
            combo = QComboBox(body)
            combo.setToolTip(f"The raster band shown to the model as {colour.lower()}")
            narrow(combo, 3)
            band_row.addWidget(QLabel(colour[0], body))
            band_row.addWidget(combo, 1)
            self.band_combos.append(combo)
        form.addRow("Bands", band_row)
        self.raster_combo.layerChanged.connect(self._raster_chosen)
        self._raster_chosen(self.raster_combo.currentLayer())

        self.expression_combo = QComboBox(body)
        self.expression_combo.setEditable(True)
        self.expression_combo.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        self.expression_combo.lineEdit().setPlaceholderText("what to find, e.g. all storage tanks")
        # Its width never follows its entries (a 5,000-character one made QGIS's window 32,237 px wide): the
        # entries are shown elided (the whole text is each item's data), the box sized by a few characters.
        narrow(self.expression_combo, 12)
        self.expression_combo.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.expression_combo.view().setTextElideMode(Qt.TextElideMode.ElideRight)
        self.expression_combo.activated.connect(self._history_chosen)
        self.expression_combo.currentIndexChanged.connect(self._history_chosen)
        form.addRow("Find", self.expression_combo)

        self.mode_combo = QComboBox(body)
        for key, text in MODE_CHOICES:
            self.mode_combo.addItem(text, key)
        form.addRow("Mode", self.mode_combo)
        #: outlines from the engine's SAM (geo-r1 serve --sam): (RunSpec.task, RunSpec.outline) per choice
        self.outline_combo = QComboBox(body)
        for text, value in OUTLINE_CHOICES:
            self.outline_combo.addItem(text, value)
        self.outline_combo.setToolTip(
            "Outlines need an engine started with --sam (a SAM 2); the run then shows "
            "the objects' outlines instead of their boxes (both are in the GeoPackage)"
        )
        narrow(self.outline_combo, 12)  # its longest entry alone made the panel 494 px wide
        form.addRow("Outlines", self.outline_combo)
        model_combo = getattr(self.engine_box, "model_combo", None)
        if model_combo is not None:  # a known checkpoint brings its mode (OVD, GRES: all; REC: one)
            model_combo.currentTextChanged.connect(self._model_chosen)
            self._model_chosen(model_combo.currentText())

        self.area_combo = QComboBox(body)
        for key, text in AREA_CHOICES:
            self.area_combo.addItem(text, key)
        self.draw_button = QPushButton("Draw", body)
        self.draw_button.setToolTip("Drag a rectangle on the map")
        self.draw_button.clicked.connect(self.start_drawing)
        narrow(self.area_combo, 12)
        form.addRow("Area", stretch_row(self.area_combo, self.draw_button))
        self.polygon_combo = QgsMapLayerComboBox(body)
        self.polygon_combo.setFilters(LAYER_FILTER_POLYGON)
        self.polygon_combo.setAllowEmptyLayer(True)
        form.addRow("Polygons", self.polygon_combo)
        self.area_combo.currentIndexChanged.connect(self._area_changed)

        self.gsd_spin = resolution_spin(body, "Ground resolution the raster is read at; 'native' reads its own pixels")
        form.addRow("Ground resolution", self.gsd_spin)

        self.output_widget = gpkg_file_widget(body, str(self._default_output()))
        form.addRow("Save to", self.output_widget)
        self._output_default = self.output_widget.filePath()
        project = QgsProject.instance()  # "Save to" follows the project (beside it) until the user picks a file
        project.homePathChanged.connect(self._project_changed)
        project.fileNameChanged.connect(self._project_changed)
        project.projectSaved.connect(self._project_changed)  # a first save (write()) emits no fileNameChanged
        project.readProject.connect(self._project_changed)
        project.cleared.connect(self._project_changed)
        outer.addWidget(search)

        advanced = QgsCollapsibleGroupBox("Advanced", body)
        adv = QFormLayout(advanced)
        adv.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.tile_spin = QSpinBox(advanced)
        self.tile_spin.setRange(0, 4096)
        self.tile_spin.setSingleStep(QWEN_FACTOR)
        self.tile_spin.setSpecialValueText(MODEL_TILE_TEXT)  # shown at 0
        self.tile_spin.setValue(self.settings.tile_size)
        self.tile_spin.setSuffix(" px")
        self.tile_spin.setToolTip(f"Side of the square tiles the raster is cut into (a multiple of {QWEN_FACTOR} "
                                  "is read unresized by the model); at the bottom of the range, the tile the "
                                  "engine's model was trained to serve")  # fmt: skip
        self.overlap_spin = QSpinBox(advanced)
        self.overlap_spin.setRange(0, 2048)
        self.overlap_spin.setValue(self.settings.overlap)
        self.overlap_spin.setSuffix(" px")
        self.overlap_spin.setToolTip("Pixels neighbouring tiles share, so objects on a tile edge are seen whole")
        for spin in (self.tile_spin, self.overlap_spin):  # wide enough for "4096 px" and its arrows, never squashed
            spin.setMinimumWidth(spin.fontMetrics().horizontalAdvance(" 4096 px ") + 40)
            spin.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        adv.addRow("Tile size", self.tile_spin)
        adv.addRow("Overlap", self.overlap_spin)
        advanced.setCollapsed(True)
        self.advanced_group = advanced
        outer.addWidget(advanced)

        buttons = QHBoxLayout()
        self.run_button = QPushButton("Run", body)
        self.run_button.clicked.connect(self.start_run)
        self.cancel_button = QPushButton("Cancel", body)
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel_run)
        self.resume_button = QPushButton("Resume", body)
        self.resume_button.setEnabled(False)
        self.resume_button.setToolTip("Continue the selected cancelled or failed run where it stopped")
        self.resume_button.clicked.connect(self.resume_selected)
        self.file_runs_button = QPushButton("Runs in file", body)
        self.file_runs_button.setToolTip(
            "List the unfinished runs of the 'Save to' GeoPackage (from earlier "
            "sessions or the geo-r1 command line) so they can be resumed"
        )
        self.file_runs_button.clicked.connect(self.load_file_runs)
        for b in (self.run_button, self.cancel_button, self.resume_button, self.file_runs_button):
            buttons.addWidget(b)
        outer.addLayout(buttons)
        self.progress = QProgressBar(body)
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        outer.addWidget(self.progress)
        self.status_label = QLabel("", body)
        self.status_label.setTextFormat(Qt.TextFormat.PlainText)
        self.status_label.setWordWrap(True)
        # a long message (an engine's error, a path) is wrapped and shortened to a few lines: the whole text is in
        # the tooltip and in the Geo-R1 tab of the message log, and never widens the panel or the QGIS window
        self.status_label.setMaximumHeight(self.status_label.fontMetrics().lineSpacing() * STATUS_LINES + 4)
        self.status_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        outer.addWidget(self.status_label)

        self.results = QTreeWidget(body)
        self.results.setHeaderLabels(["Result", "Score"])
        header = self.results.header()  # the text takes the width, the score column just fits its numbers
        header.setStretchLastSection(False)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        self.results.itemClicked.connect(self._item_clicked)
        self.results.itemDoubleClicked.connect(self._item_double_clicked)
        self.results.setToolTip("Click a result to zoom to it; double-click a run to open its layer again")
        self.results.currentItemChanged.connect(lambda *_: self._update_resume())
        self.results.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.results.customContextMenuRequested.connect(self._results_context_menu)
        outer.addWidget(self.results, 1)
        self._finetune_section(body, outer)
        # the contents scroll inside the dock: however long a message or small the screen, the dock asks for no
        # more room than a scroll area does, so Run, Resume and the results stay reachable
        scroll = QScrollArea(self)
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
        scroll.setWidget(body)
        self.scroll_area = scroll
        self.setWidget(scroll)
        self._area_changed()

    def _finetune_section(self, body: QWidget, outer: QVBoxLayout) -> None:
        """The Fine-tune section (folded): train an adapter on an annotation GeoPackage, watch it, use it."""
        from .finetune_widget import FinetuneWidget

        group = QgsCollapsibleGroupBox("Fine-tune", body)
        group_layout = QVBoxLayout(group)
        manager = getattr(self.engine_box, "manager", None)
        engine_widget = self.engine_box if hasattr(self.engine_box, "fill_adapters") else None
        self.finetune = FinetuneWidget(manager, engine_widget=engine_widget, parent=group)
        group_layout.addWidget(self.finetune)
        group.setCollapsed(not self.finetune.record and self.finetune.watcher is None)
        outer.addWidget(group)
        self.finetune_group = group

    def set_annotation_file(self, path: str | Path) -> None:
        """Fine-tune on the annotation GeoPackage ``path`` (the annotation dock calls it): the section unfolds."""
        self.finetune.set_annotation_file(path)
        self.finetune_group.setCollapsed(False)

    def _engine_line(self, parent: QWidget) -> QWidget:
        """The engine widget (start/stop/model/adapters) when available, else a status line."""
        try:
            from .engine_widget import EngineWidget

            return EngineWidget(parent=parent)
        except ImportError:  # the engine manager is optional; a status line still tells the user where it is
            label = QLabel(f"Engine: {self.settings.engine_url}", parent)
            label.setTextFormat(Qt.TextFormat.PlainText)
            return label

    def _model_chosen(self, model_id: str) -> None:
        """Choosing a known checkpoint in the engine's model field sets its default mode (an OVD or GRES
        checkpoint: all matching objects; a REC one: the one best match); other models leave it alone."""
        index = self.mode_combo.findData(default_mode_for(model_id, self.mode_combo.currentData()))
        if index >= 0:
            self.mode_combo.setCurrentIndex(index)

    def _engine_state(self, state: str, message: str) -> None:
        from ..engine_control.engine_process import EXTERNAL, HEALTHY

        self.engine_group.setTitle(f"Engine: {state}")
        manager = getattr(self.engine_box, "manager", None)
        if manager is not None:
            url, _token = manager.endpoint()
            self.engine_group.setToolTip(f"The panel looks for the engine at {url}")
        if not self._shown_once:  # folded only before the panel first shows: Run never moves under the cursor
            self.engine_group.setCollapsed(state in (HEALTHY, EXTERNAL))

    def showEvent(self, event: Any) -> None:
        """Opening the panel asks (in the background) whether an engine already answers at the settings' URL."""
        super().showEvent(event)
        self._shown_once = True
        self._project_changed()
        manager = getattr(self.engine_box, "manager", None)
        if manager is not None:
            from ..engine_control.engine_process import STOPPED

            if manager.state == STOPPED:
                manager.probe_external()

    def _default_output(self) -> Path:
        """The settings' default output, else ``geo_r1_results.gpkg`` beside the open project, else in the home
        folder (README, "Using the panel")."""
        project = QgsProject.instance()
        home = project.absolutePath() or (project.homePath() if project.fileName() else "")
        return self.settings.default_output(home or None)

    def _project_changed(self, *_: Any) -> None:
        """A project opened, saved elsewhere or closed: "Save to" follows it unless the user chose a file."""
        if self.output_widget.filePath().strip() in ("", self._output_default):
            self.settings = PluginSettings.load()
            self._output_default = str(self._default_output())
            self.output_widget.setFilePath(self._output_default)

    # -- small state helpers -----------------------------------------------------------------------
    def refresh_history(self) -> None:
        """The history, then the examples: each shown on one line, elided; the whole text is the item's data (and
        tooltip), and choosing an item puts the whole text in the box."""
        combo = self.expression_combo
        current = combo.currentText()
        combo.blockSignals(True)
        combo.clear()
        history = expression_history()
        for text in history + [e for e in EXAMPLE_EXPRESSIONS if e not in history]:
            combo.addItem(elided(text), text)
            combo.setItemData(combo.count() - 1, text, Qt.ItemDataRole.ToolTipRole)
        combo.setCurrentIndex(-1)  # no entry chosen: choosing any one is a change (and puts its whole text)
        combo.setEditText(current)
        combo.blockSignals(False)

    def _history_chosen(self, index: int) -> None:
        text = self.expression_combo.itemData(index) if index >= 0 else None
        if isinstance(text, str) and text:
            self.expression_combo.setEditText(text)

    def expression_text(self) -> str:
        """What to find: the box's text, or the whole entry when the box shows a chosen entry's elided text."""
        combo = self.expression_combo
        text = combo.currentText().strip()
        index = combo.currentIndex()
        full = combo.itemData(index) if index >= 0 else None
        if isinstance(full, str) and text == combo.itemText(index).strip():
            return full.strip()
        return text

    def _layers_leaving(self, layers: Any) -> None:
        """The picked raster is being removed from the project: the Raster box shows none (QgsMapLayerComboBox
        would silently pick another raster) and the status says so; a running run reads its own copy and goes on."""
        combo = getattr(self, "raster_combo", None)
        current = combo.currentLayer() if combo is not None else None
        ids = {lyr if isinstance(lyr, str) else lyr.id() for lyr in layers}
        if current is None or current.id() not in ids:
            return
        name = current.name()
        self.raster_combo.setAllowEmptyLayer(True)
        self.raster_combo.setLayer(None)
        running = self.entry is not None and self.task is not None and self.entry.raster_layer_id == current.id()
        self.set_status(
            f"The raster {name} was removed from the project; pick another in the Raster box"
            + (" (the run on it goes on: it reads its own copy)" if running else "")
        )

    def _raster_chosen(self, layer: Any) -> None:
        """The band choice of the raster picked: its bands, set to its renderer's red, green and blue (else the
        reader's rule); disabled where the bands are fixed (a web layer, packed colour, no raster)."""
        from ..qgis_io.rasters import choosable_bands

        choice = choosable_bands(layer) if isinstance(layer, QgsRasterLayer) else None
        for i, combo in enumerate(self.band_combos):
            combo.blockSignals(True)
            combo.clear()
            if choice is not None:
                count, default = choice
                provider = layer.dataProvider()
                for b in range(1, count + 1):
                    combo.addItem(f"{b}: {provider.displayBandName(b)}" if count > 1 else str(b), b)
                combo.setCurrentIndex(combo.findData(default[i]))
            combo.setEnabled(choice is not None and choice[0] > 1)
            combo.blockSignals(False)

    def chosen_bands(self) -> tuple[int, int, int] | None:
        """The bands chosen (R, G, B), or None where the raster's bands are not the user's to choose."""
        if not all(c.isEnabled() and c.currentData() for c in self.band_combos):
            return None
        return tuple(int(c.currentData()) for c in self.band_combos)  # type: ignore[return-value]

    def _area_changed(self) -> None:
        kind = self.area_combo.currentData()
        self.draw_button.setEnabled(kind == AREA_DRAWN)
        if kind == AREA_DRAWN:
            self._show_drawn_extent()
        elif self._area_band is not None:
            self._area_band.reset(GEOMETRY_POLYGON)
        self.polygon_combo.setEnabled(kind == AREA_POLYGONS)

    def set_status(self, text: str) -> None:
        """Show ``text`` on the status line, shortened to :data:`STATUS_CHARS` (the whole text in the tooltip and
        the log), with break chances in long words (paths, URLs), so it wraps within the panel's width."""
        self.status_label.setText(status_text(text))
        self.status_label.setToolTip(text)
        log.info("%s", text)

    def _running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        self._update_resume()

    # -- drawing a rectangle -----------------------------------------------------------------------
    def start_drawing(self) -> None:
        if self.canvas is None:
            return
        from qgis.gui import QgsMapToolExtent

        self._previous_tool = self.canvas.mapTool()
        self._extent_tool = QgsMapToolExtent(self.canvas)
        self._extent_tool.extentChanged.connect(self._extent_drawn)
        self.canvas.setMapTool(self._extent_tool)
        self.set_status("Drag a rectangle on the map")

    def _extent_drawn(self, rect: QgsRectangle) -> None:
        self.set_drawn_extent(rect, self.canvas.mapSettings().destinationCrs())
        if self._previous_tool is not None:
            self.canvas.setMapTool(self._previous_tool)
        elif self._extent_tool is not None:
            self.canvas.unsetMapTool(self._extent_tool)

    def set_drawn_extent(self, rect: QgsRectangle, crs: QgsCoordinateReferenceSystem) -> None:
        self.drawn_extent = (QgsRectangle(rect), QgsCoordinateReferenceSystem(crs))
        self.area_combo.setCurrentIndex([k for k, _ in AREA_CHOICES].index(AREA_DRAWN))
        self._show_drawn_extent()
        self.set_status(f"Area: {rect.width():.1f} × {rect.height():.1f} map units drawn")

    def _show_drawn_extent(self) -> None:
        """Outline the drawn rectangle on the map (until another area is chosen, a new one drawn, the panel shut)."""
        if self.canvas is None or self.drawn_extent is None:
            return
        rect, crs = self.drawn_extent
        dest = self.canvas.mapSettings().destinationCrs()
        if crs.isValid() and dest.isValid() and crs != dest:
            rect = QgsCoordinateTransform(crs, dest, QgsProject.instance()).transformBoundingBox(rect)
        if self._area_band is None:
            self._area_band = _outline_band(self.canvas, QColor(255, 120, 0, 230))
        self._area_band.reset(GEOMETRY_POLYGON)
        self._area_band.setToGeometry(QgsGeometry.fromRect(rect), None)
        self._area_band.show()

    # -- building a run ----------------------------------------------------------------------------
    def _raster(self) -> QgsRasterLayer:
        layer = self.raster_combo.currentLayer()
        if not isinstance(layer, QgsRasterLayer):
            raise ConfigError("choose a raster layer to search (add one to the project first)")
        return layer

    def build_request(self, resume: RunEntry | None = None) -> tuple[RunRequest, Any, QgsRasterLayer]:
        """The run the inputs describe (or the run to resume) and its raster source. Raises GeoR1Error."""
        self.settings = PluginSettings.load()
        if resume is not None and resume.request is None and resume.file_parameters:
            return self._request_from_file(resume)
        if resume is not None and resume.request is not None:
            layer = QgsProject.instance().mapLayer(resume.raster_layer_id)
            if not isinstance(layer, QgsRasterLayer):
                raise ConfigError("the raster of that run is no longer in the project; add it again to resume")
            source = resume.source if resume.source is not None else QgisRasterSource(layer)
            req = resume.request
            from dataclasses import replace

            return (
                replace(
                    req,
                    resume_run_id=resume.run_id,
                    resume_layer=resume.layer,
                    engine_url=self.settings.engine_url,
                    more_engines=self.settings.engine_urls()[1:],
                    in_flight=self.settings.in_flight or None,
                    token_file=self.settings.token_file or None,
                ),
                source,
                layer,
            )
        self._project_changed()  # "Save to" still the panel's own default: beside the project as it is now
        layer = self._raster()
        expression = self.expression_text()
        if not expression:
            raise ConfigError("type what to find, e.g. 'all storage tanks'")
        output = Path(self.output_widget.filePath().strip() or str(self._default_output()))
        if output.suffix.lower() != ".gpkg":
            output = output.with_suffix(".gpkg")
        advice = tile_size_advice(self.tile_spin.value()) if self.tile_spin.value() else None
        if advice:
            self.set_status(advice)
        from ..qgis_io.rasters import prepare_input

        extent, extent_crs, area = self._area()
        gsd = self.gsd_spin.value() or None
        prepared = prepare_input(layer, bands=self.chosen_bands(), extent=extent, extent_crs=extent_crs,
                                 metres_per_pixel=gsd, area=area,
                                 context=QgsProject.instance().transformContext())  # fmt: skip
        req = RunRequest(
            expression=expression,
            mode=self.mode_combo.currentData(),
            task=self.outline_combo.currentData()[0],
            outline=self.outline_combo.currentData()[1],
            output=output,
            engine_url=self.settings.engine_url,
            more_engines=self.settings.engine_urls()[1:],
            in_flight=self.settings.in_flight or None,  # None: what the engines take
            token_file=self.settings.token_file or None,
            window=prepared.window,
            area_polygons=prepared.area_polygons,
            scale=prepared.scale,
            tile_size=self.tile_spin.value() or None,  # None: the tile the engine's model serves
            overlap=self.overlap_spin.value(),
            max_new_tokens=self.settings.max_new_tokens or None,
            raster_name=layer.name(),
            raster_path=layer.source(),
            gsd=gsd,
        )
        return req, prepared.source, layer

    def _area(self) -> tuple[QgsRectangle | None, QgsCoordinateReferenceSystem | None, Any]:
        """The chosen area as (extent, its CRS, polygons) for :func:`qgis_io.prepare_input`."""
        kind = self.area_combo.currentData()
        if kind == AREA_LAYER:
            return None, None, None
        if kind == AREA_CANVAS:
            if self.canvas is None:
                return None, None, None
            return QgsRectangle(self.canvas.extent()), self.canvas.mapSettings().destinationCrs(), None
        if kind == AREA_DRAWN:
            if self.drawn_extent is None:
                raise ConfigError("no rectangle drawn yet: click Draw and drag a rectangle on the map")
            rect, crs = self.drawn_extent
            return rect, crs, None
        polygons_layer = self.polygon_combo.currentLayer()
        if not isinstance(polygons_layer, QgsVectorLayer):
            raise ConfigError("choose the polygon layer whose selected features bound the search")
        from ..qgis_io.rasters import selected_area

        return None, None, selected_area(polygons_layer)

    # -- running -----------------------------------------------------------------------------------
    def start_run(self, resume: RunEntry | None = None) -> RunEntry | None:
        """Start a run from the inputs (or resume ``resume``). Returns its entry, or None with the reason shown."""
        if self.task is not None:
            self.set_status("a run is in progress: cancel it first")
            return None
        try:
            req, source, layer = self.build_request(resume if isinstance(resume, RunEntry) else None)
            req = self.preflight(req, source)
        except GeoR1Error as exc:
            self.set_status(str(exc))
            self._push(str(exc), warning=True)
            return None
        task = GroundingTask(req, source)
        entry = (
            resume
            if isinstance(resume, RunEntry)
            else RunEntry(
                run_id="",
                expression=req.expression,
                mode=req.mode,
                output=req.output,
                layer="",
                display_name=run_display_name(req.expression, req.mode, raster=layer.name()),
                request=req,
                raster_layer_id=layer.id(),
            )
        )
        entry.status, entry.message, entry.started, entry.first_feature_s = "running", "", time.perf_counter(), None
        entry.source = source
        if entry not in RUNS:
            RUNS.append(entry)
        self.entry, self.task = entry, task
        # remembered once the engine has accepted it (a first answer, or the run done): never a refused one
        self._unconfirmed = entry if not isinstance(resume, RunEntry) else None
        task.runOpened.connect(self._run_opened)
        task.batchCommitted.connect(self._batch)
        task.progressChanged.connect(lambda p: self.progress.setValue(round(p)))
        task.runEnded.connect(self._run_ended)
        self.progress.setValue(0)
        self._running(True)
        self.set_status(f"Running '{req.expression}' ({req.mode}) …")
        QgsApplication.taskManager().addTask(task)
        self.refresh_results()
        self.runStarted.emit(entry)
        return entry

    def preflight(self, req: RunRequest, source: Any) -> RunRequest:
        """What can be checked before a run starts, checked before anything is created or started: the output can
        be written, an engine answers where the panel looks, and the run is within every limit it reports. Returns
        the request aimed at that engine. Raises GeoR1Error saying what to do."""
        from dataclasses import replace

        check_output_writable(req.output)
        manager = getattr(self.engine_box, "manager", None)
        if manager is not None:
            url, token_file = manager.endpoint()
        else:
            url, token_file = self.settings.engine_url.rstrip("/"), self.settings.token_path()
        req = replace(req, engine_url=url, token_file=str(token_file))
        from ..engine_control.engine_process import EXTERNAL, HEALTHY, STARTING

        if manager is not None and manager.state == STARTING and manager.owns_engine():
            return req  # the run waits for the engine it is starting (its limits are checked by the engine)
        if manager is not None and manager.state in (HEALTHY, EXTERNAL) and manager.url == url and manager.info:
            info = manager.info
        else:
            info = engine_info(url, token_file)
        req = req.with_engine_tile(info)  # type: ignore[assignment]
        job = req.job()
        from ..core.client import check_limits
        from ..core.geometry import make_tile_grid

        tiles = make_tile_grid(source.transform, source.width, source.height, job.spec, window=job.window)
        largest = (max((t.size[0] for t in tiles), default=0), max((t.size[1] for t in tiles), default=0))
        check_limits(info.get("limits"), expression=job.expression, largest_tile=largest,
                     items=min(job.batch_size, len(tiles)), max_new_tokens=job.max_new_tokens)  # fmt: skip
        return req

    def cancel_run(self) -> None:
        if self.task is not None:
            self.set_status("Cancelling …")
            self.task.cancel()

    def load_file_runs(self, path: str | Path | None = None) -> list[RunEntry]:
        """Add the unfinished runs recorded in a GeoPackage to the list (resumable from the panel)."""
        from ..core.gpkg_schema import find_runs

        output = Path(path or self.output_widget.filePath().strip() or self._default_output())
        if not output.exists():
            self.set_status(f"{output} does not exist yet: no runs to list")
            return []
        try:
            records = find_runs(output)
        except GeoR1Error as exc:
            self.set_status(str(exc))
            return []
        known = {(e.output, e.run_id) for e in RUNS}
        added = []
        for rec in records:
            if not rec.resumable or (output, rec.run_id) in known:
                continue
            entry = RunEntry(run_id=rec.run_id, expression=rec.expression, mode=rec.mode, output=output,
                             layer=rec.layer, display_name=f"{rec.expression} ({rec.mode}, {rec.started[:19]})",
                             status="canceled" if rec.status in ("canceled", "running", "interrupted") else rec.status,
                             message=f"{rec.status} in {output.name}; Resume continues it")  # fmt: skip
            entry.file_parameters = rec.parameters
            RUNS.append(entry)
            added.append(entry)
        self.set_status(f"{len(added)} unfinished run(s) found in {output.name}")
        self.refresh_results()
        return added

    def _request_from_file(self, entry: RunEntry) -> tuple[RunRequest, Any, QgsRasterLayer]:
        """The request of a run recorded in a GeoPackage, from its parameters (as ``geo-r1 ground`` wrote them)."""
        import json

        from ..core.gpkg_schema import canonical_raster_path

        p = json.loads(entry.file_parameters)
        raster_path = p["raster"]
        project = QgsProject.instance()
        layer = next((lyr for lyr in project.mapLayers().values() if isinstance(lyr, QgsRasterLayer)
                      and canonical_raster_path(lyr.source()) == raster_path), None)  # fmt: skip
        if layer is None:
            layer = QgsRasterLayer(raster_path, Path(raster_path).stem)
            if not layer.isValid():
                raise ConfigError(f"the run's raster {raster_path} cannot be opened; restore it to resume the run")
            project.addMapLayer(layer)
        entry.raster_layer_id = layer.id()
        source = QgisRasterSource(layer, [int(b) for b in p.get("bands") or []] or None)  # the run's own bands
        window = None
        if p.get("bbox"):
            window = window_from_map_bbox(*p["bbox"], source.transform, source.width, source.height)
        if list(p.get("bands") or []) != list(source.bands):
            raise ConfigError(
                f"the run used bands {p.get('bands')}, the raster's default now is {list(source.bands)};"
                " resume it with geo-r1 ground --resume --bands"
            )
        req = RunRequest(**spec_values(p), output=entry.output,  # the run as recorded (RunSpec's fields)
                         engine_url=self.settings.engine_url, more_engines=self.settings.engine_urls()[1:],
                         in_flight=self.settings.in_flight or None, token_file=self.settings.token_file or None,
                         window=window, scale=float(p.get("scale", 1.0)),
                         resume_run_id=entry.run_id, resume_layer=entry.layer, raster_name=layer.name(),
                         raster_path=raster_path)  # fmt: skip
        entry.request = req
        return req, source, layer

    def resume_selected(self) -> None:
        entry = self._selected_run()
        if entry is not None and entry.status in ("canceled", "failed"):
            self.start_run(entry)

    def _run_opened(self, output: str, layer_name: str, run_id: str) -> None:
        entry = self.entry
        if entry is None:
            return
        entry.run_id, entry.layer = run_id, layer_name
        raster = QgsProject.instance().mapLayer(entry.raster_layer_id)
        crs = raster.crs() if raster is not None else QgsCoordinateReferenceSystem()
        old = QgsProject.instance().mapLayer(entry.map_layer_id) if entry.map_layer_id else None
        live = QgsVectorLayer(f"Polygon?crs={crs.authid() or 'EPSG:4326'}", entry.display_name + " …", "memory")
        if not crs.authid():
            live.setCrs(crs)
        live.dataProvider().addAttributes(list(make_fields()))
        live.updateFields()
        if old is not None and isinstance(old, QgsVectorLayer):  # a resumed run: show what was already found
            live.dataProvider().addFeatures([QgsFeature(f) for f in old.getFeatures()])
            QgsProject.instance().removeMapLayer(old.id())
        style_result_layer(live)
        self._watch_selection(live)
        self._add_to_group(live, raster)
        entry.map_layer_id = live.id()
        self.refresh_results()

    def _batch(self, batch: LiveBatch) -> None:
        entry = self.entry
        if entry is None or not entry.map_layer_id:
            return
        layer = QgsProject.instance().mapLayer(entry.map_layer_id)
        if layer is None:  # removed from the map (or its group removed): respected, and the status goes on
            self._accepted(entry)
            entry.removed_from_map = True
            self.set_status(
                f"'{entry.expression}': tile {batch.tiles_done} of {batch.tiles_total} (its layer was "
                "removed from the map; double-click the run in the list to show it again)"
            )
            return
        self._accepted(entry)
        created = utc_now()
        meta = self.task.outcome.meta if self.task is not None else {}
        feats = [result_feature(layer.fields(), m, meta, entry.run_id, created) for m in batch.detections]
        if feats:
            layer.dataProvider().addFeatures(feats)
            layer.updateExtents()
            layer.triggerRepaint()
            if entry.first_feature_s is None:
                entry.first_feature_s = time.perf_counter() - entry.started
        self.set_status(
            f"'{entry.expression}': {layer.featureCount()} object(s) so far, "
            f"tile {batch.tiles_done} of {batch.tiles_total}"
        )
        self.refresh_results()

    def _run_ended(self, outcome: RunOutcome) -> None:
        entry, self.task = self.entry, None
        self._running(False)
        if entry is None:
            return
        entry.status = outcome.status
        if outcome.run_id:
            entry.run_id, entry.layer = outcome.run_id, outcome.layer
        s = outcome.summary
        if outcome.status == "done":
            self._accepted(entry)
            self._show_final(entry)
            n = s.detections_final if s else 0
            entry.message = f"done: {n} object(s) in {outcome.seconds:.1f} s"
            self._push(f"'{entry.expression}': {n} object(s) found", warning=False)
        elif outcome.status == "canceled":
            entry.message = "cancelled: what was found is kept; select the run and click Resume to finish it"
            self._show_partial(entry)
        elif outcome.interrupted:
            entry.message = (
                f"interrupted: the engine stopped answering ({outcome.error}). What was found is kept; "
                "restart the engine, then select the run and click Resume"
            )
            self._show_partial(entry)
            self._push(entry.message, warning=True)
        else:
            entry.message = f"failed: {outcome.error}. {resume_advice(outcome.error, bool(entry.layer))}"
            self._show_partial(entry)
            self._push(f"the run failed: {outcome.error}", warning=True)
        if entry.removed_from_map:
            entry.message += "; its layer was removed from the map: double-click the run in the list to show it"
        self.set_status(f"'{entry.expression}' {entry.message}")
        self.progress.setValue(100 if outcome.status == "done" else self.progress.value())
        self.refresh_results()
        self.runFinished.emit(entry)

    def _accepted(self, entry: RunEntry) -> None:
        """The engine answered the run's expression: it goes into the history (once)."""
        if getattr(self, "_unconfirmed", None) is entry:
            self._unconfirmed = None
            remember_expression(entry.expression)
            self.refresh_history()

    def _replace_map_layer(self, entry: RunEntry, layer: QgsVectorLayer) -> None:
        old = QgsProject.instance().mapLayer(entry.map_layer_id) if entry.map_layer_id else None
        if old is None and entry.map_layer_id:  # the user removed the run's layer: not put back (reopen does)
            entry.removed_from_map = True
            entry.map_layer_id = ""
            self._release_unused_files()
            return
        entry.removed_from_map = False
        raster = QgsProject.instance().mapLayer(entry.raster_layer_id)
        style_result_layer(layer)
        self._watch_selection(layer)
        self._add_to_group(layer, raster)
        if old is not None:
            QgsProject.instance().removeMapLayer(old.id())
        entry.map_layer_id = layer.id()

    def _show_final(self, entry: RunEntry) -> None:
        from ..qgis_io.gpkg_ogr import RunLayers, hold_wal

        hold_wal(entry.output)  # before QGIS opens it: read with locks while later runs write the file
        layers = RunLayers(entry.output, entry.run_id, entry.layer)
        layer = None
        if layers.has_outlines():  # the run asked for outlines (task gres, or refine): they are what it shows
            layer = QgsVectorLayer(layers.outline_uri, entry.display_name + " (outlines)", "ogr")
        if layer is None or not layer.isValid():
            layer = QgsVectorLayer(layers.answer_uri, entry.display_name, "ogr")
        if not layer.isValid():
            entry.message = f"the answer layer {entry.layer} could not be opened from {entry.output}"
            return
        self._replace_map_layer(entry, layer)

    def _show_partial(self, entry: RunEntry) -> None:
        """After a cancel or failure: the run's per-tile detections from the GeoPackage (unmerged)."""
        if not entry.layer:
            return
        from ..qgis_io.gpkg_ogr import RunLayers, hold_wal

        hold_wal(entry.output)
        uri = RunLayers(entry.output, entry.run_id, entry.layer).raw_uri
        layer = QgsVectorLayer(uri, f"{entry.display_name} – {entry.status}, per tile", "ogr")
        if not layer.isValid():
            return  # nothing was written yet: the live layer (empty) stays
        layer.setSubsetString(f"\"run_id\" = '{entry.run_id}'")
        self._replace_map_layer(entry, layer)

    def _add_to_group(self, layer: QgsVectorLayer, raster: QgsMapLayer | None) -> None:
        """Add ``layer`` to a "Geo-R1" group placed directly above ``raster`` (in the raster's own group), so the
        boxes are drawn over the imagery they were found on, wherever that raster sits in the layer tree.

        Each raster gets its own group (tagged with the raster's id), reused while it is still above that raster;
        a run on a raster higher in the tree gets a new group above it. With a custom layer order (Layer Order
        panel) the layer is put directly above its raster there too. Without a raster: a group on top."""
        project = QgsProject.instance()
        project.addMapLayer(layer, False)
        root = project.layerTreeRoot()
        node = root.findLayer(raster.id()) if raster is not None else None
        parent = node.parent() if node is not None and isinstance(node.parent(), QgsLayerTreeGroup) else root
        index = parent.children().index(node) if node is not None else 0
        key = raster.id() if node is not None else ""
        group = next((g for g in parent.children()[:index] if isinstance(g, QgsLayerTreeGroup)
                      and g.customProperty(GROUP_RASTER_KEY, None) == key
                      and (key or g.name() == GROUP_NAME)), None)  # fmt: skip
        if group is None:
            group = parent.insertGroup(index, GROUP_NAME)
            group.setCustomProperty(GROUP_RASTER_KEY, key)
            if raster is not None:
                group.setCustomProperty(GROUP_RASTER_NAME_KEY, raster.name())
        group.insertLayer(0, layer)
        if raster is not None and root.hasCustomLayerOrder():
            order = [lyr for lyr in root.customLayerOrder() if lyr.id() != layer.id()]
            at = next((i for i, lyr in enumerate(order) if lyr.id() == raster.id()), 0)
            root.setCustomLayerOrder([*order[:at], layer, *order[at:]])
        if self.iface is not None:  # QGIS shows map tips for the active layer only: the run's layer is made active
            self.iface.setActiveLayer(layer)

    @staticmethod
    def _release_unused_files(*_: Any) -> None:
        """GeoPackages no layer on the map reads any more are no longer held in WAL mode (gpkg_ogr.hold_wal)."""
        from ..qgis_io.gpkg_ogr import release_wal

        sources = [lyr.source().split("|", 1)[0] for lyr in QgsProject.instance().mapLayers().values()]
        release_wal(keep=[s for s in sources if s.lower().endswith(".gpkg")])

    def _push(self, text: str, warning: bool) -> None:
        if self.iface is None:
            return
        import html

        from ..compat import MSG_SUCCESS, MSG_WARNING

        # the message bar renders HTML: expressions and engine errors are shown as typed (escaped)
        self.iface.messageBar().pushMessage(
            "Geo-R1", html.escape(text), level=MSG_WARNING if warning else MSG_SUCCESS, duration=8
        )

    # -- the results list --------------------------------------------------------------------------
    def refresh_results(self) -> None:
        selected = self._selected_run()
        self.results.clear()
        for entry in reversed(RUNS):
            when = entry.display_name.rsplit("(", 1)[-1].rstrip(")")
            top = QTreeWidgetItem([f"{entry.expression} ({when}) – {entry.status}", ""])
            top.setData(0, ROLE_RUN, entry.run_id or id(entry))
            top.setToolTip(0, entry.message or entry.status)
            self.results.addTopLevelItem(top)
            layer = QgsProject.instance().mapLayer(entry.map_layer_id) if entry.map_layer_id else None
            if isinstance(layer, QgsVectorLayer) and layer.isValid():
                request = QgsFeatureRequest()
                feats = sorted(layer.getFeatures(request), key=lambda f: -(f["score"] or 0.0))
                for f in feats[:500]:
                    label = f["label"] or ""
                    text = (f"{label}: " if label else "") + first_line(f["reasoning"])
                    child = QTreeWidgetItem([text or "(no reasoning)", f"{(f['score'] or 0.0):.2f}"])
                    child.setData(0, ROLE_FEATURE, (layer.id(), f.id(), entry.run_id, f["tile_id"]))
                    child.setToolTip(0, f["reasoning"] or "")
                    top.addChild(child)
            if entry is selected or entry is self.entry:
                top.setExpanded(True)
                if entry is selected:
                    self.results.setCurrentItem(top)
        self._update_resume()

    def _selected_run(self) -> RunEntry | None:
        item = self.results.currentItem() if hasattr(self, "results") else None
        while item is not None and item.parent() is not None:
            item = item.parent()
        if item is None:
            return None
        key = item.data(0, ROLE_RUN)
        return next((e for e in RUNS if (e.run_id or id(e)) == key), None)

    def select_run(self, entry: RunEntry) -> None:
        for i in range(self.results.topLevelItemCount()):
            item = self.results.topLevelItem(i)
            if item.data(0, ROLE_RUN) == (entry.run_id or id(entry)):
                self.results.setCurrentItem(item)
        self._update_resume()

    def _update_resume(self) -> None:
        entry = self._selected_run()
        self.resume_button.setEnabled(
            self.task is None and entry is not None and entry.status in ("canceled", "failed")
        )

    def _item_double_clicked(self, item: QTreeWidgetItem, column: int) -> None:
        if item.parent() is None:
            entry = self._selected_run()
            if entry is not None:
                self.reopen(entry)

    def reopen(self, entry: RunEntry) -> QgsVectorLayer | None:
        """Put a run's layer back on the map (after it was removed from the project) and return it."""
        layer = QgsProject.instance().mapLayer(entry.map_layer_id) if entry.map_layer_id else None
        if isinstance(layer, QgsVectorLayer):
            return layer
        entry.map_layer_id = ""
        if entry.status == "done":
            self._show_final(entry)
        elif entry.status in ("canceled", "failed"):
            self._show_partial(entry)
        self.refresh_results()
        layer = QgsProject.instance().mapLayer(entry.map_layer_id) if entry.map_layer_id else None
        return layer if isinstance(layer, QgsVectorLayer) else None

    # -- the results list's right-click menu -------------------------------------------------------
    def _results_context_menu(self, pos: Any) -> None:
        item = self.results.itemAt(pos)
        if item is not None:
            self.results.setCurrentItem(item)
        menu = self.results_menu()
        menu.exec(self.results.viewport().mapToGlobal(pos))

    def results_menu(self) -> QMenu:
        """The results list's right-click menu for the selected run: Zoom to, Remove from map, Export…, Open the
        GeoPackage's folder, and Clear the list (the actions a run without a layer cannot take are disabled)."""
        entry = self._selected_run()
        menu = QMenu(self.results)
        layer = self._map_layer_of(entry)
        zoom = menu.addAction("Zoom to", lambda: self.zoom_to_run(entry))
        zoom.setEnabled(layer is not None and self.canvas is not None)
        remove = menu.addAction("Remove from map", lambda: self.remove_run_layer(entry))
        remove.setEnabled(layer is not None)
        export = menu.addAction("Export…", lambda: self.export_run(entry, self._ask_export_path(entry)))
        export.setEnabled(entry is not None and bool(entry.layer) and entry.output.exists())
        folder = menu.addAction("Open the GeoPackage's folder", lambda: self.open_run_folder(entry))
        folder.setEnabled(entry is not None and entry.output.parent.is_dir())
        menu.addSeparator()
        clear = menu.addAction("Clear the list", self.clear_results)
        clear.setEnabled(any(e.status != "running" for e in RUNS))
        return menu

    @staticmethod
    def _map_layer_of(entry: RunEntry | None) -> QgsVectorLayer | None:
        layer = QgsProject.instance().mapLayer(entry.map_layer_id) if entry is not None and entry.map_layer_id else None
        return layer if isinstance(layer, QgsVectorLayer) else None

    def zoom_to_run(self, entry: RunEntry | None) -> None:
        layer = self._map_layer_of(entry)
        if layer is None or self.canvas is None:
            return
        layer.updateExtents()
        rect = QgsRectangle(layer.extent())
        dest = self.canvas.mapSettings().destinationCrs()
        if dest.isValid() and dest != layer.crs():
            rect = QgsCoordinateTransform(layer.crs(), dest, QgsProject.instance()).transformBoundingBox(rect)
        rect.scale(1.1)
        self.canvas.setExtent(rect)
        self.canvas.refresh()

    def remove_run_layer(self, entry: RunEntry | None) -> None:
        """Take the run's layer off the map; the run stays listed (double-click shows it again)."""
        layer = self._map_layer_of(entry)
        if layer is None:
            return
        QgsProject.instance().removeMapLayer(layer.id())
        entry.map_layer_id = ""
        self.refresh_results()

    def _ask_export_path(self, entry: RunEntry) -> str:
        from qgis.PyQt.QtWidgets import QFileDialog

        start = str(entry.output.with_name(f"{entry.layer or 'geo_r1'}_export.gpkg"))
        path, _ = QFileDialog.getSaveFileName(self, "Export the run's features", start,
                                              "GeoPackage (*.gpkg);;GeoJSON (*.geojson)")  # fmt: skip
        return path

    def export_run(self, entry: RunEntry | None, path: str) -> bool:
        """Write the run's features (its map layer, else its layer in the GeoPackage) to a new GeoPackage or
        GeoJSON file (GeoJSON in WGS 84, as the format asks). Says in the status what was written, or why not."""
        from qgis.core import QgsVectorFileWriter

        if entry is None or not path:
            return False
        target = Path(path)
        if target.suffix.lower() not in (".gpkg", ".geojson", ".json"):
            target = target.with_suffix(".gpkg")
        layer = self._map_layer_of(entry) or self._file_layer(entry)
        if layer is None:
            self.set_status(f"'{entry.expression}' has no features to export yet")
            return False
        if target.resolve() == entry.output.resolve():
            self.set_status(f"Export to another file than the run's own GeoPackage {entry.output}")
            return False
        options = QgsVectorFileWriter.SaveVectorOptions()
        options.driverName = "GPKG" if target.suffix.lower() == ".gpkg" else "GeoJSON"
        options.layerName = entry.layer or "geo_r1_export"
        options.fileEncoding = "UTF-8"
        if options.driverName == "GeoJSON":
            options.ct = QgsCoordinateTransform(layer.crs(), QgsCoordinateReferenceSystem("EPSG:4326"),
                                                QgsProject.instance())  # fmt: skip
        writer = getattr(QgsVectorFileWriter, "writeAsVectorFormatV3", None)  # QGIS >= 3.20
        writer = writer or QgsVectorFileWriter.writeAsVectorFormatV2
        result = writer(layer, str(target), QgsProject.instance().transformContext(), options)
        if result[0] != QgsVectorFileWriter.WriterError.NoError:
            self.set_status(f"the export to {target} failed: {result[1]}. Choose another file (a folder you can "
                            "write to)")  # fmt: skip
            return False
        self.set_status(f"'{entry.expression}': {layer.featureCount()} feature(s) exported to {target}")
        return True

    def _file_layer(self, entry: RunEntry) -> QgsVectorLayer | None:
        """The run's layer read from its GeoPackage (not added to the map): the answer, else the per-tile rows."""
        if not entry.layer or not entry.output.exists():
            return None
        from ..qgis_io.gpkg_ogr import RunLayers

        layers = RunLayers(entry.output, entry.run_id, entry.layer)
        if entry.status == "done":
            layer = QgsVectorLayer(layers.answer_uri, entry.display_name, "ogr")
        else:
            layer = QgsVectorLayer(layers.raw_uri, entry.display_name, "ogr")
            layer.setSubsetString(f"\"run_id\" = '{entry.run_id}'")
        return layer if layer.isValid() else None

    def open_run_folder(self, entry: RunEntry | None) -> None:
        from qgis.PyQt.QtCore import QUrl
        from qgis.PyQt.QtGui import QDesktopServices

        if entry is not None:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(entry.output.parent)))

    def clear_results(self) -> None:
        """Forget every finished run (a running one stays); their layers stay on the map and in the GeoPackage."""
        RUNS[:] = [e for e in RUNS if e.status == "running" and e is self.entry and self.task is not None]
        self.refresh_results()
        self.set_status("The results list is cleared (the layers and the GeoPackages are kept)")

    def _item_clicked(self, item: QTreeWidgetItem, column: int) -> None:
        data = item.data(0, ROLE_FEATURE)
        if not data:
            return
        layer_id, fid, _run_id, tile_id = data
        layer = QgsProject.instance().mapLayer(layer_id)
        if not isinstance(layer, QgsVectorLayer):
            return
        layer.selectByIds([fid])
        if self.canvas is not None:
            feat = layer.getFeature(fid)
            rect = QgsRectangle(feat.geometry().boundingBox())
            dest = self.canvas.mapSettings().destinationCrs()
            if dest.isValid() and dest != layer.crs():
                rect = QgsCoordinateTransform(layer.crs(), dest, QgsProject.instance()).transformBoundingBox(rect)
            rect.scale(3.0)
            self.canvas.setExtent(rect)
            self.canvas.refresh()
            self.show_tile(layer, tile_id)

    def _watch_selection(self, layer: QgsVectorLayer) -> None:
        """When one feature of a run's layer is selected (map, attribute table or list), outline its tile."""

        def changed(*_: Any) -> None:
            ids = layer.selectedFeatureIds()
            if len(ids) == 1:
                self.show_tile(layer, layer.getFeature(ids[0])["tile_id"])
            elif self._rubber is not None:
                self._rubber.reset(GEOMETRY_POLYGON)

        layer.selectionChanged.connect(changed)

    def tile_ring(self, entry: RunEntry, tile_id: str) -> Any:
        """A tile's outline in the raster's CRS, from the GeoPackage (``geo_r1_tiles`` and the run's transform)."""
        if not entry.run_id or not entry.output.exists():
            return None
        from ..core.gpkg_schema import tile_outline

        try:
            return tile_outline(entry.output, entry.run_id, tile_id)
        except (sqlite3.Error, ValueError, TypeError) as exc:  # a file another program changed: no outline
            log.debug("no outline for tile %s: %s", tile_id, exc)
            return None

    def show_tile(self, layer: QgsVectorLayer, tile_id: str) -> None:
        """Outline the tile the selected feature's reasoning is about (every tile of a box pieced together from
        cut parts, whose id is ``r1c2+r1c3``)."""
        if self.canvas is None:
            return
        entry = next((e for e in RUNS if e.map_layer_id == layer.id()), None)
        rings = [self.tile_ring(entry, t) for t in (tile_id or "").split("+") if t] if entry else []
        rings = [r for r in rings if r]
        if self._rubber is None:
            self._rubber = _outline_band(self.canvas, QColor(30, 120, 255, 220))
        self._rubber.reset(GEOMETRY_POLYGON)
        if rings:
            geom = QgsGeometry.fromMultiPolygonXY([[[QgsPointXY(x, y) for x, y in ring]] for ring in rings])
            self._rubber.setToGeometry(geom, layer)

    def closeEvent(self, event: Any) -> None:  # the run goes on when the panel is closed
        for band in (self._rubber, self._area_band):
            if band is not None:
                band.reset(GEOMETRY_POLYGON)
        super().closeEvent(event)
