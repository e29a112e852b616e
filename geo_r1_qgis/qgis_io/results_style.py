"""How a Geo-R1 result layer looks and reads in QGIS: outline-only boxes coloured by score, score labels,
an HTML map tip with the reasoning, a multi-line form widget, and scores shown rounded.

Used by the panel for every layer it adds (the live per-tile layer and the final answer layer). Nothing
here changes the data: scores are stored as the engine gave them and only *shown* to two decimals (a
field format).
"""

from __future__ import annotations

import html

from qgis.core import (
    QgsEditorWidgetSetup,
    QgsFillSymbol,
    QgsGraduatedSymbolRenderer,
    QgsPalLayerSettings,
    QgsRendererRange,
    QgsSimpleLineSymbolLayer,
    QgsTextBufferSettings,
    QgsTextFormat,
    QgsVectorLayer,
    QgsVectorLayerSimpleLabeling,
)
from qgis.PyQt.QtGui import QColor

from ..compat import LABEL_PLACEMENT_PERIMETER

#: (lower, upper, colour, legend label): red for weak, amber, yellow-green, green for strong
SCORE_CLASSES = (
    (0.0, 0.25, "#d7191c", "score < 0.25"),
    (0.25, 0.5, "#fdae61", "0.25 – 0.50"),
    (0.5, 0.75, "#a6d96a", "0.50 – 0.75"),
    (0.75, 1.0000001, "#1a9641", "≥ 0.75"),
)
OUTLINE_WIDTH_MM = 0.7
#: the label: the score to two decimals, then the first words of the model's label when it gave one
LABEL_EXPRESSION = (
    'format_number("score", 2) || '
    "if(coalesce(\"label\", '') = '', '', ' ' || left(\"label\", 24) || if(length(\"label\") > 24, '…', ''))"
)
_ESCAPE = "map('&', '&amp;', '<', '&lt;', '>', '&gt;')"  # QVariantMap is key-ordered: '&' goes first


def _escaped(field: str) -> str:
    return f"[% replace(coalesce(\"{field}\", ''), {_ESCAPE}) %]"


#: The map tip: HTML, wrapped, every model-written value escaped by the expression engine.
MAP_TIP_TEMPLATE = (
    '<div style="min-width: 20em; max-width: 32em; white-space: pre-wrap; word-wrap: break-word;">'
    '<b>[% format_number("score", 2) %]</b> ' + _escaped("label") + "<br/>"
    "<i>"
    + _escaped("expression")
    + "</i> ("
    + _escaped("mode")
    + ")<br/>"
    + _escaped("reasoning")
    + "<br/><small>tile "
    + _escaped("tile_id")
    + ' · presence [% format_number("presence", 2) %]</small>'
    "</div>"
)


def score_renderer() -> QgsGraduatedSymbolRenderer:
    ranges = []
    for lower, upper, colour, label in SCORE_CLASSES:
        # An outline symbol layer, not a fill without brush: QGIS paints a *selected* fill solid in the
        # selection colour, which would hide the very object the user clicked; a selected outline stays an outline.
        outline = QgsSimpleLineSymbolLayer.create(
            {"line_color": colour, "line_width": str(OUTLINE_WIDTH_MM), "line_width_unit": "MM", "joinstyle": "miter"}
        )
        symbol = QgsFillSymbol.createSimple({})
        symbol.changeSymbolLayer(0, outline)  # the symbol owns it from here
        ranges.append(QgsRendererRange(lower, upper, symbol, label))
    return QgsGraduatedSymbolRenderer("score", ranges)


def score_labeling() -> QgsVectorLayerSimpleLabeling:
    settings = QgsPalLayerSettings()
    settings.fieldName = LABEL_EXPRESSION
    settings.isExpression = True
    settings.placement = LABEL_PLACEMENT_PERIMETER  # on the box's outline, not over the object
    fmt = QgsTextFormat()
    fmt.setSize(9)
    fmt.setColor(QColor("#111111"))
    buffer = QgsTextBufferSettings()
    buffer.setEnabled(True)
    buffer.setSize(1.0)
    buffer.setColor(QColor("#ffffff"))
    fmt.setBuffer(buffer)
    settings.setFormat(fmt)
    return QgsVectorLayerSimpleLabeling(settings)


def style_result_layer(layer: QgsVectorLayer, tile_note: str = "") -> None:
    """Apply the Geo-R1 look to ``layer`` (a layer with the results fields) and repaint it."""
    layer.setRenderer(score_renderer())
    layer.setLabeling(score_labeling())
    layer.setLabelsEnabled(True)
    layer.setMapTipTemplate(MAP_TIP_TEMPLATE)
    if hasattr(layer, "setMapTipsEnabled"):  # QGIS >= 3.32; before, map tips are always on
        layer.setMapTipsEnabled(True)
    layer.setDisplayExpression("format_number(\"score\", 2) || ' ' || coalesce(\"label\", '')")
    fields = layer.fields()
    for name in ("score", "presence"):
        idx = fields.indexOf(name)
        if idx >= 0:
            layer.setEditorWidgetSetup(
                idx, QgsEditorWidgetSetup("Range", {"Precision": 2, "Min": 0.0, "Max": 1.0, "Step": 0.01})
            )
    idx = fields.indexOf("reasoning")
    if idx >= 0:
        layer.setEditorWidgetSetup(idx, QgsEditorWidgetSetup("TextEdit", {"IsMultiline": True, "UseHtml": False}))
        layer.setFieldAlias(idx, "Reasoning (about the whole tile)")
    idx = fields.indexOf("tile_id")
    if idx >= 0:
        layer.setFieldAlias(idx, tile_note or "Tile (outlined on the map when selected)")
    # Every label above its field: a column of labels (the long aliases above, and QGIS's ~420 px minimum for a
    # text field) made the form wider than its dialog, so the score and presence (right-aligned spin boxes) sat
    # past the dialog's right edge and looked empty until the window was widened.
    form = layer.editFormConfig()
    for idx in range(fields.count()):
        form.setLabelOnTop(idx, True)
    layer.setEditFormConfig(form)
    layer.triggerRepaint()


def first_line(text: str | None, limit: int = 90) -> str:
    """The first line of the reasoning, shortened for a list entry (plain text)."""
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def html_text(text: str) -> str:
    """Model or user text for a rich-text Qt widget: escaped, newlines kept."""
    return html.escape(text or "").replace("\n", "<br/>")
