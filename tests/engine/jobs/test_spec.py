"""engine/jobs/spec.py and files.py: a job's request checks itself; its files are written atomically."""

from __future__ import annotations

import pytest

from engine.jobs.files import ENDED, RUNNING, STATES, JobPaths, read_json, seconds_between, write_json
from engine.jobs.spec import JobSpec
from geo_r1_qgis.core.errors import ConfigError


def _spec(**kw):
    return JobSpec(**{"id": "j", "name": "tanks-grpo", "annotations": "/data/tanks.gpkg", "model": "m", **kw})


def test_a_spec_round_trips_through_its_dict():
    spec = _spec(max_steps=3, chip=112, options={"learning_rate": 5e-4})
    assert JobSpec.from_dict({**spec.to_dict(), "unknown later field": 1}) == spec


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"recipe": "ppo"}, "recipe must be one of sft, grpo, dapo"),
        ({"name": "../x"}, "name '../x'"),
        ({"annotations": "tanks.gpkg"}, "absolute path"),
        ({"max_steps": 0}, "max_steps must be >= 1"),
        ({"max_seconds": -1.0}, "max_seconds must be > 0"),
        ({"gsd": 0.0}, "gsd must be"),
        ({"chip": 100}, "chip must be a multiple of 28"),
        ({"eval_limit": 0}, "eval_limit must be >= 1"),
        ({"options": {"output_dir": "/tmp"}}, "options.output_dir is set by the job itself"),
        ({"options": {"lerning_rate": 1}}, "options.lerning_rate is not a training option"),
    ],
)
def test_a_bad_spec_says_what_to_change(kw, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        _spec(**kw)


def test_states_and_atomic_json(tmp_path):
    assert STATES[:4] == ("queued", "building", "training", "evaluating") and set(STATES) == RUNNING | ENDED
    paths = JobPaths(tmp_path / "job1")
    paths.root.mkdir()
    assert paths.read_state() == {} and paths.read_pid() is None and not paths.has_checkpoint()
    paths.update_state(state="building", started="2026-01-01T00:00:00+00:00")
    assert paths.update_state(state="training") == {"state": "training", "started": "2026-01-01T00:00:00+00:00"}
    assert [p.name for p in paths.root.iterdir()] == ["job.json"]  # no temporary file left behind
    paths.state.write_text("{torn")
    assert read_json(paths.state) is None and paths.read_state() == {}
    write_json(paths.spec, {"a": 1})
    assert read_json(paths.spec) == {"a": 1}
    (paths.checkpoints / "checkpoint-3").mkdir(parents=True)
    assert paths.has_checkpoint()
    assert seconds_between("2026-01-01T00:00:00+00:00", "2026-01-01T00:01:30+00:00") == 90.0
    assert seconds_between(None, None) is None
