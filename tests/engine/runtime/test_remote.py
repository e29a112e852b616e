"""RemoteBackend against a real engine's OpenAI-compatible ``/v1``.

Engine A runs the tiny format-trained model locally. Engine B is a second ``geo-r1 serve`` with
``--backend openai --base-url <A>/v1``: its ``/ground`` goes through RemoteBackend to A's
``/v1/chat/completions``. Greedy decoding of the same prompt on the same model must give both the same
text, and both must put the boxes in the pixels of the image the client sent.
"""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from engine.runtime.backend import GenerationSettings, GroundItem
from engine.runtime.remote import (
    RemoteBackend,
    image_data_uri,
    png_data_uri,
    to_openai_messages,
    token_logprobs,
)
from geo_r1_qgis.core.errors import ConfigError, EngineRequestError, EngineUnavailableError
from geo_r1_qgis.core.rules.coords import model_input_size

# The shared process helpers live beside this file (pytest runs with --import-mode=importlib).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _serve_helpers import CLEAN_EXIT, assert_error, b64, free_port, noise_image, start_engine
from _stand_in import start_stand_in

NAIP = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "naip_m_4709963_se_14_20200831.tif"

KEY_VAR = "GEO_R1_TEST_REMOTE_KEY"
SETTINGS = {"max_new_tokens": 96}


@pytest.fixture(scope="module")
def engines(tiny_format_model_dir, tmp_path_factory):
    a = start_engine(tmp_path_factory.mktemp("engine-a"), ["--model", str(tiny_format_model_dir)])
    try:
        b = start_engine(
            tmp_path_factory.mktemp("engine-b"),
            ["--backend", "openai", "--base-url", f"{a.url}/v1", "--api-key-env", KEY_VAR, "--concurrency", "4"],
            env={KEY_VAR: a.token},
        )
    except BaseException:
        a.stop()
        raise
    yield a, b
    assert b.stop() in CLEAN_EXIT, b.log_tail()
    assert a.stop() in CLEAN_EXIT, a.log_tail()


def _items():
    # Sizes smart_resize changes (so an unscaled box would be off), REC and multi, both prompt styles.
    return [
        {"rgb": b64(noise_image(500, 380, 1).tobytes()), "width": 500, "height": 380,
         "expression": "the largest storage tank", "task": "rec"},
        {"rgb": b64(noise_image(333, 250, 2).tobytes()), "width": 333, "height": 250,
         "expression": "all storage tanks", "task": "multi"},
        {"rgb": b64(noise_image(200, 150, 3).tobytes()), "width": 200, "height": 150,
         "expression": "the ship", "task": "rec", "reasoning": False},
    ]  # fmt: skip


@pytest.mark.slow
def test_second_engine_grounds_through_the_first_engines_v1(engines):
    a, b = engines
    with a.client() as ca, b.client() as cb:
        info_b = cb.get("/info").json()
        assert info_b["backend"] == "openai" and info_b["model"] == ca.get("/v1/models").json()["data"][0]["id"]
        # One item per request: A then runs batches of one, exactly like the chat route B calls.
        answers = []
        for item in _items():
            ra = ca.post("/ground", json={"items": [item], **SETTINGS})
            rb = cb.post("/ground", json={"items": [item], **SETTINGS})
            assert ra.status_code == 200, ra.text
            assert rb.status_code == 200, rb.text
            answers.append((item, ra.json()["items"][0], rb.json()["items"][0]))
        many = cb.post("/ground", json={"items": _items(), **SETTINGS})  # B's concurrent fan-out
        assert many.status_code == 200, many.text
        assert [it["raw_text"] for it in many.json()["items"]] == [ib["raw_text"] for _, _, ib in answers]
    found_boxes = False
    for item, ia, ib in answers:
        w, h = item["width"], item["height"]
        for res in (ia, ib):
            assert res["image_size"] == [w, h] and res["model_size"] == list(model_input_size((w, h)))
            assert 0.0 <= res["presence"] <= 1.0
            assert {"decode", "preprocess", "generate", "parse"} <= res["timings_ms"].keys()
            for box in res["boxes"]:
                x1, y1, x2, y2 = box["bbox"]
                assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
                assert 0.0 < box["score"] <= 1.0
            found_boxes = found_boxes or bool(res["boxes"])
        # Same prompt, same model, greedy: same text, same boxes, same confidences.
        assert ib["raw_text"] == ia["raw_text"]
        assert [c for x in ib["boxes"] for c in x["bbox"]] == pytest.approx([c for x in ia["boxes"] for c in x["bbox"]])
        assert [x["score"] for x in ib["boxes"]] == pytest.approx([x["score"] for x in ia["boxes"]], abs=1e-3)
        assert ib["tokens_generated"] == ia["tokens_generated"]
    assert found_boxes, "the format-trained tiny model should write at least one box"


@pytest.mark.slow
def test_second_engine_chat_and_errors_pass_through(engines):
    _, b = engines
    with b.client() as cb:
        model_id = cb.get("/v1/models").json()["data"][0]["id"]
        body = {
            "model": model_id,
            "messages": [{"role": "user", "content": "Find the storage tanks."}],
            "max_tokens": 4,
            "logprobs": True,
            "top_logprobs": 2,
        }
        r = cb.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        content = r.json()["choices"][0]["logprobs"]["content"]
        assert 0 < len(content) <= 4 and all(len(t["top_logprobs"]) <= 2 for t in content)
        assert_error(cb.post("/adapters", json={"name": "x", "path": "/tmp"}), 422, "--lora-modules")
        assert_error(cb.post("/adapters/active", json={"name": "x"}), 404)
        assert cb.post("/adapters/active", json={"name": None}).status_code == 200
        # A corrupt image is refused by B itself, before anything goes to A.
        bad = {"items": [{"image": b64(b"\x89PNG\r\n\x1a\nbroken"), "expression": "x"}]}
        assert_error(cb.post("/ground", json=bad), 400, "items[0]")


@pytest.mark.slow
def test_remote_backend_in_process(engines):
    a, _ = engines
    backend = RemoteBackend(f"{a.url}/v1", api_key=a.token, concurrency=2)
    try:
        assert backend.model == httpx.get(f"{a.url}/v1/models", headers={"Authorization": f"Bearer {a.token}"},
                                          trust_env=False).json()["data"][0]["id"]  # fmt: skip
        items = [GroundItem(noise_image(300, 200, s), "all storage tanks", "multi") for s in range(3)]
        results = backend.ground(items, GenerationSettings(max_new_tokens=32))
        assert [r.image_size for r in results] == [(300, 200)] * 3
        assert all(r.model_size == model_input_size((300, 200)) for r in results)
        with pytest.raises(ConfigError, match="--lora-modules"):
            backend.load_adapter("x", "/tmp")
    finally:
        backend.close()
    wrong = RemoteBackend(f"{a.url}/v1", api_key="wrong-key", model="m")
    try:
        with pytest.raises(EngineRequestError, match="api-key-env") as exc_info:
            wrong.ground([GroundItem(noise_image(28, 28), "x")], GenerationSettings(max_new_tokens=2))
        assert exc_info.value.status == 401
    finally:
        wrong.close()


# -- without processes ------------------------------------------------------------------------------


def test_an_unreachable_server_names_the_url_and_what_to_run():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(EngineUnavailableError, match="vllm serve") as exc_info:
        RemoteBackend(url)
    assert url in str(exc_info.value)


def test_an_unreachable_server_with_a_model_fails_on_the_first_request():
    backend = RemoteBackend(f"http://127.0.0.1:{free_port()}/v1", model="m")
    try:
        with pytest.raises(EngineUnavailableError, match="geo-r1 serve"):
            backend.ground([GroundItem(noise_image(28, 28), "x")], GenerationSettings(max_new_tokens=2))
    finally:
        backend.close()


def test_messages_become_openai_parts_with_images_in_order():
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}, {"type": "image"}]},
    ]
    out = to_openai_messages(messages, ["data:1", "data:2"])
    assert out[0] == {"role": "system", "content": "s"}
    assert [p.get("image_url", {}).get("url") for p in out[1]["content"]] == ["data:1", None, "data:2"]
    with pytest.raises(ConfigError):
        to_openai_messages(messages, ["data:1"])
    with pytest.raises(ConfigError):
        to_openai_messages(messages, ["data:1", "data:2", "data:3"])


def test_token_logprobs_sums_none_like_alternatives():
    logprobs = {
        "content": [
            {"token": "<answer>", "logprob": -0.1, "top_logprobs": [{"token": "<answer>", "logprob": -0.1}]},
            {
                "token": "[",
                "logprob": -0.5,
                "top_logprobs": [
                    {"token": "[", "logprob": -0.5},
                    {"token": "None", "logprob": -1.6094379},  # p = 0.2
                    {"token": " none", "logprob": -2.3025851},  # p = 0.1
                ],
            },
        ]
    }
    pieces, chosen, none_probs, alts = token_logprobs(logprobs)
    assert pieces == ["<answer>", "["] and chosen == [-0.1, -0.5]
    assert none_probs[0] == 0.0 and none_probs[1] == pytest.approx(0.3, abs=1e-6)
    assert set(alts[1]) == {"[", "None", " none"}
    assert token_logprobs(None) == ([], [], [], [])


def test_remote_backend_checks_its_arguments():
    with pytest.raises(ConfigError, match="http"):
        RemoteBackend("localhost:8000/v1", model="m")
    with pytest.raises(ConfigError, match="concurrency"):
        RemoteBackend("http://127.0.0.1:1/v1", model="m", concurrency=0)


# -- the per-tile encoding and the retries (issue 20 §1) ----------------------------------------------


def _naip_tile(size: int = 504) -> np.ndarray:
    import rasterio

    with rasterio.open(NAIP) as ds:
        return np.ascontiguousarray(ds.read((1, 2, 3), window=((0, size), (0, size))).transpose(1, 2, 0))


@pytest.mark.parametrize("level", [0, 1, 6])
@pytest.mark.parametrize("kind", ["naip", "noise", "odd", "rgba"])
def test_the_png_of_a_tile_holds_exactly_its_pixels(kind, level):
    rng = np.random.default_rng(level)
    arrays = {"naip": lambda: _naip_tile(), "noise": lambda: rng.integers(0, 256, (504, 504, 3), dtype=np.uint8),
              "odd": lambda: rng.integers(0, 256, (37, 501, 3), dtype=np.uint8),
              "rgba": lambda: rng.integers(0, 256, (30, 20, 4), dtype=np.uint8)}  # fmt: skip
    array = arrays[kind]()
    image = Image.fromarray(array)
    uri = image_data_uri(image, level)
    assert uri.startswith(b"data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(uri.split(b",", 1)[1])))
    decoded.load()  # checks the CRCs and the zlib stream
    assert decoded.mode == "RGB" and decoded.size == image.size
    assert np.array_equal(np.asarray(decoded), array[..., :3])
    assert png_data_uri(image, level) == uri.decode("ascii")


def test_the_request_body_is_the_payload_with_the_image_spliced_in():
    backend = RemoteBackend("http://127.0.0.1:1/v1", model="m")
    try:
        payload = {"model": "m", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": backend._placeholder}},
            {"type": "text", "text": 'find "tanks" – ünïcode'}]}]}  # fmt: skip
        uri = image_data_uri(noise_image(28, 28))
        decoded = json.loads(backend._body(payload, uri))
        assert decoded["messages"][0]["content"][0]["image_url"]["url"] == uri.decode("ascii")
        assert decoded["messages"][0]["content"][1]["text"] == 'find "tanks" – ünïcode'
        with pytest.raises(ConfigError, match="placeholder"):
            backend._body({"no": "image"}, uri)
    finally:
        backend.close()


def _noise_items(n: int) -> list[GroundItem]:
    return [GroundItem(noise_image(56, 56, seed=k), "all storage tanks", task="multi") for k in range(n)]


def test_transient_faults_of_the_server_are_retried():
    # Every 2nd completion fails, in turn: a dropped connection, 502, 503, 429 with Retry-After 0.
    stand_in = start_stand_in("--delay", "0", "--fault", "drop,502,503,429", "--fault-every", "2", "--retry-after", "0")
    backend = RemoteBackend(stand_in.base_url, concurrency=2, retries=3)
    try:
        results = backend.ground(_noise_items(8), GenerationSettings(max_new_tokens=64))
        faults = stand_in.stats()["faults"]
        assert len(results) == 8 and all(r.parse_status in ("ok", "none") for r in results)
        assert set(faults) == {"drop", "502", "503", "429"}, faults
        # the same items without faults: the same answers (a retry asks again, it changes nothing)
        stand_in.control(fault_every=0)
        again = backend.ground(_noise_items(8), GenerationSettings(max_new_tokens=64))
        assert [r.raw_text for r in again] == [r.raw_text for r in results]
    finally:
        backend.close()
        stand_in.stop()


def test_a_persistent_fault_ends_after_the_retries_with_the_servers_error():
    stand_in = start_stand_in("--delay", "0", "--fault", "502", "--fault-every", "1")
    backend = RemoteBackend(stand_in.base_url, concurrency=1, retries=2)
    try:
        with pytest.raises(EngineRequestError, match="502") as exc_info:
            backend.ground(_noise_items(1), GenerationSettings(max_new_tokens=64))
        assert exc_info.value.status == 502
        assert stand_in.stats()["received"] == 3  # the first try and two retries, then the error
        stand_in.control(fault="429", retry_after=0)
        stand_in.reset()
        with pytest.raises(EngineRequestError, match="429"):
            backend.ground(_noise_items(1), GenerationSettings(max_new_tokens=64))
        assert stand_in.stats()["received"] == 3
        stand_in.control(fault_every=0)
        assert backend.ground(_noise_items(1), GenerationSettings(max_new_tokens=64))[0].raw_text
    finally:
        backend.close()
        stand_in.stop()
