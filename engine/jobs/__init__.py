"""Fine-tuning jobs the engine starts, tracks and cancels (``POST /jobs``; :mod:`engine.server.jobs`).

A job is one folder under the engine's ``--jobs-dir`` and one process of the engine's own Python,
``python -m engine.jobs.runner JOB_DIR``, started in a session of its own: it survives the plugin closing and
the engine stopping, and never runs inside the serving process. It builds the dataset (:mod:`train.dataset`),
trains (:mod:`train.trainer`) and evaluates the base model against the new adapter (:mod:`train.evaluate`),
the same code as ``geo-r1 dataset build``, ``geo-r1 train`` and ``geo-r1 eval``.

- :mod:`engine.jobs.files`: a job folder's layout, its states and atomic JSON files;
- :mod:`engine.jobs.spec`: :class:`~engine.jobs.spec.JobSpec`, what a job was asked to do;
- :mod:`engine.jobs.progress`: curves from ``train_log.jsonl``, the ETA, the log tail (pure);
- :mod:`engine.jobs.checks`: the refusals before anything starts, and whether the training extras import;
- :mod:`engine.jobs.manager`: :class:`~engine.jobs.manager.JobManager`, what the routes call;
- :mod:`engine.jobs.runner`: the job process.
"""
