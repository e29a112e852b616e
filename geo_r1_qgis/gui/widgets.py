"""The small widgets and layouts the panel, the Fine-tune section and the annotation dock all build the same way.

One place for each: a ground-resolution box, a GeoPackage file box, a combo box sized for a narrow dock, a form that
wraps in a narrow dock and a row of a stretching widget followed by buttons. The callers keep their own labels and
tooltips.
"""

from __future__ import annotations

from qgis.gui import QgsFileWidget
from qgis.PyQt.QtWidgets import QComboBox, QDoubleSpinBox, QFormLayout, QHBoxLayout, QWidget

#: the ground resolution boxes' range (m/px); 0 reads "native": the raster's own pixels
RESOLUTION_RANGE = (0.0, 10000.0)


def resolution_spin(parent: QWidget, tooltip: str) -> QDoubleSpinBox:
    """A ground-resolution box in m/px whose bottom value, 0, shows as "native"."""
    spin = QDoubleSpinBox(parent)
    spin.setDecimals(3)
    spin.setRange(*RESOLUTION_RANGE)
    spin.setSingleStep(0.1)
    spin.setSpecialValueText("native")
    spin.setSuffix(" m/px")
    spin.setToolTip(tooltip)
    return spin


def gpkg_file_widget(parent: QWidget, path: str, save: bool = True) -> QgsFileWidget:
    """A GeoPackage file box: ``save`` asks for a file to write (it may not exist yet), else for an existing one."""
    widget = QgsFileWidget(parent)
    widget.setStorageMode(QgsFileWidget.StorageMode.SaveFile if save else QgsFileWidget.StorageMode.GetFile)
    widget.setFilter("GeoPackage (*.gpkg)")
    widget.setFilePath(path)
    return widget


def narrow(combo: QComboBox, chars: int) -> QComboBox:
    """Size ``combo`` by ``chars`` characters, not by its longest entry, so that a narrow dock never scrolls
    sideways (the entries are elided; the list still opens full width)."""
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(chars)
    return combo


def wrapping_form() -> QFormLayout:
    """A form whose labels go above their fields when the dock is too narrow for both on one line."""
    form = QFormLayout()
    form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
    return form


def stretch_row(first: QWidget, *rest: QWidget) -> QHBoxLayout:
    """``first`` taking the row's spare width, then ``rest`` (buttons) at their own size."""
    row = QHBoxLayout()
    row.addWidget(first, 1)
    for widget in rest:
        row.addWidget(widget)
    return row
