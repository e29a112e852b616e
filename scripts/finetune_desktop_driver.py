"""Runs inside the real QGIS desktop (``qgis --code``): boxes drawn with the mouse, a fine-tune watched, its report.

Started by ``scripts/finetune_screenshots.py`` under Xvfb; the plumbing (a step is a generator on a QTimer,
xdotool clicks, the status file, Exit) is ``tests/geo_r1_qgis/desktop_driver.py``'s :class:`Driver`. Its JSON
configuration (``GEO_R1_DESKTOP_CONFIG``) names ``boxes`` (per raster layer name: map rectangles and the split),
``expression``, ``category``, ``steps``, ``options`` (training options), ``chip``, ``zoom`` (the map extent of the
first picture), ``finetune_png``, ``report_png``, ``status`` and ``timeout_s``.

The steps: the panel opened with its toolbar button, Annotate with its own; each box dragged on the map with the
mouse (xdotool: press, move, release) over its raster, the dock's dialog answered (expression, category, split)
and OK clicked; Save; in the panel's Fine-tune section GRPO, the budget in steps and the chip set, Fine-tune
clicked; once the job has trained half its steps, the screen is saved (the annotation dock, the boxes on the map,
the live curve); when the job is done, its report.md is shown in a Qt text browser inside QGIS (Open report
hands the file to the desktop's default application, which a bare Xvfb session has none of) and the screen is
saved again.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(os.environ["GEO_R1_REPO"]) / "tests" / "geo_r1_qgis"))
os.environ["GEO_R1_DESKTOP_DRIVER_LIBRARY"] = "1"
from desktop_driver import PLUGIN, WINDOW, Driver
from qgis.core import QgsExpression, QgsPointXY, QgsProject, QgsRectangle, QgsRuleBasedRenderer
from qgis.PyQt.QtCore import QPoint, Qt, QUrl
from qgis.PyQt.QtGui import QGuiApplication
from qgis.PyQt.QtWidgets import QDialog, QDockWidget, QTextBrowser, QVBoxLayout
from qgis.utils import iface, plugins


class FinetuneDriver(Driver):
    def _steps(self):
        cfg = self.cfg
        win = iface.mainWindow()
        win.setGeometry(0, 0, *WINDOW)
        win.show()
        yield from self.wait(lambda: PLUGIN in plugins and getattr(plugins[PLUGIN], "toolbar_action", None),
                             "the Geo-R1 plugin is loaded", 120)  # fmt: skip
        plugin = plugins[PLUGIN]
        layers = {}
        yield from self.wait(lambda: all(QgsProject.instance().mapLayersByName(n) for n in cfg["boxes"]),
                             "the rasters are on the map", 60)  # fmt: skip
        for name in cfg["boxes"]:
            layers[name] = QgsProject.instance().mapLayersByName(name)[0]
        canvas = iface.mapCanvas()
        for w in win.findChildren(QDockWidget):  # the left side for the annotation dock (Browser, Layers off)
            if w.objectName() in ("Browser", "Layers"):
                w.hide()
        self.press_toolbar_button(plugin)
        panel = plugin.dock
        yield from self.wait(lambda: panel.isVisible(), "the panel opens", 30)
        manager = panel.engine_box.manager
        yield from self.wait(lambda: manager.state == "external" and bool(manager.info), "the panel finds the engine",
                             60)  # fmt: skip
        annotate = iface.pluginToolBar().widgetForAction(plugin.annotate_action)
        self.click(annotate)  # Annotate: the dock opens with the box tool on
        yield from self.wait(lambda: plugin.annotation_dock is not None and plugin.annotation_dock.isVisible(),
                             "the annotation dock opens", 30)  # fmt: skip
        adock = plugin.annotation_dock
        win.addDockWidget(Qt.DockWidgetArea.LeftDockWidgetArea, adock)
        win.resizeDocks([adock, panel], [400, 440], Qt.Orientation.Horizontal)
        yield from self.pause(0.5)

        drawn = 0
        for name, boxes in cfg["boxes"].items():
            layer = layers[name]
            for other in layers.values():  # the raster the boxes go on is the one shown
                QgsProject.instance().layerTreeRoot().findLayer(other.id()).setItemVisibilityChecked(other is layer)
            adock.start_annotating(layer)
            canvas.setExtent(QgsRectangle(*cfg["draw_extent"][name]))
            canvas.refresh()
            yield from self.pause(0.3)
            yield from self.wait(lambda: not canvas.isDrawing(), f"{name} is drawn", 60)
            for (x1, y1, x2, y2), split in boxes:
                yield from self.drag(canvas, (x1, y2), (x2, y1))
                yield from self.wait(lambda: adock.dialog is not None and adock.dialog.isVisible(),
                                     "the dialog asks what the box shows", 20)  # fmt: skip
                d = adock.dialog
                d.expression_combo.setEditText(cfg["expression"])
                d.category_edit.setText(cfg["category"])
                d.split_combo.setCurrentText(split)
                self.click(d.buttons.button(d.buttons.StandardButton.Ok))
                yield from self.wait(lambda: adock.dialog is None, "the dialog closes", 20)
                drawn += 1
        self.status["boxes_drawn"] = drawn
        self.status["counts"] = adock.counts()
        self.click(adock.save_button)
        yield from self.wait(lambda: not adock.store.loaded_layer().isModified(), "the boxes are saved", 30)
        self.note(f"{drawn} boxes drawn and saved: {self.status['counts']}")

        # the Fine-tune section: GRPO, a budget in steps, the chip; Fine-tune clicked
        ft = panel.finetune
        ft.recipe_combo.setCurrentIndex(ft.recipe_combo.findData("grpo"))
        ft.budget_unit.setCurrentIndex(ft.budget_unit.findData("steps"))
        ft.budget_spin.setValue(int(cfg["steps"]))
        ft.chip_spin.setValue(int(cfg.get("chip", 0)))
        ft.name_edit.setText(cfg.get("name", "tanks"))
        ft.training_options = dict(cfg.get("options") or {})
        for section in ("engine_group", "advanced_group"):  # fold what the pictures do not need, as a user would
            group = getattr(panel, section, None)
            if group is not None and hasattr(group, "setCollapsed"):
                group.setCollapsed(True)
        panel.scroll_area.ensureWidgetVisible(ft.finetune_button)
        yield from self.pause(0.3)
        started: list[dict] = []
        ft.jobStarted.connect(started.append)
        self.click(ft.finetune_button)
        self.status["finetune_clicked_enabled"] = ft.finetune_button.isEnabled()
        yield from self.wait(lambda: started or (ft.finetune_button.isEnabled() and ft.message_label.text()),
                             "the panel answers Fine-tune", 120)  # fmt: skip
        if not started:
            raise RuntimeError(f"the job did not start: {ft.message_label.text()!r}")
        yield from self.wait(lambda: ft.record.get("id"), "the job is watched", 60)
        self.status["job"] = ft.record.get("id")
        for other in layers.values():
            QgsProject.instance().layerTreeRoot().findLayer(other.id()).setItemVisibilityChecked(
                other is layers[cfg["shown"]])  # fmt: skip
        self.only_boxes_of(adock.store.loaded_layer(), layers[cfg["shown"]])
        adock.raster_combo.setLayer(layers[cfg["shown"]])
        canvas.setExtent(QgsRectangle(*cfg["zoom"]))
        canvas.refresh()
        half = max(2, int(cfg["steps"]) // 2)
        ended = ("done", "failed", "cancelled")
        yield from self.wait(lambda: (ft.record.get("step") or 0) >= half or ft.record.get("state") in ended,
                             f"the job trains {half} steps", float(cfg.get("train_timeout_s", 900)))  # fmt: skip
        if ft.record.get("state") != "training":
            raise RuntimeError(f"the job is {ft.record.get('state')} before the picture: {ft.record.get('error')}")
        panel.scroll_area.ensureWidgetVisible(ft.plot)
        yield from self.pause(1.5)  # the next poll redraws the curve
        yield from self.wait(lambda: not canvas.isDrawing(), "the map is drawn", 60)
        self.status["points_at_picture"] = ft.plot.point_count()
        self.status["step_at_picture"] = ft.record.get("step")
        self.save_screen(cfg["finetune_png"], "finetune")

        yield from self.wait(lambda: ft.record.get("state") in ("done", "failed", "cancelled"), "the job ends",
                             float(cfg.get("train_timeout_s", 900)))  # fmt: skip
        record = dict(ft.record)
        self.status["record"] = {k: record.get(k) for k in ("state", "step", "error", "report", "eval_split")}
        self.status["metrics_rows"] = [[ft.metrics_table.item(r, c).text() for c in range(3)]
                                       for r in range(ft.metrics_table.rowCount())]  # fmt: skip
        if record.get("state") != "done" or not record.get("report"):
            raise RuntimeError(f"the job ended {record.get('state')}: {record.get('error')}")
        panel.scroll_area.ensureWidgetVisible(ft.report_button)
        yield from self.show_report(Path(record["report"]))
        self.status["ok"] = True
        self.status["step"] = "done"

    @staticmethod
    def only_boxes_of(annotations, raster) -> None:
        """Draw only the boxes of the raster shown (the two sample scenes share one extent): a rule on the
        annotation layer's own symbol, its features and the dock's list untouched."""
        renderer = QgsRuleBasedRenderer.convertFromRenderer(annotations.renderer())
        for rule in renderer.rootRule().children():
            rule.setFilterExpression(f'"raster" = {QgsExpression.quotedString(raster.source())}')
        annotations.setRenderer(renderer)
        annotations.triggerRepaint()

    def drag(self, canvas, top_left, bottom_right):
        """Press at one map corner, move through the middle to the other, release: real X mouse events."""
        to_px = canvas.getCoordinateTransform()
        points = []
        for x, y in (top_left, bottom_right):
            p = to_px.transform(QgsPointXY(x, y))
            points.append(canvas.viewport().mapToGlobal(QPoint(round(p.x()), round(p.y()))))
        (ax, ay), (bx, by) = (points[0].x(), points[0].y()), (points[1].x(), points[1].y())
        self.xdotool("mousemove", "--sync", str(ax), str(ay))
        self.xdotool("mousedown", "1")
        yield from self.pause(0.1)
        self.xdotool("mousemove", "--sync", str((ax + bx) // 2), str((ay + by) // 2))
        yield from self.pause(0.1)
        self.xdotool("mousemove", "--sync", str(bx), str(by))
        yield from self.pause(0.1)
        self.xdotool("mouseup", "1")

    def show_report(self, report: Path):
        """The report as Markdown with its plots, in a Qt text browser over the QGIS window."""
        viewer = QDialog(iface.mainWindow())
        viewer.setWindowTitle(f"Geo-R1 report: {report}")
        browser = QTextBrowser(viewer)
        browser.setSearchPaths([str(report.parent)])
        browser.document().setBaseUrl(QUrl.fromLocalFile(str(report.parent) + "/"))
        browser.setMarkdown(report.read_text(encoding="utf-8"))
        QVBoxLayout(viewer).addWidget(browser)
        viewer.setGeometry(460, 40, 1120, 940)
        viewer.show()
        yield from self.pause(1.0)
        self.status["report_has_results"] = "Results" in browser.toPlainText()
        bar = browser.verticalScrollBar()
        bar.setValue(int(bar.maximum() * float(self.cfg.get("report_scroll", 0.0))))
        yield from self.pause(0.5)
        self.save_screen(self.cfg["report_png"], "report")
        viewer.close()

    def save_screen(self, path: str, what: str) -> None:
        shot = Path(path)
        shot.parent.mkdir(parents=True, exist_ok=True)
        pixmap = QGuiApplication.primaryScreen().grabWindow(0)
        if not pixmap.save(str(shot), "PNG"):
            raise OSError(f"could not save the {what} screenshot to {shot}")
        self.status[f"{what}_png"] = str(shot)
        self.note(f"{what} screenshot saved at {time.monotonic() - self.t_start:.0f} s")


_geo_r1_finetune_driver = FinetuneDriver(json.loads(Path(os.environ["GEO_R1_DESKTOP_CONFIG"]).read_text()))
