"""A local XYZ tile directory (``{z}/{x}/{y}.png``) made from a raster with GDAL, as a tile server cuts one.

Shared by the input tests and the panel tests: a web layer that needs no network (``type=xyz&url=file://…``).
"""

from __future__ import annotations

import math
from pathlib import Path

#: half the Web Mercator world's width (metres)
ORIGIN = 20037508.342789244


def zoom_res(z: int) -> float:
    """Metres per pixel of XYZ zoom level ``z`` (256-pixel tiles)."""
    return 2 * ORIGIN / (256 * 2**z)


def warp_3857(src: Path, bounds: tuple[float, float, float, float], res: float, alg: str = "average"):
    """``src`` warped to EPSG:3857 over ``bounds`` at ``res`` (RGB + alpha, in memory)."""
    from osgeo import gdal

    return gdal.Warp("", str(src), format="MEM", dstSRS="EPSG:3857", outputBounds=bounds, xRes=res, yRes=res,
                     resampleAlg=alg, dstAlpha=True)  # fmt: skip


def make_xyz(src: Path, out: Path, zooms: tuple[int, ...]) -> Path:
    """PNG tiles of ``src``'s first three bands for ``zooms``: for each zoom, one warp to EPSG:3857 aligned to the
    zoom's tile grid (average resampling), cut in 256 x 256 tiles (alpha 0 where ``src`` has no data)."""
    from osgeo import gdal

    gdal.UseExceptions()
    vrt = gdal.Warp("", str(src), format="VRT", dstSRS="EPSG:3857")
    gt = vrt.GetGeoTransform()
    xmin, ymax = gt[0], gt[3]
    xmax, ymin = xmin + gt[1] * vrt.RasterXSize, ymax + gt[5] * vrt.RasterYSize
    for z in zooms:
        span = 256 * zoom_res(z)
        tx0, tx1 = math.floor((xmin + ORIGIN) / span), math.floor((xmax + ORIGIN) / span)
        ty0, ty1 = math.floor((ORIGIN - ymax) / span), math.floor((ORIGIN - ymin) / span)
        left, top = -ORIGIN + tx0 * span, ORIGIN - ty0 * span
        nx, ny = tx1 - tx0 + 1, ty1 - ty0 + 1
        ds = warp_3857(src, (left, top - ny * span, left + nx * span, top), zoom_res(z))
        for i in range(nx):
            for j in range(ny):
                (out / str(z) / str(tx0 + i)).mkdir(parents=True, exist_ok=True)
                gdal.Translate(str(out / str(z) / str(tx0 + i) / f"{ty0 + j}.png"), ds, format="PNG",
                               srcWin=(i * 256, j * 256, 256, 256), bandList=[1, 2, 3, ds.RasterCount])  # fmt: skip
    return out


def xyz_uri(tiles: Path, zooms: tuple[int, ...]) -> str:
    return f"type=xyz&url=file://{tiles}/{{z}}/{{x}}/{{y}}.png&zmin={zooms[0]}&zmax={zooms[-1]}"
