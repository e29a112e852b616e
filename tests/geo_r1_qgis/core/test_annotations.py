"""Tests of geo_r1_qgis/core/annotations.py (pure: standard library and numpy only)."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pytest

from geo_r1_qgis.core.annotations import (
    FIELD_NAMES,
    FIELDS,
    GEOMETRY_TYPE,
    LAYER_NAME,
    SPLITS,
    Annotation,
    parse_bool,
)
from geo_r1_qgis.core.errors import ConfigError


def test_schema_is_plain_tuples():
    assert LAYER_NAME == "geo_r1_annotations"
    assert GEOMETRY_TYPE == "Polygon"
    assert SPLITS == ("train", "val", "test")
    assert FIELD_NAMES == ("expression", "category", "raster", "split", "is_unique", "negative", "created")
    for name, type_, required, help_ in FIELDS:
        assert isinstance(name, str) and type_ in ("str", "bool") and isinstance(required, bool) and help_
    types = {f[0]: f[1] for f in FIELDS}
    assert types["is_unique"] == types["negative"] == "bool"
    assert [f[0] for f in FIELDS if f[2]] == ["expression", "raster"]


def test_defaults_and_normalisation():
    a = Annotation(expression="  storage tank ", raster="/data/a.tif")
    assert a.expression == "storage tank"
    assert a.category == "storage tank"  # empty category -> the expression
    assert a.split == "train" and a.is_unique is None and a.negative is False
    created = datetime.fromisoformat(a.created)
    assert created.tzinfo is not None
    assert Annotation(expression="x", raster="r", split="VAL").split == "val"


def test_round_trip_through_attributes():
    a = Annotation(
        expression="the largest storage tank",
        raster="GPKG:/x/y.gpkg:layer",
        category="storage tank",
        split="test",
        is_unique=True,
        negative=False,
        created="2025-01-31T12:00:00+00:00",
    )
    attrs = a.to_attributes()
    assert list(attrs) == list(FIELD_NAMES)
    assert attrs["is_unique"] is True and attrs["negative"] is False
    assert Annotation.from_attributes(attrs) == a
    assert Annotation.from_attributes({**attrs, "fid": 3, "other": "ignored"}) == a


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (None, None),
        (float("nan"), None),
        ("", None),
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        (1.0, True),
        ("true", True),
        ("No", False),
        (np.bool_(True), True),
        (np.int64(0), False),
        (np.float64("nan"), None),
    ],
)
def test_parse_bool(stored, expected):
    assert parse_bool(stored, "is_unique") is expected


@pytest.mark.parametrize("bad", [2, "maybe", -1.5, [1]])
def test_parse_bool_rejects(bad):
    with pytest.raises(ConfigError, match="is_unique"):
        parse_bool(bad, "is_unique")


def test_from_attributes_as_a_gpkg_reader_gives_them():
    # pyogrio gives a nullable boolean as a float (NaN for null) and NaN for empty strings in some drivers.
    attrs = {
        "expression": "building",
        "category": None,
        "raster": "/a.tif",
        "split": None,
        "is_unique": float("nan"),
        "negative": 1,
        "created": "2025-02-01T00:00:00Z",
    }
    a = Annotation.from_attributes(attrs)
    assert a.category == "building" and a.split == "train" and a.is_unique is None and a.negative is True


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"expression": "", "raster": "/a.tif"}, "needs an expression"),
        ({"expression": "tank", "raster": ""}, "which raster"),
        ({"expression": "tank", "raster": "/a.tif", "split": "validation"}, "train, val, test"),
        ({"expression": "tank", "raster": "/a.tif", "created": "yesterday"}, "ISO 8601"),
        ({"expression": "tank", "raster": "/a.tif", "negative": True, "is_unique": True}, "cannot be is_unique"),
        ({"expression": "a\nb", "raster": "/a.tif"}, "one line"),
    ],
)
def test_invalid_annotations_explain(values, message):
    with pytest.raises(ConfigError, match=message):
        Annotation.from_attributes(values)


def test_where_prefixes_the_message():
    with pytest.raises(ConfigError, match=r"^feature 7 of ann.gpkg: .*needs an expression"):
        Annotation.from_attributes({"raster": "/a.tif"}, where="feature 7 of ann.gpkg")


def test_wrong_types_are_rejected():
    with pytest.raises(ConfigError, match="must be text"):
        Annotation(expression=3, raster="/a.tif")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="is_unique"):
        Annotation(expression="x", raster="/a.tif", is_unique="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="negative"):
        Annotation(expression="x", raster="/a.tif", negative=None)  # type: ignore[arg-type]


def test_frozen():
    a = Annotation(expression="x", raster="/a.tif")
    with pytest.raises(AttributeError):
        a.expression = "y"  # type: ignore[misc]
