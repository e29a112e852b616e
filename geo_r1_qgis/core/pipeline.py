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
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Protocol

from .area import AreaPolygon, area_bounds, box_in_area, check_area, tiles_touching
from .client import GroundResult, TileImage
from .errors import ConfigError, EmptyRasterError, ExtentError
from .geometry import Affine, PixelBox, Ring, Tile, TileGridSpec, box_to_polygon, make_tile_grid
from .merge import Detection, flag_truncated, merge_detections, refinement_windows, select_mode
from .run_spec import check_run_values

__all__ = [
    "GroundingClient",
    "GroundingJob",
    "MapDetection",
    "PassPlan",
    "RasterSource",
    "ResultSink",
    "RunSummary",
    "coarse_scale",
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

    def __post_init__(self) -> None:
        # the run's own values are checked where every run description checks them
        check_run_values(expression=self.expression, mode=self.mode, tile_size=self.tile_size, overlap=self.overlap,
                         batch_size=self.batch_size, max_new_tokens=self.max_new_tokens, top_k=self.top_k,
                         min_score=self.min_score)  # fmt: skip
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


class ResultSink(Protocol):
    """Where results go. A tile is written whole or not at all (see :meth:`commit`)."""

    def done_tiles(self) -> Mapping[str, Sequence[Detection]]:
        """Tiles already written by an earlier, interrupted run, with their detections."""

    def write_tile(self, tile_id: str, tile: Tile, detections: Sequence[MapDetection], status: str) -> None:
        """Record one finished tile (``status`` is ``"done"`` or ``"skipped"``: no valid pixel)."""

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
    read_s: float = 0.0
    engine_s: float = 0.0
    engine_generate_s: float = 0.0
    write_s: float = 0.0
    merge_s: float = 0.0
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


def plan_refine(
    job: GroundingJob, source: RasterSource, area: PixelBox, candidates: Sequence[Detection]
) -> PassPlan:
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
        out.append(
            Detection(
                box=tile.to_raster(in_tile),
                score=score,
                presence=presence,
                label=b.label or "",
                reasoning=result.reasoning or "",
                tile_id=tile_id,
                truncated=flag_truncated(in_tile, tile, source_w, source_h, area=area),
            )
        )
    return out


def place(dets: Sequence[Detection], transform: Affine) -> list[MapDetection]:
    """Detections with their map polygons (four box corners through the full affine)."""
    return [MapDetection(d, box_to_polygon(d.box, transform)) for d in dets]


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


class _Runner:
    def __init__(
        self,
        job: GroundingJob,
        source: RasterSource,
        sink: ResultSink,
        client: GroundingClient,
        progress: ProgressFn | None,
        is_canceled: Callable[[], bool] | None,
    ) -> None:
        self.job, self.source, self.sink, self.client = job, source, sink, client
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

        One engine request is in flight while the next batch of tiles is read (a single worker
        thread sends it), so reading overlaps the engine's work; results are written in tile order.
        """
        job, src, summary = self.job, self.source, self.summary
        dets: list[Detection] = []
        pending: list[tuple[str, Tile, Any]] = []
        inflight: list[tuple[list[tuple[str, Tile, Any]], Future, float]] = []

        def send(batch: list[tuple[str, Tile, Any]]) -> Future:
            tiles = [TileImage.from_array(img) for _, _, img in batch]
            return executor.submit(
                self.client.ground,
                tiles,
                job.expression,
                task=plan.task,
                reasoning=job.reasoning,
                max_new_tokens=job.max_new_tokens,
            )

        def collect() -> bool:
            """Wait for the request in flight and write its tiles (one transaction).

            The wait polls ``is_canceled`` every CANCEL_POLL_S: a cancel abandons the request (the
            engine may finish it; its answer is ignored, its tiles not marked done) and returns False.
            """
            if not inflight:
                return True
            batch, future, t0 = inflight[-1]
            while True:
                try:
                    results = future.result(timeout=CANCEL_POLL_S)
                    break
                except FutureTimeout:
                    if self.is_canceled():
                        return False
            inflight.pop()
            summary.engine_s += time.perf_counter() - t0
            summary.requests += 1
            for (tile_id, tile, _), result in zip(batch, results, strict=True):
                summary.engine_generate_s += float(result.timings_ms.get("generate", 0.0)) / 1000.0
                if result.parse_status not in ("", "ok"):
                    summary.parse_failures += 1
                tile_dets = [
                    d
                    for d in result_to_detections(result, tile_id, tile, src.width, src.height, plan.area)
                    if job.keeps(d)
                ]
                t1 = time.perf_counter()
                self.sink.write_tile(tile_id, tile, place(tile_dets, src.transform), "done")
                summary.write_s += time.perf_counter() - t1
                dets.extend(tile_dets)
                summary.detections_raw += len(tile_dets)
                summary.tiles_processed += 1
                self.done += 1
                self.progress(self.done, summary.tiles_total, plan.phase)
            t1 = time.perf_counter()
            self.sink.commit()
            summary.write_s += time.perf_counter() - t1
            return True

        def flush() -> bool:
            if not pending:
                return True
            if not collect():
                return False
            inflight.append((list(pending), send(pending), time.perf_counter()))
            pending.clear()
            return True

        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="geo-r1-request")
        try:
            for tile_id, tile in plan.tiles:
                if tile_id in self.resumed:
                    dets.extend(self.resumed[tile_id])
                    summary.detections_raw += len(self.resumed[tile_id])
                    summary.tiles_resumed += 1
                    self.done += 1
                    self.progress(self.done, summary.tiles_total, plan.phase)
                    continue
                if self.is_canceled():
                    # Stop now: the request in flight is abandoned, not awaited (a GPU batch can take
                    # seconds); its tiles are not marked done, so a resumed run asks them again.
                    self.canceled()
                    return None
                t0 = time.perf_counter()
                image, valid = src.read(tile)
                summary.read_s += time.perf_counter() - t0
                if valid <= 0.0:
                    t1 = time.perf_counter()
                    self.sink.write_tile(tile_id, tile, [], "skipped")
                    summary.write_s += time.perf_counter() - t1
                    summary.tiles_skipped += 1
                    self.done += 1
                    self.progress(self.done, summary.tiles_total, plan.phase)
                    continue
                pending.append((tile_id, tile, image))
                if len(pending) >= job.batch_size and not flush():
                    self.canceled()
                    return None
            if (pending and self.is_canceled()) or not flush() or not collect():
                self.canceled()
                return None
        finally:
            # Normally nothing is left in flight here; after a cancel or an error, don't wait for it.
            executor.shutdown(wait=False, cancel_futures=True)
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
        start = time.perf_counter()
        full = plan_full(job, self.source)
        summary.full_tiling_tiles = len(full.tiles)
        final: list[Detection] | None
        if job.mode == "one" and job.coarse_to_fine and len(full.tiles) > job.coarse_min_tiles:
            final = self.run_coarse_to_fine(full)
        else:
            summary.tiles_total = len(full.tiles)
            dets = self.run_pass(full)
            final = None if dets is None else select_mode(self.merge(dets), job.mode)
        summary.seconds = time.perf_counter() - start
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
        summary.seconds = time.perf_counter() - start
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
    client: GroundingClient,
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
