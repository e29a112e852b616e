"""A small learning-curve plot drawn with QPainter: reward, format and IoU against the training step.

QGIS's Python has no matplotlib, so the panel draws its own: axes with round ticks, one line (and dots, so a
single point shows) per curve, a legend with each curve's last value. What is drawn where comes from the pure
:mod:`geo_r1_qgis.core.finetune` (:func:`curve_series`, :class:`PlotFrame`, :func:`nice_ticks`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qgis.PyQt.QtCore import QPointF, QRectF, QSize, Qt
from qgis.PyQt.QtGui import QColor, QImage, QPainter, QPainterPath, QPen
from qgis.PyQt.QtWidgets import QSizePolicy, QWidget

from ..core.finetune import PlotFrame, curve_series, nice_ticks, tick_text

MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 34, 8, 8, 34


class CurvePlot(QWidget):
    """``set_curves(job["curves"])`` and it repaints; ``series`` holds what it draws."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.series: list[tuple[str, str, tuple[int, int, int], list[tuple[float, float]]]] = []
        self.setMinimumHeight(150)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.setToolTip("Reward, format and IoU of the training batches against the step")

    def sizeHint(self) -> QSize:
        return QSize(260, 170)

    def set_curves(self, curves: Mapping[str, Sequence[Any]] | None) -> None:
        self.series = curve_series(curves)
        self.update()

    def point_count(self) -> int:
        return sum(len(points) for *_, points in self.series)

    def last_values(self) -> dict[str, float]:
        """Each curve's last value, by its key (what the legend shows)."""
        return {key: points[-1][1] for key, _label, _colour, points in self.series}

    def frame(self, width: float, height: float) -> PlotFrame:
        inner_w, inner_h = width - MARGIN_LEFT - MARGIN_RIGHT, height - MARGIN_TOP - self.bottom_margin()
        return PlotFrame.fit([p for *_, p in self.series], MARGIN_LEFT, MARGIN_TOP, inner_w, inner_h)

    def bottom_margin(self) -> int:
        """Room under the plot for the x labels and the legend, two lines of this widget's font (the fixed
        MARGIN_BOTTOM cut the legend in half with the fonts of a real desktop)."""
        return max(MARGIN_BOTTOM, 2 * self.fontMetrics().height() + 8)

    def render_image(self, width: int = 320, height: int = 180) -> QImage:
        """The plot drawn into an image (for tests and for saving)."""
        image = QImage(width, height, QImage.Format.Format_ARGB32)
        image.fill(QColor(255, 255, 255))
        painter = QPainter(image)
        try:
            self.draw(painter, width, height)
        finally:
            painter.end()
        return image

    def paintEvent(self, event: Any) -> None:
        painter = QPainter(self)
        try:
            painter.fillRect(self.rect(), self.palette().base())
            self.draw(painter, self.width(), self.height())
        finally:
            painter.end()

    def draw(self, painter: QPainter, width: float, height: float) -> None:
        painter.setRenderHint(QPainter.RenderHint.Antialiasing, True)
        text_colour = self.palette().text().color()
        if width - MARGIN_LEFT - MARGIN_RIGHT < 20 or height - MARGIN_TOP - self.bottom_margin() < 20:
            return
        frame = self.frame(width, height)
        metrics = painter.fontMetrics()
        grid = QPen(QColor(200, 200, 200))
        grid.setWidth(0)
        axis = QPen(text_colour)
        # y ticks, grid lines and labels
        for value in nice_ticks(frame.y_lo, frame.y_hi, 5):
            if not frame.y_lo - 1e-9 <= value <= frame.y_hi + 1e-9:
                continue
            _, y = frame.to_pixel(frame.x_lo, value)
            painter.setPen(grid)
            painter.drawLine(QPointF(frame.left, y), QPointF(frame.left + frame.width, y))
            painter.setPen(axis)
            label = tick_text(value)
            painter.drawText(QRectF(0, y - metrics.height() / 2, MARGIN_LEFT - 4, metrics.height()),
                             int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter), label)  # fmt: skip
        # x ticks (steps: whole numbers)
        base = frame.top + frame.height
        for value in nice_ticks(frame.x_lo, frame.x_hi, 5):
            if not frame.x_lo - 1e-9 <= value <= frame.x_hi + 1e-9 or abs(value - round(value)) > 1e-9:
                continue
            x, _ = frame.to_pixel(value, frame.y_lo)
            painter.setPen(axis)
            painter.drawLine(QPointF(x, base), QPointF(x, base + 3))
            painter.drawText(QRectF(x - 30, base + 3, 60, metrics.height()), int(Qt.AlignmentFlag.AlignHCenter),
                             tick_text(value))  # fmt: skip
        painter.setPen(axis)
        painter.drawLine(QPointF(frame.left, frame.top), QPointF(frame.left, base))
        painter.drawLine(QPointF(frame.left, base), QPointF(frame.left + frame.width, base))
        if not self.series:
            painter.drawText(QRectF(frame.left, frame.top, frame.width, frame.height),
                             int(Qt.AlignmentFlag.AlignCenter), "no training steps yet")  # fmt: skip
            return
        # the curves
        for _key, _label, rgb, points in self.series:
            colour = QColor(*rgb)
            pen = QPen(colour)
            pen.setWidthF(1.6)
            painter.setPen(pen)
            path = QPainterPath()
            for i, (x, y) in enumerate(points):
                px, py = frame.to_pixel(x, y)
                if i == 0:
                    path.moveTo(px, py)
                else:
                    path.lineTo(px, py)
            painter.drawPath(path)
            painter.setBrush(colour)
            for x, y in points[-1:] if len(points) > 40 else points:
                px, py = frame.to_pixel(x, y)
                painter.drawEllipse(QPointF(px, py), 2.2, 2.2)
            painter.setBrush(Qt.BrushStyle.NoBrush)
        # the legend, under the x axis labels: "■ reward 0.42  ■ format 1  ■ IoU 0.31"
        x = frame.left
        y = base + 3 + metrics.height()
        for _key, label, rgb, points in self.series:
            text = f"{label} {points[-1][1]:.3g}"
            painter.fillRect(QRectF(x, y + metrics.height() / 2 - 4, 8, 8), QColor(*rgb))
            painter.setPen(axis)
            painter.drawText(QRectF(x + 11, y, metrics.horizontalAdvance(text) + 4, metrics.height()),
                             int(Qt.AlignmentFlag.AlignLeft), text)  # fmt: skip
            x += 11 + metrics.horizontalAdvance(text) + 12
