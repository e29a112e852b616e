"""One grounding run from the panel, as a QgsTask: the map stays usable, Cancel ends it within a second.

The task runs :func:`geo_r1_qgis.core.pipeline.run_grounding` in QGIS's task thread with the same
GeoPackage layout as ``geo-r1 ground`` (written through ``osgeo.ogr``, :mod:`geo_r1_qgis.qgis_io.gpkg_ogr`), so a
cancelled or failed run keeps every finished tile on disk and can be resumed, by the panel or by the
command line. After each engine request the tiles' detections are committed to the file and then handed
to the GUI thread (:attr:`GroundingTask.batchCommitted`), which draws them at once: results appear on the
map as tiles finish, and the GUI does not poll the file while the task writes it.

Cancel: ``QgsTask.cancel()`` sets ``isCanceled()``, which the run loop polls before each tile and every
0.1 s while it waits for the engine; the request in flight is abandoned (the engine may finish it, its
answer is ignored, its tiles are not marked done).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from qgis.core import QgsTask
from qgis.PyQt.QtCore import pyqtSignal

from ..core.client import read_token
from ..core.errors import ConfigError, EngineUnavailableError, GeoR1Error
from ..core.geometry import PixelBox, Tile, box_to_polygon
from ..core.pipeline import GroundingJob, MapDetection, RunSummary, connect_engines, run_grounding
from ..core.progress import ProgressTracker
from ..core.run_spec import RunSpec

log = logging.getLogger(__name__)

#: how long the task waits for an engine that is starting (seconds)
ENGINE_READY_TIMEOUT_S = 20.0


@dataclass(frozen=True, kw_only=True)
class RunRequest(RunSpec):
    """Everything a panel run needs: the run (:class:`RunSpec`'s fields, checked there) and the panel's own
    values, checked before the task starts (every message names the fix)."""

    output: Path
    engine_url: str
    #: more engines the run spreads its tiles over (the settings' "More engines"; the same token file)
    more_engines: tuple[str, ...] = ()
    token_file: str | None = None
    window: PixelBox | None = None
    #: the selected polygons, in raster pixels (``qgis_io.prepare_input``); None: no polygon area
    area_polygons: Any = None
    scale: float = 1.0
    #: continue this run of ``output`` instead of starting a new one
    resume_run_id: str | None = None
    #: the answer layer of the run to resume (pins it when several unfinished runs share the parameters)
    resume_layer: str | None = None
    raster_name: str = ""
    #: the raster's source (a file path or a provider URI), recorded in the run's parameters
    raster_path: str = ""
    # (gsd: the ground resolution the user chose; bbox: the area as recorded in the parameters, raster CRS,
    # None: the window's own bounds; both RunSpec fields)

    def __post_init__(self) -> None:
        if self.max_new_tokens == 0:  # the settings' 0: Geo-R1's default for the task
            object.__setattr__(self, "max_new_tokens", None)
        super().__post_init__()
        if self.output.suffix.lower() != ".gpkg":
            raise ConfigError(f"the output {self.output} must be a GeoPackage file ending in .gpkg; choose another")
        self.job()  # GroundingJob checks the scale, the window and the area

    def job(self) -> GroundingJob:  # type: ignore[override]
        return RunSpec.job(self, scale=self.scale, window=self.window, area_polygons=self.area_polygons)


@dataclass
class LiveBatch:
    """The detections of the tiles one commit made durable, for the GUI thread."""

    run_id: str
    detections: list[MapDetection]
    tiles_done: int
    tiles_total: int


@dataclass
class RunOutcome:
    """What the GUI learns when the task ends."""

    status: str  # done / canceled / failed
    run_id: str = ""
    layer: str = ""
    output: Path | None = None
    summary: RunSummary | None = None
    error: str = ""
    engine_info: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    #: the engine stopped answering mid-run (crashed, killed or stopped)
    interrupted: bool = False


class _ForwardingSink:
    """Wraps the GeoPackage sink: after each commit, hands the committed tiles' detections to ``emit``."""

    def __init__(self, inner: Any, emit: Any) -> None:
        self.inner = inner
        self.emit = emit
        self._pending: list[MapDetection] = []
        self.tiles_written = 0

    def done_tiles(self) -> Any:
        return self.inner.done_tiles()

    @property
    def records_engine(self) -> bool:
        return bool(getattr(self.inner, "records_engine", False))

    def write_tile(
        self, tile_id: str, tile: Tile, detections: Sequence[MapDetection], status: str, **engine: str
    ) -> None:
        self.inner.write_tile(tile_id, tile, detections, status, **engine)  # engine=: which engine answered
        self._pending.extend(detections)
        self.tiles_written += 1

    def commit(self) -> None:
        self.inner.commit()
        batch, self._pending = self._pending, []
        self.emit(batch)

    def finish(self, final: Sequence[MapDetection], summary: RunSummary) -> None:
        self.inner.finish(final, summary)

    def mark(self, status: str, summary: Any = None) -> None:
        if hasattr(self.inner, "mark"):
            self.inner.mark(status, summary)


class GroundingTask(QgsTask):
    """A panel run. Build it on the GUI thread (it clones the raster's provider there), then hand it to
    ``QgsApplication.taskManager().addTask``."""

    #: a :class:`LiveBatch` after each durable commit
    batchCommitted = pyqtSignal(object)
    #: (output path, answer layer name, run id) once the run's rows exist in the GeoPackage
    runOpened = pyqtSignal(str, str, str)
    #: a :class:`RunOutcome` when the task has ended (emitted on the GUI thread)
    runEnded = pyqtSignal(object)

    def __init__(self, request: RunRequest, source: Any, description: str | None = None) -> None:
        super().__init__(description or f"Geo-R1: {request.expression}", QgsTask.Flag.CanCancel)
        self.request = request
        self.source = source
        self.outcome = RunOutcome(status="failed", output=request.output)
        self._tracker: ProgressTracker | None = None
        self._tiles_done = 0
        self._tiles_total = 0
        self._t0 = 0.0

    # -- the task thread ---------------------------------------------------------------------------
    def run(self) -> bool:
        self._t0 = time.perf_counter()
        try:
            return self._run()
        except GeoR1Error as exc:
            self.outcome.error = str(exc)
        except Exception as exc:  # the boundary: a bug must end the task with its message, not kill QGIS
            log.exception("the Geo-R1 run failed")
            self.outcome.error = f"unexpected error: {type(exc).__name__}: {exc}"
        self.outcome.status = "canceled" if self.isCanceled() else "failed"
        return False

    def _run(self) -> bool:
        req = self.request
        urls = (req.engine_url, *(u for u in req.more_engines if u.rstrip("/") != req.engine_url.rstrip("/")))
        client, info = connect_engines(urls, read_token(req.token_file), ready_timeout_s=ENGINE_READY_TIMEOUT_S)
        if self.isCanceled():
            self.outcome.status = "canceled"
            return False
        req = self.request = req.with_engine_tile(info)  # type: ignore[assignment]  # no tile chosen: the model's
        job = req.job()
        self.outcome.engine_info = dict(info)
        sink, run_id, layer, meta = open_panel_run(req, job, self.source, info)
        self.outcome.run_id, self.outcome.layer, self.outcome.meta = run_id, layer, dict(meta)
        self.runOpened.emit(str(req.output), layer, run_id)
        self._tracker = ProgressTracker(job)
        forwarding = _ForwardingSink(sink, self._emit_batch)

        def progress(done: int, total: int, phase: str) -> None:
            self._tiles_done, self._tiles_total = done, total
            self.setProgress(self._tracker.percent(done, total, phase))

        try:
            summary = run_grounding(
                job, self.source, forwarding, client, progress=progress, is_canceled=self.isCanceled
            )
        except EngineUnavailableError:
            forwarding.mark("interrupted")  # the engine went away: resumable once it is back
            self.outcome.interrupted = True
            raise
        except BaseException:
            forwarding.mark("failed")
            raise
        self.outcome.summary = summary
        if summary.status == "canceled":
            forwarding.mark("canceled")
            self.outcome.status = "canceled"
            return False
        self.outcome.status = "done"
        self.setProgress(100.0)
        return True

    def _emit_batch(self, detections: list[MapDetection]) -> None:
        self.batchCommitted.emit(LiveBatch(self.outcome.run_id, list(detections), self._tiles_done, self._tiles_total))

    # -- the GUI thread ---------------------------------------------------------------------------
    def finished(self, result: bool) -> None:
        self.outcome.seconds = time.perf_counter() - self._t0 if self._t0 else 0.0
        if self.outcome.status == "failed" and self.isCanceled():
            self.outcome.status = "canceled"
        self.runEnded.emit(self.outcome)


def run_display_name(expression: str, mode: str, when: datetime | None = None, raster: str = "") -> str:
    """``<expression> on <raster> (<mode>, <run time>)``: the name of a run's layer in the Layers panel (the panel's
    and Processing's), so runs of one expression on several rasters are told apart."""
    when = when or datetime.now()
    text = " ".join(expression.split())
    if len(text) > 60:  # the whole expression is in every feature's "expression" field
        text = text[:59].rstrip() + "…"
    on = f" on {raster.strip()}" if raster and raster.strip() else ""
    return f"{text}{on} ({mode}, {when:%H:%M:%S})"


def open_panel_run(req: RunRequest, job: GroundingJob, source: Any, info: dict[str, Any]) -> tuple[Any, str, str, dict]:
    """Open (or resume) the run's rows in the GeoPackage: ``(sink, run_id, answer layer, meta)``.

    The parameters are :func:`~geo_r1_qgis.core.gpkg_schema.job_parameters`, as ``geo-r1 ground`` records
    them, so the command line's ``--resume`` finds a run the panel started and the other way round.
    """
    from ..core.gpkg_schema import canonical_raster_path, job_parameters
    from ..core.results import run_meta
    from ..qgis_io.gpkg_ogr import OgrGeoPackageSink

    bbox = req.bbox
    if bbox is None and req.window is not None:
        xs, ys = zip(*box_to_polygon(req.window, source.transform), strict=True)
        bbox = (min(xs), min(ys), max(xs), max(ys))
    params = job_parameters(job, raster=req.raster_path or req.raster_name, bands=source.bands, gsd=req.gsd,
                            bbox=bbox)  # fmt: skip
    sink = OgrGeoPackageSink.open_run(
        req.output,
        crs_wkt=source.crs_wkt,
        expression=job.expression,
        mode=job.mode,
        parameters=params,
        raster={**source.describe(), "path": canonical_raster_path(req.raster_path or req.raster_name)},
        engine=info,
        layer=req.resume_layer if req.resume_run_id else None,
        resume=req.resume_run_id is not None,
    )
    if req.resume_run_id and sink.run_id != req.resume_run_id:
        raise ConfigError(
            f"the run {req.resume_run_id} could not be resumed from {req.output} (its parameters changed or it is "
            "finished); start a new run"
        )
    return sink, sink.run_id, sink.layer, run_meta(job.expression, job.mode, info)
