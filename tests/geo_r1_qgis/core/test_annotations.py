"""Tests of geo_r1_qgis/core/annotations.py (pure: standard library and numpy only)."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pytest

from geo_r1_qgis.core.annotations import (
    ERROR,
    FEW_SHOTS,
    FIELD_NAMES,
    FIELDS,
    GEOMETRY_TYPE,
    LAYER_NAME,
    MIN_BOX_PIXELS,
    NO_ANNOTATIONS,
    NO_HELD_OUT,
    NO_TRAIN,
    OUTSIDE,
    PARTLY_OUTSIDE,
    RASTER_MISSING,
    RASTER_NOT_LOADED,
    RECOMMENDED_SHOTS,
    SPLITS,
    TOO_SMALL,
    WARNING,
    AnnotatedBox,
    Annotation,
    Issue,
    RasterFrame,
    check_boxes,
    count_boxes,
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


# --------------------------------------------------------------------------------------------------
# counts and checks before fine-tuning (the annotation dock's check())
# --------------------------------------------------------------------------------------------------


#: a 100 x 100 pixel raster of 0.5 m pixels
FRAME = RasterFrame((1000.0, 2000.0, 1050.0, 2050.0), 0.5, 0.5)


def _box(fid, expression="tank", split="train", bounds=(1010.0, 2010.0, 1015.0, 2015.0), frame=FRAME, **kw):
    return AnnotatedBox(fid, Annotation(expression=expression, raster="/r.tif", split=split, **kw), bounds, frame)


def _codes(issues):
    return [i.code for i in issues]


def test_count_boxes_per_expression_and_split():
    anns = [b.annotation for b in (_box(1), _box(2), _box(3, split="val"), _box(4, "ship", split="test"),
                                   _box(5, negative=True))]  # fmt: skip
    counts = count_boxes(anns)
    assert list(counts) == ["tank", "ship"]
    assert counts["tank"] == {"train": 2, "val": 1, "test": 0, "negative": 1}
    assert counts["ship"] == {"train": 0, "val": 0, "test": 1, "negative": 0}
    assert count_boxes([]) == {}


def test_a_good_set_has_no_issue():
    boxes = [_box(i) for i in range(RECOMMENDED_SHOTS)] + [_box(9, split="val"), _box(10, split="test")]
    assert check_boxes(boxes) == ()


def test_no_annotations_is_an_error():
    (issue,) = check_boxes([])
    assert issue.level == ERROR and issue.code == NO_ANNOTATIONS and "draw boxes" in issue.message


def test_few_shots_and_no_held_out_are_warned_per_expression():
    issues = check_boxes([_box(1), _box(2), _box(3, "ship", split="val")])
    by = {(i.code, i.expression): i for i in issues}
    few = by[(FEW_SHOTS, "tank")]
    assert few.level == WARNING and "2 train box(es)" in few.message and "1, 5, 10" in few.message
    assert "draw 3 more" in few.message
    held = by[(NO_HELD_OUT, "tank")]
    assert "needs held-out boxes: mark a few as val or test" in held.message
    assert by[(NO_TRAIN, "ship")].level == ERROR
    assert (NO_HELD_OUT, "ship") not in by
    assert [i.level for i in issues] == sorted((i.level for i in issues), key=[ERROR, WARNING].index)  # errors first
    assert _codes(check_boxes([_box(1), _box(2, split="val")], min_shots=1)) == []


def test_boxes_too_small_outside_or_partly_outside():
    shots = [_box(i) for i in range(10, 15)] + [_box(20, split="val")]
    small = _box(1, bounds=(1010.0, 2010.0, 1011.9, 2020.0))  # 3.8 x 20 px
    just = _box(2, bounds=(1010.0, 2010.0, 1012.0, 2012.0))  # 4 x 4 px: not too small
    tiny_negative = _box(3, bounds=(1010.0, 2010.0, 1010.5, 2010.5), negative=True)
    out = _box(4, bounds=(900.0, 1900.0, 910.0, 1910.0))
    edge = _box(5, bounds=(1045.0, 2045.0, 1060.0, 2060.0))
    issues = check_boxes([*shots, small, just, tiny_negative, out, edge])
    by = {i.code: i for i in issues}
    assert set(by) == {TOO_SMALL, OUTSIDE, PARTLY_OUTSIDE}
    assert by[TOO_SMALL].fids == (1,) and f"{MIN_BOX_PIXELS:g} pixels" in by[TOO_SMALL].message
    assert by[OUTSIDE].fids == (4,) and by[OUTSIDE].level == ERROR and "skips them" in by[OUTSIDE].message
    assert by[PARTLY_OUTSIDE].fids == (5,) and by[PARTLY_OUTSIDE].level == WARNING
    assert small.pixel_size() == pytest.approx((3.8, 20.0))
    assert (just.inside(), out.inside(), edge.inside()) == ("inside", "outside", "partly")
    coarse = RasterFrame(FRAME.bounds, 1.0, 1.0)  # at 1 m the 4 x 4 px box is 2 x 2 px
    assert check_boxes([*shots, _box(2, bounds=just.bounds, frame=coarse)])[0].code == TOO_SMALL


def test_a_missing_or_unloaded_raster():
    shots = [_box(i) for i in range(5)] + [_box(9, split="val")]
    gone = _box(7, frame=None)
    unloaded = _box(8, frame=RasterFrame(FRAME.bounds, 0.5, 0.5, loaded=False))
    issues = check_boxes([*shots, gone, unloaded])
    by = {i.code: i for i in issues}
    assert by[RASTER_MISSING].level == ERROR and by[RASTER_MISSING].fids == (7,)
    assert "/r.tif" in by[RASTER_MISSING].message and "no longer exists" in by[RASTER_MISSING].message
    assert by[RASTER_NOT_LOADED].level == WARNING and by[RASTER_NOT_LOADED].fids == (8,)
    assert gone.pixel_size() is None and gone.inside() == "unknown"


def test_bad_values_are_refused():
    with pytest.raises(ConfigError, match="bounds"):
        RasterFrame((0.0, 0.0, 0.0, 1.0), 1.0, 1.0)
    with pytest.raises(ConfigError, match="pixel_width"):
        RasterFrame((0.0, 0.0, 1.0, 1.0), 0.0, 1.0)
    with pytest.raises(ConfigError, match="level"):
        Issue("fatal", "x", "y")
    with pytest.raises(ConfigError, match="min_shots"):
        check_boxes([_box(1)], min_shots=0)
