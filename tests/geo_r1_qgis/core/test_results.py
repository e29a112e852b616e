"""Output fields, run ids and the 8-bit stretch shared by both readers and writers."""

import re
from datetime import datetime, timezone

import numpy as np
import pytest

from geo_r1_qgis.core.results import OUTPUT_FIELDS, make_run_id, stretch_limits, to_uint8


def test_fields_are_unique_and_carry_the_reasoning_and_provenance():
    assert len(set(OUTPUT_FIELDS)) == len(OUTPUT_FIELDS)
    for name in ("expression", "mode", "score", "presence", "label", "reasoning", "model", "adapter",
                 "prompt_version", "tile_id", "run_id", "created"):
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
