"""The whole-raster grounding loop, shared by the ``geo-r1 ground`` command and the QGIS plugin.

Pure: the standard library and numpy only (it runs under QGIS's own Python). Reading pixels and
writing results go through two small protocols, :class:`RasterSource` and :class:`ResultSink`;
the command line implements them with rasterio and GDAL's GeoPackage driver
(:mod:`engine.rasters`, :mod:`engine.gpkg`), the plugin with QGIS's providers. The engine is
reached through :class:`GroundingClient`, which :class:`~geo_r1_qgis.core.client.EngineClient`
implements over HTTP.

The run
-------
1. The area (the whole raster or a window) is cut into tiles by
   :func:`~geo_r1_qgis.core.geometry.make_tile_grid` at the job's scale (ground resolution).
   With ``area_polygons`` only the tiles that share area with a polygon are kept, and a box whose
   centre lies outside every polygon is dropped before it is written (:mod:`~geo_r1_qgis.core.area`).
2. Tiles are read one by one; a tile with no valid pixel is *skipped* (recorded, never sent).
   Valid tiles are sent ``batch_size`` at a time in one ``/ground`` request; the engine batches them.
   Up to ``in_flight`` tiles are asked at once, over concurrent requests from worker threads and over the
   engines of an :class:`EnginePool` (each as many as its ``/info`` says); answers are written in tile order.
   A request that fails for a reason of its engine goes to another engine; with none left, the run stops.
3. Each box comes back in tile-image pixels; it is clipped to the tile, taken to full-resolution
   raster pixels (:meth:`Tile.to_raster`), flagged *truncated* when it touches an inner tile edge
   (:func:`~geo_r1_qgis.core.merge.flag_truncated`) and handed to the sink, one transaction per
   tile. Tiles the sink already holds (a resumed run) are not read again: their detections are
   taken back from the sink.
4. At the end every detection is merged across tiles
   (:func:`~geo_r1_qgis.core.merge.merge_detections`: duplicates fused, a box cut by a tile edge
   kept once), the mode picks the answer (:func:`~geo_r1_qgis.core.merge.select_mode`), each box
   becomes a map polygon through the raster's full affine
   (:func:`~geo_r1_qgis.core.geometry.box_to_polygon`) and the sink writes the final layer.

Scores
------
The score used for ranking and stored with a detection is **box score × tile presence**: the
engine's confidence in the box times its confidence that the referred object is in the tile at all.
A box from a tile where the model hesitates whether anything is there ranks below an equally sure
box from a tile where it is certain. ``presence`` is kept on its own as well.

Tasks and the two modes
-----------------------
* ``all`` (every instance): every tile is asked with the engine task ``multi`` (all boxes).
* ``one`` (the single best match): tiles are asked with task ``rec`` (one box per tile, the
  paper's REC prompt); the best merged detection over the whole area wins.
  **Coarse to fine:** when the full tiling would take more than ``coarse_min_tiles`` tiles, a
  *coarse pass* first covers the whole area with at most ``coarse_grid`` × ``coarse_grid`` tiles of
  a downsampled overview (task ``multi``, so each coarse tile can name several candidates); the
  ``top_k`` best merged candidates get one full-resolution window each, centred on the candidate
  (:func:`~geo_r1_qgis.core.merge.refinement_windows`); the *refine pass* asks those windows with
  task ``rec`` and the best refined detection is the answer. If the coarse pass finds nothing,
  the full tiling runs instead (an object too small to see in the overview is still found); if the
  refine pass finds nothing, the best coarse candidate is the answer.

Tile ids
--------
``r<row>c<col>`` for the full tiling, ``c-r<row>c<col>`` for coarse tiles and ``f<k>-r<row>c<col>``
for the refine window ``k``. They are unique within a run and stable between runs with the same
parameters, which is what resuming relies on.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any, Protocol

from .area import AreaPolygon, area_bounds, box_in_area, check_area, tiles_touching
from .client import EngineClient, GroundResult, TileImage, engine_capacity, engines_info
from .errors import (
    ConfigError,
    EmptyRasterError,
    EngineOverloadedError,
    EngineRequestError,
    EngineUnavailableError,
    ExtentError,
)
from .geometry import Affine, PixelBox, Ring, Tile, TileGridSpec, box_to_polygon, make_tile_grid
from .merge import Detection, flag_truncated, merge_detections, refinement_windows, select_mode
from .outline import polygon_to_map
from .run_spec import check_run_values

__all__ = [
    "EnginePool",
    "EngineSlot",
    "GroundingClient",
    "GroundingJob",
    "MapDetection",
    "PassPlan",
    "RasterSource",
    "ResultSink",
    "RunSummary",
    "coarse_scale",
    "connect_engines",
    "plan_full",
    "result_to_detections",
    "run_grounding",
]

log = logging.getLogger(__name__)

#: The engine task each pass uses (see the module docstring).
TASK_ALL = "multi"
TASK_ONE = "rec"
TASK_COARSE = "multi"


# --------------------------------------------------------------------------------------------------
# Configuration and protocols
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroundingJob:
    """What to ground and how. Checks itself; every message names the bad value and the fix."""

    # -- the query
    expression: str
    mode: str = "all"
    reasoning: bool = True
    max_new_tokens: int | None = None  # None: the engine's default for the task (Geo-R1: rec 256, multi 1024)
    # -- the tile grid (tile-image pixels; scale = output pixel size / native pixel size)
    tile_size: int = 504  # geometry.DEFAULT_TILE: a multiple of 28, unresized by the model
    overlap: int = 64
    scale: float = 1.0
    #: the processed window in raster pixels (``None``: the whole raster)
    window: PixelBox | None = None
    #: polygons in raster pixels (``None``: no polygon area): only tiles that share area with one are
    #: asked, and boxes whose centre lies outside every polygon are dropped (:mod:`.area`)
    area_polygons: tuple[AreaPolygon, ...] | None = None
    # -- requests
    batch_size: int = 8
    #: tiles asked at once over all engines (None: what the engines take, their ``/info``)
    in_flight: int | None = None
    # -- merging
    iou_threshold: float = 0.5
    containment_threshold: float = 0.7
    #: detections whose score (box score × presence) is below this are dropped
    min_score: float = 0.0
    # -- coarse to fine (mode ``one`` only)
    coarse_to_fine: bool = True
    #: use coarse to fine only when the full tiling has more tiles than this
    coarse_min_tiles: int = 16
    #: the coarse overview is covered by at most coarse_grid × coarse_grid tiles
    coarse_grid: int = 2
    #: candidates refined at full resolution
    top_k: int = 3
    # -- outlines (the engine's SAM: geo-r1 serve --sam)
    #: Geo-R1's GRES task for the full-resolution tiles (mode ``all`` only): boxes and keypoints, then SAM
    gres: bool = False
    #: "refine to outline": SAM outlines of every box (implied by ``gres``)
    outline: bool = False

    def __post_init__(self) -> None:
        # the run's own values are checked where every run description checks them
        check_run_values(expression=self.expression, mode=self.mode, tile_size=self.tile_size, overlap=self.overlap,
                         batch_size=self.batch_size, max_new_tokens=self.max_new_tokens, top_k=self.top_k,
                         min_score=self.min_score, in_flight=self.in_flight)  # fmt: skip
        # TileGridSpec checks the scale and explains it.
        TileGridSpec(tile_size=self.tile_size, overlap=self.overlap, scale=self.scale)
        for name in ("coarse_min_tiles", "coarse_grid"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if self.window is not None and not isinstance(self.window, PixelBox):
            raise ConfigError(f"window must be a PixelBox in raster pixels or None, got {self.window!r}")
        if self.area_polygons is not None:
            object.__setattr__(self, "area_polygons", check_area(self.area_polygons))
        if self.gres and self.mode != "all":
            raise ConfigError("the gres task finds every object (mode all); for one object use mode one with outline")

    @property
    def outlines(self) -> bool:
        """Whether the engine is asked for outlines (``gres`` or ``outline``)."""
        return self.gres or self.outline

    def keeps(self, det: Detection) -> bool:
        """Whether a detection passes the job's filters: ``min_score`` and the polygon area (box centre inside)."""
        if det.score < self.min_score:
            return False
        return self.area_polygons is None or box_in_area(det.box, self.area_polygons)

    @property
    def spec(self) -> TileGridSpec:
        return TileGridSpec(tile_size=self.tile_size, overlap=self.overlap, scale=self.scale)

    @property
    def task(self) -> str:
        """The engine task of the full-resolution tiles: ``multi`` for ``all``, ``rec`` for ``one``."""
        if self.gres:
            return "gres"
        return TASK_ALL if self.mode == "all" else TASK_ONE


class RasterSource(Protocol):
    """Pixels of one raster. ``read`` returns the tile image and the fraction of valid pixels in it."""

    width: int
    height: int
    transform: Affine
    crs_wkt: str

    def read(self, tile: Tile) -> tuple[Any, float]:
        """``(rgb, valid_fraction)``: a ``(tile.size[1], tile.size[0], 3)`` uint8 array and a fraction
        in [0, 1]; the window ``tile.window`` resampled to ``tile.size``; invalid pixels set to 0."""


@dataclass(frozen=True)
class MapDetection:
    """A merged or per-tile detection with its map polygon (raster CRS, closed, counter-clockwise)."""

    detection: Detection
    ring: Ring
    #: the detection's outline on the map (raster CRS; polygons of closed (n, 2) ring arrays, exteriors
    #: counter-clockwise); not part of the equality
    outline: tuple = field(default=(), compare=False)


class ResultSink(Protocol):
    """Where results go. A tile is written whole or not at all (see :meth:`commit`)."""

    def done_tiles(self) -> Mapping[str, Sequence[Detection]]:
        """Tiles already written by an earlier, interrupted run, with their detections."""

    def write_tile(self, tile_id: str, tile: Tile, detections: Sequence[MapDetection], status: str) -> None:
        """Record one finished tile (``status`` is ``"done"`` or ``"skipped"``: no valid pixel).

        A sink with a true ``records_engine`` attribute is also given ``engine=``: the name (URL) of the engine
        that answered the tile (:class:`~geo_r1_qgis.core.gpkg_schema.GeoPackageRun` records it)."""

    def commit(self) -> None:
        """Make the tiles written since the last commit durable, in one transaction of whole tiles.

        The pipeline calls it after each engine request (and before it stops on a cancel), so a
        sink may group the tiles of one request into one transaction; a sink that writes every
        tile at once makes it a no-op.
        """

    def finish(self, final: Sequence[MapDetection], summary: RunSummary) -> None:
        """Write the merged answer (the run's polygon layer)."""


class GroundingClient(Protocol):
    """The engine, as :class:`~geo_r1_qgis.core.client.EngineClient` offers it."""

    def ground(
        self,
        tiles: list[TileImage],
        expression: str,
        task: str = "multi",
        reasoning: bool = True,
        max_new_tokens: int | None = None,
    ) -> list[GroundResult]: ...


#: progress(tiles_done, tiles_total, phase) -- phase is "full", "coarse" or "refine"
ProgressFn = Callable[[int, int, str], None]
#: how often a wait for the engine checks for a cancel (seconds)
CANCEL_POLL_S = 0.1


@dataclass
class RunSummary:
    """What a run did. Times are wall-clock seconds spent in each stage on the client side."""

    status: str = "running"  # "done", "canceled"
    strategy: str = "full"  # "full" or "coarse-to-fine" (or "coarse-to-fine+full" on fallback)
    tiles_total: int = 0
    tiles_processed: int = 0
    tiles_resumed: int = 0
    tiles_skipped: int = 0
    requests: int = 0
    detections_raw: int = 0
    detections_final: int = 0
    full_tiling_tiles: int = 0
    parse_failures: int = 0
    seconds: float = 0.0
    #: CPU seconds of this process during the run (all its threads: reading, requests, writing, merging)
    cpu_s: float = 0.0
    read_s: float = 0.0
    engine_s: float = 0.0
    engine_generate_s: float = 0.0
    write_s: float = 0.0
    merge_s: float = 0.0
    #: tiles answered by each engine (its name: the URL)
    engines: dict[str, int] = field(default_factory=dict)
    #: engines given up during the run, with the error that ended them
    engines_failed: dict[str, str] = field(default_factory=dict)
    final: list[MapDetection] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "final"}
        out["final"] = [
            {"tile_id": m.detection.tile_id, "score": m.detection.score, "box": m.detection.box.as_tuple()}
            for m in self.final
        ]
        return out


# --------------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PassPlan:
    """The tiles of one pass, with their ids and the engine task to ask."""

    phase: str
    task: str
    tiles: tuple[tuple[str, Tile], ...]
    area: PixelBox


def _area(job: GroundingJob, source: RasterSource) -> PixelBox:
    full = PixelBox(0.0, 0.0, float(source.width), float(source.height))
    area = full if job.window is None else job.window
    if job.area_polygons is not None:
        # The polygons' bounding box grown by one tile: the grid stays small over a large raster, and tiles
        # on the boundary still see past it, so an object that crosses it is seen whole and judged by its centre.
        b, grow = area_bounds(job.area_polygons), job.tile_size * job.scale
        inside = area.intersection(PixelBox(b.x1 - grow, b.y1 - grow, b.x2 + grow, b.y2 + grow))
        if inside is None or inside.clip(source.width, source.height) is None:
            raise ExtentError(
                "the area's polygons do not overlap the raster (or the chosen extent); select polygons over the "
                "raster, or check the polygon layer's CRS"
            )
        area = inside
    return area


def _in_area(job: GroundingJob, tiles: Sequence[Tile]) -> list[Tile]:
    """The tiles that share area with the job's polygons (all of them when it has none)."""
    if job.area_polygons is None:
        return list(tiles)
    kept = tiles_touching(tiles, job.area_polygons)
    if not kept:
        raise ExtentError(
            "no tile touches the area's polygons: they lie outside the raster's pixels (or the chosen extent); "
            "select polygons over the raster"
        )
    return kept


def plan_full(job: GroundingJob, source: RasterSource) -> PassPlan:
    area = _area(job, source)
    tiles = _in_area(job, make_tile_grid(source.transform, source.width, source.height, job.spec, window=area))
    return PassPlan("full", job.task, tuple((t.id, t) for t in tiles), tiles_area(tiles))


def tiles_area(tiles: Sequence[Tile]) -> PixelBox:
    """The snapped area the tiles cover (the union of their windows)."""
    box = tiles[0].window
    for t in tiles[1:]:
        box = box.union(t.window)
    return box


def coarse_scale(area: PixelBox, job: GroundingJob) -> float:
    """The scale at which ``coarse_grid`` × ``coarse_grid`` tiles cover the whole area (never finer than the job)."""
    n = job.coarse_grid
    span_px = n * job.tile_size - (n - 1) * job.overlap  # tile-image pixels covered by n tiles
    longest = max(area.width, area.height)
    return max(job.scale, longest / span_px * (1.0 + 1e-6))


def plan_coarse(job: GroundingJob, source: RasterSource, area: PixelBox) -> PassPlan:
    spec = TileGridSpec(tile_size=job.tile_size, overlap=job.overlap, scale=coarse_scale(area, job))
    tiles = _in_area(job, make_tile_grid(source.transform, source.width, source.height, spec, window=area))
    return PassPlan("coarse", TASK_COARSE, tuple((f"c-{t.id}", t) for t in tiles), area)


def plan_refine(job: GroundingJob, source: RasterSource, area: PixelBox, candidates: Sequence[Detection]) -> PassPlan:
    tile_len = max(1, round(job.tile_size * job.scale))
    windows = refinement_windows(candidates, source.width, source.height, tile_len, top_k=job.top_k)
    tiles: list[tuple[str, Tile]] = []
    for k, win in enumerate(windows):
        inside = win.intersection(area)
        if inside is None:
            continue
        grid = make_tile_grid(source.transform, source.width, source.height, job.spec, window=inside)
        if job.area_polygons is not None:
            grid = tiles_touching(grid, job.area_polygons)
        for t in grid:
            tiles.append((f"f{k}-{t.id}", t))
    return PassPlan("refine", TASK_ONE, tuple(tiles), area)


# --------------------------------------------------------------------------------------------------
# Engine results -> detections
# --------------------------------------------------------------------------------------------------


def result_to_detections(
    result: GroundResult, tile_id: str, tile: Tile, source_w: int, source_h: int, area: PixelBox
) -> list[Detection]:
    """The engine's boxes (tile-image pixels) as detections in full-resolution raster pixels.

    Boxes are clipped to the tile image; a box with no area left is dropped. ``score`` is the
    box score × the tile's presence (see the module docstring).
    """
    w, h = tile.size
    presence = min(1.0, max(0.0, float(result.presence)))
    out = []
    for b in result.boxes:
        try:
            in_tile = PixelBox(b.x1, b.y1, b.x2, b.y2).clip(w, h)
        except ConfigError:
            log.debug("tile %s: dropping a degenerate box %r", tile_id, b)
            continue
        if in_tile is None:
            continue
        score = min(1.0, max(0.0, float(b.score))) * presence
        to_raster = tile.to_raster_transform
        outline = tuple(polygon_to_map(p, to_raster) for p in getattr(b, "outline", ()) or ())
        out.append(
            Detection(
                box=tile.to_raster(in_tile),
                score=score,
                presence=presence,
                label=b.label or "",
                reasoning=result.reasoning or "",
                tile_id=tile_id,
                truncated=flag_truncated(in_tile, tile, source_w, source_h, area=area),
                outline=outline,
                outline_step=float(tile.pixel_scale[0]),
            )
        )
    return out


def place(dets: Sequence[Detection], transform: Affine) -> list[MapDetection]:
    """Detections with their map polygons (four box corners through the full affine)."""
    return [
        MapDetection(d, box_to_polygon(d.box, transform), tuple(polygon_to_map(p, transform) for p in d.outline))
        for d in dets
    ]


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


@dataclass
class EngineSlot:
    """One engine of a run: its client, how many tiles it works on at once, and how the run finds it."""

    client: GroundingClient
    #: tiles this engine is asked at once (its ``/info``: :func:`~geo_r1_qgis.core.client.engine_capacity`)
    capacity: int
    #: what the run records as the engine that answered a tile (the URL)
    name: str
    busy: int = 0
    #: why the engine was given up in this run (None while it answers)
    failed: str | None = None

    @property
    def free(self) -> int:
        return self.capacity - self.busy


class EnginePool:
    """The engines of a run, one or several. A request goes to the live engine with the most free slots; an
    engine whose request fails after its own retries (unreachable, 5xx, 429) is given up for the rest of the
    run and its tiles are asked of the others; when none is left the error stops the run."""

    def __init__(self, engines: Sequence[EngineSlot]) -> None:
        if not engines:
            raise ConfigError("a run needs at least one engine")
        names = [e.name for e in engines]
        if len(set(names)) != len(names):
            raise ConfigError(f"an engine is given twice: {names}; give each --engine once")
        for e in engines:
            if isinstance(e.capacity, bool) or not isinstance(e.capacity, int) or e.capacity < 1:
                raise ConfigError(f"engine {e.name}: capacity must be an integer >= 1, got {e.capacity!r}")
        self.engines = list(engines)

    @classmethod
    def of(cls, client: GroundingClient | EnginePool, capacity: int) -> EnginePool:
        """``client`` as a pool: itself if it is one, else a pool of that one engine taking ``capacity`` tiles."""
        if isinstance(client, EnginePool):
            return client
        return cls([EngineSlot(client, capacity, str(getattr(client, "url", "engine")))])

    @property
    def live(self) -> list[EngineSlot]:
        return [e for e in self.engines if e.failed is None]

    @property
    def capacity(self) -> int:
        return sum(e.capacity for e in self.live)

    def pick(self, tiles: int) -> EngineSlot | None:
        """The live engine with the most free slots that can take ``tiles`` now (an idle one always can)."""
        best = max(self.live, key=lambda e: e.free, default=None)
        if best is None or (best.free < tiles and best.busy > 0):
            return None
        return best


def connect_engines(
    urls: Sequence[str], token: str | None, ready_timeout_s: float = 10.0
) -> tuple[EnginePool, dict[str, Any]]:
    """The pool of the engines at ``urls`` (one token for all) and the ``/info`` a run records
    (:func:`~geo_r1_qgis.core.client.engines_info`): each engine answers ``/health``, proves it holds the token
    before the token is sent to it, and reports in ``/info`` what it takes at once
    (:func:`~geo_r1_qgis.core.client.engine_capacity`); all must serve the same model."""
    answers = []
    for url in urls:
        client = EngineClient(url, token=token)
        answers.append((client, client.wait_until_ready(total_timeout_s=ready_timeout_s)))
    info = engines_info([(c.url, i) for c, i in answers])
    return EnginePool([EngineSlot(c, engine_capacity(i), c.url) for c, i in answers]), info


def engine_failure(exc: BaseException) -> bool:
    """Whether an error says the engine, not the request, failed: another engine may answer the same request."""
    if isinstance(exc, EngineUnavailableError | EngineOverloadedError):
        return True
    status = getattr(exc, "status", None)
    return isinstance(exc, EngineRequestError) and (status is None or status >= 500 or status == 429)


@dataclass
class _Batch:
    """One request's tiles, in tile order; sent (``future``) or waiting to be (again), then answered."""

    items: list[tuple[str, Tile, Any]]
    future: Future | None = None
    engine: EngineSlot | None = None
    results: list[GroundResult] | None = None


class _Flight:
    """The tiles of one pass in flight: requests to the engines, up to ``in_flight`` tiles at once, answers
    written in tile order (the head of the queue first). See :meth:`_Runner.run_pass`."""

    def __init__(self, runner: _Runner, plan: PassPlan, dets: list[Detection]) -> None:
        self.runner, self.plan, self.dets = runner, plan, dets
        self.pool = runner.pool
        self.limit = runner.in_flight
        self.size = max(1, min(runner.job.batch_size, self.limit))
        #: answered tiles that wait for an earlier request before they are written, at most this many
        self.backlog = 4 * self.limit + self.size
        self.pending: list[tuple[str, Tile, Any]] = []
        self.order: deque[_Batch] = deque()
        self.busy = 0  # tiles in requests not answered yet
        self.busy_since = 0.0
        self.executor = ThreadPoolExecutor(max_workers=self.limit, thread_name_prefix="geo-r1-request")

    # -- filling -----------------------------------------------------------------------------------
    def add(self, tile_id: str, tile: Tile, image: Any) -> None:
        self.pending.append((tile_id, tile, image))
        if len(self.pending) >= self.size:
            self.order.append(_Batch(self.pending))
            self.pending = []
        self.pump()

    def add_skipped(self, tile_id: str, tile: Tile) -> None:
        r, summary = self.runner, self.runner.summary
        t1 = time.perf_counter()
        r.sink.write_tile(tile_id, tile, [], "skipped")
        summary.write_s += time.perf_counter() - t1
        summary.tiles_skipped += 1
        r.done += 1
        r.progress(r.done, summary.tiles_total, self.plan.phase)

    def make_room(self) -> bool:
        """Wait until one more tile may be read: at most one request's worth read ahead of what can be sent, and
        the answers waiting to be written within the backlog. False on a cancel."""
        while True:
            self.pump()
            unsent = len(self.pending) + sum(len(b.items) for b in self.order if b.future is None)
            waiting = sum(len(b.items) for b in self.order)
            if unsent < self.size and waiting < self.backlog:
                return True
            if not self.wait():
                return False

    def finish(self) -> bool:
        """Send the last tiles and write every answer; False on a cancel."""
        if self.pending:
            self.order.append(_Batch(self.pending))
            self.pending = []
        while True:
            self.pump()
            if not self.order:
                return True
            if not self.wait():
                return False

    def close(self) -> None:
        # Normally nothing is left in flight here; after a cancel or an error, don't wait for it.
        self.executor.shutdown(wait=False, cancel_futures=True)

    # -- the engines -------------------------------------------------------------------------------
    def wait(self) -> bool:
        """Wait for a request to end, polling ``is_canceled`` every CANCEL_POLL_S; False on a cancel (the
        requests in flight are abandoned: the engines may finish them, their answers are ignored)."""
        futures = [b.future for b in self.order if b.future is not None and b.results is None]
        if futures:
            wait_futures(futures, timeout=CANCEL_POLL_S, return_when=FIRST_COMPLETED)
        return not self.runner.is_canceled()

    def pump(self) -> None:
        """Take the answers that came, write the ones due in tile order, send what the engines have room for."""
        fatal = self.collect()
        self.write_due()  # what was answered before a fatal error is kept: a resumed run asks only the rest
        if fatal is not None:
            raise fatal
        self.send()

    def collect(self) -> BaseException | None:
        """Take the finished requests' answers; a failed engine's requests wait to be sent again. The error
        that ends the run, if one came (a refused request, or no engine left)."""
        fatal: BaseException | None = None
        for b in self.order:
            if b.future is None or b.results is not None or not b.future.done():
                continue
            engine = b.engine
            assert engine is not None
            engine.busy -= len(b.items)
            self._busy(-len(b.items))
            exc = b.future.exception()
            if exc is None:
                b.results = b.future.result()
                self.runner.summary.requests += 1
                continue
            if not engine_failure(exc):
                fatal = fatal or exc  # the request itself is refused: every engine would refuse it
                continue
            if engine.failed is None:
                if not [e for e in self.pool.live if e is not engine]:
                    fatal = fatal or exc  # no engine left: the run stops (resumable)
                    continue
                engine.failed = str(exc)
                self.runner.summary.engines_failed[engine.name] = str(exc)
                log.warning("engine %s failed (%s): its tiles go to the other engines", engine.name, exc)
            b.future, b.engine = None, None  # sent again by send(), to another engine
        return fatal

    def write_due(self) -> None:
        while self.order and self.order[0].results is not None:
            self.write(self.order.popleft())

    def send(self) -> None:
        job = self.runner.job
        for b in self.order:
            if b.future is not None:
                continue
            n = len(b.items)
            if self.busy and self.busy + n > self.limit:
                return
            engine = self.pool.pick(n)
            if engine is None:
                return
            tiles = [TileImage.from_array(img) for _, _, img in b.items]
            b.engine = engine
            extra = {"outline": True} if job.outlines and self.plan.phase != "coarse" else {}
            b.future = self.executor.submit(engine.client.ground, tiles, job.expression, task=self.plan.task,
                                            reasoning=job.reasoning, max_new_tokens=job.max_new_tokens,
                                            **extra)  # fmt: skip
            engine.busy += n
            self._busy(n)

    def _busy(self, change: int) -> None:
        """Count tiles in flight; ``engine_s`` is the time during which any was (not the sum over requests)."""
        now = time.perf_counter()
        if self.busy == 0 and change > 0:
            self.busy_since = now
        self.busy += change
        if self.busy == 0 and change < 0:
            self.runner.summary.engine_s += now - self.busy_since

    # -- writing -----------------------------------------------------------------------------------
    def write(self, b: _Batch) -> None:
        """Write one answered request's tiles (one transaction)."""
        r, job, src, summary, plan = self.runner, self.runner.job, self.runner.source, self.runner.summary, self.plan
        assert b.results is not None and b.engine is not None
        if len(b.results) != len(b.items):
            raise EngineRequestError(f"engine {b.engine.name} returned {len(b.results)} results for "
                                     f"{len(b.items)} tiles")  # fmt: skip
        extra = {"engine": b.engine.name} if getattr(r.sink, "records_engine", False) else {}
        for (tile_id, tile, _), result in zip(b.items, b.results, strict=True):
            summary.engine_generate_s += float(result.timings_ms.get("generate", 0.0)) / 1000.0
            if result.parse_status not in ("", "ok"):
                summary.parse_failures += 1
            tile_dets = [
                d for d in result_to_detections(result, tile_id, tile, src.width, src.height, plan.area) if job.keeps(d)
            ]
            t1 = time.perf_counter()
            r.sink.write_tile(tile_id, tile, place(tile_dets, src.transform), "done", **extra)
            summary.write_s += time.perf_counter() - t1
            self.dets.extend(tile_dets)
            summary.detections_raw += len(tile_dets)
            summary.tiles_processed += 1
            summary.engines[b.engine.name] = summary.engines.get(b.engine.name, 0) + 1
            r.done += 1
            r.progress(r.done, summary.tiles_total, plan.phase)
        t1 = time.perf_counter()
        r.sink.commit()
        summary.write_s += time.perf_counter() - t1


class _Runner:
    def __init__(
        self,
        job: GroundingJob,
        source: RasterSource,
        sink: ResultSink,
        client: GroundingClient | EnginePool,
        progress: ProgressFn | None,
        is_canceled: Callable[[], bool] | None,
    ) -> None:
        self.job, self.source, self.sink = job, source, sink
        self.pool = EnginePool.of(client, job.in_flight or job.batch_size)
        #: tiles asked at once, over all engines: the job's in_flight, else what the engines take
        self.in_flight = job.in_flight or self.pool.capacity
        self.progress = progress or (lambda done, total, phase: None)
        self.is_canceled = is_canceled or (lambda: False)
        self.summary = RunSummary()
        self.resumed: dict[str, list[Detection]] = {k: list(v) for k, v in sink.done_tiles().items()}
        self.done = 0

    def canceled(self) -> bool:
        if self.is_canceled():
            self.summary.status = "canceled"
            self.sink.commit()
            return True
        return False

    def run_pass(self, plan: PassPlan) -> list[Detection] | None:
        """All detections of one pass (resumed ones included); ``None`` when canceled.

        Tiles are read here (this thread), sent in requests of up to ``batch_size`` tiles to the engines with
        free slots (:class:`_Flight`, worker threads), and written here in tile order as their answers come;
        up to ``in_flight`` tiles are asked at once, so reading, requesting and writing overlap.
        """
        src, summary = self.source, self.summary
        dets: list[Detection] = []
        flight = _Flight(self, plan, dets)
        try:
            for tile_id, tile in plan.tiles:
                if tile_id in self.resumed:
                    dets.extend(self.resumed[tile_id])
                    summary.detections_raw += len(self.resumed[tile_id])
                    summary.tiles_resumed += 1
                    self.done += 1
                    self.progress(self.done, summary.tiles_total, plan.phase)
                    continue
                if self.is_canceled() or not flight.make_room():
                    # Stop now: the requests in flight are abandoned, not awaited (a GPU batch can take
                    # seconds); their tiles are not marked done, so a resumed run asks them again.
                    self.canceled()
                    return None
                t0 = time.perf_counter()
                image, valid = src.read(tile)
                summary.read_s += time.perf_counter() - t0
                if valid <= 0.0:
                    flight.add_skipped(tile_id, tile)
                else:
                    flight.add(tile_id, tile, image)
            if not flight.finish():
                self.canceled()
                return None
        finally:
            flight.close()
        self.sink.commit()  # skipped tiles after the last request
        return dets

    def merge(self, dets: Sequence[Detection]) -> list[Detection]:
        t0 = time.perf_counter()
        merged = merge_detections(
            dets, iou_threshold=self.job.iou_threshold, containment_threshold=self.job.containment_threshold
        )
        if self.job.area_polygons is not None:  # a box assembled from cut pieces is judged by its own centre
            merged = [d for d in merged if box_in_area(d.box, self.job.area_polygons)]
        self.summary.merge_s += time.perf_counter() - t0
        return merged

    def run(self) -> RunSummary:
        job, summary = self.job, self.summary
        start, cpu0 = time.perf_counter(), time.process_time()
        full = plan_full(job, self.source)
        summary.full_tiling_tiles = len(full.tiles)
        final: list[Detection] | None
        if job.mode == "one" and job.coarse_to_fine and len(full.tiles) > job.coarse_min_tiles:
            final = self.run_coarse_to_fine(full)
        else:
            summary.tiles_total = len(full.tiles)
            dets = self.run_pass(full)
            final = None if dets is None else select_mode(self.merge(dets), job.mode)
        summary.seconds, summary.cpu_s = time.perf_counter() - start, time.process_time() - cpu0
        if final is None:
            return summary
        if summary.tiles_skipped == summary.tiles_total and summary.tiles_total > 0:
            raise EmptyRasterError(
                f"every one of the {summary.tiles_total} tiles of the area holds only nodata: there is nothing "
                "to look at; choose another --bbox or check the raster's nodata value"
            )
        summary.final = place(final, self.source.transform)
        summary.detections_final = len(summary.final)
        summary.status = "done"
        t0 = time.perf_counter()
        self.sink.finish(summary.final, summary)
        summary.write_s += time.perf_counter() - t0
        summary.seconds, summary.cpu_s = time.perf_counter() - start, time.process_time() - cpu0
        return summary

    def run_coarse_to_fine(self, full: PassPlan) -> list[Detection] | None:
        job, summary = self.job, self.summary
        summary.strategy = "coarse-to-fine"
        coarse = plan_coarse(job, self.source, full.area)
        summary.tiles_total = len(coarse.tiles)
        coarse_dets = self.run_pass(coarse)
        if coarse_dets is None:
            return None
        candidates = self.merge(coarse_dets)
        if not candidates:
            log.info("the coarse pass found no candidate: running the full tiling (%d tiles)", len(full.tiles))
            summary.strategy = "coarse-to-fine+full"
            summary.tiles_total += len(full.tiles)
            dets = self.run_pass(full)
            return None if dets is None else select_mode(self.merge(dets), "one")
        refine = plan_refine(job, self.source, full.area, candidates)
        summary.tiles_total += len(refine.tiles)
        fine_dets = self.run_pass(refine)
        if fine_dets is None:
            return None
        merged = self.merge(fine_dets)
        return select_mode(merged if merged else candidates, "one")


def run_grounding(
    job: GroundingJob,
    source: RasterSource,
    sink: ResultSink,
    client: GroundingClient | EnginePool,
    progress: ProgressFn | None = None,
    is_canceled: Callable[[], bool] | None = None,
) -> RunSummary:
    """Ground ``job`` over ``source``, writing to ``sink`` tile by tile; see the module docstring.

    Returns the summary; ``summary.status`` is ``"canceled"`` when ``is_canceled()`` turned true
    (the sink then holds every finished tile and a later run with the same job resumes from there)
    and ``"done"`` otherwise. Engine and raster errors propagate (the project's error hierarchy);
    tiles written before the error stay in the sink.
    """
    return _Runner(job, source, sink, client, progress, is_canceled).run()


def grid_size_hint(width: int, height: int, job: GroundingJob) -> int:
    """How many tiles the full tiling of a ``width`` × ``height`` area takes (for messages and tests)."""
    tile_len = max(1, round(job.tile_size * job.scale))
    stride = max(1, tile_len - round(job.overlap * job.scale))

    def n(length: int) -> int:
        return 1 if length <= tile_len else math.ceil((length - tile_len) / stride) + 1

    return n(width) * n(height)
