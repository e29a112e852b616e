"""The server's pure pieces, without processes: config, error mapping, and the app around a stub backend.

The middleware and the token file are tested in test_security.py, the request models and decoding in
test_api_models.py, the OpenAI-shaped helpers in test_openai_compat.py.

The HTTP plumbing tests at the bottom use a stub backend (no model): they cover failure modes a real
tiny model cannot produce on demand (out of memory, a crashing backend). Everything the real model
does is tested end to end in test_server.py.
"""

from __future__ import annotations

import argparse

import pytest

from engine.cli.options import config_from_args
from engine.cli.serve import add_arguments
from engine.runtime.backend import ChatResult, ItemResult
from engine.server.app import ServeConfig, create_app, status_for
from geo_r1_qgis.core.errors import (
    ConfigError,
    EngineOverloadedError,
    EngineUnavailableError,
    ModelNotFoundError,
)

# -- token file at start ---------------------------------------------------------------------------


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
    return config_from_args(ServeConfig, parser.parse_args(list(argv)))


def test_arguments_map_onto_the_config():
    c = _parse("--model", "m", "--adapter", "a=/x", "--adapter", "b=/y", "--port", "9000", "--max-body-mb", "0.5")
    assert c.adapters == (("a", "/x"), ("b", "/y"))
    assert _parse("--model", "m", "--adapter", "./runs/rec10").adapters == (("rec10", "./runs/rec10"),)
    assert c.port == 9000 and c.max_body_bytes == 512 * 1024
    assert c.host == "127.0.0.1" and c.backend == "local"


@pytest.mark.parametrize(
    ("argv", "fix"),
    [
        ((), "--model is required"),
        (("--model", "m", "--port", "0"), "--port"),
        (("--model", "m", "--adapter", "=./runs/x"), "NAME=PATH"),
        (("--model", "m", "--adapter", "a=/x", "--adapter", "/y/a"), "two adapters are named"),
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
    assert status_for(RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried")) == 503
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


def test_threads_default_leaves_a_core_and_waits_passively(monkeypatch):
    from engine.runtime import threads

    assert threads.default_threads(1) == 1
    assert threads.default_threads(2) == 1
    assert threads.default_threads(16) == 15
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    threads.prepare_environment()
    import os

    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    threads.prepare_environment()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"  # the user's choice is kept


def test_threads_must_be_positive():
    from engine.server.app import ServeConfig
    from geo_r1_qgis.core.errors import ConfigError

    with pytest.raises(ConfigError, match="--threads"):
        ServeConfig(model="m", threads=0)
