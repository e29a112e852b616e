"""Retrying a request after a transient fault, with bounded backoff: one policy for the client and the engine.

A run of thousands of tiles should not die of one dropped connection. :class:`EngineClient`
(:mod:`.client`) retries a request to the engine, and the engine's remote backend
(``engine/runtime/remote.py``) retries a completion of the OpenAI-compatible server behind it, on the same
faults with the same policy:

* the connection was refused, reset or closed before an answer (not a timeout: a request that took the
  whole timeout is not tried again for as long);
* HTTP 502 (bad gateway), 503 (unavailable, or our engine short of memory) and 429 (too many requests).
  A ``Retry-After`` header (seconds or an HTTP date) is honoured, up to :attr:`RetryPolicy.max_retry_after_s`.

Between tries the wait doubles from ``base_s`` up to ``max_s``, with jitter (so that many requests failing
together do not come back together). After ``attempts`` tries the last error is raised as it was: the caller
stops cleanly (``geo-r1 ground`` keeps the finished tiles and advises ``--resume``). A retry repeats a
*request*; the pipeline writes each tile once, whatever happened to its requests.

Pure: the standard library only.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .errors import ConfigError

log = logging.getLogger(__name__)

#: the HTTP statuses worth another try
TRANSIENT_STATUSES = frozenset({429, 502, 503})

T = TypeVar("T")


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: a number of seconds or an HTTP date; None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class Transient:
    """Marks an exception as worth another try: ``retry_after`` is the server's wish in seconds, if it said."""

    def __init__(self, error: BaseException, retry_after: float | None = None) -> None:
        self.error = error
        self.retry_after = retry_after


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry (see the module docstring). ``attempts`` counts the first try."""

    attempts: int = 4
    base_s: float = 0.25
    max_s: float = 4.0
    max_retry_after_s: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise ConfigError(f"retry attempts must be an integer >= 1 (1: no retry), got {self.attempts!r}")
        if not (0.0 <= self.base_s <= self.max_s) or not self.max_retry_after_s >= 0.0:
            raise ConfigError(f"retry waits must satisfy 0 <= base_s <= max_s, got {self.base_s} and {self.max_s}")

    def wait_s(self, retry: int, retry_after: float | None = None) -> float:
        """The wait before retry number ``retry`` (1 for the first): the server's Retry-After, else backoff."""
        if retry_after is not None:
            return min(self.max_retry_after_s, retry_after)
        backoff = min(self.max_s, self.base_s * 2 ** (retry - 1))
        return backoff * random.uniform(0.5, 1.0)  # nosec B311 - jitter, not security

    def call(
        self,
        fn: Callable[[], T],
        classify: Callable[[BaseException], Transient | None],
        what: str = "request",
        sleep: Callable[[float], None] = time.sleep,
    ) -> T:
        """``fn()``, tried again while ``classify`` calls its error transient, at most ``attempts`` times in all."""
        retry = 0
        while True:
            try:
                return fn()
            except Exception as exc:
                transient = classify(exc)
                retry += 1
                if transient is None or retry >= self.attempts:
                    raise
                wait = self.wait_s(retry, transient.retry_after)
                log.warning("%s failed (%s); try %d of %d in %.2f s", what, exc, retry + 1, self.attempts, wait)
                sleep(wait)


def transient_error(exc: BaseException) -> Transient | None:
    """Whether an error of a request is worth another try: it carries a transient HTTP ``status`` (429, 502,
    503; with the server's ``retry_after``), or ``transient`` true (a connection refused, reset or closed
    without an answer). A timeout or any other status is not. The client (:mod:`.client`) and the engine's
    remote backend set these attributes on the errors they raise."""
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return Transient(exc, getattr(exc, "retry_after", None)) if status in TRANSIENT_STATUSES else None
    return Transient(exc) if getattr(exc, "transient", False) else None


#: no retry at all (one try)
NO_RETRY = RetryPolicy(attempts=1)
