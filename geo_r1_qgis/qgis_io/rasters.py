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
* **Web layers** (XYZ, WMS, WMTS: QGIS's ``wms`` provider, and any provider with no pixel size of its
  own, ``width() == height() == 0``) are read through their provider at a chosen resolution, as
  Deepness does: the pixel grid is *defined* by the area asked for (canvas extent, drawn rectangle or
  the polygons' bounding box) and the ground resolution, north up in the layer's CRS (``grid=`` of
  :class:`QgisRasterSource`; :func:`prepare_input` builds it). The provider renders each tile at the
  requested size (it picks the zoom level itself). Their single band of ``ARGB32`` colour is decoded
  to RGB (premultiplied colour un-premultiplied); alpha 0 is invalid. Without a resolution the
  default is the layer's finest native resolution (its deepest zoom level, from
  ``nativeResolutions()``); a web layer that reports none needs one.
* **Ground resolution** (metres per pixel, :func:`scale_for_resolution`): metres are converted to the
  CRS's units, as ``geo-r1 ground --gsd`` does: with the CRS's linear unit for a projected CRS (so in
  Web Mercator a metre is a Mercator metre, larger than a ground metre away from the equator), and
  for a geographic CRS (degrees) with the WGS 84 degrees per metre at the centre latitude of the
  raster (:func:`~geo_r1_qgis.core.geometry.degrees_per_metre`).
* **Windowed reads only.** Each tile is one ``provider.block(band, extent, w, h)`` per band, on a
  *clone* of the layer's provider (safe in Processing's worker thread, and the layer's own
  settings are left alone). At the native resolution the pixels are exactly the command line's.
  QGIS 3.22's ``block()`` only decimates (nearest neighbour; provider resampling does not apply to
  it), so a downsampled tile is read at up to ``MAX_SUPERSAMPLING`` samples per output pixel and
  axis and box-averaged over valid samples: close to GDAL's ``average``, not bit-identical (exact
  for a whole-number scale up to 4, e.g. 0.3 m read from 0.1 m). An upsampled tile (a ground
  resolution finer than the raster's) is nearest neighbour where the command line is bilinear.
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
from dataclasses import dataclass
from typing import Any

import numpy as np
from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsCoordinateTransformContext,
    QgsFeature,
    QgsFeatureSink,
    QgsField,
    QgsFields,
    QgsGeometry,
    QgsMapLayer,
    QgsPointXY,
    QgsProject,
    QgsRasterDataProvider,
    QgsRasterLayer,
    QgsRectangle,
    QgsUnitTypes,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QDateTime

from ..compat import (
    COLOR_ALPHA,
    COLOR_BLUE,
    COLOR_GREEN,
    COLOR_PALETTE,
    COLOR_RED,
    FAST_INSERT,
    UTC,
    WKT_PREFERRED,
    _first,
    field_type,
)
from ..core.area import AreaPolygon
from ..core.errors import ConfigError, EmptyRasterError, ExtentError, NotGeoreferencedError, OutputError, RasterError
from ..core.geometry import Affine, PixelBox, Tile, degrees_per_metre, gsd_to_scale, window_from_map_bbox
from ..core.merge import Detection
from ..core.outline import multipolygon_to_wkb
from ..core.pipeline import MapDetection, RunSummary
from ..core.results import (
    OUTPUT_FIELDS,
    apply_palette,
    choose_bands,
    detection_values,
    make_run_id,
    palette_lut,
    stretch_limits,
    to_uint8,
)
from ..core.results import parse_bands as _parse_bands

__all__ = [
    "FIELD_NAMES",
    "FeatureSinkResultSink",
    "MapArea",
    "QgisRasterSource",
    "RasterInput",
    "area_from_selection",
    "choosable_bands",
    "features_area",
    "is_web_layer",
    "make_fields",
    "make_run_id",
    "parse_bands",
    "prepare_input",
    "scale_for_resolution",
    "selected_area",
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
#: colour data (what web providers render): one band of 0xAARRGGBB words
_ARGB_TYPES = {Qgis.DataType.ARGB32, Qgis.DataType.ARGB32_Premultiplied}
_METRES = _first((Qgis, "DistanceUnit", "Meters"), (QgsUnitTypes, "DistanceUnit", "DistanceMeters"))
_UNKNOWN_UNIT = _first((Qgis, "DistanceUnit", "Unknown"), (QgsUnitTypes, "DistanceUnit", "DistanceUnknownUnit"))

#: the most pixels a web layer's grid may have (100 000 x 100 000): past that the extent or resolution is a slip
MAX_WEB_PIXELS = 10**10
#: what to do with a layer Geo-R1 cannot read
EXPORT_HINT = (
    "export it to a GeoTIFF first (Raster > Conversion > Translate, or right-click the layer > Export > Save As) "
    "and run on that"
)


#: most samples per output pixel and axis when a tile is downsampled (QGIS's block() only decimates)
MAX_SUPERSAMPLING = 4

#: rows per block of the full scan that confirms an all-nodata raster
_SCAN_ROWS = 256


def choosable_bands(layer: QgsRasterLayer) -> tuple[int, tuple[int, int, int]] | None:
    """For the panel's band choice: ``(band count, default R, G, B bands)``, or None where the bands are not the
    user's to choose (a web layer, one band of packed colour). The default is the layer's own multiband colour
    renderer's red, green and blue bands when it has one, else the reader's rule (:func:`choose_bands`)."""
    provider = layer.dataProvider() if isinstance(layer, QgsRasterLayer) else None
    if provider is None or not provider.isValid() or is_web_layer(layer):
        return None
    count = int(provider.bandCount())
    if count < 1 or (count == 1 and provider.dataType(1) in _ARGB_TYPES):
        return None
    renderer = layer.renderer()
    if renderer is not None and renderer.type() == "multibandcolor":
        rgb = (renderer.redBand(), renderer.greenBand(), renderer.blueBand())
        if all(1 <= b <= count for b in rgb):
            return count, rgb
    names = {COLOR_RED: "red", COLOR_GREEN: "green", COLOR_BLUE: "blue", COLOR_ALPHA: "alpha"}
    interp = [names.get(provider.colorInterpretation(b), "other") for b in range(1, count + 1)]
    return count, choose_bands(count, interp, None, what=layer.name(), option="bands")


def parse_bands(text: str | None) -> tuple[int, ...] | None:
    """The BANDS parameter: ``"4,3,2"`` -> ``(4, 3, 2)``; empty -> ``None`` (the automatic choice)."""
    return _parse_bands(text, option="bands")


class QgisRasterSource:
    """A ``QgsRasterLayer`` read tile by tile as 8-bit RGB (see the module docstring)."""

    def __init__(
        self,
        layer: QgsRasterLayer,
        bands: Sequence[int] | None = None,
        overview_px: int = 1024,
        *,
        grid: tuple[QgsRectangle, float] | None = None,
    ) -> None:
        """``grid``: for a web layer only, ``(extent, units_per_pixel)`` in the layer's CRS (module docstring)."""
        _check_raster_layer(layer)
        self.name = layer.name() or layer.source()
        provider = layer.dataProvider()
        if provider is None or not provider.isValid():
            raise RasterError(f"the raster layer {self.name} has no valid data provider; reload the layer")
        crs = layer.crs()
        if not crs.isValid():
            raise NotGeoreferencedError(
                f"the raster {self.name} has no CRS, so results could not be placed on a map; assign one first "
                "(Layer Properties > Source > Assigned CRS, or gdal_edit.py -a_srs EPSG:<code> on the file)"
            )
        self.web = is_web_layer(layer)
        self.kind = layer_kind(layer)
        if self.web:
            self.width, self.height, self.transform = _web_grid(self.name, self.kind, grid)
        else:
            if grid is not None:
                raise ConfigError(
                    f"the raster {self.name} has pixels of its own: choose its part with a window and its "
                    "resolution with a scale (prepare_input does both), not with grid="
                )
            self.width, self.height = int(layer.width()), int(layer.height())
            ext = layer.extent()
            self.transform = Affine(
                ext.width() / self.width, 0.0, ext.xMinimum(), 0.0, -ext.height() / self.height, ext.yMaximum()
            )
        if not self.web and self._looks_ungeoreferenced():
            raise NotGeoreferencedError(
                f"the raster {self.name} has a CRS but no geotransform (pixel size 1, origin 0,0); georeference it "
                "first (gdal_edit.py -a_ullr ulx uly lrx lry, or QGIS's Georeferencer)"
            )
        self.crs = QgsCoordinateReferenceSystem(crs)
        self.crs_wkt = crs.toWkt(WKT_PREFERRED)
        # A clone: reads from Processing's worker thread are safe, the layer's own settings untouched.
        self._provider: QgsRasterDataProvider = provider.clone()
        self.count = int(self._provider.bandCount())
        self._argb = self.count == 1 and self._provider.dataType(1) in _ARGB_TYPES
        if self._argb:  # one band of colour: decoded to three byte bands 1, 2, 3 (R, G, B)
            self.bands = choose_bands(3, ["red", "green", "blue"], tuple(bands) if bands else None, what=self.name,
                                      option="bands")  # fmt: skip
            self._alpha = None
            self._read_idx = [1]
            self.data_types = dict.fromkeys((1, 2, 3), Qgis.DataType.Byte)
        else:
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
        if self._argb or set(self.bands) != {1} or self._provider.colorInterpretation(1) != COLOR_PALETTE:
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
        names = {COLOR_RED: "red", COLOR_GREEN: "green", COLOR_BLUE: "blue", COLOR_ALPHA: "alpha"}
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
                where = "the service did not answer or" if self.web else "the file is corrupt or"
                raise RasterError(
                    f"QGIS could not read band {b} of {self.name} ({self.kind}) over {extent.toString()}; {where} "
                    f"is no longer reachable. If QGIS shows the layer but Geo-R1 cannot read it, {EXPORT_HINT}"
                )
            if block.dataType() in _ARGB_TYPES:
                rgb, alpha = _decode_argb(block, w, h)
                planes.update({1: rgb[..., 0], 2: rgb[..., 1], 3: rgb[..., 2]})
                valid &= alpha > 0
                continue
            dtype = _NUMPY_TYPES.get(block.dataType())
            if dtype is None:
                raise RasterError(
                    f"band {b} of {self.name} ({self.kind}) has the data type {block.dataType()!r}, which Geo-R1 "
                    f"cannot read; convert it to an integer or float type (gdal_translate -ot), or {EXPORT_HINT}"
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
        if not valid.any() and self.web:
            raise EmptyRasterError(
                f"the {self.kind} layer {self.name} shows nothing over the chosen extent (every pixel is transparent); "
                "choose an extent the layer covers, or check that the service answers"
            )
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
            "kind": self.kind,
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


def _decode_argb(block: Any, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """``((h, w, 3) uint8 RGB, (h, w) uint8 alpha)`` from a block of ``0xAARRGGBB`` words (native order)."""
    words = np.frombuffer(bytes(block.data()), dtype=np.uint32, count=w * h).reshape(h, w)
    alpha = (words >> 24).astype(np.uint8)
    rgb = np.stack([(words >> s) & 0xFF for s in (16, 8, 0)], axis=-1).astype(np.uint8)
    if block.dataType() == Qgis.DataType.ARGB32_Premultiplied:
        partial = (alpha > 0) & (alpha < 255)
        if partial.any():
            a = alpha[partial].astype(np.float64)[:, None]
            rgb[partial] = np.clip(np.rint(rgb[partial] * 255.0 / a), 0, 255).astype(np.uint8)
    return rgb, alpha


# --------------------------------------------------------------------------------------------------
# Layers: which kind, web grids, ground resolution
# --------------------------------------------------------------------------------------------------


def _check_raster_layer(layer: Any) -> None:
    if isinstance(layer, QgsRasterLayer) and layer.isValid():
        return
    if isinstance(layer, QgsRasterLayer):
        raise RasterError(
            f"the raster layer {layer.name()} is not valid (QGIS cannot read its source); check the file or the "
            "service, or reload it"
        )
    if isinstance(layer, QgsMapLayer):
        raise RasterError(
            f"the layer {layer.name()} is not a raster layer ({type(layer).__name__}): Geo-R1 reads images. If it "
            f"shows imagery, {EXPORT_HINT}"
        )
    raise RasterError(f"{layer!r} is not a raster layer; pick a raster layer")


def is_web_layer(layer: QgsRasterLayer) -> bool:
    """True for a layer with no pixel grid of its own (XYZ, WMS, WMTS: size 0 x 0); see the module docstring."""
    return int(layer.width()) <= 0 or int(layer.height()) <= 0


def layer_kind(layer: QgsRasterLayer) -> str:
    """``"XYZ tiles"``, ``"WMTS"``, ``"WMS"``, ``"raster file"`` or the provider's name, for messages."""
    provider = layer.providerType()
    if provider == "wms":
        src = layer.source()
        if "type=xyz" in src:
            return "XYZ tiles"
        return "WMTS" if "tileMatrixSet=" in src else "WMS"
    return "raster file" if provider == "gdal" else f"{provider} layer"


def _web_grid(name: str, kind: str, grid: tuple[QgsRectangle, float] | None) -> tuple[int, int, Affine]:
    """The pixel grid of a web layer: ``(width, height, transform)`` over ``grid = (extent, units_per_pixel)``."""
    if grid is None:
        raise ConfigError(
            f"{name} is a web layer ({kind}): it has no pixels of its own until an area and a ground resolution are "
            "chosen; choose an area (the canvas extent, a drawn rectangle or polygons) and a ground resolution"
        )
    extent, upp = grid
    if isinstance(upp, bool) or not isinstance(upp, (int, float)) or not math.isfinite(upp) or upp <= 0:
        raise ConfigError(f"the ground resolution of {name} must be > 0 map units per pixel, got {upp!r}")
    if extent is None or extent.isNull() or extent.isEmpty() or not (extent.width() > 0 and extent.height() > 0):
        raise ExtentError(f"{name} is a web layer ({kind}) and the chosen area is empty; choose an extent with an area")
    w = max(1, math.ceil(extent.width() / upp - 1e-6))
    h = max(1, math.ceil(extent.height() / upp - 1e-6))
    if w * h > MAX_WEB_PIXELS:
        raise ConfigError(
            f"reading {name} over that area at {upp:g} map units per pixel would take {w} x {h} pixels; choose a "
            "smaller area or a coarser ground resolution"
        )
    return w, h, Affine(float(upp), 0.0, extent.xMinimum(), 0.0, -float(upp), extent.yMaximum())


def crs_units_per_metre(crs: QgsCoordinateReferenceSystem, extent: QgsRectangle) -> float | tuple[float, float]:
    """Metres -> CRS units, as :func:`~geo_r1_qgis.core.geometry.gsd_to_scale` takes them (see the module docstring).

    Geographic CRS: ``(degrees of longitude, degrees of latitude)`` per metre at the extent's centre
    latitude. Projected CRS: 1 / (metres per unit). A CRS of unknown units is an error.
    """
    if crs.isGeographic():
        lat = extent.center().y()
        return degrees_per_metre(max(-89.0, min(89.0, lat)))
    units = crs.mapUnits()
    factor = QgsUnitTypes.fromUnitToUnitFactor(units, _METRES)
    if units == _UNKNOWN_UNIT or not (factor > 0 and math.isfinite(factor)):
        raise ConfigError(
            f"the CRS {crs.authid() or crs.description()} has no known length unit, so a ground resolution in metres "
            "cannot be converted; leave the ground resolution at native (0), or reproject the raster"
        )
    return 1.0 / factor


def _check_resolution(metres_per_pixel: Any) -> float:
    if isinstance(metres_per_pixel, bool) or not isinstance(metres_per_pixel, (int, float)):
        raise ConfigError(f"the ground resolution must be a number of metres per pixel, got {metres_per_pixel!r}")
    if not (math.isfinite(metres_per_pixel) and metres_per_pixel > 0):
        raise ConfigError(
            f"the ground resolution must be > 0 metres per pixel, got {metres_per_pixel!r}; e.g. 0.3, or leave it "
            "empty (0) for the raster's own"
        )
    return float(metres_per_pixel)


def scale_for_resolution(layer: QgsRasterLayer, metres_per_pixel: float | None) -> float:
    """The :attr:`GroundingJob.scale` that reads a raster file at ``metres_per_pixel`` (``None`` or 0: native, 1.0).

    ``scale > 1`` reads coarser than the raster (box-averaged), ``< 1`` finer (nearest neighbour): a
    0.3 m choice on a 0.1 m raster is 3.0. Web layers have no native grid: :func:`prepare_input`
    builds theirs at the resolution directly (their scale is 1).
    """
    _check_raster_layer(layer)
    if metres_per_pixel is None or metres_per_pixel == 0:
        return 1.0
    metres = _check_resolution(metres_per_pixel)
    if is_web_layer(layer):
        raise ConfigError(
            f"{layer.name()} is a web layer ({layer_kind(layer)}), with no native resolution to scale from; "
            "prepare_input reads it at the ground resolution directly"
        )
    ext = layer.extent()
    native = Affine(ext.width() / layer.width(), 0.0, ext.xMinimum(), 0.0, -ext.height() / layer.height(),
                    ext.yMaximum())  # fmt: skip
    return gsd_to_scale(metres, native, crs_units_per_metre(layer.crs(), ext))


def web_default_resolution(layer: QgsRasterLayer) -> float:
    """A web layer's default resolution in its CRS units: its finest native resolution (deepest zoom level)."""
    provider = layer.dataProvider()
    resolutions = [r for r in (provider.nativeResolutions() if provider is not None else []) if r > 0]
    if not resolutions:
        raise ConfigError(
            f"{layer.name()} is a web layer ({layer_kind(layer)}) that reports no resolution of its own: choose a "
            "ground resolution in metres per pixel"
        )
    return float(min(resolutions))


# --------------------------------------------------------------------------------------------------
# Areas: polygons from a layer's selection, or from a Processing feature source
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MapArea:
    """Polygons in map coordinates (``crs``), before they are taken to a raster's pixels."""

    geometries: tuple[QgsGeometry, ...]
    crs: QgsCoordinateReferenceSystem
    name: str = "the polygons"

    def in_crs(
        self, crs: QgsCoordinateReferenceSystem, context: QgsCoordinateTransformContext | None = None
    ) -> MapArea:
        """The same polygons reprojected to ``crs`` (QgsCoordinateTransform, the project's datum transforms)."""
        if not self.crs.isValid():
            raise NotGeoreferencedError(f"{self.name} have no CRS; set the polygon layer's CRS first")
        if self.crs == crs:
            return self
        ctx = context if context is not None else QgsProject.instance().transformContext()
        ct = QgsCoordinateTransform(self.crs, crs, ctx)
        out = []
        for g in self.geometries:
            g2 = QgsGeometry(g)
            try:
                g2.transform(ct)
            except Exception as exc:  # QgsCsException: a polygon outside the CRS's area of use
                raise ExtentError(
                    f"{self.name} cannot be reprojected from {self.crs.authid()} to {crs.authid()} ({exc}); select "
                    "polygons over the raster"
                ) from None
            out.append(g2)
        return MapArea(tuple(out), QgsCoordinateReferenceSystem(crs), self.name)

    def bounds(self) -> QgsRectangle:
        box = QgsRectangle(self.geometries[0].boundingBox())
        for g in self.geometries[1:]:
            box.combineExtentWith(g.boundingBox())
        return box

    def to_pixels(self, transform: Affine) -> tuple[AreaPolygon, ...]:
        """Each polygon part as an :class:`AreaPolygon` in the pixels of ``transform`` (holes kept)."""
        out = []
        for g in self.geometries:
            abstract = g.constGet()
            if abstract is not None and abstract.hasCurvedSegments():
                g = QgsGeometry(abstract.segmentize())
            parts = g.asMultiPolygon() if g.isMultipart() else [g.asPolygon()]
            for rings in parts:
                if not rings or len(rings[0]) < 4:
                    continue
                px = [tuple(transform.inverse_apply(p.x(), p.y()) for p in ring) for ring in rings]
                try:
                    out.append(AreaPolygon(px[0], tuple(r for r in px[1:] if len(r) >= 4)))
                except ConfigError:
                    log.info("%s: a part with no area is left out", self.name)
        if not out:
            raise ConfigError(f"{self.name} hold no polygon with an area; select polygons with an area")
        return tuple(out)


def _polygon_geometries(features: Any, name: str) -> tuple[QgsGeometry, ...]:
    geoms = tuple(QgsGeometry(f.geometry()) for f in features if f.hasGeometry() and not f.geometry().isEmpty())
    if not geoms:
        raise ConfigError(f"{name} hold no geometry; select polygons with a geometry")
    return geoms


def selected_area(layer: QgsVectorLayer) -> MapArea:
    """The selected features of a polygon layer, in its CRS. Errors: not a polygon layer, nothing selected."""
    from ..compat import GEOMETRY_POLYGON

    if not isinstance(layer, QgsVectorLayer) or not layer.isValid():
        name = layer.name() if isinstance(layer, QgsMapLayer) else repr(layer)
        raise ConfigError(f"{name} is not a valid vector layer; pick a polygon layer")
    if layer.geometryType() != GEOMETRY_POLYGON:
        raise ConfigError(
            f"the layer {layer.name()} holds no polygons (its geometries are not polygons); pick a polygon layer, "
            "or draw the area as a rectangle"
        )
    if layer.selectedFeatureCount() == 0:
        raise ConfigError(
            f"no feature of {layer.name()} is selected; select the polygons to search in (Select Features tool), "
            "or choose another area"
        )
    name = f"the {layer.selectedFeatureCount()} selected polygon(s) of {layer.name()}"
    return MapArea(_polygon_geometries(layer.getSelectedFeatures(), name), QgsCoordinateReferenceSystem(layer.crs()),
                   name)  # fmt: skip


def features_area(features: Any, crs: QgsCoordinateReferenceSystem, name: str = "the area's polygons") -> MapArea:
    """A :class:`MapArea` from any features (a Processing feature source gives them, selection applied)."""
    return MapArea(_polygon_geometries(features, name), QgsCoordinateReferenceSystem(crs), name)


def area_from_selection(
    polygon_layer: QgsVectorLayer,
    raster: QgsRasterLayer | QgisRasterSource,
    context: QgsCoordinateTransformContext | None = None,
) -> tuple[AreaPolygon, ...]:
    """The selected polygons of ``polygon_layer`` in the pixels of ``raster``, for :attr:`GroundingJob.area_polygons`.

    Reprojected to the raster's CRS; multipolygons give one :class:`AreaPolygon` per part, holes kept
    (a hole is outside). ``raster`` is a raster file's layer, or the :class:`QgisRasterSource` a run
    reads (whose pixels a web layer's grid defines).
    """
    if isinstance(raster, QgisRasterSource):
        transform, crs = raster.transform, raster.crs
    else:
        _check_raster_layer(raster)
        if is_web_layer(raster):
            raise ConfigError(
                f"{raster.name()} is a web layer ({layer_kind(raster)}), whose pixels exist only once an area and a "
                "resolution are chosen: pass its QgisRasterSource (prepare_input does it all)"
            )
        ext = raster.extent()  # only the georeferencing is needed
        transform = Affine(ext.width() / raster.width(), 0.0, ext.xMinimum(), 0.0, -ext.height() / raster.height(),
                           ext.yMaximum())  # fmt: skip
        crs = raster.crs()
    return selected_area(polygon_layer).in_crs(crs, context).to_pixels(transform)


# --------------------------------------------------------------------------------------------------
# Everything a run reads, in one call (the panel and Processing)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RasterInput:
    """What :func:`prepare_input` decided: the source and the job's ``scale``, ``window`` and ``area_polygons``."""

    source: QgisRasterSource
    scale: float
    window: PixelBox | None
    area_polygons: tuple[AreaPolygon, ...] | None
    #: map units of the layer's CRS per tile pixel (the ground resolution as read)
    units_per_pixel: float


def prepare_input(
    layer: QgsRasterLayer,
    *,
    bands: Sequence[int] | None = None,
    extent: QgsRectangle | None = None,
    extent_crs: QgsCoordinateReferenceSystem | None = None,
    metres_per_pixel: float | None = None,
    area: MapArea | None = None,
    context: QgsCoordinateTransformContext | None = None,
) -> RasterInput:
    """Open ``layer`` for a run over ``extent`` and/or the polygons ``area``, at ``metres_per_pixel``.

    ``extent`` is in ``extent_crs`` (default: the layer's CRS); ``None`` is the whole raster (or, for a
    web layer, the polygons' bounding box: a web layer needs an extent or polygons). ``metres_per_pixel``
    ``None``/0 is the raster's own resolution (for a web layer, its finest native resolution).
    Then ``GroundingJob(..., scale=r.scale, window=r.window, area_polygons=r.area_polygons)``.
    """
    _check_raster_layer(layer)
    ctx = context if context is not None else QgsProject.instance().transformContext()
    crs = layer.crs()
    if extent is not None and (extent.isNull() or extent.isEmpty()):
        extent = None
    if extent is not None and extent_crs is not None and extent_crs.isValid() and extent_crs != crs:
        extent = QgsCoordinateTransform(extent_crs, crs, ctx).transformBoundingBox(extent)
    area_map = area.in_crs(crs, ctx) if area is not None else None
    metres = None if metres_per_pixel in (None, 0, 0.0) else _check_resolution(metres_per_pixel)
    if is_web_layer(layer):
        if extent is None and area_map is None:
            raise ConfigError(
                f"{layer.name()} is a web layer ({layer_kind(layer)}), which has no extent of its own to search: "
                "choose the canvas extent, draw a rectangle, or select polygons"
            )
        grid_extent = QgsRectangle(extent) if extent is not None else area_map.bounds()
        if extent is not None and area_map is not None:
            grid_extent = grid_extent.intersect(area_map.bounds())
            if grid_extent.isEmpty():
                raise ExtentError("the chosen extent and the polygons do not overlap; pick polygons inside the extent")
        if metres is None:
            upp = web_default_resolution(layer)
        else:
            units = crs_units_per_metre(crs, grid_extent)
            ux, uy = (units, units) if isinstance(units, float) else units
            upp = metres * math.sqrt(ux * uy)
        source = QgisRasterSource(layer, bands, grid=(grid_extent, upp))
        scale, window = 1.0, None
    else:
        source = QgisRasterSource(layer, bands)
        scale = scale_for_resolution(layer, metres)
        window = None
        if extent is not None:
            window = window_from_map_bbox(extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum(),
                                          source.transform, source.width, source.height)  # fmt: skip
        px, py = source.transform.pixel_size
        upp = math.sqrt(px * py) * scale
    polygons = area_map.to_pixels(source.transform) if area_map is not None else None
    return RasterInput(source, scale, window, polygons, float(upp))


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


def utc_now() -> QDateTime:
    """Now, in UTC, as the results' ``created`` field wants it."""
    now = QDateTime.currentDateTimeUtc()
    now.setTimeSpec(UTC)
    return now


def result_feature(fields: QgsFields, m: MapDetection, meta: Mapping[str, str], run_id: str,
                   created: QDateTime) -> QgsFeature:  # fmt: skip
    """One result feature (:data:`FIELD_NAMES`) of a placed detection: the Processing output's and the panel's."""
    feat = QgsFeature(fields)
    feat.setGeometry(QgsGeometry.fromPolygonXY([[QgsPointXY(x, y) for x, y in m.ring]]))
    values = detection_values(m.detection, meta, run_id, created)
    values["reasoning"] = values["reasoning"] or None  # NULL rather than an empty string
    feat.setAttributes([values[name] for name in FIELD_NAMES])
    return feat


def outline_feature(fields: QgsFields, m: MapDetection, meta: Mapping[str, str], run_id: str,
                    created: QDateTime) -> QgsFeature:  # fmt: skip
    """The outline feature of a placed detection (a MultiPolygon from core/outline.py's WKB), its box's fields."""
    feat = result_feature(fields, m, meta, run_id, created)
    geometry = QgsGeometry()
    geometry.fromWkb(multipolygon_to_wkb(m.outline))
    feat.setGeometry(geometry)
    return feat


class FeatureSinkResultSink:
    """A :class:`~geo_r1_qgis.core.pipeline.ResultSink` that writes the final layer to a ``QgsFeatureSink``.

    Tiles are kept in memory only (no resume in Processing, see the module docstring); the final
    polygons are added at :meth:`finish`, one feature per merged detection, in the raster's CRS.
    """

    def __init__(
        self, sink: QgsFeatureSink, meta: Mapping[str, str], run_id: str | None = None,
        outline_sink: QgsFeatureSink | None = None,
    ) -> None:  # fmt: skip
        if sink is None:
            raise OutputError("the output feature sink could not be created; choose another OUTPUT")
        self.sink = sink
        #: where the outlines go (MultiPolygons, the same fields), when the run asks for them
        self.outline_sink = outline_sink
        self.outlines_written = 0
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

    def finish(self, final: Sequence[MapDetection], summary: RunSummary) -> None:
        created = utc_now()
        features = [result_feature(self.fields, m, self.meta, self.run_id, created) for m in final]
        if features and not self.sink.addFeatures(features, FAST_INSERT):
            error = self.sink.lastError() if hasattr(self.sink, "lastError") else ""
            raise OutputError(
                f"could not write {len(features)} feature(s) to the output ({error}); choose another OUTPUT"
            )
        self.features_written = len(features)
        if self.outline_sink is not None:
            outlines = [outline_feature(self.fields, m, self.meta, self.run_id, created) for m in final if m.outline]
            if outlines and not self.outline_sink.addFeatures(outlines, FAST_INSERT):
                raise OutputError(f"could not write {len(outlines)} outline(s) to the output; choose another one")
            self.outlines_written = len(outlines)
