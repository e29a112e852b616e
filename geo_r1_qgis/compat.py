"""QGIS API differences between 3.22 and 3.40+ (and Qt5/Qt6), resolved once, in one place.

QGIS 3.36-3.40 moved many enums into ``Qgis`` (``Qgis.WkbType``, ``Qgis.ProcessingSourceType``...) and wants
``QMetaType`` field types from 3.38; 3.22 has only the old, class-scoped enums. Qt6 (QGIS 4) drops unscoped
enum access. Every constant the plugin needs is looked up here, fully scoped, newest API first, so the rest
of the plugin reads the same on every version. ``tests/geo_r1_qgis/test_qt6_readiness.py`` keeps it so.
"""

from __future__ import annotations

from typing import Any

from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsFeatureSink,
    QgsMapLayerProxyModel,
    QgsPalLayerSettings,
    QgsProcessing,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsRaster,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QMetaType, Qt, QVariant

try:  # Qt6 (QGIS 4) has QAction in QtGui only; QGIS 3.40+ has it there too, QGIS 3.22 in QtWidgets only
    from qgis.PyQt.QtGui import QAction
except ImportError:
    from qgis.PyQt.QtWidgets import QAction  # noqa: F401  (for plugin.py)

#: QGIS as an integer, e.g. 32216 or 34006
QGIS_VERSION_INT = int(Qgis.QGIS_VERSION_INT)


def _first(*candidates: Any) -> Any:
    """The first of ``(holder, "Enum", "Member")`` triples that exists."""
    for holder, enum, member in candidates:
        scope = getattr(holder, enum, None)
        if scope is not None and hasattr(scope, member):
            return getattr(scope, member)
    raise AttributeError(f"none of {[f'{h.__name__}.{e}.{m}' for h, e, m in candidates]} exists in this QGIS")


# Processing
NUMBER_INTEGER = _first((Qgis, "ProcessingNumberParameterType", "Integer"),
                        (QgsProcessingParameterNumber, "Type", "Integer"))  # fmt: skip
NUMBER_DOUBLE = _first((Qgis, "ProcessingNumberParameterType", "Double"),
                       (QgsProcessingParameterNumber, "Type", "Double"))  # fmt: skip
FILE_BEHAVIOR_FILE = _first((Qgis, "ProcessingFileParameterBehavior", "File"),
                            (QgsProcessingParameterFile, "Behavior", "File"))  # fmt: skip
SOURCE_VECTOR_POLYGON = _first((Qgis, "ProcessingSourceType", "VectorPolygon"),
                               (QgsProcessing, "SourceType", "TypeVectorPolygon"))  # fmt: skip
WKB_POLYGON = _first((Qgis, "WkbType", "Polygon"), (QgsWkbTypes, "Type", "Polygon"))
WKB_MULTIPOLYGON = _first((Qgis, "WkbType", "MultiPolygon"), (QgsWkbTypes, "Type", "MultiPolygon"))
FAST_INSERT = _first((QgsFeatureSink, "Flag", "FastInsert"), (Qgis, "FeatureSinkFlag", "FastInsert"))

# Messages
MSG_SUCCESS = Qgis.MessageLevel.Success
MSG_WARNING = Qgis.MessageLevel.Warning
MSG_INFO = Qgis.MessageLevel.Info

# Rasters
COLOR_RED = _first((Qgis, "RasterColorInterpretation", "RedBand"), (QgsRaster, "ColorInterpretation", "RedBand"))
COLOR_GREEN = _first((Qgis, "RasterColorInterpretation", "GreenBand"),
                     (QgsRaster, "ColorInterpretation", "GreenBand"))  # fmt: skip
COLOR_BLUE = _first((Qgis, "RasterColorInterpretation", "BlueBand"), (QgsRaster, "ColorInterpretation", "BlueBand"))
COLOR_ALPHA = _first((Qgis, "RasterColorInterpretation", "AlphaBand"),
                     (QgsRaster, "ColorInterpretation", "AlphaBand"))  # fmt: skip
COLOR_PALETTE = _first((Qgis, "RasterColorInterpretation", "PaletteIndex"),
                       (QgsRaster, "ColorInterpretation", "PaletteIndex"))  # fmt: skip
WKT_PREFERRED = _first((Qgis, "CrsWktVariant", "Preferred"),
                       (QgsCoordinateReferenceSystem, "WktVariant", "WKT_PREFERRED"))  # fmt: skip

# Qt
UTC = Qt.TimeSpec.UTC

#: QgsField types: QMetaType from QGIS 3.38 (QVariant types are deprecated there), QVariant before.
_USE_METATYPE = QGIS_VERSION_INT >= 33800


def field_type(name: str) -> Any:
    """``"Double"``, ``"Int"``, ``"String"``, ``"DateTime"`` as the QgsField type this QGIS wants."""
    if _USE_METATYPE:
        return getattr(QMetaType.Type, _METATYPE_NAMES.get(name, name))
    return getattr(QVariant, name)


#: QVariant's names where QMetaType's differ
_METATYPE_NAMES = {"String": "QString", "DateTime": "QDateTime"}

# Labelling: polygon labels on the perimeter (Qgis.LabelPlacement from 3.26)
LABEL_PLACEMENT_PERIMETER = _first((Qgis, "LabelPlacement", "Line"), (QgsPalLayerSettings, "Placement", "Line"))

# Layer pickers (Qgis.LayerFilter from 3.34)
LAYER_FILTER_RASTER = _first((Qgis, "LayerFilter", "RasterLayer"), (QgsMapLayerProxyModel, "Filter", "RasterLayer"))
LAYER_FILTER_POLYGON = _first((Qgis, "LayerFilter", "PolygonLayer"),
                              (QgsMapLayerProxyModel, "Filter", "PolygonLayer"))  # fmt: skip
GEOMETRY_POLYGON = _first((Qgis, "GeometryType", "Polygon"), (QgsWkbTypes, "GeometryType", "PolygonGeometry"))
RIGHT_DOCK = Qt.DockWidgetArea.RightDockWidgetArea
