"""The job process: ``python -m engine.jobs.runner JOB_DIR [--resume]`` (started by :mod:`engine.jobs.manager`).

Top to bottom: copy the annotation GeoPackage into the job folder (an SQLite backup: a consistent snapshot even
while QGIS edits the file) and record its sha256; build the dataset (:func:`train.dataset.build_dataset`); train
(:func:`train.trainer.run`, with :func:`train.trainer.job_callback` for cancel and progress); evaluate the base model
against the new adapter on the held-out split (:func:`train.evaluate.run`: report.md with plots). ``job.json`` is
rewritten atomically at each phase change; the end state is done, failed (with the cause in words) or cancelled.
A resume (``--resume``) keeps the copy and the dataset and continues training from the last checkpoint.

Relative raster paths of the annotations are resolved against the original file's folder: the engine starts
this process there.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import signal
import sqlite3
import sys
import traceback
from pathlib import Path
from typing import Any

from engine.jobs.files import JobPaths, now_iso, read_json
from engine.jobs.spec import JobSpec
from geo_r1_qgis.core.errors import ConfigError, GeoR1Error

log = logging.getLogger("geo_r1.job")


class Stopped(Exception):
    """The job was cancelled (its cancel file appeared, or SIGTERM came)."""


def copy_geopackage(src: Path, dst: Path) -> str:
    """A consistent copy of the GeoPackage ``src`` (SQLite's online backup: whatever its WAL holds, never a torn
    file while another program writes it) at ``dst``; returns the copy's sha256."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        source = sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=30)
        try:
            target = sqlite3.connect(tmp)
            try:
                source.backup(target)
                target.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            finally:
                target.close()
        finally:
            source.close()
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot copy the annotation file {src} ({exc}); is it a GeoPackage?") from None
    os.replace(tmp, dst)
    digest = hashlib.sha256()
    with dst.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_error(exc: BaseException) -> str:
    """The cause of a failure, in words a user reads."""
    from engine.runtime.backend import is_out_of_memory

    if is_out_of_memory(exc):
        return (f"out of memory: {type(exc).__name__}: {str(exc)[:300]} (lower the batch or the chip size, or "
                "close other programs)")  # fmt: skip
    if isinstance(exc, GeoR1Error):
        return str(exc)
    return f"{type(exc).__name__}: {exc} (a bug? see job.log)"


class Runner:
    """One run of a job's process, phase by phase."""

    def __init__(self, paths: JobPaths, resume: bool) -> None:
        self.paths = paths
        self.resume = resume
        spec = read_json(paths.spec)
        if spec is None:
            raise ConfigError(f"{paths.spec} is missing or unreadable: not a job folder")
        self.spec = JobSpec.from_dict(spec)

    def phase(self, state: str, **values: Any) -> None:
        log.info("job %s: %s", self.spec.id, state)
        self.paths.update_state(state=state, **values)

    def check_cancel(self) -> None:
        if self.paths.cancel.exists():
            raise Stopped()

    def build(self) -> None:
        from train.dataset import BuildConfig, build_dataset

        sha = copy_geopackage(Path(self.spec.annotations), self.paths.annotations)
        self.paths.update_state(annotations_sha256=sha, annotations_copy=str(self.paths.annotations))
        self.check_cancel()
        config = BuildConfig(annotations=(self.paths.annotations,), out_dir=self.paths.dataset, chip=self.spec.chip,
                             gsd=self.spec.gsd, val_fraction=0.0, overwrite=True)  # fmt: skip
        build_dataset(config)
        self.paths.update_state(dataset=str(self.paths.dataset))
        self.held_out_split(self.spec.options.get("task", "rec"))

    def held_out_split(self, task: str) -> str:
        """The split the evaluation scores: test when the dataset has test chips, else val."""
        from train.data_format import read_records

        split = "test" if read_records(self.paths.dataset, "test", task) else "val"
        if not read_records(self.paths.dataset, split, task):
            raise ConfigError(
                f"the dataset has no val or test {task} chips to evaluate on (the held-out boxes gave none: too big "
                "for a chip, outside the raster, or no place apart from the training chips; see job.log): mark more "
                "boxes val or test, preferably on another raster or away from the training boxes"
            )
        return split

    def train(self) -> Path:
        from train.config import build_config
        from train.trainer import job_callback, run

        overrides: dict[str, Any] = {
            **self.spec.options,
            "data": self.paths.dataset,
            "model": self.spec.model,
            "processor": self.spec.processor,
            "output_dir": self.paths.adapter,
            "init_adapter": self.spec.init_adapter,
            "max_steps": self.spec.max_steps,
            "max_seconds": self.spec.max_seconds,
            "device": self.spec.device,
            "threads": self.spec.threads,
            "eval_limit": 0,  # the job's own evaluation follows, on the whole held-out split
            "keep_checkpoints": True,  # removed once the job is done; until then they serve a resume
            "resume": self.resume,
            "force": not self.resume,
        }
        overrides.setdefault("save_steps", 10)
        config = build_config(self.spec.recipe, overrides)
        self.paths.update_state(task=config.task)
        self.paths.adapter.mkdir(parents=True, exist_ok=True)
        return run(config, callbacks=[job_callback(self.paths.cancel, self.paths.progress)])

    def evaluate(self, adapter: Path, task: str) -> dict[str, Any]:
        from train.evaluate import BASE_NAME, EvalConfig, run

        split = self.held_out_split(task)
        self.paths.update_state(eval_split=split)
        cfg = EvalConfig(out_dir=self.paths.report, data=self.paths.dataset, model=self.spec.model,
                         processor=self.spec.processor, adapters={"adapter": str(adapter)}, split=split, task=task,
                         limit=self.spec.eval_limit, max_new_tokens=self.spec.eval_max_new_tokens,
                         device=self.spec.device, examples=4)  # fmt: skip
        models = run(cfg)["models"]
        return {"base": models[BASE_NAME]["scores"], "adapter": models["adapter"]["scores"]}

    def run(self) -> int:
        if self.resume:
            self.phase("training", started=self.paths.read_state().get("started") or now_iso(), ended=None,
                       error=None, resumed_at=now_iso(), pid=os.getpid())  # fmt: skip
        else:
            self.phase("building", started=now_iso(), pid=os.getpid())
        try:
            if not self.resume:
                self.build()
                self.check_cancel()
                self.phase("training")
            adapter = self.train()
            self.check_cancel()
            self.phase("evaluating", adapter=str(adapter))
            metrics = self.evaluate(adapter, self.paths.read_state().get("task", "rec"))
            shutil.rmtree(self.paths.checkpoints, ignore_errors=True)
            self.phase("done", ended=now_iso(), report=str(self.paths.report / "report.md"), metrics=metrics)
            return 0
        except Stopped as exc:
            if self.paths.cancel.exists():
                self.phase("cancelled", ended=now_iso())
                return 0
            self.phase("failed", ended=now_iso(), error=f"the training process was stopped ({exc or 'SIGTERM'})")
            return 1
        except BaseException as exc:  # the end state must say why, whatever ended the job
            if self.paths.cancel.exists():
                self.phase("cancelled", ended=now_iso())
                return 0
            log.error("job %s failed:\n%s", self.spec.id, traceback.format_exc())
            self.phase("failed", ended=now_iso(), error=describe_error(exc))
            return 1


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Stopped(f"signal {signum}: {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.jobs.runner", description="run one engine training job")
    parser.add_argument("job_dir", type=Path)
    parser.add_argument("--resume", action="store_true", help="continue training from the last checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("rasterio", "httpx", "urllib3", "PIL", "pyogrio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from engine.runtime.threads import prepare_environment

    prepare_environment()
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        runner = Runner(JobPaths(args.job_dir.resolve()), args.resume)
    except GeoR1Error as exc:
        sys.stderr.write(f"job: error: {exc}\n")
        return 2
    import torch

    torch.set_num_threads(runner.spec.threads)
    return runner.run()


if __name__ == "__main__":
    sys.exit(main())
