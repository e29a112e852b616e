"""``geo-r1 sample-data OUT_DIR``: synthetic georeferenced rasters with known objects.

One procedurally drawn scene (numpy, deterministic for the seed) is written four times with
different georeferencing, so the same pixels must give the same answers whatever the CRS:

============== ============ ==========================================================
file           CRS          georeferencing
============== ============ ==========================================================
utm.tif        EPSG:32614   north-up, 0.5 m pixels (UTM 14N, Kansas)
wgs84.tif      EPSG:4326    north-up, 5e-6 degree pixels (about 0.44 x 0.56 m there)
webmercator.tif EPSG:3857   north-up, 0.6 m pixels (about 0.47 m on the ground)
rotated.tif    EPSG:32614   0.5 m pixels, rotated 20 degrees (GDAL terms b, d not zero)
============== ============ ==========================================================

The scene holds storage tanks of several sizes (one clearly the largest, and in many scenes one clearly the
smallest: the few-shot benchmark's held-out expression, in no query) on a gravel pad,
rectangular buildings with shadows, striped fields, a meandering river and two roads on a
textured vegetation background. Beside each raster, ``<name>.objects.geojson`` lists the true
boxes in the raster's CRS: the polygon of each box is
:func:`~geo_r1_qgis.core.geometry.box_to_polygon` of its pixel box (so on ``rotated.tif`` the
boxes are rotated too), with the properties ``id``, ``category``, ``pixel_box`` (``[x1, y1, x2,
y2]``, raster pixels, pixel-edge convention), ``expression`` (the most specific referring
expression that selects it) and ``expressions`` (all of them). Coordinates are in the CRS's x/y
order (longitude, latitude for EPSG:4326), as GDAL's GeoJSON driver reads an EPSG URN.
``<name>.outlines.geojson`` holds the same objects' true outlines: a MultiPolygon per object (same ``id`` and
``category``), the outline of the pixels painted for it that stay visible (:func:`render_scene_with_masks`),
traced along pixel edges (:func:`geo_r1_qgis.core.outline.mask_to_polygons`, no simplification) and placed by
the raster's transform. A tank's outline is its disk, where its box is a square; the river's is the band.
``samples.json`` indexes the rasters (CRS, size, GDAL geotransform, truth and outline files) and the queries.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geo_r1_qgis.core.errors import ConfigError, OutputError
from geo_r1_qgis.core.geometry import Affine, PixelBox, box_to_polygon, raster_bounds

log = logging.getLogger(__name__)

MIN_SIZE = 256
MAX_SIZE = 8192

#: Every colour drawn except the tank roofs keeps all channels below this, so "bright" pixels
#: (all three channels >= TANK_BRIGHT) are tank roofs and nothing else.
TANK_BRIGHT = 215

# Anchor of the scene: near 97.5 W, 38.4 N (UTM zone 14 N).
_UTM_ORIGIN = (630000.0, 4250000.0)
_LONLAT_ORIGIN = (-97.5, 38.4)
_WEBMERC_R = 6378137.0

#: The largest tank is always at least 1.65 x any other; the smallest gets its expression only when it is clearly
#: the smallest (radius at most SMALLEST_MARGIN x the next one), else no tank is "the smallest".
LARGEST_TANK = "the largest storage tank"
SMALLEST_TANK = "the smallest storage tank"
SMALLEST_MARGIN = 0.85

QUERIES = (
    (LARGEST_TANK, "one", "tank"),
    ("all storage tanks", "all", "tank"),
    ("all buildings", "all", "building"),
    ("all fields", "all", "field"),
    ("the river", "one", "river"),
    ("all roads", "all", "road"),
)


@dataclass(frozen=True)
class SampleDataConfig:
    """Where and how to write the sample rasters."""

    out_dir: Path = field(
        metadata={"positional": True, "metavar": "OUT_DIR", "help": "folder to write into (created if missing)"}
    )
    seed: int = field(default=0, metadata={"help": "random seed; the same seed gives identical pixels"})
    size: int = field(default=1024, metadata={"help": f"raster width and height in pixels ({MIN_SIZE}..{MAX_SIZE})"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ConfigError(f"OUT_DIR {str(self.out_dir)!r} exists and is not a folder; choose another path")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"--seed must be an integer >= 0, got {self.seed!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not MIN_SIZE <= self.size <= MAX_SIZE:
            raise ConfigError(
                f"--size must be an integer from {MIN_SIZE} to {MAX_SIZE} pixels, got {self.size!r}; e.g. --size 1024"
            )


@dataclass(frozen=True)
class SceneObject:
    """One true object of the scene, in raster pixels."""

    id: str
    category: str
    box: PixelBox
    expressions: tuple[str, ...]


@dataclass(frozen=True)
class RasterSpec:
    name: str
    epsg: int
    transform: Affine


# --------------------------------------------------------------------------------------------------
# Georeferencing
# --------------------------------------------------------------------------------------------------


def raster_specs(size: int) -> list[RasterSpec]:
    """The four rasters' names, CRSs and transforms (pixel -> map), built with the pure Affine."""
    ux, uy = _UTM_ORIGIN
    lon, lat = _LONLAT_ORIGIN
    mx = round(_WEBMERC_R * math.radians(lon), 2)
    my = round(_WEBMERC_R * math.log(math.tan(math.pi / 4 + math.radians(lat) / 2)), 2)
    return [
        RasterSpec("utm", 32614, Affine(0.5, 0.0, ux, 0.0, -0.5, uy)),
        RasterSpec("wgs84", 4326, Affine(5e-6, 0.0, lon, 0.0, -5e-6, lat)),
        RasterSpec("webmercator", 3857, Affine(0.6, 0.0, mx, 0.0, -0.6, my)),
        RasterSpec("rotated", 32614, Affine.translation(ux, uy) * Affine.rotation(20.0) * Affine.scale(0.5, -0.5)),
    ]


# --------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a (cells+1)^2 random grid, bilinearly upsampled to size x size."""
    grid = rng.random((cells + 1, cells + 1))
    pos = (np.arange(size) + 0.5) * (cells / size)
    i0 = np.minimum(pos.astype(np.int64), cells - 1)
    w = (pos - i0)[:, None]
    rows = grid[i0] * (1 - w) + grid[i0 + 1] * w  # (size, cells + 1)
    return rows[:, i0] * (1 - w.T) + rows[:, i0 + 1] * w.T


def _paint(img: np.ndarray, mask: np.ndarray, y0: int, x0: int, colour: np.ndarray) -> None:
    """Set the masked pixels of the block at (y0, x0) to colour (3,) or (h, w, 3)."""
    h, w = mask.shape
    block = img[y0 : y0 + h, x0 : x0 + w]
    block[mask] = colour[mask] if colour.ndim == 3 else colour


def _mask_box(mask: np.ndarray, y0: int = 0, x0: int = 0) -> PixelBox:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return PixelBox(float(x0 + cols[0]), float(y0 + rows[0]), float(x0 + cols[-1] + 1), float(y0 + rows[-1] + 1))


def _disk_d2(cx: float, cy: float, r: float) -> tuple[np.ndarray, int, int]:
    """Squared distances of pixel centres to (cx, cy) over the block holding the disk of radius r,
    with the block's top-left offset (row, col)."""
    x0, y0 = math.floor(cx - r), math.floor(cy - r)
    n = math.ceil(2 * r) + 2
    yy, xx = np.ogrid[0:n, 0:n]
    return (xx + x0 + 0.5 - cx) ** 2 + (yy + y0 + 0.5 - cy) ** 2, y0, x0


def _disk(cx: float, cy: float, r: float) -> tuple[np.ndarray, int, int]:
    """Mask of the pixels whose centres lie within r of (cx, cy), with its top-left offset."""
    d2, y0, x0 = _disk_d2(cx, cy, r)
    return d2 <= r * r, y0, x0


def render_scene(size: int, seed: int) -> tuple[np.ndarray, list[SceneObject]]:
    """Draw the scene: a (size, size, 3) uint8 image and its true objects (raster pixels)."""
    image, objects, _ = render_scene_with_masks(size, seed)
    return image, objects


def render_scene_with_masks(size: int, seed: int) -> tuple[np.ndarray, list[SceneObject], np.ndarray]:
    """:func:`render_scene` and the true masks: a (size, size) int16 label map where pixel value ``k + 1`` is
    ``objects[k]`` and 0 is background (the gravel pad, river banks, shadows, vegetation).

    The labels are written where the object's own pixels are painted, in the drawing order, so each object's
    mask is what is visible of it (the roads' bridge cuts the river; a shadow painted later covers what it
    falls on). The image is the same, pixel for pixel, as without the labels: they take no random draws."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size), np.int16)
    s = float(size)
    yy, xx = np.ogrid[0:size, 0:size]
    xc, yc = xx + 0.5, yy + 0.5  # pixel centres

    # Background: vegetation with low-frequency patches and fine grain.
    patches = _smooth_noise(rng, size, max(4, size // 96))
    base = np.array([92.0, 108.0, 66.0]) + (patches[..., None] - 0.5) * np.array([40.0, 44.0, 30.0])
    img = (base + 4.0 * rng.standard_normal((size, size, 3), dtype=np.float32)).astype(np.float32)
    objects: list[SceneObject] = []

    # Fields: a 2 x 2 block of striped fields, bottom left.
    fx0, fy0, fw, fh, gap = 0.04 * s, 0.56 * s, 0.38 * s, 0.40 * s, 0.02 * s
    cw, ch = (fw - gap) / 2, (fh - gap) / 2
    field_colours = ([150, 140, 70], [80, 125, 55], [170, 150, 95], [115, 135, 60])
    for k in range(4):
        r, c = divmod(k, 2)
        x1, y1 = round(fx0 + c * (cw + gap)), round(fy0 + r * (ch + gap))
        x2, y2 = round(fx0 + c * (cw + gap) + cw), round(fy0 + r * (ch + gap) + ch)
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(0.008, 0.016) * s + 2
        fy, fx = np.ogrid[y1:y2, x1:x2]
        stripes = np.sin(2 * math.pi * (fx * math.cos(theta) + fy * math.sin(theta)) / period)
        colour = np.array(field_colours[k], float) + stripes[..., None] * 14.0
        img[y1:y2, x1:x2] = colour + rng.normal(0.0, 3.0, (y2 - y1, x2 - x1, 3))
        labels[y1:y2, x1:x2] = len(objects) + 1
        objects.append(SceneObject(f"field-{k + 1}", "field", PixelBox(x1, y1, x2, y2), ("all fields",)))

    # Gravel pad of the tank farm, top left.
    px1, py1, px2, py2 = (round(v * s) for v in (0.04, 0.04, 0.42, 0.44))
    img[py1:py2, px1:px2] = np.array([138.0, 133.0, 124.0]) + rng.normal(0.0, 5.0, (py2 - py1, px2 - px1, 3))
    labels[py1:py2, px1:px2] = 0

    # River: meanders from top to bottom on the right; sandy banks.
    phase1, phase2 = rng.uniform(0, 2 * math.pi, 2)
    centre = (
        0.80 * s
        + 0.05 * s * np.sin(2 * math.pi * 1.3 * yc / s + phase1)
        + 0.012 * s * np.sin(2 * math.pi * 3.1 * yc / s + phase2)
    )
    half = 0.016 * s
    dist = np.abs(xc - centre)
    bank = dist <= half + max(2.0, 0.004 * s)
    water = dist <= half
    img[np.broadcast_to(bank, (size, size))] = (158.0, 148.0, 118.0)
    labels[np.broadcast_to(bank, (size, size))] = 0
    img[water] = np.array([38.0, 66.0, 92.0]) + 3.0 * rng.standard_normal((int(water.sum()), 3))
    labels[water] = len(objects) + 1
    objects.append(SceneObject("river-1", "river", _mask_box(np.broadcast_to(water, (size, size))), ("the river",)))

    # Roads: one east-west across the whole scene (a bridge over the river), one north-south.
    road_half = max(1.5, 0.006 * s)
    asphalt = np.array([108.0, 106.0, 104.0])
    ew = np.abs(yc - (0.5 * s + 0.02 * (xc - 0.5 * s))) <= road_half
    ns = np.abs(xc - 0.46 * s) <= road_half
    for k, road in enumerate((ew, ns)):
        full = np.broadcast_to(road, (size, size))
        img[full] = asphalt + rng.normal(0.0, 2.5, 3)
        labels[full] = len(objects) + 1
        objects.append(SceneObject(f"road-{k + 1}", "road", _mask_box(full), ("all roads",)))

    # Buildings: two blocks between the north-south road and the river, with shadows.
    roofs = ([150, 72, 60], [122, 122, 128], [84, 84, 90], [92, 112, 140], [170, 160, 150])
    n_building = 0
    for by1, by2 in ((0.05, 0.45), (0.56, 0.95)):
        cell_w, cell_h = 0.09 * s, (by2 - by1) / 4 * s
        for r in range(4):
            for c in range(2):
                bw, bh = rng.uniform(0.035, 0.07) * s, rng.uniform(0.03, 0.06) * s
                bx1 = round(0.50 * s + c * cell_w + rng.uniform(0, cell_w - bw - 0.012 * s))
                by = round(by1 * s + r * cell_h + rng.uniform(0, max(1.0, cell_h - bh - 0.012 * s)))
                bx2, by_2 = bx1 + max(3, round(bw)), by + max(3, round(bh))
                sh = max(2, round(0.006 * s))
                img[by + sh : by_2 + sh, bx1 + sh : bx2 + sh] = (52.0, 56.0, 44.0)  # shadow to the south-east
                labels[by + sh : by_2 + sh, bx1 + sh : bx2 + sh] = 0
                roof = np.array(roofs[int(rng.integers(len(roofs)))], float)
                img[by:by_2, bx1:bx2] = roof + rng.normal(0.0, 3.0, (by_2 - by, bx2 - bx1, 3))
                img[by:by_2, (bx1 + bx2) // 2] = roof * 0.8  # roof ridge
                labels[by:by_2, bx1:bx2] = len(objects) + 1
                n_building += 1
                objects.append(
                    SceneObject(f"building-{n_building}", "building", PixelBox(bx1, by, bx2, by_2), ("all buildings",))
                )

    # Storage tanks: 7 of a 3 x 3 grid of cells on the pad; one cell holds the clearly largest tank.
    cells = rng.permutation(9)[:7]
    pad_cell = (px2 - px1) / 3
    radii = list(rng.uniform(0.014, 0.03, 6) * s)
    radii.insert(int(rng.integers(7)), 0.05 * s)  # at least 1.65 x any other
    largest = int(np.argmax(radii))
    by_size = sorted(range(7), key=lambda i: radii[i])
    smallest = by_size[0] if radii[by_size[0]] <= SMALLEST_MARGIN * radii[by_size[1]] else -1
    tanks: list[tuple[float, float, float]] = []
    for cell, r in zip(cells, radii, strict=True):
        row, col = divmod(int(cell), 3)
        room = pad_cell / 2 - r - 3
        cx = px1 + (col + 0.5) * pad_cell + rng.uniform(-room, room)
        cy = py1 + (row + 0.5) * pad_cell + rng.uniform(-room, room)
        tanks.append((cx, cy, r))
    for k, (cx, cy, r) in enumerate(tanks):
        shadow, sy0, sx0 = _disk(cx + 0.22 * r, cy + 0.22 * r, r)
        _paint(img, shadow, sy0, sx0, np.array([58.0, 58.0, 54.0]))
        _paint(labels, shadow, sy0, sx0, np.array(0))
        d2, y0, x0 = _disk_d2(cx, cy, r)
        disk = d2 <= r * r
        roof = np.clip(np.array([233.0, 233.0, 227.0]) + rng.normal(0.0, 2.0, (*disk.shape, 3)), 218, 245)
        roof[disk & (d2 > (0.7 * r) ** 2) & (d2 <= (0.7 * r + 1.0) ** 2)] = (222.0, 222.0, 216.0)  # floating roof
        roof[disk & (d2 > (r - max(1.5, 0.08 * r)) ** 2)] = (196.0, 196.0, 192.0)  # rim
        _paint(img, disk, y0, x0, roof)
        _paint(labels, disk, y0, x0, np.array(len(objects) + 1))
        expressions = ("all storage tanks",)
        if k == largest:
            expressions = (LARGEST_TANK, "all storage tanks")
        elif k == smallest:
            expressions = (SMALLEST_TANK, "all storage tanks")
        objects.append(SceneObject(f"tank-{k + 1}", "tank", _mask_box(disk, y0, x0), expressions))

    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    # Keep the "bright = tank roof" promise everywhere else (noise could reach it in theory).
    tank_mask = np.zeros((size, size), bool)
    for cx, cy, r in tanks:
        disk, y0, x0 = _disk(cx, cy, r)
        tank_mask[y0 : y0 + disk.shape[0], x0 : x0 + disk.shape[1]] |= disk
    np.minimum(out, TANK_BRIGHT - 1, out=out, where=~tank_mask[..., None])
    return out, objects, labels


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _feature(obj: SceneObject, transform: Affine) -> dict[str, Any]:
    ring = box_to_polygon(obj.box, transform)
    return {
        "type": "Feature",
        "id": obj.id,
        "geometry": {"type": "Polygon", "coordinates": [[list(p) for p in ring]]},
        "properties": {
            "id": obj.id,
            "category": obj.category,
            "pixel_box": [int(v) for v in obj.box.as_tuple()],
            "expression": obj.expressions[0],
            "expressions": list(obj.expressions),
        },
    }


def _outline_feature(obj: SceneObject, mask: np.ndarray, transform: Affine) -> dict[str, Any]:
    """The object's true outline (``mask``: its visible pixels in the raster) as a GeoJSON MultiPolygon."""
    from geo_r1_qgis.core.outline import mask_to_polygons, polygon_to_map

    x1, y1, x2, y2 = (int(v) for v in obj.box.as_tuple())
    placed = transform * Affine.translation(x1, y1)
    polygons = [polygon_to_map(p, placed) for p in mask_to_polygons(mask[y1:y2, x1:x2], 0.0)]
    return {
        "type": "Feature",
        "id": obj.id,
        "geometry": {"type": "MultiPolygon", "coordinates": [[r.tolist() for r in p] for p in polygons]},
        "properties": {"id": obj.id, "category": obj.category},
    }


def _write_tif(path: Path, image: np.ndarray, spec: RasterSpec) -> None:
    import rasterio
    from rasterio.crs import CRS
    from rasterio.transform import Affine as RioAffine

    height, width, _ = image.shape
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": 3,
        "dtype": "uint8",
        "crs": CRS.from_epsg(spec.epsg),
        "transform": RioAffine(*spec.transform.to_tuple()),
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "zlevel": 1,
        "interleave": "pixel",
        "photometric": "RGB",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.ascontiguousarray(image.transpose(2, 0, 1)))


def write_samples(config: SampleDataConfig) -> list[Path]:
    """Render the scene and write the four rasters, their truth files and ``samples.json``.

    Returns the written paths (rasters, truth and outline files in :func:`raster_specs` order, then the
    index). Existing files of the same names are replaced.
    """
    t0 = time.perf_counter()
    try:
        config.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the folder {str(config.out_dir)!r}: {exc}; choose a writable path") from exc
    image, objects, labels = render_scene_with_masks(config.size, config.seed)
    written: list[Path] = []
    entries = []
    try:
        for spec in raster_specs(config.size):
            tif = config.out_dir / f"{spec.name}.tif"
            truth = config.out_dir / f"{spec.name}.objects.geojson"
            _write_tif(tif, image, spec)
            collection = {
                "type": "FeatureCollection",
                "name": f"{spec.name}.objects",
                "crs": {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{spec.epsg}"}},
                "features": [_feature(obj, spec.transform) for obj in objects],
            }
            truth.write_text(json.dumps(collection, indent=1) + "\n", encoding="utf-8")
            outlines = config.out_dir / f"{spec.name}.outlines.geojson"
            outline_collection = dict(collection, name=f"{spec.name}.outlines", features=[
                _outline_feature(obj, labels == k + 1, spec.transform) for k, obj in enumerate(objects)])  # fmt: skip
            outlines.write_text(json.dumps(outline_collection) + "\n", encoding="utf-8")
            written += [tif, truth, outlines]
            entries.append(
                {
                    "name": spec.name,
                    "path": tif.name,
                    "crs": f"EPSG:{spec.epsg}",
                    "width": config.size,
                    "height": config.size,
                    "transform": list(spec.transform.to_gdal()),
                    "bounds": list(raster_bounds(spec.transform, config.size, config.size)),
                    "rotated": not spec.transform.is_rectilinear,
                    "truth": truth.name,
                    "outlines": outlines.name,
                }
            )
        index = {
            "generator": "geo-r1 sample-data",
            "seed": config.seed,
            "size": config.size,
            "transform_order": "GDAL geotransform (c, a, b, f, d, e): x = c + a*col + b*row, y = f + d*col + e*row",
            "rasters": entries,
            "queries": [
                {
                    "expression": text,
                    "mode": mode,
                    "category": category,
                    "ids": [o.id for o in objects if text in o.expressions],
                }
                for text, mode, category in QUERIES
            ],
        }
        path = config.out_dir / "samples.json"
        path.write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
        written.append(path)
    except OSError as exc:
        raise OutputError(f"cannot write the sample data into {str(config.out_dir)!r}: {exc}") from exc
    log.debug("sample data written in %.2f s", time.perf_counter() - t0)
    return written
