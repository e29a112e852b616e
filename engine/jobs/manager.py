"""The engine's side of the jobs: start, list, read, cancel and resume them (:class:`JobManager`).

The job folders are the only record, so a restarted engine lists the jobs of the one before. A job whose process
is gone without having written an end state is marked failed with the cause, read from the exit status when this
engine started the process and still holds it (killed by a signal, or exited with an error), else "ended without
a result (killed?)"; its log and its last checkpoint are kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from engine.jobs import progress
from engine.jobs.files import ENDED, RUNNING, JobPaths, now_iso, read_json, seconds_between, write_json
from engine.jobs.spec import JobSpec
from geo_r1_qgis.core.errors import GeoR1Error

log = logging.getLogger(__name__)

#: seconds a cancelled job gets to stop at its next step end (at least; twice its step time when longer, up to
#: the maximum) before SIGTERM to its process group, then before SIGKILL
CANCEL_GRACE_S = 5.0
MAX_CANCEL_GRACE_S = 120.0
KILL_GRACE_S = 10.0


class JobNotFoundError(GeoR1Error, LookupError):
    """No job of that id (HTTP 404)."""


class JobConflictError(GeoR1Error):
    """The request clashes with a job's state (HTTP 409)."""


class TrainingUnavailableError(GeoR1Error):
    """This engine cannot train (HTTP 503)."""


def default_jobs_dir() -> Path:
    """``$XDG_DATA_HOME/geo-r1/jobs`` (default ``~/.local/share/geo-r1/jobs``)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser() / "geo-r1" / "jobs"


def default_name(annotations: str, recipe: str) -> str:
    """``<file stem>-<recipe>``, in the characters a job name allows."""
    stem = re.sub(r"[^A-Za-z0-9 _.-]+", "_", Path(annotations).stem).strip(" _.-")[:48] or "job"
    return f"{stem}-{recipe}"


def job_threads(cores: int | None = None) -> int:
    """Threads of a job's process: half the cores (at least 1), so grounding beside it keeps answering."""
    from engine.runtime.threads import usable_cores

    return max(1, (cores or usable_cores()) // 2)


def device_note(device: str, threads: int, cores: int | None = None) -> str:
    """How a job shares the machine with the engine's grounding."""
    from engine.runtime.threads import usable_cores

    if device.startswith(("cuda", "mps")):
        return f"training shares the GPU ({device}) with grounding; grounding is slower while it runs"
    return (f"training shares the CPU with grounding: it uses {threads} of {cores or usable_cores()} cores, so "
            "grounding keeps answering, more slowly")  # fmt: skip


def _signal_text(returncode: int) -> str:
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = "unknown"
    text = f"the training process was killed (signal {-returncode}, {name})"
    if -returncode == signal.SIGKILL:
        text += "; if nobody stopped it, the system may have run out of memory"
    return text


class JobManager:
    """What the ``/jobs`` routes call. Thread-safe; every state lives in the job folders under ``jobs_dir``."""

    def __init__(self, jobs_dir: Path, model: str | None, processor: str | None = None, device: str = "cpu",
                 python: str = sys.executable) -> None:  # fmt: skip
        self.jobs_dir = Path(jobs_dir)
        self.model = model
        self.processor = processor
        self.device = device
        self.python = python
        self.threads = job_threads()
        self._lock = threading.RLock()
        self._procs: dict[str, subprocess.Popen] = {}
        self._probe: str | None = None
        self._probed = threading.Event()

    # -- training extras ---------------------------------------------------------------------------
    def start_probe(self) -> None:
        """Check in the background whether the training extras import (``/info``'s ``training``)."""
        threading.Thread(target=self._run_probe, name="geo-r1-training-probe", daemon=True).start()

    def _run_probe(self) -> None:
        from engine.jobs.checks import probe_training

        if self.model is None:
            self._probe = ("this engine forwards to a remote server (--backend openai); fine-tuning needs the model "
                           "on this machine: start the engine with --backend local --model M")  # fmt: skip
        else:
            self._probe = probe_training(self.python)
        if self._probe:
            log.info("fine-tuning jobs unavailable: %s", self._probe)
        self._probed.set()

    def training_error(self, timeout_s: float = 300.0) -> str | None:
        """None when this engine can train, else why not (waits for the probe)."""
        if not self._probed.is_set() and not self._probed.wait(timeout_s):
            return "this engine is still checking its training extras; retry in a few seconds"
        return self._probe

    # -- reading -----------------------------------------------------------------------------------
    def _paths(self, job_id: str) -> JobPaths:
        bad = not job_id or "/" in job_id or job_id.startswith(".")
        if bad or not (self.jobs_dir / job_id / "spec.json").is_file():
            raise JobNotFoundError(f"no job {job_id!r} in {self.jobs_dir}; GET /jobs lists them")
        return JobPaths(self.jobs_dir / job_id)

    def _ids(self) -> list[str]:
        if not self.jobs_dir.is_dir():
            return []
        return [p.name for p in self.jobs_dir.iterdir() if (p / "spec.json").is_file()]

    def _process(self, paths: JobPaths) -> tuple[int | None, subprocess.Popen | None]:
        """The job's current process: its pid, and its handle when this engine started it."""
        return paths.read_pid(), self._procs.get(paths.id)

    def _alive(self, paths: JobPaths, which: tuple[int | None, subprocess.Popen | None] | None = None,
               ) -> tuple[bool, int | None]:  # fmt: skip
        """Whether the job's process (``which``, default the current one) runs, and its exit status when this
        engine holds it and it ended."""
        pid, proc = which or self._process(paths)
        if proc is not None:
            rc = proc.poll()
            return rc is None, rc
        if pid is None:
            return False, None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False, None
        except PermissionError:
            return False, None  # another user's process took the pid
        try:  # Linux: the pid must still be this job's runner (not a reused pid, not a zombie)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            return True, None
        return ("engine.jobs.runner" in cmdline and str(paths.root) in cmdline and stat[0] != "Z"), None

    def _reconcile(self, paths: JobPaths, state: dict[str, Any]) -> dict[str, Any]:
        """The state, with a running job whose process is gone turned into its end state (written)."""
        if state.get("state") not in RUNNING:
            return state
        with self._lock:
            state = paths.read_state()
            if state.get("state") not in RUNNING:
                return state
            alive, rc = self._alive(paths)
            if alive:
                return state
            state = paths.read_state()  # its end state may have come just before it exited
            if state.get("state") not in RUNNING:
                return state
            if paths.cancel.exists():
                return paths.update_state(state="cancelled", ended=now_iso())
            if rc is not None and rc < 0:
                error = _signal_text(rc)
            elif rc:
                error = f"the training process exited with status {rc} without a result; see the log"
            else:
                error = "the training process ended without a result (killed?)"
            if paths.has_checkpoint():
                error += f"; its log and last checkpoint are kept: POST /jobs/{paths.id}/resume continues from it"
            log.warning("job %s: %s", paths.id, error)
            return paths.update_state(state="failed", ended=now_iso(), error=error)

    def record(self, job_id: str, full: bool = True) -> dict[str, Any]:
        """The job record of ``job_id`` (``full``: with its curves and log tail)."""
        paths = self._paths(job_id)
        spec = read_json(paths.spec) or {}
        state = self._reconcile(paths, paths.read_state())
        name = state.get("state", "queued")
        prog = read_json(paths.progress)
        since = 0.0
        if prog is not None:
            with contextlib.suppress(OSError):
                since = max(0.0, time.time() - paths.progress.stat().st_mtime)
        rows = progress.read_train_log(paths.train_log) if full or prog is None else []
        steps = progress.curves(rows)["step"] if rows else []
        step = (prog or {}).get("step", steps[-1] if steps else 0)
        report = paths.report / "report.md"
        out: dict[str, Any] = {
            "id": paths.id,
            "name": spec.get("name"),
            "state": name,
            "recipe": spec.get("recipe"),
            "created": spec.get("created"),
            "started": state.get("started"),
            "ended": state.get("ended"),
            "step": step,
            "max_steps": (prog or {}).get("max_steps") or spec.get("max_steps"),
            "max_seconds": spec.get("max_seconds"),
            "elapsed_s": seconds_between(state.get("started"), state.get("ended")),
            "eta_s": progress.eta_seconds(prog, spec.get("max_seconds"), since) if name == "training" else None,
            "error": state.get("error"),
            "adapter": str(paths.adapter) if (paths.adapter / "adapter_model.safetensors").is_file() else None,
            "report": str(report) if report.is_file() else None,
            "metrics": state.get("metrics"),
            "annotations": spec.get("annotations"),
            "annotations_sha256": state.get("annotations_sha256"),
            "dataset": str(paths.dataset),
            "chip": spec.get("chip"),
            "gsd": spec.get("gsd"),
            "eval_split": state.get("eval_split"),
            "device_note": spec.get("device_note"),
            "pid": paths.read_pid(),
            "cancel_requested": paths.cancel.exists(),
            "resumable": name in ("failed", "cancelled") and paths.has_checkpoint(),
            "job_dir": str(paths.root),
            "log": str(paths.log),
        }
        if full:
            out["curves"] = progress.curves(rows)
            out["log_tail"] = progress.log_tail(paths.log)
        return out

    def list(self) -> list[dict[str, Any]]:
        """Every job's record without curves and log, newest first."""
        records = []
        for job_id in self._ids():
            try:
                records.append(self.record(job_id, full=False))
            except JobNotFoundError:  # removed meanwhile
                continue
        return sorted(records, key=lambda r: (r["created"] or "", r["id"]), reverse=True)

    # -- starting ----------------------------------------------------------------------------------
    def _running_named(self, name: str) -> str | None:
        for job_id in self._ids():
            paths = JobPaths(self.jobs_dir / job_id)
            spec = read_json(paths.spec) or {}
            if spec.get("name") == name and self._reconcile(paths, paths.read_state()).get("state") in RUNNING:
                return job_id
        return None

    def create(self, request: dict[str, Any], default_chip: int) -> dict[str, Any]:
        """Check ``request`` (the ``POST /jobs`` body), then start its job; its record (state queued)."""
        from engine.jobs.checks import check_adapter_dir, check_annotations

        if (why := self.training_error()) is not None:
            raise TrainingUnavailableError(why)
        assert self.model is not None  # the probe says so otherwise
        annotations = str(request["annotations"])
        recipe = request.get("recipe") or "grpo"
        name = request.get("name") or default_name(annotations, recipe)
        job_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)
        spec = JobSpec(
            id=job_id, name=name, annotations=annotations, model=self.model, recipe=recipe,
            max_steps=request.get("max_steps"), max_seconds=request.get("max_seconds"), gsd=request.get("gsd"),
            chip=request.get("chip") or default_chip, init_adapter=request.get("init_adapter"),
            processor=self.processor, device=self.device, threads=self.threads,
            eval_limit=request.get("eval_limit"), eval_max_new_tokens=request.get("eval_max_new_tokens"),
            options=dict(request.get("options") or {}), created=now_iso(),
            device_note=device_note(self.device, self.threads),
        )  # fmt: skip
        check_adapter_dir(spec.init_adapter)
        check_annotations(Path(spec.annotations))
        with self._lock:
            if (other := self._running_named(spec.name)) is not None:
                raise JobConflictError(
                    f"job {other} named {spec.name!r} is still running; wait for it, cancel it (DELETE /jobs/{other}) "
                    "or give this one another name"
                )
            paths = JobPaths(self.jobs_dir / job_id)
            try:
                paths.root.mkdir(parents=True)
            except OSError as exc:
                raise TrainingUnavailableError(
                    f"cannot create the job folder {paths.root} ({exc.strerror or exc}); start the engine with a "
                    "writable --jobs-dir"
                ) from None
            write_json(paths.spec, spec.to_dict())
            write_json(paths.state, {"state": "queued"})
            self._spawn(paths, spec, resume=False)
        log.info("job %s (%s, %s) started: %s", job_id, spec.name, spec.recipe, paths.root)
        return self.record(job_id)

    def _spawn(self, paths: JobPaths, spec: JobSpec, resume: bool) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(spec.threads), "MKL_NUM_THREADS": str(spec.threads),
               "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}  # fmt: skip
        cmd = [self.python, "-m", "engine.jobs.runner", str(paths.root), *(["--resume"] if resume else [])]
        # relative raster paths of the annotations are relative to the annotation file (engine.jobs.runner)
        cwd = Path(spec.annotations).parent
        with paths.log.open("ab") as out:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    cwd=cwd if cwd.is_dir() else paths.root, start_new_session=True)  # fmt: skip
        paths.pid.write_text(f"{proc.pid}\n", encoding="ascii")
        self._procs[paths.id] = proc
        # reaped as soon as it ends, so a finished job never lingers as a zombie of the engine
        threading.Thread(target=proc.wait, name=f"geo-r1-job-{paths.id}", daemon=True).start()

    # -- stopping, resuming ------------------------------------------------------------------------
    def cancel(self, job_id: str) -> dict[str, Any]:
        """Ask the job to stop (at its next step end; SIGTERM, then SIGKILL, to its process group after a grace)."""
        paths = self._paths(job_id)
        state = self._reconcile(paths, paths.read_state())
        if state.get("state") in ENDED:
            raise JobConflictError(f"job {job_id} has already ended ({state['state']}); there is nothing to cancel")
        paths.cancel.touch()
        log.info("job %s: cancel requested", job_id)
        # bound to this process: a resume's new process is never signalled by an earlier cancel
        threading.Thread(target=self._enforce_cancel, args=(paths, self._process(paths)),
                         name=f"geo-r1-cancel-{job_id}", daemon=True).start()  # fmt: skip
        return self.record(job_id)

    def _enforce_cancel(self, paths: JobPaths, which: tuple[int | None, subprocess.Popen | None]) -> None:
        # the trainer stops at the end of the step under way: wait for that (twice the step time so far, at most
        # MAX_CANCEL_GRACE_S) before signals; a slow model's step may take minutes
        prog = read_json(paths.progress) or {}
        done = (prog.get("step") or 0) - (prog.get("first_step") or 0)
        step_s = float(prog.get("seconds") or 0.0) / done if done > 0 else 0.0
        grace = min(MAX_CANCEL_GRACE_S, max(CANCEL_GRACE_S, 2.0 * step_s))
        for sig, wait_s in ((signal.SIGTERM, grace), (signal.SIGKILL, KILL_GRACE_S)):
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if not self._alive(paths, which)[0]:
                    self._reconcile(paths, paths.read_state())
                    return
                time.sleep(0.2)
            pid = which[0]
            if pid is None:
                return
            log.warning("job %s did not stop within %.0f s: %s to its process group", paths.id, wait_s, sig.name)
            try:
                os.killpg(pid, sig)
            except (ProcessLookupError, PermissionError):
                return

    def resume(self, job_id: str, max_steps: int | None = None, max_seconds: float | None = None) -> dict[str, Any]:
        """Continue a failed or cancelled job from its last checkpoint (optionally with a new budget)."""
        if (why := self.training_error()) is not None:
            raise TrainingUnavailableError(why)
        paths = self._paths(job_id)
        with self._lock:
            state = self._reconcile(paths, paths.read_state())
            if state.get("state") not in ("failed", "cancelled"):
                raise JobConflictError(
                    f"job {job_id} is {state.get('state')}; only a failed or cancelled job can be resumed"
                )
            if not paths.has_checkpoint():
                raise JobConflictError(
                    f"job {job_id} has no checkpoint to resume from (it stopped before its first one); start a new "
                    "job with POST /jobs"
                )
            spec = JobSpec.from_dict(read_json(paths.spec) or {})
            if (other := self._running_named(spec.name)) is not None:
                raise JobConflictError(f"job {other} named {spec.name!r} is running; wait for it or cancel it")
            if max_steps is not None or max_seconds is not None:
                spec = JobSpec.from_dict({**spec.to_dict(), "max_steps": max_steps, "max_seconds": max_seconds})
                write_json(paths.spec, spec.to_dict())
            paths.cancel.unlink(missing_ok=True)
            paths.update_state(state="queued", ended=None, error=None)
            self._procs.pop(job_id, None)
            self._spawn(paths, spec, resume=True)
        log.info("job %s resumed", job_id)
        return self.record(job_id)
