"""The GeoPackage sink of ``geo-r1 ground``: GDAL's GPKG driver through pyogrio.

The file's layout, the run row, transactions, resuming and every plain-SQLite step live in
:mod:`geo_r1_qgis.core.gpkg_schema`, shared with the QGIS plugin's writer (:mod:`geo_r1_qgis.qgis_io.gpkg_ogr`,
``osgeo.ogr``), so either resumes and reads the other's files. This module adds the pyogrio
:class:`PyogrioWriter` (one ``pyogrio.raw.write`` = one GDAL transaction) and the reprojection.

Reprojection (``--dst-crs``)
----------------------------
Polygons are reprojected vertex by vertex with pyproj (``always_xy``): the four corners of each
box are transformed exactly and the edges stay straight lines between them in the output CRS. For
boxes of a few hundred metres the edge curvature this ignores is far below a pixel.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from geo_r1_qgis.core.errors import ConfigError, OutputError
from geo_r1_qgis.core.geometry import Ring, ring_signed_area
from geo_r1_qgis.core.gpkg_schema import (
    ANSWER_FIELDS,
    DATETIME,
    GEOMETRY_TYPE,
    GPKG_VERSION,
    INTEGER,
    INTEGER64,
    RAW_SUFFIX,
    REAL,
    RUNS_TABLE,
    TILES_TABLE,
    Field,
    GeoPackageRun,
    RunRecord,
    check_layer_name,
    find_runs,
    layer_name_for,
    names,
    now_utc,
)

__all__ = [
    "FIELDS",
    "GPKG_VERSION",
    "RAW_FIELDS",
    "RAW_SUFFIX",
    "RUNS_TABLE",
    "TILES_TABLE",
    "CrsTransform",
    "GeoPackageSink",
    "PyogrioWriter",
    "RunRecord",
    "check_layer_name",
    "find_runs",
    "layer_name_for",
    "list_layers",
    "now_utc",
    "ring_from_wkb",
]

log = logging.getLogger(__name__)

FIELDS = names(ANSWER_FIELDS)
RAW_FIELDS = (*FIELDS, "px_x1", "px_y1", "px_x2", "px_y2")
_NUMPY_TYPES: dict[str, Any] = {REAL: np.float64, INTEGER: np.int32, INTEGER64: np.int64, DATETIME: "datetime64[ms]"}


def _pyogrio() -> Any:
    import pyogrio

    return pyogrio


def list_layers(path: Path) -> list[str]:
    """Layer and table names of a GeoPackage; [] when the file does not exist; OutputError if not a GPKG."""
    if not path.exists():
        return []
    pyogrio = _pyogrio()
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
        if head != b"SQLite format 3\x00":
            raise OutputError(f"{path} exists and is not a GeoPackage; it is left untouched: choose another -o path")
        return [str(name) for name, _ in pyogrio.list_layers(path)]
    except OutputError:
        raise
    except Exception as exc:
        raise OutputError(f"{path} exists but cannot be read as a GeoPackage ({exc}); choose another -o path") from None


class CrsTransform:
    """Vertex-wise reprojection of rings (identity when no destination CRS is asked for)."""

    def __init__(self, src_wkt: str, dst: str | None) -> None:
        self.src_wkt = src_wkt
        self.dst_wkt = src_wkt
        self._tr = None
        if dst:
            from pyproj import CRS, Transformer
            from pyproj.exceptions import CRSError

            try:
                dst_crs = CRS.from_user_input(dst)
            except CRSError as exc:
                raise ConfigError(
                    f"--dst-crs {dst!r} is not a CRS pyproj knows ({exc}); e.g. --dst-crs EPSG:4326"
                ) from None
            src_crs = CRS.from_wkt(src_wkt)
            if not dst_crs.equals(src_crs):
                self._tr = Transformer.from_crs(src_crs, dst_crs, always_xy=True)
                self.dst_wkt = dst_crs.to_wkt()

    def ring(self, ring: Ring) -> Ring:
        if self._tr is None:
            return ring
        xs, ys = self._tr.transform([p[0] for p in ring], [p[1] for p in ring])
        out = tuple(zip(map(float, xs), map(float, ys), strict=True))
        if ring_signed_area(out) < 0:  # keep exterior rings counter-clockwise
            out = (out[0], *reversed(out[1:-1]), out[0])
        return out


def ring_from_wkb(wkb: bytes) -> Ring:
    """The exterior ring of a little-endian 2-D WKB polygon (what this module writes)."""
    (n,) = struct.unpack_from("<I", wkb, 9)
    vals = struct.unpack_from(f"<{2 * n}d", wkb, 13)
    return tuple((vals[2 * i], vals[2 * i + 1]) for i in range(n))


class PyogrioWriter:
    """The :class:`~geo_r1_qgis.core.gpkg_schema.FeatureWriter` of the command line: one
    ``pyogrio.raw.write`` (one GDAL transaction) per append, typed columns from the schema's fields."""

    def __init__(self) -> None:
        # Each write stays one SQLite transaction (in WAL mode while the run holds the file, core/gpkg_schema.WalHold;
        # the hold runs in a child process, since this GDAL carries its own SQLite), so a killed process leaves a
        # valid file; only durability against an OS crash or power loss is traded for speed (see BENCHMARKS.md).
        _pyogrio().set_gdal_config_options({"OGR_SQLITE_SYNCHRONOUS": "OFF"})

    def append(
        self,
        path: Path,
        table: str,
        fields: Sequence[Field],
        rows: Sequence[Sequence[Any]],
        geometries: Sequence[bytes] | None = None,
        crs_wkt: str | None = None,
        geometry_type: str = GEOMETRY_TYPE,
    ) -> None:
        pyogrio = _pyogrio()
        arrays = []
        for i, f in enumerate(fields):
            values = [r[i] for r in rows]
            if f.type == DATETIME:
                values = [None if v is None else np.datetime64(v, "ms") for v in values]
            arrays.append(np.array(values, dtype=_NUMPY_TYPES.get(f.type, object)))
        exists = Path(path).exists()
        geoms = None
        if geometries is not None:
            geoms = np.empty(len(geometries), dtype=object)
            geoms[:] = list(geometries)
        try:
            pyogrio.raw.write(
                path,
                geoms,
                arrays,
                [f.name for f in fields],
                layer=table,
                driver="GPKG",
                append=exists,
                **({"geometry_type": geometry_type, "crs": crs_wkt} if geometries is not None else {}),
                # A new file is GeoPackage 1.2: QGIS 3.22's GDAL 3.6 warns that 1.4 "may only be partially supported".
                **({} if exists else {"dataset_options": {"VERSION": GPKG_VERSION}}),
            )
        except Exception as exc:
            raise OutputError(f"could not write {len(rows)} row(s) to {table!r} of {path} ({exc})") from exc


class GeoPackageSink(GeoPackageRun):
    """The command line's :class:`~geo_r1_qgis.core.gpkg_schema.GeoPackageRun`: pyogrio, pyproj reprojection."""

    @classmethod
    def open_run(cls, path: str | Path, *, crs: CrsTransform, **kwargs: Any) -> GeoPackageSink:  # type: ignore[override]
        return super().open_run(path, writer=PyogrioWriter(), crs=crs, **kwargs)  # type: ignore[return-value]
