"""What the jobs API costs around a training (issue 19 §4): from the Fine-tune click to the first step, and per step.

    .venv/bin/python scripts/bench_jobs.py [--steps 6] [--model DIR]

One real ``geo-r1 serve`` on the tiny format-trained model (built into ``.cache`` as the tests build it, unless
``--model`` names one) with its own ``--jobs-dir``; an annotation GeoPackage of two sample scenes' tanks (train and
val boxes, 112 px chips), as ``tests/engine/server/test_jobs.py`` writes it. Then:

1. ``POST /jobs`` (a GRPO job of ``--steps`` steps), polled as the panel polls it, but every 50 ms: the time to each
   phase (building, training), to the first step reported, and to the end;
2. the same training without the jobs API: ``geo-r1 train grpo`` on the job's own dataset, same model, options,
   steps and threads (the job manager gives its process ``job_threads()``: half the cores), timed from its log
   (first to last step);
3. the latency of ``GET /jobs/{id}`` (what the panel asks each second) while the job trains;
4. with ``--ground N``: N ``/ground`` requests (one 224 px noise image, "all storage tanks", multi, at most 64 new
   tokens) on the idle engine before the job, and N more while it trains (after its first step): the grounding
   latency a user sees while a job trains, against an idle engine (``--model resources/sample_model`` for the
   sample model).

The per-step overhead is the job's seconds per step minus the direct run's, both measured from their own
``train_log.jsonl`` step times (the job's from its first to its last step). One run each, on whatever load the machine
has: the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "engine"))

log = logging.getLogger("bench_jobs")

#: the test's options: 1 prompt x 4 completions of at most 32 tokens, a checkpoint at every step
FAST = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "num_generations": 4,
        "max_completion_length": 32, "lora_r": 8, "lora_alpha": 16, "save_steps": 1}  # fmt: skip


def _format_model() -> Path:
    from tiny_models import cached_build

    return cached_build("tiny-format-model-seed0-steps300", seed=0, learn_format_steps=300)  # the tests' model


def _step_seconds(train_log: Path) -> tuple[int, float]:
    """(steps, seconds per step from the first to the last logged step) of a ``train_log.jsonl``."""
    rows = [json.loads(line) for line in train_log.read_text().splitlines() if line.strip()]
    times = sorted({int(r["step"]): float(r["seconds"]) for r in rows if "step" in r and "seconds" in r}.items())
    if len(times) < 2:
        raise SystemExit(f"{train_log} has fewer than two timed steps: {rows[:3]}")
    return len(times), (times[-1][1] - times[0][1]) / (times[-1][0] - times[0][0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--ground", type=int, default=0, help="/ground requests timed idle and while training")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from _serve_helpers import start_engine, tank_annotations

    from engine.jobs.manager import job_threads

    model = args.model.resolve() if args.model else _format_model()  # the job's process runs elsewhere
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
        root = Path(tmp)
        annotations = tank_annotations(root)
        eng = start_engine(root / "engine", ["--model", str(model), "--threads", "1", "--jobs-dir", str(root / "jobs")])
        try:
            with eng.client() as api:
                idle = _ground_times(api, args.ground)
                busy: list[float] = []
                body = {"annotations": str(annotations), "recipe": "grpo", "chip": 112, "eval_max_new_tokens": 32,
                        "options": FAST, "max_steps": args.steps}  # fmt: skip
                t0 = time.perf_counter()
                r = api.post("/jobs", json=body)
                r.raise_for_status()
                job_id = r.json()["id"]
                marks: dict[str, float] = {}
                polls: list[float] = []
                record = r.json()
                while record["state"] not in ("done", "failed", "cancelled"):
                    time.sleep(0.05)
                    s = time.perf_counter()
                    record = api.get(f"/jobs/{job_id}").json()
                    if record["state"] == "training":
                        polls.append(time.perf_counter() - s)
                    marks.setdefault(record["state"], time.perf_counter() - t0)
                    if record.get("step", 0) >= 1:
                        marks.setdefault("first step", time.perf_counter() - t0)
                        if record["state"] == "training" and len(busy) < args.ground:
                            busy += _ground_times(api, 1)
                            if api.get(f"/jobs/{job_id}").json()["state"] != "training":
                                busy.pop()  # it ended meanwhile: not a request beside a training
                total = time.perf_counter() - t0
                if record["state"] != "done":
                    raise SystemExit(f"the job ended {record['state']}: {record.get('error')}\n{record['log_tail']}")
                job_dir = Path(record["job_dir"])
            job_steps, job_sps = _step_seconds(job_dir / "adapter" / "train_log.jsonl")
        finally:
            eng.stop()
        geo = ROOT / ".venv" / "bin" / "geo-r1"
        direct = root / "direct"
        sets = [f"--set={k}={v}" for k, v in FAST.items()]
        t1 = time.perf_counter()
        cmd = [str(geo), "train", "grpo", "--data", record["dataset"], "--model", str(model), "-o", str(direct)]
        cmd += ["--max-steps", str(args.steps), "--force", *sets]
        threads = str(record.get("threads") or job_threads())  # the job's own process runs with these
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        subprocess.run(cmd, check=True, env=env)
        direct_wall = time.perf_counter() - t1
        direct_steps, direct_sps = _step_seconds(direct / "train_log.jsonl")
    load = os.getloadavg()[0]
    print(f"load average (1 min) at the end: {load:.1f}")
    print("POST /jobs -> " + ", ".join(f"{k} {v:.1f} s" for k, v in marks.items()) + f"; done {total:.1f} s")
    print(f"GET /jobs/{{id}} while training: median {1000 * statistics.median(polls):.1f} ms, "
          f"max {1000 * max(polls):.1f} ms over {len(polls)} polls")  # fmt: skip
    print(
        f"seconds per step: job {job_sps:.3f} ({job_steps} steps), direct geo-r1 train {direct_sps:.3f} "
        f"({direct_steps} steps, {direct_wall:.1f} s wall); overhead {job_sps - direct_sps:+.3f} s a step"
    )
    if args.ground:
        if not busy:
            print("/ground while training: none measured (the job ended first; give it more --steps)")
        else:
            print(f"/ground on a 224 px image, 64 tokens at most: idle median {statistics.median(idle):.3f} s "
                  f"(n {len(idle)}), while the job trained median {statistics.median(busy):.3f} s (n {len(busy)}): "
                  f"{statistics.median(busy) / statistics.median(idle):.2f}x")  # fmt: skip
    return 0


def _ground_times(api, n: int) -> list[float]:
    """Seconds of each of ``n`` ``/ground`` requests, one after the other."""
    from _serve_helpers import data_uri, noise_image

    body = {"items": [{"image": data_uri(noise_image(224, 224, seed=1)), "expression": "all storage tanks",
                       "task": "multi"}], "max_new_tokens": 64}  # fmt: skip
    times = []
    for _ in range(n):
        t = time.perf_counter()
        api.post("/ground", json=body, timeout=120).raise_for_status()
        times.append(time.perf_counter() - t)
    return times


if __name__ == "__main__":
    sys.exit(main())
