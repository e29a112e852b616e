"""The results GeoPackage of a grounding run, written once for both writers.

Pure: the standard library and numpy only, no GDAL and no QGIS. ``geo-r1 ground`` writes the file
through pyogrio (:mod:`engine.gpkg`), the QGIS plugin through GDAL's own Python bindings
(:mod:`geo_r1_qgis.qgis_io.gpkg_ogr`). Both pass a small :class:`FeatureWriter` (append rows to a table in
one transaction, creating the file or the table when missing) to :class:`GeoPackageRun`, which holds
everything else: the table names and fields below, the run row, resuming, and the bookkeeping that
is plain SQLite (``sqlite3``). So a file written by either is read, resumed and finished by the other.

Layout of one file (it may hold many runs)
------------------------------------------
``<layer>``
    The run's answer: one polygon per merged detection, written once, at the end, in one
    transaction. Fields: :data:`ANSWER_FIELDS`.
``<layer>_tiles_raw``
    Every per-tile detection before merging (the same fields plus the box in raster pixels,
    ``px_x1 .. px_y2``; :data:`RAW_FIELDS`), written as the run goes. It is what a resumed run merges again.
    It is created, empty, when the run starts, so a viewer can open it at once and reload it as tiles finish.
``<layer>_outline``
    Runs with outlines only (task ``gres``, or ``outline``: the engine's SAM): one MultiPolygon per merged
    detection that has an outline, with the answer layer's fields (:data:`ANSWER_FIELDS`), written at the end
    beside it. Pieces of one object in several tiles are joined (:func:`~geo_r1_qgis.core.outline.union_outlines`).
    Outlines are not kept per tile: a resumed run's outline layer holds the outlines of the tiles it asked
    itself (the boxes of every tile, as before).
``geo_r1_tiles`` (no geometry; :data:`TILES_FIELDS`)
    One row per finished tile: run_id, tile_id, status (``done`` / ``skipped``), n_boxes, the
    window in raster pixels, written time, and the engine that answered it (its URL; empty for a skipped
    tile, and in files written before the column existed, to which it is added on opening:
    :func:`add_missing_tile_columns`). **This table is the record of progress.**
``geo_r1_runs`` (no geometry; :data:`RUNS_FIELDS`)
    One row per run: run_id, layer, status (``running``, ``done``, ``canceled``, ``interrupted``,
    ``failed``), expression, mode, the parameters as JSON (:func:`run_parameters`, with the engine's active
    adapter added by :func:`with_adapter`; a resumed run must match them exactly), the raster (path, CRS WKT,
    size, transform), the output CRS, the engine's ``/info`` as JSON, started / finished times (ISO 8601 text,
    UTC, milliseconds) and the summary as JSON.

Field types are OGR's (``String``, ``Real``, ``Integer`` (32-bit), ``Integer64``, ``DateTime``);
both writers create them so, and GDAL stores them as SQLite ``TEXT``, ``REAL``, ``MEDIUMINT``,
``INTEGER`` and ``DATETIME``. Date-times are naive UTC, truncated to milliseconds. New files are
GeoPackage 1.2 (:data:`GPKG_VERSION`), which QGIS 3.22's GDAL reads without a warning.

Transactions, interruption and resume
-------------------------------------
Each append is one transaction (SQLite underneath: a process killed in the middle leaves the file as
it was before; the journal rolls the rest back). The pipeline commits after each engine request:
first the raw detections of those tiles (one append), then their rows in ``geo_r1_tiles`` (one
append). So a tile counts as done only once its detections are on disk. A kill between the two
appends leaves raw rows of tiles that are not marked done; resuming first **deletes the raw rows of
this run whose tile is not in** ``geo_r1_tiles``, reads the done tiles and their detections back,
processes only the others, and then merges everything. Tile ids are stable for the same parameters,
so there are no duplicates. If the answer layer already holds features but the run row is not yet
marked done, resuming just marks it done (an answer layer that exists but is empty is written again).

Never overwriting
-----------------
A new run always adds new layers to an existing GeoPackage (or creates the file). A layer name that
already exists is an error unless resuming continues that very run. A file that exists but is not a
GeoPackage is an error. Nothing is ever deleted except the orphaned raw rows above.

Readers while a run writes
--------------------------
QGIS (3.22 and later, with GDAL >= 3.4.2) opens a GeoPackage layer read-only with GDAL's ``NOLOCK=ON``: no
file locks at all, which GDAL documents as safe only while no other process changes the file. A layer left
open in QGIS while a run wrote the same file (``geo-r1 ground``, or the plugin's own task) could so read a
page half-written and log "database disk image is malformed", "disk I/O error" or "At least one of the
required GeoPackage tables ... is missing" (the file itself stayed intact). GDAL ignores ``NOLOCK`` for a file
in SQLite's WAL journal mode, where readers take a consistent snapshot and neither blocks a writer. So each
run holds its file in WAL mode from opening to its end (:class:`WalHold`, one idle connection; QGIS returns a
file it closes to the ``delete`` mode, and the held connection stops that while the run writes), and at the end
checkpoints the log into the file and returns it to ``delete`` when nobody else has it open. The panel also
holds the files whose layers it shows (``gpkg_ogr.hold_wal``), so its layers are opened in WAL mode and read
safely while a later run writes. A layer opened in QGIS *before* a run starts, while the file was in
``delete`` mode, still reads without locks: it reports "unable to open database file" once the run switches
the file, instead of reading torn pages; removing and adding it again (or the panel's own layers) reads with
locks.

On Linux and macOS every hold is a connection in a small child process (:func:`hold_in_child`): locks there
are POSIX locks, which a process loses on a file as soon as it closes *any* descriptor of it, and GDAL opens
and closes the file to identify it each time QGIS opens a layer. A connection held in QGIS's own process so
lost its shared lock at the first layer QGIS opened; when ``geo-r1 ground`` then ended its run, its hold could
checkpoint the log away and return the file to ``delete`` under QGIS's open WAL layers, and QGIS 3.40 logged
"database disk image is malformed: this file is a WAL-enabled database" for a layer opened at that moment.

Small updates (the run row's status, deleting orphaned raw rows) and every read go through
``sqlite3``, in a transaction: those tables carry no trigger that needs GDAL's SQL functions (the
R-tree triggers on delete only use the feature id).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from .area import area_digest
from .errors import ConfigError, OutputError
from .geometry import Affine, PixelBox, Ring, Tile, box_to_polygon, polygon_to_wkb
from .merge import Detection
from .outline import multipolygon_to_wkb
from .pipeline import GroundingJob, MapDetection, RunSummary
from .results import OUTPUT_FIELDS, detection_values, make_run_id, run_meta

__all__ = [
    "ANSWER_FIELDS",
    "GPKG_VERSION",
    "RAW_FIELDS",
    "RAW_SUFFIX",
    "RUNS_FIELDS",
    "RUNS_TABLE",
    "TILES_FIELDS",
    "TILES_TABLE",
    "FeatureWriter",
    "Field",
    "GeoPackageRun",
    "RunRecord",
    "SameCrs",
    "canonical_raster_path",
    "check_layer_name",
    "find_runs",
    "is_gdal_path",
    "job_parameters",
    "layer_name_for",
    "list_tables",
    "read_raw_detections",
    "run_parameters",
    "tile_outline",
    "with_adapter",
]

log = logging.getLogger(__name__)

RUNS_TABLE = "geo_r1_runs"
TILES_TABLE = "geo_r1_tiles"
RAW_SUFFIX = "_tiles_raw"
OUTLINE_SUFFIX = "_outline"
#: the outline layer's geometry (the box layers': :data:`GEOMETRY_TYPE`)
OUTLINE_GEOMETRY_TYPE = "MultiPolygon"
#: GeoPackage version of new files (readable without warnings by GDAL >= 2.2, hence QGIS 3.22)
GPKG_VERSION = "1.2"
#: the geometry type of the answer and raw layers (OGR's name)
GEOMETRY_TYPE = "Polygon"

# OGR's field type names (ogr.GetFieldTypeName), which both writers map to their own constants.
STRING = "String"
REAL = "Real"
INTEGER = "Integer"  # 32-bit
INTEGER64 = "Integer64"
DATETIME = "DateTime"
FIELD_TYPES = (STRING, REAL, INTEGER, INTEGER64, DATETIME)


@dataclass(frozen=True)
class Field:
    """One column of a table: its name and OGR field type (one of :data:`FIELD_TYPES`)."""

    name: str
    type: str

    def __post_init__(self) -> None:
        if self.type not in FIELD_TYPES:
            raise ConfigError(f"field {self.name!r} has type {self.type!r}; use one of {FIELD_TYPES}")


_ANSWER_TYPES = {"score": REAL, "presence": REAL, "created": DATETIME, "truncated": INTEGER}
#: the answer layer ``<layer>``: :data:`~geo_r1_qgis.core.results.OUTPUT_FIELDS` with their types
ANSWER_FIELDS: tuple[Field, ...] = tuple(Field(n, _ANSWER_TYPES.get(n, STRING)) for n in OUTPUT_FIELDS)
#: the raw layer ``<layer>_tiles_raw``: the answer's fields and the box in full-resolution raster pixels
RAW_FIELDS: tuple[Field, ...] = (*ANSWER_FIELDS, *(Field(n, REAL) for n in ("px_x1", "px_y1", "px_x2", "px_y2")))
#: ``geo_r1_tiles``: one row per finished tile
TILES_FIELDS: tuple[Field, ...] = (
    Field("run_id", STRING),
    Field("tile_id", STRING),
    Field("status", STRING),
    Field("n_boxes", INTEGER),
    Field("window", STRING),
    Field("written", DATETIME),
    Field("engine", STRING),  # the engine that answered the tile (issue 20: a run may use several)
)
#: ``geo_r1_runs``: one row per run
RUNS_FIELDS: tuple[Field, ...] = (
    Field("run_id", STRING),
    Field("layer", STRING),
    Field("status", STRING),
    Field("expression", STRING),
    Field("mode", STRING),
    Field("parameters", STRING),
    Field("raster_path", STRING),
    Field("raster_crs", STRING),
    Field("raster_width", INTEGER64),
    Field("raster_height", INTEGER64),
    Field("raster_transform", STRING),
    Field("raster_info", STRING),
    Field("output_crs", STRING),
    Field("engine", STRING),
    Field("started", STRING),
    Field("finished", STRING),
    Field("summary", STRING),
)


def names(fields: Sequence[Field]) -> tuple[str, ...]:
    return tuple(f.name for f in fields)


# --------------------------------------------------------------------------------------------------
# Names, parameters and times
# --------------------------------------------------------------------------------------------------


def layer_name_for(expression: str, run_id: str) -> str:
    """A safe layer name from the expression and the run id, e.g. ``storage_tanks_20250101T120000_ab12cd``."""
    slug = re.sub(r"[^0-9a-zA-Z]+", "_", expression.lower()).strip("_")[:40] or "ground"
    if slug[0].isdigit():
        slug = "q_" + slug
    return f"{slug}_{run_id}"


def check_layer_name(name: str, option: str = "--layer") -> str:
    """``name`` if it can be a layer of the file; :class:`ConfigError` naming the rule otherwise."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]{0,62}", name) or name.startswith("gpkg_"):
        raise ConfigError(
            f"{option} {name!r} is not a usable layer name: use letters, digits, _ and -, start with a letter, "
            "at most 63 characters, not starting with gpkg_"
        )
    if name in (RUNS_TABLE, TILES_TABLE):
        raise ConfigError(f"{option} {name!r} is reserved for the run bookkeeping; choose another name")
    return name


def run_parameters(
    *,
    raster: str,
    expression: str,
    mode: str,
    gsd: float | None,
    tile: int,
    overlap: int,
    bands: Sequence[int],
    bbox: Sequence[float] | None,
    dst_crs: str | None,
    max_new_tokens: int | None,
    reasoning: bool,
    coarse_to_fine: bool,
    top_k: int,
    min_score: float,
    scale: float,
) -> dict[str, Any]:
    """The parameters that define a run's results; a resumed run must match them exactly.

    ``raster`` is the absolute path (or GDAL path) of the raster, ``bands`` the three bands used
    (1-based), ``bbox`` the area in the raster's CRS (``None``: the whole raster) and ``scale`` the
    output pixel size over the native one. ``geo-r1 ground`` and the plugin build them here, so either
    resumes the other's run.
    """
    return {
        "raster": str(raster),
        "expression": expression,
        "mode": mode,
        "gsd": gsd,
        "tile": int(tile),
        "overlap": int(overlap),
        "bands": [int(b) for b in bands],
        "bbox": [float(v) for v in bbox] if bbox else None,
        "dst_crs": dst_crs,
        "max_new_tokens": max_new_tokens,
        "reasoning": bool(reasoning),
        "coarse_to_fine": bool(coarse_to_fine),
        "top_k": int(top_k),
        "min_score": float(min_score),
        "scale": float(scale),
    }


def job_parameters(
    job: GroundingJob,
    *,
    raster: str,
    bands: Sequence[int],
    gsd: float | None = None,
    bbox: Sequence[float] | None = None,
    dst_crs: str | None = None,
) -> dict[str, Any]:
    """:func:`run_parameters` of a :class:`~geo_r1_qgis.core.pipeline.GroundingJob` (what the plugin runs):
    ``raster`` through :func:`canonical_raster_path`, ``gsd`` and ``bbox`` as the user gave them. A polygon
    area adds ``"area"`` (its :func:`~geo_r1_qgis.core.area.area_digest`), so only the same area resumes."""
    params = run_parameters(
        raster=canonical_raster_path(raster),
        expression=job.expression,
        mode=job.mode,
        gsd=gsd,
        tile=job.tile_size,
        overlap=job.overlap,
        bands=bands,
        bbox=bbox,
        dst_crs=dst_crs,
        max_new_tokens=job.max_new_tokens,
        reasoning=job.reasoning,
        coarse_to_fine=job.coarse_to_fine,
        top_k=job.top_k,
        min_score=job.min_score,
        scale=job.scale,
    )
    if job.area_polygons is not None:
        params["area"] = area_digest(job.area_polygons)
    return params


_DRIVER_PREFIX = re.compile(r"^[A-Z][A-Z0-9_]+:")


def is_gdal_path(text: str) -> bool:
    """A GDAL virtual file system path, a URL or a driver-prefixed dataset name: for GDAL, not the disk."""
    return text.startswith("/vsi") or "://" in text or bool(_DRIVER_PREFIX.match(text))


def canonical_raster_path(text: str | Path) -> str:
    """How a run records its raster: a local file as its absolute, resolved path; a GDAL path unchanged."""
    text = str(text)
    return text if is_gdal_path(text) else str(Path(text).resolve())


def with_adapter(parameters: Mapping[str, Any], engine: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters with ``"adapter"``: the LoRA adapter the engine answered with (its ``/info``'s active
    adapter's name), so every results layer says which adapter produced it, and a run is resumed only with the
    same adapter. The base model adds no key: a run on it keeps the parameters older files recorded (and resumes
    from them)."""
    params = dict(parameters)
    adapter = engine.get("adapter") if isinstance(engine, Mapping) else None
    if adapter:
        params["adapter"] = str(adapter)
    return params


def parameters_json(parameters: Mapping[str, Any]) -> str:
    """How the parameters are stored and compared."""
    return json.dumps(dict(parameters), sort_keys=True)


def now_utc() -> datetime:
    """Now, naive UTC, truncated to milliseconds (what the files store)."""
    return to_ms(datetime.now(timezone.utc).replace(tzinfo=None))


def to_ms(dt: datetime) -> datetime:
    return dt.replace(microsecond=dt.microsecond // 1000 * 1000)


def iso_ms(dt: datetime) -> str:
    """The text of ``started`` / ``finished``: ``2025-01-01T12:00:00.000``."""
    return dt.isoformat(timespec="milliseconds")


# --------------------------------------------------------------------------------------------------
# Reading (plain SQLite)
# --------------------------------------------------------------------------------------------------


def ident(name: str) -> str:
    """An SQLite identifier, quoted (``"`` doubled): table names read from a file can hold any character."""
    return '"' + str(name).replace('"', '""') + '"'


@contextmanager
def connect(path: str | Path) -> Iterator[sqlite3.Connection]:
    """One SQLite transaction on the file (committed on success, rolled back on error), then closed."""
    con = sqlite3.connect(str(path), timeout=30.0)
    try:
        with con:
            yield con
    finally:
        con.close()


#: the held connection of a :class:`WalHold` in a separate process (run with ``python -I -c``): WAL on, one
#: read (so the shared lock is taken), the mode on stdout, then held until stdin closes (or the parent dies)
_KEEPER = """
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], timeout=30.0, isolation_level=None)
try:
    mode = str(con.execute("PRAGMA journal_mode = WAL").fetchall()[0][0]).lower()
    con.execute("SELECT count(*) FROM sqlite_master").fetchall()
except sqlite3.Error as exc:
    mode = "error: %s" % exc
sys.stdout.write(mode + "\\n")
sys.stdout.flush()
sys.stdin.read()
try:
    con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    con.execute("PRAGMA busy_timeout = 0")
    con.execute("PRAGMA journal_mode = DELETE").fetchall()
except sqlite3.Error:
    pass
con.close()
"""


def hold_in_child(shares_sqlite: bool) -> bool:
    """Whether a :class:`WalHold` must keep its connection in a child process (its ``separate``): always where
    locks are POSIX advisory locks (Linux, macOS). Closing *any* descriptor of a file drops every lock the
    process holds on it, and GDAL opens and closes a file to identify it each time QGIS opens a layer of it,
    so a connection held in QGIS's process would lose its shared lock at the first layer QGIS opened, and
    another process could take the file out of WAL under QGIS's open layers. Windows locks belong to the
    handle: there a connection held here is enough where GDAL and ``sqlite3`` share one SQLite library
    (``shares_sqlite``; two libraries in one process do not see each other's connections)."""
    return os.name != "nt" or not shares_sqlite


def _keeper_python() -> str | None:
    """This Python's interpreter program, for a :class:`WalHold`'s child: ``sys.executable`` where it is one (an
    application embedding Python, QGIS on Windows, may name itself there), else the one in ``sys.exec_prefix``."""
    import sys

    exe = Path(sys.executable or "")
    if exe.name.lower().startswith("python") and exe.is_file():
        return str(exe)
    prefix = Path(sys.exec_prefix)
    major, minor = sys.version_info[:2]
    for candidate in (prefix / "python.exe", prefix / "bin" / f"python{major}.{minor}", prefix / "bin" / "python3"):
        if candidate.is_file():
            return str(candidate)
    return None


class WalHold:
    """Keeps a GeoPackage in SQLite's WAL journal mode while it is held (module doc, "Readers while a run writes").

    ``acquire()`` switches the file to WAL and keeps one idle connection open: an open WAL connection holds a
    shared lock, so no other connection (QGIS's provider returning the file to ``delete`` when it closes its
    last handle, in particular) can take the file out of WAL while a run writes. ``release()`` copies the log
    into the file (a passive checkpoint), returns the file to ``delete`` when nobody else has it open (one
    file again, as QGIS leaves it) and closes the connection. Either may be called more than once; a file
    that cannot be switched (a read-only folder, a network share without shared memory) stays as it is.

    ``separate``: hold the connection in a small child process (this Python's interpreter) instead of this one
    (:func:`hold_in_child` says when). Needed where the writer's GDAL carries its own copy of SQLite (pyogrio's
    wheels do): two SQLite libraries in one process do not see each other's connections, and POSIX locks are
    the process's, so the writer closing the file would drop the held connection's lock and delete the log it
    still maps (a malformed file); and needed wherever locks are POSIX ones, since any other code in the
    process that opens and closes the file (GDAL identifying it for QGIS) drops the held connection's lock.
    """

    def __init__(self, path: str | Path, separate: bool = False) -> None:
        self.path = Path(path)
        self.separate = separate
        self._con: sqlite3.Connection | None = None
        self._proc: Any = None

    @property
    def held(self) -> bool:
        return self._con is not None or self._proc is not None

    def acquire(self) -> bool:
        """Hold the file in WAL mode; whether it is now (False: left in its own mode, logged)."""
        if self.held:
            return True
        if not self.path.is_file():
            return False
        mode = self._acquire_child() if self.separate else self._acquire_here()
        if mode != "wal":
            log.warning("%s stays in its own journal mode (%s): a reader without locks (QGIS) may see a run "
                        "half-written", self.path, mode)  # fmt: skip
            self.release()
            return False
        return True

    def _acquire_here(self) -> str:
        con = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False)
        self._con = con
        try:
            mode = str(con.execute("PRAGMA journal_mode = WAL").fetchall()[0][0]).lower()
            # a read opens the log and takes the shared lock an idle WAL connection then keeps (fetchall: the
            # statement is finished, so this connection never pins an old snapshot and checkpoints go on)
            con.execute("SELECT count(*) FROM sqlite_master").fetchall()
        except sqlite3.Error as exc:
            return f"error: {exc}"
        return mode

    def _acquire_child(self) -> str:
        import subprocess  # nosec B404 (our own interpreter, an argument list, no shell)
        import sys

        python = _keeper_python()
        if python is None:
            return f"error: no Python interpreter found to hold it with (sys.executable is {sys.executable!r})"
        try:
            self._proc = subprocess.Popen(  # nosec B603
                [python, "-I", "-c", _KEEPER, str(self.path)], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            return (self._proc.stdout.readline() or "no answer").strip()
        except OSError as exc:
            return f"error: {exc}"

    def release(self) -> None:
        con, self._con = self._con, None
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.stdin.close()
                proc.wait(timeout=60)
            except Exception as exc:  # never let the bookkeeping of a hold fail a run
                log.debug("the WAL hold of %s did not end cleanly: %s", self.path, exc)
                proc.kill()
                proc.wait()
            finally:
                proc.stdout.close()
        if con is None:
            return
        try:
            con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            con.execute("PRAGMA busy_timeout = 0")
            con.execute("PRAGMA journal_mode = DELETE").fetchall()  # only succeeds when no one else has it open
        except sqlite3.Error as exc:  # another reader or writer has it open: it stays in WAL, they hold it
            log.debug("%s stays in WAL mode: %s", self.path, exc)
        finally:
            con.close()


def list_tables(path: str | Path) -> list[str]:
    """Layers and tables of a GeoPackage (``gpkg_contents``); [] when the file does not exist.

    Raises :class:`OutputError` when the file exists and is not a GeoPackage (it is left untouched).
    """
    path = Path(path)
    if not path.exists():
        return []
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise OutputError(f"{path} cannot be read ({exc}); choose another output file") from None
    if head != b"SQLite format 3\x00":
        raise OutputError(f"{path} exists and is not a GeoPackage; it is left untouched: choose another output file")
    try:
        with connect(path) as con:
            return [str(r[0]) for r in con.execute("SELECT table_name FROM gpkg_contents ORDER BY rowid")]
    except sqlite3.Error as exc:
        raise OutputError(
            f"{path} exists but cannot be read as a GeoPackage ({exc}); choose another output file"
        ) from None


@dataclass(frozen=True)
class RunRecord:
    """One row of ``geo_r1_runs``, as a run list shows it."""

    run_id: str
    layer: str
    status: str
    parameters: str
    expression: str = ""
    mode: str = ""
    started: str = ""
    finished: str = ""

    @property
    def raw_layer(self) -> str:
        return self.layer + RAW_SUFFIX

    @property
    def resumable(self) -> bool:
        return self.status != "done"


def find_runs(path: str | Path) -> list[RunRecord]:
    """The runs recorded in a GeoPackage, oldest first (empty when there is no run table)."""
    if RUNS_TABLE not in list_tables(path):
        return []
    with connect(path) as con:
        columns = "run_id, layer, status, parameters, expression, mode, started, finished"
        rows = con.execute(f"SELECT {columns} FROM {ident(RUNS_TABLE)} ORDER BY fid").fetchall()  # nosec B608
    return [RunRecord(*("" if v is None else str(v) for v in r)) for r in rows]


def done_tile_ids(path: str | Path, run_id: str) -> set[str]:
    """The tiles of a run marked ``done`` or ``skipped`` in ``geo_r1_tiles``."""
    if TILES_TABLE not in list_tables(path):
        return set()
    with connect(path) as con:
        return {str(r[0]) for r in con.execute(f"SELECT tile_id FROM {ident(TILES_TABLE)} WHERE run_id = ?", (run_id,))}  # nosec B608


def read_raw_detections(path: str | Path, raw_layer: str, run_id: str) -> dict[str, list[Detection]]:
    """The raw detections of a run by tile id, in the order written (no geometry is needed: the
    boxes are kept in raster pixels)."""
    if raw_layer not in list_tables(path):
        return {}
    cols = ("tile_id", "px_x1", "px_y1", "px_x2", "px_y2", "score", "presence", "label", "reasoning", "truncated")
    out: dict[str, list[Detection]] = {}
    with connect(path) as con:
        rows = con.execute(
            f"SELECT {', '.join(cols)} FROM {ident(raw_layer)} WHERE run_id = ? ORDER BY fid",  # nosec B608
            (run_id,),
        ).fetchall()
    for tile_id, x1, y1, x2, y2, score, presence, label, reasoning, truncated in rows:
        det = Detection(
            box=PixelBox(float(x1), float(y1), float(x2), float(y2)),
            score=float(score),
            presence=float(presence),
            label=str(label or ""),
            reasoning=str(reasoning or ""),
            tile_id=str(tile_id),
            truncated=bool(truncated),
        )
        out.setdefault(det.tile_id, []).append(det)
    return out


def tile_outline(path: str | Path, run_id: str, tile_id: str) -> Ring | None:
    """A finished tile's outline in the raster's CRS: its ``geo_r1_tiles`` window (raster pixels) through the
    run's recorded raster transform; None when the file holds no such tile."""
    tables = list_tables(path)
    if TILES_TABLE not in tables or RUNS_TABLE not in tables:
        return None
    with connect(path) as con:
        row = con.execute(f"SELECT window FROM {ident(TILES_TABLE)} WHERE run_id = ? AND tile_id = ?",  # nosec B608
                          (run_id, tile_id)).fetchone()  # fmt: skip
        run = con.execute(f"SELECT raster_transform FROM {ident(RUNS_TABLE)} WHERE run_id = ?",  # nosec B608
                          (run_id,)).fetchone()  # fmt: skip
    if not row or not run or not row[0] or not run[0]:
        return None
    return box_to_polygon(PixelBox(*json.loads(row[0])), Affine(*json.loads(run[0])[:6]))


def count_rows(path: str | Path, table: str) -> int:
    if table not in list_tables(path):
        return 0
    with connect(path) as con:
        return int(con.execute(f"SELECT count(*) FROM {ident(table)}").fetchone()[0])  # nosec B608


def add_missing_tile_columns(path: str | Path) -> list[str]:
    """Add the columns of :data:`TILES_FIELDS` that an older file's ``geo_r1_tiles`` lacks (at the end, as a new
    file has them; ``TEXT`` for String, as GDAL makes them), so both writers append to it; the names added."""
    if TILES_TABLE not in list_tables(path):
        return []
    sql_types = {STRING: "TEXT", REAL: "REAL", INTEGER: "MEDIUMINT", INTEGER64: "INTEGER", DATETIME: "DATETIME"}
    with connect(path) as con:
        have = {str(r[1]) for r in con.execute(f"PRAGMA table_info({ident(TILES_TABLE)})")}
        added = [f for f in TILES_FIELDS if f.name not in have]
        for f in added:
            con.execute(f"ALTER TABLE {ident(TILES_TABLE)} ADD COLUMN {ident(f.name)} {sql_types[f.type]}")
    if added:
        log.info("%s: added %s to %s (a file from an earlier version)", path, [f.name for f in added], TILES_TABLE)
    return [f.name for f in added]


def delete_orphaned_raw(path: str | Path, raw_layer: str, run_id: str) -> int:
    """Delete the raw rows of ``run_id`` whose tile is not marked done (one transaction); how many."""
    tables = list_tables(path)
    if raw_layer not in tables:
        return 0
    with connect(path) as con:
        if TILES_TABLE in tables:
            cur = con.execute(
                f"DELETE FROM {ident(raw_layer)} WHERE run_id = ? AND tile_id NOT IN "  # nosec B608
                f'(SELECT tile_id FROM "{TILES_TABLE}" WHERE run_id = ?)',
                (run_id, run_id),
            )
        else:
            cur = con.execute(f"DELETE FROM {ident(raw_layer)} WHERE run_id = ?", (run_id,))  # nosec B608
        return max(0, cur.rowcount)


def mark_run(path: str | Path, run_id: str, status: str, summary: Mapping[str, Any] | None = None) -> None:
    """Set a run's status, finished time and summary (one transaction)."""
    if not Path(path).exists():
        return
    with connect(path) as con:
        con.execute(
            f"UPDATE {ident(RUNS_TABLE)} SET status = ?, finished = ?, summary = ? WHERE run_id = ?",  # nosec B608
            (status, iso_ms(now_utc()), json.dumps(dict(summary or {}), default=str), run_id),
        )


# --------------------------------------------------------------------------------------------------
# Writing: the two writers' protocol, and the run
# --------------------------------------------------------------------------------------------------


class FeatureWriter(Protocol):
    """Appending rows to one table of a GeoPackage; :mod:`engine.gpkg` (pyogrio) and
    :mod:`geo_r1_qgis.qgis_io.gpkg_ogr` (``osgeo.ogr``) implement it. A writer whose GDAL runs the same SQLite library
    as Python's ``sqlite3`` says so with a true ``shares_sqlite`` attribute (:class:`WalHold`'s ``separate``)."""

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
        """Append ``rows`` (values in the order of ``fields``) in one transaction.

        Creates the file (GeoPackage :data:`GPKG_VERSION`) when it does not exist, and the table when it
        does not exist: with exactly ``fields``, and a ``geometry_type`` (:data:`GEOMETRY_TYPE`, or
        :data:`OUTLINE_GEOMETRY_TYPE` for the outline layer) geometry column in ``crs_wkt``
        when ``geometries`` (little-endian WKB, one per row) is given, else without geometry. Values are
        ``str``, ``float``, ``int``, naive-UTC :class:`datetime` (``DateTime`` fields) or ``None``.
        Raises :class:`OutputError` when the write fails.
        """


class RingTransform(Protocol):
    """How map rings reach the output CRS (``engine.gpkg.CrsTransform`` reprojects with pyproj)."""

    src_wkt: str
    dst_wkt: str

    def ring(self, ring: Ring) -> Ring: ...


class SameCrs:
    """The output in the raster's own CRS (what the plugin writes)."""

    def __init__(self, wkt: str) -> None:
        self.src_wkt = wkt
        self.dst_wkt = wkt

    def ring(self, ring: Ring) -> Ring:
        return ring


class GeoPackageRun:
    """A :class:`~geo_r1_qgis.core.pipeline.ResultSink` writing one run into a GeoPackage (module doc)."""

    def __init__(
        self,
        path: str | Path,
        *,
        writer: FeatureWriter,
        run_id: str,
        layer: str,
        meta: Mapping[str, str],
        crs: RingTransform,
        resume: bool,
    ) -> None:
        self.path = Path(path)
        self.writer = writer
        self.run_id = run_id
        self.layer = layer
        self.raw_layer = layer + RAW_SUFFIX
        self.outline_layer = layer + OUTLINE_SUFFIX
        self.meta = dict(meta)  # expression, mode, model, adapter, prompt_version
        self.crs = crs
        self.resume = resume
        self._pending_raw: list[tuple[MapDetection, datetime]] = []
        self._pending_tiles: list[tuple[str, Tile, int, str, datetime, str]] = []
        self._done: dict[str, list[Detection]] = {}
        self.final_exists = False
        #: the file held in WAL mode from opening to :meth:`mark` (module doc, "Readers while a run writes")
        self.wal = WalHold(self.path, separate=hold_in_child(getattr(writer, "shares_sqlite", False)))

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open_run(
        cls,
        path: str | Path,
        *,
        writer: FeatureWriter,
        expression: str,
        mode: str,
        parameters: Mapping[str, Any],
        raster: Mapping[str, Any],
        engine: Mapping[str, Any],
        crs: RingTransform,
        layer: str | None = None,
        resume: bool = False,
    ) -> GeoPackageRun:
        """Start a new run (new layers) or, with ``resume``, continue the unfinished run with these parameters."""
        path = Path(path)
        if path.suffix.lower() != ".gpkg":
            raise ConfigError(f"the output {path} must end in .gpkg (a GeoPackage); e.g. results.gpkg")
        if not path.parent.exists():
            raise OutputError(f"the folder of {path} does not exist; create it first")
        layers = list_tables(path)
        add_missing_tile_columns(path)  # an older file: its tiles table gains the engine column
        params_json = parameters_json(with_adapter(parameters, engine))
        meta = run_meta(expression, mode, engine)
        if resume:
            runs = [r for r in find_runs(path) if r.parameters == params_json and (layer is None or r.layer == layer)]
            unfinished = [r for r in runs if r.status != "done"]
            if unfinished:
                rec = unfinished[-1]
                sink = cls(path, writer=writer, run_id=rec.run_id, layer=rec.layer, meta=meta, crs=crs, resume=True)
                sink.wal.acquire()
                sink._load_progress()
                log.info("resuming run %s (layer %s): %d tile(s) already done", rec.run_id, rec.layer, len(sink._done))
                return sink
            if runs:
                raise OutputError(
                    f"the run with these parameters in {path} is already complete (layer {runs[-1].layer}); "
                    "start a new run instead of resuming, which adds a new layer"
                )
            log.warning("nothing to resume in %s for these parameters: starting a new run", path)
        run_id = make_run_id()
        name = check_layer_name(layer) if layer else layer_name_for(expression, run_id)
        for taken in (name, name + RAW_SUFFIX, name + OUTLINE_SUFFIX):
            if taken in layers:
                raise OutputError(
                    f"the layer {taken!r} already exists in {path} and is never overwritten; choose another layer "
                    "name, or resume that run"
                )
        sink = cls(path, writer=writer, run_id=run_id, layer=name, meta=meta, crs=crs, resume=False)
        sink.wal.acquire()  # an existing file: before the first write (a new one: right after it is created)
        sink._write_run_row(params_json, raster, engine)
        sink.wal.acquire()
        sink._write_features(sink.raw_layer, [], raw=True)  # empty: a viewer can open it before the first tile
        return sink

    def run_row(self, params_json: str, raster: Mapping[str, Any], engine: Mapping[str, Any]) -> list[Any]:
        """The new run's row of ``geo_r1_runs``, in the order of :data:`RUNS_FIELDS`."""
        row = {
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
            "started": iso_ms(now_utc()),
            "finished": "",
            "summary": "",
        }
        return [row[f.name] for f in RUNS_FIELDS]

    def _write_run_row(self, params_json: str, raster: Mapping[str, Any], engine: Mapping[str, Any]) -> None:
        self.writer.append(self.path, RUNS_TABLE, RUNS_FIELDS, [self.run_row(params_json, raster, engine)])

    def _load_progress(self) -> None:
        self.final_exists = count_rows(self.path, self.layer) > 0
        removed = delete_orphaned_raw(self.path, self.raw_layer, self.run_id)
        if removed:
            log.info("removed %d raw detection(s) of tiles that were not finished", removed)
        self._done = {t: [] for t in done_tile_ids(self.path, self.run_id)}
        for tile_id, dets in read_raw_detections(self.path, self.raw_layer, self.run_id).items():
            self._done.setdefault(tile_id, []).extend(dets)

    # -- the ResultSink protocol -------------------------------------------------------------------
    def done_tiles(self) -> Mapping[str, Sequence[Detection]]:
        return self._done

    #: the pipeline passes ``engine`` to :meth:`write_tile` (a sink without this attribute is not given it)
    records_engine = True

    def write_tile(
        self, tile_id: str, tile: Tile, detections: Sequence[MapDetection], status: str, engine: str = ""
    ) -> None:
        t = now_utc()
        self._pending_raw.extend((m, t) for m in detections)
        self._pending_tiles.append((tile_id, tile, len(detections), status, t, engine))

    def feature_rows(self, items: Sequence[tuple[MapDetection, datetime]], raw: bool) -> tuple[list[bytes], list[list]]:
        """WKB polygons (in the output CRS) and rows (in the order of the layer's fields)."""
        fields = RAW_FIELDS if raw else ANSWER_FIELDS
        geoms: list[bytes] = []
        rows: list[list] = []
        for m, t in items:
            d = m.detection
            geoms.append(polygon_to_wkb(self.crs.ring(m.ring)))
            values = {
                **detection_values(d, self.meta, self.run_id, to_ms(t)),
                "px_x1": float(d.box.x1),
                "px_y1": float(d.box.y1),
                "px_x2": float(d.box.x2),
                "px_y2": float(d.box.y2),
            }
            rows.append([values[f.name] for f in fields])
        return geoms, rows

    def _write_features(self, layer: str, items: Sequence[tuple[MapDetection, datetime]], raw: bool) -> None:
        geoms, rows = self.feature_rows(items, raw)
        fields = RAW_FIELDS if raw else ANSWER_FIELDS
        self.writer.append(self.path, layer, fields, rows, geometries=geoms, crs_wkt=self.crs.dst_wkt)

    def _write_outlines(self, items: Sequence[tuple[MapDetection, datetime]]) -> None:
        """The outline layer (module doc): MultiPolygons in the output CRS, the answer layer's fields."""
        if not items:
            return
        geoms = [
            multipolygon_to_wkb([tuple(self.crs.ring(ring) for ring in poly) for poly in m.outline]) for m, _ in items
        ]
        rows = [[detection_values(m.detection, self.meta, self.run_id, to_ms(t))[f.name] for f in ANSWER_FIELDS]
                for m, t in items]  # fmt: skip
        self.writer.append(self.path, self.outline_layer, ANSWER_FIELDS, rows, geometries=geoms,
                           crs_wkt=self.crs.dst_wkt, geometry_type=OUTLINE_GEOMETRY_TYPE)  # fmt: skip

    def commit(self) -> None:
        """Write the pending tiles: their raw detections, then their progress rows (see the module doc)."""
        if not self._pending_tiles:
            return
        # Taken off the pending lists first: a commit interrupted anywhere (Ctrl-C lands between GDAL's
        # commit and the return as well) is never repeated by the next commit, which would duplicate rows.
        # Tiles whose progress rows did not make it are simply asked again on resume (module doc).
        raw, tiles = self._pending_raw, self._pending_tiles
        self._pending_raw, self._pending_tiles = [], []
        if raw:
            self._write_features(self.raw_layer, raw, raw=True)
        rows = [
            [self.run_id, tile_id, status, n, json.dumps(tile.window.as_tuple()), to_ms(t), engine]
            for tile_id, tile, n, status, t, engine in tiles
        ]
        self.writer.append(self.path, TILES_TABLE, TILES_FIELDS, rows)
        for tile_id, *_ in tiles:
            self._done.setdefault(tile_id, [])

    def finish(self, final: Sequence[MapDetection], summary: RunSummary) -> None:
        """Write the merged layer (one transaction), then mark the run done."""
        self.commit()
        if self.final_exists:
            log.info("layer %s was already written by the interrupted run; marking the run done", self.layer)
        else:
            t = now_utc()
            self._write_features(self.layer, [(m, t) for m in final], raw=False)
            self._write_outlines([(m, t) for m in final if m.outline])
            self.final_exists = True
        self.mark(summary.status, summary.as_dict())

    def mark(self, status: str, summary: Mapping[str, Any] | None = None) -> None:
        """Update the run row's status (``done``, ``canceled``, ``interrupted``, ``failed``), finished time
        and summary; the run is over, so the file is released from WAL mode (:class:`WalHold`)."""
        try:
            mark_run(self.path, self.run_id, status, summary)
        finally:
            self.wal.release()
