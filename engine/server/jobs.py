"""The ``/jobs`` routes: fine-tuning jobs the engine starts, tracks and cancels (:mod:`engine.jobs`).

=========================  ========================================================================
POST   /jobs               start a job (201, its record); refused first, with the fix, when the
                           annotations cannot make a dataset with a held-out split (422) or the
                           engine has no training extras (503)
GET    /jobs               ``{"jobs": [...]}``, newest first, without curves and log
GET    /jobs/{id}          the record: state, step, ETA, curves, log tail, error, adapter, metrics
DELETE /jobs/{id}          cancel: stops at the next training step (409 if it already ended)
POST   /jobs/{id}/resume   continue a failed or cancelled job from its last checkpoint
=========================  ========================================================================

The job runs in a process of its own; these routes only read and write its folder (in a worker thread).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import anyio.to_thread
from fastapi import FastAPI

from engine.jobs.manager import JobConflictError, JobManager, JobNotFoundError, TrainingUnavailableError
from engine.server.api_models import JobIn, JobList, JobOut, ResumeIn, error_responses
from engine.server.security import ApiError

_STATUS = {JobNotFoundError: 404, JobConflictError: 409, TrainingUnavailableError: 503}


async def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs))
    except (JobNotFoundError, JobConflictError, TrainingUnavailableError) as exc:
        raise ApiError(_STATUS[type(exc)], str(exc)) from None


def add_job_routes(app: FastAPI, manager: JobManager, default_chip: Callable[[], int],
                   common: tuple[int, ...]) -> None:  # fmt: skip
    """Register the ``/jobs`` routes on ``app`` (tag ``jobs``)."""

    @app.post("/jobs", tags=["jobs"], status_code=201, response_model=JobOut,
              summary="Fine-tune the engine's model on an annotation GeoPackage",
              description="Copies the annotations, builds the dataset, trains a LoRA adapter with the recipe and "
              "evaluates the base model against it on the held-out (val/test) boxes, in a process of its own that "
              "outlives the client and the engine. Poll GET /jobs/{id}.",
              responses=error_responses(*common, 409, 503))  # fmt: skip
    async def create_job(body: JobIn) -> dict[str, Any]:
        return await _call(manager.create, body.model_dump(), default_chip())

    @app.get("/jobs", tags=["jobs"], response_model=JobList, responses=error_responses(*common))
    async def list_jobs() -> dict[str, Any]:
        return {"jobs": await _call(manager.list)}

    @app.get("/jobs/{job_id}", tags=["jobs"], response_model=JobOut, responses=error_responses(*common, 404))
    async def get_job(job_id: str) -> dict[str, Any]:
        return await _call(manager.record, job_id)

    @app.delete("/jobs/{job_id}", tags=["jobs"], response_model=JobOut,
                summary="Cancel a job: it stops at its next training step",
                description="Returns the record at once; its state turns cancelled once the process has stopped "
                "(SIGTERM to its process group after a few seconds if it has not). 409 if it already ended.",
                responses=error_responses(*common, 404, 409))  # fmt: skip
    async def cancel_job(job_id: str) -> dict[str, Any]:
        return await _call(manager.cancel, job_id)

    @app.post("/jobs/{job_id}/resume", tags=["jobs"], response_model=JobOut,
              summary="Continue a failed or cancelled job from its last checkpoint",
              responses=error_responses(*common, 404, 409, 503))  # fmt: skip
    async def resume_job(job_id: str, body: ResumeIn | None = None) -> dict[str, Any]:
        body = body or ResumeIn()
        return await _call(manager.resume, job_id, body.max_steps, body.max_seconds)
