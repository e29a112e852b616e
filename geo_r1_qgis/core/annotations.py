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

The checks a user sees before fine-tuning (:func:`count_boxes`, :func:`check_boxes`: counts per
expression and split, too few train shots, no held-out boxes, boxes too small at the working ground
resolution or outside their raster, a raster that is gone) are here too, on plain values, so the
plugin's annotation dock and any later caller give the same verdict.

Pure: the standard library only (no QGIS, no GDAL), so it is tested without QGIS.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
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
    "AnnotatedBox",
    "Annotation",
    "Issue",
    "RasterFrame",
    "check_boxes",
    "count_boxes",
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


# --------------------------------------------------------------------------------------------------
# Checks before fine-tuning (the annotation dock shows them; pure, on plain values)
# --------------------------------------------------------------------------------------------------

#: Geo-R1's few-shot recipe trains on 1, 5 or 10 labelled examples per expression (GEO-R1.md).
SHOT_CHOICES: tuple[int, ...] = (1, 5, 10)
#: fewer train boxes than this for an expression is warned about: 5 is the recipe's middle setting, and
#: 1-shot runs are the paper's hardest; below it a fine-tuned model is mostly noise on held-out boxes
RECOMMENDED_SHOTS = 5
#: a box narrower or lower than this many pixels at the working ground resolution is warned about: the
#: model sees too little of the object (and the box's own edges are a large share of it)
MIN_BOX_PIXELS = 4.0

ERROR, WARNING = "error", "warning"
#: issue codes
NO_ANNOTATIONS, NO_TRAIN, FEW_SHOTS, NO_HELD_OUT = "no_annotations", "no_train", "few_shots", "no_held_out"
TOO_SMALL, OUTSIDE, PARTLY_OUTSIDE, RASTER_MISSING = "too_small", "outside", "partly_outside", "raster_missing"
RASTER_NOT_LOADED = "raster_not_loaded"

Bounds = tuple[float, float, float, float]


@dataclass(frozen=True)
class RasterFrame:
    """What the checks need of a raster: its bounds and pixel size at the working ground resolution, in its CRS."""

    bounds: Bounds
    pixel_width: float
    pixel_height: float
    #: whether the raster is loaded in the QGIS project (False: the file exists but is not on the map)
    loaded: bool = True

    def __post_init__(self) -> None:
        x1, y1, x2, y2 = self.bounds
        if not all(math.isfinite(v) for v in self.bounds) or not (x1 < x2 and y1 < y2):
            raise ConfigError(f"a raster's bounds must be finite with x1 < x2 and y1 < y2, got {self.bounds!r}")
        for name in ("pixel_width", "pixel_height"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"a raster's {name} must be > 0 (CRS units per pixel), got {v!r}")


@dataclass(frozen=True)
class AnnotatedBox:
    """One annotation feature as the checks see it: its id, attributes and bounds in its raster's CRS.

    ``raster`` is None when the raster it names cannot be found (no such file, no such layer).
    """

    fid: int
    annotation: Annotation
    bounds: Bounds
    raster: RasterFrame | None

    def pixel_size(self) -> tuple[float, float] | None:
        """``(width, height)`` in pixels at the working ground resolution (None without its raster)."""
        if self.raster is None:
            return None
        x1, y1, x2, y2 = self.bounds
        return (x2 - x1) / self.raster.pixel_width, (y2 - y1) / self.raster.pixel_height

    def inside(self) -> str:
        """``"inside"``, ``"partly"`` or ``"outside"`` its raster (``"unknown"`` without it)."""
        if self.raster is None:
            return "unknown"
        x1, y1, x2, y2 = self.bounds
        r1, s1, r2, s2 = self.raster.bounds
        if x2 <= r1 or x1 >= r2 or y2 <= s1 or y1 >= s2:
            return "outside"
        if x1 >= r1 and x2 <= r2 and y1 >= s1 and y2 <= s2:
            return "inside"
        return "partly"


@dataclass(frozen=True)
class Issue:
    """One finding of :func:`check_boxes`: ``level`` :data:`ERROR` (the build would fail or skip the box) or
    :data:`WARNING` (it runs, but the result suffers), a ``code``, and the plain message shown to the user."""

    level: str
    code: str
    message: str
    expression: str = ""
    fids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.level not in (ERROR, WARNING):
            raise ConfigError(f"an issue's level is {ERROR!r} or {WARNING!r}, got {self.level!r}")


def count_boxes(annotations: Iterable[Annotation]) -> dict[str, dict[str, int]]:
    """``{expression: {split: positive boxes}}`` with every split present, expressions in first-seen order;
    negative areas are counted under the extra key ``"negative"`` (they are not shots)."""
    out: dict[str, dict[str, int]] = {}
    for a in annotations:
        row = out.setdefault(a.expression, {**dict.fromkeys(SPLITS, 0), "negative": 0})
        row["negative" if a.negative else a.split] += 1
    return out


def _fids(boxes: Iterable[AnnotatedBox]) -> tuple[int, ...]:
    return tuple(sorted(b.fid for b in boxes))


def _some(fids: tuple[int, ...], n: int = 5) -> str:
    head = ", ".join(str(f) for f in fids[:n])
    return head + (f" and {len(fids) - n} more" if len(fids) > n else "")


def check_boxes(
    boxes: Sequence[AnnotatedBox],
    min_shots: int = RECOMMENDED_SHOTS,
    min_pixels: float = MIN_BOX_PIXELS,
) -> tuple[Issue, ...]:
    """What stands between these annotations and a useful fine-tuning, errors first, each said plainly.

    Per expression: no train box (error), fewer than ``min_shots`` (warning: Geo-R1's recipe uses 1, 5 or 10;
    see :data:`RECOMMENDED_SHOTS`), no val and no test box (warning: the evaluation after fine-tuning needs
    held-out boxes). Per box: its raster gone (error), its raster not loaded in QGIS (warning), outside its
    raster (error: the build skips it), partly outside (warning: clipped), narrower or lower than
    ``min_pixels`` at the working ground resolution (warning; negative areas are not checked for size).
    """
    if isinstance(min_shots, bool) or not isinstance(min_shots, int) or min_shots < 1:
        raise ConfigError(f"min_shots must be a whole number >= 1, got {min_shots!r}")
    if not (isinstance(min_pixels, (int, float)) and math.isfinite(min_pixels) and min_pixels >= 0):
        raise ConfigError(f"min_pixels must be a number of pixels >= 0, got {min_pixels!r}")
    if not boxes:
        return (Issue(ERROR, NO_ANNOTATIONS, "There are no annotations yet: draw boxes around a few objects on the "
                      "raster (or import a polygon layer)"),)  # fmt: skip
    errors: list[Issue] = []
    warnings: list[Issue] = []
    missing: dict[str, list[AnnotatedBox]] = {}
    unloaded: dict[str, list[AnnotatedBox]] = {}
    outside: list[AnnotatedBox] = []
    partly: list[AnnotatedBox] = []
    small: list[AnnotatedBox] = []
    for b in boxes:
        if b.raster is None:
            missing.setdefault(b.annotation.raster, []).append(b)
            continue
        if not b.raster.loaded:
            unloaded.setdefault(b.annotation.raster, []).append(b)
        where = b.inside()
        if where == "outside":
            outside.append(b)
            continue
        if where == "partly":
            partly.append(b)
        size = b.pixel_size()
        if not b.annotation.negative and size is not None and min(size) < min_pixels:
            small.append(b)
    for raster, group in missing.items():
        fids = _fids(group)
        errors.append(Issue(ERROR, RASTER_MISSING, f"The raster {raster} of {len(fids)} annotation(s) (features "
                            f"{_some(fids)}) no longer exists: put the file back where it was, or delete these "
                            "annotations", fids=fids))  # fmt: skip
    if outside:
        fids = _fids(outside)
        errors.append(Issue(ERROR, OUTSIDE, f"{len(fids)} box(es) lie outside their raster (features {_some(fids)}); "
                            "the dataset build skips them: delete them, or check the raster they name",
                            fids=fids))  # fmt: skip
    counts = count_boxes(b.annotation for b in boxes)
    for expression, row in counts.items():
        train, held_out = row["train"], row["val"] + row["test"]
        if train == 0:
            errors.append(Issue(ERROR, NO_TRAIN, f"{expression!r} has no train box: fine-tuning learns from train "
                                f"boxes; mark at least {min_shots} boxes of it as train", expression))  # fmt: skip
        elif train < min_shots:
            warnings.append(Issue(WARNING, FEW_SHOTS, f"{expression!r} has {train} train box(es); Geo-R1's few-shot "
                                  f"recipe uses {', '.join(map(str, SHOT_CHOICES))} per expression and "
                                  f"{min_shots} or more is recommended: draw {min_shots - train} more",
                                  expression))  # fmt: skip
        if held_out == 0:
            warnings.append(Issue(WARNING, NO_HELD_OUT, f"{expression!r} has no val or test box: the evaluation "
                                  "after fine-tuning needs held-out boxes: mark a few as val or test",
                                  expression))  # fmt: skip
    for raster, group in unloaded.items():
        fids = _fids(group)
        warnings.append(Issue(WARNING, RASTER_NOT_LOADED, f"The raster {raster} of {len(fids)} annotation(s) is not "
                              "loaded in QGIS (the file is still there, so the build can read it); add it to the "
                              "project to see its boxes on it", fids=fids))  # fmt: skip
    if partly:
        fids = _fids(partly)
        warnings.append(Issue(WARNING, PARTLY_OUTSIDE, f"{len(fids)} box(es) reach beyond their raster's edge "
                              f"(features {_some(fids)}); the build clips them to the raster", fids=fids))  # fmt: skip
    if small:
        fids = _fids(small)
        warnings.append(Issue(WARNING, TOO_SMALL, f"{len(fids)} box(es) are smaller than {min_pixels:g} pixels on a "
                              f"side at the working ground resolution (features {_some(fids)}): the model can hardly "
                              "see them; redraw them larger, or choose a finer ground resolution",
                              fids=fids))  # fmt: skip
    return tuple(errors + warnings)
