"""geo_r1_qgis/core/run_spec.py: one run description, checked once, for the CLI, the panel and Processing."""

import pytest

from geo_r1_qgis.core.errors import ConfigError
from geo_r1_qgis.core.geometry import PixelBox
from geo_r1_qgis.core.pipeline import GroundingJob
from geo_r1_qgis.core.run_spec import RunSpec, spec_values


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"expression": " "}, "expression is empty"),
        ({"mode": "some"}, "mode must be one of"),
        ({"tile_size": 20}, "at least 28 pixels"),
        ({"overlap": 600}, "overlap"),
        ({"batch_size": 65}, "batch_size must be within 1..64"),
        ({"max_new_tokens": 5000}, "max_new_tokens must be within 1..4096"),
        ({"top_k": 0}, "top_k"),
        ({"min_score": 2.0}, "min_score"),
        ({"gsd": 0.0}, "gsd"),
    ],
)
def test_one_place_checks_every_run(kwargs, message):
    base = {"expression": "tanks", **kwargs}
    with pytest.raises(ConfigError, match=message):
        RunSpec(**base)
    job_kwargs = {k: v for k, v in base.items() if k != "gsd"}
    if "gsd" not in kwargs:  # the pipeline's job checks the same values with the same words
        with pytest.raises(ConfigError, match=message):
            GroundingJob(**job_kwargs)


def test_the_job_carries_every_run_value():
    spec = RunSpec(expression=" all tanks ", mode="one", tile_size=224, overlap=32, batch_size=2, max_new_tokens=96,
                   reasoning=False, coarse_to_fine=False, top_k=2, min_score=0.25)  # fmt: skip
    job = spec.job(scale=2.0, window=PixelBox(0, 0, 100, 100))
    assert (job.expression, job.mode, job.tile_size, job.overlap, job.batch_size, job.max_new_tokens) == (
        "all tanks",
        "one",
        224,
        32,
        2,
        96,
    )
    assert (job.reasoning, job.coarse_to_fine, job.top_k, job.min_score, job.scale) == (False, False, 2, 0.25, 2.0)
    assert job.window == PixelBox(0, 0, 100, 100)


def test_recorded_parameters_rebuild_the_spec_old_files_included():
    spec = RunSpec(expression="all tanks", gsd=0.5, tile_size=224, overlap=32, bands=(3, 2, 1),
                   bbox=(1.0, 2.0, 3.0, 4.0), max_new_tokens=96, top_k=2)  # fmt: skip
    recorded = spec.run_parameters("/data/r.tif", (3, 2, 1), 2.0)
    assert recorded["tile"] == 224 and "tile_size" not in recorded  # the GeoPackage's key, unchanged
    assert RunSpec(**spec_values(recorded)) == spec
    # a record written before batch_size/bands were options, with lists as JSON gives them back
    old = {"raster": "/r.tif", "expression": "x", "mode": "all", "gsd": None, "tile": 504, "overlap": 64,
           "bbox": [0, 0, 10, 10], "dst_crs": None, "max_new_tokens": None, "scale": 1.0}  # fmt: skip
    assert RunSpec(**spec_values(old)) == RunSpec(expression="x", tile_size=504, bbox=(0.0, 0.0, 10.0, 10.0))


def test_no_tile_size_means_the_tile_the_engines_model_serves():
    from geo_r1_qgis.core.geometry import DEFAULT_TILE

    spec = RunSpec(expression="all storage tanks")
    assert spec.tile_size is None and spec.tile == DEFAULT_TILE  # before the engine answers
    assert spec.with_engine_tile({"tile": 224}).tile_size == 224
    assert spec.with_engine_tile({"tile": 224}).job().tile_size == 224
    assert spec.with_engine_tile({"tile": 224}).run_parameters("/r.tif", (1, 2, 3))["tile"] == 224
    # a model without a manifest, a remote engine (None), or nonsense: the default
    for info in ({}, {"tile": None}, {"tile": True}, {"tile": "224"}, {"tile": 10}, None):
        assert spec.with_engine_tile(info).tile_size == DEFAULT_TILE, info
    # a tile the user chose is kept
    assert RunSpec(expression="x", tile_size=448).with_engine_tile({"tile": 224}).tile_size == 448
