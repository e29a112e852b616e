"""The engine widget of the panel (``geo_r1_qgis/gui/engine_widget.py``) on a real QgsApplication.

Its engine is driven by ``EngineManager`` (tested with real engines in test_engine_process.py); here the widget's
own behaviour: known checkpoints fill the processor, states colour the line, the log view, the adapters combo,
and plain-text messages.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
qgis_core = pytest.importorskip("qgis.core", reason="PyQGIS is not importable; run under /usr/bin/python3")

pytestmark = pytest.mark.qgis


@pytest.fixture()
def widget(qgis_app, tmp_path):
    from qgis.PyQt.QtCore import QSettings

    from geo_r1_qgis.engine_control.engine_process import EngineManager
    from geo_r1_qgis.gui.engine_widget import EngineWidget
    from geo_r1_qgis.settings import PluginSettings

    qs = qgis_core.QgsSettings(str(tmp_path / "qgis.ini"), QSettings.Format.IniFormat)
    PluginSettings().with_values(engine_venv=str(tmp_path / "no-venv")).save(qs)
    manager = EngineManager(settings=qs)
    w = EngineWidget(manager=manager, settings=qs)
    yield w
    w.deleteLater()


def test_a_known_checkpoint_fills_its_processor_and_other_models_keep_it(widget):
    widget.model_combo.setEditText("Geo-R1/Geo-R1-3B-GRPO-REC-10shot")
    assert widget.processor_edit.text() == "Qwen/Qwen2.5-VL-3B-Instruct"
    widget.processor_edit.setText("/my/processor")
    widget.model_combo.setEditText("/data/my-model")
    assert widget.processor_edit.text() == "/my/processor"
    ids = [widget.model_combo.itemText(i) for i in range(widget.model_combo.count())]
    assert "Geo-R1/Geo-R1-3B-GRPO-GRES-10shot" in ids


def test_start_without_an_engine_venv_says_what_to_do_and_saves_the_fields(widget, tmp_path):
    from geo_r1_qgis.settings import PluginSettings

    widget.model_combo.setEditText("Geo-R1/Geo-R1-3B-GRPO-REC-10shot")
    widget.start()
    assert "Set up the engine" in widget.message_label.text()
    assert widget.manager.state == "stopped"  # nothing was started
    saved = PluginSettings.load(widget.qsettings)
    assert saved.engine_model == "Geo-R1/Geo-R1-3B-GRPO-REC-10shot"
    assert saved.engine_processor == "Qwen/Qwen2.5-VL-3B-Instruct"


def test_states_colour_the_line_and_a_crash_opens_the_log(widget):
    from qgis.PyQt.QtCore import Qt

    m = widget.manager
    m._append_lines(["loading <weights> ...", "Traceback: out of memory"])
    assert widget.log_view.toPlainText().endswith("Traceback: out of memory")
    assert not widget.log_toggle.isChecked()
    m._set_state("crashed", "the engine was killed (a signal) unexpectedly. Last lines:\nloading <weights> ...")
    assert widget.state_label.text() == "stopped with an error" and "#c62828" in widget.state_label.styleSheet()
    assert widget.log_toggle.isChecked() and widget.log_toggle.arrowType() == Qt.ArrowType.DownArrow
    assert "loading <weights>" in widget.message_label.text()  # plain text: the <...> part is shown
    assert widget.message_label.textFormat() == Qt.TextFormat.PlainText
    assert widget.start_button.isEnabled() and not widget.stop_button.isEnabled()
    m.state = "starting"
    widget._on_countdown(87)
    assert "87 s left" in widget.countdown_label.text()


def test_the_adapters_combo_lists_the_base_model_and_the_loaded_adapters(widget):
    widget.fill_adapters({"active": "rec", "available": {"rec": "/runs/rec", "gres": "/runs/gres"}})
    items = [(widget.adapter_combo.itemText(i), widget.adapter_combo.itemData(i))
             for i in range(widget.adapter_combo.count())]  # fmt: skip
    assert items == [("base model (no adapter)", None), ("gres", "gres"), ("rec", "rec")]
    assert widget.adapter_combo.currentText() == "rec"
    widget.fill_adapters({"active": None, "available": {"rec": "/runs/rec"}})
    assert widget.adapter_combo.currentIndex() == 0
    # with no engine, asking to switch answers with a message, not an exception
    widget._adapter_chosen(1)
    assert "no engine is running" in widget.message_label.text()


def test_download_of_a_local_directory_is_refused_plainly(widget, tmp_path):
    widget.model_combo.setEditText(str(tmp_path))
    widget.start_download()
    assert "needs no download" in widget.message_label.text()
    widget.model_combo.setEditText("Geo-R1/Geo-R1-3B-GRPO-REC-10shot")
    widget.start_download()  # the venv does not exist
    assert "not installed" in widget.message_label.text()


def test_copy_diagnostics_from_the_widget(widget):
    text = widget.copy_diagnostics()
    assert text.startswith("Geo-R1 diagnostics") and "copied" in widget.message_label.text()


def test_the_setup_button_opens_the_setup_dialog_when_present(widget, monkeypatch):
    if not (Path(__file__).resolve().parents[2] / "geo_r1_qgis" / "engine_control" / "setup" / "dialog.py").is_file():
        pytest.skip("geo_r1_qgis/engine_control/setup/dialog.py is not in this tree")
    from geo_r1_qgis.engine_control.setup import dialog

    opened: list = []
    monkeypatch.setattr(dialog.SetupDialog, "exec", lambda self: opened.append(self) or 0)
    widget.open_setup()
    assert len(opened) == 1


def test_the_engine_line_says_where_it_looks(widget):
    """Issue 16, 3.3: the line says which URL (and token file) the panel looks at, in every state."""
    from geo_r1_qgis.settings import PluginSettings

    s = PluginSettings.load(widget.qsettings)
    for state, message in (("stopped", "no engine started"), ("external", "engine 0.1 answers")):
        widget.manager._set_state(state, message)
        assert s.engine_url in widget.details_label.text(), (state, widget.details_label.text())
        assert s.engine_url in widget.state_label.toolTip() and str(s.token_path()) in widget.state_label.toolTip()


def test_messages_name_only_settings_that_exist(widget, qgis_app):
    """Issue 16, 3.7: "set the engine venv in Settings" pointed to a field the dialog did not have."""
    from qgis.PyQt import sip
    from qgis.PyQt.QtWidgets import QFormLayout, QLabel

    from geo_r1_qgis.gui.settings_dialog import SettingsDialog
    from geo_r1_qgis.settings import PluginSettings

    widget.model_combo.setEditText("Geo-R1/Geo-R1-3B-GRPO-REC-10shot")
    widget.start()  # no engine venv: the message names where to choose one
    text = widget.message_label.text()
    assert "Engine venv" in text and "Settings" in text, text
    d = SettingsDialog(settings=widget.qsettings, manager=widget.manager)
    try:
        form = d.findChild(QFormLayout)
        labels = [form.itemAt(i, QFormLayout.ItemRole.LabelRole).widget().text() for i in range(form.rowCount())
                  if form.itemAt(i, QFormLayout.ItemRole.LabelRole) is not None
                  and isinstance(form.itemAt(i, QFormLayout.ItemRole.LabelRole).widget(), QLabel)]  # fmt: skip
        assert "Engine venv" in labels, labels
        d.venv_widget.setFilePath("/opt/geo-r1-venv")
        d.accept()
        assert PluginSettings.load(widget.qsettings).engine_venv == "/opt/geo-r1-venv"
    finally:
        sip.delete(d)


def test_an_adapter_folder_that_is_not_one_is_refused_in_plain_words(widget, tmp_path):
    widget.load_adapter(str(tmp_path))  # no adapter_config.json: said before the engine is asked
    text = widget.message_label.text()
    assert "not a LoRA adapter folder" in text and "PeftModel" not in text and "->" not in text, text
