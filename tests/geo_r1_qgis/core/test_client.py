"""The engine client (standard library only): values, token handling and failures without an engine.

The client against a real engine is exercised by tests/geo_r1_qgis/test_processing.py (QGIS's Python)
and tests/engine/test_ground.py (the venv).
"""

import socket

import numpy as np
import pytest

from geo_r1_qgis.core.client import EngineClient, TileImage, default_token_path, read_token
from geo_r1_qgis.core.errors import ConfigError, EngineRequestError, EngineUnavailableError


def test_tile_image_from_array_is_a_flat_view_in_row_major_order():
    arr = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    tile = TileImage.from_array(arr)
    assert (tile.width, tile.height) == (3, 2)
    assert bytes(tile.rgb) == arr.tobytes()
    transposed = np.ascontiguousarray(arr.transpose(1, 0, 2))[:, :, :]  # (3, 2, 3)
    view = transposed[::-1]  # not C-contiguous
    assert bytes(TileImage.from_array(view).rgb) == view.tobytes(order="C")


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"rgb": b"\x00" * 12, "width": 0, "height": 4}, "positive"),
        ({"rgb": b"\x00" * 11, "width": 2, "height": 2}, "do not match"),
    ],
)
def test_tile_image_checks_itself(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        TileImage(**kwargs)


def test_tile_image_rejects_non_rgb_arrays():
    with pytest.raises(ConfigError, match="uint8"):
        TileImage.from_array(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ConfigError, match="uint8"):
        TileImage.from_array(np.zeros((4, 4, 4), dtype=np.uint8))


def test_default_token_path_honours_xdg_config_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert default_token_path() == tmp_path / "geo-r1" / "engine.token"


def test_read_token_errors_say_how_to_get_one(tmp_path):
    with pytest.raises(EngineUnavailableError, match="geo-r1 serve"):
        read_token(tmp_path / "missing.token")
    empty = tmp_path / "empty.token"
    empty.write_text("  \n")
    with pytest.raises(EngineUnavailableError, match="empty"):
        read_token(empty)
    good = tmp_path / "good.token"
    good.write_text("abc123\n")
    assert read_token(good) == "abc123"


def test_client_url_must_be_http():
    with pytest.raises(ConfigError, match="http"):
        EngineClient("ftp://127.0.0.1:1")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_engine_that_is_down_gives_one_clear_error():
    client = EngineClient(f"http://127.0.0.1:{_closed_port()}", token="t", timeout_s=5)
    with pytest.raises(EngineUnavailableError, match="geo-r1 serve"):
        client.ground([TileImage(b"\x00" * 12, 2, 2)], "all tanks")
    with pytest.raises(EngineUnavailableError, match="did not become ready"):
        client.wait_until_ready(total_timeout_s=0.5, poll_s=0.1)


@pytest.mark.parametrize(("limit", "sent"), [(None, "absent"), (300, 300)])
def test_the_generation_limit_is_left_to_the_engine_unless_given(monkeypatch, limit, sent):
    import json

    captured = {}

    def fake_request(self, method, path, body=None, raw=None, **_):
        payload = raw[0]
        n = int.from_bytes(payload[:4], "big")
        captured["header"] = json.loads(payload[4 : 4 + n])
        return {"items": []}

    monkeypatch.setattr(EngineClient, "_request", fake_request)
    tile = TileImage.from_array(np.zeros((28, 28, 3), dtype=np.uint8))
    with pytest.raises(Exception, match="0 results for 1 tiles"):
        EngineClient("http://127.0.0.1:1").ground([tile], "tanks", max_new_tokens=limit)
    assert captured["header"].get("max_new_tokens", "absent") == sent


def _fake_server(answer_health):
    """A server on a free port that answers anything with 200 JSON and records the headers it got."""
    import http.server
    import json
    import threading

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            body = json.dumps(answer_health(self.path)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


def test_the_token_never_goes_to_a_server_that_cannot_prove_it_holds_it():
    """Issue 8.9: before, a fake server on the engine's port received 'Bearer <token>' on /health, /info
    and /ground/tiles."""
    server, seen = _fake_server(lambda path: {"status": "ok", "model": "fake"})
    try:
        client = EngineClient(f"http://127.0.0.1:{server.server_address[1]}", token="s3cret")
        client.health()
        with pytest.raises(EngineRequestError, match="did not prove") as err:
            client.info()
        assert err.value.status == 401
        tile = TileImage.from_array(np.zeros((28, 28, 3), dtype=np.uint8))
        with pytest.raises(EngineRequestError, match="did not prove"):
            client.ground([tile], "tanks")
    finally:
        server.shutdown()
    assert seen, "the client never asked"
    assert all(auth is None for _, auth in seen), seen
    assert any(path.startswith("/health?challenge=") for path, _ in seen)


def test_a_server_that_proves_it_gets_the_token():
    from urllib.parse import parse_qs, urlparse

    from geo_r1_qgis.core.client import health_proof

    def answer(path):
        q = parse_qs(urlparse(path).query)
        if "challenge" in q:
            return {"status": "ok", "proof": health_proof("s3cret", q["challenge"][0])}
        return {"model": "m"}

    server, seen = _fake_server(answer)
    try:
        client = EngineClient(f"http://127.0.0.1:{server.server_address[1]}", token="s3cret")
        assert client.info() == {"model": "m"}
        assert client.info() == {"model": "m"}  # proven once per token
    finally:
        server.shutdown()
    assert [auth for path, auth in seen if path == "/info"] == ["Bearer s3cret", "Bearer s3cret"]
    assert sum(path.startswith("/health?challenge=") for path, _ in seen) == 1
