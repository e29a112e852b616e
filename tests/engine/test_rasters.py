"""Tests of engine/rasters.py: windowed, band-selecting, stretching, mask-aware tile reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.enums import ColorInterp
from rasterio.transform import from_origin

from engine.rasters import RasterioSource
from geo_r1_qgis.core.errors import ConfigError, EmptyRasterError, NotGeoreferencedError, RasterError
from geo_r1_qgis.core.geometry import PixelBox, TileGridSpec, make_tile_grid

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
TRANSFORM = from_origin(500000.0, 5200000.0, 0.5, 0.5)


def write(path: Path, data: np.ndarray, crs: str | None = "EPSG:32633", **kw) -> Path:
    count, h, w = data.shape
    profile = {"driver": "GTiff", "width": w, "height": h, "count": count, "dtype": data.dtype}
    if crs:
        profile.update(crs=crs, transform=TRANSFORM)
    profile.update(kw.pop("profile", {}))
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
        if "colorinterp" in kw:
            ds.colorinterp = kw["colorinterp"]
    return path


def first_tile(src: RasterioSource, size: int = 64, scale: float = 1.0):
    return make_tile_grid(src.transform, src.width, src.height, TileGridSpec(size, 0, scale))[0]


def test_rgb_uint8_is_read_as_is(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (3, 64, 64), dtype=np.uint8)
    with RasterioSource(write(tmp_path / "a.tif", data)) as src:
        img, valid = src.read(first_tile(src))
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and valid == 1.0
    assert np.array_equal(img, np.moveaxis(data, 0, -1))


def test_bands_by_colour_interpretation_then_first_three(tmp_path):
    data = np.stack([np.full((32, 32), v, np.uint8) for v in (10, 20, 30, 40)])
    interp = [ColorInterp.blue, ColorInterp.green, ColorInterp.red, ColorInterp.undefined]
    with RasterioSource(write(tmp_path / "bgr.tif", data, colorinterp=interp)) as src:
        assert src.bands == (3, 2, 1)
        assert src.read(first_tile(src, 32))[0][0, 0].tolist() == [30, 20, 10]
    with RasterioSource(write(tmp_path / "b.tif", data), bands=(4, 3, 2)) as src:
        assert src.read(first_tile(src, 32))[0][0, 0].tolist() == [40, 30, 20]


def test_single_band_is_replicated(tmp_path):
    data = np.full((1, 32, 32), 77, np.uint8)
    with RasterioSource(write(tmp_path / "one.tif", data)) as src:
        assert src.bands == (1, 1, 1)
        assert src.read(first_tile(src, 32))[0][5, 5].tolist() == [77, 77, 77]


def test_uint16_is_stretched_once_and_nodata_zeroed(tmp_path):
    data = np.tile(np.arange(1000, 1000 + 64, dtype=np.uint16) * 10, (3, 64, 1))
    data[:, :10, :] = 0
    path = write(tmp_path / "u16.tif", data, profile={"nodata": 0})
    with RasterioSource(path) as src:
        lo, hi = src._stretch[0]
        assert 10000 < lo < hi < 10640
        img, valid = src.read(first_tile(src))
    assert valid == pytest.approx(54 / 64)
    assert (img[:10] == 0).all()
    assert img[20, 0, 0] == 0 and img[20, -1, 0] == 255


def test_float_nan_and_alpha_are_invalid(tmp_path):
    data = np.ones((3, 32, 32), np.float32)
    data[:, 0, :] = np.nan
    with RasterioSource(write(tmp_path / "f.tif", data)) as src:
        assert src.read(first_tile(src, 32))[1] == pytest.approx(31 / 32)
    rgba = np.full((4, 32, 32), 100, np.uint8)
    rgba[3, :, :16] = 0
    interp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
    with RasterioSource(write(tmp_path / "rgba.tif", rgba, colorinterp=interp)) as src:
        img, valid = src.read(first_tile(src, 32))
    assert valid == pytest.approx(0.5) and (img[:, :16] == 0).all() and (img[:, 16:] == 100).all()


def test_downsampled_read_has_the_tile_size(tmp_path):
    data = np.zeros((3, 256, 256), np.uint8)
    data[:, :, :128] = 200
    with RasterioSource(write(tmp_path / "big.tif", data)) as src:
        tile = first_tile(src, 64, scale=4.0)
        img, _ = src.read(tile)
    assert tile.window == PixelBox(0, 0, 256, 256)
    assert img.shape == (64, 64, 3) and img[0, 0, 0] == 200 and img[0, -1, 0] == 0


def test_errors_are_clear(tmp_path):
    bad = tmp_path / "corrupt.tif"
    bad.write_bytes(b"II*\x00" + b"garbage" * 20)
    with pytest.raises(RasterError, match="corrupt"):
        RasterioSource(bad)
    with pytest.raises(RasterError, match="does not exist"):
        RasterioSource(tmp_path / "missing.tif")
    with pytest.raises(NotGeoreferencedError, match=r"gdal_edit\.py -a_srs"):
        RasterioSource(write(tmp_path / "nocrs.tif", np.ones((1, 8, 8), np.uint8), crs=None))
    empty = write(tmp_path / "empty.tif", np.zeros((3, 16, 16), np.uint8), profile={"nodata": 0})
    with pytest.raises(EmptyRasterError, match="nodata"):
        RasterioSource(empty)
    with pytest.raises(ConfigError, match="--bands"):
        RasterioSource(write(tmp_path / "x.tif", np.ones((3, 8, 8), np.uint8)), bands=(1, 2, 9))


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not there")
def test_shared_rasters():
    with RasterioSource(SHARED / "naip_m_4709963_se_14_20200831.tif") as src:
        assert src.bands == (1, 2, 3) and src.crs.to_epsg() == 26914
    with RasterioSource(SHARED / "cog.tif") as src:
        assert src._stretch is not None and src.read(first_tile(src))[0].dtype == np.uint8
    with RasterioSource(SHARED / "rgb1_fake_nir_epsg3857.tif") as src:
        assert src.bands == (1, 1, 1)
    with pytest.raises(EmptyRasterError):
        RasterioSource(SHARED / "all-nodata.tif")
    with pytest.raises(NotGeoreferencedError):
        RasterioSource(SHARED / "float_nan.tif")
    with RasterioSource(SHARED / "RGB.byte.tif") as src:
        tiles = make_tile_grid(src.transform, src.width, src.height, TileGridSpec(128, 0))
        fractions = [src.read(t)[1] for t in tiles]
    assert min(fractions) < 1.0  # the nodata border is seen


def test_a_plain_jpeg_gives_one_clean_line(tmp_path):
    """Issue 8.10: rasterio's NotGeoreferencedWarning (with a site-packages path) came before our error."""
    import subprocess
    import sys

    from PIL import Image

    jpg = tmp_path / "photo.jpg"
    Image.new("RGB", (64, 48), (10, 20, 30)).save(jpg)
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "ground", str(jpg), "tanks", "-o",
                           str(tmp_path / "o.gpkg"), "--engine", "http://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no CRS" in lines[0], proc.stderr
    assert "Warning" not in proc.stderr and "site-packages" not in proc.stderr
    assert not (tmp_path / "o.gpkg").exists()


def test_a_gcp_raster_is_told_to_rectify_not_to_assign_a_crs(tmp_path):
    """Issue 8.11: a raster georeferenced by GCPs was told it had "no CRS" and to assign EPSG:32633."""
    import numpy as np
    import pytest
    import rasterio
    from rasterio.control import GroundControlPoint

    from engine.rasters import RasterioSource
    from geo_r1_qgis.core.errors import NotGeoreferencedError

    path = tmp_path / "gcps.tif"
    gcps = [GroundControlPoint(row=r, col=c, x=500000 + c, y=4000000 - r) for r, c in ((0, 0), (0, 63), (63, 0))]
    profile = {"driver": "GTiff", "width": 64, "height": 64, "count": 3, "dtype": "uint8"}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.full((3, 64, 64), 100, np.uint8))
        dst.gcps = (gcps, rasterio.crs.CRS.from_epsg(32633))
    with pytest.raises(NotGeoreferencedError, match="ground control points") as err:
        RasterioSource(path)
    assert "gdalwarp" in str(err.value) and "EPSG:32633" in str(err.value)
    assert "assign one" not in str(err.value)


def write_palette_tif(path):
    """A one-band uint8 GeoTIFF of colour indices 0..3 with a colour table (red, green, blue, white)."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    idx = np.zeros((64, 64), np.uint8)
    idx[:, 16:32], idx[:, 32:48], idx[:, 48:] = 1, 2, 3
    profile = {"driver": "GTiff", "width": 64, "height": 64, "count": 1, "dtype": "uint8", "crs": "EPSG:32633",
               "transform": from_origin(500000, 4000000, 1, 1), "photometric": "palette"}  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(idx, 1)
        dst.write_colormap(1, {0: (200, 0, 0, 255), 1: (0, 200, 0, 255), 2: (0, 0, 200, 255), 3: (255, 255, 255, 255)})
    return path


def test_a_palette_raster_reaches_the_model_in_colour(tmp_path):
    """Issue 8.4: a one-band raster with a colour table arrived as its indices 0..3, a nearly black image."""
    from engine.rasters import RasterioSource
    from geo_r1_qgis.core.geometry import TileGridSpec, make_tile_grid

    path = write_palette_tif(tmp_path / "palette.tif")
    with RasterioSource(path) as src:
        tile = make_tile_grid(src.transform, src.width, src.height, TileGridSpec(56, 0))[0]
        rgb, frac = src.read(tile)
    assert frac == 1.0
    assert rgb[10, 5].tolist() == [200, 0, 0] and rgb[10, 20].tolist() == [0, 200, 0]
    assert rgb[10, 40].tolist() == [0, 0, 200] and rgb[10, 50].tolist() == [255, 255, 255]
