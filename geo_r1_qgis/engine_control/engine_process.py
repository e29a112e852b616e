"""The engine from inside QGIS: start it, watch it, stop it, switch its adapter, without blocking QGIS.

QGIS's Python only (PyQGIS + standard library). The engine runs in its own venv as ``geo-r1 serve``, started
as a program with an argument list (never a shell) and a cleaned environment; everything that waits (health,
``/info``, adapters, shutdown) goes through QNetworkAccessManager with its own timeout, so the GUI thread
never waits on the engine.

- :class:`EngineManager`: one engine the plugin starts (a QProcess child, or a detached process when the user
  keeps it running after QGIS quits), its state (stopped, starting, healthy, crashed, external, stopping),
  its log tail, diagnostics, and ``stop_for_unload`` for the plugin's unload and QGIS's quit.
- :class:`EngineHttp`: the engine's routes, asynchronously, with the token proof of ``core/client.py``.
- :class:`EngineStatusCheck`: "is there an engine, and what does it serve?" for the menu's check.
- :class:`ModelDownload`: ``python -m engine.download MODEL`` in the engine's venv, line by line.
"""

from __future__ import annotations

import collections
import contextlib
import html
import json
import logging
import os
import platform
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qgis.core import Qgis, QgsApplication, QgsSettings
from qgis.PyQt import sip
from qgis.PyQt.QtCore import (
    PYQT_VERSION_STR,
    QT_VERSION_STR,
    QByteArray,
    QObject,
    QProcess,
    QProcessEnvironment,
    QTimer,
    QUrl,
    pyqtSignal,
)
from qgis.PyQt.QtNetwork import QNetworkAccessManager, QNetworkProxy, QNetworkReply, QNetworkRequest

from ..core.client import STATUS_WORDS, health_proof
from ..core.errors import ConfigError, EngineUnavailableError, GeoR1Error
from ..settings import PluginSettings, clean_environment, plugin_settings_dir
from .setup.venv import engine_executable

log = logging.getLogger(__name__)

STOPPED, STARTING, HEALTHY, CRASHED, EXTERNAL, STOPPING = (
    "stopped", "starting", "healthy", "crashed", "external", "stopping",
)  # fmt: skip
#: the line a user runs by hand; plain text (escape it before it goes into anything that renders HTML)
SERVE_COMMAND = "geo-r1 serve --model <model id or directory>"
START_HINT = (
    "Start one from the Geo-R1 panel (Start), or set the engine up there first (Set up the engine...), "
    f"or run in a terminal:  {SERVE_COMMAND}"
)
LOG_LINES = 500
#: the address of an engine started with "keep running" (it outlives QGIS): apart from the user's engine URL
KEPT_URL_KEY = "geo_r1/kept_engine/url"
KEPT_TOKEN_KEY = "geo_r1/kept_engine/token_file"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def default_threads() -> int:
    """cores - 1, at least 1: QGIS keeps a core for drawing the map."""
    return max(1, (os.cpu_count() or 2) - 1)


def process_environment(extra: dict[str, str] | None = None) -> QProcessEnvironment:
    """QGIS's environment without PYTHON*, GDAL_*, PROJ_*, QT_* (``settings.clean_environment``), as Qt wants it."""
    env = QProcessEnvironment()
    for key, value in clean_environment(extra={"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                                               **(extra or {})}).items():  # fmt: skip
        env.insert(key, value)
    return env


def _owner_deleted(callback: Callable[..., Any]) -> bool:
    """Whether ``callback`` is a method of a Qt object whose C++ side is gone (a closed panel's widget): calling
    it would raise inside a Qt slot, which PyQt turns into an abort of QGIS."""
    owner = getattr(callback, "__self__", None)
    return isinstance(owner, QObject) and sip.isdeleted(owner)


@dataclass(frozen=True)
class EngineStartConfig:
    """What ``EngineManager.start`` runs. ``from_settings`` fills it from the plugin's settings."""

    program: Path
    model: str
    processor: str = ""
    adapter: str = ""
    host: str = "127.0.0.1"
    #: 0: a free port, picked at start
    port: int = 0
    token_file: Path = field(default_factory=lambda: plugin_settings_dir() / "engine.token")
    log_path: Path = field(default_factory=lambda: plugin_settings_dir() / "engine.log")
    threads: int = field(default_factory=default_threads)
    #: keep the engine running when QGIS quits: started detached and without ``--parent-pid``
    keep_running: bool = False
    start_timeout_s: float = 120.0
    #: after ``POST /shutdown``: this long before SIGTERM, and as long again before SIGKILL
    stop_timeout_s: float = 10.0
    extra_args: tuple[str, ...] = ()
    extra_env: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        program = Path(self.program)
        object.__setattr__(self, "program", program)
        if not program.is_file():
            raise ConfigError(
                f"the engine is not installed: {program} does not exist. Use Set up the engine... in the Geo-R1 "
                "panel, or choose a venv where geo-r1 is installed as Engine venv in Raster > Geo-R1 > Settings"
            )
        if not self.model.strip():
            raise ConfigError(
                "choose a model first: a Hugging Face id (e.g. Geo-R1/Geo-R1-3B-GRPO-REC-10shot) or a local "
                "model directory"
            )
        if self.host not in ("127.0.0.1", "localhost", "::1"):
            raise ConfigError(f"the plugin starts engines on 127.0.0.1 only, got host {self.host!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be within 0..65535 (0: a free one), got {self.port}")
        if self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if not self.start_timeout_s > 0 or not self.stop_timeout_s > 0:
            raise ConfigError("the start and stop timeouts must be > 0 seconds")
        object.__setattr__(self, "token_file", Path(self.token_file))
        object.__setattr__(self, "log_path", Path(self.log_path))

    @classmethod
    def from_settings(cls, settings: PluginSettings | None = None, **overrides: Any) -> EngineStartConfig:
        s = settings or PluginSettings.load()
        values: dict[str, Any] = {
            "program": engine_executable(s),
            "model": s.engine_model,
            "processor": s.engine_processor,
            "adapter": s.engine_adapter,
            "keep_running": s.keep_engine_running,
        }
        values.update(overrides)
        return cls(**values)

    def arguments(self, port: int, parent_pid: int | None) -> list[str]:
        """``geo-r1 serve`` arguments (the token file's path is passed, never the token)."""
        args = ["serve", "--model", self.model.strip()]
        if self.processor.strip():
            args += ["--processor", self.processor.strip()]
        if self.adapter.strip():
            args += ["--adapter", self.adapter.strip()]
        args += ["--host", self.host, "--port", str(port), "--token-file", str(self.token_file),
                 "--threads", str(self.threads)]  # fmt: skip
        if parent_pid is not None:
            args += ["--parent-pid", str(parent_pid)]
        return args + list(self.extra_args)


# --------------------------------------------------------------------------------------------------
# HTTP without blocking: QNetworkAccessManager, one callback per request
# --------------------------------------------------------------------------------------------------

#: callback(status or None, JSON body or None, error text or None)
Callback = Callable[[int | None, Any, str | None], None]


def _read_token(path: Path | str | None) -> str | None:
    try:
        token = Path(path).read_text(encoding="utf-8").strip() if path else ""
    except OSError:
        return None
    return token or None


class EngineHttp(QObject):
    """The engine's routes over QNetworkAccessManager. Before the token first goes to a URL, the server there
    must prove it holds it (``GET /health?challenge=``, as ``core/client.py`` does)."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.nam = QNetworkAccessManager(self)
        self.nam.setProxy(QNetworkProxy(QNetworkProxy.ProxyType.NoProxy))  # loopback: never through a proxy
        self._proven: set[tuple[str, str]] = set()
        #: replies in flight, with their timer and slots: held here until they finish, or a garbage collection
        #: (e.g. triggered by a run's worker thread) frees them mid-request and the callback never comes or crashes
        self._inflight: dict[int, tuple[Any, ...]] = {}

    def request(self, method: str, url: str, path: str, callback: Callback, body: Any = None,
                token: str | None = None, timeout_ms: int = 5000) -> QNetworkReply:  # fmt: skip
        req = QNetworkRequest(QUrl(url.rstrip("/") + path))
        req.setRawHeader(b"Accept", b"application/json")
        if token:
            req.setRawHeader(b"Authorization", ("Bearer " + token).encode("ascii"))
        if method == "GET":
            reply = self.nam.get(req)
        elif method == "DELETE":
            reply = self.nam.deleteResource(req)
        else:
            req.setHeader(QNetworkRequest.KnownHeaders.ContentTypeHeader, "application/json")
            reply = self.nam.post(req, QByteArray(json.dumps(body if body is not None else {}).encode("utf-8")))
        timer = QTimer(reply)
        timer.setSingleShot(True)
        state = {"timed_out": False}

        def on_timeout() -> None:
            state["timed_out"] = True
            reply.abort()

        def on_finished() -> None:
            timer.stop()
            status = reply.attribute(QNetworkRequest.Attribute.HttpStatusCodeAttribute)
            raw = bytes(reply.readAll())
            error = None
            if state["timed_out"]:
                error = f"no answer within {timeout_ms / 1000:g} s (the engine is busy or hung)"
            elif reply.error() != QNetworkReply.NetworkError.NoError and status is None:
                error = reply.errorString()
            try:
                payload = json.loads(raw.decode("utf-8")) if raw else None
            except (UnicodeDecodeError, json.JSONDecodeError):
                payload = None
            if error is None and status is not None and int(status) >= 400:
                err = payload.get("error", {}) if isinstance(payload, dict) else {}
                detail = err.get("message", raw[:200].decode(errors="replace"))
                log.warning("engine %s %s%s -> %s: %s", method, url, path.split("?")[0], int(status), detail)
                words = STATUS_WORDS.get(int(status), "refused the request")
                error = f"the engine {words} (HTTP {int(status)}): {detail}"
            self._inflight.pop(id(reply), None)
            reply.deleteLater()
            if _owner_deleted(callback):  # the widget that asked was closed before the answer came
                log.debug("engine %s %s answered after its caller was deleted: dropped", method, path)
                return
            callback(int(status) if status is not None else None, payload, error)

        self._inflight[id(reply)] = (reply, timer, on_finished, on_timeout, callback)
        timer.timeout.connect(on_timeout)
        reply.finished.connect(on_finished)
        timer.start(int(timeout_ms))
        return reply

    def authed(self, method: str, url: str, path: str, token_file: Path | str | None, callback: Callback,
               body: Any = None, timeout_ms: int = 5000) -> None:  # fmt: skip
        """A route that needs the token: prove the server first (once per URL and token), then ask."""
        token = _read_token(token_file)
        if token is None:
            callback(None, None, f"no engine token at {token_file}: the engine writes it when it starts")
            return
        if (url, token) in self._proven:
            self.request(method, url, path, callback, body, token, timeout_ms)
            return
        challenge = secrets.token_hex(16)

        def proved(status: int | None, payload: Any, error: str | None) -> None:
            if error is not None or not isinstance(payload, dict):
                callback(status, None, error or "no answer to /health")
                return
            if payload.get("proof") != health_proof(token, challenge):
                callback(401, None, f"the server at {url} did not prove it holds the token in {token_file}, so "
                                    "the token was not sent (another program on that port, or another engine's "
                                    "token file)")  # fmt: skip
                return
            self._proven.add((url, token))
            self.request(method, url, path, callback, body, token, timeout_ms)

        self.request("GET", url, f"/health?challenge={challenge}", proved, timeout_ms=min(timeout_ms, 5000))


# --------------------------------------------------------------------------------------------------
# The status check of the menu (and of the panel when it opens)
# --------------------------------------------------------------------------------------------------


def describe_info(url: str, info: dict[str, Any]) -> str:
    adapter = info.get("adapter") or "none (base model)"
    return (f"engine {info.get('engine_version', '?')} at {url}: model {info.get('model')}, adapter {adapter}, "
            f"{info.get('device')} {info.get('dtype')}, prompts {info.get('prompt_version')}")  # fmt: skip


class EngineStatusCheck(QObject):
    """One asynchronous look at the engine at ``url``: ``finished(reachable, plain text, /info or {})``.

    It never blocks: a hung engine is reported after ``timeout_ms`` while QGIS goes on."""

    finished = pyqtSignal(bool, str, dict)

    def __init__(self, url: str, token_file: Path | str | None, timeout_ms: int = 3000,
                 parent: QObject | None = None, http: EngineHttp | None = None) -> None:  # fmt: skip
        super().__init__(parent)
        self.url = url.rstrip("/")
        self.token_file = token_file
        self.timeout_ms = timeout_ms
        self.http = http or EngineHttp(self)
        self.result: tuple[bool, str, dict] | None = None

    def start(self) -> None:
        self.http.request("GET", self.url, "/health", self._on_health, timeout_ms=self.timeout_ms)

    def _done(self, ok: bool, text: str, info: dict | None = None) -> None:
        self.result = (ok, text, info or {})
        self.finished.emit(ok, text, info or {})

    def _on_health(self, status: int | None, payload: Any, error: str | None) -> None:
        if error is not None or status != 200:
            self._done(False, f"No Geo-R1 engine answers at {self.url} ({error or status}). {START_HINT}")
            return
        self.http.authed("GET", self.url, "/info", self.token_file, self._on_info, timeout_ms=self.timeout_ms)

    def _on_info(self, status: int | None, payload: Any, error: str | None) -> None:
        if error is not None or not isinstance(payload, dict):
            self._done(False, f"An engine answers at {self.url}, but /info failed: {error}. Check the token file "
                              "in the Geo-R1 settings (the engine prints its path when it starts).")  # fmt: skip
            return
        self._done(True, describe_info(self.url, payload), payload)


def message_bar_text(text: str) -> str:
    """``text`` for QgsMessageBar, which renders rich text (its title is bold HTML): ``<...>`` escaped."""
    return html.escape(text, quote=False)


# --------------------------------------------------------------------------------------------------
# The engine process
# --------------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is gone for us
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


class EngineManager(QObject):
    """Starts, watches and stops the engine the plugin runs; reports an engine it did not start as external."""

    #: (state, plain-text message)
    stateChanged = pyqtSignal(str, str)
    #: new log lines (the last LOG_LINES are kept in ``log_lines``)
    logLines = pyqtSignal(list)
    #: seconds left before a start gives up
    countdown = pyqtSignal(int)
    #: the engine's /info, whenever it is fetched (healthy, adapter switched, external found)
    infoChanged = pyqtSignal(dict)

    def __init__(self, settings: QgsSettings | None = None, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.qsettings = settings  # None: the user's QgsSettings
        self.http = EngineHttp(self)
        self.state = STOPPED
        self.message = "no engine started"
        self.config: EngineStartConfig | None = None
        self.url: str | None = None
        self.token_file: Path | None = None
        self.info: dict[str, Any] = {}
        self.log_lines: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        self.process: QProcess | None = None
        self.detached_pid: int | None = None
        self._log_offset = 0
        self._log_rest = b""
        self._deadline = 0.0
        self._polling = False
        self._stop_requested = False
        self._after_stop: Callable[[], None] | None = None
        self._tail_timer = QTimer(self)
        self._tail_timer.setInterval(300)
        self._tail_timer.timeout.connect(self._read_log)
        self._health_timer = QTimer(self)
        self._health_timer.setInterval(500)
        self._health_timer.timeout.connect(self._poll_health)
        self._countdown_timer = QTimer(self)
        self._countdown_timer.setInterval(1000)
        self._countdown_timer.timeout.connect(self._tick)
        self._pid_timer = QTimer(self)  # a detached engine is no child of ours: watched by its PID
        self._pid_timer.setInterval(1000)
        self._pid_timer.timeout.connect(self._check_detached)

    # -- state ----------------------------------------------------------------------------------------
    def settings(self) -> PluginSettings:
        return PluginSettings.load(self.qsettings)

    def _set_state(self, state: str, message: str) -> None:
        self.state, self.message = state, message
        log.info("engine %s: %s", state, message)
        self.stateChanged.emit(state, message)

    def owns_engine(self) -> bool:
        """An engine process started by this manager is alive."""
        if self.process is not None:
            return self.process.state() != QProcess.ProcessState.NotRunning
        return self.detached_pid is not None and _pid_alive(self.detached_pid)

    @property
    def pid(self) -> int | None:
        if self.process is not None and self.owns_engine():
            return int(self.process.processId())
        return self.detached_pid

    # -- start ----------------------------------------------------------------------------------------
    def start(self, config: EngineStartConfig | None = None) -> bool:
        """Start the engine; returns at once (False, with state crashed and the reason, if it cannot start)."""
        if self.state in (STARTING, HEALTHY, STOPPING) and self.owns_engine():
            return True
        try:
            config = config or EngineStartConfig.from_settings(self.settings())
        except GeoR1Error as exc:
            self._set_state(CRASHED if self.state != EXTERNAL else EXTERNAL, str(exc))
            return False
        self.config = config
        port = config.port or free_port(config.host)
        self.url = f"http://{config.host}:{port}"
        self.token_file = config.token_file
        self.info = {}
        self._stop_requested = False
        config.log_path.parent.mkdir(parents=True, exist_ok=True)
        config.token_file.parent.mkdir(parents=True, exist_ok=True)
        if config.log_path.exists():  # the previous run's log is kept beside the new one
            os.replace(config.log_path, config.log_path.with_suffix(config.log_path.suffix + ".1"))
        config.log_path.write_bytes(b"")
        self._log_offset, self._log_rest = 0, b""
        parent_pid = None if config.keep_running else os.getpid()
        proc = QProcess()
        proc.setProgram(str(config.program))
        proc.setArguments(config.arguments(port, parent_pid))
        proc.setProcessEnvironment(process_environment(dict(config.extra_env)))
        proc.setWorkingDirectory(str(config.log_path.parent))
        proc.setStandardOutputFile(str(config.log_path), QProcess.OpenModeFlag.Append)
        proc.setStandardErrorFile(str(config.log_path), QProcess.OpenModeFlag.Append)
        proc.setStandardInputFile(QProcess.nullDevice())
        self._append_lines([f"[geo-r1 plugin] starting: {config.program} {' '.join(proc.arguments())}"])
        if config.keep_running:
            ok, pid = proc.startDetached()
            if not ok:
                self._set_state(CRASHED, f"cannot start {config.program}: {proc.errorString()}")
                return False
            self.process, self.detached_pid = None, int(pid)
            self._pid_timer.start()
        else:
            proc.setParent(self)
            proc.finished.connect(self._on_finished)
            proc.errorOccurred.connect(self._on_error)
            self.process, self.detached_pid = proc, None
            proc.start()
        self._deadline = time.monotonic() + config.start_timeout_s
        self._set_state(STARTING, f"starting the engine at {self.url} (model {config.model})")
        self.countdown.emit(int(config.start_timeout_s))
        self._tail_timer.start()
        self._health_timer.start()
        self._countdown_timer.start()
        return True

    def restart(self) -> None:
        """Stop what runs (if it is ours), then start again with the same configuration."""
        config = self.config
        if self.owns_engine():
            self.stop(then=lambda: self.start(config))
        else:
            self.start(config)

    def _tick(self) -> None:
        left = max(0, round(self._deadline - time.monotonic()))
        self.countdown.emit(left)
        if left <= 0 and self.state == STARTING:
            self._countdown_timer.stop()
            self._health_timer.stop()
            assert self.config is not None
            self._kill_now()
            self._read_log()
            self._set_state(CRASHED, f"the engine did not answer within {self.config.start_timeout_s:g} s and was "
                                     "stopped (a large model on a slow disk may need a longer start timeout). "
                                     f"Last lines of its log:\n{self.tail_text(15)}")  # fmt: skip

    def _poll_health(self) -> None:
        if self._polling or self.state != STARTING or self.url is None:
            return
        self._polling = True
        self.http.authed("GET", self.url, "/info", self.token_file, self._on_info_while_starting, timeout_ms=2000)

    def _on_info_while_starting(self, status: int | None, payload: Any, error: str | None) -> None:
        self._polling = False
        if self.state != STARTING:
            return
        if error is None and isinstance(payload, dict):
            self._health_timer.stop()
            self._countdown_timer.stop()
            self._set_info(payload)
            self._remember_kept_engine()
            self._read_log()  # the log view is current when the state turns healthy (its "listening on" line)
            self._set_state(HEALTHY, describe_info(self.url or "", payload))

    def _remember_kept_engine(self) -> None:
        """An engine started to keep running outlives QGIS on its own port: its address is kept apart from the
        user's engine settings (which are never changed), so the next QGIS session can still find it."""
        s = self.qsettings if self.qsettings is not None else QgsSettings()
        if self.config is not None and self.config.keep_running:
            s.setValue(KEPT_URL_KEY, self.url)
            s.setValue(KEPT_TOKEN_KEY, str(self.token_file))
        else:
            s.remove(KEPT_URL_KEY)
            s.remove(KEPT_TOKEN_KEY)
        s.sync()

    def endpoint(self) -> tuple[str, Path]:
        """Where runs, Processing and the checks talk to: the engine this manager runs while it runs, otherwise
        the engine of the user's settings (URL and token file)."""
        if self.url and self.token_file and self.state in (STARTING, HEALTHY, STOPPING) and self.owns_engine():
            return self.url, Path(self.token_file)
        s = self.settings()
        return s.engine_url.rstrip("/"), s.token_path()

    def _set_info(self, info: dict[str, Any]) -> None:
        self.info = dict(info)
        self.infoChanged.emit(self.info)

    def refresh_info(self) -> None:
        if self.url is None:
            return

        def done(status: int | None, payload: Any, error: str | None) -> None:
            if error is None and isinstance(payload, dict):
                self._set_info(payload)

        self.http.authed("GET", self.url, "/info", self.token_file, done, timeout_ms=5000)

    # -- an engine we did not start -------------------------------------------------------------------
    def probe_external(self, on_done: Callable[[bool], None] | None = None) -> None:
        """If an engine answers at the settings' URL and it is not ours, the state becomes external."""
        self.recheck(None if on_done is None else lambda ok, text, info: on_done(ok or "/info failed" in text))

    def recheck(self, on_done: Callable[[bool, str, dict], None] | None = None) -> None:
        """Look again (in the background) where the plugin looks: the engine this manager runs, else the user's
        engine URL (then an engine an earlier session started to keep running). What answers there and is not
        ours becomes external; an external engine that no longer answers becomes stopped. The settings dialog's
        OK and the menu's check call it, so the panel and the check always agree."""
        url, token_file = self.endpoint()
        ours = self.owns_engine() and self.state in (STARTING, HEALTHY, STOPPING)
        qs = self.qsettings if self.qsettings is not None else QgsSettings()
        kept = str(qs.value(KEPT_URL_KEY, "") or "")
        kept_token = str(qs.value(KEPT_TOKEN_KEY, "") or "")
        check = EngineStatusCheck(url, token_file, parent=self, http=self.http)

        def done(ok: bool, text: str, info: dict) -> None:
            check.deleteLater()
            reachable = ok or "/info failed" in text
            if ours or self.owns_engine():
                pass  # the manager's own engine: its state comes from its process and its start
            elif reachable:
                self.url, self.token_file = url, token_file
                if info:
                    self._set_info(info)
                self._set_state(EXTERNAL, f"{text} (started outside the plugin: the plugin never stops it)")
            elif kept and kept.rstrip("/") != url and kept_token:
                self._recheck_kept(kept.rstrip("/"), Path(kept_token), text, on_done)
                return
            elif self.state in (EXTERNAL, STOPPED):
                self.url, self.token_file, self.info = None, None, {}
                self._set_state(STOPPED, f"no engine answers at {url} (the engine URL in Raster > Geo-R1 > "
                                         "Settings)")  # fmt: skip
            if on_done is not None:
                on_done(ok, text, info)

        check.finished.connect(done)
        check.start()

    def _recheck_kept(self, url: str, token_file: Path, first_text: str,
                      on_done: Callable[[bool, str, dict], None] | None) -> None:  # fmt: skip
        """The engine an earlier QGIS session started to keep running, looked for at its own address."""
        check = EngineStatusCheck(url, token_file, parent=self, http=self.http)

        def done(ok: bool, text: str, info: dict) -> None:
            check.deleteLater()
            if ok and not self.owns_engine():
                self.url, self.token_file = url, token_file
                self._set_info(info)
                self._set_state(EXTERNAL, f"{text} (kept running by an earlier QGIS session: stop it from its "
                                          "process, the plugin never stops it)")  # fmt: skip
            else:
                qs = self.qsettings if self.qsettings is not None else QgsSettings()
                qs.remove(KEPT_URL_KEY)
                qs.remove(KEPT_TOKEN_KEY)
                if self.state in (EXTERNAL, STOPPED) and not self.owns_engine():
                    self.url, self.token_file, self.info = None, None, {}
                    self._set_state(STOPPED, f"no engine answers at {self.settings().engine_url} (the engine URL in "
                                             "Raster > Geo-R1 > Settings)")  # fmt: skip
            if on_done is not None:
                on_done(ok, text if ok else first_text, info)

        check.finished.connect(done)
        check.start()

    # -- stop -----------------------------------------------------------------------------------------
    def stop(self, then: Callable[[], None] | None = None) -> bool:
        """Ask the engine to stop (``POST /shutdown``), SIGTERM after the stop timeout, SIGKILL after another.
        An external engine is never stopped: False."""
        if self.state == EXTERNAL or not self.owns_engine():
            if self.state == EXTERNAL:
                self.stateChanged.emit(EXTERNAL, "this engine was not started by the plugin, so the plugin does not "
                                                 "stop it; stop it where it was started")  # fmt: skip
                return False
            self._stop_timers()
            self._set_state(STOPPED, "no engine running")
            if then is not None:
                then()
            return True
        self._after_stop = then
        self._stop_requested = True
        self._health_timer.stop()
        self._countdown_timer.stop()
        self._set_state(STOPPING, "stopping the engine")
        assert self.config is not None and self.url is not None
        self.http.authed("POST", self.url, "/shutdown", self.token_file, lambda *a: None, timeout_ms=3000)
        grace = int(self.config.stop_timeout_s * 1000)
        QTimer.singleShot(grace, self._terminate_if_running)
        QTimer.singleShot(2 * grace, self._kill_if_running)
        return True

    def _terminate_if_running(self) -> None:
        if self._stop_requested and self.owns_engine():
            self._append_lines(["[geo-r1 plugin] no clean stop in time: SIGTERM"])
            if self.process is not None:
                self.process.terminate()
            elif self.detached_pid is not None:
                os.kill(self.detached_pid, signal.SIGTERM)

    def _kill_if_running(self) -> None:
        if self._stop_requested and self.owns_engine():
            self._append_lines(["[geo-r1 plugin] still running: SIGKILL"])
            self._kill_now()

    def _kill_now(self) -> None:
        if self.process is not None and self.owns_engine():
            self._stop_requested = True
            self.process.kill()
        elif self.detached_pid is not None and _pid_alive(self.detached_pid):
            self._stop_requested = True
            os.kill(self.detached_pid, signal.SIGKILL)

    def stop_for_unload(self) -> None:
        """At plugin unload or QGIS quit: stop the engine this plugin started, unless it was started to keep
        running. Waits (at most twice the stop timeout) since the event loop may not run any more."""
        self._stop_timers()
        if self.state == EXTERNAL or not self.owns_engine():
            return
        assert self.config is not None
        if self.process is None:  # detached: started with "keep running"
            log.info("the engine (PID %s) keeps running at %s", self.detached_pid, self.url)
            return
        from ..core.client import EngineClient

        self._stop_requested = True
        token = _read_token(self.token_file)
        try:
            EngineClient(self.url or "", token, timeout_s=3).shutdown()
        except GeoR1Error as exc:
            log.info("shutdown request failed (%s): terminating", exc)
        grace = int(self.config.stop_timeout_s * 1000)
        if not self.process.waitForFinished(grace):
            self.process.terminate()
            if not self.process.waitForFinished(grace):
                self.process.kill()
                self.process.waitForFinished(3000)
        self._read_log()
        self.state, self.message = STOPPED, "stopped with the plugin"

    def _stop_timers(self) -> None:
        for t in (self._health_timer, self._countdown_timer, self._pid_timer):
            t.stop()

    # -- the process ending ---------------------------------------------------------------------------
    def _on_error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.ProcessError.FailedToStart:
            self._stop_timers()
            self._tail_timer.stop()
            self._set_state(CRASHED, f"cannot start {self.config.program if self.config else 'the engine'}: "
                                     f"{self.process.errorString() if self.process else error}")  # fmt: skip

    def _on_finished(self, exit_code: int, exit_status: QProcess.ExitStatus) -> None:
        crashed = exit_status == QProcess.ExitStatus.CrashExit
        how = "was killed (a signal)" if crashed else f"exited with status {exit_code}"
        self._ended(how)

    def _check_detached(self) -> None:
        if self.detached_pid is not None and not _pid_alive(self.detached_pid):
            self._ended("is gone")

    def _ended(self, how: str) -> None:
        self._stop_timers()
        self._read_log()
        self._tail_timer.stop()
        if self._stop_requested:
            self._stop_requested = False
            self._set_state(STOPPED, f"the engine stopped (it {how})")
            then, self._after_stop = self._after_stop, None
            if then is not None:
                then()
            return
        if self.state in (STARTING, HEALTHY):
            self._set_state(CRASHED, f"the engine {how} unexpectedly. Restart it, or read its log "
                                     f"({self.config.log_path if self.config else ''}). Last lines:\n"
                                     f"{self.tail_text(15)}")  # fmt: skip

    # -- the log --------------------------------------------------------------------------------------
    def _append_lines(self, lines: list[str]) -> None:
        self.log_lines.extend(lines)
        self.logLines.emit(lines)

    def _read_log(self) -> None:
        if self.config is None:
            return
        try:
            with open(self.config.log_path, "rb") as f:
                f.seek(self._log_offset)
                chunk = f.read(1 << 20)
        except OSError:
            return
        if not chunk:
            return
        self._log_offset += len(chunk)
        data = self._log_rest + chunk
        *complete, self._log_rest = data.replace(b"\r", b"\n").split(b"\n")
        lines = [c.decode("utf-8", errors="replace") for c in complete if c.strip()]
        if lines:
            self._append_lines(lines)

    def tail_text(self, n: int = 40) -> str:
        return "\n".join(list(self.log_lines)[-n:])

    # -- adapters -------------------------------------------------------------------------------------
    def adapters(self, callback: Callback) -> None:
        """``GET /adapters`` of the engine in use (ours or external)."""
        self._authed("GET", "/adapters", callback)

    def load_adapter(self, name: str, path: str, callback: Callback) -> None:
        self._authed("POST", "/adapters", callback, {"name": name, "path": str(path)}, timeout_ms=300_000)

    def activate_adapter(self, name: str | None, callback: Callback) -> None:
        """Switch to adapter ``name``, or back to the base model with None; /info is refreshed after."""

        def done(status: int | None, payload: Any, error: str | None) -> None:
            if error is None:
                self.refresh_info()
            callback(status, payload, error)

        self._authed("POST", "/adapters/active", done, {"name": name}, timeout_ms=120_000)

    def _authed(self, method: str, path: str, callback: Callback, body: Any = None, timeout_ms: int = 10_000) -> None:
        if self.url is None or self.state not in (HEALTHY, EXTERNAL):
            callback(None, None, "no engine is running: start one first")
            return
        self.http.authed(method, self.url, path, self.token_file, callback, body, timeout_ms)

    # -- diagnostics ----------------------------------------------------------------------------------
    def diagnostics(self) -> str:
        """Versions, the engine's /info, the settings and the last log lines, with the token removed."""
        import dataclasses

        from .setup.venv import plugin_version as _plugin_version

        plugin_version = _plugin_version()
        settings = dataclasses.asdict(self.settings())
        lines = [
            "Geo-R1 diagnostics",
            f"plugin {plugin_version}; QGIS {Qgis.QGIS_VERSION}; Qt {QT_VERSION_STR}; PyQt {PYQT_VERSION_STR}; "
            f"Python {sys.version.split()[0]}; {platform.platform()}",
            f"engine state: {self.state}: {self.message}",
            f"engine URL: {self.url}; PID: {self.pid}; token file: {self.token_file}",
        ]
        if self.config is not None:
            lines.append(f"command: {self.config.program} {' '.join(self.config.arguments(0, None))}")
            lines.append(f"log: {self.config.log_path}")
        if self.info:
            keys = ("model", "processor", "adapter", "adapters", "device", "dtype", "engine_version",
                    "prompt_version", "versions", "threads", "box_frame")  # fmt: skip
            lines.append("engine /info: " + json.dumps({k: self.info[k] for k in keys if k in self.info}, default=str))
        lines.append("settings: " + json.dumps(settings, default=str))
        lines.append(f"last log lines ({min(len(self.log_lines), 60)}):")
        lines.extend(list(self.log_lines)[-60:])
        text = "\n".join(lines)
        for path in {self.token_file, PluginSettings(**settings).token_path()}:
            token = _read_token(path)
            if token:
                text = text.replace(token, "<token removed>")
        return text

    def copy_diagnostics(self) -> str:
        text = self.diagnostics()
        clipboard = QgsApplication.clipboard()
        if clipboard is not None:
            clipboard.setText(text)
        return text


# --------------------------------------------------------------------------------------------------
# Model download in the engine's venv
# --------------------------------------------------------------------------------------------------


class ModelDownload(QObject):
    """``<venv>/bin/python -m engine.download MODEL`` in a QProcess: ``line`` per output line, then
    ``finished(ok, plain-text message)``."""

    line = pyqtSignal(str)
    finished = pyqtSignal(bool, str)

    def __init__(self, python: Path, model: str, parent: QObject | None = None,
                 extra_env: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(parent)
        if not Path(python).is_file():
            raise EngineUnavailableError(f"the engine is not installed ({python} does not exist): set it up first")
        self.model = model.strip()
        self.lines: list[str] = []
        self.proc = QProcess(self)
        self.proc.setProgram(str(python))
        self.proc.setArguments(["-m", "engine.download", self.model])
        self.proc.setProcessEnvironment(process_environment(extra_env))
        self.proc.setProcessChannelMode(QProcess.ProcessChannelMode.MergedChannels)
        self.proc.readyReadStandardOutput.connect(self._read)
        self.proc.finished.connect(self._done)
        self.proc.errorOccurred.connect(self._error)
        self._rest = b""

    def start(self) -> None:
        self.proc.start()

    def cancel(self) -> None:
        self.proc.kill()

    def _read(self) -> None:
        data = self._rest + bytes(self.proc.readAllStandardOutput())
        *complete, self._rest = data.replace(b"\r", b"\n").split(b"\n")
        for raw in complete:
            text = raw.decode("utf-8", errors="replace").rstrip()
            if text:
                self.lines.append(text)
                self.line.emit(text)

    def _done(self, exit_code: int, exit_status: QProcess.ExitStatus) -> None:
        self._rest += b"\n"
        self._read()
        if exit_status == QProcess.ExitStatus.NormalExit and exit_code == 0:
            self.finished.emit(True, f"{self.model} is downloaded")
            return
        errors = [ln.split("error: ", 1)[1] for ln in self.lines if "error: " in ln]
        detail = errors[-1] if errors else (self.lines[-1] if self.lines else f"exit status {exit_code}")
        self.finished.emit(False, f"download of {self.model} failed: {detail}")

    def _error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.ProcessError.FailedToStart:
            self.finished.emit(False, f"cannot run {self.proc.program()}: {self.proc.errorString()}")


# --------------------------------------------------------------------------------------------------
# One manager per QGIS session
# --------------------------------------------------------------------------------------------------

_shared: EngineManager | None = None


def shared_manager() -> EngineManager:
    """The plugin's one EngineManager (the panel's engine widget and the plugin share it). On QGIS's quit it
    stops the engine it started, unless that engine was started to keep running."""
    global _shared
    if _shared is None:
        _shared = EngineManager()
        app = QgsApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(_shared.stop_for_unload)
    return _shared


def shared_endpoint(settings: PluginSettings | None = None) -> tuple[str, Path]:
    """Where the plugin's runs talk to: the engine the plugin runs while it runs, else the settings' engine. For
    callers that must not create the manager (Processing, without the panel)."""
    if _shared is not None:
        return _shared.endpoint()
    s = settings or PluginSettings.load()
    return s.engine_url.rstrip("/"), s.token_path()


def recheck_shared() -> None:
    """The settings changed: the panel's engine line looks again (nothing happens before the manager exists)."""
    if _shared is not None:
        _shared.recheck()


def release_shared_manager() -> None:
    """At plugin unload: stop the engine the plugin started (unless "keep running") and forget the manager."""
    global _shared
    manager, _shared = _shared, None
    if manager is None:
        return
    app = QgsApplication.instance()
    if app is not None:
        with contextlib.suppress(TypeError, RuntimeError):  # not connected
            app.aboutToQuit.disconnect(manager.stop_for_unload)
    manager.stop_for_unload()
    manager.deleteLater()
