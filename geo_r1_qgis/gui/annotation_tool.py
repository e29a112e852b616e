"""The map tool that draws annotation boxes: press, drag (a rubber band follows), release.

Each finished rectangle is emitted in the canvas's CRS (:attr:`BoxMapTool.boxDrawn`); the annotation dock
(:mod:`geo_r1_qgis.gui.annotation_dock`) asks what it shows and stores it in the raster's CRS. A click without
a drag, the right button or Escape draws nothing. The tool stays active for the next box.

QGIS's Python only (PyQGIS).
"""

from __future__ import annotations

from typing import Any

from qgis.core import QgsCoordinateReferenceSystem, QgsGeometry, QgsPointXY, QgsRectangle
from qgis.gui import QgsMapTool, QgsRubberBand
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor

from ..compat import GEOMETRY_POLYGON

__all__ = ["BoxMapTool"]

#: a drag shorter than this many screen pixels on either side is a click, not a box
MIN_DRAG_PX = 3


class BoxMapTool(QgsMapTool):
    """Drag rectangles on the canvas; each is emitted with the canvas's CRS."""

    #: (QgsRectangle, QgsCoordinateReferenceSystem): a rectangle drawn, in the canvas's CRS
    boxDrawn = pyqtSignal(object, object)
    #: a click too small to be a box (the dock says how to draw one)
    tooSmall = pyqtSignal()

    def __init__(self, canvas: Any) -> None:
        super().__init__(canvas)
        self.setCursor(Qt.CursorShape.CrossCursor)
        self._start: QgsPointXY | None = None
        self._start_px: tuple[int, int] | None = None
        self.band = QgsRubberBand(canvas, GEOMETRY_POLYGON)
        self.band.setStrokeColor(QColor(255, 215, 0, 240))
        self.band.setFillColor(QColor(255, 215, 0, 40))
        self.band.setWidth(2)

    def _rect(self, end: QgsPointXY) -> QgsRectangle:
        rect = QgsRectangle(self._start, end)
        rect.normalize()
        return rect

    def canvasPressEvent(self, event: Any) -> None:
        if event.button() != Qt.MouseButton.LeftButton:
            self.reset()
            return
        self._start = QgsPointXY(event.mapPoint())
        self._start_px = (event.pixelPoint().x(), event.pixelPoint().y())
        self.band.reset(GEOMETRY_POLYGON)

    def canvasMoveEvent(self, event: Any) -> None:
        if self._start is None:
            return
        self.band.setToGeometry(QgsGeometry.fromRect(self._rect(QgsPointXY(event.mapPoint()))), None)
        self.band.show()

    def canvasReleaseEvent(self, event: Any) -> None:
        if self._start is None or event.button() != Qt.MouseButton.LeftButton:
            return
        rect = self._rect(QgsPointXY(event.mapPoint()))
        px = event.pixelPoint()
        small = self._start_px is not None and min(abs(px.x() - self._start_px[0]),
                                                   abs(px.y() - self._start_px[1])) < MIN_DRAG_PX  # fmt: skip
        self.reset()
        if small or rect.isEmpty():
            self.tooSmall.emit()
            return
        crs = QgsCoordinateReferenceSystem(self.canvas().mapSettings().destinationCrs())
        self.boxDrawn.emit(rect, crs)

    def keyPressEvent(self, event: Any) -> None:
        if event.key() == Qt.Key.Key_Escape:
            self.reset()
            event.accept()
            return
        event.ignore()

    def reset(self) -> None:
        """Forget a drag in progress and hide its rubber band."""
        self._start = None
        self._start_px = None
        self.band.reset(GEOMETRY_POLYGON)

    def deactivate(self) -> None:
        self.reset()
        super().deactivate()
