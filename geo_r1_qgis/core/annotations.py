"""The annotation layer: boxes drawn on a raster to fine-tune Geo-R1, defined once.

An annotation is a polygon drawn around one object (or, with ``negative`` set, around an area that
holds *no* object of the expression), in the CRS of the raster it was drawn on, with a referring
expression. The plugin's annotation tool and the command line (``geo-r1 dataset import``, which
writes it; ``geo-r1 dataset build``, which reads it) share this definition:

* layer :data:`LAYER_NAME` in a GeoPackage, geometry type :data:`GEOMETRY_TYPE`, in the raster's CRS;
* fields :data:`FIELDS`, as plain ``(name, type, required, help)`` tuples, with ``type`` one of
  ``"str"`` and ``"bool"``, so a QGIS writer (``QgsField(name, QVariant.String / QVariant.Bool)``)
  or an OGR writer (``OFTString``; ``OFTInteger`` with the ``OFSTBoolean`` subtype) builds them;
* one feature's values as :class:`Annotation`, a frozen dataclass that checks itself, turned to and
  from a plain attribute dict with :meth:`Annotation.to_attributes` / :meth:`Annotation.from_attributes`.

Pure: the standard library only (no QGIS, no GDAL), so it is tested without QGIS.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .errors import ConfigError

__all__ = [
    "FIELDS",
    "FIELD_NAMES",
    "GEOMETRY_TYPE",
    "LAYER_NAME",
    "SPLITS",
    "Annotation",
    "parse_bool",
]

#: The layer's name inside the GeoPackage.
LAYER_NAME = "geo_r1_annotations"
#: Its geometry type (OGR / QGIS name); the geometry is in the CRS of the annotated raster.
GEOMETRY_TYPE = "Polygon"
#: The dataset splits an annotation may belong to.
SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_SPLIT = "train"

#: ``(name, type, required, help)`` of every field, in order; ``type`` is ``"str"`` or ``"bool"``.
FIELDS: tuple[tuple[str, str, bool, str], ...] = (
    ("expression", "str", True, "the referring expression that names the object, e.g. 'storage tank'"),
    ("category", "str", False, "the object's class; empty means the expression"),
    ("raster", "str", True, "the annotated raster: a file path or a GDAL/QGIS source string"),
    ("split", "str", False, "train, val or test (default train)"),
    ("is_unique", "bool", False, "whether the expression names a unique object; empty: unknown"),
    ("negative", "bool", False, "true: the polygon holds no object of the expression"),
    ("created", "str", False, "when it was drawn, ISO 8601 (UTC)"),
)
FIELD_NAMES: tuple[str, ...] = tuple(f[0] for f in FIELDS)

_TRUE = {"1", "true", "t", "yes", "y"}
_FALSE = {"0", "false", "f", "no", "n"}


def _now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def parse_bool(value: Any, name: str, allow_null: bool = True) -> bool | None:
    """A field value as a bool: bools, 0/1, NaN/None (null), and 'true'/'false'/'yes'/'no' strings."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        if allow_null:
            return None
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if not text and allow_null:
            return None
        if text in _TRUE:
            return True
        if text in _FALSE or not text:
            return False
    item = getattr(value, "item", None)  # numpy scalars, without importing numpy
    if callable(item) and not isinstance(value, (str, bytes)) and getattr(value, "ndim", None) == 0:
        return parse_bool(item(), name, allow_null)
    raise ConfigError(f"the annotation field {name!r} must be true or false (or 1/0), got {value!r}")


@dataclass(frozen=True)
class Annotation:
    """One annotation's attributes (the polygon itself is kept by the layer that holds the feature)."""

    expression: str = field(metadata={"help": FIELDS[0][3]})
    raster: str = field(metadata={"help": FIELDS[2][3]})
    category: str = field(default="", metadata={"help": FIELDS[1][3]})
    split: str = field(default=DEFAULT_SPLIT, metadata={"help": FIELDS[3][3]})
    is_unique: bool | None = field(default=None, metadata={"help": FIELDS[4][3]})
    negative: bool = field(default=False, metadata={"help": FIELDS[5][3]})
    created: str = field(default_factory=_now_iso, metadata={"help": FIELDS[6][3]})

    def __post_init__(self) -> None:
        for name in ("expression", "raster", "category", "split", "created"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ConfigError(f"the annotation field {name!r} must be text, got {value!r}")
            object.__setattr__(self, name, value.strip())
        if not self.expression:
            raise ConfigError(
                "an annotation needs an expression (what the polygon shows, e.g. 'storage tank'); it is empty"
            )
        if "\n" in self.expression or len(self.expression) > 500:
            raise ConfigError(f"the expression {self.expression[:60]!r}... must be one line of at most 500 characters")
        if not self.raster:
            raise ConfigError(
                f"the annotation {self.expression!r} does not say which raster it was drawn on (field 'raster' "
                "is empty); set it to the raster's path"
            )
        if not self.category:
            object.__setattr__(self, "category", self.expression)
        split = self.split.lower() or DEFAULT_SPLIT
        if split not in SPLITS:
            raise ConfigError(
                f"the annotation {self.expression!r} has split {self.split!r}; use one of {', '.join(SPLITS)}"
            )
        object.__setattr__(self, "split", split)
        if self.is_unique is not None and not isinstance(self.is_unique, bool):
            raise ConfigError(f"is_unique must be true, false or empty (None), got {self.is_unique!r}")
        if not isinstance(self.negative, bool):
            raise ConfigError(f"negative must be true or false, got {self.negative!r}")
        if self.negative and self.is_unique:
            raise ConfigError(
                f"the negative annotation {self.expression!r} (an area with no such object) cannot be is_unique"
            )
        if not self.created:
            object.__setattr__(self, "created", _now_iso())
        try:
            datetime.fromisoformat(self.created.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(
                f"the annotation field 'created' must be an ISO 8601 date and time, e.g. 2025-01-31T12:00:00+00:00, "
                f"got {self.created!r}"
            ) from None

    def to_attributes(self) -> dict[str, Any]:
        """The field values, keyed and ordered as :data:`FIELD_NAMES` (``is_unique`` may be ``None``)."""
        return {name: getattr(self, name) for name in FIELD_NAMES}

    @classmethod
    def from_attributes(cls, values: Mapping[str, Any], where: str = "") -> Annotation:
        """An annotation from a feature's attribute dict (extra keys are ignored).

        Missing optional fields take their defaults; nulls (``None``, NaN) count as missing; booleans
        may be stored as 0/1. ``where`` (e.g. ``"feature 12 of ann.gpkg"``) prefixes error messages.
        """

        def text(name: str) -> str:
            v = values.get(name)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                return ""
            return str(v)

        try:
            return cls(
                expression=text("expression"),
                raster=text("raster"),
                category=text("category"),
                split=text("split"),
                is_unique=parse_bool(values.get("is_unique"), "is_unique"),
                negative=bool(parse_bool(values.get("negative"), "negative", allow_null=False)),
                created=text("created"),
            )
        except ConfigError as exc:
            if where:
                raise ConfigError(f"{where}: {exc}") from None
            raise
