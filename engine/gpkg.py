"""The GeoPackage sink of ``geo-r1 ground``: GDAL's GPKG driver through pyogrio.

Layout of one file (it may hold many runs)
------------------------------------------
``<layer>``
    The run's answer: one polygon per merged detection, written once, at the end, in one
    transaction. Fields: expression, mode, score (box score × presence), presence, label,
    reasoning, model, adapter, prompt_version, tile_id, run_id, created, truncated.
``<layer>_tiles_raw``
    Every per-tile detection before merging (same fields plus the box in raster pixels,
    ``px_x1 .. px_y2``), written as the run goes. It is what a resumed run merges again.
``geo_r1_tiles`` (no geometry)
    One row per finished tile: run_id, tile_id, status (``done`` / ``skipped``), n_boxes, the
    window in raster pixels, written time. **This table is the record of progress.**
``geo_r1_runs`` (no geometry)
    One row per run: run_id, layer, status (``running`` / ``done``), expression, mode, the
    parameters as JSON, the raster (path, CRS WKT, size, transform), the output CRS, the engine's
    ``/info`` as JSON, started / finished times and the run summary as JSON.

Transactions, interruption and resume
-------------------------------------
Each pyogrio write is one GDAL transaction (SQLite underneath: a process killed in the middle
leaves the file as it was before that write; SQLite's journal rolls the rest back). The pipeline
commits after each engine request: first the raw detections of those tiles (one write), then
their rows in ``geo_r1_tiles`` (one write). So a tile counts as done only once its detections are
on disk. A kill between the two writes leaves raw rows of tiles that are not marked done; a
resumed run (``--resume``) first **deletes the raw rows of this run whose tile is not in
``geo_r1_tiles``**, reads the done tiles and their detections back, processes only the others, and
then merges everything. Tile ids are stable for the same parameters, so there are no duplicates.
If the final layer was written but the run row not yet marked done, resume just marks it done.

Never overwriting
-----------------
A new run always adds new layers to an existing GeoPackage (or creates the file). A layer name
that already exists is an error unless ``--resume`` continues that very run. A file that exists but
is not a GeoPackage is an error. Nothing is ever deleted except the orphaned raw rows above.

Small updates (the run row's status, deleting orphaned raw rows) go through Python's ``sqlite3``,
in a transaction: a GeoPackage is an SQLite database and those tables carry no spatial triggers
that need GDAL's SQL functions.

Reprojection (``--dst-crs``)
----------------------------
Polygons are reprojected vertex by vertex with pyproj (``always_xy``): the four corners of each
box are transformed exactly and the edges stay straight lines between them in the output CRS. For
boxes of a few hundred metres the edge curvature this ignores is far below a pixel.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import struct
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from geo_r1_qgis.core.errors import ConfigError, OutputError
from geo_r1_qgis.core.geometry import PixelBox, Ring, Tile, polygon_to_wkb, ring_signed_area
from geo_r1_qgis.core.merge import Detection
from geo_r1_qgis.core.pipeline import MapDetection, RunSummary
from geo_r1_qgis.core.results import OUTPUT_FIELDS, detection_values, make_run_id, run_meta

log = logging.getLogger(__name__)

RUNS_TABLE = "geo_r1_runs"
#: GeoPackage version of new files (readable without warnings by GDAL >= 2.2, hence QGIS 3.22)
GPKG_VERSION = "1.2"
TILES_TABLE = "geo_r1_tiles"
RAW_SUFFIX = "_tiles_raw"

FIELDS = OUTPUT_FIELDS
RAW_FIELDS = (*FIELDS, "px_x1", "px_y1", "px_x2", "px_y2")
_FLOATS = {"score", "presence", "px_x1", "px_y1", "px_x2", "px_y2"}


def now_utc() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _ms(dt: datetime) -> np.datetime64:
    return np.datetime64(dt.replace(microsecond=dt.microsecond // 1000 * 1000), "ms")


def layer_name_for(expression: str, run_id: str) -> str:
    """A safe layer name from the expression and the run id, e.g. ``storage_tanks_20250101T120000_ab12cd``."""
    slug = re.sub(r"[^0-9a-zA-Z]+", "_", expression.lower()).strip("_")[:40] or "ground"
    if slug[0].isdigit():
        slug = "q_" + slug
    return f"{slug}_{run_id}"


def check_layer_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]{0,62}", name) or name.startswith("gpkg_"):
        raise ConfigError(
            f"--layer {name!r} is not a usable layer name: use letters, digits, _ and -, start with a letter, "
            "at most 63 characters, not starting with gpkg_"
        )
    if name in (RUNS_TABLE, TILES_TABLE):
        raise ConfigError(f"--layer {name!r} is reserved for the run bookkeeping; choose another name")
    return name


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


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    layer: str
    status: str
    parameters: str


def find_runs(path: Path) -> list[RunRecord]:
    """Runs recorded in a GeoPackage (empty when there is no run table)."""
    if RUNS_TABLE not in list_layers(path):
        return []
    with _connect(path) as con:
        rows = con.execute(f'SELECT run_id, layer, status, parameters FROM "{RUNS_TABLE}"').fetchall()
    return [RunRecord(*map(str, r)) for r in rows]


@contextmanager
def _connect(path: Path) -> Iterator[sqlite3.Connection]:
    """One SQLite transaction on the file (committed on success, rolled back on error), then closed."""
    con = sqlite3.connect(str(path), timeout=30.0)
    try:
        with con:
            yield con
    finally:
        con.close()


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


def _wkb(ring: Ring) -> bytes:
    return polygon_to_wkb(ring)


def ring_from_wkb(wkb: bytes) -> Ring:
    """The exterior ring of a little-endian 2-D WKB polygon (what this module writes)."""
    (n,) = struct.unpack_from("<I", wkb, 9)
    vals = struct.unpack_from(f"<{2 * n}d", wkb, 13)
    return tuple((vals[2 * i], vals[2 * i + 1]) for i in range(n))


class GeoPackageSink:
    """A :class:`geo_r1_qgis.core.pipeline.ResultSink` writing one run into a GeoPackage."""

    def __init__(
        self,
        path: str | Path,
        *,
        run_id: str,
        layer: str,
        meta: Mapping[str, str],
        crs: CrsTransform,
        resume: bool,
    ) -> None:
        self.path = Path(path)
        self.run_id = run_id
        self.layer = layer
        self.raw_layer = layer + RAW_SUFFIX
        self.meta = dict(meta)  # expression, mode, model, adapter, prompt_version
        self.crs = crs
        self.resume = resume
        self._pending_raw: list[tuple[MapDetection, datetime]] = []
        self._pending_tiles: list[tuple[str, Tile, int, str, datetime]] = []
        self._done: dict[str, list[Detection]] = {}
        self.final_exists = False
        # Each write stays one transaction with SQLite's rollback journal, so a killed process leaves a
        # valid file; only durability against an OS crash or power loss is traded for speed (see BENCHMARKS.md).
        _pyogrio().set_gdal_config_options({"OGR_SQLITE_SYNCHRONOUS": "OFF"})

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open_run(
        cls,
        path: str | Path,
        *,
        expression: str,
        mode: str,
        parameters: Mapping[str, Any],
        raster: Mapping[str, Any],
        engine: Mapping[str, Any],
        crs: CrsTransform,
        layer: str | None = None,
        resume: bool = False,
    ) -> GeoPackageSink:
        """Start a new run (new layers) or, with ``resume``, continue the unfinished run with these parameters."""
        path = Path(path)
        if path.suffix.lower() != ".gpkg":
            raise ConfigError(f"-o {path} must end in .gpkg (a GeoPackage); e.g. -o results.gpkg")
        if not path.parent.exists():
            raise OutputError(f"the folder of {path} does not exist; create it first")
        layers = list_layers(path)
        params_json = json.dumps(dict(parameters), sort_keys=True)
        meta = run_meta(expression, mode, engine)
        if resume:
            runs = [r for r in find_runs(path) if r.parameters == params_json and (layer is None or r.layer == layer)]
            unfinished = [r for r in runs if r.status != "done"]
            if unfinished:
                rec = unfinished[-1]
                sink = cls(path, run_id=rec.run_id, layer=rec.layer, meta=meta, crs=crs, resume=True)
                sink._load_progress()
                log.info("resuming run %s (layer %s): %d tile(s) already done", rec.run_id, rec.layer, len(sink._done))
                return sink
            if runs:
                raise OutputError(
                    f"the run with these parameters in {path} is already complete (layer {runs[-1].layer}); "
                    "drop --resume to start a new run, which adds a new layer"
                )
            log.warning("nothing to resume in %s for these parameters: starting a new run", path)
        run_id = make_run_id()
        name = check_layer_name(layer) if layer else layer_name_for(expression, run_id)
        for taken in (name, name + RAW_SUFFIX):
            if taken in layers:
                raise OutputError(
                    f"the layer {taken!r} already exists in {path} and is never overwritten; choose another --layer, "
                    "or add --resume to continue that run"
                )
        sink = cls(path, run_id=run_id, layer=name, meta=meta, crs=crs, resume=False)
        sink._write_run_row(params_json, raster, engine)
        return sink

    def _write_run_row(self, params_json: str, raster: Mapping[str, Any], engine: Mapping[str, Any]) -> None:
        pyogrio = _pyogrio()
        started = now_utc()
        cols: dict[str, Any] = {
            "run_id": self.run_id,
            "layer": self.layer,
            "status": "running",
            "expression": self.meta["expression"],
            "mode": self.meta["mode"],
            "parameters": params_json,
            "raster_path": str(raster.get("path", "")),
            "raster_crs": self.crs.src_wkt,
            "raster_width": int(raster.get("width", 0)),
            "raster_height": int(raster.get("height", 0)),
            "raster_transform": json.dumps(raster.get("transform")),
            "raster_info": json.dumps(dict(raster), default=str),
            "output_crs": self.crs.dst_wkt,
            "engine": json.dumps(dict(engine), default=str, sort_keys=True),
            "started": started.isoformat(timespec="milliseconds"),
            "finished": "",
            "summary": "",
        }
        arrays = [np.array([v], dtype=np.int64 if isinstance(v, int) else object) for v in cols.values()]
        exists = self.path.exists()
        pyogrio.raw.write(
            self.path,
            None,
            arrays,
            list(cols),
            layer=RUNS_TABLE,
            driver="GPKG",
            append=exists,
            # A new file is GeoPackage 1.2: QGIS 3.22's GDAL 3.6 warns that 1.4 "may only be partially supported".
            **({} if exists else {"dataset_options": {"VERSION": GPKG_VERSION}}),
        )

    def _load_progress(self) -> None:
        layers = list_layers(self.path)
        self.final_exists = self.layer in layers
        done_ids: set[str] = set()
        if TILES_TABLE in layers:
            with _connect(self.path) as con:
                done_ids = {
                    str(r[0])
                    for r in con.execute(f'SELECT tile_id FROM "{TILES_TABLE}" WHERE run_id = ?', (self.run_id,))
                }
        self._done = {t: [] for t in done_ids}
        if self.raw_layer not in layers:
            return
        with _connect(self.path) as con:  # one transaction
            cur = con.execute(
                f'DELETE FROM "{self.raw_layer}" WHERE run_id = ? AND tile_id NOT IN '
                f'(SELECT tile_id FROM "{TILES_TABLE}" WHERE run_id = ?)'
                if TILES_TABLE in layers
                else f'DELETE FROM "{self.raw_layer}" WHERE run_id = ?',
                (self.run_id, self.run_id) if TILES_TABLE in layers else (self.run_id,),
            )
            if cur.rowcount:
                log.info("removed %d raw detection(s) of tiles that were not finished", cur.rowcount)
        pyogrio = _pyogrio()
        _, _, _, data = pyogrio.raw.read(
            self.path,
            layer=self.raw_layer,
            columns=list(RAW_FIELDS),
            where=f"run_id = '{self.run_id}'",
            read_geometry=False,
        )
        cols = dict(zip(RAW_FIELDS, data, strict=True))
        for i in range(len(cols["tile_id"])):
            det = Detection(
                box=PixelBox(*(float(cols[k][i]) for k in ("px_x1", "px_y1", "px_x2", "px_y2"))),
                score=float(cols["score"][i]),
                presence=float(cols["presence"][i]),
                label=str(cols["label"][i] or ""),
                reasoning=str(cols["reasoning"][i] or ""),
                tile_id=str(cols["tile_id"][i]),
                truncated=bool(cols["truncated"][i]),
            )
            self._done.setdefault(det.tile_id, []).append(det)

    # -- the ResultSink protocol -------------------------------------------------------------------
    def done_tiles(self) -> Mapping[str, Sequence[Detection]]:
        return self._done

    def write_tile(self, tile_id: str, tile: Tile, detections: Sequence[MapDetection], status: str) -> None:
        t = now_utc()
        self._pending_raw.extend((m, t) for m in detections)
        self._pending_tiles.append((tile_id, tile, len(detections), status, t))

    def _columns(self, items: Sequence[tuple[MapDetection, datetime]], raw: bool) -> tuple[Any, list[Any], list[str]]:
        names = list(RAW_FIELDS if raw else FIELDS)
        n = len(items)
        geoms = np.empty(n, dtype=object)
        cols: dict[str, list[Any]] = {k: [] for k in names}
        for i, (m, t) in enumerate(items):
            d = m.detection
            geoms[i] = _wkb(self.crs.ring(m.ring))
            row = {
                **detection_values(d, self.meta, self.run_id, _ms(t)),
                "px_x1": d.box.x1,
                "px_y1": d.box.y1,
                "px_x2": d.box.x2,
                "px_y2": d.box.y2,
            }
            for k in names:
                cols[k].append(row[k])
        arrays = []
        for k in names:
            if k in _FLOATS:
                arrays.append(np.array(cols[k], dtype=np.float64))
            elif k == "created":
                arrays.append(np.array(cols[k], dtype="datetime64[ms]"))
            elif k == "truncated":
                arrays.append(np.array(cols[k], dtype=np.int32))
            else:
                arrays.append(np.array(cols[k], dtype=object))
        return geoms, arrays, names

    def _write_features(self, layer: str, items: Sequence[tuple[MapDetection, datetime]], raw: bool) -> None:
        pyogrio = _pyogrio()
        geoms, arrays, names = self._columns(items, raw)
        pyogrio.raw.write(
            self.path,
            geoms,
            arrays,
            names,
            layer=layer,
            driver="GPKG",
            geometry_type="Polygon",
            crs=self.crs.dst_wkt,
            append=True,
        )

    def commit(self) -> None:
        """Write the pending tiles: their raw detections, then their progress rows (see the module doc)."""
        if not self._pending_tiles:
            return
        if self._pending_raw:
            self._write_features(self.raw_layer, self._pending_raw, raw=True)
        pyogrio = _pyogrio()
        rows = self._pending_tiles
        arrays = [
            np.array([self.run_id] * len(rows), dtype=object),
            np.array([r[0] for r in rows], dtype=object),
            np.array([r[3] for r in rows], dtype=object),
            np.array([r[2] for r in rows], dtype=np.int32),
            np.array([json.dumps(r[1].window.as_tuple()) for r in rows], dtype=object),
            np.array([_ms(r[4]) for r in rows], dtype="datetime64[ms]"),
        ]
        pyogrio.raw.write(
            self.path,
            None,
            arrays,
            ["run_id", "tile_id", "status", "n_boxes", "window", "written"],
            layer=TILES_TABLE,
            driver="GPKG",
            append=True,
        )
        for tile_id, *_ in rows:
            self._done.setdefault(tile_id, [])
        self._pending_raw = []
        self._pending_tiles = []

    def finish(self, final: Sequence[MapDetection], summary: RunSummary) -> None:
        """Write the merged layer (one transaction), then mark the run done."""
        self.commit()
        if self.final_exists:
            log.info("layer %s was already written by the interrupted run; marking the run done", self.layer)
        else:
            t = now_utc()
            self._write_features(self.layer, [(m, t) for m in final], raw=False)
            self.final_exists = True
        self.mark(summary.status, summary.as_dict())

    def mark(self, status: str, summary: Mapping[str, Any] | None = None) -> None:
        """Update the run row's status (``done``, ``canceled``, ``failed``), finished time and summary."""
        if not self.path.exists():
            return
        with _connect(self.path) as con:
            con.execute(
                f'UPDATE "{RUNS_TABLE}" SET status = ?, finished = ?, summary = ? WHERE run_id = ?',
                (
                    status,
                    now_utc().isoformat(timespec="milliseconds"),
                    json.dumps(dict(summary or {}), default=str),
                    self.run_id,
                ),
            )
