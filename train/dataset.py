"""``geo-r1 dataset``: fine-tuning datasets from boxes drawn on georeferenced rasters.

Four actions, one module (the dataset directory itself is defined in :mod:`train.data_format`):

``import LAYER --raster R (--expression E | --expression-field F) -o ANN.gpkg``
    Any polygon layer (GeoPackage, GeoJSON, Shapefile...) becomes annotations
    (:mod:`geo_r1_qgis.core.annotations`), reprojected to the raster's CRS, appended to ``ANN.gpkg``.
``build ANN.gpkg [ANN2.gpkg ...] -o DIR``
    Chips around every annotation at the working ground resolution, their boxes in chip pixels, the
    JSONL records, Geo-R1's evaluation JSON for val/test and the manifest. See "Chips" below.
``synthetic -o DIR --shots K``
    A small learnable few-shot set from the scenes of :mod:`train.sample_data` (for the tiny CPU model).
``from-json EVAL.json --images DIR -o OUT``
    A dataset directory from a VRSBench / DIOR-RSVG style evaluation JSON and its images.

Chips
-----
All placement maths is in :mod:`train.chips` (pure). A chip is a square window of the raster, ``side``
raster pixels wide (``--chip`` times the working GSD over the native one, rounded to whole pixels), read
with rasterio (:class:`engine.rasters.RasterioSource`: band choice, 8-bit stretch, nodata) and resampled to
``--chip`` pixels, a multiple of 28 so the model sees it unresized. Each annotation gives
``--chips-per-box`` chips, each at a random offset that keeps the whole target inside. An object of the
same expression counts in a chip when more than half of its box is inside; a chip that cuts one with half
or less inside is re-drawn (a few tries), else dropped, so the answer is never ambiguous.

Spatial split
-------------
An annotation's ``split`` field decides its split. ``--val-fraction`` moves training annotations to
validation by whole grid cells (``--cell-chips`` chips wide) and chips are placed split by split, train
first: a chip of one split whose footprint would overlap a chip of another split on the same raster is
re-drawn or dropped. So no validation or test chip shares a single pixel with a training chip. Different
rasters are taken to show different ground; ``chips.jsonl`` lists every chip's raster window and affine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from geo_r1_qgis.core.annotations import FIELDS, GEOMETRY_TYPE, LAYER_NAME, SPLITS, Annotation
from geo_r1_qgis.core.errors import ConfigError, NotGeoreferencedError, OutputError, RasterError
from train import chips as cm
from train.data_format import (
    IMAGES_DIR,
    MANIFEST,
    OUTLINE_DECIMALS,
    TASKS,
    ChipRecord,
    eval_json_name,
    write_records,
)

log = logging.getLogger(__name__)

#: Index of the chips of a built dataset: one JSON line per chip (id, image, split, raster, window, affine).
CHIPS_INDEX = "chips.jsonl"
FORMAT_VERSION = 1
FRAME_NOTE = (
    "chip sides are multiples of 28 within Qwen2.5-VL's pixel bounds, so smart_resize leaves them unchanged: "
    "the model's frame is the image frame and boxes are in chip pixels"
)
#: The categories of the sample scenes used by ``dataset synthetic`` and their expressions, in two styles:
#: ``short`` (the category's name, as Geo-R1's OVD classes) and ``all`` (the sample model's own "all storage
#: tanks", so a dataset speaks the expressions the shipped model was trained on).
SYNTHETIC_STYLES = {
    "short": {"tank": "storage tank", "building": "building"},
    "all": {"tank": "all storage tanks", "building": "all buildings"},
}
#: Single objects ``dataset synthetic --categories`` can also name, in every style: the tank a scene's referring
#: expression selects (``train.sample_data``: every scene has a largest tank, many a clearly smallest one). The
#: sample model was trained on the largest; the smallest is the few-shot benchmark's held-out expression.
SYNTHETIC_SELECTIONS = {"largest-tank": "the largest storage tank", "smallest-tank": "the smallest storage tank"}


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be a whole number >= {minimum}, got {value!r}")


def _now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _crs_text(crs: Any) -> str:
    """``EPSG:nnnn`` when the CRS has an EPSG code, else its WKT."""
    epsg = crs.to_epsg() if hasattr(crs, "to_epsg") else None
    return f"EPSG:{epsg}" if epsg else crs.to_wkt()


@contextmanager
def staging(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Build into ``DIR.tmp`` and rename it to ``DIR`` at the end, so a failure never leaves half a dataset.

    ``DIR`` must not exist unless ``overwrite`` (then it is replaced only once the new one is complete)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise OutputError(f"{out_dir} already exists; choose another -o folder, or pass --overwrite to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir} exists and is not a folder; choose another -o path")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    try:
        if tmp.exists():
            log.warning("removing %s, left over from an interrupted build", tmp)
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise OutputError(
            f"cannot create the output folder {tmp} ({exc.strerror or exc}); choose a writable -o"
        ) from None
    try:
        yield tmp
        old = out_dir.with_name(out_dir.name + ".old")
        if out_dir.exists():
            if old.exists():
                shutil.rmtree(old)
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------------
# Annotation files
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnnotationFeature:
    """One feature of an annotation layer: its id, attributes and polygon (shapely, in ``crs``)."""

    fid: int
    annotation: Annotation
    geometry: Any
    source: Path

    @property
    def name(self) -> str:
        return f"feature {self.fid} ({self.annotation.expression!r}) of {self.source.name}"


@dataclass(frozen=True)
class AnnotationSet:
    path: Path
    crs: str
    features: tuple[AnnotationFeature, ...]
    sha256: str


def features_sha256(crs: str, items: Sequence[tuple[Annotation, Any]]) -> str:
    """A hash of the features' attributes and geometries that ignores their order (and fids)."""
    import shapely

    lines = sorted(
        json.dumps(
            {"a": a.to_attributes(), "g": shapely.to_wkb(g, hex=True, byte_order=1, output_dimension=2)},
            sort_keys=True,
        )
        for a, g in items
    )
    digest = hashlib.sha256(f"crs={crs}\n".encode())
    for line in lines:
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()


def _list_layers(path: Path) -> list[str]:
    from engine.gpkg import list_layers

    return list_layers(path)


def read_annotations(path: Path) -> AnnotationSet:
    """The annotations of a GeoPackage written by ``geo-r1 dataset import`` (or the plugin)."""
    import pyogrio
    import shapely

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"the annotation file {path} does not exist; make one with 'geo-r1 dataset import'")
    try:
        layers = [str(n) for n, _ in pyogrio.list_layers(path)]
    except Exception as exc:
        raise ConfigError(f"cannot read {path} as a vector file ({exc})") from None
    if LAYER_NAME not in layers:
        raise ConfigError(
            f"{path} has no {LAYER_NAME!r} layer (it has {layers}); turn a polygon layer into annotations with "
            f"'geo-r1 dataset import {path} --raster R --expression E -o ANN.gpkg'"
        )
    meta, fids, geoms, data = pyogrio.raw.read(path, layer=LAYER_NAME, return_fids=True)
    if len(fids) == 0:
        raise ConfigError(f"the annotation layer of {path} is empty; draw or import some annotations first")
    if not meta.get("crs"):
        raise ConfigError(f"the annotation layer of {path} has no CRS; it must be in its raster's CRS")
    names = [str(n) for n in meta["fields"]]
    missing = [f[0] for f in FIELDS if f[2] and f[0] not in names]
    if missing:
        raise ConfigError(f"the annotation layer of {path} lacks the field(s) {missing}; re-import it")
    features = []
    for i, fid in enumerate(fids):
        attrs = {
            name: (col[i].item() if hasattr(col[i], "item") else col[i]) for name, col in zip(names, data, strict=True)
        }
        where = f"feature {int(fid)} of {path}"
        ann = Annotation.from_attributes(attrs, where=where)
        if geoms[i] is None:
            log.warning("%s has no geometry; skipped", where)
            continue
        geom = shapely.from_wkb(geoms[i])
        if geom.is_empty or geom.geom_type not in ("Polygon", "MultiPolygon"):
            log.warning("%s is not a polygon (%s); skipped", where, geom.geom_type)
            continue
        features.append(AnnotationFeature(int(fid), ann, geom, path))
    if not features:
        raise ConfigError(f"the annotation layer of {path} has no usable polygon")
    sha = features_sha256(str(meta["crs"]), [(f.annotation, f.geometry) for f in features])
    return AnnotationSet(path, str(meta["crs"]), tuple(features), sha)


def write_annotations(path: Path, items: Sequence[tuple[Annotation, Any]], crs: str) -> int:
    """Append annotations (attributes, shapely polygon in ``crs``) to the GeoPackage ``path``
    (created when missing); returns the number written."""
    import numpy as np
    import pyogrio
    import shapely
    from pyproj import CRS

    path = Path(path)
    if path.suffix.lower() != ".gpkg":
        raise OutputError(f"the annotation file must be a GeoPackage (.gpkg), got {path}")
    exists = path.exists()
    layer_exists = LAYER_NAME in _list_layers(path) if exists else False
    if layer_exists:
        meta = pyogrio.read_info(path, layer=LAYER_NAME)
        if meta.get("crs") and not CRS.from_user_input(meta["crs"]).equals(CRS.from_user_input(crs)):
            raise OutputError(
                f"{path} holds annotations in {meta['crs']}, but these are in {_crs_text(CRS.from_user_input(crs))} "
                "(the raster's CRS); write them to another annotation file (build takes several)"
            )
    if not items:
        return 0
    if not exists:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the folder of {path} ({exc.strerror or exc})") from None
    geoms = np.array([shapely.to_wkb(g, output_dimension=2) for _, g in items], dtype=object)
    names, arrays, masks = [], [], []
    for name, type_, _, _ in FIELDS:
        values = [a.to_attributes()[name] for a, _ in items]
        names.append(name)
        if type_ == "bool":
            arrays.append(np.array([bool(v) for v in values], dtype=bool))
            masks.append(np.array([v is None for v in values], dtype=bool))
        else:
            arrays.append(np.array(values, dtype=object))
            masks.append(None)
    try:
        pyogrio.raw.write(
            path,
            geoms,
            arrays,
            names,
            field_mask=masks,
            layer=LAYER_NAME,
            driver="GPKG",
            geometry_type=GEOMETRY_TYPE,
            crs=crs,
            append=exists,
            **({} if exists else {"dataset_options": {"VERSION": "1.2"}}),
        )
    except Exception as exc:
        raise OutputError(f"cannot write the annotations to {path} ({exc}); choose a writable .gpkg path") from None
    return len(items)


def reproject(geoms: Sequence[Any], src_crs: str, dst_crs: str, what: str) -> list[Any]:
    """Shapely geometries from ``src_crs`` to ``dst_crs`` (vertex by vertex, x/y order)."""
    import numpy as np
    import shapely
    from pyproj import CRS, Transformer
    from pyproj.exceptions import CRSError, ProjError

    try:
        src, dst = CRS.from_user_input(src_crs), CRS.from_user_input(dst_crs)
    except CRSError as exc:
        raise ConfigError(f"{what}: unknown CRS ({exc})") from None
    if src.equals(dst):
        return list(geoms)
    transformer = Transformer.from_crs(src, dst, always_xy=True)

    def move(xy: Any) -> Any:
        x, y = transformer.transform(xy[:, 0], xy[:, 1], errcheck=True)
        return np.column_stack([x, y])

    try:
        out = [shapely.transform(g, move) for g in geoms]
    except ProjError as exc:
        raise ConfigError(
            f"{what}: cannot reproject from {_crs_text(src)} to the raster's {_crs_text(dst)} ({exc}); "
            "check that the layer's CRS is right and that it lies near the raster"
        ) from None
    for g in out:
        if not np.isfinite(shapely.get_coordinates(g)).all():
            raise ConfigError(
                f"{what}: reprojecting from {_crs_text(src)} to {_crs_text(dst)} gives infinite coordinates; "
                "check the layer's CRS"
            )
    return out


def _few(values: Sequence[Any], n: int = 5) -> str:
    """``1, 2, 3, 4, 5 and 7 more`` for log lines."""
    head = ", ".join(str(v) for v in values[:n])
    return head + (f" and {len(values) - n} more" if len(values) > n else "")


def _resolve_raster(text: str, annotation_file: Path) -> Path:
    """An annotation's raster: absolute, or relative to the annotation file, else to the working folder."""
    p = Path(text).expanduser()
    if p.is_absolute():
        return p
    beside = annotation_file.parent / p
    return beside if beside.exists() or not p.exists() else p


# --------------------------------------------------------------------------------------------------
# import
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportConfig:
    """``geo-r1 dataset import``: a polygon layer to annotations of one raster."""

    layer: Path = field(
        metadata={"positional": True, "metavar": "LAYER", "help": "polygon layer (.gpkg, .geojson, .shp...)"}
    )
    raster: Path = field(metadata={"help": "the raster the polygons outline objects on"})
    output: Path = field(
        metadata={"flags": ("-o", "--output"), "help": "annotation GeoPackage (appended to if it exists)"}
    )
    expression: str | None = field(
        default=None,
        metadata={"one_of": ("expression", True), "help": 'one expression for every polygon, e.g. "storage tank"'},
    )
    expression_field: str | None = field(
        default=None,
        metadata={"one_of": ("expression", True), "metavar": "NAME",
                  "help": "the layer field that holds each expression"},
    )  # fmt: skip
    category: str | None = field(default=None, metadata={"help": "category of the objects (default: the expression)"})
    split_field: str | None = field(
        default=None, metadata={"metavar": "F", "help": "layer field with train/val/test (default: all train)"}
    )
    source_layer: str | None = field(
        default=None, metadata={"flags": ("--layer-name",), "help": "which layer of LAYER (default: the first)"}
    )

    def __post_init__(self) -> None:
        for name in ("layer", "raster", "output"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        if (self.expression is None) == (self.expression_field is None):
            raise ConfigError(
                'give exactly one of --expression "storage tank" (the same for every polygon) and '
                "--expression-field NAME (a field of the layer)"
            )
        if self.expression is not None and not self.expression.strip():
            raise ConfigError("--expression is empty; say what the polygons outline, e.g. --expression 'storage tank'")
        if self.output.suffix.lower() != ".gpkg":
            raise ConfigError(f"-o must be a GeoPackage path ending in .gpkg, got {self.output}")


def run_import(config: ImportConfig) -> int:
    """Import the layer; returns the number of annotations written."""
    import pyogrio
    import shapely

    from engine.rasters import RasterioSource

    if not config.layer.exists():
        raise ConfigError(f"the layer {config.layer} does not exist; check the path")
    with RasterioSource(config.raster) as src:
        raster_crs = src.crs_wkt
        transform, width, height = src.transform, src.width, src.height
    try:
        meta, fids, geoms, data = pyogrio.raw.read(config.layer, layer=config.source_layer, return_fids=True)
    except Exception as exc:
        raise ConfigError(f"cannot read {config.layer} as a vector layer ({exc})") from None
    what = f"the layer {config.layer}"
    if len(fids) == 0:
        raise ConfigError(f"{what} is empty; nothing to import")
    if not meta.get("crs"):
        raise ConfigError(
            f"{what} has no CRS, so its polygons cannot be placed on the raster; assign the CRS they were drawn "
            f"in, e.g. ogr2ogr -a_srs EPSG:4326 fixed.gpkg {config.layer} (or set the layer's CRS in QGIS)"
        )
    names = [str(n) for n in meta["fields"]]
    for opt, name in (("--expression-field", config.expression_field), ("--split-field", config.split_field)):
        if name is not None and name not in names:
            raise ConfigError(f"{what} has no field {name!r} for {opt}; its fields are {names}")
    columns = dict(zip(names, data, strict=True))
    created = _now_iso()
    parts: list[tuple[int, Any]] = []
    for i, wkb in enumerate(geoms):
        geom = None if wkb is None else shapely.from_wkb(wkb)
        if geom is None or geom.is_empty:
            log.warning("feature %d of %s has no geometry; skipped", int(fids[i]), config.layer.name)
            continue
        if geom.geom_type == "Polygon":
            parts.append((i, geom))
        elif geom.geom_type == "MultiPolygon":
            parts.extend((i, g) for g in geom.geoms)  # one object per part
        else:
            raise ConfigError(
                f"{what} holds {geom.geom_type} geometries; import takes polygons drawn around objects "
                "(buffer points or lines first)"
            )
    moved = reproject([g for _, g in parts], str(meta["crs"]), raster_crs, what)
    from geo_r1_qgis.core.geometry import raster_bounds

    bounds = shapely.box(*raster_bounds(transform, width, height))
    items: list[tuple[Annotation, Any]] = []
    outside: list[int] = []
    for (i, _), geom in zip(parts, moved, strict=True):
        fid = int(fids[i])
        if config.expression is not None:
            expression = config.expression
        else:
            value = columns[config.expression_field][i]
            expression = "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
            if not expression.strip():
                log.warning(
                    "feature %d of %s has an empty %r; skipped", fid, config.layer.name, config.expression_field
                )
                continue
        split = "train"
        if config.split_field is not None:
            value = columns[config.split_field][i]
            split = "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
        if not geom.intersects(bounds):
            outside.append(fid)
            continue
        ann = Annotation.from_attributes(
            {
                "expression": expression,
                "category": config.category or "",
                "raster": str(config.raster.resolve()),
                "split": split,
                "created": created,
            },
            where=f"feature {fid} of {config.layer}",
        )
        items.append((ann, shapely.orient_polygons(geom) if hasattr(shapely, "orient_polygons") else geom))
    if outside:
        log.warning(
            "%d polygon(s) of %s lie outside the raster %s and are skipped (features %s)",
            len(outside), config.layer.name, config.raster, _few(outside),
        )  # fmt: skip
    if not items:
        raise ConfigError(
            f"none of the {len(parts)} polygon(s) of {what} lies on the raster {config.raster}"
            + (" (all outside: check the layer's CRS and the raster)" if outside else "")
        )
    n = write_annotations(config.output, items, raster_crs)
    log.info(
        "imported %d annotation(s) from %s into %s (%d outside the raster)",
        n,
        config.layer,
        config.output,
        len(outside),
    )
    return n


# --------------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------------


def _parse_bands(text: str | None) -> tuple[int, ...] | None:
    from geo_r1_qgis.core.results import parse_bands

    return parse_bands(text)


@dataclass(frozen=True)
class BuildConfig:
    """``geo-r1 dataset build``: chips, records and manifest from annotation files."""

    annotations: tuple[Path, ...] = field(
        metadata={"positional": True, "nargs": "+", "type": Path, "metavar": "ANN.gpkg", "parse": tuple,
                  "help": "annotation GeoPackage(s)"},
    )  # fmt: skip
    out_dir: Path = field(
        metadata={"flags": ("-o", "--output"), "aliases": ("--out-dir",), "help": "dataset folder to create"}
    )
    gsd: float | None = field(
        default=None, metadata={"help": "working ground resolution in metres (default: each raster's own)"}
    )
    chip: int = field(default=504, metadata={"help": "chip side in pixels, a multiple of 28"})
    chips_per_box: int = field(default=4, metadata={"help": "chips per annotation, each at a random offset"})
    negatives: int = field(default=2, metadata={"help": "negative chips per expression and split"})
    seed: int = field(default=0, metadata={"help": "random seed; the same seed gives the same dataset"})
    val_fraction: float | None = field(
        default=None,
        metadata={"help": "share of train annotations moved to val by whole cells (default: 0.2, or 0 when some "
                          "annotation is already val)"},
    )  # fmt: skip
    cell_chips: int = field(default=3, metadata={"help": "split cell side in chips"})
    tries: int = field(default=25, metadata={"help": "random offsets tried per chip", "cli": False})
    bands: tuple[int, ...] | None = field(
        default=None,
        metadata={"action": "store", "parse": _parse_bands,
                  "help": "band numbers for R,G,B (default: the RGB bands, else the first three)"},
    )  # fmt: skip
    shots: int | None = field(
        default=None, metadata={"help": "at most this many train targets per expression", "cli": False}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace the dataset folder if it exists"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "annotations", tuple(Path(p) for p in self.annotations))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if not self.annotations:
            raise ConfigError("give at least one annotation GeoPackage")
        cm.check_chip_size(self.chip)
        _check_int("--chips-per-box", self.chips_per_box, 1)
        _check_int("--negatives", self.negatives, 0)
        _check_int("--seed", self.seed, 0)
        _check_int("--cell-chips", self.cell_chips, 1)
        _check_int("tries", self.tries, 1)
        if self.shots is not None:
            _check_int("--shots", self.shots, 1)
        if self.gsd is not None and not (
            isinstance(self.gsd, (int, float)) and math.isfinite(self.gsd) and self.gsd > 0
        ):
            raise ConfigError(f"--gsd must be a ground resolution in metres > 0, got {self.gsd!r}; e.g. --gsd 0.5")
        if self.val_fraction is not None and not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {self.val_fraction!r}; e.g. 0.2")


@dataclass
class _Obj:
    feature: AnnotationFeature
    ann: Annotation
    box: cm.Box  # raster pixels, clipped to the raster
    #: the polygon(s) in raster pixels: each an exterior ring then its holes, as (n, 2) arrays (col, row)
    rings: list[list[Any]] = field(default_factory=list)


@dataclass
class _Raster:
    path: Path
    src: Any
    scale: float
    side: int
    native_gsd_m: float
    objs: list[_Obj] = field(default_factory=list)
    placed: list[tuple[cm.Window, str]] = field(default_factory=list)

    def positives(self, expression: str) -> list[_Obj]:
        return [o for o in self.objs if not o.ann.negative and o.ann.expression == expression]


def _pixel_rings(geom: Any, inv: Any) -> list[list[Any]]:
    """A (Multi)Polygon's rings in raster pixels through the inverse affine ``inv``: one list of (n, 2) arrays
    (exterior, then holes) per polygon."""
    import numpy as np
    import shapely

    out = []
    for polygon in getattr(geom, "geoms", [geom]):
        rings = []
        for ring in (polygon.exterior, *polygon.interiors):
            xy = shapely.get_coordinates(ring)
            rings.append(np.column_stack([inv.a * xy[:, 0] + inv.b * xy[:, 1] + inv.c,
                                          inv.d * xy[:, 0] + inv.e * xy[:, 1] + inv.f]))  # fmt: skip
        out.append(rings)
    return out


def chip_outline(rings: Sequence[Sequence[Any]], window: Sequence[float], chip: int) -> list[list[list[list[float]]]]:
    """An object's polygon rings (raster pixels) in the pixels of the ``chip`` x ``chip`` image of ``window``
    (not clipped: the mask's rasterising clips to the chip)."""
    sx = chip / (window[2] - window[0])
    sy = chip / (window[3] - window[1])
    d = OUTLINE_DECIMALS  # as the records keep them, so the keypoints are those of the recorded outline
    return [
        [[[round((float(c) - window[0]) * sx, d), round((float(r) - window[1]) * sy, d)] for c, r in ring]
         for ring in polygon]
        for polygon in rings
    ]  # fmt: skip


def _fits(box: cm.Box, side: int) -> bool:
    return max(box[2] - box[0], box[3] - box[1]) <= side


class _Builder:
    """Places, reads and writes the chips of one build (one instance per run, top to bottom)."""

    def __init__(
        self, config: BuildConfig, sets: Sequence[AnnotationSet], out: Path, replay: Replay | None = None
    ) -> None:
        self.config = config
        self.sets = sets
        self.out = out
        self.replay = replay
        self.rng = random.Random(config.seed)
        self.rasters: dict[Path, _Raster] = {}
        self.records: list[ChipRecord] = []
        self.chips: list[dict[str, Any]] = []
        self.skipped: Counter[str] = Counter()
        self.counter: Counter[str] = Counter()

    # -- set up -------------------------------------------------------------------------------------
    def open_rasters(self) -> None:
        from engine.rasters import RasterioSource
        from geo_r1_qgis.core.geometry import gsd_to_scale

        for aset in self.sets:
            by_raster: dict[Path, list[AnnotationFeature]] = defaultdict(list)
            for f in aset.features:
                by_raster[_resolve_raster(f.annotation.raster, aset.path)].append(f)
            for path in sorted(by_raster):
                raster = self.rasters.get(path)
                if raster is None:
                    try:
                        src = RasterioSource(path, bands=self.config.bands)
                    except NotGeoreferencedError:
                        raise
                    except RasterError as exc:
                        raise RasterError(f"{exc} (named by annotations in {aset.path})") from None
                    units = src.crs_units_per_metre()
                    native = 1.0 / gsd_to_scale(1.0, src.transform, units)
                    scale = gsd_to_scale(self.config.gsd, src.transform, units) if self.config.gsd else 1.0
                    if self.replay is not None and path in self.replay.rasters:
                        scale = 1.0  # replayed: read at the raster's own resolution, whatever --gsd says
                    side = max(1, round(self.config.chip * scale))
                    raster = _Raster(path, src, scale, side, native)
                    self.rasters[path] = raster
                    if side > min(src.width, src.height):
                        log.warning(
                            "%s (%dx%d pixels) is smaller than one chip (%d raster pixels at %.3g m); "
                            "use a finer --gsd or a smaller --chip",
                            path.name,
                            src.width,
                            src.height,
                            side,
                            native * scale,
                        )
                self._add_objects(raster, aset, by_raster[path])

    def _add_objects(self, raster: _Raster, aset: AnnotationSet, features: list[AnnotationFeature]) -> None:
        import shapely

        src = raster.src
        geoms = reproject([f.geometry for f in features], aset.crs, src.crs_wkt, f"the annotations of {aset.path}")
        inv = src.transform.inverse()
        outside: list[str] = []
        for f, geom in zip(features, geoms, strict=True):
            xy = shapely.get_coordinates(geom)
            cols = inv.a * xy[:, 0] + inv.b * xy[:, 1] + inv.c
            rows = inv.d * xy[:, 0] + inv.e * xy[:, 1] + inv.f
            # snapped to 1e-6 pixel, so reprojection noise cannot move a box across the half-inside threshold
            box = (
                round(float(cols.min()), 6),
                round(float(rows.min()), 6),
                round(float(cols.max()), 6),
                round(float(rows.max()), 6),
            )
            clipped = (
                max(0.0, box[0]),
                max(0.0, box[1]),
                min(float(src.width), box[2]),
                min(float(src.height), box[3]),
            )
            if not (clipped[0] < clipped[2] and clipped[1] < clipped[3]):
                outside.append(str(f.fid))
                self.skipped["outside the raster"] += 1
                continue
            if clipped != box:
                log.warning("%s is partly outside the raster %s; its box is clipped", f.name, raster.path.name)
            raster.objs.append(_Obj(f, f.annotation, clipped, _pixel_rings(geom, inv)))
        if outside:
            log.warning(
                "%d annotation(s) of %s lie outside the raster %s and are skipped (features %s)",
                len(outside), aset.path.name, raster.path.name, _few(outside),
            )  # fmt: skip

    def assign_splits(self) -> None:
        """Move train annotations to val by whole grid cells (``--val-fraction``)."""
        fraction = self.config.val_fraction
        if fraction is None:
            named_val = any(o.ann.split == "val" for r in self.rasters.values() for o in r.objs)
            fraction = 0.0 if named_val else 0.2
        self.val_fraction = fraction
        for raster in self.rasters.values():
            cell = raster.side * self.config.cell_chips
            counts = Counter(cm.cell_of(o.box, cell) for o in raster.objs if o.ann.split == "train")
            val_cells = cm.choose_val_cells(counts, fraction, self.rng)
            if fraction > 0 and not val_cells and counts:
                log.warning(
                    "%s: every training annotation lies in one %d-pixel cell, so none moved to val; "
                    "set 'split' in the annotations or lower --cell-chips",
                    raster.path.name,
                    cell,
                )
            for o in raster.objs:
                if o.ann.split == "train" and cm.cell_of(o.box, cell) in val_cells:
                    o.ann = replace(o.ann, split="val")

    def targets(self, split: str) -> list[tuple[_Raster, _Obj]]:
        """The annotations that get chips in ``split``, in a fixed order; ``shots`` limits train ones."""
        out = [(r, o) for _, r in sorted(self.rasters.items()) for o in r.objs if o.ann.split == split]
        out.sort(key=lambda ro: (str(ro[0].path), ro[1].feature.source.name, ro[1].feature.fid))
        if split != "train" or self.config.shots is None:
            return out
        replay = self.replay.rasters if self.replay is not None else frozenset()
        keep: set[int] = set()
        # each part shuffled on its own (independent of --shots: 1-shot ⊂ 5-shot ⊂ 10-shot; the few-shot
        # part is the same with or without --replay)
        for part, cap, salt in ((False, self.config.shots, 7919), (True, self.replay and self.replay.shots, 7927)):
            shuffled = [(r, o) for r, o in out if (r.path in replay) == part]
            random.Random(self.config.seed + salt).shuffle(shuffled)
            per_expr: Counter[str] = Counter()
            for _, o in shuffled:
                if o.ann.negative:  # drawn negative areas are not shots: they all stay
                    keep.add(id(o))
                    continue
                if per_expr[o.ann.expression] < (cap or 0):
                    per_expr[o.ann.expression] += 1
                    keep.add(id(o))
        return [(r, o) for r, o in out if id(o) in keep]

    # -- placing ------------------------------------------------------------------------------------
    def _acceptor(self, raster: _Raster, split: str) -> Any:
        others = [w for w, s in raster.placed if s != split]
        return lambda window: cm.disjoint_from(window, others)

    def _read_write(
        self, raster: _Raster, window: cm.Window, split: str, obj: _Obj | None, expression: str
    ) -> tuple[str, str] | None:
        """Read the chip, write its PNG and index entry; ``(id, image path)``, or ``None`` when nodata only."""
        from PIL import Image

        from geo_r1_qgis.core.geometry import Affine, PixelBox, Tile

        chip = self.config.chip
        px = raster.side / chip
        transform = raster.src.transform * Affine(px, 0.0, window[0], 0.0, px, window[1])
        tile = Tile(0, 0, 0, PixelBox(*(float(v) for v in window)), (chip, chip), transform)
        rgb, valid = raster.src.read(tile)
        if valid == 0.0:
            self.skipped["nodata only"] += 1
            log.debug("chip %s of %s is nodata only; skipped", window, raster.path.name)
            return None
        chip_id = f"{split}-{self.counter[split]:05d}"
        self.counter[split] += 1
        image = f"{IMAGES_DIR}/{split}/{chip_id}.png"
        path = self.out / image
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb, "RGB").save(path, format="PNG", compress_level=3)
        raster.placed.append((window, split))
        self.chips.append(
            {
                "id": chip_id,
                "image": image,
                "split": split,
                "raster": self._source_name(raster.path),
                "window": list(window),
                "transform": list(transform.to_tuple()),
                "valid_fraction": round(float(valid), 4),
                "expression": expression,
                "annotation": None if obj is None else {"file": obj.feature.source.name, "fid": obj.feature.fid},
                "negative": obj is None or obj.ann.negative,
            }
        )
        return chip_id, image

    def _source_name(self, path: Path) -> str:
        try:
            return str(path.resolve().relative_to(self.out.resolve()))
        except ValueError:
            return str(path.resolve())

    def positive_chips(self, raster: _Raster, obj: _Obj, split: str) -> None:
        cfg = self.config
        same = raster.positives(obj.ann.expression)
        boxes = [o.box for o in same]
        target = next(i for i, o in enumerate(same) if o is obj)
        w, h = obj.box[2] - obj.box[0], obj.box[3] - obj.box[1]
        if not _fits(obj.box, raster.side):
            gsd = raster.native_gsd_m * raster.scale
            coarser = gsd * max(w, h) / raster.side * 1.25
            log.warning(
                "%s is %.0f x %.0f m, bigger than a %d-pixel chip at %.3g m (%.0f m); skipped: use a coarser "
                "--gsd (e.g. --gsd %.2g) or a larger --chip",
                obj.feature.name,
                w * raster.native_gsd_m,
                h * raster.native_gsd_m,
                cfg.chip,
                gsd,
                raster.side * raster.native_gsd_m,
                coarser,
            )
            self.skipped["bigger than a chip"] += 1
            return
        for _ in range(cfg.chips_per_box):
            placed = cm.place_chip(
                target, boxes, raster.side, raster.src.width, raster.src.height, self.rng,
                tries=cfg.tries, accept=self._acceptor(raster, split),
            )  # fmt: skip
            if placed is None:
                self.skipped["no unambiguous place"] += 1
                continue
            window, inside = placed
            written = self._read_write(raster, window, split, obj, obj.ann.expression)
            if written is None:
                continue
            chip_id, image = written
            placed_objs = sorted(
                (b, i) for i in inside for b in [cm.chip_box(boxes[i], window, cfg.chip)] if b is not None
            )
            chip_boxes = [b for b, _ in placed_objs]
            n_category = sum(
                1
                for o in raster.objs
                if not o.ann.negative and o.ann.category == obj.ann.category and cm.inside_fraction(o.box, window) > 0.5
            )
            unique = obj.ann.is_unique if obj.ann.is_unique is not None else n_category == 1
            common = {
                "image": image,
                "split": split,
                "expression": obj.ann.expression,
                "category": obj.ann.category,
                "image_size": (cfg.chip, cfg.chip),
                "is_unique": unique,
            }
            self.records.append(ChipRecord(id=f"{chip_id}-multi", task="multi", boxes=tuple(chip_boxes), **common))
            if "gres" in TASKS:
                outlines = [chip_outline(same[i].rings, window, cfg.chip) for _, i in placed_objs]
                self.records.append(ChipRecord(id=f"{chip_id}-gres", task="gres", boxes=tuple(chip_boxes),
                                               outlines=tuple(outlines), keypoints=_keypoints(outlines, cfg.chip),
                                               **common))  # fmt: skip
            if len(inside) == 1:
                box = cm.chip_box(boxes[target], window, cfg.chip)
                self.records.append(ChipRecord(id=f"{chip_id}-rec", task="rec", boxes=(box,), **common))

    def _negative_record(self, chip_id: str, image: str, split: str, ann: Annotation) -> None:
        for task in ("multi", "gres") if "gres" in TASKS else ("multi",):  # gres: an empty mask, answered None
            self.records.append(
                ChipRecord(
                    id=f"{chip_id}-{task}",
                    image=image,
                    split=split,
                    task=task,
                    expression=ann.expression,
                    category=ann.category,
                    boxes=(),
                    image_size=(self.config.chip, self.config.chip),
                    negative=True,
                    **({"outlines": (), "keypoints": ()} if task == "gres" else {}),
                )
            )

    def drawn_negative_chips(self, raster: _Raster, obj: _Obj, split: str) -> None:
        """Chips in an area the user marked as holding no object of the expression."""
        boxes = [o.box for o in raster.positives(obj.ann.expression)]
        accept = self._acceptor(raster, split)
        W, H = raster.src.width, raster.src.height
        for _ in range(self.config.chips_per_box):
            for _ in range(self.config.tries):
                bw, bh = obj.box[2] - obj.box[0], obj.box[3] - obj.box[1]
                if max(bw, bh) <= raster.side:
                    window = cm.random_window_around(obj.box, raster.side, W, H, self.rng)
                else:
                    window = cm.random_window_inside(obj.box, raster.side, W, H, self.rng)
                if window is not None and accept(window) and not any(cm.overlaps(window, b) for b in boxes):
                    break
            else:
                self.skipped["no unambiguous place"] += 1
                continue
            written = self._read_write(raster, window, split, obj, obj.ann.expression)
            if written is not None:
                self._negative_record(*written, split, obj.ann)

    def random_negative_chips(self, split: str) -> None:
        """``--negatives`` chips per expression in places of this split that hold none of it."""
        n = self.config.negatives
        if n == 0:
            return
        expressions: dict[str, list[_Raster]] = defaultdict(list)
        for _, r in sorted(self.rasters.items()):  # expressions with an object that fits in a chip
            for e in sorted({o.ann.expression for o in r.objs if not o.ann.negative and _fits(o.box, r.side)}):
                expressions[e].append(r)
        for expression, rasters in sorted(expressions.items()):
            regions = [(r, self._split_cells(r, split)) for r in rasters]
            regions = [(r, cells) for r, cells in regions if cells]
            if not regions:
                log.debug("no %s area on the rasters of %r: no random negatives there", split, expression)
                continue
            made = 0
            for k in range(n * self.config.tries * 4):
                if made == n:
                    break
                raster, cells = regions[k % len(regions)]
                cell = cells[self.rng.randrange(len(cells))]
                size = raster.side * self.config.cell_chips
                window = cm.random_window_inside(
                    cm.cell_window(cell, size), raster.side, raster.src.width, raster.src.height, self.rng
                )
                boxes = [o.box for o in raster.positives(expression)]
                if window is None or any(cm.overlaps(window, b) for b in boxes):
                    continue
                if not self._acceptor(raster, split)(window):
                    continue
                written = self._read_write(raster, window, split, None, expression)
                if written is not None:
                    ann = next(o.ann for o in raster.objs if o.ann.expression == expression)
                    self._negative_record(*written, split, ann)
                    made += 1
            if made < n:
                log.info("%d of %d %s negatives of %r placed", made, n, split, expression)
                self.skipped["negatives not placed"] += n - made

    def _split_cells(self, raster: _Raster, split: str) -> list[cm.Cell]:
        """The grid cells of ``split``: those whose annotations are mostly of it; cells without annotations
        belong to the raster's main split (train when tied)."""
        size = raster.side * self.config.cell_chips
        votes: dict[cm.Cell, Counter[str]] = defaultdict(Counter)
        for o in raster.objs:
            votes[cm.cell_of(o.box, size)][o.ann.split] += 1
        overall = Counter(o.ann.split for o in raster.objs)
        main = max(SPLITS, key=lambda s: (overall[s], -SPLITS.index(s)))
        ncols = max(1, math.ceil(raster.src.width / size))
        nrows = max(1, math.ceil(raster.src.height / size))
        out = []
        for r in range(nrows):
            for c in range(ncols):
                v = votes.get((c, r))
                label = main if not v else max(SPLITS, key=lambda s: (v[s], -SPLITS.index(s)))
                if label == split:
                    out.append((c, r))
        return out

    def run(self) -> None:
        self.open_rasters()
        self.assign_splits()
        for split in SPLITS:
            for raster, obj in self.targets(split):
                if obj.ann.negative:
                    self.drawn_negative_chips(raster, obj, split)
                else:
                    self.positive_chips(raster, obj, split)
        for split in SPLITS:  # after every annotation's chips, so they never take an annotation's place
            self.random_negative_chips(split)

    def close(self) -> None:
        for r in reversed(list(self.rasters.values())):  # each source holds a GDAL environment: last in, first out
            r.src.close()


def _keypoints(outlines: Sequence[Any], chip: int) -> tuple[tuple[tuple[int, int], tuple[int, int]], ...]:
    """Each object's two keypoints from its mask in the chip (``core/rules/gres_truth``'s rule)."""
    from geo_r1_qgis.core.rules.gres_truth import keypoints, object_mask

    return tuple(keypoints(object_mask(o, (chip, chip))) for o in outlines)


def counts_of(records: Sequence[ChipRecord]) -> dict[str, dict[str, dict[str, int]]]:
    """``{split: {task: {expression: n}}}`` (negatives counted under their expression too)."""
    out: dict[str, dict[str, dict[str, int]]] = {s: {t: {} for t in TASKS} for s in SPLITS}
    for r in records:
        d = out[r.split][r.task]
        d[r.expression] = d.get(r.expression, 0) + 1
    return {s: {t: dict(sorted(v.items())) for t, v in tasks.items()} for s, tasks in out.items()}


def summary_table(records: Sequence[ChipRecord]) -> str:
    """A plain-text table: expression, then per split the rec / multi (of which negative) counts."""
    rows: dict[str, Counter[str]] = defaultdict(Counter)
    for r in records:
        rows[r.expression][f"{r.split}:{r.task}"] += 1
        if r.negative:
            rows[r.expression][f"{r.split}:neg"] += 1
    head = ["expression"] + [f"{s} rec/multi(neg)" for s in SPLITS]
    lines = [head]
    for expr in sorted(rows):
        c = rows[expr]
        lines.append([expr] + [f"{c[f'{s}:rec']}/{c[f'{s}:multi']}({c[f'{s}:neg']})" for s in SPLITS])
    total = Counter()
    for c in rows.values():
        total.update(c)
    lines.append(["total"] + [f"{total[f'{s}:rec']}/{total[f'{s}:multi']}({total[f'{s}:neg']})" for s in SPLITS])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return (
        "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in lines)
        + "\n"
    )


def write_eval_json(out: Path, records: Sequence[ChipRecord]) -> None:
    """Geo-R1's REC evaluation files of val and test (``<split>_rec.json``, ``..._with_unique.json``)."""
    for split in ("val", "test"):
        recs = [r for r in records if r.split == split and r.task == "rec"]
        plain = [{"image": r.image, "problem": r.question, "solution": list(r.boxes[0])} for r in recs]
        unique = [{**p, "is_unique": r.is_unique} for p, r in zip(plain, recs, strict=True) if r.is_unique is not None]
        (out / eval_json_name(split)).write_text(json.dumps(plain, indent=1) + "\n", encoding="utf-8")
        (out / eval_json_name(split, with_unique=True)).write_text(
            json.dumps(unique, indent=1) + "\n", encoding="utf-8"
        )


def _write_outputs(out: Path, records: list[ChipRecord], manifest: dict[str, Any]) -> None:
    write_records(out, records)
    write_eval_json(out, records)
    manifest["counts"] = counts_of(records)
    manifest["files"] = {"records": "<split>_<task>.jsonl", "images": f"{IMAGES_DIR}/<split>/", "chips": CHIPS_INDEX}
    (out / MANIFEST).write_text(json.dumps(_jsonable(manifest), indent=1) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class Replay:
    """Train annotations of rasters read at their own resolution (not ``--gsd``), ``shots`` per expression
    counted apart from the others: ``dataset synthetic --replay``."""

    rasters: frozenset[Path]
    shots: int


def build_into(
    out: Path,
    config: BuildConfig,
    kind: str = "build",
    extra: dict[str, Any] | None = None,
    replay: Replay | None = None,
) -> dict[str, Any]:
    """Build the dataset into the (existing, empty) folder ``out``; returns the manifest."""
    t0 = time.perf_counter()
    sets = [read_annotations(p) for p in config.annotations]
    builder = _Builder(config, sets, out, replay)
    try:
        builder.run()
        rasters = [
            {
                "path": builder._source_name(r.path),
                "crs": _crs_text(r.src.crs),
                "crs_wkt": r.src.crs_wkt,
                "size": [r.src.width, r.src.height],
                "native_gsd_m": r.native_gsd_m,
                "gsd_m": r.native_gsd_m * r.side / config.chip,
                "chip_side_raster_px": r.side,
                "annotations": len(r.objs),
            }
            for _, r in sorted(builder.rasters.items())
        ]
    finally:
        builder.close()
    records = builder.records
    if not records:
        raise ConfigError(
            "no chip could be made from the annotations (see the warnings above: outside the raster, bigger than "
            "a chip, nodata); check the rasters and --gsd/--chip"
        )
    (out / CHIPS_INDEX).write_text("".join(json.dumps(c) + "\n" for c in builder.chips), encoding="utf-8")
    crss = sorted({r["crs"] for r in rasters})
    gsds = sorted({round(r["gsd_m"], 6) for r in rasters})
    manifest: dict[str, Any] = {
        "format": "geo-r1-dataset",
        "version": FORMAT_VERSION,
        "kind": kind,
        "created": _now_iso(),
        "command": {
            "action": kind,
            "config": {**asdict(config), "annotations": [builder._source_name(p) for p in config.annotations]},
            **(extra or {}),
        },
        "frame": "image",
        "frame_note": FRAME_NOTE,
        "chip": config.chip,
        "crs": crss[0] if len(crss) == 1 else crss,
        "gsd_m": gsds[0] if len(gsds) == 1 else gsds,
        "seed": config.seed,
        "val_fraction": builder.val_fraction,
        "sources": rasters,
        "annotations": [
            {"path": builder._source_name(s.path), "features": len(s.features), "sha256": s.sha256} for s in sets
        ],
        "annotations_sha256": sets[0].sha256
        if len(sets) == 1
        else hashlib.sha256("".join(sorted(s.sha256 for s in sets)).encode()).hexdigest(),
        "skipped": dict(sorted(builder.skipped.items())),
    }
    _write_outputs(out, records, manifest)
    log.info(
        "dataset built in %.1f s: %d chips, %d records", time.perf_counter() - t0, len(builder.chips), len(records)
    )
    log.info("records per expression (rec/multi, negatives in brackets):\n%s", summary_table(records))
    return manifest


def build_dataset(config: BuildConfig) -> dict[str, Any]:
    """``geo-r1 dataset build``: the whole dataset folder, written atomically."""
    for p in config.annotations:
        if not p.is_file():
            raise ConfigError(f"the annotation file {p} does not exist; make one with 'geo-r1 dataset import'")
    with staging(config.out_dir, config.overwrite) as tmp:
        return build_into(tmp, config)


# --------------------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticConfig:
    """``geo-r1 dataset synthetic``: a learnable few-shot set from the sample scenes."""

    out_dir: Path = field(
        metadata={"flags": ("-o", "--output"), "aliases": ("--out-dir",), "help": "dataset folder to create"}
    )
    shots: int = field(metadata={"help": "train annotations per expression, e.g. 1, 5 or 10"})
    chip: int = field(default=112, metadata={"help": "chip side in pixels, a multiple of 28"})
    seed: int = field(default=0, metadata={"help": "random seed of the scenes and the chips"})
    chips_per_box: int = field(default=4, metadata={"help": "chips per annotation"})
    negatives: int = field(default=4, metadata={"help": "negative chips per expression and split"})
    scene_size: int = field(
        default=512, metadata={"help": "side of each sample scene in pixels (the sample model's: 1024)"}
    )
    categories: tuple[str, ...] = field(
        default=("tank", "building"),
        metadata={"help": "the scenes' categories to annotate, comma-separated (tank, building), or single tanks "
                          "(largest-tank, smallest-tank: 'the largest/smallest storage tank' whatever --style)",
                  "action": "store", "parse": lambda v: _comma_list(v) if isinstance(v, str) else tuple(v)},
    )  # fmt: skip
    style: str = field(
        default="short",
        metadata={"choices": tuple(SYNTHETIC_STYLES),
                  "help": "expressions: short ('storage tank', 'building') or all ('all storage tanks', ...)"},
    )  # fmt: skip
    test_scenes: int = field(default=1, metadata={"help": "held-out scenes of the test split"})
    gsd: float | None = field(
        default=None, metadata={"help": "working ground resolution in metres (default: the scenes' own)"}
    )
    replay: int = field(
        default=0,
        metadata={"help": "train annotations of storage tanks (what the sample model was trained on) at the "
                          "scenes' own resolution, from extra scenes, mixed into the train split (0: none)"},
    )  # fmt: skip
    overwrite: bool = field(default=False, metadata={"help": "replace the dataset folder if it exists"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        _check_int("--shots", self.shots, 1)
        _check_int("--replay", self.replay, 0)
        _check_int("--seed", self.seed, 0)
        _check_int("--test-scenes", self.test_scenes, 1)
        cm.check_chip_size(self.chip)
        from train.sample_data import MAX_SIZE, MIN_SIZE

        if not MIN_SIZE <= self.scene_size <= MAX_SIZE:
            raise ConfigError(f"--scene-size must be {MIN_SIZE}..{MAX_SIZE}, got {self.scene_size}")
        if isinstance(self.categories, str):
            object.__setattr__(self, "categories", _comma_list(self.categories))
        known = (*SYNTHETIC_STYLES["short"], *SYNTHETIC_SELECTIONS)
        unknown = [c for c in self.categories if c not in known]
        if unknown or not self.categories:
            raise ConfigError(
                f"--categories must name some of {', '.join(known)}, got {','.join(self.categories) or 'nothing'}"
            )
        if self.style not in SYNTHETIC_STYLES:
            raise ConfigError(f"--style must be one of {', '.join(SYNTHETIC_STYLES)}, got {self.style!r}")
        if self.gsd is not None and not (math.isfinite(self.gsd) and self.gsd > 0):
            raise ConfigError(f"--gsd must be a positive number of metres, got {self.gsd}")


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _synthetic_features(
    scene_dir: Path, raster_rel: str, split: str, created: str, config: SyntheticConfig
) -> list[tuple[Annotation, Any]]:
    import shapely

    truth = json.loads((scene_dir / "utm.objects.geojson").read_text(encoding="utf-8"))
    expressions = SYNTHETIC_STYLES[config.style]
    items = []
    for feat in truth["features"]:
        props = feat["properties"]
        chosen = [SYNTHETIC_SELECTIONS[c] for c in config.categories
                  if SYNTHETIC_SELECTIONS.get(c) in props["expressions"]]  # fmt: skip
        if props["category"] in config.categories:
            chosen.append(expressions[props["category"]])
        for expression in chosen:
            ann = Annotation(
                expression=expression, category=expression, raster=raster_rel, split=split, created=created
            )
            items.append((ann, shapely.Polygon(feat["geometry"]["coordinates"][0])))
    return items


def build_synthetic(config: SyntheticConfig) -> dict[str, Any]:
    """Sample scenes (train, then one val and one test scene: different ground), their true boxes as
    annotations, then the same build as ``dataset build`` with ``shots`` train targets per expression."""
    from train.sample_data import SampleDataConfig, write_samples

    t0 = time.perf_counter()
    with staging(config.out_dir, config.overwrite) as tmp:
        created = "2000-01-01T00:00:00+00:00"  # fixed, so the annotation hash depends on the seed only
        items: list[tuple[Annotation, Any]] = []
        per_scene: Counter[str] = Counter()
        scene = 0
        splits: list[str] = []
        while True:  # train scenes until every expression has `shots` objects, then one val and one test scene
            have = Counter(a.expression for a, _ in items if a.split == "train")
            # at least two train scenes, so 1-, 5- and 10-shot sets of a seed draw from the same pool (nested)
            if len(splits) >= 2 and all(have[e] >= config.shots for e in per_scene):
                break
            splits.append("train")
            scene_items = _make_scene(tmp, scene, config, "train", created, write_samples, SampleDataConfig)
            per_scene.update(a.expression for a, _ in scene_items)
            items += scene_items
            scene += 1
        for split in ("val",) + ("test",) * config.test_scenes:
            items += _make_scene(tmp, scene, config, split, created, write_samples, SampleDataConfig)
            scene += 1
        replay = _replay_scenes(tmp, config, created, write_samples, SampleDataConfig) if config.replay else None
        if replay is not None:
            items += replay[0]
        crs = "EPSG:32614"
        ann_path = tmp / "annotations.gpkg"
        write_annotations(ann_path, items, crs)
        build = BuildConfig(
            annotations=(ann_path,),
            out_dir=config.out_dir,
            chip=config.chip,
            chips_per_box=config.chips_per_box,
            negatives=config.negatives,
            seed=config.seed,
            val_fraction=0.0,
            shots=config.shots,
            gsd=config.gsd,
        )
        manifest = build_into(
            tmp, build, kind="synthetic", extra={"synthetic": asdict(config)}, replay=replay and replay[1]
        )
    log.info("synthetic dataset written to %s in %.1f s", config.out_dir, time.perf_counter() - t0)
    return manifest


#: Replay scenes are numbered from here, so that a seed's few-shot scenes stay the same with or without --replay.
REPLAY_SCENE0 = 500


def _replay_scenes(tmp: Path, config: SyntheticConfig, created: str, write, cfg_cls) -> tuple[list, Replay]:
    """Train scenes of storage tanks, in the sample model's words ('all storage tanks') whatever --style, until
    they hold ``config.replay`` of them; the build reads them at their own resolution."""
    tanks = replace(config, categories=("tank",), style="all")
    items: list = []
    rasters = set()
    index = REPLAY_SCENE0
    while sum(not a.negative for a, _ in items) < config.replay:
        items += _make_scene(tmp, index, tanks, "train", created, write, cfg_cls, prefix="replay")
        rasters.add(tmp / f"rasters/replay-{index:02d}/utm.tif")  # as the build resolves it: beside the annotations
        index += 1
    return items, Replay(frozenset(rasters), config.replay)


def _make_scene(
    tmp: Path, index: int, config: SyntheticConfig, split: str, created: str, write, cfg_cls, prefix: str = "scene"
) -> list:
    rel = f"rasters/{prefix}-{index:02d}"
    scene_dir = tmp / rel
    write(cfg_cls(out_dir=scene_dir, seed=config.seed * 1000 + index, size=config.scene_size))
    for name in ("wgs84", "webmercator", "rotated"):  # only the UTM raster is used
        for suffix in (".tif", ".objects.geojson"):
            (scene_dir / f"{name}{suffix}").unlink(missing_ok=True)
    (scene_dir / "samples.json").unlink(missing_ok=True)  # it would list the removed rasters
    return _synthetic_features(scene_dir, f"{rel}/utm.tif", split, created, config)


# --------------------------------------------------------------------------------------------------
# from-json
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FromJsonConfig:
    """``geo-r1 dataset from-json``: a VRSBench / DIOR-RSVG evaluation JSON and its images."""

    eval_json: Path = field(
        metadata={"positional": True, "metavar": "EVAL.json",
                  "help": "list of {image, problem, solution: [x1, y1, x2, y2]}"},
    )  # fmt: skip
    images: Path = field(metadata={"help": "folder the JSON's image paths are relative to"})
    out_dir: Path = field(
        metadata={"flags": ("-o", "--output"), "aliases": ("--out-dir",), "help": "dataset folder to create"}
    )
    split: str = field(default="test", metadata={"choices": SPLITS, "help": "split of the records"})
    unique: Path | None = field(
        default=None, metadata={"metavar": "FILE", "help": "the ..._with_unique.json file (is_unique per query)"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace the dataset folder if it exists"})

    def __post_init__(self) -> None:
        for name in ("eval_json", "images", "out_dir"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        if self.unique is not None:
            object.__setattr__(self, "unique", Path(self.unique))
        if self.split not in SPLITS:
            raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {self.split!r}")


def _load_json_list(path: Path, what: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except ValueError as exc:
        raise ConfigError(f"{what} {path} is not valid JSON ({exc})") from None
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise ConfigError(f"{what} {path} must be a JSON list of objects with image, problem and solution")
    return data


def expression_of(problem: str) -> str:
    """The bare expression of a Geo-R1 ``problem`` (the REC question prefix removed when present)."""
    from geo_r1_qgis.core.rules.prompts import REC_QUESTION_PREFIX

    text = problem.strip()
    if text.startswith(REC_QUESTION_PREFIX.strip()):
        text = text[len(REC_QUESTION_PREFIX.strip()) :]
    return text.strip()


def run_from_json(config: FromJsonConfig) -> dict[str, Any]:
    from PIL import Image

    items = _load_json_list(config.eval_json, "the evaluation JSON")
    if not items:
        raise ConfigError(f"the evaluation JSON {config.eval_json} is empty")
    if not config.images.is_dir():
        raise ConfigError(f"--images {config.images} is not a folder")
    unique: dict[tuple[str, str], bool] = {}
    if config.unique is not None:
        for d in _load_json_list(config.unique, "the --unique file"):
            if "is_unique" in d and d.get("is_unique") is not None:
                unique[(str(d.get("image")), str(d.get("problem")))] = bool(d["is_unique"])
    with staging(config.out_dir, config.overwrite) as tmp:
        records: list[ChipRecord] = []
        sizes: dict[str, tuple[int, int]] = {}
        skipped = 0
        for n, d in enumerate(items):
            try:
                image, problem, solution = str(d["image"]), str(d["problem"]), [float(v) for v in d["solution"]]
            except (KeyError, TypeError, ValueError) as exc:
                raise ConfigError(
                    f"{config.eval_json} item {n}: needs image, problem and a 4-number solution ({exc})"
                ) from None
            if len(solution) != 4:
                raise ConfigError(
                    f"{config.eval_json} item {n}: solution must be [x1, y1, x2, y2], got {d['solution']}"
                )
            rel = Path(image)
            if rel.is_absolute() or ".." in rel.parts:
                raise ConfigError(f"{config.eval_json} item {n}: the image path {image!r} must be relative to --images")
            dst_rel = f"{IMAGES_DIR}/{config.split}/{rel.as_posix()}"
            if image not in sizes:
                src = config.images / rel
                if not src.is_file():
                    raise ConfigError(f"{config.eval_json} item {n}: the image {src} does not exist; check --images")
                try:
                    with Image.open(src) as im:
                        sizes[image] = im.size
                except OSError as exc:
                    raise ConfigError(f"cannot read the image {src} ({exc})") from None
                dst = tmp / dst_rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copyfile(src, dst)
            w, h = sizes[image]
            box = _plain_box(solution, w, h)
            expression = expression_of(problem)
            if box is None or not expression:
                log.warning(
                    "item %d of %s: empty expression or box %s outside the %dx%d image; skipped",
                    n,
                    config.eval_json,
                    solution,
                    w,
                    h,
                )
                skipped += 1
                continue
            records.append(
                ChipRecord(
                    id=f"{config.split}-{n:05d}",
                    image=dst_rel,
                    split=config.split,
                    task="rec",
                    expression=expression,
                    category=expression,
                    boxes=(box,),
                    image_size=(w, h),
                    is_unique=unique.get((image, problem)),
                )
            )
        if not records:
            raise ConfigError(f"no usable item in {config.eval_json}")
        manifest = {
            "format": "geo-r1-dataset",
            "version": FORMAT_VERSION,
            "kind": "from-json",
            "created": _now_iso(),
            "command": {"action": "from-json", "config": asdict(config)},
            "frame": "image",
            "frame_note": (
                "boxes are in the pixels of the original images, whose sides are in general not multiples of 28; "
                "the trainer and evaluator map the model's smart_resize frame to the image frame"
            ),
            "sources": [str(config.eval_json.resolve())],
            "source_sha256": hashlib.sha256(config.eval_json.read_bytes()).hexdigest(),
            "images": len(sizes),
            "skipped": {"invalid items": skipped} if skipped else {},
        }
        _write_outputs(tmp, records, manifest)
    log.info("records per expression:\n%s", summary_table(records))
    return manifest


def _plain_box(box: Sequence[float], w: int, h: int) -> cm.IntBox | None:
    x1, y1 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x2, y2 = min(w, math.ceil(box[2])), min(h, math.ceil(box[3]))
    return (x1, y1, x2, y2) if x1 < x2 and y1 < y2 else None


__all__ = [
    "AnnotationSet",
    "BuildConfig",
    "FromJsonConfig",
    "ImportConfig",
    "SyntheticConfig",
    "build_dataset",
    "build_synthetic",
    "read_annotations",
    "run_from_json",
    "run_import",
    "write_annotations",
]
