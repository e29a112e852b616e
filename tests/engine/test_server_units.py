"""The server's pure pieces, without processes: body limit, Host check, token file, config, error mapping.

The HTTP plumbing tests at the bottom use a stub backend (no model): they cover failure modes a real
tiny model cannot produce on demand (out of memory, a crashing backend). Everything the real model
does is tested end to end in test_server.py.
"""

from __future__ import annotations

import argparse
import os
import stat

import anyio
import pytest

from engine.backend import ChatResult, ItemResult
from engine.server import (
    BodyLimitMiddleware,
    HostCheckMiddleware,
    ServeConfig,
    TokenAuthMiddleware,
    add_arguments,
    create_app,
    ensure_token,
    host_allowed,
    split_host_header,
    status_for,
)
from geo_r1_qgis.core.errors import (
    ConfigError,
    EngineOverloadedError,
    EngineUnavailableError,
    ModelNotFoundError,
)

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


def test_serve_refuses_a_readable_token_file_before_loading_anything(tmp_path, capsys):
    from engine.cli import main

    path = tmp_path / "engine.token"
    path.write_text("abc\n")
    path.chmod(0o644)
    assert main(["serve", "--model", str(tmp_path / "no-model"), "--token-file", str(path)]) == 1
    assert "chmod 600" in capsys.readouterr().err


def test_default_token_file_follows_xdg_config_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert ServeConfig(model="m").token_file == tmp_path / "geo-r1" / "engine.token"


# -- config ---------------------------------------------------------------------------------------


def _parse(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return ServeConfig.from_args(parser.parse_args(list(argv)))


def test_arguments_map_onto_the_config():
    c = _parse("--model", "m", "--adapter", "a=/x", "--adapter", "b=/y", "--port", "9000", "--max-body-mb", "0.5")
    assert c.adapters == (("a", "/x"), ("b", "/y"))
    assert c.port == 9000 and c.max_body_bytes == 512 * 1024
    assert c.host == "127.0.0.1" and c.backend == "local"


@pytest.mark.parametrize(
    ("argv", "fix"),
    [
        ((), "--model is required"),
        (("--model", "m", "--port", "0"), "--port"),
        (("--model", "m", "--adapter", "noequals"), "NAME=PATH"),
        (("--model", "m", "--max-items", "0"), "--max-items"),
        (("--model", "m", "--max-body-mb", "0"), "--max-body-mb"),
        (("--model", "m", "--max-expression-chars", "100000"), "--max-expression-chars"),
        (("--model", "m", "--base-url", "http://x/v1"), "--backend openai"),
        (("--backend", "openai"), "--base-url"),
        (("--backend", "openai", "--base-url", "x"), "http"),
        (("--backend", "openai", "--base-url", "http://x/v1", "--adapter", "a=/b"), "--lora-modules"),
    ],
)
def test_bad_config_names_the_fix(argv, fix):
    with pytest.raises(ConfigError, match=fix):
        _parse(*argv)


def test_url_brackets_ipv6():
    assert ServeConfig(model="m", host="::1", port=1).url == "http://[::1]:1"


def test_status_for_maps_the_error_hierarchy():
    class OutOfMemoryError(RuntimeError):  # what torch raises, recognised by name
        pass

    assert status_for(EngineOverloadedError("x")) == 503
    assert status_for(MemoryError()) == 503
    assert status_for(OutOfMemoryError()) == 503
    assert status_for(ModelNotFoundError("x")) == 404
    assert status_for(ConfigError("x")) == 422
    assert status_for(EngineUnavailableError("x")) == 502
    assert status_for(RuntimeError("x")) == 500


# -- HTTP plumbing with a stub backend --------------------------------------------------------------


class _StubBackend:
    """Answers instantly; ``fail`` makes the next ground() raise it."""

    def __init__(self):
        self.fail = None

    def info(self):
        return {"backend": "stub", "model": "stub-model", "adapter": None}

    def ground(self, items, settings):
        if self.fail is not None:
            exc, self.fail = self.fail, None
            raise exc
        return [
            ItemResult((), 0.0, None, None, "None", "none", False, it.image.size, it.image.size, 1, {"generate": 1.0})
            for it in items
        ]

    def chat(self, messages, images, settings, top_logprobs=0):
        return ChatResult("None", 3, 1, "stop", (("None", -0.1, {"None": -0.1, "[": -2.5}),) if top_logprobs else None)

    def adapters(self):
        return {"active": None, "available": {}}

    def load_adapter(self, name, path):
        raise ModelNotFoundError(f"no adapter at {path}")

    def activate_adapter(self, name):
        pass


@pytest.fixture
def stub_client(tmp_path):
    from starlette.testclient import TestClient

    backend = _StubBackend()
    app = create_app(backend, ServeConfig(model="m", token_file=tmp_path / "t"), "tok")
    with TestClient(app, base_url="http://127.0.0.1:8731", headers={"Authorization": "Bearer tok"}) as client:
        client.backend = backend
        yield client


def _ground(client):
    item = {"rgb": "AAAA", "width": 1, "height": 1, "expression": "tanks"}
    return client.post("/ground", json={"items": [item]})


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (MemoryError(), 503),
        (type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory"), 503),
        (EngineOverloadedError("lower --batch-size"), 503),
        (RuntimeError("boom"), 500),
        (EngineUnavailableError("remote down"), 502),
    ],
)
def test_backend_failures_become_json_errors_and_the_server_goes_on(stub_client, exc, status):
    stub_client.backend.fail = exc
    r = _ground(stub_client)
    assert r.status_code == status
    assert r.json()["error"]["code"] == status
    ok = _ground(stub_client)
    assert ok.status_code == 200
    assert ok.json()["items"][0]["timings_ms"].keys() >= {"decode", "generate"}


def test_unknown_route_and_wrong_method_are_json(stub_client):
    r = stub_client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = stub_client.get("/ground")
    assert r.status_code == 405 and r.json()["error"]["code"] == 405


def test_adapter_load_errors_map_to_404(stub_client):
    r = stub_client.post("/adapters", json={"name": "a", "path": "/nowhere"})
    assert r.status_code == 404 and "/nowhere" in r.json()["error"]["message"]


def test_a_busy_port_is_a_clear_error():
    import socket

    from engine.server import bind_socket

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
    from engine.server import is_loopback

    assert is_loopback(host) is loopback
