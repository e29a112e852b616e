"""The engine's fine-tune jobs from QGIS's GUI thread, without blocking it.

Every request goes through the engine manager's :class:`~geo_r1_qgis.engine_control.engine_process.EngineHttp`
(QNetworkAccessManager, the token proven first, replies held until they finish), at the address the panel
uses (:meth:`~geo_r1_qgis.engine_control.engine_process.EngineManager.endpoint`). Answers come back as
``callback(payload, sentence, status)``: the JSON on success, else ``None`` and one plain sentence saying what
went wrong (the engine's own detail, never an HTTP dump; :func:`~geo_r1_qgis.core.finetune.error_sentence`),
and the HTTP status (None when nothing answered).

- :class:`JobsClient`: ``GET /info``, ``POST /jobs``, ``GET /jobs``, ``GET /jobs/{id}``, ``DELETE /jobs/{id}``,
  ``POST /jobs/{id}/resume``.
- :class:`JobWatcher`: polls one job about every second until it ends; ``updated`` / ``ended`` / ``problem``.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Callable
from typing import Any

from qgis.PyQt import sip
from qgis.PyQt.QtCore import QObject, QTimer, pyqtSignal

from ..core.finetune import FINAL_STATES, FinetuneRequest, error_sentence
from .engine_process import START_HINT, EngineManager, _owner_deleted

log = logging.getLogger(__name__)

#: callback(payload or None, plain sentence or None, HTTP status or None)
Answer = Callable[[Any, "str | None", "int | None"], None]
POLL_MS = 1000


class JobsClient(QObject):
    """The jobs routes of the engine the panel talks to (ours while it runs, else the settings' URL)."""

    def __init__(self, manager: EngineManager, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.manager = manager

    def endpoint(self) -> tuple[str, Any]:
        return self.manager.endpoint()

    def _ask(self, method: str, path: str, doing: str, callback: Answer, body: Any = None,
             timeout_ms: int = 10_000) -> None:  # fmt: skip
        url, token_file = self.endpoint()

        def done(status: int | None, payload: Any, error: str | None) -> None:
            if sip.isdeleted(self) or _owner_deleted(callback):  # the widget that asked was deleted meanwhile
                return
            if error is None and status is not None and status < 400:
                callback(payload, None, status)
                return
            if status is None:  # nothing answered (or /health did not): no engine there
                callback(None, f"{doing} failed: no Geo-R1 engine answers at {url} ({error}). {START_HINT}", None)
                return
            callback(None, error_sentence(status, payload, error, doing), status)

        self.manager.http.authed(method, url, path, token_file, done, body, timeout_ms)

    def info(self, callback: Answer) -> None:
        # an engine just started may still be checking its training extras (up to a minute) before it answers
        self._ask("GET", "/info", "Asking the engine what it can do", callback, timeout_ms=70_000)

    def submit(self, request: FinetuneRequest, callback: Answer) -> None:
        self._ask("POST", "/jobs", "Starting the fine-tune", callback, request.body(), timeout_ms=30_000)

    def jobs(self, callback: Answer) -> None:
        self._ask("GET", "/jobs", "Listing the fine-tune jobs", callback)

    def job(self, job_id: str, callback: Answer) -> None:
        self._ask("GET", f"/jobs/{urllib.parse.quote(job_id, safe='')}", "Reading the fine-tune job", callback)

    def resume(self, job_id: str, callback: Answer) -> None:
        """``POST /jobs/{id}/resume``: a failed or cancelled job continues from its last checkpoint."""
        self._ask("POST", f"/jobs/{urllib.parse.quote(job_id, safe='')}/resume", "Resuming the fine-tune", callback,
                  {}, timeout_ms=30_000)  # fmt: skip

    def cancel(self, job_id: str, callback: Answer) -> None:
        self._ask("DELETE", f"/jobs/{urllib.parse.quote(job_id, safe='')}", "Cancelling the fine-tune", callback)


class JobWatcher(QObject):
    """Polls ``GET /jobs/{id}`` about every second (one request at a time) until the job ends.

    ``updated(record)`` after each answer, ``ended(record)`` once in a final state (then it stops), and
    ``problem(sentence)`` when an answer fails (it goes on trying, since an engine may be busy for a while; a job
    the engine does not know, 404, stops it)."""

    updated = pyqtSignal(dict)
    ended = pyqtSignal(dict)
    problem = pyqtSignal(str)

    def __init__(self, client: JobsClient, job_id: str, parent: QObject | None = None,
                 interval_ms: int = POLL_MS) -> None:  # fmt: skip
        super().__init__(parent)
        self.client = client
        self.job_id = job_id
        self.record: dict[str, Any] = {}
        self.failures = 0
        self._waiting = False
        self._stopped = False
        self.timer = QTimer(self)
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self.poll)

    def start(self) -> None:
        self._stopped = False
        self.poll()
        self.timer.start()

    def stop(self) -> None:
        self._stopped = True
        self.timer.stop()

    @property
    def active(self) -> bool:
        return not self._stopped and self.timer.isActive()

    def poll(self) -> None:
        if self._waiting or self._stopped:
            return
        self._waiting = True
        self.client.job(self.job_id, self._answer)

    def _answer(self, payload: Any, sentence: str | None, status: int | None) -> None:
        self._waiting = False
        if self._stopped:
            return
        if sentence is not None or not isinstance(payload, dict):
            self.failures += 1
            text = sentence or "the engine's answer about the job was not a job record"
            if status == 404:  # the engine does not know the job (another engine, or its jobs folder was cleared)
                self.stop()
            self.problem.emit(text)
            return
        self.failures = 0
        self.record = payload
        self.updated.emit(payload)
        if payload.get("state") in FINAL_STATES:
            self.stop()
            self.ended.emit(payload)
