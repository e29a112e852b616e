"""The plugin's results GeoPackage, written through GDAL's own Python bindings (``osgeo.ogr``).

The file is the one ``geo-r1 ground`` writes: the layout, the run row, resuming and the plain-SQLite
bookkeeping are :mod:`geo_r1_qgis.core.gpkg_schema`, shared with the command line's pyogrio writer
(:mod:`engine.gpkg`). This module only supplies :class:`OgrWriter` (one GDAL dataset transaction per
append) and what the dock panel needs around a run: the URIs of its layers, the runs in a file, the
done tiles and the features.

Plain file I/O, no QGIS object: a ``QgsTask`` worker thread may use it. GDAL's global state is left
alone: the exception mode the host chose (``ogr.UseExceptions()`` or not) is honoured either way
(return codes are checked and ``RuntimeError`` is caught), and GDAL's messages during a write go to a
quiet handler pushed for this thread only (CPL's handler stack is per thread), then become one
:class:`~geo_r1_qgis.core.errors.OutputError`.
"""

from __future__ import annotations

import atexit
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ..core.errors import OutputError
from ..core.gpkg_schema import (
    DATETIME,
    GEOMETRY_TYPE,
    GPKG_VERSION,
    INTEGER,
    INTEGER64,
    OUTLINE_GEOMETRY_TYPE,
    OUTLINE_SUFFIX,
    RAW_SUFFIX,
    REAL,
    STRING,
    Field,
    GeoPackageRun,
    RunRecord,
    SameCrs,
    WalHold,
    done_tile_ids,
    find_runs,
    hold_in_child,
    list_tables,
    read_raw_detections,
)
from ..core.merge import Detection

__all__ = [
    "OgrGeoPackageSink",
    "OgrWriter",
    "RunLayers",
    "describe_schema",
    "hold_wal",
    "list_runs",
    "read_done_tiles",
    "read_features",
    "run_layers",
]

log = logging.getLogger(__name__)


def _ogr() -> tuple[Any, Any, Any]:
    from osgeo import gdal, ogr, osr

    return gdal, ogr, osr


def _ogr_type(name: str) -> int:
    _, ogr, _ = _ogr()
    return {
        STRING: ogr.OFTString,
        REAL: ogr.OFTReal,
        INTEGER: ogr.OFTInteger,
        INTEGER64: ogr.OFTInteger64,
        DATETIME: ogr.OFTDateTime,
    }[name]


class _Failed(Exception):
    pass


@contextmanager
def _gdal_quiet() -> Iterator[Any]:
    """GDAL's messages into a quiet handler for this thread; the last message is read on failure."""
    gdal, _, _ = _ogr()
    gdal.PushErrorHandler("CPLQuietErrorHandler")
    gdal.ErrorReset()
    try:
        yield gdal
    finally:
        gdal.PopErrorHandler()


def _ok(rc: Any, what: str) -> None:
    """A GDAL return code (0 = OGRERR_NONE) or a returned object (None = failure)."""
    if rc is None or (isinstance(rc, int) and not isinstance(rc, bool) and rc != 0):
        raise _Failed(what)


def gdal_shares_sqlite() -> bool:
    """Whether GDAL (``osgeo``) and Python's ``sqlite3`` run the same SQLite library in this process (Linux
    distributions and OSGeo4W link one shared library): then, on Windows, a
    :class:`~geo_r1_qgis.core.gpkg_schema.WalHold` may keep its connection here (elsewhere it is always held in a
    child process, ``gpkg_schema.hold_in_child``). False when that cannot be told."""
    global _SHARES_SQLITE
    if _SHARES_SQLITE is None:
        try:
            import _sqlite3
            import ctypes

            from osgeo import _gdal

            ours = ctypes.cast(ctypes.CDLL(_sqlite3.__file__).sqlite3_libversion, ctypes.c_void_p).value
            gdals = ctypes.cast(ctypes.CDLL(_gdal.__file__).sqlite3_libversion, ctypes.c_void_p).value
            _SHARES_SQLITE = bool(ours) and ours == gdals
        except (ImportError, OSError, AttributeError):
            _SHARES_SQLITE = False
    return _SHARES_SQLITE


_SHARES_SQLITE: bool | None = None


class OgrWriter:
    """The plugin's :class:`~geo_r1_qgis.core.gpkg_schema.FeatureWriter`: ``osgeo.ogr``, one dataset
    transaction per append (the table is created inside it when missing)."""

    @property
    def shares_sqlite(self) -> bool:
        return gdal_shares_sqlite()

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
        path = Path(path)
        with _gdal_quiet() as gdal:
            ds = None
            try:
                ds = self._open(path)
                _ok(ds.StartTransaction(), "start a transaction")
                try:
                    self._append(ds, table, fields, rows, geometries, crs_wkt, geometry_type)
                    _ok(ds.CommitTransaction(), "commit the transaction")
                except BaseException:
                    with suppress(RuntimeError):
                        ds.RollbackTransaction()
                    raise
            except (_Failed, RuntimeError) as exc:
                detail = gdal.GetLastErrorMsg() or ""
                raise OutputError(
                    f"could not write {len(rows)} row(s) to {table!r} of {path}: {exc}"
                    f"{' (' + detail + ')' if detail and detail not in str(exc) else ''}; check that the folder is "
                    "writable and the disk not full"
                ) from None
            finally:
                ds = None  # closes the file

    @staticmethod
    def _open(path: Path) -> Any:
        gdal, ogr, _ = _ogr()
        if path.exists():
            ds = gdal.OpenEx(str(path), gdal.OF_VECTOR | gdal.OF_UPDATE, allowed_drivers=["GPKG"])
            _ok(ds, "open the GeoPackage for writing")
            return ds
        driver = ogr.GetDriverByName("GPKG")
        _ok(driver, "find GDAL's GPKG driver")
        ds = driver.CreateDataSource(str(path), options=[f"VERSION={GPKG_VERSION}"])
        _ok(ds, "create the GeoPackage")
        return ds

    @staticmethod
    def _append(
        ds: Any,
        table: str,
        fields: Sequence[Field],
        rows: Sequence[Sequence[Any]],
        geometries: Sequence[bytes] | None,
        crs_wkt: str | None,
        geometry_type: str = GEOMETRY_TYPE,
    ) -> None:
        _, ogr, osr = _ogr()
        layer = ds.GetLayerByName(table)
        if layer is None:
            srs = None
            if geometries is not None and crs_wkt:
                srs = osr.SpatialReference()
                _ok(srs.ImportFromWkt(crs_wkt), "read the output CRS")
            kind = ogr.wkbMultiPolygon if geometry_type == OUTLINE_GEOMETRY_TYPE else ogr.wkbPolygon
            layer = ds.CreateLayer(table, srs, kind if geometries is not None else ogr.wkbNone)
            _ok(layer, f"create the layer {table!r}")
            for f in fields:
                _ok(layer.CreateField(ogr.FieldDefn(f.name, _ogr_type(f.type))), f"create the field {f.name!r}")
        defn = layer.GetLayerDefn()
        index = [defn.GetFieldIndex(f.name) for f in fields]
        missing = [f.name for f, i in zip(fields, index, strict=True) if i < 0]
        if missing:
            raise _Failed(f"the existing table {table!r} has no field {', '.join(missing)} (not a Geo-R1 table)")
        for r, row in enumerate(rows):
            feature = ogr.Feature(defn)
            for f, i, value in zip(fields, index, row, strict=True):
                _set(feature, i, f.type, value)
            if geometries is not None:
                geom = ogr.CreateGeometryFromWkb(bytes(geometries[r]))
                _ok(geom, "read a polygon")
                _ok(feature.SetGeometryDirectly(geom), "set a polygon")
            _ok(layer.CreateFeature(feature), "add a feature")


def _set(feature: Any, i: int, kind: str, value: Any) -> None:
    if value is None:
        feature.SetFieldNull(i)
    elif kind == DATETIME:
        dt: datetime = value
        feature.SetField(i, dt.year, dt.month, dt.day, dt.hour, dt.minute, dt.second + dt.microsecond / 1e6, 0)
    elif kind == REAL:
        feature.SetField(i, float(value))
    elif kind in (INTEGER, INTEGER64):
        feature.SetFieldInteger64(i, int(value))
    else:
        feature.SetFieldString(i, str(value))


class OgrGeoPackageSink(GeoPackageRun):
    """A run written by the plugin: a :class:`~geo_r1_qgis.core.pipeline.ResultSink` for
    :func:`~geo_r1_qgis.core.pipeline.run_grounding`, in the raster's CRS.

    ``OgrGeoPackageSink.open_run(path, expression=..., mode=..., parameters=..., raster=..., engine=...,
    crs_wkt=source.crs_wkt, resume=...)``; ``parameters`` from
    :func:`~geo_r1_qgis.core.gpkg_schema.job_parameters`, so ``geo-r1 ground --resume`` finds the run
    (and this resumes the command line's)."""

    @classmethod
    def open_run(cls, path: str | Path, *, crs_wkt: str, **kwargs: Any) -> OgrGeoPackageSink:  # type: ignore[override]
        return super().open_run(path, writer=OgrWriter(), crs=SameCrs(crs_wkt), **kwargs)  # type: ignore[return-value]

    @property
    def layers(self) -> RunLayers:
        return RunLayers(self.path, self.run_id, self.layer)


# --------------------------------------------------------------------------------------------------
# What the panel reads
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunLayers:
    """Where a run's layers are: open them as ``QgsVectorLayer(uri, name, "ogr")`` and reload them as tiles
    commit (the raw layer grows during the run; the answer layer exists once the run is done)."""

    path: Path
    run_id: str
    layer: str

    @property
    def raw_layer(self) -> str:
        return self.layer + RAW_SUFFIX

    @property
    def answer_uri(self) -> str:
        return f"{self.path}|layername={self.layer}"

    @property
    def raw_uri(self) -> str:
        return f"{self.path}|layername={self.raw_layer}"

    @property
    def outline_uri(self) -> str:
        return f"{self.path}|layername={self.layer}{OUTLINE_SUFFIX}"

    def has_outlines(self) -> bool:
        """Whether the run wrote an outline layer (task gres or refine to outline, with at least one outline)."""
        return (self.layer + OUTLINE_SUFFIX) in list_tables(self.path)


#: the GeoPackages the panel shows layers of, held in WAL mode (core/gpkg_schema.py, "Readers while a run writes")
_HOLDS: dict[str, WalHold] = {}


def hold_wal(path: str | Path) -> bool:
    """Hold ``path`` in WAL mode until :func:`release_wal` (call it before QGIS opens a layer of the file, so
    QGIS reads it with locks and safely while a run writes). Whether the file is held."""
    key = str(Path(path).resolve())
    hold = _HOLDS.get(key)
    if hold is None:
        hold = _HOLDS[key] = WalHold(key, separate=hold_in_child(gdal_shares_sqlite()))
    return hold.acquire()


def release_wal(keep: Sequence[str | Path] = ()) -> None:
    """Release every held file but those in ``keep`` (files that still have layers on the map)."""
    kept = {str(Path(p).resolve()) for p in keep}
    for key in [k for k in _HOLDS if k not in kept]:
        _HOLDS.pop(key).release()


def held_files() -> list[str]:
    return sorted(k for k, h in _HOLDS.items() if h.held)


atexit.register(release_wal)


def list_runs(path: str | Path) -> list[RunRecord]:
    """The runs in a file, oldest first: ``run_id``, ``layer``, ``status``, ``expression``, ``mode``,
    ``started``, ``finished``, ``parameters`` (``resumable`` is true for every status but ``done``)."""
    return find_runs(path)


def run_layers(path: str | Path, run_id: str) -> RunLayers:
    """The layers of one run of the file; :class:`OutputError` when the file has no such run."""
    for rec in find_runs(path):
        if rec.run_id == run_id:
            return RunLayers(Path(path), rec.run_id, rec.layer)
    raise OutputError(f"{path} holds no run {run_id!r}; choose one of the runs it lists")


def read_done_tiles(path: str | Path, run_id: str) -> dict[str, list[Detection]]:
    """The tiles a run has finished, each with its raw detections (what resuming starts from)."""
    rec = run_layers(path, run_id)
    done = read_raw_detections(path, rec.raw_layer, run_id)
    return {t: done.get(t, []) for t in sorted(done_tile_ids(path, run_id))}


def read_features(path: str | Path, layer: str) -> list[tuple[dict[str, Any], tuple[tuple[float, float], ...]]]:
    """Every feature of a layer, in fid order: its attributes and the exterior ring of its polygon."""
    with _gdal_quiet() as gdal:
        ds = gdal.OpenEx(str(path), gdal.OF_VECTOR, allowed_drivers=["GPKG"])
        if ds is None:
            raise OutputError(f"{path} cannot be opened as a GeoPackage ({gdal.GetLastErrorMsg()})")
        lyr = ds.GetLayerByName(layer)
        if lyr is None:
            raise OutputError(f"{path} has no layer {layer!r}")
        out = []
        lyr.ResetReading()
        for feature in lyr:
            values = feature.items()
            geom = feature.GetGeometryRef()
            ring: tuple[tuple[float, float], ...] = ()
            if geom is not None and geom.GetGeometryCount():
                r = geom.GetGeometryRef(0)
                ring = tuple((r.GetX(k), r.GetY(k)) for k in range(r.GetPointCount()))
            out.append((values, ring))
        ds = None
    return out


def describe_schema(path: str | Path) -> dict[str, dict[str, Any]]:
    """Every layer of a file as GDAL sees it: ``{layer: {"geometry": type name, "srs": authority code,
    "fields": [(name, type name, subtype name, width)]}}``, for comparing the writers."""
    with _gdal_quiet() as gdal:
        _, ogr, _ = _ogr()
        ds = gdal.OpenEx(str(path), gdal.OF_VECTOR, allowed_drivers=["GPKG"])
        if ds is None:
            raise OutputError(f"{path} cannot be opened as a GeoPackage ({gdal.GetLastErrorMsg()})")
        out: dict[str, dict[str, Any]] = {}
        for k in range(ds.GetLayerCount()):
            lyr = ds.GetLayerByIndex(k)
            defn = lyr.GetLayerDefn()
            srs = lyr.GetSpatialRef()
            out[lyr.GetName()] = {
                "geometry": ogr.GeometryTypeToName(lyr.GetGeomType()),
                "geometry_column": lyr.GetGeometryColumn(),
                "fid_column": lyr.GetFIDColumn(),
                "srs": None if srs is None else f"{srs.GetAuthorityName(None)}:{srs.GetAuthorityCode(None)}",
                "fields": [
                    (
                        defn.GetFieldDefn(i).GetName(),
                        ogr.GetFieldTypeName(defn.GetFieldDefn(i).GetType()),
                        ogr.GetFieldSubTypeName(defn.GetFieldDefn(i).GetSubType()),
                        defn.GetFieldDefn(i).GetWidth(),
                    )
                    for i in range(defn.GetFieldCount())
                ],
            }
        ds = None
    return out
