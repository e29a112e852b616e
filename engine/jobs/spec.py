"""What a job was asked to do: :class:`JobSpec`, written once to the job's ``spec.json``."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geo_r1_qgis.core.errors import ConfigError

#: the recipes a job may follow (train/recipes/<name>.yaml)
RECIPES = ("sft", "grpo", "dapo")
#: TrainConfig fields a job sets itself; ``options`` may not
RESERVED_OPTIONS = frozenset({"method", "data", "model", "processor", "output_dir", "init_adapter", "resume",
                              "force", "max_steps", "max_seconds", "device", "threads"})  # fmt: skip
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}$")


@dataclass(frozen=True)
class JobSpec:
    """One fine-tuning job: the request (annotations, recipe, budget, chips) and the engine's model it trains."""

    id: str
    name: str
    annotations: str
    model: str
    recipe: str = "grpo"
    max_steps: int | None = None
    max_seconds: float | None = None
    gsd: float | None = None
    chip: int = 504
    init_adapter: str | None = None
    processor: str | None = None
    device: str = "auto"
    threads: int = 1
    eval_limit: int | None = None
    eval_max_new_tokens: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    device_note: str | None = None

    def __post_init__(self) -> None:
        from train import chips

        if self.recipe not in RECIPES:
            raise ConfigError(f"recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        if not NAME_PATTERN.match(self.name):
            raise ConfigError(
                f"name {self.name!r}: use 1 to 64 letters, digits, spaces, '.', '_' or '-', starting with a letter "
                "or digit"
            )
        if not Path(self.annotations).is_absolute():
            raise ConfigError(f"annotations must be an absolute path of a GeoPackage, got {self.annotations!r}")
        if self.max_steps is not None and (isinstance(self.max_steps, bool) or self.max_steps < 1):
            raise ConfigError(f"max_steps must be >= 1 (or null), got {self.max_steps!r}")
        if self.max_seconds is not None and not (math.isfinite(self.max_seconds) and self.max_seconds > 0):
            raise ConfigError(f"max_seconds must be > 0 (or null), got {self.max_seconds!r}")
        if self.gsd is not None and not (math.isfinite(self.gsd) and self.gsd > 0):
            raise ConfigError(f"gsd must be a ground resolution in metres > 0 (or null), got {self.gsd!r}")
        chips.check_chip_size(self.chip, "chip")
        if self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        for name in ("eval_limit", "eval_max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 (or null), got {value}")
        from train.config import FIELD_NAMES

        for key in self.options:
            if key in RESERVED_OPTIONS:
                raise ConfigError(f"options.{key} is set by the job itself; use the request's own field instead")
            if key not in FIELD_NAMES:
                raise ConfigError(f"options.{key} is not a training option; see 'geo-r1 train grpo --help'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
