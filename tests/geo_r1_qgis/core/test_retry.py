"""Tests of geo_r1_qgis/core/retry.py: the one retry policy of the client and the engine's remote backend."""

from __future__ import annotations

import email.utils

import pytest

from geo_r1_qgis.core.errors import ConfigError, EngineOverloadedError, EngineRequestError, EngineUnavailableError
from geo_r1_qgis.core.retry import RetryPolicy, Transient, parse_retry_after, transient_error


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, None), ("", None), ("3", 3.0), ("0.5", 0.5), ("-2", 0.0), ("soon", None)],
)
def test_retry_after_seconds(header, expected):
    assert parse_retry_after(header) == expected


def test_retry_after_http_date():
    now = 1_700_000_000.0
    assert parse_retry_after(email.utils.formatdate(now + 7, usegmt=True), now=now) == pytest.approx(7.0)
    assert parse_retry_after(email.utils.formatdate(now - 7, usegmt=True), now=now) == 0.0


def test_waits_double_up_to_the_bound_and_honour_retry_after():
    policy = RetryPolicy(attempts=6, base_s=0.5, max_s=2.0, max_retry_after_s=10.0)
    for retry, most in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 2.0), (5, 2.0)):
        wait = policy.wait_s(retry)
        assert most / 2 <= wait <= most
    assert policy.wait_s(1, retry_after=3.0) == 3.0
    assert policy.wait_s(1, retry_after=60.0) == 10.0


def test_call_retries_transient_errors_then_gives_up_with_the_last():
    policy = RetryPolicy(attempts=3, base_s=0.0, max_s=0.0)
    waits: list[float] = []
    tries = {"n": 0}

    def flaky() -> str:
        tries["n"] += 1
        if tries["n"] < 3:
            raise EngineRequestError(f"502 number {tries['n']}", 502)
        return "ok"

    assert policy.call(flaky, transient_error, sleep=waits.append) == "ok"
    assert tries["n"] == 3 and len(waits) == 2

    tries["n"] = -10
    with pytest.raises(EngineRequestError, match="502 number -7"):
        policy.call(flaky, transient_error, sleep=waits.append)
    assert tries["n"] == -7  # three tries in all


def test_call_does_not_retry_a_refused_request():
    calls = []

    def refused() -> None:
        calls.append(1)
        raise EngineRequestError("422: bad value", 422)

    with pytest.raises(EngineRequestError):
        RetryPolicy(attempts=5).call(refused, transient_error, sleep=lambda s: None)
    assert len(calls) == 1


def test_which_client_errors_are_transient():
    def err(cls, *args, **attrs):
        e = cls(*args)
        for k, v in attrs.items():
            setattr(e, k, v)
        return e

    assert isinstance(transient_error(err(EngineRequestError, "x", 502)), Transient)
    assert transient_error(err(EngineRequestError, "x", 429, retry_after=2.0)).retry_after == 2.0
    assert transient_error(err(EngineOverloadedError, "x", status=503)) is not None
    assert transient_error(err(EngineUnavailableError, "reset", transient=True)) is not None
    assert transient_error(err(EngineUnavailableError, "timed out", transient=False)) is None
    assert transient_error(err(EngineRequestError, "x", 401)) is None
    assert transient_error(ValueError("x")) is None


def test_policy_checks_itself():
    with pytest.raises(ConfigError, match="attempts"):
        RetryPolicy(attempts=0)
    with pytest.raises(ConfigError, match="base_s"):
        RetryPolicy(base_s=5.0, max_s=1.0)
