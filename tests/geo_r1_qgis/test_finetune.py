"""Fine-tuning from the Geo-R1 panel, in a real QgsApplication, against a real engine process.

The plot widget is drawn into an image and its pixels read back; the Fine-tune section refuses, with a
sentence and before anything starts, a missing or wrong annotation file and an engine that does not answer.
Against the engine (the tiny format-trained model, with its jobs API): a short GRPO job started from the panel
on an annotation GeoPackage of the sample scene is watched to its end (the plot gains points, the state reaches
done, the metrics table fills), "Use this adapter" makes it the engine's active adapter and the next grounding
run's GeoPackage records it; a second job is cancelled from the panel while it trains, resumed and cancelled
again; a new panel takes the watched job up again and lists the engine's jobs; an engine's refusal is shown as
its detail. QGIS's Python only; the engine is the project's venv.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import sqlite3
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
qgis_core = pytest.importorskip("qgis.core", reason="PyQGIS is not importable; run under /usr/bin/python3")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _real_engine as rx  # noqa: E402  (the real-engine helpers the plugin tests share)
from _real_engine import spin  # noqa: E402

pytestmark = pytest.mark.qgis

from qgis.core import QgsProject  # noqa: E402

#: training steps of the short job (the engine's tiny model trains a step in about a second)
SHORT_STEPS = int(os.environ.get("GEO_R1_FINETUNE_STEPS", "3"))  # more for the screenshot's curve


def _settings(**values):
    """Change these settings, keep the others (the watched job among them, as a user's QGIS does)."""
    from geo_r1_qgis.settings import PluginSettings

    PluginSettings.load().with_values(**values).save()


# --------------------------------------------------------------------------------------------------
# The plot and the refusals: no engine needed
# --------------------------------------------------------------------------------------------------


def _colour_pixels(image, rgb, tolerance=40) -> int:
    """How many pixels of ``image`` are within ``tolerance`` of the colour ``rgb``."""
    n = 0
    for y in range(0, image.height(), 1):
        for x in range(0, image.width(), 1):
            c = image.pixelColor(x, y)
            if abs(c.red() - rgb[0]) + abs(c.green() - rgb[1]) + abs(c.blue() - rgb[2]) <= tolerance:
                n += 1
    return n


def test_the_plot_draws_each_curve_in_its_colour_with_axes_and_its_last_value(qgis_app):
    from geo_r1_qgis.core.finetune import CURVES
    from geo_r1_qgis.gui.curve_plot import CurvePlot

    plot = CurvePlot()
    colours = {key: rgb for key, _label, rgb in CURVES}
    empty = plot.render_image(320, 180)
    assert all(_colour_pixels(empty, rgb) == 0 for rgb in colours.values())
    dark = _colour_pixels(empty, (0, 0, 0), tolerance=150)
    assert dark > 200, "the axes and the 'no training steps yet' text are drawn"
    plot.set_curves({"step": [1, 2, 3, 4], "reward": [0.1, 0.3, 0.2, 0.6], "format": [1.0, 1.0, 1.0, 1.0],
                     "iou": [None, 0.1, 0.2, 0.35], "loss": [1, 1, 1, 1]})  # fmt: skip
    assert plot.point_count() == 11
    assert plot.last_values() == {"reward": 0.6, "format": 1.0, "iou": 0.35}
    image = plot.render_image(320, 180)
    for key, rgb in colours.items():
        assert _colour_pixels(image, rgb) > 30, f"the {key} curve (and its legend swatch) is drawn"
    # the reward curve rises to its last value: its last dot is higher (smaller y) than its first
    frame = plot.frame(320, 180)
    (_, first_y), (_, last_y) = frame.to_pixel(1, 0.1), frame.to_pixel(4, 0.6)
    assert last_y < first_y
    c = image.pixelColor(round(frame.to_pixel(4, 0.6)[0]), round(last_y))
    assert abs(c.red() - colours["reward"][0]) + abs(c.blue() - colours["reward"][2]) < 60
    plot.deleteLater()


@pytest.fixture
def widget(qgis_app, isolated_settings, tmp_path):
    from geo_r1_qgis.engine_control.engine_process import EngineManager
    from geo_r1_qgis.gui.finetune_widget import FinetuneWidget

    manager = EngineManager()
    w = FinetuneWidget(manager)
    yield w
    if w.watcher is not None:
        w.watcher.stop()
    w.deleteLater()
    manager.deleteLater()
    gc.collect()


def test_no_annotation_file_or_a_wrong_one_is_refused_before_anything_starts(widget, tmp_path):
    from geo_r1_qgis.settings import PluginSettings

    _settings(engine_url=f"http://127.0.0.1:{rx.free_port()}", token_file=str(tmp_path / "none.token"))
    widget.set_annotation_file("")
    widget.start_finetune()
    assert widget.message_label.text().startswith("Choose the annotation GeoPackage")
    widget.set_annotation_file(tmp_path / "missing.gpkg")
    widget.start_finetune()
    assert "does not exist" in widget.message_label.text()
    text_file = tmp_path / "boxes.csv"
    text_file.write_text("x")
    widget.set_annotation_file(text_file)
    widget.start_finetune()
    assert "is not a GeoPackage" in widget.message_label.text()
    assert widget.watcher is None and widget.finetune_button.isEnabled()
    assert PluginSettings.load().finetune_job == ""


def test_no_engine_is_refused_with_where_the_panel_looked(widget, tmp_path):
    port = rx.free_port()
    token = tmp_path / "engine.token"
    token.write_text("x" * 32)
    _settings(engine_url=f"http://127.0.0.1:{port}", token_file=str(token))
    gpkg = tmp_path / "boxes.gpkg"
    gpkg.write_bytes(b"SQLite format 3\x00")
    widget.set_annotation_file(gpkg)
    widget.start_finetune()
    assert spin(lambda: widget.finetune_button.isEnabled(), 20)
    text = widget.message_label.text()
    assert f"no Geo-R1 engine answers at http://127.0.0.1:{port}" in text and "Start" in text, text
    assert widget.watcher is None and "HTTP" not in text


# --------------------------------------------------------------------------------------------------
# Against a real engine with the jobs API
# --------------------------------------------------------------------------------------------------


def _request(eng, method: str, path: str, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(eng.url + path, data=data, method=method,
                                 headers={"Authorization": f"Bearer {eng.token}",
                                          "Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # nosec B310 (our own loopback URL)
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    rx.need_venv()
    work = tmp_path_factory.mktemp("finetune-engine")
    eng = rx.Engine(work, rx.tiny_format_model(), extra=("--jobs-dir", str(work / "jobs")))
    status, _ = _request(eng, "GET", "/jobs")
    if status == 404:
        eng.stop()
        pytest.skip("the engine has no GET /jobs route yet (the jobs API, engine/jobs and engine/server routes, "
                    "has not landed)")  # fmt: skip
    if not eng.info.get("training"):
        eng.stop()
        pytest.skip("the engine venv lacks the training extras (/info training false): pip install 'geo-r1[train]'")
    yield eng
    eng.stop()
    for pid_file in (work / "jobs").glob("*/pid"):  # a job's process outlives its engine: end what these started
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text())
            if str(pid_file.parent).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.killpg(pid, signal.SIGKILL)


_ANNOTATIONS_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import shapely
    from geo_r1_qgis.core.annotations import Annotation
    from train.dataset import write_annotations
    from train.sample_data import SampleDataConfig, write_samples

    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    items = []
    for seed, split in ((3, "train"), (4, "val")):  # the tanks of one scene to train on, of another to evaluate
        scene = root / f"scene{seed}"
        write_samples(SampleDataConfig(out_dir=scene, seed=seed, size=256))
        truth = json.loads((scene / "utm.objects.geojson").read_text())
        for f in truth["features"]:
            if f["properties"]["category"] == "tank":
                ann = Annotation(expression="storage tank", raster=str(scene / "utm.tif"), split=split,
                                 created="2025-01-01T00:00:00+00:00")
                items.append((ann, shapely.Polygon(f["geometry"]["coordinates"][0])))
    write_annotations(out, items, "EPSG:32614")
    print(len(items))
""")
#: a few tiny GRPO steps (1 prompt x 4 completions of at most 32 tokens, a small LoRA), as tests/engine's jobs use
FAST = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "num_generations": 4,
        "max_completion_length": 32, "lora_r": 8, "lora_alpha": 16, "save_steps": 1}  # fmt: skip
CHIP = 112


@pytest.fixture(scope="module")
def annotations(tmp_path_factory) -> Path:
    """Two sample scenes' tanks as an annotation GeoPackage (train/dataset.py's writer, in the venv): one scene's
    to train on, the other's held out; its rasters lie beside it (scene3/utm.tif, scene4/utm.tif)."""
    rx.need_venv()
    root = tmp_path_factory.mktemp("finetune-annotations")
    out = root / "tanks.gpkg"
    script = root / "write.py"
    script.write_text(_ANNOTATIONS_SCRIPT, encoding="utf-8")
    proc = rx.host_exec.run([str(rx.VENV_BIN / "python"), str(script), str(root), str(out)], timeout=120,
                            env={**rx.venv_env(), "PYTHONPATH": str(rx.REPO)})  # fmt: skip
    assert proc.returncode == 0 and int(proc.stdout.split()[-1]) >= 2, proc.stderr
    return out


@pytest.fixture(scope="module")
def canvas(qgis_app):
    from qgis.gui import QgsMapCanvas

    c = QgsMapCanvas()
    c.resize(600, 400)
    c.show()
    yield c
    c.hide()


@pytest.fixture
def dock(qgis_app, isolated_settings, canvas, engine, tmp_path):
    from geo_r1_qgis.gui.panel import RUNS, GeoR1Dock

    _settings(engine_url=engine.url, token_file=str(engine.token_file), output_gpkg=str(tmp_path / "results.gpkg"))
    d = GeoR1Dock(None, canvas=canvas)
    manager = d.engine_box.manager
    manager.probe_external()  # what showing the panel does: the engine at the settings' URL is found
    assert spin(lambda: manager.state == "external" and bool(manager.info), 30), manager.message
    yield d
    if d.task is not None:
        d.task.cancel()
        spin(lambda: d.task is None, 30)
    if d.finetune.watcher is not None:
        d.finetune.watcher.stop()
    RUNS.clear()
    QgsProject.instance().removeAllMapLayers()
    d.deleteLater()
    gc.collect()


def _start(dock, annotations, steps: int, name: str) -> dict:
    ft = dock.finetune
    assert spin(lambda: ft.watcher is None or not ft.watcher.active, 30), "the job taken up again is read first"
    dock.set_annotation_file(annotations)
    assert not dock.finetune_group.isCollapsed()
    ft.recipe_combo.setCurrentIndex(ft.recipe_combo.findData("grpo"))
    ft.budget_unit.setCurrentIndex(ft.budget_unit.findData("steps"))
    ft.budget_spin.setValue(steps)
    ft.name_edit.setText(name)
    ft.chip_spin.setValue(CHIP)
    ft.training_options = dict(FAST)
    ft.eval_max_new_tokens = 32
    started: list[dict] = []
    ft.jobStarted.connect(started.append)
    ft.finetune_button.click()
    assert spin(lambda: bool(started) or ft.finetune_button.isEnabled(), 60), ft.message_label.text()
    assert started, f"the job did not start: {ft.message_label.text()}"
    return started[0]


def test_a_short_grpo_job_is_watched_to_its_end_and_its_adapter_used_by_the_next_run(dock, engine, annotations):
    from geo_r1_qgis.settings import PluginSettings

    ft = dock.finetune
    job = _start(dock, annotations, SHORT_STEPS, "tanks grpo")
    assert PluginSettings.load().finetune_job == job["id"]
    assert ft.cancel_button.isEnabled() and not ft.finetune_button.isEnabled()
    seen_points: list[int] = []
    states: list[str] = []

    def watch() -> bool:
        seen_points.append(ft.plot.point_count())
        states.append(ft.record.get("state", ""))
        return ft.record.get("state") in ("done", "failed", "cancelled")

    assert spin(watch, 900, step=0.1), f"the job did not end: {ft.state_label.text()}\n{engine.log_tail()}"
    assert ft.record["state"] == "done", f"{ft.record.get('error')}\n" + "\n".join(ft.record.get("log_tail") or [])
    assert max(seen_points) > 0 and ft.plot.point_count() > 0, "the plot gained points"
    assert ft.progress.value() == 100 and "done" in ft.state_label.text()
    assert "done" in ft.jobs_combo.currentText(), ft.jobs_combo.currentText()  # Earlier jobs follows the job
    assert "training" in states or "evaluating" in states
    # the metrics table: Geo-R1's names, base against adapter
    rows = [[ft.metrics_table.item(r, c).text() for c in range(3)] for r in range(ft.metrics_table.rowCount())]
    assert rows and rows[0][0] in ("Acc@0.5", "mIoU", "mAP", "AP50"), rows
    assert all(row[1] and row[2] for row in rows)
    assert ft.report_button.isEnabled() == bool(ft.record.get("report"))
    assert ft.log_view.toPlainText().strip(), "the log tail is shown"
    shot = os.environ.get("GEO_R1_FINETUNE_SCREENSHOT")  # the README's picture (make finetune-screenshot)
    if shot:
        dock.finetune_group.grab().save(shot)
    # Use this adapter: loaded and made active on the engine; the engine section's list shows it chosen
    activated: list[str] = []
    ft.adapterActivated.connect(activated.append)
    assert ft.use_button.isEnabled()
    ft.use_button.click()
    assert spin(lambda: bool(activated), 120), ft.message_label.text()
    name = activated[0]
    status, adapters = _request(engine, "GET", "/adapters")
    assert status == 200 and adapters["active"] == name
    assert Path(adapters["available"][name]).resolve() == Path(ft.record["adapter"]).resolve()
    combo = dock.engine_box.adapter_combo
    assert combo.currentData() == name
    if (Path(ft.record["adapter"]) / "geo_r1_adapter.json").is_file():  # its metrics, from its manifest
        assert combo.currentText().startswith(f"{name}: "), combo.currentText()
    # a grounding run after it records the adapter: in its parameters and on every feature
    raster = qgis_core.QgsRasterLayer(str(annotations.parent / "scene4" / "utm.tif"), "utm")
    assert raster.isValid()
    QgsProject.instance().addMapLayer(raster)
    dock.raster_combo.setLayer(raster)
    dock.expression_combo.setEditText("all storage tanks")
    dock.area_combo.setCurrentIndex(1)  # the whole raster layer
    dock.tile_spin.setValue(CHIP)
    dock.overlap_spin.setValue(16)
    entry = dock.start_run()
    assert entry is not None, dock.status_label.toolTip()
    assert spin(lambda: entry.status != "running", 300), dock.status_label.toolTip()
    assert entry.status == "done", entry.message
    with sqlite3.connect(entry.output) as con:
        params = json.loads(con.execute("SELECT parameters FROM geo_r1_runs WHERE run_id = ?",
                                        (entry.run_id,)).fetchone()[0])  # fmt: skip
        adapters_on_features = {r[0] for r in con.execute(f'SELECT adapter FROM "{entry.layer}_tiles_raw"')}
    assert params["adapter"] == name
    assert adapters_on_features <= {name}
    # back to the base model for the other tests
    assert _request(engine, "POST", "/adapters/active", {"name": None})[0] == 200


def test_a_job_is_cancelled_from_the_panel_while_it_trains(dock, engine, annotations):
    ft = dock.finetune
    _start(dock, annotations, 500, "to cancel")
    assert spin(lambda: ft.record.get("state") == "training" and (ft.record.get("step") or 0) >= 1, 600), \
        ft.state_label.text()  # fmt: skip
    ft.cancel_button.click()
    assert spin(lambda: ft.record.get("state") in ("cancelled", "done", "failed"), 300), ft.state_label.text()
    assert ft.record["state"] == "cancelled", ft.record.get("error")
    assert (ft.record.get("step") or 0) < 500
    assert not ft.use_button.isEnabled() and ft.finetune_button.isEnabled() and not ft.cancel_button.isEnabled()
    assert "cancelled" in ft.message_label.text()
    # Resume: it goes on from its checkpoint, watched again; then it is cancelled once more
    stopped_at = ft.record["step"]
    assert ft.resume_button.isEnabled() == bool(ft.record.get("resumable")) and ft.resume_button.isEnabled()
    ft.resume_button.click()

    def going_on() -> bool:
        resumed = ft.record.get("state") == "training" and (ft.record.get("step") or 0) > stopped_at
        gave_up = not ft._starting and (ft.record.get("state") in ("failed", "done") or not ft.watcher.active)
        return resumed or gave_up

    assert spin(going_on, 600), ft.state_label.text()
    assert ft.record["state"] == "training", (ft.message_label.text(), ft.record.get("error"),
                                              ft.record.get("log_tail"))  # fmt: skip
    assert ft.cancel_button.isEnabled() and not ft.resume_button.isEnabled()
    ft.cancel_button.click()
    assert spin(lambda: ft.record.get("state") in ("cancelled", "done", "failed"), 300), ft.state_label.text()
    assert ft.record["state"] == "cancelled" and ft.record["step"] > stopped_at


def test_a_new_panel_takes_the_job_up_again_and_lists_earlier_jobs(dock, engine, canvas):
    from geo_r1_qgis.gui.panel import GeoR1Dock
    from geo_r1_qgis.settings import PluginSettings

    job_id = PluginSettings.load().finetune_job
    assert job_id, "an earlier test started a job"
    again = GeoR1Dock(None, canvas=canvas)
    try:
        ft = again.finetune
        assert ft.watcher is not None and ft.watcher.job_id == job_id
        assert not again.finetune_group.isCollapsed()
        assert spin(lambda: ft.record.get("id") == job_id, 30), ft.message_label.text()
        assert spin(lambda: ft.jobs_combo.count() >= 2, 30), "the section lists the engine's jobs when it is built"
        ft.jobs_combo.clear()
        ft.refresh_jobs_button.click()
        assert spin(lambda: ft.jobs_combo.count() >= 2, 30), ft.message_label.text()
        ids = [ft.jobs_combo.itemData(i) for i in range(ft.jobs_combo.count())]
        assert job_id in ids and ft.jobs_combo.currentData() == job_id
        other = next(i for i in ids if i != job_id)
        ft._job_chosen(ids.index(other))
        assert spin(lambda: ft.record.get("id") == other, 30)
        assert PluginSettings.load().finetune_job == other
    finally:
        if again.finetune.watcher is not None:
            again.finetune.watcher.stop()
        again.deleteLater()
        gc.collect()


def test_the_engines_refusal_is_shown_as_its_detail(dock, engine, tmp_path):
    from geo_r1_qgis.settings import PluginSettings

    ft = dock.finetune
    assert spin(lambda: ft.watcher is None or not ft.watcher.active, 30)
    watched = PluginSettings.load().finetune_job
    not_annotations = tmp_path / "empty.gpkg"
    not_annotations.write_bytes(b"SQLite format 3\x00" + bytes(100))
    dock.set_annotation_file(not_annotations)
    ft.budget_unit.setCurrentIndex(ft.budget_unit.findData("steps"))
    ft.budget_spin.setValue(2)
    ft.finetune_button.click()
    assert spin(lambda: ft.finetune_button.isEnabled() and "failed" in ft.message_label.text(), 60), \
        ft.message_label.text()  # fmt: skip
    text = ft.message_label.text()
    assert text.startswith("Starting the fine-tune failed: ") and "HTTP" not in text and "{" not in text, text
    assert PluginSettings.load().finetune_job == watched, "nothing was started"
    assert ft.watcher is None or not ft.watcher.active


def test_an_engine_without_the_training_tools_is_refused_with_the_fix(qgis_app, isolated_settings, annotations,
                                                                      tmp_path, monkeypatch):  # fmt: skip
    from geo_r1_qgis.engine_control.engine_process import EngineManager
    from geo_r1_qgis.gui.finetune_widget import FinetuneWidget

    hidden = tmp_path / "hide-trl" / "trl"  # an engine venv without the training extras: trl does not import
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('No module named trl (hidden by the test)')\n")
    plain_env = rx.venv_env
    monkeypatch.setattr(rx, "venv_env", lambda: {**plain_env(), "PYTHONPATH": str(hidden.parent)})
    eng = rx.Engine(tmp_path, rx.tiny_format_model(), extra=("--jobs-dir", str(tmp_path / "jobs")))
    manager = widget = None
    try:
        assert eng.info.get("training") is False, eng.info
        _settings(engine_url=eng.url, token_file=str(eng.token_file), finetune_job="")
        manager = EngineManager()
        widget = FinetuneWidget(manager)
        widget.set_annotation_file(annotations)
        widget.budget_spin.setValue(2)
        widget.finetune_button.click()
        assert spin(lambda: widget.finetune_button.isEnabled() and "training tools" in widget.message_label.text(),
                    90), widget.message_label.text()  # fmt: skip
        text = widget.message_label.text()
        assert "geo-r1[train]" in text and "Set up the training tools" in text and "HTTP" not in text, text
        assert not widget.setup_button.isHidden(), "the installer is offered"
        assert widget.watcher is None
        status, listed = _request(eng, "GET", "/jobs")
        assert status == 200 and listed["jobs"] == [], "nothing was started"
    finally:
        if widget is not None:
            widget.deleteLater()
        if manager is not None:
            manager.deleteLater()
        eng.stop()
        gc.collect()
