"""One run, as the user describes it: what to find and how to tile, ask and filter.

:class:`RunSpec` is filled by ``geo-r1 ground`` (:class:`engine.ground.GroundConfig` adds the command's own
options), by the panel (:class:`geo_r1_qgis.engine_control.run_task.RunRequest` adds its own) and by the Processing
algorithm; its values are checked here once (:func:`check_run_values`, which the pipeline's
:class:`~geo_r1_qgis.core.pipeline.GroundingJob` also calls). A field's ``metadata`` says how the command line
spells it (``engine/cli/options.py`` reads it), so adding a run option is one field and its uses.

Pure: the standard library only (it runs under QGIS's own Python).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .geometry import DEFAULT_TILE
from .merge import MODES
from .results import parse_bands
from .rules.coords import QWEN_FACTOR

if TYPE_CHECKING:  # pragma: no cover
    from .area import AreaPolygon
    from .geometry import PixelBox
    from .pipeline import GroundingJob

#: the most tiles one ``/ground`` request may carry, and the longest generation a tile may ask for
MAX_BATCH_SIZE = 64
MAX_NEW_TOKENS = 4096
#: the most tiles a run asks at once (a bound on its worker threads and on what it holds in memory)
MAX_IN_FLIGHT = 1024


def parse_floats(text: str | None, n: int, what: str, example: str) -> tuple[float, ...] | None:
    """``n`` comma-separated numbers, e.g. a bbox; None for None."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{what} takes {n} comma-separated numbers, got {text!r}; e.g. {example}") from None
    if len(values) != n:
        raise ConfigError(f"{what} takes {n} comma-separated numbers, got {len(values)} in {text!r}; e.g. {example}")
    return values


def parse_bbox(text: str | tuple[float, ...] | None) -> tuple[float, ...] | None:
    if text is None or isinstance(text, tuple):
        return text
    return parse_floats(text, 4, "--bbox", "--bbox 630000,4249000,631000,4250000")


def check_run_values(
    *,
    expression: str,
    mode: str,
    tile_size: int | None,
    overlap: int,
    batch_size: int,
    max_new_tokens: int | None,
    top_k: int,
    min_score: float,
    gsd: float | None = None,
    in_flight: int | None = None,
) -> None:
    """The checks of a run's values, for every way a run is described; each message names the value and the fix."""
    if not isinstance(expression, str) or not expression.strip():
        raise ConfigError('the expression is empty: describe what to find, e.g. "all storage tanks"')
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}: 'one' (best match) or 'all'")
    if gsd is not None and not gsd > 0:
        raise ConfigError(f"the ground resolution (gsd) must be in metres > 0, got {gsd!r}; e.g. 0.5")
    if tile_size is not None and (isinstance(tile_size, bool) or not isinstance(tile_size, int)
                                  or tile_size < QWEN_FACTOR):  # fmt: skip
        raise ConfigError(f"tile_size must be at least {QWEN_FACTOR} pixels (one model patch), got {tile_size!r}; "
                          "e.g. 504")  # fmt: skip
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < (tile_size or DEFAULT_TILE):
        raise ConfigError(f"overlap must be in [0, tile_size), got {overlap!r} with tile_size {tile_size}; e.g. 64")
    for name, value, most in (
        ("batch_size", batch_size, MAX_BATCH_SIZE),
        ("max_new_tokens", max_new_tokens, MAX_NEW_TOKENS),
        ("top_k", top_k, None),
    ):
        if name == "max_new_tokens" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (most and value > most):
            limit = f"within 1..{most}" if most else "an integer >= 1"
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{name} must be {limit}, got {value!r}: change it ({flag} on the command line, "
                              "Raster > Geo-R1 > Settings in QGIS)")  # fmt: skip
    if not 0.0 <= min_score <= 1.0:
        raise ConfigError(f"min_score must be in [0, 1], got {min_score!r}; 0 keeps every box")
    if in_flight is not None and (isinstance(in_flight, bool) or not isinstance(in_flight, int)
                                  or not 1 <= in_flight <= MAX_IN_FLIGHT):  # fmt: skip
        raise ConfigError(f"in_flight must be within 1..{MAX_IN_FLIGHT} tiles, got {in_flight!r}: change it "
                          "(--in-flight on the command line, Raster > Geo-R1 > Settings in QGIS; 0 there: the "
                          "engine's)")  # fmt: skip


_TILES = {"group": "tiles"}
_OUT = {"group": "output"}
_REQUESTS = {"group": "requests and search"}


@dataclass(frozen=True)
class RunSpec:
    """What to ground and how: the values that define a run's results (and ``batch_size``, which does not)."""

    expression: str = field(
        metadata={"positional": True, "position": 1, "help": 'what to find, e.g. "all storage tanks"'}
    )
    mode: str = field(
        default="all",
        metadata={"choices": MODES, "help": "all: every instance (default); one: the single best match"},
    )
    gsd: float | None = field(
        default=None, metadata={**_TILES, "help": "ground resolution of the tiles in metres (default: the raster's)"}
    )
    #: None: the tile the model serves (its manifest's ``"tile"``, reported by ``GET /info``), else DEFAULT_TILE;
    #: :meth:`with_engine_tile` resolves it once the engine answers
    tile_size: int | None = field(
        default=None,
        metadata={**_TILES, "flags": ("--tile",),
                  "help": f"tile size in pixels, a multiple of {QWEN_FACTOR} (the model sees it unresized); default: "
                          f"the tile the model serves (its manifest, GET /info), else {DEFAULT_TILE}"},
    )  # fmt: skip
    overlap: int = field(default=64, metadata={**_TILES, "help": "overlap of tiles in pixels"})
    bands: tuple[int, ...] | None = field(
        default=None,
        metadata={**_TILES, "action": "store", "parse": parse_bands,
                  "help": "band numbers for R,G,B (default: the RGB bands, else the first three)"},
    )  # fmt: skip
    bbox: tuple[float, ...] | None = field(
        default=None,
        metadata={**_TILES, "action": "store", "parse": parse_bbox,
                  "help": "xmin,ymin,xmax,ymax in the raster's CRS (default: the whole raster)"},
    )  # fmt: skip
    dst_crs: str | None = field(
        default=None, metadata={**_OUT, "help": "write polygons in this CRS, e.g. EPSG:4326 (default: the raster's)"}
    )
    batch_size: int = field(
        default=8,
        metadata={**_REQUESTS, "aliases": ("--batch",), "help": "tiles per /ground request"},
    )
    #: None: what the engines report in ``GET /info`` (core/client.engine_capacity), summed over the engines
    in_flight: int | None = field(
        default=None,
        metadata={**_REQUESTS,
                  "help": "tiles asked at once, over concurrent requests and engines (default: what each engine "
                          "reports: its batch size, or the remote backend's --concurrency)"},
    )  # fmt: skip
    # None: the engine's default for the task (Geo-R1: rec 256, multi 1024)
    max_new_tokens: int | None = field(
        default=None,
        metadata={**_REQUESTS,
                  "help": "generation limit per tile (default: Geo-R1's, 256 for mode one, 1024 for mode all)"},
    )  # fmt: skip
    reasoning: bool = field(
        default=True,
        metadata={**_REQUESTS, "flags": ("--no-reasoning",), "action": "store_false",
                  "help": "the SFT-baseline prompt without <think>"},
    )  # fmt: skip
    coarse_to_fine: bool = field(
        default=True,
        metadata={**_REQUESTS, "flags": ("--no-coarse-to-fine",), "action": "store_false",
                  "help": "mode one: always tile at full resolution"},
    )  # fmt: skip
    top_k: int = field(default=3, metadata={**_REQUESTS, "help": "mode one: candidates refined at full resolution"})
    min_score: float = field(default=0.0, metadata={**_REQUESTS, "help": "drop boxes whose score is below this"})
    task: str = field(
        default="auto",
        metadata={**_REQUESTS, "choices": ("auto", "gres"),
                  "help": "auto: Geo-R1's REC prompt for mode one, OVD for all; gres: Geo-R1's GRES prompt (boxes and "
                          "keypoints; mode all), outlined by the engine's SAM (geo-r1 serve --sam) into an outline "
                          "layer"},
    )  # fmt: skip
    outline: bool = field(
        default=False,
        metadata={**_REQUESTS,
                  "help": "refine to outline: the engine's SAM (geo-r1 serve --sam) outlines every box, written to an "
                          "outline layer beside the boxes"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        check_run_values(expression=self.expression, mode=self.mode, tile_size=self.tile_size, overlap=self.overlap,
                         batch_size=self.batch_size, max_new_tokens=self.max_new_tokens, top_k=self.top_k,
                         min_score=self.min_score, gsd=self.gsd, in_flight=self.in_flight)  # fmt: skip
        object.__setattr__(self, "expression", self.expression.strip())
        if self.task not in ("auto", "gres"):
            raise ConfigError(f"task must be 'auto' or 'gres', got {self.task!r}")
        if self.task == "gres" and self.mode != "all":
            raise ConfigError("task gres finds every object: use mode all, or mode one with outline for one outline")
        if self.bands is not None:
            object.__setattr__(self, "bands", tuple(int(b) for b in self.bands))
        if self.bbox is not None:
            object.__setattr__(self, "bbox", tuple(float(v) for v in self.bbox))

    @property
    def tile(self) -> int:
        """The tile side this run uses: ``tile_size``, or DEFAULT_TILE while the engine's is not known."""
        return self.tile_size or DEFAULT_TILE

    def with_engine_tile(self, info: Mapping[str, Any] | None) -> RunSpec:
        """This run with its tile size settled: the one given, else the one the engine's model serves
        (``GET /info``'s ``"tile"``), else DEFAULT_TILE."""
        if self.tile_size is not None:
            return self
        served = (info or {}).get("tile")
        ok = isinstance(served, int) and not isinstance(served, bool) and served >= QWEN_FACTOR
        return replace(self, tile_size=served if ok else DEFAULT_TILE)

    def job(
        self,
        *,
        scale: float = 1.0,
        window: PixelBox | None = None,
        area_polygons: tuple[AreaPolygon, ...] | None = None,
    ) -> GroundingJob:
        """The pipeline's job for this run over a prepared raster: its scale, window and polygon area."""
        from .pipeline import GroundingJob

        extra: dict[str, Any] = {} if area_polygons is None else {"area_polygons": area_polygons}
        return GroundingJob(expression=self.expression, mode=self.mode, reasoning=self.reasoning,
                            max_new_tokens=self.max_new_tokens, tile_size=self.tile, overlap=self.overlap,
                            scale=scale, window=window, batch_size=self.batch_size, in_flight=self.in_flight,
                            coarse_to_fine=self.coarse_to_fine, top_k=self.top_k, min_score=self.min_score,
                            gres=self.task == "gres", outline=self.outline, **extra)  # fmt: skip

    def run_parameters(self, raster: str, bands: Sequence[int], scale: float = 1.0) -> dict[str, Any]:
        """The parameters that define this run's results (a resumed run must match them exactly), as the
        GeoPackage records them (:func:`~geo_r1_qgis.core.gpkg_schema.run_parameters`)."""
        from .gpkg_schema import run_parameters

        params = run_parameters(raster=raster, expression=self.expression, mode=self.mode, gsd=self.gsd,
                                tile=self.tile, overlap=self.overlap, bands=bands, bbox=self.bbox,
                                dst_crs=self.dst_crs, max_new_tokens=self.max_new_tokens, reasoning=self.reasoning,
                                coarse_to_fine=self.coarse_to_fine, top_k=self.top_k, min_score=self.min_score,
                                scale=scale)  # fmt: skip
        # recorded only when set, so runs without outlines keep the parameters (and resume) they always had
        if self.task != "auto":
            params["task"] = self.task
        if self.outline:
            params["outline"] = True
        return params


#: a recorded run parameter's key -> the RunSpec field it fills (where the names differ)
_RECORDED_AS = {"tile": "tile_size"}


def spec_values(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`RunSpec` keyword values of a run's recorded parameters (a GeoPackage's run record, old
    files included): what a resumed run is rebuilt from."""
    names = {f.name for f in fields(RunSpec)}
    values = {_RECORDED_AS.get(k, k): v for k, v in parameters.items() if _RECORDED_AS.get(k, k) in names}
    for key in ("tile_size", "overlap", "top_k"):
        if values.get(key) is not None:
            values[key] = int(values[key])
    for key in ("bands", "bbox"):
        if values.get(key) is not None:
            values[key] = tuple(values[key]) or None
    return values
