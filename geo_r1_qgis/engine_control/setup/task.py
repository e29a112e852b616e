"""The engine setup and its check as QgsTasks: the work runs on a worker thread, QGIS stays responsive.

Progress goes through ``setProgress``; the log lines and the steps are Qt signals (queued to the dialog on the
main thread). Cancelling kills the running pip. ``run()`` is the boundary where errors are caught.
"""

from __future__ import annotations

import logging

from qgis.core import QgsTask
from qgis.PyQt.QtCore import pyqtSignal

from ...core.errors import GeoR1Error
from .installer import Installer, SetupConfig, SetupResult
from .venv import CheckResult, check_venv

log = logging.getLogger(__name__)


class SetupTask(QgsTask):
    """Runs an :class:`Installer`. ``done(ok, message, tail)`` is emitted on the main thread at the end."""

    lineLogged = pyqtSignal(str)
    stepStarted = pyqtSignal(int, int, str)
    done = pyqtSignal(bool, str, str)

    def __init__(self, cfg: SetupConfig, description: str = "Set up the Geo-R1 engine") -> None:
        super().__init__(description, QgsTask.Flag.CanCancel)
        self.cfg = cfg
        self.result: SetupResult | None = None
        self.installer = Installer(cfg, on_line=self.lineLogged.emit, on_step=self._on_step)

    def _on_step(self, index: int, count: int, title: str) -> None:
        self.setProgress(100.0 * index / max(1, count))
        self.stepStarted.emit(index, count, title)

    def run(self) -> bool:
        try:
            self.result = self.installer.run()
        except (GeoR1Error, OSError, RuntimeError, ValueError) as exc:  # the task is a boundary
            log.exception("engine setup failed")
            self.result = SetupResult(False, f"The setup stopped on an unexpected error: {exc}", "", "")
        return self.result.ok

    def cancel(self) -> None:
        self.installer.cancel()
        super().cancel()

    def finished(self, ok: bool) -> None:
        result = self.result or SetupResult(False, "The setup did not run.")
        self.done.emit(result.ok, result.message, result.tail)


class CheckTask(QgsTask):
    """ "Check": :func:`check_venv` off the main thread; ``done(ok, text)`` at the end."""

    done = pyqtSignal(bool, str)

    def __init__(self, venv, expected_version: str | None = None) -> None:
        super().__init__("Check the Geo-R1 engine", QgsTask.Flag.CanCancel)
        self.venv = venv
        self.expected = expected_version
        self.result: CheckResult | None = None

    def run(self) -> bool:
        try:
            self.result = check_venv(self.venv, self.expected)
        except (GeoR1Error, OSError, RuntimeError, ValueError) as exc:
            self.result = CheckResult(False, (f"The check stopped on an unexpected error: {exc}",))
        return self.result.ok

    def finished(self, ok: bool) -> None:
        result = self.result or CheckResult(False, ("The check did not run.",))
        self.done.emit(result.ok, result.text)
