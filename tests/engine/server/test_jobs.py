"""``/jobs`` end to end: one real ``geo-r1 serve`` on the tiny format-trained model, real job processes.

An annotation GeoPackage is written with train/dataset.py's own writer from two sample scenes (the tanks of one
as train boxes, of the other as val boxes), chips of 112 pixels; every job trains a few GRPO steps of a small
LoRA. The jobs run one after another (two shared cores): a job to the end, one cancelled then resumed, one
killed with SIGKILL, the refusals, then a restart of the engine on the same --jobs-dir with trl hidden.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest
import shapely

from geo_r1_qgis.core.annotations import Annotation
from train.dataset import write_annotations
from train.sample_data import SampleDataConfig, write_samples

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _serve_helpers import CLEAN_EXIT, assert_error, serving, start_engine

pytestmark = pytest.mark.slow

CREATED = "2025-01-01T00:00:00+00:00"
#: a few tiny GRPO steps: 1 prompt x 4 completions of at most 32 tokens, a checkpoint at every step
FAST = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "num_generations": 4,
        "max_completion_length": 32, "lora_r": 8, "lora_alpha": 16, "save_steps": 1}  # fmt: skip
#: polls of GET /jobs/{id} (0.5 s apart) before a test gives up on a state: a hang guard, not a timing
POLLS = 600


def _scene(root: Path, seed: int) -> tuple[Path, list]:
    scene = root / f"scene{seed}"
    write_samples(SampleDataConfig(out_dir=scene, seed=seed, size=256))
    truth = json.loads((scene / "utm.objects.geojson").read_text())
    tanks = [shapely.Polygon(f["geometry"]["coordinates"][0]) for f in truth["features"]
             if f["properties"]["category"] == "tank"]  # fmt: skip
    return scene / "utm.tif", tanks


def _annotations(path: Path, boxes: list[tuple[Path | str, str, object]]) -> Path:
    items = [(Annotation(expression="storage tank", raster=str(r), split=s, created=CREATED), g) for r, s, g in boxes]
    write_annotations(path, items, "EPSG:32614")
    return path


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    return _scene(root, 3), _scene(root, 4)


@pytest.fixture(scope="module")
def annotations(scenes):
    (train_tif, train_tanks), (val_tif, val_tanks) = scenes
    boxes = [(train_tif, "train", g) for g in train_tanks] + [(val_tif, "val", g) for g in val_tanks]
    return _annotations(train_tif.parent.parent / "tanks.gpkg", boxes)


@pytest.fixture(scope="module")
def jobs_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("jobs")
    yield path
    for pid_file in path.glob("*/pid"):  # a job process outlives its engine: end what these tests started
        pid = int(pid_file.read_text())
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"engine.jobs.runner" in cmdline and str(pid_file.parent).encode() in cmdline:
            os.killpg(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def engine(tiny_format_model_dir, jobs_dir, tmp_path_factory):
    args = ["--model", str(tiny_format_model_dir), "--threads", "1", "--jobs-dir", str(jobs_dir)]
    yield from serving(tmp_path_factory.mktemp("engine"), args)


@pytest.fixture
def api(engine):
    with engine.client() as client:
        yield client


def _post(api, annotations, **body):
    return api.post("/jobs", json={"annotations": str(annotations), "recipe": "grpo", "chip": 112,
                                   "eval_max_new_tokens": 32, "options": FAST, **body})  # fmt: skip


def _wait(api, job_id, until):
    for _ in range(POLLS):
        record = api.get(f"/jobs/{job_id}").json()
        if until(record):
            return record
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} never got there: {json.dumps(record)[:3000]}")


def _ended(record):
    return record["state"] in ("done", "failed", "cancelled")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _training(record):
    return (record["state"] == "training" and record["step"] >= 1) or _ended(record)


@pytest.fixture(scope="module")
def done_job(engine, annotations):
    with engine.client() as api:
        r = _post(api, annotations, max_steps=2, name="short run")
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["state"] in ("queued", "building") and job["name"] == "short run" and job["error"] is None
        return _wait(api, job["id"], _ended)


def test_routes_need_the_token_and_are_documented(engine, api):
    for method, path in (("GET", "/jobs"), ("POST", "/jobs"), ("GET", "/jobs/x"), ("DELETE", "/jobs/x"),
                         ("POST", "/jobs/x/resume")):  # fmt: skip
        assert_error(httpx.request(method, engine.url + path, json={}, trust_env=False), 401, "Bearer")
    spec = api.get("/openapi.json").json()
    for path, methods in (("/jobs", {"get", "post"}), ("/jobs/{job_id}", {"get", "delete"}),
                          ("/jobs/{job_id}/resume", {"post"})):  # fmt: skip
        assert methods <= set(spec["paths"][path]), path
        assert all(spec["paths"][path][m]["tags"] == ["jobs"] for m in methods)
    assert {"JobIn", "JobOut", "JobList", "JobCurves"} <= set(spec["components"]["schemas"])
    assert spec["paths"]["/jobs"]["post"]["responses"].keys() >= {"201", "409", "422", "503"}
    info = api.get("/info").json()
    assert info["training"] is True and info["training_error"] is None


def test_a_short_grpo_job_trains_evaluates_and_its_adapter_loads(api, done_job, annotations, jobs_dir):
    job = api.get(f"/jobs/{done_job['id']}").json()
    assert job["state"] == "done", (job["error"], job["log_tail"])
    assert job["error"] is None and job["ended"] and job["elapsed_s"] > 0 and job["eta_s"] is None
    assert job["step"] == 2 and job["max_steps"] == 2 and job["recipe"] == "grpo"
    curves = job["curves"]
    assert curves["step"] == [1, 2]
    assert all(len(curves[k]) == 2 for k in ("reward", "format", "iou", "loss"))
    assert all(v is not None for v in curves["reward"] + curves["format"] + curves["iou"])
    job_dir = Path(job["job_dir"])
    assert job_dir.parent == jobs_dir
    copy = job_dir / "annotations.gpkg"  # the job trains on its own copy, hashed
    assert job["annotations_sha256"] == hashlib.sha256(copy.read_bytes()).hexdigest()
    assert Path(job["dataset"], "dataset.json").is_file()
    assert Path(job["report"]).name == "report.md" and Path(job["report"]).is_file()
    assert set(job["metrics"]) == {"base", "adapter"} and job["eval_split"] == "val"
    for scores in job["metrics"].values():
        assert scores["counts"]["overall"] >= 1 and "acc@0.5" in scores and "mean_iou" in scores
    assert job["device_note"].startswith("training shares the CPU with grounding")
    assert any("done" in line for line in job["log_tail"])
    assert not (job_dir / "adapter" / "checkpoints").exists()  # kept only until the job is done
    loaded = api.post("/adapters", json={"name": "from-job", "path": job["adapter"]})
    assert loaded.status_code == 200, loaded.text
    assert "from-job" in loaded.json()["available"]
    listed = api.get("/jobs").json()["jobs"]
    assert done_job["id"] in [j["id"] for j in listed]
    assert "curves" not in listed[0] and "log_tail" not in listed[0]
    assert_error(api.delete(f"/jobs/{done_job['id']}"), 409, "already ended", "done")
    assert_error(api.post(f"/jobs/{done_job['id']}/resume"), 409, "only a failed or cancelled job")


def test_cancel_stops_within_a_step_and_resume_continues(api, done_job, annotations):
    r = _post(api, annotations, max_steps=400, name="long run")
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    record = _wait(api, job_id, _training)
    assert record["state"] == "training", (record["error"], record["log_tail"])
    assert record["eta_s"] is None or record["eta_s"] >= 0
    # the same name while it runs: refused
    assert_error(_post(api, annotations, max_steps=2, name="long run"), 409, "long run", "still running")
    cancelled = api.delete(f"/jobs/{job_id}")
    assert cancelled.status_code == 200 and cancelled.json()["cancel_requested"] is True
    record = _wait(api, job_id, lambda j: _ended(j) and not _alive(j["pid"]))
    assert record["state"] == "cancelled", (record["error"], record["log_tail"])
    assert 1 <= record["step"] < 400 and record["resumable"] is True
    assert any("cancelled" in line for line in record["log_tail"])
    assert "cancelled (cancel appeared): stopping after step" in Path(record["log"]).read_text()  # the trainer's stop
    assert_error(api.delete(f"/jobs/{job_id}"), 409, "already ended", "cancelled")
    stopped_at = record["step"]
    resumed = api.post(f"/jobs/{job_id}/resume", json={"max_steps": stopped_at + 1})
    assert resumed.status_code == 200, resumed.text
    record = _wait(api, job_id, _ended)
    assert record["state"] == "done", (record["error"], record["log_tail"])
    assert record["step"] == stopped_at + 1 and record["curves"]["step"][-1] == stopped_at + 1
    assert record["metrics"] is not None


def test_a_killed_job_is_failed_with_the_cause_and_keeps_its_log(api, done_job, annotations):
    r = _post(api, annotations, max_steps=400, name="to be killed")
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    record = _wait(api, job_id, _training)
    assert record["state"] == "training", (record["error"], record["log_tail"])
    os.kill(record["pid"], signal.SIGKILL)
    record = _wait(api, job_id, _ended)
    assert record["state"] == "failed"
    assert "the training process was killed (signal 9" in record["error"]
    assert "resume" in record["error"] and record["resumable"] is True  # its last checkpoint is kept
    assert Path(record["log"]).stat().st_size > 0 and record["log_tail"]


def _refusal_cases(tmp: Path, scenes, good: Path) -> list[tuple[dict, int, tuple[str, ...]]]:
    import numpy as np
    import pyogrio

    (train_tif, train_tanks), (val_tif, val_tanks) = scenes
    not_gpkg = tmp / "tanks.geojson"
    not_gpkg.write_text("{}")
    other_layer = tmp / "other.gpkg"  # a GeoPackage, but not an annotation one
    pyogrio.raw.write(other_layer, np.array([shapely.to_wkb(train_tanks[0])], dtype=object), [np.array([1])], ["a"],
                      layer="roads", driver="GPKG", geometry_type="Polygon", crs="EPSG:32614")  # fmt: skip
    gone = _annotations(tmp / "gone.gpkg", [(tmp / "gone.tif", "train", train_tanks[0]),
                                            (val_tif, "val", val_tanks[0])])  # fmt: skip
    far = shapely.affinity.translate(train_tanks[0], xoff=1e6)
    outside = _annotations(tmp / "outside.gpkg", [(train_tif, "train", far), (val_tif, "val", val_tanks[0])])
    no_val = _annotations(tmp / "noval.gpkg", [(train_tif, "train", g) for g in train_tanks])
    return [
        ({"annotations": str(tmp / "missing.gpkg")}, 422, ("does not exist",)),
        ({"annotations": str(not_gpkg)}, 422, ("not a GeoPackage",)),
        ({"annotations": str(other_layer)}, 422, ("geo_r1_annotations",)),
        ({"annotations": str(gone)}, 422, ("gone.tif", "does not exist")),
        ({"annotations": str(outside)}, 422, ("wholly outside their raster",)),
        ({"annotations": str(no_val)}, 422, ("no val or test boxes", "held-out", "'split' field")),
        ({"annotations": str(good), "chip": 100}, 422, ("multiple of 28",)),
        ({"annotations": str(good), "recipe": "ppo"}, 422, ("recipe",)),
        ({"annotations": str(good), "options": {"model": "x"}}, 422, ("options.model",)),
        ({"annotations": str(good), "init_adapter": str(tmp)}, 422, ("adapter_config.json",)),
        ({"recipe": "grpo"}, 422, ("annotations",)),
    ]


def test_refusals_before_anything_starts(api, scenes, annotations, jobs_dir, tmp_path):
    before = sorted(p.name for p in jobs_dir.iterdir())
    for body, status, fragments in _refusal_cases(tmp_path, scenes, annotations):
        assert_error(api.post("/jobs", json=body), status, *fragments)
    assert sorted(p.name for p in jobs_dir.iterdir()) == before  # no job folder for a refusal
    for method, path in (("GET", "/jobs/nope"), ("DELETE", "/jobs/nope"), ("POST", "/jobs/nope/resume")):
        assert_error(api.request(method, path), 404, "no job 'nope'")


def test_a_restarted_engine_lists_the_jobs_and_without_trl_refuses_with_the_fix(engine, done_job, jobs_dir,
                                                                             tiny_format_model_dir, annotations,
                                                                             tmp_path):  # fmt: skip
    with engine.client() as api:
        r = _post(api, annotations, max_steps=400, name="outlives its engine")
        assert r.status_code == 201, r.text
        running = _wait(api, r.json()["id"], _training)
        assert running["state"] == "training", (running["error"], running["log_tail"])
        ids = [j["id"] for j in api.get("/jobs").json()["jobs"]]
    assert done_job["id"] in ids and ids[0] == running["id"]  # newest first
    assert engine.stop() in CLEAN_EXIT, engine.log_tail()
    assert _alive(running["pid"])  # the job goes on without the engine that started it
    hidden = tmp_path / "hide-trl" / "trl"  # an environment without the training extras: trl does not import
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('No module named trl (hidden by the test)')\n")
    path = os.pathsep.join(p for p in (str(hidden.parent), os.environ.get("PYTHONPATH", "")) if p)
    args = ["--model", str(tiny_format_model_dir), "--threads", "1", "--jobs-dir", str(jobs_dir)]
    again = start_engine(tmp_path / "engine", args, env={"PYTHONPATH": path})
    try:
        with again.client() as api:
            assert [j["id"] for j in api.get("/jobs").json()["jobs"]] == ids
            assert api.get(f"/jobs/{done_job['id']}").json()["state"] == "done"
            info = api.get("/info").json()
            assert info["training"] is False and "pip install 'geo-r1[train]'" in info["training_error"]
            refused = _post(api, annotations, max_steps=2)
            assert_error(refused, 503, "pip install 'geo-r1[train]'", "trl")
            # the new engine follows the job the old one started, and cancels it
            step = api.get(f"/jobs/{running['id']}").json()["step"]
            record = _wait(api, running["id"], lambda j: j["step"] > step or _ended(j))
            assert record["state"] == "training", (record["error"], record["log_tail"])
            assert api.delete(f"/jobs/{running['id']}").status_code == 200
            record = _wait(api, running["id"], lambda j: _ended(j) and not _alive(j["pid"]))
            assert record["state"] == "cancelled", (record["error"], record["log_tail"])
    finally:
        assert again.stop() in CLEAN_EXIT, again.log_tail()
