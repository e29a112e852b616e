"""Geo-R1 QGIS plugin: find objects in imagery by describing them in words.

This package runs in QGIS's own Python: PyQGIS, the standard library and numpy only. Its ``core``
subpackage is pure (no QGIS, no GDAL) and is shared with the command line.
"""


def classFactory(iface):
    """QGIS entry point: build the plugin for the given ``QgisInterface``."""
    from .plugin import GeoR1Plugin

    return GeoR1Plugin(iface)
