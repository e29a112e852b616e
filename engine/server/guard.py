"""The engine's defences against connections that hold it without a token (issue 8.2).

Anyone on the machine can open connections to 127.0.0.1. Without these, 1,100 half-sent requests with
``ulimit -n 1024`` stopped the engine from answering at all, and asyncio logged "Too many open files" about
400 MB a minute. So:

- **A header deadline.** A request's headers must be complete within ``header_timeout_s`` of the connection
  (or of the previous response on a kept-alive one); otherwise the connection is closed.
- **A connection cap** below the file-descriptor limit. At the cap, a new connection evicts the oldest one
  still waiting for its headers; only when every connection is a real request in progress is the newcomer
  turned away. So ``/health`` keeps answering while half-sent requests pile up.
- **Rate-limited repeated log lines** (:class:`RepeatFilter`): the same message at most a few times per
  window, then one line saying how many were suppressed.
"""

from __future__ import annotations

import logging
import resource
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)


def connection_cap(reserve: int = 64, floor: int = 16) -> int:
    """The most connections to hold: the soft descriptor limit less ``reserve`` for the model's own files."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 65536
    return max(floor, int(soft) - reserve)


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline and a connection cap (see the module docstring)."""

    header_timeout_s: float = 5.0
    max_connections: int = 960
    #: connections still waiting for complete headers -> when they started (one event loop, so no lock)
    _waiting: dict[GuardedHttpTools, float] = {}  # noqa: RUF012 (shared on purpose)

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: Any = None
        if len(self.connections) > self.max_connections:
            victim = min((p for p in self._waiting if p is not self), key=self._waiting.get, default=None)
            if victim is None:  # every connection is a request in progress: turn the newcomer away
                transport.close()
                return
            victim.transport.close()
        self._arm()

    def _arm(self) -> None:
        self._waiting[self] = time.monotonic()
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        self._waiting.pop(self, None)
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expire(self) -> None:
        if self in self._waiting and self.transport is not None:
            self._waiting.pop(self, None)
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self not in self._waiting:  # the next request on a kept-alive connection
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


class RepeatFilter(logging.Filter):
    """Let the same message (logger, level, template) through at most ``burst`` times per ``window_s``."""

    def __init__(self, burst: int = 3, window_s: float = 10.0) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self._seen: dict[tuple[str, int, str], list[float]] = {}  # key -> [window start, count]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        entry = self._seen.get(key)
        if entry is None or now - entry[0] > self.window_s:
            suppressed = int(entry[1] - self.burst) if entry and entry[1] > self.burst else 0
            self._seen[key] = [now, 1]
            if suppressed:
                record.msg = f"{record.msg} ({suppressed} more like this suppressed)"
            if len(self._seen) > 1000:  # bounded memory
                self._seen.clear()
            return True
        entry[1] += 1
        return entry[1] <= self.burst
