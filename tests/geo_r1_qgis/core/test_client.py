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


LIMITS = {
    "max_body_bytes": 64 * 2**20,
    "max_image_pixels": 16_777_216,
    "max_items": 64,
    "max_expression_chars": 500,
    "max_prompt_tokens": None,
    "max_new_tokens": 4096,
}  # an engine's defaults, as /info reports them


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"expression": "x" * 501}, ("501 characters", "at most 500")),
        ({"largest_tile": (4097, 4096)}, ("4097 × 4096", "16,777,216 pixels", "tile size")),
        ({"items": 65, "largest_tile": (56, 56)}, ("65 tiles per request", "--max-items 65")),
        ({"items": 8, "largest_tile": (2048, 2048)}, ("96.0 MiB", "at most 64.0 MiB", "--max-body-mb")),
        ({"max_new_tokens": 4097}, ("4097", "at most 4096", "Settings")),
    ],
)
def test_a_run_over_an_engine_limit_is_refused_with_what_to_do(kwargs, fragments):
    from geo_r1_qgis.core.client import check_limits

    args = {"expression": "all storage tanks", "largest_tile": (504, 504), "items": 8, "max_new_tokens": None,
            **kwargs}  # fmt: skip
    with pytest.raises(ConfigError) as exc:
        check_limits(LIMITS, **args)
    for fragment in fragments:
        assert fragment in str(exc.value), str(exc.value)


def test_a_run_within_the_limits_passes_and_missing_limits_are_not_guessed():
    from geo_r1_qgis.core.client import check_limits, request_bytes

    check_limits(LIMITS, expression="x" * 500, largest_tile=(4096, 4096), items=1, max_new_tokens=4096)
    check_limits({}, expression="x" * 5000, largest_tile=(9999, 9999), items=999, max_new_tokens=99999)
    # the body estimate is at least what the client really sends
    tile = TileImage(b"\x00" * (56 * 56 * 3), 56, 56)
    import json

    head = json.dumps({"items": [{"width": 56, "height": 56, "expression": "all tanks", "task": "multi",
                                  "reasoning": True}] * 3}).encode()  # fmt: skip
    assert request_bytes("all tanks", 3, 56, 56) >= 4 + len(head) + 3 * len(tile.rgb)


def test_an_engine_error_reads_as_words_and_the_detail_goes_to_the_log(caplog):
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b'{"error": {"message": "items[0].expression is empty", "type": "invalid", "code": 422}}'
            self.send_response(422)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = EngineClient(f"http://127.0.0.1:{server.server_address[1]}")
        with caplog.at_level("WARNING", logger="geo_r1_qgis.core.client"), pytest.raises(EngineRequestError) as exc:
            client.ground([TileImage(b"\x00" * 12, 2, 2)], "x")
    finally:
        server.shutdown()
        server.server_close()
    text = str(exc.value)
    assert exc.value.status == 422 and "refused a value" in text and "items[0].expression is empty" in text
    assert "POST" not in text and "/ground/tiles" not in text and "->" not in text, text
    assert "POST" in caplog.text and "/ground/tiles -> 422" in caplog.text
