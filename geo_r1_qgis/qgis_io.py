"""QGIS adapters for the pure grounding loop: a raster reader and a feature-sink writer.

:class:`QgisRasterSource` implements :class:`geo_r1_qgis.core.pipeline.RasterSource` over a
``QgsRasterLayer``; :class:`FeatureSinkResultSink` implements
:class:`geo_r1_qgis.core.pipeline.ResultSink` over a ``QgsFeatureSink`` (what a Processing
algorithm's OUTPUT gives). Both mirror the command line (:mod:`engine.rasters`, :mod:`engine.gpkg`),
so the plugin and ``geo-r1 ground`` send the engine the same tiles and write the same fields.

Reading, the rules of ``engine/rasters.py``
-------------------------------------------
* **Georeferencing.** QGIS exposes no rotation (a rotated file is opened through GDAL's warped VRT,
  north up), so the transform is the north-up affine of the layer's extent and size. A layer with
  no valid CRS, or with the pixel grid GDAL reports when there is no geotransform, is
  :class:`NotGeoreferencedError`; an invalid layer :class:`RasterError`.
* **Windowed reads only.** Each tile is one ``provider.block(band, extent, w, h)`` per band, on a
  *clone* of the layer's provider (safe in Processing's worker thread, and the layer's own
  settings are left alone). At the native resolution the pixels are exactly the command line's.
  QGIS 3.22's ``block()`` only decimates (nearest neighbour; provider resampling does not apply to
  it), so a downsampled tile is read at up to ``MAX_SUPERSAMPLING`` samples per output pixel and
  axis and box-averaged over valid samples: close to GDAL's ``average``, not bit-identical. An
  upsampled tile (never asked for by Processing, whose scale is 1) is nearest neighbour where the
  command line is bilinear.
* **Bands.** ``bands`` (1-based, one or three) if given; else the bands whose colour interpretation
  is red, green and blue; else the first three non-alpha bands; a raster with fewer than three bands
  has its first band replicated into three channels.
* **8 bits.** Byte data is used as it is. Any other type is stretched linearly per band from its
  2nd to its 98th percentile to 0..255, percentiles computed **once** from one decimated
  (nearest-neighbour) read of the whole raster, at most ``overview_px`` on the longest side, over
  valid pixels only.
* **Validity.** A pixel is valid when, in every selected band, it is not the block's nodata value
  (the source nodata, or a user nodata value set on the layer), is finite, and the alpha band (if
  any, including a GDAL mask QGIS exposes as alpha) is not 0. Invalid pixels become 0; ``read``
  returns the valid fraction, so the pipeline skips tiles that are all nodata. A raster with no
  valid pixel at all is :class:`EmptyRasterError` (from the decimated read, confirmed by a full
  scan in strips).

Writing
-------
:class:`FeatureSinkResultSink` keeps per-tile detections in memory and adds one polygon feature per
final detection at :meth:`FeatureSinkResultSink.finish`. There is **no resume** in Processing: a
feature sink cannot be read back, so a canceled or failed run starts again from the first tile
(``geo-r1 ground --resume`` on the command line is the resumable path).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsFeature,
    QgsFeatureSink,
    QgsField,
    QgsFields,
    QgsGeometry,
    QgsPointXY,
    QgsRasterDataProvider,
    QgsRasterLayer,
    QgsRectangle,
)
from qgis.PyQt.QtCore import QDateTime

from .compat import (
    COLOR_ALPHA,
    COLOR_BLUE,
    COLOR_GREEN,
    COLOR_PALETTE,
    COLOR_RED,
    FAST_INSERT,
    UTC,
    WKT_PREFERRED,
    field_type,
)
from .core.errors import EmptyRasterError, NotGeoreferencedError, OutputError, RasterError
from .core.geometry import Affine, PixelBox, Tile
from .core.merge import Detection
from .core.pipeline import MapDetection, RunSummary
from .core.results import (
    OUTPUT_FIELDS,
    apply_palette,
    choose_bands,
    detection_values,
    make_run_id,
    palette_lut,
    stretch_limits,
    to_uint8,
)
from .core.results import parse_bands as _parse_bands

__all__ = [
    "FIELD_NAMES",
    "FeatureSinkResultSink",
    "QgisRasterSource",
    "make_fields",
    "make_run_id",
    "parse_bands",
]

log = logging.getLogger(__name__)

#: QGIS raster data types -> numpy dtypes (native byte order, as QgsRasterBlock stores them)
_NUMPY_TYPES = {
    Qgis.DataType.Byte: np.uint8,
    Qgis.DataType.UInt16: np.uint16,
    Qgis.DataType.Int16: np.int16,
    Qgis.DataType.UInt32: np.uint32,
    Qgis.DataType.Int32: np.int32,
    Qgis.DataType.Float32: np.float32,
    Qgis.DataType.Float64: np.float64,
}
if hasattr(Qgis.DataType, "Int8"):  # QGIS >= 3.30
    _NUMPY_TYPES[Qgis.DataType.Int8] = np.int8


#: most samples per output pixel and axis when a tile is downsampled (QGIS's block() only decimates)
MAX_SUPERSAMPLING = 4

#: rows per block of the full scan that confirms an all-nodata raster
_SCAN_ROWS = 256


def parse_bands(text: str | None) -> tuple[int, ...] | None:
    """The BANDS parameter: ``"4,3,2"`` -> ``(4, 3, 2)``; empty -> ``None`` (the automatic choice)."""
    return _parse_bands(text, option="bands")


class QgisRasterSource:
    """A ``QgsRasterLayer`` read tile by tile as 8-bit RGB (see the module docstring)."""

    def __init__(self, layer: QgsRasterLayer, bands: Sequence[int] | None = None, overview_px: int = 1024) -> None:
        if layer is None or not isinstance(layer, QgsRasterLayer) or not layer.isValid():
            name = layer.name() if isinstance(layer, QgsRasterLayer) else repr(layer)
            raise RasterError(
                f"the raster layer {name} is not valid (QGIS cannot read its source); check the file or reload it"
            )
        self.name = layer.name() or layer.source()
        provider = layer.dataProvider()
        if provider is None or not provider.isValid():
            raise RasterError(f"the raster layer {self.name} has no valid data provider; reload the layer")
        self.width, self.height = int(layer.width()), int(layer.height())
        if self.width <= 0 or self.height <= 0:
            raise RasterError(f"the raster layer {self.name} is empty ({self.width} x {self.height} pixels)")
        crs = layer.crs()
        if not crs.isValid():
            raise NotGeoreferencedError(
                f"the raster {self.name} has no CRS, so results could not be placed on a map; assign one first "
                "(Layer Properties > Source > Assigned CRS, or gdal_edit.py -a_srs EPSG:<code> on the file)"
            )
        ext = layer.extent()
        self.transform = Affine(
            ext.width() / self.width, 0.0, ext.xMinimum(), 0.0, -ext.height() / self.height, ext.yMaximum()
        )
        if self._looks_ungeoreferenced():
            raise NotGeoreferencedError(
                f"the raster {self.name} has a CRS but no geotransform (pixel size 1, origin 0,0); georeference it "
                "first (gdal_edit.py -a_ullr ulx uly lrx lry, or QGIS's Georeferencer)"
            )
        self.crs = QgsCoordinateReferenceSystem(crs)
        self.crs_wkt = crs.toWkt(WKT_PREFERRED)
        # A clone: reads from Processing's worker thread are safe, the layer's own settings untouched.
        self._provider: QgsRasterDataProvider = provider.clone()
        self.count = int(self._provider.bandCount())
        self.bands = self._choose_bands(tuple(bands) if bands else None)
        self._alpha = self._alpha_band()
        self._read_idx = sorted(set(self.bands) | ({self._alpha} if self._alpha else set()))
        self.data_types = {b: self._provider.dataType(b) for b in self._read_idx}
        self._palette = self._palette_table()
        self._stretch = self._compute_stretch(overview_px)
        if self._palette is not None:
            self._stretch = None  # colour indices are not intensities

    # -- set up ------------------------------------------------------------------------------------
    def _palette_table(self) -> np.ndarray | None:
        """The colour table of a one-band paletted raster as a lookup table, else None."""
        if set(self.bands) != {1} or self._provider.colorInterpretation(1) != COLOR_PALETTE:
            return None
        items = self._provider.colorTable(1) or []
        if not items:
            return None
        size = 256 if self.data_types[1] == Qgis.DataType.Byte else 65536
        entries = [(int(it.value), (it.color.red(), it.color.green(), it.color.blue())) for it in items]
        log.info("%s: one band of colour indices, expanded through its colour table", self.name)
        return palette_lut(entries, size=size)

    def _looks_ungeoreferenced(self) -> bool:
        # GDAL without a geotransform gives (0, 1, 0, 0, 0, 1); QGIS flips it to a pixel size of (1, -1).
        t = self.transform
        return t.c == 0.0 and t.f == 0.0 and t.a == 1.0 and abs(t.e) == 1.0

    def _choose_bands(self, bands: tuple[int, ...] | None) -> tuple[int, int, int]:
        names = {COLOR_RED: "red", COLOR_GREEN: "green", COLOR_BLUE: "blue",
                 COLOR_ALPHA: "alpha"}
        interp = [names.get(self._provider.colorInterpretation(b), "other") for b in range(1, self.count + 1)]
        return choose_bands(self.count, interp, bands, what=self.name, option="bands")

    def _alpha_band(self) -> int | None:
        for b in range(1, self.count + 1):
            if self._provider.colorInterpretation(b) == COLOR_ALPHA and b not in self.bands:
                return b
        return None

    def _map_extent(self, window: PixelBox) -> QgsRectangle:
        x1, y1 = self.transform.apply(window.x1, window.y1)
        x2, y2 = self.transform.apply(window.x2, window.y2)
        return QgsRectangle(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))

    def _read_bands(self, extent: QgsRectangle, w: int, h: int) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """``({band: (h, w) array}, valid mask)`` for every band read (selected bands and alpha)."""
        planes: dict[int, np.ndarray] = {}
        valid = np.ones((h, w), dtype=bool)
        for b in self._read_idx:
            block = self._provider.block(b, extent, w, h)
            if block is None or not block.isValid() or block.width() != w or block.height() != h:
                raise RasterError(
                    f"QGIS could not read band {b} of {self.name} over {extent.toString()}; the file is corrupt "
                    "or no longer reachable"
                )
            dtype = _NUMPY_TYPES.get(block.dataType())
            if dtype is None:
                raise RasterError(
                    f"band {b} of {self.name} has the data type {block.dataType()!r}, which Geo-R1 cannot read; "
                    "convert the raster to an integer or float type (gdal_translate -ot)"
                )
            raw = bytes(block.data())
            data = np.frombuffer(raw, dtype=dtype, count=w * h).reshape(h, w)
            if b == self._alpha:
                valid &= data > 0
                continue
            if block.hasNoDataValue():
                nodata = block.noDataValue()
                if math.isnan(nodata):
                    pass  # NaN is caught by isfinite below
                else:
                    valid &= data != np.array(nodata).astype(dtype)
            elif block.hasNoData():  # a bitmap (no nodata value fits the type): ask pixel by pixel
                valid &= ~np.array([[block.isNoData(r, c) for c in range(w)] for r in range(h)], dtype=bool)
            if data.dtype.kind == "f":
                valid &= np.isfinite(data)
            planes[b] = data
        return planes, valid

    def _overview_shape(self, overview_px: int) -> tuple[int, int]:
        f = max(1.0, max(self.width, self.height) / overview_px)
        return (max(1, round(self.height / f)), max(1, round(self.width / f)))

    def _compute_stretch(self, overview_px: int) -> list[tuple[float, float]] | None:
        """Per-band (lo, hi) from one decimated read; ``None`` for Byte data. Checks emptiness."""
        h, w = self._overview_shape(overview_px)
        full = PixelBox(0.0, 0.0, float(self.width), float(self.height))
        planes, valid = self._read_bands(self._map_extent(full), w, h)
        if not valid.any() and not self._any_valid_full_scan():
            nodata = sorted(
                {self._provider.sourceNoDataValue(b) for b in self.bands if self._provider.sourceHasNoDataValue(b)}
            )
            raise EmptyRasterError(
                f"every pixel of {self.name} is nodata (nodata={nodata or None}, {self.count} band(s)): there is "
                "nothing to look at; check the nodata value (Layer Properties > Transparency, or "
                "gdal_edit.py -unsetnodata) or the file"
            )
        if all(self.data_types[b] == Qgis.DataType.Byte for b in self.bands):
            return None
        out = []
        for b in sorted(set(self.bands)):
            out.append(stretch_limits(planes[b][valid]))  # (0, 1) if the decimated read missed every valid pixel
        log.info("%s: data stretched to 8 bits per band (2-98 %%): %s", self.name, out)
        return out

    def _any_valid_full_scan(self) -> bool:
        """Whether any pixel is valid, reading native strips (only when the overview saw none)."""
        for row in range(0, self.height, _SCAN_ROWS):
            rows = min(_SCAN_ROWS, self.height - row)
            box = PixelBox(0.0, float(row), float(self.width), float(row + rows))
            _, valid = self._read_bands(self._map_extent(box), self.width, rows)
            if valid.any():
                return True
        return False

    # -- reading ----------------------------------------------------------------------------------
    def read(self, tile: Tile) -> tuple[np.ndarray, float]:
        """The tile as an ``(h, w, 3)`` uint8 image (invalid pixels 0) and its fraction of valid pixels."""
        w, h = tile.size
        sx, sy = tile.pixel_scale
        extent = self._map_extent(tile.window)
        kx, ky = _supersampling(sx), _supersampling(sy)
        if self._palette is not None:
            kx = ky = 1  # colour indices cannot be averaged: nearest neighbour
        if kx == 1 and ky == 1:
            planes, valid = self._read_bands(extent, w, h)
        else:
            planes, valid = _box_average(*self._read_bands(extent, w * kx, h * ky), kx, ky)
        frac = float(valid.mean())
        if frac == 0.0:
            return np.zeros((h, w, 3), np.uint8), 0.0
        if self._palette is not None:
            rgb = apply_palette(planes[1].astype(np.int64), self._palette)
            rgb[~valid] = 0
            return np.ascontiguousarray(rgb), frac
        eight: dict[int, np.ndarray] = {}
        for i, b in enumerate(sorted(set(self.bands))):
            data = planes[b]
            if self._stretch is None:
                eight[b] = data.astype(np.uint8, copy=False)
                continue
            lo, hi = self._stretch[i]
            eight[b] = to_uint8(data, lo, hi)
        rgb = np.stack([eight[b] for b in self.bands], axis=-1).astype(np.uint8, copy=False)
        rgb[~valid] = 0
        return np.ascontiguousarray(rgb), frac

    # -- info ------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Raster facts for logs."""
        return {
            "name": self.name,
            "width": self.width,
            "height": self.height,
            "count": self.count,
            "bands_used": list(self.bands),
            "alpha_band": self._alpha,
            "crs": self.crs.authid() or self.crs_wkt,
            "transform": list(self.transform.to_tuple()),
            "stretch": self._stretch,
        }


def _supersampling(scale: float) -> int:
    """Samples per output pixel along one axis when downsampling (1 at native resolution or finer)."""
    if scale <= 1.0 or math.isclose(scale, 1.0):
        return 1
    return min(MAX_SUPERSAMPLING, math.ceil(scale - 1e-9))


def _box_average(
    planes: dict[int, np.ndarray], valid: np.ndarray, kx: int, ky: int
) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Average ``ky`` x ``kx`` blocks over valid samples; an output pixel is valid when any sample is."""
    h, w = valid.shape[0] // ky, valid.shape[1] // kx
    weights = valid.reshape(h, ky, w, kx).astype(np.float64)
    count = weights.sum(axis=(1, 3))
    out_valid = count > 0
    safe = np.where(out_valid, count, 1.0)
    out: dict[int, np.ndarray] = {}
    for b, data in planes.items():
        values = np.where(valid, data, 0).astype(np.float64).reshape(h, ky, w, kx)
        mean = (values * weights).sum(axis=(1, 3)) / safe
        out[b] = np.rint(mean).astype(data.dtype) if data.dtype.kind in "iu" else mean.astype(data.dtype)
    return out, out_valid


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------

#: The output fields: the same names and order as the command line's GeoPackage.
FIELD_NAMES = OUTPUT_FIELDS
_FIELD_TYPES = {"score": "Double", "presence": "Double", "created": "DateTime", "truncated": "Int"}


def make_fields() -> QgsFields:
    """The output layer's fields (see :data:`FIELD_NAMES`)."""
    fields = QgsFields()
    for name in FIELD_NAMES:
        fields.append(QgsField(name, field_type(_FIELD_TYPES.get(name, "String"))))
    return fields


class FeatureSinkResultSink:
    """A :class:`~geo_r1_qgis.core.pipeline.ResultSink` that writes the final layer to a ``QgsFeatureSink``.

    Tiles are kept in memory only (no resume in Processing, see the module docstring); the final
    polygons are added at :meth:`finish`, one feature per merged detection, in the raster's CRS.
    """

    def __init__(self, sink: QgsFeatureSink, meta: Mapping[str, str], run_id: str | None = None) -> None:
        if sink is None:
            raise OutputError("the output feature sink could not be created; choose another OUTPUT")
        self.sink = sink
        self.meta = dict(meta)
        self.run_id = run_id or make_run_id()
        self.fields = make_fields()
        self.tiles: dict[str, list[Detection]] = {}
        self.statuses: dict[str, str] = {}
        self.features_written = 0

    def done_tiles(self) -> Mapping[str, Sequence[Detection]]:
        return {}  # nothing to resume from: a feature sink cannot be read back

    def write_tile(self, tile_id: str, tile: Tile, detections: Sequence[MapDetection], status: str) -> None:
        self.tiles[tile_id] = [m.detection for m in detections]
        self.statuses[tile_id] = status

    def commit(self) -> None:
        """Nothing to make durable: tiles live in memory until :meth:`finish`."""

    def feature(self, m: MapDetection, created: QDateTime) -> QgsFeature:
        d = m.detection
        feat = QgsFeature(self.fields)
        feat.setGeometry(QgsGeometry.fromPolygonXY([[QgsPointXY(x, y) for x, y in m.ring]]))
        values = detection_values(d, self.meta, self.run_id, created)
        values["reasoning"] = values["reasoning"] or None  # NULL rather than an empty string
        feat.setAttributes([values[name] for name in FIELD_NAMES])
        return feat

    def finish(self, final: Sequence[MapDetection], summary: RunSummary) -> None:
        created = QDateTime.currentDateTimeUtc()
        created.setTimeSpec(UTC)
        features = [self.feature(m, created) for m in final]
        if features and not self.sink.addFeatures(features, FAST_INSERT):
            error = self.sink.lastError() if hasattr(self.sink, "lastError") else ""
            raise OutputError(
                f"could not write {len(features)} feature(s) to the output ({error}); choose another OUTPUT"
            )
        self.features_written = len(features)
