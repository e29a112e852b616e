"""QGIS I/O: rasters and web layers read into tiles, areas, the results GeoPackage through OGR, the
annotation layer, the results layer style."""
