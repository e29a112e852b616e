"""The Geo-R1 annotation dock: draw boxes on a raster to fine-tune Geo-R1, see them counted, fix what is off.

Raster > Geo-R1 > Annotate (or the toolbar's Annotate button) shows it with the box tool on. Each box drawn
(:class:`~geo_r1_qgis.gui.annotation_tool.BoxMapTool`), each selected polygon of a vector layer ("Add selected
polygons") and each polygon of an imported layer ("Import labels…") becomes one feature of the annotation
GeoPackage (:mod:`geo_r1_qgis.qgis_io.annotation_layer`), in the raster's CRS, after a small dialog asks what it
shows (:class:`AnnotationDialog`: the expression, the category, the split, "nothing of this here").

The list shows the annotations per expression and split with counts (expression > split > features):
double-click zooms to one, Delete removes it, Edit changes it; everything goes through the layer's edit
buffer (Ctrl+Z undoes it) until Save writes the file. Under the list, plain warnings
(:func:`~geo_r1_qgis.core.annotations.check_boxes`): no held-out boxes, too few train shots, boxes too
small at the ground resolution or outside their raster, a raster that is gone.

For a later "Fine-tune" section: :meth:`AnnotationDock.annotation_path`, :meth:`AnnotationDock.save`,
:meth:`AnnotationDock.check`, :meth:`AnnotationDock.counts` and :meth:`AnnotationDock.start_annotating`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.gui import QgsDockWidget, QgsFieldComboBox, QgsMapLayerComboBox
from qgis.PyQt.QtCore import Qt, QTimer, pyqtSignal
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QRadioButton,
    QSizePolicy,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..compat import LAYER_FILTER_POLYGON, LAYER_FILTER_RASTER
from ..core.annotations import (
    DEFAULT_SPLIT,
    ERROR,
    MIN_BOX_PIXELS,
    RECOMMENDED_SHOTS,
    SPLITS,
    WARNING,
    AnnotatedBox,
    Annotation,
    Issue,
    check_boxes,
    count_boxes,
)
from ..core.errors import ConfigError, GeoR1Error
from ..qgis_io.annotation_layer import (
    AnnotationFeature,
    AnnotationStore,
    check_annotatable,
    plain_value,
    polygons_to_raster,
    raster_frame,
    rect_to_raster,
)
from ..settings import PluginSettings
from .annotation_tool import BoxMapTool
from .widgets import gpkg_file_widget, narrow, resolution_spin, wrapping_form

__all__ = ["AnnotationChoice", "AnnotationDialog", "AnnotationDock", "ImportDialog"]

log = logging.getLogger(__name__)

ROLE_FIDS = Qt.ItemDataRole.UserRole
#: an annotation with attributes that break the schema (edited by hand in the attribute table)
INVALID = "invalid"


@dataclass(frozen=True)
class AnnotationChoice:
    """What the dialog asked: the annotation's attributes but its raster. Checked by the one schema."""

    expression: str
    category: str = ""
    split: str = DEFAULT_SPLIT
    negative: bool = False
    is_unique: bool | None = None

    def __post_init__(self) -> None:
        self.annotation("(check)")  # the schema's checks, with their messages

    def annotation(self, raster: str, created: str = "") -> Annotation:
        return Annotation(expression=self.expression, raster=raster, category=self.category, split=self.split,
                          negative=self.negative, is_unique=self.is_unique, created=created)  # fmt: skip

    @classmethod
    def of(cls, ann: Annotation) -> AnnotationChoice:
        category = "" if ann.category == ann.expression else ann.category
        return cls(ann.expression, category, ann.split, ann.negative, ann.is_unique)


class AnnotationDialog(QDialog):
    """The small dialog after each box: expression (those already in the layer offered), category, split,
    "nothing of this here", and whether the expression names one object."""

    def __init__(self, expressions: list[str], default: AnnotationChoice | None, parent: QWidget | None = None,
                 title: str = "What does the box show?") -> None:  # fmt: skip
        super().__init__(parent)
        self.setWindowTitle(title)
        form = QFormLayout(self)
        self.expression_combo = QComboBox(self)
        self.expression_combo.setEditable(True)
        self.expression_combo.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        self.expression_combo.lineEdit().setPlaceholderText("what the box shows, e.g. storage tank")
        narrow(self.expression_combo, 24)
        self.expression_combo.addItems(expressions)
        form.addRow("Expression", self.expression_combo)
        self.category_edit = QLineEdit(self)
        self.category_edit.setPlaceholderText("optional (default: the expression)")
        form.addRow("Category", self.category_edit)
        self.split_combo = QComboBox(self)
        self.split_combo.addItems(list(SPLITS))
        self.split_combo.setToolTip("train: learned from; val and test: held out to measure the fine-tuned model")
        form.addRow("Split", self.split_combo)
        self.negative_check = QCheckBox("Nothing of this here (a negative area)", self)
        self.negative_check.setToolTip("The box holds no object of the expression: the model learns to answer none")
        form.addRow("", self.negative_check)
        self.unique_check = QCheckBox("The expression names one object only", self)
        self.unique_check.setTristate(True)
        self.unique_check.setToolTip("e.g. 'the largest tank'; partly checked: not said")
        form.addRow("", self.unique_check)
        self.error_label = QLabel("", self)
        self.error_label.setTextFormat(Qt.TextFormat.PlainText)
        self.error_label.setWordWrap(True)
        self.error_label.setStyleSheet("color: #b00020")
        form.addRow(self.error_label)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel, self)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)
        self.buttons = buttons
        self._choice: AnnotationChoice | None = None
        self.set_choice(default)

    def set_choice(self, choice: AnnotationChoice | None) -> None:
        if choice is None:
            self.expression_combo.setEditText("")
            self.unique_check.setCheckState(Qt.CheckState.PartiallyChecked)
            return
        self.expression_combo.setEditText(choice.expression)
        self.category_edit.setText(choice.category)
        self.split_combo.setCurrentIndex(list(SPLITS).index(choice.split))
        self.negative_check.setChecked(choice.negative)
        state = {None: Qt.CheckState.PartiallyChecked, True: Qt.CheckState.Checked, False: Qt.CheckState.Unchecked}
        self.unique_check.setCheckState(state[choice.is_unique])

    def current(self) -> AnnotationChoice:
        """The choice shown (ConfigError when the schema refuses it)."""
        state = self.unique_check.checkState()
        unique = None if state == Qt.CheckState.PartiallyChecked else state == Qt.CheckState.Checked
        return AnnotationChoice(self.expression_combo.currentText(), self.category_edit.text(),
                                self.split_combo.currentText(), self.negative_check.isChecked(), unique)  # fmt: skip

    def accept(self) -> None:
        try:
            self._choice = self.current()
        except ConfigError as exc:
            self.error_label.setText(str(exc))  # the dialog stays open with what was typed
            return
        super().accept()

    def choice(self) -> AnnotationChoice | None:
        return self._choice


class ImportDialog(QDialog):
    """Import labels: a polygon layer, one expression for all or a field holding each, an optional split field."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Import labels as annotations")
        form = QFormLayout(self)
        self.layer_combo = QgsMapLayerComboBox(self)
        self.layer_combo.setFilters(LAYER_FILTER_POLYGON)
        form.addRow("Polygon layer", self.layer_combo)
        self.one_radio = QRadioButton("One expression for every polygon", self)
        self.one_radio.setChecked(True)
        self.expression_edit = QLineEdit(self)
        self.expression_edit.setPlaceholderText("e.g. storage tank")
        form.addRow(self.one_radio, self.expression_edit)
        self.field_radio = QRadioButton("The expression in a field", self)
        self.field_combo = QgsFieldComboBox(self)
        form.addRow(self.field_radio, self.field_combo)
        self.split_field_combo = QgsFieldComboBox(self)
        self.split_field_combo.setAllowEmptyFieldName(True)
        self.split_field_combo.setToolTip("A field with train / val / test (empty: all train)")
        form.addRow("Split field", self.split_field_combo)
        self.category_edit = QLineEdit(self)
        self.category_edit.setPlaceholderText("optional (default: the expression)")
        form.addRow("Category", self.category_edit)
        self.layer_combo.layerChanged.connect(self._layer_changed)
        self._layer_changed(self.layer_combo.currentLayer())
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel, self)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)

    def _layer_changed(self, layer: Any) -> None:
        self.field_combo.setLayer(layer)
        self.split_field_combo.setLayer(layer)

    def values(self) -> dict[str, Any]:
        """The keyword arguments of :meth:`AnnotationDock.import_layer`."""
        one = self.one_radio.isChecked()
        return {
            "layer": self.layer_combo.currentLayer(),
            "expression": self.expression_edit.text() if one else None,
            "expression_field": None if one else self.field_combo.currentField(),
            "split_field": self.split_field_combo.currentField() or None,
            "category": self.category_edit.text(),
        }


class AnnotationDock(QgsDockWidget):
    """The annotation dock. ``iface`` may be None in tests that drive it with a bare canvas."""

    #: the annotation file the user chose in the dock, once it is open (its Path)
    fileOpened = pyqtSignal(object)

    def __init__(self, iface: Any, canvas: Any = None, parent: QWidget | None = None) -> None:
        super().__init__("Geo-R1 annotations", parent)
        self.setObjectName("GeoR1AnnotationDock")
        self.iface = iface
        self.canvas = canvas if canvas is not None else (iface.mapCanvas() if iface is not None else None)
        self.settings = PluginSettings.load()
        self.store: AnnotationStore | None = None
        self.tool: BoxMapTool | None = None
        self._previous_tool = None
        #: the last answers of the dialog, offered for the next box (for this QGIS session)
        self.last_choice: AnnotationChoice | None = None
        #: the dialog while it is open (tests answer it)
        self.dialog: QDialog | None = None
        self._watched: QgsVectorLayer | None = None
        self._refresh_timer = QTimer(self)
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.setInterval(0)
        self._refresh_timer.timeout.connect(self.refresh)
        self._build()
        self._open_store(self.file_widget.filePath(), quiet=True)
        project = QgsProject.instance()
        project.layersRemoved.connect(self._layers_removed)
        project.layersAdded.connect(self._changed)
        for signal in (project.homePathChanged, project.fileNameChanged, project.readProject, project.cleared):
            signal.connect(self._project_changed)  # the default file follows the project (beside it)

    # -- layout ------------------------------------------------------------------------------------
    def _build(self) -> None:
        body = QWidget(self)
        outer = QVBoxLayout(body)
        form = wrapping_form()
        self.file_widget = gpkg_file_widget(body, str(self._default_path()))
        self.file_widget.setConfirmOverwrite(False)  # an existing file is appended to, never replaced
        self.file_widget.fileChanged.connect(self._file_chosen)
        form.addRow("Annotation file", self.file_widget)
        self.raster_combo = QgsMapLayerComboBox(body)
        self.raster_combo.setFilters(LAYER_FILTER_RASTER)
        self.raster_combo.layerChanged.connect(lambda *_: self.refresh())
        form.addRow("Raster", self.raster_combo)
        self.gsd_spin = resolution_spin(body, f"The ground resolution the model will read the boxes at; a box under "
                                 f"{MIN_BOX_PIXELS:g} pixels on a side there is warned about")  # fmt: skip
        self.gsd_spin.valueChanged.connect(lambda *_: self.refresh())
        form.addRow("Ground resolution", self.gsd_spin)
        self.polygon_combo = QgsMapLayerComboBox(body)
        self.polygon_combo.setFilters(LAYER_FILTER_POLYGON)
        self.polygon_combo.setAllowEmptyLayer(True)
        form.addRow("Polygons", self.polygon_combo)
        outer.addLayout(form)

        row = QHBoxLayout()
        self.draw_button = QPushButton("Draw boxes", body)
        self.draw_button.setCheckable(True)
        self.draw_button.setToolTip("Drag a box around each object on the map; a dialog asks what it shows")
        self.draw_button.toggled.connect(self._draw_toggled)
        self.selected_button = QPushButton("Add selected polygons", body)
        self.selected_button.setToolTip("The selected polygons of the Polygons layer become annotations")
        self.selected_button.clicked.connect(lambda: self._guard(self.add_selected_polygons))
        self.import_button = QPushButton("Import labels…", body)
        self.import_button.setToolTip("Append every polygon of a layer, with one expression or a field's")
        self.import_button.clicked.connect(lambda: self._guard(self.open_import_dialog))
        for b in (self.draw_button, self.selected_button, self.import_button):
            row.addWidget(b)
        outer.addLayout(row)

        self.tree = QTreeWidget(body)
        self.tree.setHeaderLabels(["Annotations", "Boxes"])
        # the expressions are the column a user reads: as wide as they are, the counts take the rest
        self.tree.header().setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        self.tree.header().setStretchLastSection(True)
        self.tree.setSelectionMode(QTreeWidget.SelectionMode.ExtendedSelection)
        self.tree.itemDoubleClicked.connect(self._double_clicked)
        self.tree.setToolTip("Double-click a box to zoom to it; Delete removes the selected ones")
        outer.addWidget(self.tree, 1)
        row2 = QHBoxLayout()
        self.edit_button = QPushButton("Edit…", body)
        self.edit_button.clicked.connect(lambda: self._guard(self.edit_selected))
        self.delete_button = QPushButton("Delete", body)
        self.delete_button.clicked.connect(lambda: self._guard(self.delete_selected))
        self.save_button = QPushButton("Save", body)
        self.save_button.setToolTip("Write the annotations to the file (Ctrl+Z undoes edits until then)")
        self.save_button.clicked.connect(lambda: self._guard(self.save))
        for b in (self.edit_button, self.delete_button, self.save_button):
            row2.addWidget(b)
        outer.addLayout(row2)
        self.warnings_label = QLabel("", body)
        self.warnings_label.setTextFormat(Qt.TextFormat.PlainText)
        self.warnings_label.setWordWrap(True)
        self.warnings_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        outer.addWidget(self.warnings_label)
        self.status_label = QLabel("", body)
        self.status_label.setTextFormat(Qt.TextFormat.PlainText)
        self.status_label.setWordWrap(True)
        self.status_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        outer.addWidget(self.status_label)
        self.setWidget(body)

    def keyPressEvent(self, event: Any) -> None:
        """Delete, pressed in the list (which passes it on), removes the selected annotations."""
        if event.key() == Qt.Key.Key_Delete and self.tree.selectedItems():
            self._guard(self.delete_selected)
            event.accept()
            return
        super().keyPressEvent(event)

    # -- the file ------------------------------------------------------------------------------------
    def _default_path(self) -> Path:
        project = QgsProject.instance()
        home = project.absolutePath() or (project.homePath() if project.fileName() else "")
        return self.settings.default_annotations(home or None)

    def _project_changed(self, *_: Any) -> None:
        """A project opened, saved elsewhere or closed: the default file follows it, unless a file was chosen (the
        settings' key) or there are unsaved edits."""
        self.settings = PluginSettings.load()
        if self.settings.annotation_gpkg or (self.store is not None and self.store.has_unsaved()):
            return
        path = str(self._default_path())
        if path != self.file_widget.filePath():
            self.file_widget.blockSignals(True)
            self.file_widget.setFilePath(path)
            self.file_widget.blockSignals(False)
            self._open_store(path, quiet=True)

    def annotation_path(self) -> Path:
        """The annotation GeoPackage this dock writes (what ``geo-r1 dataset build`` is to read; :meth:`save`
        first, so the edit buffer is in it)."""
        return self.store.path if self.store is not None else Path(self.file_widget.filePath())

    def _file_chosen(self, path: str) -> None:
        if self._open_store(path):
            self.settings = PluginSettings.load().with_values(annotation_gpkg=str(self.store.path))
            self.settings.save()
            self.fileOpened.emit(self.store.path)

    def _open_store(self, path: str, quiet: bool = False) -> bool:
        path = path.strip()
        if self.store is not None and path and Path(path) == self.store.path:
            return True
        if self.store is not None and self.store.has_unsaved():
            self.set_status(f"The annotations of {self.store.path} have unsaved edits: Save them (or undo them) "
                            "before choosing another file")  # fmt: skip
            self.file_widget.blockSignals(True)
            self.file_widget.setFilePath(str(self.store.path))
            self.file_widget.blockSignals(False)
            return False
        if not path:
            return False
        try:
            store = AnnotationStore(path)
        except GeoR1Error as exc:
            self.store = None
            self.set_status(str(exc))
            self.refresh()
            return False
        self.store = store
        self._watch(store.loaded_layer())
        if not quiet:
            self.set_status(f"Annotations go to {store.path}")
        self.refresh()
        return True

    def open_file(self, path: str | Path) -> None:
        """Use ``path`` as the annotation file (remembered in the settings); a foreign file raises OutputError."""
        AnnotationStore(path)  # its refusal, as an error, for callers
        self.file_widget.setFilePath(str(path))
        self._file_chosen(str(path))

    def _need_store(self) -> AnnotationStore:
        if self.store is None:
            AnnotationStore(self.file_widget.filePath())  # raises what is wrong with it
            raise ConfigError("choose an annotation file (a .gpkg) in the Annotation file box")
        return self.store

    def _watch(self, layer: QgsVectorLayer | None) -> None:
        if layer is None or layer is self._watched:
            return
        for signal in (layer.featureAdded, layer.featuresDeleted, layer.attributeValueChanged,
                       layer.geometryChanged, layer.afterCommitChanges, layer.afterRollBack,
                       layer.editingStopped):  # fmt: skip
            signal.connect(self._changed)
        self._watched = layer

    def _changed(self, *_: Any) -> None:
        """A change of the layer or the project: the list is rebuilt once, after the burst (an import adds many)."""
        self._refresh_timer.start()

    def _layers_removed(self, ids: Any) -> None:
        watched = self._watched
        try:
            if watched is not None and watched.id() in ids:
                self._watched = None
        except RuntimeError:
            self._watched = None
        self.refresh()

    # -- drawing -------------------------------------------------------------------------------------
    def raster(self) -> QgsRasterLayer:
        return check_annotatable(self.raster_combo.currentLayer())

    def start_annotating(self, raster: QgsRasterLayer | None = None) -> BoxMapTool | None:
        """Turn the box tool on (over ``raster`` when given): each box dragged on the map asks what it shows."""
        if raster is not None:
            self.raster_combo.setLayer(raster)
        if self.canvas is None:
            return None
        if self.tool is None:
            self.tool = BoxMapTool(self.canvas)
            self.tool.boxDrawn.connect(self._tool_box)  # bound methods: disconnected when the dock is deleted
            self.tool.tooSmall.connect(self._tool_small)
            self.tool.deactivated.connect(self._tool_off)
        if self.canvas.mapTool() is not self.tool:
            self._previous_tool = self.canvas.mapTool()
            self.canvas.setMapTool(self.tool)
        self._set_checked(True)
        self.set_status("Drag a box around each object on the map (Escape cancels a box)")
        return self.tool

    def _tool_box(self, rect: QgsRectangle, crs: QgsCoordinateReferenceSystem) -> None:
        self._guard(lambda: self.box_drawn(rect, crs))

    def _tool_small(self) -> None:
        self.set_status("Drag a box: press, move, release")

    def _tool_off(self) -> None:
        self._set_checked(False)

    def stop_annotating(self) -> None:
        if self.canvas is not None and self.tool is not None and self.canvas.mapTool() is self.tool:
            if self._previous_tool is not None:
                self.canvas.setMapTool(self._previous_tool)
            else:
                self.canvas.unsetMapTool(self.tool)
        self._set_checked(False)

    def _set_checked(self, on: bool) -> None:
        try:
            self.draw_button.blockSignals(True)
            self.draw_button.setChecked(on)
            self.draw_button.blockSignals(False)
        except RuntimeError:  # the dock is gone; the tool (the canvas's child) said it was switched off
            pass

    def _draw_toggled(self, on: bool) -> None:
        if on:
            self.start_annotating()
        else:
            self.stop_annotating()

    def ask(self, title: str = "What does the box show?", default: AnnotationChoice | None = None,
            ) -> AnnotationChoice | None:  # fmt: skip
        """The small dialog, offering the layer's expressions and the last answers; None when cancelled."""
        expressions = self.store.expressions() if self.store is not None else []
        if self.last_choice is not None and self.last_choice.expression not in expressions:
            expressions.insert(0, self.last_choice.expression)
        dialog = AnnotationDialog(expressions, default or self.last_choice, self, title)
        self.dialog = dialog
        try:
            if not dialog.exec():
                return None
            choice = dialog.choice()
        finally:
            self.dialog = None
            dialog.deleteLater()
        if default is None and choice is not None:
            self.last_choice = choice
        return choice

    def box_drawn(self, rect: QgsRectangle, crs: QgsCoordinateReferenceSystem,
                  choice: AnnotationChoice | None = None) -> list[int]:  # fmt: skip
        """A box drawn in ``crs``: asked about (unless ``choice`` is given) and added, in the raster's CRS."""
        store = self._need_store()
        raster = self.raster()
        geometry = rect_to_raster(rect, crs, raster)
        ext = raster.extent()
        if not geometry.boundingBox().intersects(ext):
            raise ConfigError(f"the box lies outside the raster {raster.name()}: draw it on the raster (or choose "
                              "the raster it is on in the Raster box)")  # fmt: skip
        choice = choice or self.ask()
        if choice is None:
            self.set_status("Box not added (cancelled)")
            return []
        fids = store.add([(geometry, choice.annotation(raster.source()))], raster.crs(), "Add annotation box")
        self._watch(store.loaded_layer())
        self.set_status(f"Added a box of {choice.expression!r} ({choice.split}"
                        f"{', negative' if choice.negative else ''}); Ctrl+Z undoes it, Save writes it")  # fmt: skip
        self.refresh()
        return fids

    def add_selected_polygons(self, layer: QgsVectorLayer | None = None,
                              choice: AnnotationChoice | None = None) -> list[int]:  # fmt: skip
        """The selected polygons of ``layer`` (the Polygons box's by default), one annotation per polygon part."""
        store = self._need_store()
        raster = self.raster()
        layer = layer if layer is not None else self.polygon_combo.currentLayer()
        if not isinstance(layer, QgsVectorLayer) or not layer.isValid():
            raise ConfigError("choose the polygon layer whose selected polygons to add in the Polygons box")
        if layer.selectedFeatureCount() == 0:
            raise ConfigError(f"no polygon of {layer.name()} is selected; select some (Select Features tool) first")
        what = f"the {layer.selectedFeatureCount()} selected polygon(s) of {layer.name()}"
        geometries = polygons_to_raster([f.geometry() for f in layer.getSelectedFeatures()], layer.crs(), raster,
                                        what)  # fmt: skip
        kept = [g for g in geometries if g.boundingBox().intersects(raster.extent())]
        if not kept:
            raise ConfigError(f"{what} lie outside the raster {raster.name()}; select polygons on it")
        choice = choice or self.ask(f"What do the {len(kept)} polygon(s) show?")
        if choice is None:
            return []
        ann = choice.annotation(raster.source())
        fids = store.add([(g, ann) for g in kept], raster.crs(), f"Add {len(kept)} selected polygon(s)")
        self._watch(store.loaded_layer())
        skipped = len(geometries) - len(kept)
        self.set_status(f"Added {len(kept)} polygon(s) of {choice.expression!r}"
                        + (f"; {skipped} outside the raster left out" if skipped else ""))  # fmt: skip
        self.refresh()
        return fids

    def open_import_dialog(self) -> int:
        dialog = ImportDialog(self)
        self.dialog = dialog
        try:
            if not dialog.exec():
                return 0
            values = dialog.values()
        finally:
            self.dialog = None
            dialog.deleteLater()
        return self.import_layer(**values)

    def import_layer(self, layer: QgsVectorLayer, expression: str | None = None, expression_field: str | None = None,
                     split_field: str | None = None, category: str = "") -> int:  # fmt: skip
        """Every polygon of ``layer`` as annotations of the chosen raster (``geo-r1 dataset import`` in QGIS):
        one expression for all, or each feature's ``expression_field``; reprojected to the raster's CRS, one per
        polygon part, those outside the raster left out. One undoable edit; returns how many were added."""
        store = self._need_store()
        raster = self.raster()
        if not isinstance(layer, QgsVectorLayer) or not layer.isValid():
            raise ConfigError("choose the polygon layer to import")
        if (expression is None) == (expression_field is None):
            raise ConfigError("give one expression for every polygon, or the field that holds each one's")
        if expression is not None and not expression.strip():
            raise ConfigError("the expression is empty; say what the polygons outline, e.g. storage tank")
        names = layer.fields().names()
        for label, name in (("expression", expression_field), ("split", split_field)):
            if name and name not in names:
                raise ConfigError(f"{layer.name()} has no field {name!r} for the {label}; its fields are {names}")
        items, outside, empty = [], 0, 0
        ext = raster.extent()
        source = raster.source()
        for feat in layer.getFeatures():
            if expression is not None:
                expr = expression
            else:
                value = plain_value(feat[expression_field])
                expr = "" if value is None else str(value)
                if not expr.strip():
                    empty += 1
                    continue
            split = ""
            if split_field:
                value = plain_value(feat[split_field])
                split = "" if value is None else str(value)
            where = f"feature {feat.id()} of {layer.name()}"
            for g in polygons_to_raster([feat.geometry()], layer.crs(), raster, where):
                if not g.boundingBox().intersects(ext):
                    outside += 1
                    continue
                try:
                    ann = Annotation(expression=expr, raster=source, category=category, split=split)
                except ConfigError as exc:
                    raise ConfigError(f"{where}: {exc}") from None
                items.append((g, ann))
        if not items:
            raise ConfigError(f"none of the polygons of {layer.name()} lies on the raster {raster.name()}"
                              + (" (check the layer's CRS and the raster)" if outside else ""))  # fmt: skip
        store.add(items, raster.crs(), f"Import {len(items)} annotation(s) from {layer.name()}")
        self._watch(store.loaded_layer())
        notes = ([f"{outside} outside the raster"] if outside else []) + ([f"{empty} without an expression"]
                                                                            if empty else [])  # fmt: skip
        self.set_status(f"Imported {len(items)} annotation(s) from {layer.name()}"
                        + (f" ({', '.join(notes)} left out)" if notes else "") + "; Save writes them")  # fmt: skip
        self.refresh()
        return len(items)

    # -- the list ------------------------------------------------------------------------------------
    def features(self) -> list[AnnotationFeature]:
        return self.store.features() if self.store is not None else []

    def counts(self) -> dict[str, dict[str, int]]:
        """``{expression: {"train": n, "val": n, "test": n, "negative": n}}`` (edit buffer included)."""
        return count_boxes(f.annotation for f in self.features() if f.annotation is not None)

    def metres_per_pixel(self) -> float | None:
        value = self.gsd_spin.value()
        return value if value > 0 else None

    def check(self, min_shots: int = RECOMMENDED_SHOTS, min_pixels: float = MIN_BOX_PIXELS) -> tuple[Issue, ...]:
        """What stands between these annotations and a useful fine-tuning (errors first), as values:
        :func:`~geo_r1_qgis.core.annotations.check_boxes` on the layer (edit buffer included), plus features
        whose attributes break the schema, a file that cannot be used, and unsaved edits."""
        if self.store is None:
            try:
                AnnotationStore(self.file_widget.filePath())
                why = "choose an annotation file (a .gpkg) in the Annotation file box"
            except GeoR1Error as exc:
                why = str(exc)
            return (Issue(ERROR, "no_file", why),)
        features = self.features()
        bad = [f for f in features if f.annotation is None]
        frames: dict[str, Any] = {}
        boxes = []
        for f in features:
            if f.annotation is None:
                continue
            source = f.annotation.raster
            if source not in frames:
                frames[source] = raster_frame(source, self.store.path, self.metres_per_pixel())
            bb = f.geometry.boundingBox()
            boxes.append(AnnotatedBox(f.fid, f.annotation, (bb.xMinimum(), bb.yMinimum(), bb.xMaximum(),
                                                             bb.yMaximum()), frames[source]))  # fmt: skip
        issues = list(check_boxes(boxes, min_shots, min_pixels)) if boxes or not bad else []
        for f in bad:
            issues.insert(0, Issue(ERROR, INVALID, f"{f.problem} (fix it in the attribute table, or delete it)",
                                   fids=(f.fid,)))  # fmt: skip
        if self.store.has_unsaved():
            issues.append(Issue(WARNING, "unsaved", "There are unsaved edits: Save writes them to the file"))
        return tuple(issues)

    def refresh(self) -> None:
        """Rebuild the list (expression > split > boxes, with counts) and the warnings under it."""
        try:
            if self.store is not None:
                self._watch(self.store.loaded_layer())  # also a copy the user loaded from the file
            features = self.features()
        except RuntimeError:  # the layer's C++ object is going away
            features = []
        tops = [self.tree.topLevelItem(i) for i in range(self.tree.topLevelItemCount())]
        expanded = {t.text(0) for t in tops if t.isExpanded()}
        self.tree.clear()
        groups: dict[str, dict[str, list[AnnotationFeature]]] = {}
        for f in features:
            if f.annotation is not None:
                groups.setdefault(f.annotation.expression, {s: [] for s in SPLITS})[f.annotation.split].append(f)
        for expression, splits in groups.items():
            total = sum(len(v) for v in splits.values())
            top = QTreeWidgetItem([expression, str(total)])
            top.setData(0, ROLE_FIDS, [f.fid for v in splits.values() for f in v])
            top.setToolTip(0, expression)
            for split in SPLITS:
                feats = splits[split]
                item = QTreeWidgetItem([split, str(len(feats))])
                item.setData(0, ROLE_FIDS, [f.fid for f in feats])
                for f in feats:
                    bb = f.geometry.boundingBox()
                    label = f"#{f.fid}" + (" negative" if f.annotation.negative else "")
                    child = QTreeWidgetItem([label, ""])
                    child.setData(0, ROLE_FIDS, [f.fid])
                    child.setToolTip(0, f"{bb.width():.1f} × {bb.height():.1f} raster CRS units; "
                                        f"{f.annotation.raster}")  # fmt: skip
                    item.addChild(child)
                top.addChild(item)
            self.tree.addTopLevelItem(top)
            top.setExpanded(expression in expanded or len(groups) <= 3)
        issues = self.check()
        self.warnings_label.setText("\n".join(("✖ " if i.level == ERROR else "⚠ ") + i.message for i in issues))

    def selected_fids(self) -> list[int]:
        fids: list[int] = []
        for item in self.tree.selectedItems():
            for fid in item.data(0, ROLE_FIDS) or []:
                if fid not in fids:
                    fids.append(int(fid))
        return fids

    def item_of(self, fid: int) -> QTreeWidgetItem | None:
        """The list's item of one box."""
        for i in range(self.tree.topLevelItemCount()):
            top = self.tree.topLevelItem(i)
            for j in range(top.childCount()):
                split = top.child(j)
                for k in range(split.childCount()):
                    if split.child(k).data(0, ROLE_FIDS) == [fid]:
                        return split.child(k)
        return None

    def _double_clicked(self, item: QTreeWidgetItem, _column: int) -> None:
        fids = item.data(0, ROLE_FIDS) or []
        if len(fids) == 1 and item.childCount() == 0:
            self.zoom_to(int(fids[0]))

    def zoom_to(self, fid: int) -> None:
        """Zoom the map to one annotation (a margin of half its size around it)."""
        feature = next((f for f in self.features() if f.fid == fid), None)
        if feature is None or self.canvas is None:
            return
        crs = self.store.crs()
        rect = QgsRectangle(feature.geometry.boundingBox())
        dest = self.canvas.mapSettings().destinationCrs()
        if crs is not None and crs != dest:
            rect = QgsCoordinateTransform(crs, dest, QgsProject.instance()).transformBoundingBox(rect)
        rect.scale(2.0)
        self.canvas.setExtent(rect)
        self.canvas.refresh()

    def delete_selected(self) -> int:
        return self.delete(self.selected_fids())

    def delete(self, fids: list[int]) -> int:
        """Delete annotations (undoable until Save)."""
        if self.store is None or not fids:
            return 0
        n = self.store.delete(fids)
        self.set_status(f"Deleted {n} annotation(s); Ctrl+Z undoes it, Save writes it")
        self.refresh()
        return n

    def edit_selected(self, choice: AnnotationChoice | None = None) -> bool:
        fids = self.selected_fids()
        if len(fids) != 1:
            raise ConfigError("select one box in the list to edit")
        return self.edit(fids[0], choice)

    def edit(self, fid: int, choice: AnnotationChoice | None = None) -> bool:
        """Change one annotation's expression, category, split or negative flag (the small dialog unless
        ``choice`` is given); its raster and date are kept."""
        store = self._need_store()
        feature = next((f for f in self.features() if f.fid == fid), None)
        if feature is None:
            raise ConfigError(f"there is no annotation {fid}")
        old = feature.annotation
        if choice is None:
            choice = self.ask("Edit the annotation", AnnotationChoice.of(old) if old is not None else None)
            if choice is None:
                return False
        raster = old.raster if old is not None else self.raster().source()
        store.change(fid, choice.annotation(raster, old.created if old is not None else ""))
        self.refresh()
        return True

    def save(self) -> bool:
        """Write the edit buffer to the annotation file; True when it holds everything shown."""
        if self.store is None:
            return False
        self.store.save()
        self.set_status(f"Saved to {self.store.path}")
        self.refresh()
        return True

    # -- messages ------------------------------------------------------------------------------------
    def set_status(self, text: str) -> None:
        self.status_label.setText(text)
        self.status_label.setToolTip(text)
        log.info("%s", text)

    def _guard(self, action: Any) -> Any:
        """Run a button's action; a GeoR1Error goes to the status line (nothing already done is lost)."""
        try:
            return action()
        except GeoR1Error as exc:
            self.set_status(str(exc))
            return None

    def closeEvent(self, event: Any) -> None:
        self.stop_annotating()
        super().closeEvent(event)
