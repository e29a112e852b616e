"""Runs inside the real QGIS desktop (``qgis --code desktop_driver.py``) and uses the Geo-R1 panel as a user would.

Started by ``test_desktop.py`` under Xvfb, in a fresh profile with the plugin installed from ``make plugin-zip``
and its settings pointing at a real engine. Its configuration is the JSON file named by
``GEO_R1_DESKTOP_CONFIG``: ``expression``, ``screenshot`` (png path), ``status`` (json path), ``timeout_s``, and
optionally ``long_expression``, ``no_crs_raster``, ``read_only_output``, ``second_raster``, ``project``, ``mode``.

The steps, each waited for on a QTimer so the desktop stays live: the plugin is loaded; the panel is opened
by clicking the toolbar button (xdotool); where the configuration names them, Run is refused three times
before anything starts: a ``long_expression`` pasted (ctrl+v) into the expression box, a ``no_crs_raster``
added and chosen, a ``read_only_output`` typed into Save to (each time the message, whether a task or a run
started, the history and the window's and Run's geometry are recorded); the expression is typed into the
panel's expression box (xdotool); Run is clicked (xdotool); the run ends; one result in the results list is
clicked (xdotool), which selects the feature, zooms to it and outlines its tile; the mouse rests on the box so
its map tip shows; the screen is saved; then a ``second_raster`` is added on top and run on (the render order
recorded), the settings and the history are read back and the ``project`` is saved for the next start. The
status file says what happened (also on failure), then QGIS quits.

With ``"mode": "second"`` it is the next start in the same profile instead: it opens the panel (unless QGIS
restored it open) and records the window's size, the history, the engine the panel found and Save to.

QGIS runs this file with ``exec`` in its console namespace: everything stays in one object kept in a global.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import traceback
from pathlib import Path

from qgis.core import Qgis, QgsApplication, QgsMapLayer, QgsPointXY, QgsProject, QgsSettings, QgsVectorLayer
from qgis.PyQt.QtCore import QPoint, QTimer
from qgis.PyQt.QtGui import QGuiApplication
from qgis.PyQt.QtWidgets import QPlainTextEdit, QTabWidget, QToolButton, QWidget
from qgis.utils import iface, plugins

PLUGIN = "geo_r1_qgis"
WINDOW = (1600, 1000)
DOCK_WIDTH = 430


class Driver:
    def __init__(self, config: dict) -> None:
        self.cfg = config
        self.status: dict = {"ok": False, "step": "start", "qgis_version": Qgis.QGIS_VERSION, "log": []}
        self.t_start = time.monotonic()
        self.deadline = self.t_start + float(config.get("timeout_s", 480))
        self.messages: list[dict] = []
        QgsApplication.messageLog().messageReceived.connect(self._message)
        self.steps = iter(self._steps())
        self.timer = QTimer()
        self.timer.setInterval(100)
        self.timer.timeout.connect(self._tick)
        self.timer.start()

    # -- plumbing ----------------------------------------------------------------------------------
    def _message(self, text: str, tag: str, level) -> None:
        self.messages.append({"tag": tag, "level": int(level), "text": text[:2000]})

    def note(self, text: str) -> None:
        self.status["log"].append(f"{time.monotonic() - self.t_start:7.2f}s {text}")

    def _tick(self) -> None:
        """Advance the current step: a step is a generator that yields while it waits."""
        try:
            if time.monotonic() > self.deadline:
                raise TimeoutError(f"gave up at step {self.status['step']!r} after {self.cfg.get('timeout_s')} s")
            next(self.steps)
        except StopIteration:
            self._finish()
        except Exception:  # the boundary: whatever went wrong goes into the status file
            self.status["error"] = traceback.format_exc()
            self._finish()

    def wait(self, until, what: str, timeout: float = 60.0):
        """Yield until ``until()`` is true; raise after ``timeout`` seconds."""
        self.status["step"] = what
        end = time.monotonic() + timeout
        while not until():
            if time.monotonic() > end:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for: {what}")
            yield

    def pause(self, seconds: float):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            yield

    def xdotool(self, *args: str) -> None:
        exe = shutil.which("xdotool")
        if exe is None:
            raise RuntimeError("xdotool is not installed (apt-get install xdotool)")
        proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"xdotool {' '.join(args)} failed: {proc.stderr.strip()}")

    def press_toolbar_button(self, plugin) -> None:
        """Open the panel as a user does: a mouse click on the plugin's toolbar button (the action if not found)."""
        button = iface.pluginToolBar().widgetForAction(plugin.toolbar_action)
        if isinstance(button, QToolButton) and button.isVisible():
            self.click(button)
            self.status["opened_by"] = "toolbar button (mouse click)"
        else:
            plugin.toolbar_action.trigger()
            self.status["opened_by"] = "toolbar action (trigger: the button was not found)"

    def click(self, widget, point: QPoint | None = None) -> None:
        """A real mouse click (X server events) at ``point`` in ``widget`` (default its centre)."""
        p = widget.mapToGlobal(point if point is not None else widget.rect().center())
        self.xdotool("mousemove", "--sync", str(p.x()), str(p.y()))
        self.xdotool("click", "1")

    # -- the user's steps --------------------------------------------------------------------------
    def _steps(self):
        win = iface.mainWindow()
        if self.cfg.get("mode") == "second":
            # the next start in the same profile: QGIS sizes its window itself (from the saved geometry and what
            # the panel asks for), nothing here sets it
            yield from self._second_start()
            return
        win.setGeometry(0, 0, *WINDOW)
        win.show()
        win.activateWindow()
        yield from self.wait(
            lambda: PLUGIN in plugins and getattr(plugins[PLUGIN], "toolbar_action", None),
            "the Geo-R1 plugin is loaded",
            120,
        )
        plugin = plugins[PLUGIN]
        yield from self.wait(lambda: self._raster() is not None, "the sample raster is on the map", 60)
        raster = self._raster()
        iface.mapCanvas().setExtent(raster.extent())
        yield from self.wait(lambda: not iface.mapCanvas().isDrawing(), "the raster is drawn", 60)
        self.note(f"plugin loaded, raster {raster.name()} on the map")

        # open the panel with the toolbar button
        dock = plugin.dock
        t0 = time.perf_counter()
        self.press_toolbar_button(plugin)
        yield from self.wait(lambda: dock.isVisible(), "the panel opens from the toolbar button", 30)
        self.status["panel_open_s"] = time.perf_counter() - t0
        # the moment it shows (before the engine answers the panel's probe): is the Engine section folded?
        manager = getattr(dock.engine_box, "manager", None)
        self.status["engine_state_at_show"] = manager.state if manager is not None else None
        self.status["engine_folded_at_show"] = self.engine_folded(dock)
        from qgis.PyQt.QtCore import Qt

        win.resizeDocks([dock], [DOCK_WIDTH], Qt.Orientation.Horizontal)
        yield from self.pause(0.5)
        t_shown = time.monotonic()
        self.status["geometry_shown"] = self.geometry(dock)
        self.note(f"panel open ({self.status['opened_by']})")

        # the engine line: opening the panel asked whether an engine answers at the settings' URL
        manager = getattr(dock.engine_box, "manager", None)
        if manager is not None:
            yield from self.wait(lambda: manager.state != "stopped", "the panel finds the running engine", 30)
            self.status["engine_state"] = manager.state
            self.status["engine_url"] = manager.url
            yield from self.pause(1.0)
        # the Engine section never folds once the panel shows: Run stays where it was 3 s later
        yield from self.pause(max(0.0, 3.0 - (time.monotonic() - t_shown)))
        self.status["geometry_3s"] = self.geometry(dock)
        self.status["engine_details"] = self.engine_details(dock)

        # the panel's load time (after the real panel opened, so that one finds the engine itself): a second
        # panel built and shown on its own, then thrown away
        from geo_r1_qgis.gui.panel import GeoR1Dock

        t0 = time.perf_counter()
        probe = GeoR1Dock(iface)
        probe.show()
        QgsApplication.processEvents()
        self.status["panel_load_s"] = time.perf_counter() - t0
        probe.hide()
        probe.deleteLater()
        yield

        dock.raster_combo.setLayer(raster)
        edit = dock.expression_combo.lineEdit()
        if self.cfg.get("long_expression"):
            # a 5,000-character description, pasted (ctrl+v) into the box, then Run: refused before anything starts
            from qgis.PyQt.QtWidgets import QApplication

            long_text = self.cfg["long_expression"]
            QApplication.clipboard().setText(long_text)
            self.click(edit)
            yield from self.wait(lambda: edit.hasFocus(), "the expression box has the keyboard focus", 20)
            self.xdotool("key", "ctrl+a")
            self.xdotool("key", "ctrl+v")
            yield from self.wait(
                lambda: dock.expression_combo.currentText() == long_text,
                f"the expression box holds the {len(long_text)}-character text",
                30,
            )
            self.status["long_expression"] = yield from self.refused_run(dock, "the long expression")
            self.note("long expression refused")
        if self.cfg.get("no_crs_raster"):
            # a raster without a CRS: refused, and the long message leaves the window on the screen
            no_crs = iface.addRasterLayer(self.cfg["no_crs_raster"], "no_crs")
            if no_crs is None or not no_crs.isValid():
                raise RuntimeError(f"QGIS could not open {self.cfg['no_crs_raster']}")
            self.status["no_crs_layer_crs_valid"] = no_crs.crs().isValid()
            dock.raster_combo.setLayer(no_crs)
            yield from self.type_expression(dock, self.cfg["expression"])
            self.status["no_crs"] = yield from self.refused_run(dock, "the raster without a CRS")
            QgsProject.instance().removeMapLayer(no_crs.id())
            dock.raster_combo.setLayer(raster)
            self.note("raster without a CRS refused")
        if self.cfg.get("read_only_output"):
            # Save to a folder nobody can write into: refused before the run starts, without Resume advice
            original = dock.output_widget.filePath()
            yield from self.type_save_to(dock, self.cfg["read_only_output"])
            yield from self.type_expression(dock, self.cfg["expression"])
            self.status["read_only"] = yield from self.refused_run(dock, "the read-only Save to")
            yield from self.type_save_to(dock, original)
            self.note("read-only Save to refused")

        # type the expression
        dock.raster_combo.setLayer(raster)
        expression = self.cfg["expression"]
        yield from self.type_expression(dock, expression)
        self.note("expression typed")

        # Run
        self.click_run(dock, "the run")
        t_click = time.perf_counter()
        yield from self.wait(lambda: dock.task is not None or dock.entry is not None, "the run starts", 30)
        entry = dock.entry
        first_feature: dict = {}

        def seen_feature() -> bool:
            layer = QgsProject.instance().mapLayer(entry.map_layer_id) if entry.map_layer_id else None
            if "s" not in first_feature and isinstance(layer, QgsVectorLayer) and layer.featureCount() > 0:
                first_feature["s"] = time.perf_counter() - t_click
                first_feature["running"] = dock.task is not None
            return dock.task is None

        yield from self.wait(seen_feature, "the run ends", float(self.cfg.get("run_timeout_s", 360)))
        self.status["run_status"] = entry.status
        self.status["run_message"] = entry.message
        self.status["click_to_first_feature_s"] = first_feature.get("s")
        self.status["first_feature_while_running"] = first_feature.get("running")
        self.status["panel_first_feature_s"] = entry.first_feature_s
        self.status["run_s"] = time.perf_counter() - t_click
        self.status["status_line"] = dock.status_label.text()
        self.note(f"run ended: {entry.status} {entry.message}")

        root = QgsProject.instance().layerTreeRoot()
        group = root.findGroup("Geo-R1")
        layers = [n.layer() for n in group.findLayers()] if group is not None else []
        self.status["group_layers"] = [(lyr.name(), lyr.featureCount()) for lyr in layers]
        self.status["features"] = sum(lyr.featureCount() for lyr in layers if isinstance(lyr, QgsVectorLayer))
        raster_node = root.findLayer(raster.id())
        self.status["group_above_raster"] = bool(
            group is not None and raster_node is not None
            and root.children().index(group) < root.children().index(raster_node))  # fmt: skip

        self.status["geometry_after_run"] = self.geometry(dock)
        self.trace(dock, "the run ended")

        # click the best result in the results list
        top = dock.results.topLevelItem(0)
        if top is not None and top.childCount():
            top.setExpanded(True)
            child = self._central_result(top, raster.extent())
            dock.scroll_area.ensureWidgetVisible(dock.results)  # as a user scrolls the panel down to the list
            dock.results.scrollToItem(child)
            yield from self.pause(0.3)
            rect = dock.results.visualItemRect(child)
            self.click(dock.results.viewport(), rect.center())
            layer = QgsProject.instance().mapLayer(entry.map_layer_id)
            yield from self.wait(lambda: layer.selectedFeatureCount() == 1, "the clicked result is selected", 20)
            self.status["selected_result"] = child.text(0)
            self.status["geometry_after_result_click"] = self.geometry(dock)
            self.trace(dock, "clicked a result")
            canvas = iface.mapCanvas()
            yield from self.pause(0.5)
            yield from self.wait(lambda: not canvas.isDrawing(), "the map is drawn at the result", 60)
            # one turn of the mouse wheel out, for the boxes around it
            centre = canvas.viewport().mapToGlobal(canvas.viewport().rect().center())
            self.xdotool("mousemove", "--sync", str(centre.x()), str(centre.y()))
            self.xdotool("click", "5")
            yield from self.pause(0.5)
            yield from self.wait(lambda: not canvas.isDrawing(), "the map is drawn after zooming out", 60)
            # rest the mouse on the selected box, with map tips on, so its reasoning shows
            feat = layer.getFeature(layer.selectedFeatureIds()[0])
            iface.setActiveLayer(layer)
            if not iface.actionMapTips().isChecked():
                iface.actionMapTips().trigger()
            box = feat.geometry().boundingBox()
            inside = QgsPointXY(box.xMaximum() - box.width() * 0.1, box.yMinimum() + box.height() * 0.1)
            px = canvas.getCoordinateTransform().transform(inside)
            p = canvas.viewport().mapToGlobal(QPoint(int(px.x()), int(px.y())))
            self.xdotool("mousemove", "--sync", str(p.x() - 2), str(p.y()))
            yield from self.pause(0.2)
            self.xdotool("mousemove", "--sync", str(p.x()), str(p.y()))
            yield from self.pause(2.5)
            self.status["visible_over_canvas"] = sorted({type(w).__name__ for w in canvas.findChildren(QWidget)
                                                         if w.isVisible()})  # fmt: skip
        yield from self.wait(lambda: not iface.mapCanvas().isDrawing(), "the map is drawn", 60)
        yield from self.pause(0.5)

        # the screenshot: the whole X screen (main window, panel, map tip)
        shot = Path(self.cfg["screenshot"])
        shot.parent.mkdir(parents=True, exist_ok=True)
        pixmap = QGuiApplication.primaryScreen().grabWindow(0)
        if not pixmap.save(str(shot), "PNG"):
            raise OSError(f"could not save the screenshot to {shot}")
        self.status["screenshot"] = str(shot)
        self.status["screenshot_size"] = [pixmap.width(), pixmap.height()]

        if self.cfg.get("second_raster"):
            yield from self.run_on_second_raster(dock, raster)
        from geo_r1_qgis.settings import HISTORY_KEY, PluginSettings

        stored = PluginSettings.load()
        self.status["settings_after"] = {"engine_url": stored.engine_url, "token_file": stored.token_file}
        self.status["history_raw_lengths"] = self.raw_history_lengths(QgsSettings().value(HISTORY_KEY, []))
        self.status["final_geometry"] = self.geometry(dock)
        if self.cfg.get("project"):  # the project the next start opens
            QgsProject.instance().write(self.cfg["project"])
        self.status["ok"] = True
        self.status["step"] = "done"

    # -- steps used above ------------------------------------------------------------------------
    def type_into(self, edit, text: str, what: str, delay_ms: int):
        """Click ``edit``, select all and type ``text`` with real key events, as a user replaces a box's text."""
        self.click(edit)
        yield from self.wait(lambda: edit.hasFocus(), f"the {what} box has the keyboard focus", 20)
        self.xdotool("key", "ctrl+a")
        self.xdotool("type", "--delay", str(delay_ms), text)

    def type_expression(self, dock, text: str):
        yield from self.type_into(dock.expression_combo.lineEdit(), text, "expression", 15)
        yield from self.pause(0.2)
        shown = dock.expression_combo.currentText()
        if shown != text and shown.startswith(text):  # the box completed it from the history: Delete, as a user
            self.status.setdefault("completed_from_history", []).append(len(shown))
            self.xdotool("key", "Delete")
        yield from self.wait(
            lambda: dock.expression_combo.currentText() == text, f"the expression box reads {text!r}", 30
        )
        self.trace(dock, f"typed the expression {text[:20]!r}")

    def type_save_to(self, dock, path: str):
        yield from self.type_into(dock.output_widget.lineEdit(), path, "Save to", 10)
        yield from self.wait(lambda: dock.output_widget.filePath() == path, f"Save to reads {path!r}", 30)
        self.trace(dock, "typed Save to")

    def trace(self, dock, what: str) -> None:
        """Where the panel's contents are scrolled to after a step (which step scrolls Run out of view)."""
        bar = dock.scroll_area.horizontalScrollBar() if hasattr(dock, "scroll_area") else None
        if bar is not None:
            self.status.setdefault("h_scroll_trace", []).append([what, bar.value(), bar.maximum()])

    def click_run(self, dock, what: str) -> None:
        """Click Run. Where the panel has scrolled it (partly) out of its view, that is noted, and it is scrolled
        into view first, as a user would, so the later steps still run."""
        geometry = self.geometry(dock)
        if not geometry["run_in_view"]:
            self.status.setdefault("run_out_of_view", []).append({"before": what, "geometry": geometry})
            dock.scroll_area.ensureWidgetVisible(dock.run_button)
            QgsApplication.processEvents()
        self.click(dock.run_button)
        self.trace(dock, f"clicked Run ({what})")

    def refused_run(self, dock, what: str):
        """Click Run and wait for the panel's answer; what it says and whether anything started."""
        from geo_r1_qgis.gui.panel import RUNS

        manager = QgsApplication.taskManager()
        label = dock.status_label

        def said() -> tuple[str, str]:  # the whole message is the tooltip (the line may be shortened)
            return label.toolTip(), label.text()

        before = {"tasks": len(manager.tasks()), "runs": len(RUNS), "said": said()}
        self.click_run(dock, what)
        # no answer (the click missed Run, or nothing happened) is recorded, not raised: the test says which
        end = time.monotonic() + 30
        self.status["step"] = f"the panel answers Run ({what})"
        while said() == before["said"] and dock.task is None and time.monotonic() < end:
            yield
        answered = said() != before["said"] or dock.task is not None
        yield from self.pause(0.3)
        started = dock.task is not None
        yield from self.wait(lambda: dock.task is None, f"a started run ends ({what})", 120)
        yield from self.pause(1.0)  # the layout settles after the message
        return {
            "answered": answered,
            "message": label.toolTip() or label.text(),
            "shown": dock.status_label.text(),
            "bar": [item.text() for item in iface.messageBar().items()][-3:],
            "task_started": started,
            "tasks_added": len(manager.tasks()) - before["tasks"],
            "runs_added": len(RUNS) - before["runs"],
            "history": [dock.expression_combo.itemData(i) for i in range(dock.expression_combo.count())],
            "geometry": self.geometry(dock),
        }

    def run_on_second_raster(self, dock, lower):
        """A second raster on top of the first, a run on it: each run's boxes drawn above its own raster."""
        from geo_r1_qgis.gui.panel import AREA_LAYER, RUNS

        upper = iface.addRasterLayer(self.cfg["second_raster"], Path(self.cfg["second_raster"]).stem)
        if upper is None or not upper.isValid():
            raise RuntimeError(f"QGIS could not open {self.cfg['second_raster']}")
        dock.raster_combo.setLayer(upper)
        dock.area_combo.setCurrentIndex(dock.area_combo.findData(AREA_LAYER))
        yield from self.type_expression(dock, self.cfg["expression"])
        runs = len(RUNS)
        self.click_run(dock, "the run on the second raster")
        yield from self.wait(lambda: dock.task is not None or len(RUNS) > runs, "the run on the second raster starts",
                             30)  # fmt: skip
        yield from self.wait(lambda: dock.task is None, "the run on the second raster ends", 240)
        self.status["second_run"] = {"status": RUNS[-1].status, "message": RUNS[-1].message}
        self.note(f"second raster run ended: {RUNS[-1].status}")
        root = QgsProject.instance().layerTreeRoot()
        order = [lyr.id() for lyr in root.layerOrder()]  # render order, top first
        names = {lyr.id(): lyr.name() for lyr in QgsProject.instance().mapLayers().values()}
        self.status["render_order"] = [names.get(i, i) for i in order]
        self.status["result_layers"] = [
            {"raster": names.get(e.raster_layer_id), "layer": names.get(e.map_layer_id), "status": e.status,
             "above_its_raster": (e.map_layer_id in order and e.raster_layer_id in order
                                  and order.index(e.map_layer_id) < order.index(e.raster_layer_id))}
            for e in RUNS if e.map_layer_id
        ]  # fmt: skip
        self.status["rasters"] = [lower.name(), upper.name()]

    def geometry(self, dock) -> dict:
        """The main window, the screen and the Run button, in global (screen) pixels."""
        from qgis.PyQt.QtCore import QRect

        win = iface.mainWindow()
        screen = QGuiApplication.primaryScreen().geometry()
        button = dock.run_button
        top_left = button.mapToGlobal(QPoint(0, 0))
        run = QRect(top_left, button.size())
        viewport = getattr(dock, "scroll_area", None)
        port = None
        if viewport is not None:
            vp = viewport.viewport()
            port = QRect(vp.mapToGlobal(QPoint(0, 0)), vp.size())
        frame = win.frameGeometry()
        scroll = getattr(dock, "scroll_area", None)
        scrolled = {}
        if scroll is not None:  # what makes the panel's contents wider than its view, when they are
            body = scroll.widget()
            wide = sorted(((w.minimumSizeHint().width(), f"{type(w).__name__} {w.objectName()}".strip())
                           for w in body.findChildren(QWidget) if w.isVisible()), reverse=True)[:4]  # fmt: skip
            bar = scroll.horizontalScrollBar()
            scrolled = {"h_scroll": [bar.value(), bar.maximum()], "view_width": scroll.viewport().width(),
                        "contents_min_width": body.minimumSizeHint().width(), "widest": wide}  # fmt: skip
        return {
            **scrolled,
            "window": [frame.x(), frame.y(), frame.width(), frame.height()],
            "window_size": [win.width(), win.height()],
            "screen": [screen.x(), screen.y(), screen.width(), screen.height()],
            "run": [run.x(), run.y(), run.width(), run.height()],
            "run_visible": button.isVisible(),
            "run_on_screen": screen.contains(run),
            "run_in_view": port.contains(run) if port is not None else True,
            "dock": [dock.width(), dock.height()],
            "engine_folded": self.engine_folded(dock),
        }

    @staticmethod
    def engine_folded(dock) -> bool | None:
        group = getattr(dock, "engine_group", None)  # (a panel without an Engine section: None)
        return group.isCollapsed() if group is not None else None

    @staticmethod
    def engine_details(dock) -> dict:
        box = dock.engine_box
        group = getattr(dock, "engine_group", None)
        return {
            "details": box.details_label.text() if hasattr(box, "details_label") else box.text(),
            "state_tooltip": box.state_label.toolTip() if hasattr(box, "state_label") else "",
            "group_title": group.title() if group is not None else None,
            "group_tooltip": group.toolTip() if group is not None else None,
        }

    @staticmethod
    def raw_history_lengths(value) -> list[int]:
        if isinstance(value, str):
            value = [value]
        return [len(str(v)) for v in (value or [])]

    def _second_start(self):
        """The next QGIS start in the same profile: open the panel, report the window, the history, the engine."""
        from geo_r1_qgis.settings import HISTORY_KEY, expression_history

        win = iface.mainWindow()
        yield from self.wait(
            lambda: PLUGIN in plugins and getattr(plugins[PLUGIN], "toolbar_action", None),
            "the Geo-R1 plugin is loaded",
            120,
        )
        plugin = plugins[PLUGIN]
        if self.cfg.get("project"):
            project = QgsProject.instance()
            yield from self.wait(lambda: Path(project.fileName() or "/nonexistent") == Path(self.cfg["project"]),
                                 "the project is open", 60)  # fmt: skip
        yield from self.pause(1.0)
        self.status["window_at_start"] = [win.width(), win.height()]
        dock = plugin.dock
        self.status["panel_open_at_start"] = dock.isVisible()
        if not dock.isVisible():
            self.press_toolbar_button(plugin)
        yield from self.wait(lambda: dock.isVisible(), "the panel opens", 30)
        manager = getattr(dock.engine_box, "manager", None)
        if manager is not None:
            yield from self.wait(lambda: manager.state != "stopped", "the panel finds the running engine", 30)
            self.status["engine_state"] = manager.state
            self.status["engine_url"] = manager.url
        yield from self.pause(1.5)
        combo = dock.expression_combo
        self.status["geometry"] = self.geometry(dock)
        self.status["engine_details"] = self.engine_details(dock)
        self.status["history"] = expression_history()
        self.status["history_raw_lengths"] = self.raw_history_lengths(QgsSettings().value(HISTORY_KEY, []))
        self.status["combo_items"] = [{"text": combo.itemText(i), "data_len": len(str(combo.itemData(i) or ""))}
                                      for i in range(combo.count())]  # fmt: skip
        self.status["combo_size_hint"] = [combo.sizeHint().width(), combo.minimumSizeHint().width()]
        self.status["save_to"] = dock.output_widget.filePath()
        self.status["ok"] = True
        self.status["step"] = "done"

    def _central_result(self, top, extent):
        """The best-scored result away from the raster's edges (the first one when none is), for the picture."""
        from geo_r1_qgis.gui.panel import ROLE_FEATURE

        middle = extent.buffered(-0.2 * min(extent.width(), extent.height()))
        for i in range(top.childCount()):
            layer_id, fid = top.child(i).data(0, ROLE_FEATURE)[:2]
            feat = QgsProject.instance().mapLayer(layer_id).getFeature(fid)
            if middle.contains(feat.geometry().boundingBox().center()):
                return top.child(i)
        return top.child(0)

    def _raster(self) -> QgsMapLayer | None:
        return next((lyr for lyr in QgsProject.instance().mapLayers().values()
                     if lyr.type() == QgsMapLayer.LayerType.RasterLayer), None)  # fmt: skip

    def _message_log_tabs(self) -> dict[str, str]:
        """The Log Messages panel's tabs and their text (the plugin's load errors land in 'Python error')."""
        tabs: dict[str, str] = {}
        for tw in iface.mainWindow().findChildren(QTabWidget):
            if tw.parent() is None or type(tw.parent()).__name__ != "QgsMessageLogViewer":
                continue
            for i in range(tw.count()):
                edit = tw.widget(i).findChild(QPlainTextEdit) if not isinstance(tw.widget(i), QPlainTextEdit) \
                    else tw.widget(i)  # fmt: skip
                tabs[tw.tabText(i)] = edit.toPlainText()[-4000:] if edit is not None else ""
        return tabs

    def _finish(self) -> None:
        self.timer.stop()
        self.status["elapsed_s"] = time.monotonic() - self.t_start
        self.status["messages"] = self.messages
        root = QgsProject.instance().layerTreeRoot()
        self.status["project_layers"] = [
            {"name": lyr.name(), "provider": lyr.providerType(), "in_layer_tree": root.findLayer(lyr.id()) is not None}
            for lyr in QgsProject.instance().mapLayers().values()
        ]
        try:
            self.status["message_log_tabs"] = self._message_log_tabs()
        except Exception:
            self.status["message_log_tabs"] = {"(unreadable)": traceback.format_exc()}
        Path(self.cfg["status"]).write_text(json.dumps(self.status, indent=2, default=str))
        QgsProject.instance().setDirty(False)  # no "save the project?" question on exit
        QTimer.singleShot(200, iface.actionExit().trigger)  # Project > Exit QGIS, as a user quits
        QTimer.singleShot(15000, self._exit_blocked)

    def _exit_blocked(self) -> None:
        """Still running 15 s after Exit: keep a picture of what blocks it, then leave the event loop."""
        QGuiApplication.primaryScreen().grabWindow(0).save(str(Path(self.cfg["status"]).with_suffix(".exit.png")))
        QgsApplication.exit(3)


if not os.environ.get("GEO_R1_DESKTOP_DRIVER_LIBRARY"):  # set where another driver reuses this one's plumbing
    _geo_r1_desktop_driver = Driver(json.loads(Path(os.environ["GEO_R1_DESKTOP_CONFIG"]).read_text()))
