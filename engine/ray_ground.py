"""``geo-r1 ground RASTER "EXPR" -o OUT.gpkg --ray [ADDRESS]``: a run's tiles on a Ray cluster (Ray Data).

The optional extra ``pip install 'geo-r1[ray]'``; nothing here imports Ray until a run asks for it.

The run
-------
1. **On the driver** (the ``geo-r1 ground`` process), before anything is written: the rasters (one, a glob
   or an ``@FILE`` list, :func:`expand_rasters`) are opened for their metadata and checked as a single-process
   run checks them (:func:`engine.ground.raster_area`, the first tile read), their tile grids made by the
   pipeline's planner (:func:`geo_r1_qgis.core.pipeline.plan_full`, :mod:`geo_r1_qgis.core.geometry`) and the
   cluster is reached (:func:`connect`). Then each raster's run is opened in the GeoPackage
   (:class:`engine.gpkg.GeoPackageSink`: a new layer per raster, or with ``--resume`` its unfinished run,
   whose done tiles are left out).
2. **On the cluster**: the tiles still to do become a Ray dataset (raster, tile id, :class:`Tile`). Read
   tasks read them next to the data (:class:`engine.rasters.RasterioSource`: rasterio windowed reads, each
   worker process opens a raster once, the 8-bit stretch the same everywhere), and a pool of
   ``--ray-workers`` actors grounds them, each holding the engine's own backend
   (:func:`engine.server.app.build_backend`): the local model (``--model``; one copy per actor, on
   ``--ray-gpus`` GPUs) or :class:`engine.runtime.remote.RemoteBackend` to an OpenAI-compatible server
   (``--base-url``, e.g. vLLM replicas). They use the server's prompts, parser, limits and JSON answer, so
   an answer is what ``POST /ground`` would have returned.
3. **Back on the driver**: the answers stream back block by block in whatever order they finish; each
   tile is written whole (``write_tile``), committed per block, with its tile id, so ``--resume`` is exact
   whatever the order. At the end of each raster the pipeline's own end of a run (merge across tiles, the
   mode, the final layer: :class:`_Collected`) runs over the detections in tile order, as a single-process
   run of the same tiles does.

Faults: a worker process or node that dies is Ray's to mend: Ray Data restarts a dead actor and retries its
batch, and re-runs a lost read task; the driver writes each tile once (a tile answered twice after a retry
is written once). An error inside the backend (a refused request, a remote server down) ends the run; the
file keeps the finished tiles and ``--resume`` continues. Ctrl-C leaves a valid, resumable file.

Mode ``one`` asks every tile (``--no-coarse-to-fine`` is required: the coarse pass's candidates would
serialise the cluster behind one small pass).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import pickle
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geo_r1_qgis.core.errors import ConfigError, EngineUnavailableError, GeoR1Error, OutputError

log = logging.getLogger(__name__)

#: the help section of the Ray options of ``geo-r1 ground``
_RAY = {"group": "Ray cluster (--ray; pip install 'geo-r1[ray]')"}
#: CPUs a read task asks of Ray (reads are short; the actors hold the model)
READ_TASK_CPUS = 0.5
#: seconds to wait for a TCP connection to the cluster's head before saying it is unreachable
CONNECT_TIMEOUT_S = 5.0

RAY_MISSING = (
    "--ray needs Ray, which is not installed in this environment: pip install 'geo-r1[ray]' "
    "(or pip install 'ray[data]'), on the driver and on every node of the cluster"
)


@dataclass(frozen=True, kw_only=True)
class RayOptions:
    """The Ray options of ``geo-r1 ground`` (fields of :class:`engine.ground.GroundConfig`)."""

    ray: str | None = field(
        default=None,
        metadata={**_RAY, "nargs": "?", "const": "", "metavar": "ADDRESS",
                  "help": "run the tiles on a Ray cluster: ADDRESS of its head (HOST:6379, auto, ray://HOST:10001); "
                          "--ray alone: $RAY_ADDRESS, else the cluster this machine runs, else a new local one"},
    )  # fmt: skip
    ray_workers: int = field(
        default=1,
        metadata={**_RAY, "help": "grounding actors, each with its own backend (a copy of --model, or a client of "
                                  "--base-url)"},
    )  # fmt: skip
    ray_gpus: float | None = field(
        default=None,
        metadata={**_RAY, "help": "GPUs per actor (default: 1 with --model on a cluster with GPUs, else 0)"},
    )
    ray_cpus: float = field(
        default=1.0, metadata={**_RAY, "help": "CPUs per actor (with --model on the CPU, its torch threads)"}
    )
    base_url: str | None = field(
        default=None,
        metadata={**_RAY, "help": "with --ray: the actors ground through this OpenAI-compatible server (vLLM, "
                                  "SGLang), e.g. http://gpu-1:8000/v1, instead of loading --model"},
    )  # fmt: skip
    remote_model: str | None = field(
        default=None, metadata={**_RAY, "metavar": "NAME", "help": "with --base-url: model name (default: its first)"}
    )
    api_key_env: str | None = field(
        default=None,
        metadata={**_RAY, "metavar": "VAR", "help": "with --base-url: environment variable holding its API key"},
    )
    concurrency: int = field(
        default=8,
        metadata={
            **_RAY,
            "help": "with --base-url: requests each actor keeps in flight (at most --batch: an actor "
            "asks one batch at a time)",
        },
    )

    def check_ray(self) -> None:
        """The Ray options' checks (called by GroundConfig, whose other fields they need)."""
        cfg: Any = self
        if self.ray is None:
            for name in ("base_url", "remote_model", "api_key_env"):
                if getattr(self, name):
                    flag = "--" + name.replace("_", "-")
                    raise ConfigError(
                        f"{flag} is for the Ray actors' backend: add --ray [ADDRESS], or run an engine with "
                        "`geo-r1 serve --backend openai --base-url URL` and pass --engine"
                    )
            return
        if cfg.engine:
            raise ConfigError(
                "--engine is one running engine; with --ray the actors hold the backend: give --model M (each "
                "actor loads it) or --base-url URL (an OpenAI-compatible server)"
            )
        if bool(cfg.model) == bool(self.base_url):
            raise ConfigError(
                "--ray needs one backend for its actors: --model M (each actor loads it) or --base-url URL "
                "(an OpenAI-compatible server such as vLLM), not " + ("both" if cfg.model else "neither")
            )
        if self.base_url and not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"--base-url must be an http(s) URL, e.g. http://gpu-1:8000/v1, got {self.base_url!r}")
        if self.base_url and cfg.adapters:
            raise ConfigError(
                "--adapter loads into --model; with --base-url load adapters on that server "
                "(vLLM: --enable-lora --lora-modules NAME=PATH) and pass --remote-model NAME"
            )
        for name in ("ray_workers", "concurrency"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if not self.ray_cpus > 0:
            raise ConfigError(f"--ray-cpus must be > 0, got {self.ray_cpus}")
        if self.ray_gpus is not None and not self.ray_gpus >= 0:
            raise ConfigError(f"--ray-gpus must be >= 0, got {self.ray_gpus}")
        if getattr(cfg, "task", "auto") != "auto" or getattr(cfg, "outline", False):
            raise ConfigError(
                "outlines (--task gres, --outline) come from an engine's SAM and are not on Ray yet: run them "
                "without --ray, on an engine started with `geo-r1 serve --sam`"
            )
        if cfg.mode == "one" and cfg.coarse_to_fine:
            raise ConfigError(
                "--ray asks every tile; for --mode one add --no-coarse-to-fine (the best match of the full tiling)"
            )


# -- the inputs ------------------------------------------------------------------------------------


def expand_rasters(spec: Path | str) -> list[str]:
    """The rasters of ``RASTER``: ``@FILE`` (one path per line; blank lines and ``#`` comments skipped), a glob
    (``*``, ``?``, ``[``; ``**`` recursive; sorted) or one raster (GDAL paths unchanged)."""
    from geo_r1_qgis.core.gpkg_schema import is_gdal_path

    text = str(spec)
    if text.startswith("@"):
        listing = Path(text[1:]).expanduser()
        try:
            lines = listing.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read the raster list {listing} ({exc.strerror}); give @FILE of an existing "
                              "text file with one raster per line") from None  # fmt: skip
        paths = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not paths:
            raise ConfigError(f"the raster list {listing} names no raster: one path per line")
        base = listing.parent
        return [p if is_gdal_path(p) or Path(p).is_absolute() else str(base / p) for p in paths]
    if not is_gdal_path(text) and any(c in text for c in "*?["):
        paths = sorted(glob.glob(os.path.expanduser(text), recursive=True))
        paths = [p for p in paths if os.path.isfile(p)]
        if not paths:
            raise ConfigError(f"no file matches {text!r}; check the pattern (quote it, so geo-r1 expands it)")
        return paths
    return [text]


def import_ray() -> Any:
    """Ray, or the fix when it is missing."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ConfigError(f"{RAY_MISSING} ({exc})") from None
    return ray


def _head_host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of an explicit address (``HOST:PORT`` or ``ray://HOST:PORT``); None for auto/local."""
    text = address.removeprefix("ray://")
    if not address or address in ("auto", "local") or ":" not in text:
        return None
    host, _, port = text.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise ConfigError(f"--ray {address!r}: the port is not a number; e.g. --ray 10.0.0.5:6379") from None


def connect(ray: Any, address: str) -> None:
    """Join the cluster at ``address`` ('' = Ray's default: $RAY_ADDRESS, this machine's cluster, or a new local
    one); an unreachable head is a clear error within CONNECT_TIMEOUT_S, not a minute of Ray retrying."""
    head = _head_host_port(address)
    if head is not None:
        try:
            socket.create_connection(head, timeout=CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            raise EngineUnavailableError(
                f"the Ray cluster at --ray {address} does not answer ({exc}); start it (`ray start --head` on the "
                "head node) or check the address and the firewall (port 6379, or 10001 for ray://)"
            ) from None
    if ray.is_initialized():
        return
    # Ray Data's progress lines would drown the run's own bar and report; warnings and errors still show.
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    try:
        ray.init(address=address or None, logging_level=logging.WARNING, log_to_driver=False)
    except ConnectionError as exc:
        raise EngineUnavailableError(
            f"could not join a Ray cluster at --ray {address or 'auto'}: {exc}; start one with `ray start --head`, "
            "or give its address"
        ) from None


# -- on the workers --------------------------------------------------------------------------------

#: the rasters a worker process has open, by (path, bands)
_OPEN: dict[tuple[str, Any], Any] = {}


def _source(path: str, bands: tuple[int, ...] | None) -> Any:
    from engine.rasters import RasterioSource

    key = (path, bands)
    if key not in _OPEN:
        _OPEN[key] = RasterioSource(path, bands=bands)
    return _OPEN[key]


def read_tiles(batch: dict[str, np.ndarray], paths: list[str], bands: tuple[int, ...] | None) -> dict[str, Any]:
    """A Ray Data batch of tiles -> their images (a read task, on a worker)."""
    t0 = time.perf_counter()
    images, valid = [], []
    for k, tile in zip(batch["raster"], batch["tile"], strict=True):
        # the driver's own pickle of a Tile (Arrow has no type for it)
        image, fraction = _source(paths[int(k)], bands).read(pickle.loads(tile))  # nosec B301
        images.append(np.ascontiguousarray(image, dtype=np.uint8))
        valid.append(float(fraction))
    if len({im.shape for im in images}) == 1:
        column: Any = np.stack(images)
    else:  # tiles of several sizes (several rasters at different gsd)
        column = np.empty(len(images), dtype=object)
        column[:] = images
    read_ms = (time.perf_counter() - t0) * 1000.0 / max(1, len(images))
    return {"raster": batch["raster"], "tile_id": batch["tile_id"], "image": column,
            "valid": np.asarray(valid, dtype=np.float64), "read_ms": np.full(len(images), read_ms)}  # fmt: skip


class Grounder:
    """A Ray Data actor: the engine's backend (:func:`engine.server.app.build_backend`), asked as ``POST /ground``
    asks it; returns each tile's answer as the server's JSON ('' for a tile without a valid pixel)."""

    def __init__(self, serve: dict[str, Any], expression: str, task: str, reasoning: bool,
                 max_new_tokens: int | None) -> None:  # fmt: skip
        from engine.runtime.backend import GenerationSettings
        from engine.server.app import ServeConfig, build_backend
        from geo_r1_qgis.core.rules.prompts import default_max_new_tokens

        config = ServeConfig(**serve)
        self.backend = build_backend(config)
        self.expression, self.task, self.reasoning = expression, task, reasoning
        limit = min(config.max_new_tokens, max_new_tokens or default_max_new_tokens([task]))
        self.settings = GenerationSettings(max_new_tokens=limit)
        #: what the run records as the engine that answered a tile (geo_r1_tiles.engine)
        self.name = f"ray:{socket.gethostname()}/{os.getpid()}"
        log.info("grounding actor %s ready", self.name)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from PIL import Image

        from engine.runtime.backend import GroundItem

        valid = [float(v) > 0.0 for v in batch["valid"]]
        items = [
            GroundItem(image=Image.fromarray(np.asarray(img, dtype=np.uint8)), expression=self.expression,
                       task=self.task, reasoning=self.reasoning)  # type: ignore[arg-type]
            for img, ok in zip(batch["image"], valid, strict=True) if ok
        ]  # fmt: skip
        results = iter(self.backend.ground(items, self.settings) if items else [])
        answers = np.empty(len(valid), dtype=object)
        answers[:] = [json.dumps(next(results).to_json()) if ok else "" for ok in valid]
        return {"raster": batch["raster"], "tile_id": batch["tile_id"], "answer": answers, "read_ms": batch["read_ms"],
                "engine": np.full(len(valid), self.name, dtype=object)}  # fmt: skip


def serve_options(config: Any) -> dict[str, Any]:
    """The :class:`engine.server.app.ServeConfig` of each actor's backend (threads: its CPUs)."""
    from engine.runtime.loading import parse_adapters

    if config.model:
        return {"model": config.model, "processor": config.processor, "device": config.device, "dtype": config.dtype,
                "adapters": tuple(parse_adapters(list(config.adapters)).items()), "batch_size": config.batch_size,
                "threads": max(1, int(config.ray_cpus))}  # fmt: skip
    return {"backend": "openai", "base_url": config.base_url, "remote_model": config.remote_model,
            "api_key_env": config.api_key_env, "concurrency": config.concurrency}  # fmt: skip


def engine_info(config: Any) -> dict[str, Any]:
    """What the run record says answered (a single-process run records the engine's ``/info``)."""
    from engine import __version__ as engine_version
    from engine.runtime.loading import parse_adapters, served_tile
    from geo_r1_qgis.core.rules.prompts import PROMPT_VERSION

    adapters = parse_adapters(list(config.adapters))
    info: dict[str, Any] = {
        "backend": "local" if config.model else "openai",
        "model": config.model or config.remote_model or config.base_url,
        "processor": config.processor,
        "adapter": next(iter(adapters), None),
        "device": config.device if config.model else "remote",
        "engine_version": engine_version,
        "prompt_version": PROMPT_VERSION,
        "ray": {"address": config.ray or "default", "workers": config.ray_workers},
    }
    if config.base_url:
        info["base_url"] = config.base_url
    tile = served_tile(config.model) if config.model else None
    if tile:
        info["tile"] = tile
    return info


# -- on the driver ---------------------------------------------------------------------------------


@dataclass
class _RasterRun:
    """One raster's run on the driver: its grid, its sink and what came back."""

    path: str
    source: Any
    job: Any
    plan: Any
    params: dict[str, Any]
    raster_info: dict[str, Any]
    crs: Any
    layer: str | None
    sink: Any = None
    resumed: dict[str, list[Any]] = field(default_factory=dict)
    dets: dict[str, list[Any]] = field(default_factory=dict)
    summary: Any = None
    tiles: dict[str, Any] = field(default_factory=dict)

    def write(self, tile_id: str, answer: str, engine: str = "") -> int:
        """Write one tile's answer (once: a retried batch's second answer is ignored); 1 if it was new."""
        from geo_r1_qgis.core.client import GroundResult
        from geo_r1_qgis.core.pipeline import place, result_to_detections

        if tile_id in self.dets:
            return 0
        tile, s, src = self.tiles[tile_id], self.summary, self.source
        t0 = time.perf_counter()
        if not answer:
            self.dets[tile_id] = []
            self.sink.write_tile(tile_id, tile, [], "skipped")  # never asked, as in the pipeline
            s.tiles_skipped += 1
        else:
            result = GroundResult.from_json(json.loads(answer))
            s.engine_generate_s += float(result.timings_ms.get("generate", 0.0)) / 1000.0
            if result.parse_status not in ("", "ok"):
                s.parse_failures += 1
            found = result_to_detections(result, tile_id, tile, src.width, src.height, self.plan.area)
            kept = [d for d in found if self.job.keeps(d)]
            self.dets[tile_id] = kept
            self.sink.write_tile(tile_id, tile, place(kept, src.transform), "done", engine=engine)
            s.detections_raw += len(kept)
            s.tiles_processed += 1
        s.write_s += time.perf_counter() - t0
        return 1

    def in_tile_order(self) -> list[Any]:
        """Every detection of the run (resumed ones included) in the grid's order, as the pipeline holds them."""
        out: list[Any] = []
        for tile_id, _ in self.plan.tiles:
            out.extend(self.dets.get(tile_id, self.resumed.get(tile_id, [])))
        return out


def _collected_runner() -> type:
    from geo_r1_qgis.core.pipeline import _Runner

    class _Collected(_Runner):
        """The pipeline's end of a run (merge, mode, empty-raster check, final layer) over detections that the
        cluster produced: its one pass returns them instead of asking an engine."""

        def __init__(self, run: _RasterRun) -> None:
            super().__init__(run.job, run.source, run.sink, client=None, progress=None, is_canceled=None)  # type: ignore[arg-type]
            self.summary, self._dets = run.summary, run.in_tile_order()

        def run_pass(self, plan: Any) -> list[Any]:
            return self._dets

    return _Collected


def _layer_for(config: Any, index: int, count: int) -> str | None:
    if not config.layer or count == 1:
        return config.layer
    return f"{config.layer}_{index + 1:0{len(str(count))}d}"


def _plan(config: Any, paths: list[str], stack: contextlib.ExitStack) -> list[_RasterRun]:
    """Open, check and tile every raster (nothing is written)."""
    from engine.gpkg import CrsTransform, check_layer_name, list_layers
    from engine.ground import raster_area
    from engine.rasters import RasterioSource
    from geo_r1_qgis.core.pipeline import RunSummary, plan_full

    existing = list_layers(config.output)
    runs = []
    for i, path in enumerate(paths):
        layer = _layer_for(config, i, len(paths))
        if layer:
            check_layer_name(layer)
            if layer in existing and not config.resume:
                raise OutputError(
                    f"the layer {layer!r} already exists in {config.output} and is never overwritten; choose "
                    "another --layer, or add --resume to continue that run"
                )
        source = stack.enter_context(RasterioSource(path, bands=config.bands))
        window, scale, _area = raster_area(config, source, path)
        job = config.job(scale=scale, window=window)
        plan = plan_full(job, source)
        if plan.tiles:
            source.read(plan.tiles[0][1])  # a raster that cannot be read fails here, before the GeoPackage
        info = source.describe()
        runs.append(_RasterRun(
            path=path, source=source, job=job, plan=plan, params=config.run_parameters(info["path"], source.bands,
            scale), raster_info=info, crs=CrsTransform(source.crs_wkt, config.dst_crs), layer=layer,
            summary=RunSummary(), tiles=dict(plan.tiles)))  # fmt: skip
    return runs


def _spread() -> dict[str, Any]:
    """The actors spread over the nodes (one per node before two on one), like vLLM replicas."""
    return {"scheduling_strategy": "SPREAD"}


def _dataset(ray: Any, config: Any, runs: list[_RasterRun]) -> tuple[Any, int]:
    """The Ray dataset of the tiles still to do: read tasks, then the grounding actors."""
    rows = [
        {"raster": k, "tile_id": tile_id, "tile": pickle.dumps(tile)}
        for k, run in enumerate(runs)
        for tile_id, tile in run.plan.tiles
        if tile_id not in run.resumed
    ]
    if not rows:
        return None, 0
    batch = config.batch_size
    blocks = max(1, min(len(rows), math.ceil(len(rows) / batch)))
    gpus = config.ray_gpus
    if gpus is None:
        gpus = 1.0 if config.model and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    job = runs[0].job
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map_batches(read_tiles, fn_kwargs={"paths": [r.path for r in runs], "bands": config.bands},
                        batch_size=batch, batch_format="numpy", num_cpus=READ_TASK_CPUS)  # fmt: skip
    ds = ds.map_batches(
        Grounder,
        fn_constructor_kwargs={"serve": serve_options(config), "expression": job.expression, "task": job.task,
                               "reasoning": job.reasoning, "max_new_tokens": job.max_new_tokens},
        batch_size=batch, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=config.ray_workers),
        num_cpus=config.ray_cpus, num_gpus=gpus or None, ray_remote_args_fn=_spread,
    )  # fmt: skip
    return ds, len(rows)


@dataclass
class _Stream:
    """What came back: tiles written, the workers' mean read time per tile, and when the first and last answers
    came (perf_counter seconds)."""

    written: int = 0
    read_ms: float = 0.0
    first: float | None = None
    last: float = 0.0

    def rate(self) -> str:
        """The steady rate after the first answer (the cluster's start, actors and models, left out)."""
        if self.first is None or self.written < 2 or self.last <= self.first:
            return "too few tiles for a rate"
        return f"then {(self.written - 1) / (self.last - self.first):.2f} tiles/s"


def _stream(ds: Any, runs: list[_RasterRun], total: int, progress: Any) -> _Stream:
    """Write the answers as they come back."""
    done = sum(r.summary.tiles_resumed for r in runs)
    written, read_ms = 0, 0.0
    got = _Stream()
    for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
        got.first = got.first if got.first is not None else time.perf_counter()
        touched = set()
        columns = (out["raster"], out["tile_id"], out["answer"], out["read_ms"], out["engine"])
        for k, tile_id, answer, ms, engine in zip(*columns, strict=True):
            run = runs[int(k)]
            new = run.write(str(tile_id), str(answer), str(engine))
            written += new
            read_ms += float(ms) * new
            touched.add(int(k))
        for k in touched:
            t0 = time.perf_counter()
            runs[k].sink.commit()
            runs[k].summary.requests += 1
            runs[k].summary.write_s += time.perf_counter() - t0
        progress(done + written, total, "full")
        got.last = time.perf_counter()
    got.written, got.read_ms = written, read_ms / max(1, written)
    return got


def _ray_error(exc: BaseException) -> GeoR1Error:
    """A failure inside the cluster as the project's error: the backend's own error when it raised one."""
    cause: BaseException | None = exc
    seen = set()
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, GeoR1Error):
            return cause
        cause = getattr(cause, "cause", None) or cause.__cause__
    text = " ".join(str(exc).split())
    return EngineUnavailableError(f"the Ray run failed: {text[:600]}")


def run_ray(config: Any) -> int:
    """``geo-r1 ground ... --ray``: see the module docstring. Exit status as :func:`engine.ground.run`."""
    import sys

    from engine.gpkg import GeoPackageSink
    from engine.ground import _Progress, _report, _resume_can_mend, _stop, check_writable
    from geo_r1_qgis.core.geometry import tile_size_advice

    logging.getLogger("pyogrio").setLevel(logging.WARNING)
    ray = import_ray()
    paths = expand_rasters(config.raster)
    check_writable(config.output)
    info = engine_info(config)
    config = config.with_engine_tile(info)
    advice = tile_size_advice(config.tile)
    if advice:
        log.warning(advice)
    from engine.server.app import ServeConfig

    limit = ServeConfig.__dataclass_fields__["max_expression_chars"].default
    if len(config.expression) > limit:
        raise ConfigError(f"the expression is {len(config.expression)} characters long; the engine accepts at most "
                          f"{limit}: one sentence describing the target")  # fmt: skip
    created_file = not config.output.exists()
    with contextlib.ExitStack() as stack:
        runs = _plan(config, paths, stack)
        connect(ray, config.ray)
        for run in runs:
            run.sink = GeoPackageSink.open_run(
                config.output, expression=config.expression, mode=config.mode, parameters=run.params,
                raster=run.raster_info, engine=info, crs=run.crs, layer=run.layer, resume=config.resume,
            )  # fmt: skip
            run.resumed = {k: list(v) for k, v in run.sink.done_tiles().items()}
            run.summary.tiles_resumed = sum(1 for t, _ in run.plan.tiles if t in run.resumed)
        total = sum(len(r.plan.tiles) for r in runs)
        progress = _Progress(config.progress)
        t0 = time.perf_counter()
        try:
            ds, todo = _dataset(ray, config, runs)
            log.info("%d raster(s), %d tile(s), %d to ground on Ray (%s)", len(runs), total, todo,
                     ray.cluster_resources())  # fmt: skip
            got = _stream(ds, runs, total, progress) if ds is not None else _Stream()
        except KeyboardInterrupt:
            progress.close()
            for run in runs:
                _stop(run.sink, "interrupted")
            sys.stderr.write(f"geo-r1 ground: interrupted; {config.output} is valid: run the same command with "
                             "--resume\n")  # fmt: skip
            return 130
        except Exception as exc:
            progress.close()
            for run in runs:
                _stop(run.sink, "failed")
            err = exc if isinstance(exc, GeoR1Error) else _ray_error(exc)
            advice = ": run the same command with --resume" if _resume_can_mend(err) else ""
            raise type(err)(f"{err} -- {config.output} keeps the finished tiles{advice}") from None
        progress.close()
        seconds = time.perf_counter() - t0
        collected = _collected_runner()
        for run in runs:
            run.summary.engine_s = seconds
            run.summary.read_s = got.read_ms * run.summary.tiles_processed / 1000.0
            summary = collected(run).run()
            _report(config, run.sink, summary, seconds, created_file)
        first = "no tile asked" if got.first is None else f"first answer after {got.first - t0:.1f} s"
        sys.stderr.write(f"  ray: {config.ray_workers} worker(s), {got.written} tile(s) asked; {first}, {got.rate()}\n")
    return 0
