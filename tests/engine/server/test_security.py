"""engine/security.py without processes: body limit, Host check, bearer token, token file, binding."""

from __future__ import annotations

import os
import socket
import stat

import anyio
import pytest

from engine.server.security import (
    BodyLimitMiddleware,
    HostCheckMiddleware,
    TokenAuthMiddleware,
    bind_socket,
    ensure_token,
    host_allowed,
    is_loopback,
    split_host_header,
)
from geo_r1_qgis.core.errors import ConfigError

# -- a raw ASGI harness ---------------------------------------------------------------------------


def _run_asgi(app, *, headers=(), chunks=(b"",), path="/x", method="POST"):
    """Call an ASGI app once; return (status, body bytes, how many bytes the app read)."""
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
    }
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    anyio.run(app, scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], body


def _echo_app():
    """An ASGI app that reads the whole body and answers 200 with its length."""
    seen = {"called": False}

    async def app(scope, receive, send):
        seen["called"] = True
        total = 0
        while True:
            message = await receive()
            total += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(total).encode()})

    return app, seen


# -- body limit -----------------------------------------------------------------------------------


def test_body_limit_passes_a_body_at_the_limit():
    app, _ = _echo_app()
    status, body = _run_asgi(BodyLimitMiddleware(app, 10), chunks=(b"12345", b"67890"))
    assert (status, body) == (200, b"10")


def test_body_limit_refuses_a_declared_length_before_reading():
    app, seen = _echo_app()
    status, body = _run_asgi(BodyLimitMiddleware(app, 10), headers=[("Content-Length", "11")], chunks=(b"x" * 11,))
    assert status == 413 and b'"code": 413' in body
    assert not seen["called"]


def test_body_limit_counts_streamed_chunks_without_content_length():
    app, seen = _echo_app()
    status, body = _run_asgi(BodyLimitMiddleware(app, 10), chunks=(b"123456", b"789012", b"3"))
    assert status == 413 and b"--max-body-mb" in body
    assert seen["called"]


def test_body_limit_catches_a_lying_content_length():
    app, _ = _echo_app()
    status, _ = _run_asgi(BodyLimitMiddleware(app, 10), headers=[("Content-Length", "5")], chunks=(b"x" * 6, b"y" * 6))
    assert status == 413


def test_body_limit_rejects_a_non_numeric_content_length():
    app, _ = _echo_app()
    status, _ = _run_asgi(BodyLimitMiddleware(app, 10), headers=[("Content-Length", "ten")])
    assert status == 400


# -- Host check -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("127.0.0.1:8731", "127.0.0.1"),
        ("LOCALHOST", "localhost"),
        ("[::1]:8731", "::1"),
        ("[::1]", "::1"),
        ("example.com:80", "example.com"),
        ("", None),
        (None, None),
        ("::1", None),  # IPv6 must be bracketed
        ("[::1", None),
        ("[::1]x", None),
        ("host:port", None),
    ],
)
def test_split_host_header(header, name):
    assert split_host_header(header) == name


@pytest.mark.parametrize(
    ("header", "bound", "ok"),
    [
        ("127.0.0.1", "127.0.0.1", True),
        ("127.0.0.1:8731", "127.0.0.1", True),
        ("localhost:8731", "127.0.0.1", True),
        ("[::1]:8731", "127.0.0.1", True),
        ("evil.example:8731", "127.0.0.1", False),  # DNS rebinding
        ("192.168.1.5:8731", "127.0.0.1", False),
        ("192.168.1.5:8731", "192.168.1.5", True),  # the bound address itself
        ("myhost:8731", "myhost", True),
        ("192.168.1.5:8731", "0.0.0.0", True),  # wildcard bind: IP literals only
        ("[fe80::1]:8731", "::", True),
        ("evil.example", "0.0.0.0", False),
        (None, "127.0.0.1", False),
    ],
)
def test_host_allowed(header, bound, ok):
    assert host_allowed(header, bound) is ok


def test_host_check_middleware_answers_400_before_the_app():
    app, seen = _echo_app()
    mw = HostCheckMiddleware(app, "127.0.0.1")
    status, body = _run_asgi(mw, headers=[("Host", "attacker.example:8731")])
    assert status == 400 and b"invalid_host" in body and not seen["called"]
    assert _run_asgi(mw, headers=[])[0] == 400
    assert _run_asgi(mw, headers=[("Host", "localhost:1")])[0] == 200


# -- token ----------------------------------------------------------------------------------------


def test_token_middleware_needs_the_exact_bearer_token_except_on_health():
    app, _ = _echo_app()
    mw = TokenAuthMiddleware(app, "s3cret")
    assert _run_asgi(mw, headers=[("Authorization", "Bearer s3cret")])[0] == 200
    assert _run_asgi(mw, headers=[("Authorization", "bearer s3cret")])[0] == 200
    assert _run_asgi(mw, headers=[("Authorization", "Bearer s3cre")])[0] == 401
    assert _run_asgi(mw, headers=[("Authorization", "Basic s3cret")])[0] == 401
    assert _run_asgi(mw, headers=[("Authorization", "Bearer sécret")])[0] == 401
    assert _run_asgi(mw)[0] == 401
    assert _run_asgi(mw, path="/health", method="GET")[0] == 200


def test_ensure_token_creates_a_private_file_in_a_private_dir_and_reuses_it(tmp_path):
    path = tmp_path / "cfg" / "geo-r1" / "engine.token"
    token = ensure_token(path)
    assert len(token) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert ensure_token(path) == token


def test_ensure_token_keeps_working_under_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        path = tmp_path / "t" / "engine.token"
        ensure_token(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_ensure_token_refuses_a_file_others_can_read(tmp_path, mode):
    path = tmp_path / "engine.token"
    path.write_text("abc\n")
    path.chmod(mode)
    with pytest.raises(ConfigError, match="chmod 600"):
        ensure_token(path)


def test_ensure_token_refuses_an_empty_file(tmp_path):
    path = tmp_path / "engine.token"
    path.write_text("\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="empty"):
        ensure_token(path)


# -- binding ---------------------------------------------------------------------------------------


def test_a_busy_port_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match="another engine"):
            bind_socket("127.0.0.1", port)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("::1", True), ("0.0.0.0", False),
     ("192.168.1.5", False), ("myhost", False)],
)  # fmt: skip
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback
