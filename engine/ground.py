"""``geo-r1 ground RASTER "EXPR" -o OUT.gpkg``: ground an expression over a whole raster.

The raster is cut into tiles (:mod:`geo_r1_qgis.core.pipeline`, shared with the QGIS plugin),
read window by window with rasterio (:mod:`engine.rasters`), sent to an engine over HTTP and the
answers are written to a GeoPackage tile by tile (:mod:`engine.gpkg`). The command always talks
HTTP to an engine: ``--engine URL`` uses a running one; ``--model M`` starts ``geo-r1 serve`` on a
free local port with a temporary token, waits until it is ready and stops it at the end.

Before anything is written, everything that can be checked is: the raster opens, has a CRS and
valid pixels, the extent overlaps it, the output is a GeoPackage whose layers would not be
overwritten, the destination CRS exists and the engine answers. So bad input never leaves a
GeoPackage behind. Once the run has started, an interruption (Ctrl-C, a killed engine) leaves a
valid file that ``--resume`` completes.

Exit status: 0 done, 1 error (one clear line), 130 interrupted (resumable).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.ray_ground import RayOptions
from geo_r1_qgis.core.client import DEFAULT_URL, EngineClient, engine_capacity, read_token
from geo_r1_qgis.core.errors import (
    ConfigError,
    EmptyRasterError,
    EngineUnavailableError,
    GeoR1Error,
    OutputError,
    RasterError,
)
from geo_r1_qgis.core.geometry import tile_size_advice
from geo_r1_qgis.core.pipeline import EnginePool, connect_engines
from geo_r1_qgis.core.run_spec import RunSpec

log = logging.getLogger(__name__)


#: the help sections of ``geo-r1 ground`` (the run's own options: RunSpec's)
_OUT = {"group": "output"}
_ENGINE = {"group": "engine (a running one, or one started for this run)"}


@dataclass(frozen=True, kw_only=True)
class GroundConfig(RayOptions, RunSpec):
    """Everything ``geo-r1 ground`` needs: the run (:class:`RunSpec`'s fields), the Ray options
    (:class:`~engine.ray_ground.RayOptions`) and the command's own options.
    Checks itself; each message names the bad value and the fix."""

    # a str for GDAL paths (/vsizip/..., URLs), which a Path would mangle
    raster: Path | str = field(metadata={
        "positional": True, "position": 0, "type": str,
        "help": "a georeferenced raster (GeoTIFF, COG, anything GDAL reads, /vsizip/, /vsicurl/ and other GDAL "
                "paths included); with --ray also a quoted glob ('tiles/*.tif') or @FILE (a list)"})  # fmt: skip
    output: Path = field(metadata={"flags": ("-o", "--output"), "help": "GeoPackage to write (a new layer per run)"})
    layer: str | None = field(
        default=None, metadata={**_OUT, "help": "layer name (default: from the expression and the run id)"}
    )
    resume: bool = field(default=False, metadata={**_OUT, "help": "continue the interrupted run with these parameters"})
    progress: bool = field(
        default=True, metadata={**_OUT, "flags": ("--no-progress",), "action": "store_false", "help": "no progress bar"}
    )
    # -- engine
    engine: tuple[str, ...] = field(
        default=(),
        metadata={**_ENGINE, "flags": ("--engine",), "metavar": "URL",
                  "help": f"URL of a running engine (default: {DEFAULT_URL}); repeat it to spread the tiles over "
                          "several engines (same model; one token file)"},
    )  # fmt: skip
    token_file: Path | None = field(
        default=None,
        metadata={**_ENGINE, "help": "the engine's token file (default: the engine's default); with several "
                                     "--engine, the one token they were all started with (serve --token-file)"},
    )  # fmt: skip
    model: str | None = field(
        default=None, metadata={**_ENGINE, "help": "start an engine with this model for the run (HF id or directory)"}
    )
    processor: str | None = field(default=None, metadata={**_ENGINE, "help": "processor id/directory for --model"})
    adapters: tuple[str, ...] = field(
        default=(),
        metadata={**_ENGINE, "flags": ("--adapter",), "metavar": "[NAME=]PATH", "help": "LoRA adapter for --model"},
    )
    sam: str | None = field(
        default=None,
        metadata={**_ENGINE, "metavar": "SAM2",
                  "help": "with --model: the SAM 2 (id or directory) the started engine outlines with (serve --sam); "
                          "--task gres and --outline need it"},
    )  # fmt: skip
    device: str = field(
        default="auto", metadata={**_ENGINE, "help": "device for --model: auto, cpu, cuda, cuda:N, mps"}
    )
    dtype: str = field(
        default="auto", metadata={**_ENGINE, "help": "dtype for --model: auto, float32, bfloat16, float16"}
    )
    serve_timeout_s: float = field(
        default=300.0,
        metadata={**_ENGINE, "flags": ("--serve-timeout",), "help": "seconds to wait for --model to load"},
    )
    extra: dict[str, Any] = field(default_factory=dict, metadata={"cli": False})

    def __post_init__(self) -> None:
        super().__post_init__()  # the run's values (RunSpec)
        if self.output.suffix.lower() != ".gpkg":
            raise ConfigError(f"-o {self.output} must end in .gpkg (a GeoPackage); e.g. -o results.gpkg")
        if self.engine and self.model:
            raise ConfigError("give either --engine URL (a running engine) or --model M (start one), not both")
        if self.sam and not self.model:
            raise ConfigError("--sam is for the engine --model starts; a running engine (--engine) has its own --sam")
        self.check_ray()

    @property
    def engine_url(self) -> str:
        """The first engine's URL (the default engine's without --engine)."""
        return self.engine_urls[0]

    @property
    def engine_urls(self) -> tuple[str, ...]:
        return self.engine or (DEFAULT_URL,)


# -- the engine ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: The temporary folder of an engine that ``geo-r1 ground --model`` starts; it holds the token and the log.
ENGINE_DIR_PREFIX = "geo-r1-ground-"
OWNER_FILE = "owner.pid"


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGTERM when the parent dies, whatever killed it."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def remove_stale_engine_dirs(root: Path | None = None) -> list[Path]:
    """Remove engine folders left by runs that were killed (their owner PID is gone); return them."""
    import shutil

    removed = []
    for d in Path(root or tempfile.gettempdir()).glob(ENGINE_DIR_PREFIX + "*"):
        try:
            owner = int((d / OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue  # not ours, or still being created
        try:
            os.kill(owner, 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    if removed:
        log.info("removed %d engine folder(s) left by killed runs", len(removed))
    return removed


@contextlib.contextmanager
def engine_for(config: GroundConfig) -> Iterator[tuple[EnginePool, dict[str, Any]]]:
    """The run's engines, ready, and the ``/info`` the run records: the given engines (each proves it holds the
    token before the token is sent to it, and all must serve the same model), or one started with ``--model``.
    Each takes as many tiles at once as its ``/info`` says (:func:`~geo_r1_qgis.core.client.engine_capacity`)."""
    if not config.model:
        yield connect_engines(config.engine_urls, read_token(config.token_file))
        return
    remove_stale_engine_dirs()
    with tempfile.TemporaryDirectory(prefix=ENGINE_DIR_PREFIX) as tmp:
        (Path(tmp) / OWNER_FILE).write_text(str(os.getpid()))
        port = _free_port()
        token_file = Path(tmp) / "engine.token"
        log_path = Path(tmp) / "serve.log"
        cmd = [sys.executable, "-m", "engine.cli", "serve", "--model", config.model, "--port", str(port)]
        cmd += ["--token-file", str(token_file), "--batch-size", str(config.batch_size), "--device", config.device]
        cmd += ["--dtype", config.dtype, "--parent-pid", str(os.getpid())]
        if config.processor:
            cmd += ["--processor", config.processor]
        for a in config.adapters:
            cmd += ["--adapter", a]
        if config.sam:
            cmd += ["--sam", config.sam]
        log.info("starting the engine: %s", " ".join(cmd))
        repo = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
        with open(log_path, "wb") as log_fh:
            proc = subprocess.Popen(  # nosec B603
                cmd, stdout=log_fh, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
            )
        try:
            client = EngineClient(f"http://127.0.0.1:{port}")
            deadline = time.monotonic() + config.serve_timeout_s
            while True:
                if proc.poll() is not None:
                    tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
                    raise EngineUnavailableError(
                        f"the engine for --model {config.model} exited with status {proc.returncode} while loading: "
                        + " | ".join(tail)
                    )
                if token_file.exists():
                    with contextlib.suppress(EngineUnavailableError):
                        client.token = read_token(token_file)
                        client.health(timeout_s=2.0)
                        break
                if time.monotonic() > deadline:
                    raise EngineUnavailableError(
                        f"the engine for --model {config.model} was not ready after {config.serve_timeout_s:.0f} s; "
                        "raise --serve-timeout or check the model"
                    )
                time.sleep(0.25)
            info = client.info()
            yield EnginePool.of(client, engine_capacity(info)), info
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- the run ---------------------------------------------------------------------------------------


class _Progress:
    def __init__(self, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=0, unit="tile", file=sys.stderr, dynamic_ncols=True, desc="grounding")

    def __call__(self, done: int, total: int, phase: str) -> None:
        if self.bar is None:
            return
        if self.bar.total != total:
            self.bar.total = total
        self.bar.set_description(f"grounding ({phase})", refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def raster_area(config: RunSpec, source: Any, raster: Path | str) -> tuple[Any, float, Any]:
    """``(window, scale, area)`` of a run over an open raster: the ``--bbox`` window in raster pixels (None: the
    whole raster), the ``--gsd`` scale and the processed area; an extent over nodata only is an error."""
    from geo_r1_qgis.core.geometry import PixelBox, gsd_to_scale, window_from_map_bbox

    window = None
    if config.bbox:
        window = window_from_map_bbox(*config.bbox, source.transform, source.width, source.height)
    scale = 1.0
    if config.gsd:
        scale = gsd_to_scale(config.gsd, source.transform, source.crs_units_per_metre())
    area = window or PixelBox(0.0, 0.0, float(source.width), float(source.height))
    if window is not None and not source.has_valid(area):
        raise EmptyRasterError(
            f"the --bbox {','.join(f'{v:g}' for v in config.bbox or ())} covers only nodata pixels of "
            f"{raster}; choose an extent over valid data"
        )
    return window, scale, area


def run(config: GroundConfig) -> int:
    if config.ray is not None:  # the tiles on a Ray cluster (engine/ray_ground.py)
        from engine.ray_ground import run_ray

        return run_ray(config)
    from engine.gpkg import CrsTransform, GeoPackageSink, check_layer_name, list_layers
    from engine.rasters import RasterioSource
    from geo_r1_qgis.core.pipeline import run_grounding

    logging.getLogger("pyogrio").setLevel(logging.WARNING)  # one INFO line per write otherwise
    # 1. Everything that can be checked before the output is touched.
    check_writable(config.output)
    if config.layer:
        check_layer_name(config.layer)
    with RasterioSource(config.raster, bands=config.bands) as source:
        window, scale, area = raster_area(config, source, config.raster)
        crs = CrsTransform(source.crs_wkt, config.dst_crs)
        layers = list_layers(config.output)  # raises if the file exists and is not a GeoPackage
        if config.layer and config.layer in layers and not config.resume:
            raise OutputError(
                f"the layer {config.layer!r} already exists in {config.output} and is never overwritten; "
                "choose another --layer, or add --resume to continue that run"
            )
        raster_info = source.describe()
        created_file = not config.output.exists()
        with engine_for(config) as (client, engine_info):
            config = config.with_engine_tile(engine_info)  # type: ignore[assignment]  # no --tile: the model's
            advice = tile_size_advice(config.tile)
            if advice:
                log.warning(advice)
            job = config.job(scale=scale, window=window)
            params = config.run_parameters(raster_info["path"], source.bands, scale)
            _preflight(config, engine_info, source, job, area)
            # 2. The run: from here on the GeoPackage exists and stays valid and resumable.
            sink = GeoPackageSink.open_run(
                config.output,
                expression=config.expression,
                mode=config.mode,
                parameters=params,
                raster=raster_info,
                engine=engine_info,
                crs=crs,
                layer=config.layer,
                resume=config.resume,
            )
            progress = _Progress(config.progress)
            t0 = time.perf_counter()
            try:
                summary = run_grounding(job, source, sink, client, progress=progress)
            except KeyboardInterrupt:
                progress.close()
                _stop(sink, "interrupted")
                sys.stderr.write(
                    f"geo-r1 ground: interrupted; {config.output} is valid: run the same command with --resume\n"
                )
                return 130
            except GeoR1Error as exc:
                progress.close()
                _stop(sink, "failed")
                if not _resume_can_mend(exc):  # a damaged raster or a request the engine refuses: same again
                    raise type(exc)(f"{exc} -- {config.output} keeps the finished tiles") from None
                raise type(exc)(
                    f"{exc} -- {config.output} keeps the finished tiles: run the same command with --resume"
                ) from None
            progress.close()
    _report(config, sink, summary, time.perf_counter() - t0, created_file)
    return 0


def _preflight(config: GroundConfig, engine_info: dict[str, Any], source: Any, job: Any, area: Any) -> None:
    """What can fail the same way on every try is checked before the GeoPackage is created or touched: the
    engine's limits, and that the raster's first tile can be read."""
    from geo_r1_qgis.core.geometry import make_tile_grid

    limit = (engine_info.get("limits") or {}).get("max_expression_chars")
    if isinstance(limit, int) and len(config.expression.strip()) > limit:
        raise ConfigError(
            f"the expression is {len(config.expression.strip())} characters long; this engine accepts at most "
            f"{limit} (its --max-expression-chars): one sentence describing the target"
        )
    tiles = make_tile_grid(source.transform, source.width, source.height, job.spec, window=area)
    if tiles:
        source.read(tiles[0])


def check_writable(output: Path) -> None:
    """One clear line, before anything starts, when ``output`` cannot be written (nothing is changed)."""
    output = Path(output)
    if output.exists():
        if not output.is_file():
            raise OutputError(f"-o {output} exists and is not a file; choose another -o")
        if not os.access(output, os.R_OK | os.W_OK):
            raise OutputError(f"-o {output} is not writable by this user; choose another -o or fix its permissions")
        return
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"the folder of -o {output} does not exist ({parent}); create it or choose another -o")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(
            f"cannot create {output}: the folder {parent} is not writable by this user; choose another -o"
        )


def _resume_can_mend(exc: BaseException) -> bool:
    """Whether running again with --resume can get further: not for a damaged raster or a refused request."""
    if isinstance(exc, RasterError | ConfigError):
        return False
    status = getattr(exc, "status", None)
    return not (isinstance(status, int) and 400 <= status < 500 and status != 408)


def _stop(sink: Any, status: str) -> None:
    """Keep the finished tiles (commit what the engine already answered) and mark the run."""
    try:
        sink.commit()
        sink.mark(status)
    except Exception:  # the original error matters more
        log.warning("could not record the run's status", exc_info=True)


def _report(config: GroundConfig, sink: Any, summary: Any, seconds: float, created: bool) -> None:
    s = summary
    lines = [
        f"geo-r1 ground: {s.detections_final} feature(s) in layer {sink.layer!r} of {config.output}"
        f"{' (new file)' if created else ''}",
        f"  run {sink.run_id}: mode {config.mode}, strategy {s.strategy}, {s.tiles_total} tile(s): "
        f"{s.tiles_processed} processed, {s.tiles_resumed} resumed, {s.tiles_skipped} skipped (no valid pixels); "
        f"{s.requests} request(s), {s.detections_raw} raw box(es)",
        f"  {seconds:.1f} s: engine {s.engine_s:.1f} s (generate {s.engine_generate_s:.1f} s), read {s.read_s:.2f} s, "
        f"write {s.write_s:.2f} s, merge {s.merge_s:.3f} s; this process's CPU {s.cpu_s:.2f} s",
    ]
    if len(s.engines) > 1 or s.engines_failed:
        lines.append("  engines: " + ", ".join(f"{url} {n} tile(s)" for url, n in s.engines.items()))
    for url, why in s.engines_failed.items():
        lines.append(f"  engine {url} failed during the run and was given up ({why}); the others took its tiles")
    if s.strategy != "full":
        lines.append(f"  coarse to fine: {s.tiles_total} tile(s) instead of {s.full_tiling_tiles} for a full tiling")
    for m in s.final[:5]:
        d = m.detection
        lines.append(f"  score {d.score:.3f} presence {d.presence:.3f} tile {d.tile_id} label {d.label or '-'}")
    sys.stderr.write("\n".join(lines) + "\n")
    log.debug("summary: %s", json.dumps(s.as_dict(), default=str))
    log.debug("config: %s", asdict(config))
