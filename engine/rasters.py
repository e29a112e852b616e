"""Reading georeferenced rasters for ``geo-r1 ground``: a rasterio :class:`RasterSource`.

:class:`RasterioSource` implements :class:`geo_r1_qgis.core.pipeline.RasterSource`:

* **Windowed reads only.** Each tile is one ``read(window=..., out_shape=...)``; GDAL resamples
  the window to the tile size (``average`` when downsampling, ``bilinear`` when upsampling,
  none at the native resolution). GDAL's block cache is capped (``GDAL_CACHEMAX``, 64 MB by
  default), so memory does not grow with the size of the raster.
* **Bands.** ``bands`` (1-based) if given; else the bands whose colour interpretation is red,
  green and blue; else the first three; a raster with fewer than three bands has its first band
  replicated into three channels.
* **8 bits.** ``uint8`` data is used as it is. Any other dtype (16-bit, 32-bit, float) is stretched
  linearly per band from its 2nd to its 98th percentile to 0..255. The percentiles are computed
  **once** per raster, from one decimated read of the whole raster (at most ``overview_px`` on the
  longest side, which GDAL serves from overviews when the file has them) over valid pixels only.
* **Validity.** A pixel is valid when GDAL's mask of every selected band says so (nodata value,
  alpha band or internal mask: ``read_masks``) and, for floats, when it is finite. Invalid pixels
  become 0 in the tile image; :meth:`read` returns the fraction of valid pixels, and the pipeline
  skips tiles where it is 0.
* **Errors.** A file that cannot be opened or read -> :class:`RasterError`; no CRS or no
  geotransform -> :class:`NotGeoreferencedError` (the message says how to assign one);
  every pixel nodata -> :class:`EmptyRasterError` (from the decimated mask; a cheap full scan of
  the masks, block by block, confirms it before the error is raised).
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from geo_r1_qgis.core.errors import EmptyRasterError, NotGeoreferencedError, RasterError
from geo_r1_qgis.core.geometry import Affine, PixelBox, Tile
from geo_r1_qgis.core.gpkg_schema import is_gdal_path  # one rule: the plugin's run parameters use it too
from geo_r1_qgis.core.results import apply_palette, choose_bands, palette_lut, stretch_limits, to_uint8

log = logging.getLogger(__name__)

#: percentiles of the linear stretch to 8 bits


def _rasterio() -> Any:
    import rasterio  # heavy import kept lazy

    return rasterio


def gdal_message(exc: BaseException) -> str:
    """rasterio's message and GDAL's own ones behind it (rasterio often says only "see previous exception")."""
    parts: list[str] = []
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = " ".join(str(e).split())
        if text and text not in parts:
            parts.append(text)
        e = e.__cause__ or e.__context__
    return " <- ".join(parts) or type(exc).__name__


class RasterioSource:
    """A raster opened with rasterio, read tile by tile as 8-bit RGB. Close it (or use ``with``)."""

    def __init__(
        self,
        path: str | Path,
        bands: tuple[int, ...] | None = None,
        overview_px: int = 1024,
        cache_mb: int = 64,
    ) -> None:
        rasterio = _rasterio()
        from rasterio.errors import NotGeoreferencedWarning, RasterioError

        text = str(path)
        # GDAL's own paths (/vsizip/, /vsicurl/, https://, GPKG:file:table...) go to GDAL unchanged: a Path
        # would collapse "//" and they do not exist on the local disk.
        self.path: Any = text if is_gdal_path(text) else Path(path)
        if isinstance(self.path, Path) and not self.path.exists():
            raise RasterError(f"the raster {self.path} does not exist; check the path")
        self._env = rasterio.Env(GDAL_CACHEMAX=int(cache_mb) * 1024 * 1024)
        self._env.__enter__()
        try:
            try:
                with warnings.catch_warnings():  # our own error below says it better, in one line
                    warnings.simplefilter("ignore", NotGeoreferencedWarning)
                    self.ds = rasterio.open(self.path)
            except RasterioError as exc:
                raise RasterError(
                    f"cannot open {self.path} as a raster ({exc}); the file is corrupt or not a format GDAL reads"
                ) from None
            self._setup(bands, overview_px)
        except BaseException:
            self.close()
            raise

    # -- set up ------------------------------------------------------------------------------------
    def _setup(self, bands: tuple[int, ...] | None, overview_px: int) -> None:
        from rasterio.enums import ColorInterp

        ds = self.ds
        self.width, self.height = int(ds.width), int(ds.height)
        gcps, gcp_crs = ds.gcps
        if gcps and (ds.crs is None or ds.transform.is_identity):
            srs = f" -t_srs {gcp_crs.to_string()}" if gcp_crs else " -t_srs EPSG:<code>"
            raise NotGeoreferencedError(
                f"{self.path} is georeferenced by {len(gcps)} ground control points and has no geotransform; "
                f"rectify it first, e.g. gdalwarp -r bilinear{srs} {self.path} rectified.tif, then use rectified.tif"
            )
        if ds.crs is None:
            raise NotGeoreferencedError(
                f"{self.path} has no CRS, so results could not be placed on a map; assign one first, e.g. "
                f"gdal_edit.py -a_srs EPSG:32633 {self.path} (and -a_ullr ulx uly lrx lry if it has no "
                "geotransform either), or georeference it in QGIS"
            )
        t = ds.transform
        if t.is_identity:
            raise NotGeoreferencedError(
                f"{self.path} has a CRS but no geotransform (pixel size 1, origin 0,0); set one, e.g. "
                f"gdal_edit.py -a_ullr ulx uly lrx lry {self.path}"
            )
        self.transform = Affine(t.a, t.b, t.c, t.d, t.e, t.f)
        self.crs_wkt = ds.crs.to_wkt()
        self.crs = ds.crs
        self.dtype = np.dtype(ds.dtypes[0])
        self.count = int(ds.count)
        names = {
            ColorInterp.red: "red",
            ColorInterp.green: "green",
            ColorInterp.blue: "blue",
            ColorInterp.alpha: "alpha",
        }
        interp = [names.get(c, "other") for c in ds.colorinterp]
        chosen = choose_bands(self.count, interp, bands, what=str(self.path), option="--bands")
        self.bands = chosen
        self._read_idx = sorted(set(chosen))  # each band read once
        self._channel = [self._read_idx.index(b) for b in chosen]
        self._palette = None
        if ds.colorinterp[0] == ColorInterp.palette and set(chosen) == {1}:
            try:
                table = ds.colormap(1)
            except ValueError:  # "NULL color table": marked paletted, but no table
                table = {}
            if table:
                size = 65536 if self.dtype.itemsize > 1 else 256
                self._palette = palette_lut(table.items(), size=size)
                log.info("%s: one band of colour indices, expanded through its colour table", Path(str(self.path)).name)
        self._stretch = self._compute_stretch(overview_px)
        if self._palette is not None:
            self._stretch = None  # indices are not intensities

    def _overview_shape(self, overview_px: int) -> tuple[int, int]:
        f = max(1.0, max(self.width, self.height) / overview_px)
        return (max(1, round(self.height / f)), max(1, round(self.width / f)))

    def _compute_stretch(self, overview_px: int) -> list[tuple[float, float]] | None:
        """Per-band (lo, hi) from one decimated read; ``None`` for uint8 (no stretch). Checks emptiness."""
        from rasterio.enums import Resampling
        from rasterio.errors import RasterioError

        h, w = self._overview_shape(overview_px)
        try:
            masks = self.ds.read_masks(self._read_idx, out_shape=(len(self._read_idx), h, w))
            valid = np.all(masks > 0, axis=0)
            data = None
            if self.dtype != np.uint8 or not valid.any():
                data = self.ds.read(
                    self._read_idx, out_shape=(len(self._read_idx), h, w), resampling=Resampling.nearest
                )
                if data.dtype.kind == "f":
                    valid &= np.all(np.isfinite(data), axis=0)
        except RasterioError as exc:
            raise RasterError(f"cannot read {self.path} ({exc}); the file is corrupt or truncated") from None
        if not valid.any() and not self._any_valid_full_scan():
            raise EmptyRasterError(
                f"every pixel of {self.path} is nodata (nodata={self.ds.nodata!r}, {self.count} band(s)): "
                "there is nothing to look at; check the nodata value (gdal_edit.py -unsetnodata) or the file"
            )
        if self.dtype == np.uint8 or data is None:
            return None
        out = []
        for i in range(len(self._read_idx)):
            out.append(stretch_limits(data[i][valid]))  # (0, 1) if the decimated read missed every valid pixel
        log.info("%s: %s data stretched to 8 bits per band (2-98 %%): %s", Path(str(self.path)).name, self.dtype, out)
        return out

    def _any_valid_full_scan(self) -> bool:
        """Whether any pixel is valid, reading the masks block by block (only when the overview saw none)."""
        for _, window in self.ds.block_windows(1):
            masks = self.ds.read_masks(self._read_idx, window=window)
            ok = np.all(masks > 0, axis=0)
            if ok.any():
                if self.dtype.kind != "f":
                    return True
                data = self.ds.read(self._read_idx, window=window)
                if (ok & np.all(np.isfinite(data), axis=0)).any():
                    return True
        return False

    def has_valid(self, window: PixelBox, overview_px: int = 512) -> bool:
        """Cheap check that a window holds a valid pixel (decimated masks, then a full read if needed)."""
        from rasterio.windows import Window

        win = Window(window.x1, window.y1, window.width, window.height)
        f = max(1.0, max(window.width, window.height) / overview_px)
        shape = (len(self._read_idx), max(1, round(window.height / f)), max(1, round(window.width / f)))
        if np.all(self.ds.read_masks(self._read_idx, window=win, out_shape=shape) > 0, axis=0).any():
            return True
        if f == 1.0:
            return False
        rows = range(int(window.y1), int(window.y2), 1024)
        for r in rows:
            sub = Window(window.x1, r, window.width, min(1024, int(window.y2) - r))
            if np.all(self.ds.read_masks(self._read_idx, window=sub) > 0, axis=0).any():
                return True
        return False

    # -- reading ----------------------------------------------------------------------------------
    def read(self, tile: Tile) -> tuple[np.ndarray, float]:
        """The tile as an ``(h, w, 3)`` uint8 image (invalid pixels 0) and its fraction of valid pixels."""
        from rasterio.enums import Resampling
        from rasterio.errors import RasterioError
        from rasterio.windows import Window

        w, h = tile.size
        win = tile.window
        sx, sy = tile.pixel_scale
        if (math.isclose(sx, 1.0) and math.isclose(sy, 1.0)) or self._palette is not None:
            resampling = Resampling.nearest  # (colour indices cannot be averaged)
        elif sx > 1.0 or sy > 1.0:
            resampling = Resampling.average
        else:
            resampling = Resampling.bilinear
        window = Window(win.x1, win.y1, win.width, win.height)
        shape = (len(self._read_idx), h, w)
        try:
            data = self.ds.read(self._read_idx, window=window, out_shape=shape, resampling=resampling)
            masks = self.ds.read_masks(self._read_idx, window=window, out_shape=shape)
        except RasterioError as exc:
            raise RasterError(
                f"cannot read tile {tile.id} of {self.path} (columns {win.x1:g}..{win.x2:g}, rows {win.y1:g}.."
                f"{win.y2:g}): {gdal_message(exc)}; the file is damaged: repair or re-export it (e.g. with "
                "gdal_translate); --resume cannot mend this"
            ) from None
        valid = np.all(masks > 0, axis=0)
        if data.dtype.kind == "f":
            valid &= np.all(np.isfinite(data), axis=0)
        frac = float(valid.mean())
        if frac == 0.0:
            return np.zeros((h, w, 3), np.uint8), 0.0
        if self._palette is not None:
            rgb = apply_palette(data[self._channel[0]], self._palette)
            rgb[~valid] = 0
            return np.ascontiguousarray(rgb), frac
        if self._stretch is None:
            planes = data
        else:
            planes = np.empty(data.shape, np.uint8)
            for i, (lo, hi) in enumerate(self._stretch):
                planes[i] = to_uint8(data[i], lo, hi)
        rgb = np.stack([planes[c] for c in self._channel], axis=-1).astype(np.uint8, copy=False)
        rgb[~valid] = 0
        return np.ascontiguousarray(rgb), frac

    # -- info ------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Raster facts for the run table."""
        return {
            "path": str(self.path.resolve()) if isinstance(self.path, Path) else self.path,
            "width": self.width,
            "height": self.height,
            "count": self.count,
            "dtype": str(self.dtype),
            "bands_used": list(self.bands),
            "nodata": None if self.ds.nodata is None or not math.isfinite(self.ds.nodata) else self.ds.nodata,
            "crs": self.crs.to_string(),
            "transform": list(self.transform.to_tuple()),
            "stretch": self._stretch,
        }

    def crs_units_per_metre(self) -> float | tuple[float, float]:
        """For :func:`~geo_r1_qgis.core.geometry.gsd_to_scale`: 1/metres-per-unit, or degrees per metre."""
        from geo_r1_qgis.core.geometry import degrees_per_metre

        if self.crs.is_geographic:
            cy = self.transform.apply(self.width / 2, self.height / 2)[1]
            return degrees_per_metre(max(-89.0, min(89.0, cy)))
        factor = self.crs.linear_units_factor[1]
        return 1.0 / factor

    def close(self) -> None:
        ds = getattr(self, "ds", None)
        if ds is not None:
            ds.close()
            self.ds = None
        env = getattr(self, "_env", None)
        if env is not None:
            env.__exit__(None, None, None)
            self._env = None

    def __enter__(self) -> RasterioSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
