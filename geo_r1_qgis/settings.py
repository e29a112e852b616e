"""The plugin's settings, in QgsSettings under ``geo_r1/``: one place for every key and default.

The panel, the engine check, the engine manager, the setup dialog and the Processing algorithms all
read them from here, so a value changed in the settings dialog is what every part of the plugin uses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

from qgis.core import QgsApplication, QgsSettings

from .core.client import DEFAULT_URL, MAX_EXPRESSION_CHARS, default_token_path
from .core.errors import ConfigError
from .core.geometry import DEFAULT_TILE
from .core.rules.coords import QWEN_FACTOR
from .core.run_spec import MAX_IN_FLIGHT

#: what the tile spin boxes show at 0: the tile the engine's model serves (GET /info's "tile")
MODEL_TILE_TEXT = "the model's"

PREFIX = "geo_r1/"
HISTORY_KEY = PREFIX + "expression_history"
HISTORY_MAX = 30
#: characters of a history entry shown in the expression box (the whole entry is the item's data and tooltip)
HISTORY_SHOWN_CHARS = 60
#: examples offered in the expression box before the user has a history
EXAMPLE_EXPRESSIONS = (
    "all storage tanks",
    "all baseball fields",
    "the largest storage tank",
    "all airplanes",
    "the ship closest to the harbour entrance",
)


def plugin_settings_dir() -> Path:
    """``<QGIS settings dir>/geo-r1``: the engine venv, its token file and its log live here."""
    return Path(QgsApplication.qgisSettingsDirPath()) / "geo-r1"


@dataclass(frozen=True)
class PluginSettings:
    """Every user setting of the plugin, with its default. ``load()``/``save()`` go through QgsSettings."""

    engine_url: str = DEFAULT_URL
    #: empty: the engine's default token file (``~/.config/geo-r1/engine.token``)
    token_file: str = ""
    #: empty: ``<project dir>/geo_r1_results.gpkg``, else ``<home>/geo_r1_results.gpkg``
    output_gpkg: str = ""
    #: 0: the tile the engine's model serves (its manifest's "tile", GET /info), else DEFAULT_TILE
    tile_size: int = 0
    overlap: int = 64
    #: 0: the engine's default for the task (Geo-R1: 256 for one object, 1024 for all)
    max_new_tokens: int = 0
    #: tiles asked at once over all engines; 0: what the engines report (their batch size, or a remote
    #: backend's concurrency: ``core/client.engine_capacity``)
    in_flight: int = 0
    #: more engines a run spreads its tiles over, beside ``engine_url``: their URLs, one a line (started with
    #: the same token file; each proves it holds the token before it is sent)
    more_engines: str = ""
    # -- the engine the plugin manages (issue: the engine from inside QGIS)
    #: empty: ``<settings dir>/geo-r1/engine-venv``
    engine_venv: str = ""
    engine_model: str = ""
    engine_processor: str = ""
    engine_adapter: str = ""
    #: leave an engine the plugin started running when QGIS quits
    keep_engine_running: bool = False
    #: the interpreter the setup dialog builds the engine venv with (empty: search for one)
    setup_python: str = ""
    # -- fine-tuning from the panel
    #: the id of the engine's fine-tune job the panel watches (kept across closing the panel and QGIS)
    finetune_job: str = ""
    #: the annotation GeoPackage last fine-tuned on
    finetune_annotations: str = ""
    #: the annotation GeoPackage the annotation dock writes (empty: ``<project dir>/geo_r1_annotations.gpkg``,
    #: else ``<home>/geo_r1_annotations.gpkg``); chosen once in the dock, remembered here
    annotation_gpkg: str = ""

    def __post_init__(self) -> None:
        if not self.engine_url.startswith(("http://", "https://")):
            raise ConfigError(f"the engine URL must start with http:// or https://, got {self.engine_url!r}")
        if self.tile_size != 0 and not QWEN_FACTOR <= self.tile_size <= 4096:
            raise ConfigError(f"tile size must be between {QWEN_FACTOR} and 4096 pixels (0: the model's), got "
                              f"{self.tile_size}")  # fmt: skip
        if not 0 <= self.overlap < (self.tile_size or DEFAULT_TILE) // 2:
            raise ConfigError(f"overlap must be between 0 and half the tile size, got {self.overlap}")
        if self.max_new_tokens < 0:
            raise ConfigError(f"max new tokens must be >= 0 (0 = the engine's default), got {self.max_new_tokens}")
        if not 0 <= self.in_flight <= MAX_IN_FLIGHT:
            raise ConfigError(f"tiles in flight must be within 0..{MAX_IN_FLIGHT} (0: what the engines take), got "
                              f"{self.in_flight}")  # fmt: skip
        urls = self.engine_urls()
        for url in urls[1:]:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"each of the more engines must be an http:// or https:// URL, one a line; got "
                                  f"{url!r}")  # fmt: skip
        if len(set(urls)) != len(urls):
            raise ConfigError("an engine is listed twice (the engine URL and the more engines): list each once")

    # -- derived values -------------------------------------------------------------------------
    def engine_urls(self) -> tuple[str, ...]:
        """The engines a run uses: ``engine_url``, then ``more_engines`` (one a line; blank lines ignored)."""
        more = (u.strip().rstrip("/") for u in self.more_engines.replace(",", "\n").splitlines())
        return (self.engine_url.rstrip("/"), *(u for u in more if u))

    def token_path(self) -> Path:
        return Path(self.token_file) if self.token_file else default_token_path()

    def venv_path(self) -> Path:
        return Path(self.engine_venv) if self.engine_venv else plugin_settings_dir() / "engine-venv"

    def default_output(self, project_dir: str | None = None) -> Path:
        if self.output_gpkg:
            return Path(self.output_gpkg)
        base = Path(project_dir) if project_dir else Path.home()
        return base / "geo_r1_results.gpkg"

    def default_annotations(self, project_dir: str | None = None) -> Path:
        """The annotation GeoPackage: the one chosen, else beside the project, else in the home folder."""
        if self.annotation_gpkg:
            return Path(self.annotation_gpkg)
        base = Path(project_dir) if project_dir else Path.home()
        return base / "geo_r1_annotations.gpkg"

    # -- persistence ---------------------------------------------------------------------------
    @classmethod
    def load(cls, settings: QgsSettings | None = None) -> PluginSettings:
        """The stored settings; a stored value that is missing or unusable falls back to its default."""
        s = settings or QgsSettings()
        default = cls()
        values = {}
        for f in fields(cls):
            stored = s.value(PREFIX + f.name, None)
            if stored is None:
                continue
            want = type(getattr(default, f.name))
            try:
                if want is bool:
                    value = stored if isinstance(stored, bool) else str(stored).lower() in ("1", "true", "yes")
                else:
                    value = want(stored)
            except (TypeError, ValueError):
                continue
            values[f.name] = value
        try:
            return cls(**values)
        except ConfigError:
            # One bad stored value must not lock the user out of the plugin: drop the unusable ones.
            good = {}
            for name, value in values.items():
                try:
                    cls(**{**good, name: value})
                except ConfigError:
                    continue
                good[name] = value
            return cls(**good)

    def save(self, settings: QgsSettings | None = None) -> None:
        s = settings or QgsSettings()
        for f in fields(self):
            s.setValue(PREFIX + f.name, getattr(self, f.name))
        s.sync()

    def with_values(self, **changes) -> PluginSettings:
        return replace(self, **changes)


def expression_history(settings: QgsSettings | None = None) -> list[str]:
    """The stored expressions, newest first. An entry no engine accepts (longer than MAX_EXPRESSION_CHARS, as an
    old version could store) is left out: one such line made the panel, and QGIS's window, 32,000 pixels wide."""
    s = settings or QgsSettings()
    value = s.value(HISTORY_KEY, [])
    if isinstance(value, str):
        value = [value] if value else []
    entries = [" ".join(str(v).split()) for v in (value or []) if not isinstance(v, bytes)]
    return [e for e in entries if e and len(e) <= MAX_EXPRESSION_CHARS][:HISTORY_MAX]


def elided(text: str, chars: int = HISTORY_SHOWN_CHARS) -> str:
    """``text`` on one line, at most ``chars`` characters (cut with "…")."""
    line = " ".join(text.split())
    return line if len(line) <= chars else line[: chars - 1].rstrip() + "…"


def remember_expression(expression: str, settings: QgsSettings | None = None) -> list[str]:
    """Put ``expression`` first in the history (no duplicates, at most HISTORY_MAX); returns the history.

    Call it only for an expression the engine accepted; one longer than any engine accepts is never stored."""
    s = settings or QgsSettings()
    expression = " ".join(expression.split())
    history = [e for e in expression_history(s) if e != expression]
    if expression and len(expression) <= MAX_EXPRESSION_CHARS:
        history.insert(0, expression)
    history = history[:HISTORY_MAX]
    s.setValue(HISTORY_KEY, history)
    s.sync()
    return history


#: variables that must not leak from QGIS into a subprocess running another Python (the engine venv)
_UNSAFE_PREFIXES = ("GDAL_", "PROJ_", "QT_", "PYTHON")
_UNSAFE_NAMES = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONEXECUTABLE", "VIRTUAL_ENV", "LD_PRELOAD"}


def clean_environment(base: dict[str, str] | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a subprocess outside QGIS's Python: without PYTHON*, GDAL_*, PROJ_*, QT_*.

    QGIS sets these for its own interpreter and libraries; a venv's Python or pip that inherits them
    imports QGIS's site-packages or loads the wrong GDAL/PROJ data. ``extra`` is added afterwards.
    """
    env = dict(os.environ if base is None else base)
    for key in list(env):
        if key in _UNSAFE_NAMES or key.startswith(_UNSAFE_PREFIXES):
            del env[key]
    env.update(extra or {})
    return env
