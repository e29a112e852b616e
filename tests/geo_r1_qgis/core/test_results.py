"""Output fields, run ids and the 8-bit stretch shared by both readers and writers."""

import re
from datetime import datetime, timezone

import numpy as np
import pytest

from geo_r1_qgis.core.errors import ConfigError
from geo_r1_qgis.core.geometry import PixelBox
from geo_r1_qgis.core.merge import Detection
from geo_r1_qgis.core.results import (
    OUTPUT_FIELDS,
    choose_bands,
    detection_values,
    make_run_id,
    parse_bands,
    run_meta,
    stretch_limits,
    to_uint8,
)


def test_fields_are_unique_and_carry_the_reasoning_and_provenance():
    assert len(set(OUTPUT_FIELDS)) == len(OUTPUT_FIELDS)
    for name in (
        "expression",
        "mode",
        "score",
        "presence",
        "label",
        "reasoning",
        "model",
        "adapter",
        "prompt_version",
        "tile_id",
        "run_id",
        "created",
    ):
        assert name in OUTPUT_FIELDS


def test_run_ids_sort_by_time_and_differ():
    t = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    a, b = make_run_id(t), make_run_id(t)
    assert re.fullmatch(r"20260102T030405_[0-9a-f]{6}", a)
    assert a != b


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.arange(101, dtype=np.uint16), (2.0, 98.0)),
        (np.array([5.0] * 50), (5.0, 6.0)),
        (np.array([], dtype=np.float32), (0.0, 1.0)),
        (np.array([0.0] * 99 + [1000.0]), (0.0, 1000.0)),  # percentiles coincide: fall back to min/max
        (np.array([-1.5, 2.5]), (-1.42, 2.42)),
    ],
)
def test_stretch_limits(values, expected):
    lo, hi = stretch_limits(values)
    assert (lo, hi) == pytest.approx(expected)
    assert hi > lo


def test_to_uint8_maps_the_limits_to_0_and_255_and_clips():
    band = np.array([[-10.0, 0.0, 50.0], [100.0, 200.0, np.nan]])
    out = to_uint8(band, 0.0, 100.0)
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 0, 128], [255, 255, 0]]


@pytest.mark.parametrize(
    ("count", "interp", "requested", "expected"),
    [
        (3, ["blue", "green", "red"], None, (3, 2, 1)),  # by colour interpretation
        (4, ["red", "green", "blue", "undefined"], None, (1, 2, 3)),
        (4, ["gray", "gray", "gray", "gray"], None, (1, 2, 3)),  # NAIP-like: the first three
        (4, ["alpha", "gray", "gray", "gray"], None, (2, 3, 4)),  # alpha is never a colour
        (1, ["gray"], None, (1, 1, 1)),  # a single band is replicated
        (2, ["gray", "alpha"], None, (1, 1, 1)),
        (4, ["red", "green", "blue", "gray"], (4, 3, 2), (4, 3, 2)),  # requested bands win
        (4, ["gray"] * 4, (4,), (4, 4, 4)),
    ],
)
def test_choose_bands(count, interp, requested, expected):
    assert choose_bands(count, interp, requested) == expected


@pytest.mark.parametrize("requested", [(1, 2, 4), (0, 1, 2), (1, 2), (True, 2, 3)])
def test_choose_bands_rejects_what_the_raster_lacks(requested):
    with pytest.raises(ConfigError, match=r"--bands .* is not valid for a.tif, which has 3 band\(s\) numbered 1\.\.3"):
        choose_bands(3, ["gray"] * 3, requested, what="a.tif")


def test_parse_bands():
    assert parse_bands("4, 3,2") == (4, 3, 2) and parse_bands("4") == (4,)
    assert parse_bands(None) is None and parse_bands("  ") is None
    with pytest.raises(ConfigError, match=r"bands takes band numbers .* e\.g\. 1,2,3"):
        parse_bands("red,green", option="bands")
    with pytest.raises(ConfigError, match="three band numbers"):
        parse_bands("1,2")
    with pytest.raises(ConfigError, match="counted from 1"):
        parse_bands("0,1,2")


def test_run_meta_and_detection_values_fill_every_output_field():
    meta = run_meta("all tanks", "all", {"model": "m", "adapter": None, "prompt_version": "v1", "device": "cpu"})
    assert meta == {"expression": "all tanks", "mode": "all", "model": "m", "adapter": "", "prompt_version": "v1"}
    det = Detection(
        PixelBox(0, 0, 4, 4), score=0.5, presence=0.9, label="tank", reasoning="r", tile_id="r0c0", truncated=True
    )
    values = detection_values(det, meta, "run1", "2026-01-01")
    assert set(values) == set(OUTPUT_FIELDS)
    assert values["score"] == 0.5 and values["truncated"] == 1 and values["run_id"] == "run1"


def test_to_uint8_never_overflows_on_extreme_nodata_values():
    """Issue 8.10: a float raster's -3.4e38 nodata made the scaling overflow with a RuntimeWarning."""
    import warnings

    import numpy as np

    from geo_r1_qgis.core.results import to_uint8

    band = np.array([-3.4e38, 0.0, 5.0, 10.0, 3.4e38, np.nan], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = to_uint8(band, 0.0, 10.0)
    assert out.tolist() == [0, 0, 128, 255, 255, 0]


def test_palette_lut_and_apply():
    import numpy as np

    from geo_r1_qgis.core.results import apply_palette, palette_lut

    lut = palette_lut([(0, (0, 0, 0, 255)), (1, (255, 0, 0, 255)), (3, (10, 200, 30))], size=4)
    idx = np.array([[0, 1], [3, 9]])
    rgb = apply_palette(idx, lut)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[0, 1].tolist() == [255, 0, 0] and rgb[1, 0].tolist() == [10, 200, 30]
    assert rgb[1, 1].tolist() == [0, 0, 0]  # outside the table
