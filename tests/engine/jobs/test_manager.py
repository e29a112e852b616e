"""engine/jobs/manager.py and runner.py without training: job folders an earlier engine left, the copy of a
GeoPackage being edited, the causes in words. (tests/engine/server/test_jobs.py runs real jobs.)"""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from engine.jobs.files import JobPaths, write_json
from engine.jobs.manager import (
    JobConflictError,
    JobManager,
    JobNotFoundError,
    default_name,
    device_note,
    job_threads,
)
from engine.jobs.runner import copy_geopackage, describe_error
from engine.jobs.spec import JobSpec
from geo_r1_qgis.core.errors import ConfigError


def _job(jobs_dir, job_id, created, state, pid=None):
    paths = JobPaths(jobs_dir / job_id)
    paths.root.mkdir(parents=True)
    spec = JobSpec(id=job_id, name=f"n-{job_id}", annotations="/a.gpkg", model="m", created=created)
    write_json(paths.spec, spec.to_dict())
    write_json(paths.state, state)
    if pid is not None:
        paths.pid.write_text(f"{pid}\n")
    return paths


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_job_whose_process_is_gone_is_failed_and_listed_newest_first(tmp_path):
    _job(tmp_path, "old", "2026-01-01T00:00:00+00:00", {"state": "done", "started": "2026-01-01T00:00:01+00:00",
                                                        "ended": "2026-01-01T00:01:01+00:00"})  # fmt: skip
    gone = _job(tmp_path, "gone", "2026-01-02T00:00:00+00:00", {"state": "training"}, pid=_dead_pid())
    (gone.checkpoints / "checkpoint-4").mkdir(parents=True)
    (tmp_path / "not-a-job").mkdir()
    manager = JobManager(tmp_path, "m")
    jobs = manager.list()
    assert [j["id"] for j in jobs] == ["gone", "old"]
    assert jobs[1]["state"] == "done" and jobs[1]["elapsed_s"] == 60.0
    record = manager.record("gone")
    assert record["state"] == "failed" and record["ended"]
    assert record["error"].startswith("the training process ended without a result (killed?)")
    assert "POST /jobs/gone/resume" in record["error"] and record["resumable"] is True
    assert gone.read_state()["state"] == "failed"  # written, so the next engine reads the same
    assert record["curves"]["step"] == [] and record["log_tail"] == []


def test_cancel_of_an_ended_job_and_unknown_ids(tmp_path):
    _job(tmp_path, "done1", "2026-01-01T00:00:00+00:00", {"state": "done"})
    manager = JobManager(tmp_path, "m")
    with pytest.raises(JobConflictError, match="already ended"):
        manager.cancel("done1")
    for bad in ("nope", "../done1", ".hidden", ""):
        with pytest.raises(JobNotFoundError, match="GET /jobs lists them"):
            manager.record(bad)
    assert JobManager(tmp_path / "absent", "m").list() == []


def test_the_remote_backend_cannot_train(tmp_path):
    manager = JobManager(tmp_path, None)
    manager.start_probe()
    assert "--backend local" in manager.training_error()


def test_default_names_are_valid_names():
    assert default_name("/data/tanks.gpkg", "grpo") == "tanks-grpo"
    assert default_name("/data/Réservoirs (2024).gpkg", "sft") == "R_servoirs _2024-sft"
    assert default_name("/data/(((.gpkg", "dapo") == "job-dapo"
    for name in (default_name("/d/Réservoirs (2024).gpkg", "sft"), default_name("/d/" + "x" * 90 + ".gpkg", "grpo")):
        JobSpec(id="j", name=name, annotations="/a.gpkg", model="m")  # a valid name: no ConfigError


def test_the_job_shares_the_machine():
    assert job_threads(2) == 1 and job_threads(16) == 8 and job_threads(1) == 1
    assert device_note("cpu", 1, 2) == ("training shares the CPU with grounding: it uses 1 of 2 cores, so grounding "
                                        "keeps answering, more slowly")  # fmt: skip
    assert device_note("cuda:0", 1).startswith("training shares the GPU (cuda:0)")


def test_the_copy_of_a_geopackage_holds_what_its_wal_holds(tmp_path):
    src = tmp_path / "ann.gpkg"
    con = sqlite3.connect(src)  # QGIS keeps GeoPackages in WAL mode: committed rows may live in ann.gpkg-wal
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA wal_autocheckpoint=0")
    con.execute("CREATE TABLE t (x)")
    con.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(50)])
    con.commit()
    assert (tmp_path / "ann.gpkg-wal").stat().st_size > 0
    sha = copy_geopackage(src, tmp_path / "copy.gpkg")
    con.close()
    copy = sqlite3.connect(tmp_path / "copy.gpkg")
    assert copy.execute("SELECT count(*) FROM t").fetchone() == (50,)
    assert copy.execute("PRAGMA journal_mode").fetchone() == ("delete",)  # one self-contained file
    copy.close()
    import hashlib

    assert sha == hashlib.sha256((tmp_path / "copy.gpkg").read_bytes()).hexdigest()
    (tmp_path / "text.gpkg").write_text("not sqlite")
    with pytest.raises(ConfigError, match="cannot copy the annotation file"):
        copy_geopackage(tmp_path / "text.gpkg", tmp_path / "c2.gpkg")


def test_causes_in_words():
    assert describe_error(MemoryError("x")).startswith("out of memory: MemoryError")
    assert describe_error(ConfigError("mark more boxes val")) == "mark more boxes val"
    assert describe_error(KeyError("k")) == "KeyError: 'k' (a bug? see job.log)"
