"""``geo-r1 serve`` end to end: one real engine process on the tiny format-trained Qwen2.5-VL.

Every route, the token, the Host check, the limits, malformed input, adapters, concurrency and the
OpenAI-compatible routes through the official ``openai`` client. After every test the engine must
still answer ``/health`` (nothing a client sends takes it down).
"""

from __future__ import annotations

import stat
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from geo_r1_qgis.core.rules.coords import model_input_size

# The shared process helpers live beside this file (pytest runs with --import-mode=importlib).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _serve_helpers import CLEAN_EXIT, assert_error, b64, data_uri, encoded, noise_image, serving, start_engine

pytestmark = pytest.mark.slow

LIMITS = {"max_items": 4, "max_body_mb": 2.0, "max_image_pixels": 1_000_000, "max_expression_chars": 60}
FAST = {"max_new_tokens": 48}


@pytest.fixture(scope="module")
def engine(tiny_format_model_dir, tmp_path_factory):
    args = ["--model", str(tiny_format_model_dir), "--batch-size", "4", "--concurrency", "4"]
    args += ["--max-items", str(LIMITS["max_items"]), "--max-body-mb", str(LIMITS["max_body_mb"])]
    args += ["--max-image-pixels", str(LIMITS["max_image_pixels"])]
    args += ["--max-expression-chars", str(LIMITS["max_expression_chars"])]
    yield from serving(tmp_path_factory.mktemp("engine"), args)


@pytest.fixture
def api(engine):
    with engine.client() as client:
        yield client
    # Whatever the test sent, the engine still serves.
    assert httpx.get(engine.url + "/health", timeout=10, trust_env=False).status_code == 200, engine.log_tail()


def _rgb_item(w, h, seed=0, **kw):
    data = noise_image(w, h, seed).tobytes()
    return {"rgb": b64(data), "width": w, "height": h, "expression": "all storage tanks", **kw}


def _png_item(w, h, seed=0, **kw):
    return {"image": b64(encoded(noise_image(w, h, seed))), "expression": "all storage tanks", **kw}


def _check_item(item, size):
    w, h = size
    assert item["image_size"] == [w, h]
    assert item["model_size"] == list(model_input_size((w, h)))
    assert 0.0 <= item["presence"] <= 1.0
    assert isinstance(item["raw_text"], str) and isinstance(item["parse_status"], str)
    assert 0 < item["tokens_generated"] <= FAST["max_new_tokens"]
    assert {"decode", "preprocess", "generate", "parse"} <= item["timings_ms"].keys()
    for box in item["boxes"]:
        x1, y1, x2, y2 = box["bbox"]
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h, (box, size)
        assert 0.0 <= box["score"] <= 1.0


# -- token, Host, health ----------------------------------------------------------------------------


def test_token_file_is_created_private_and_holds_the_token(engine):
    mode = stat.S_IMODE(engine.token_file.stat().st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(engine.token_file.parent.stat().st_mode) == 0o700
    assert len(engine.token) >= 40
    assert engine.token not in engine.log_path.read_text(), "the token must never be logged"
    assert str(engine.token_file) in engine.log_path.read_text()


def test_health_needs_no_token_and_tells_nothing_more(engine):
    r = httpx.get(engine.url + "/health", trust_env=False)
    assert r.status_code == 200
    assert set(r.json()) == {"status", "engine_version"} and r.json()["status"] == "ok"


def test_health_proves_the_engine_holds_the_token_without_revealing_it(engine):
    from geo_r1_qgis.core.client import health_proof

    r = httpx.get(engine.url + "/health", params={"challenge": "00ff11ee"}, trust_env=False)
    assert r.status_code == 200
    assert r.json()["proof"] == health_proof(engine.token, "00ff11ee")
    assert engine.token not in r.text
    bad = httpx.get(engine.url + "/health", params={"challenge": "not hex!"}, trust_env=False)
    assert bad.status_code == 422


ROUTES = [
    ("GET", "/info"),
    ("POST", "/ground"),
    ("GET", "/adapters"),
    ("POST", "/adapters"),
    ("POST", "/adapters/active"),
    ("POST", "/shutdown"),
    ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/no-such-route"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_but_health_needs_the_token(engine, api, method, path):
    bare = httpx.request(method, engine.url + path, json={}, trust_env=False)
    assert_error(bare, 401, "Bearer")
    assert bare.headers["www-authenticate"] == "Bearer"
    wrong = httpx.request(
        method, engine.url + path, json={}, headers={"Authorization": "Bearer " + "x" * 43}, trust_env=False
    )
    assert_error(wrong, 401)


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8731", "10.1.2.3"])
def test_a_foreign_host_header_is_refused_even_with_the_token(api, host):
    assert_error(api.get("/info", headers={"Host": host}), 400, "DNS rebinding")


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1:1234", "[::1]:8731"])
def test_loopback_host_names_are_accepted(api, host):
    assert api.get("/info", headers={"Host": host}).status_code == 200


def test_info_and_openapi(api, tiny_format_model_dir):
    info = api.get("/info").json()
    assert info["backend"] == "local" and info["model"] == str(tiny_format_model_dir)
    assert info["adapter"] is None and info["batch_size"] == 4
    assert info["max_new_tokens_default"] == {"rec": 256, "multi": 1024, "gres": 1024}  # Geo-R1's per-task limits
    assert info["sam"] is None  # no --sam: outline requests are refused (tests/engine/server/test_outlines.py)
    assert info["threads"] >= 1
    assert info["box_frame"] == "model"
    assert info["engine_version"] and info["prompt_version"]
    assert info["limits"]["max_items"] == LIMITS["max_items"]
    assert info["limits"]["max_body_bytes"] == 2 * 1024 * 1024
    schema = api.get("/openapi.json").json()
    assert {"/ground", "/ground/tiles", "/info", "/adapters", "/v1/chat/completions"} <= set(schema["paths"])
    doc = schema["paths"]["/ground"]["post"]["description"]
    assert "geometric mean" in doc and "1 - P(None)" in doc  # the confidence definitions are in the API docs
    # issue 8.12: every status the API answers is documented, with the one error model
    for path, methods in schema["paths"].items():
        for method, op in methods.items():
            codes = set(op["responses"])
            assert {"422", "500"} <= codes, (method, path, codes)
            if path != "/health":
                assert {"400", "401", "413"} <= codes, (method, path, codes)
            assert op["responses"]["401" if path != "/health" else "400"]["content"]["application/json"]["schema"]
    assert {"404", "502", "503"} <= set(schema["paths"]["/v1/chat/completions"]["post"]["responses"])
    assert "ErrorOut" in schema["components"]["schemas"]


def test_options_on_a_path_lists_every_method_it_takes(api):
    r = api.request("OPTIONS", "/adapters")
    assert r.status_code == 405
    assert set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "POST"}, r.headers
    assert r.json()["error"]["code"] == 405


# -- /ground ----------------------------------------------------------------------------------------


def test_ground_png_jpeg_tiff_data_uri_and_raw_rgb(api):
    sizes = [(150, 100), (64, 48), (90, 90), (57, 111), (300, 200)]
    items = [
        _png_item(*sizes[0], seed=1, task="rec"),
        _rgb_item(*sizes[1], seed=2),
        {"image": b64(encoded(noise_image(*sizes[2], seed=3), "JPEG")), "expression": "the ship"},
        {"image": b64(encoded(noise_image(*sizes[3], seed=4), "TIFF")), "expression": "cars", "reasoning": False},
    ]
    r = api.post("/ground", json={"items": items, **FAST})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["items"]) == len(items)
    for item, size in zip(body["items"], sizes, strict=False):
        _check_item(item, size)
    assert body["model"] and body["adapter"] is None
    assert body["prompt_version"] and body["engine_version"] and body["timings_ms"]["total"] > 0
    uri = {"image": data_uri(noise_image(*sizes[4], seed=5)), "expression": "all storage tanks"}
    r = api.post("/ground", json={"items": [uri], **FAST})
    assert r.status_code == 200, r.text
    _check_item(r.json()["items"][0], sizes[4])


def test_the_format_trained_model_gives_boxes_in_the_client_frame(api):
    # A size smart_resize changes (500 -> 504), so unscaled model coordinates could overshoot.
    items = [_rgb_item(500, 380, seed=s, task="rec", expression="the largest storage tank") for s in range(2)]
    r = api.post("/ground", json={"items": items, "max_new_tokens": 96})
    assert r.status_code == 200, r.text
    results = r.json()["items"]
    assert any(it["boxes"] for it in results), [it["raw_text"] for it in results]
    for it in results:
        assert it["image_size"] == [500, 380] and it["model_size"] == [504, 392]
        for box in it["boxes"]:
            x1, y1, x2, y2 = box["bbox"]
            assert 0 <= x1 < x2 <= 500 and 0 <= y1 < y2 <= 380


def test_concurrent_requests_all_succeed(engine):
    def one(seed):
        with engine.client() as c:
            r = c.post("/ground", json={"items": [_rgb_item(56, 56, seed), _rgb_item(84, 56, seed + 1)], **FAST})
            return r.status_code, r.json()

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(one, range(0, 12, 2)))
    for status, body in answers:
        assert status == 200, body
        assert [it["image_size"] for it in body["items"]] == [[56, 56], [84, 56]]


# -- limits -----------------------------------------------------------------------------------------


def test_too_many_items(api):
    items = [_rgb_item(8, 8)] * (LIMITS["max_items"] + 1)
    assert_error(api.post("/ground", json={"items": items}), 413, "--max-items")


def test_oversized_body_with_content_length(api):
    blob = "A" * (2 * 1024 * 1024 + 10)
    assert_error(api.post("/ground", json={"items": [{"image": blob, "expression": "x"}]}), 413, "--max-body-mb")


def test_oversized_body_streamed_without_content_length(api):
    def chunks():
        yield b'{"items": [{"image": "'
        for _ in range(40):
            yield b"A" * 65536
        yield b'", "expression": "x"}]}'

    r = api.post("/ground", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_error(r, 413, "--max-body-mb")


def test_too_many_pixels_is_refused_from_the_header(api):
    big = Image.new("RGB", (1001, 1000))  # compresses to a few kB: only the header says it is too big
    data = encoded(big)
    assert len(data) < 100_000
    assert_error(api.post("/ground", json={"items": [{"image": b64(data), "expression": "x"}]}), 413, "items[0]")
    raw = {"rgb": "", "width": 2000, "height": 1000, "expression": "x"}
    assert_error(api.post("/ground", json={"items": [raw]}), 413, "--max-image-pixels")


@pytest.mark.parametrize(
    ("expression", "fragment"), [("", "empty"), ("   ", "empty"), ("x" * 61, "--max-expression-chars")]
)
def test_expression_limits(api, expression, fragment):
    item = {**_rgb_item(8, 8), "expression": expression}
    assert_error(api.post("/ground", json={"items": [item]}), 422, fragment)


# -- malformed input --------------------------------------------------------------------------------

_PNG_HEADER = encoded(noise_image(40, 40))[:60]


@pytest.mark.parametrize(
    ("item", "status", "fragment"),
    [
        ({"image": b64(_PNG_HEADER + b"\x00garbage" * 20)}, 400, "items[1].image"),  # corrupt bytes
        ({"image": b64(b"not an image at all")}, 400, "items[1].image"),
        ({"image": "%%%not base64%%%"}, 400, "base64"),
        ({"image": "data:image/png,rawbytes"}, 400, "base64"),
        ({"rgb": b64(b"\x00" * 10), "width": 4, "height": 4}, 400, "48 are expected"),
        ({"rgb": b64(b"\x00" * 48), "width": 4}, 422, "height"),
        ({"rgb": b64(b"\x00" * 48), "width": 4, "height": 4, "image": b64(_PNG_HEADER)}, 422, "exactly one"),
        ({"rgb": b64(b"\x00" * 48), "width": 4, "height": 4, "task": "segment"}, 422, "task"),
        ({"rgb": b64(b"\x00" * 48), "width": 0, "height": 4}, 422, "width"),
        ({"rgb": b64(b"\x00" * 1200), "width": 400, "height": 1}, 422, "square"),
    ],
)
def test_malformed_items_get_the_right_4xx(api, item, status, fragment):
    items = [_rgb_item(8, 8), {"expression": "x", **item}]
    assert_error(api.post("/ground", json={"items": items}), status, fragment)


def test_missing_expression_and_unknown_fields(api):
    assert_error(api.post("/ground", json={"items": [{"rgb": "AAAA", "width": 1, "height": 1}]}), 422, "expression")
    assert_error(api.post("/ground", json={"items": [{**_rgb_item(1, 1), "colour": 1}]}), 422, "colour")
    assert_error(api.post("/ground", json={"items": []}), 422, "items")
    assert_error(api.post("/ground", json={"items": [_rgb_item(8, 8)], "max_new_tokens": 0}), 422, "max_new_tokens")


def test_non_json_body(api):
    r = api.post("/ground", content=b"items=1&x={", headers={"Content-Type": "application/json"})
    assert_error(r, 400, "not valid JSON")


# -- adapters ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_dir(tiny_format_model_dir, tmp_path_factory):
    """A LoRA adapter made with peft on the tiny model, with random (non-zero) B so it changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_format_model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    out = tmp_path_factory.mktemp("lora") / "rec-lora"
    peft_model.save_pretrained(out)
    return out


def _first_token_logprob(api, model_id):
    body = {
        "model": model_id,
        "messages": [{"role": "user", "content": "Find the storage tanks."}],
        "max_tokens": 1,
        "logprobs": True,
    }
    r = api.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["content"][0]["logprob"]


def test_load_switch_and_unload_a_lora_adapter(api, lora_dir):
    model_id = api.get("/v1/models").json()["data"][0]["id"]
    base = _first_token_logprob(api, model_id)
    assert api.get("/adapters").json() == {"active": None, "available": {}}

    r = api.post("/adapters", json={"name": "rec-lora", "path": str(lora_dir)})
    assert r.status_code == 200, r.text
    assert "rec-lora" in r.json()["available"]
    assert_error(api.post("/adapters/active", json={"name": "nope"}), 404, "nope")
    assert_error(api.post("/adapters", json={"name": "x", "path": str(lora_dir / "missing")}), 404)
    assert_error(api.post("/adapters", json={"name": "../x", "path": str(lora_dir)}), 422, "name")

    r = api.post("/adapters/active", json={"name": "rec-lora"})
    assert r.status_code == 200 and r.json()["active"] == "rec-lora"
    assert api.get("/info").json()["adapter"] == "rec-lora"
    g = api.post("/ground", json={"items": [_rgb_item(56, 56)], **FAST})
    assert g.status_code == 200 and g.json()["adapter"] == "rec-lora"
    assert _first_token_logprob(api, model_id) != pytest.approx(base, abs=1e-6), "the adapter changed nothing"

    r = api.post("/adapters/active", json={"name": None})
    assert r.status_code == 200 and r.json()["active"] is None
    assert api.get("/info").json()["adapter"] is None
    assert _first_token_logprob(api, model_id) == pytest.approx(base, abs=1e-4)


def test_bad_adapters_and_non_finite_numbers_are_4xx_not_500(api, lora_dir, tmp_path):
    """Issue 8.7: each of these was a 500 before."""
    assert_error(api.post("/adapters", json={"name": "x", "path": "~nosuchuser/adapter"}), 404, "absolute path")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((lora_dir / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    r = api.post("/adapters", json={"name": "p", "path": str(pickled)})
    assert_error(r, 422, "only safetensors")
    assert "weights_only" not in r.text and "safety" not in r.text.lower()
    import json

    for bad in (float("nan"), float("inf"), float("-inf")):
        extra = {"do_sample": True, "temperature": bad}
        r = api.post("/ground/tiles", content=_tiles_body([(28, 28)], header_extra=extra), headers=TILES_CT)
        assert r.status_code in (400, 422), (bad, r.status_code, r.text)
        body = json.dumps({"items": [_rgb_item(28, 28)], **FAST, **extra})  # NaN/Infinity literals, as JSON allows
        r = api.post("/ground", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code in (400, 422), (bad, r.status_code, r.text)
    ok = api.post("/ground/tiles", content=_tiles_body([(28, 28)], header_extra={"do_sample": True}), headers=TILES_CT)
    assert ok.status_code == 200, ok.text  # the same request with a finite temperature works


def test_a_prompt_over_the_context_is_refused_at_once_and_blocks_nothing(api, engine):
    """Issue 8.3: a 100,000-word chat message blocked grounding for 10 minutes and peaked at 1.6 GB."""
    import time

    model_id = api.get("/v1/models").json()["data"][0]["id"]
    body = {"model": model_id, "messages": [{"role": "user", "content": "tank " * 100_000}], "max_tokens": 4}
    t0 = time.monotonic()
    r = api.post("/v1/chat/completions", json=body)
    assert r.status_code == 422, r.text
    assert "tokens" in r.json()["error"]["message"] and time.monotonic() - t0 < 30
    g = api.post("/ground", json={"items": [_rgb_item(56, 56)], **FAST})
    assert g.status_code == 200


# -- OpenAI-compatible routes -----------------------------------------------------------------------


@pytest.fixture
def openai_client(engine):
    from openai import OpenAI

    client = OpenAI(base_url=f"{engine.url}/v1", api_key=engine.token, max_retries=0, timeout=120)
    yield client
    client.close()


def _image_message(text="Find all storage tanks."):
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_uri(noise_image(120, 90, seed=9))}},
                {"type": "text", "text": text},
            ],
        }
    ]


def test_openai_client_chat_with_an_image_and_logprobs(openai_client, engine):
    models = openai_client.models.list()
    model_id = models.data[0].id
    resp = openai_client.chat.completions.create(
        model=model_id,
        messages=_image_message(),
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    assert resp.object == "chat.completion" and resp.model == model_id
    choice = resp.choices[0]
    assert choice.finish_reason in ("stop", "length")
    tokens = choice.logprobs.content
    assert 0 < len(tokens) == resp.usage.completion_tokens <= 12
    assert "".join(t.token for t in tokens) == choice.message.content
    for t in tokens:
        assert t.logprob <= 0 and 1 <= len(t.top_logprobs) <= 3
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.usage.prompt_tokens > 10

    again = openai_client.chat.completions.create(
        model=model_id, messages=_image_message(), max_completion_tokens=12, temperature=0
    )
    assert again.choices[0].message.content == choice.message.content  # greedy is deterministic
    assert again.choices[0].logprobs is None


def test_openai_errors(openai_client):
    import openai

    model_id = openai_client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError, match="not supported"):
        openai_client.chat.completions.create(model=model_id, messages=_image_message(), stream=True)
    remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.example/a.png"}}]}]
    with pytest.raises(openai.BadRequestError, match="never fetches URLs"):
        openai_client.chat.completions.create(model=model_id, messages=remote)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        openai_client.chat.completions.create(model="gpt-4o", messages=_image_message())
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    with pytest.raises(openai.BadRequestError, match="image 0"):
        openai_client.chat.completions.create(model=model_id, messages=bad)


def test_raw_chat_request_validation(api):
    model_id = api.get("/v1/models").json()["data"][0]["id"]
    r = api.post("/v1/chat/completions", json={"model": model_id, "messages": [{"role": "tool", "content": "x"}]})
    assert_error(r, 422, "role")
    r = api.post("/v1/chat/completions", json={"model": model_id, "messages": []})
    assert_error(r, 422, "messages")
    body = {"model": model_id, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}
    assert_error(api.post("/v1/chat/completions", json=body), 400, "logprobs")
    body = {"model": model_id, "messages": [{"role": "user", "content": "x"}], "n": 2}
    assert_error(api.post("/v1/chat/completions", json=body), 400, "n=2")


# -- POST /ground/tiles: raw pixels ------------------------------------------------------------------


def _tiles_body(sizes, header_extra=None, pixels=None):
    import json

    items = [{"width": w, "height": h, "expression": "all storage tanks"} for w, h in sizes]
    head = json.dumps({"items": items, **FAST, **(header_extra or {})}).encode()
    if pixels is None:
        pixels = b"".join(noise_image(w, h, seed=i).tobytes() for i, (w, h) in enumerate(sizes))
    return len(head).to_bytes(4, "big") + head + pixels


TILES_CT = {"Content-Type": "application/vnd.geo-r1.tiles"}


def test_ground_tiles_takes_raw_pixels_and_answers_like_ground(api):
    sizes = [(150, 100), (64, 48), (57, 111)]
    r = api.post("/ground/tiles", content=_tiles_body(sizes), headers=TILES_CT)
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert len(items) == len(sizes)
    for item, size in zip(items, sizes, strict=True):
        _check_item(item, size)
    # the same pixels through the JSON route give the same answer (greedy decoding)
    same = api.post("/ground", json={"items": [_rgb_item(150, 100, seed=0)], **FAST})
    assert same.status_code == 200, same.text
    assert same.json()["items"][0]["raw_text"] == items[0]["raw_text"]


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"\x00\x00", 400, "4-byte header length"),
        (b"\xff\xff\xff\xff{}", 400, "bad header length"),
        (_tiles_body([(10, 10)], pixels=b"\x00" * 299), 400, "need 300"),
        (_tiles_body([(10, 10)], header_extra={"bogus": 1}), 422, "bogus"),
        (b"\x00\x00\x00\x03{x}" + b"\x00" * 300, 422, "header"),
        (_tiles_body([(2000, 2000)], pixels=b""), 413, "pixels"),
    ],
    ids=["short", "huge-header", "short-pixels", "unknown-field", "bad-json", "too-many-pixels"],
)
def test_ground_tiles_rejects_malformed_bodies(api, body, status, fragment):
    assert_error(api.post("/ground/tiles", content=body, headers=TILES_CT), status, fragment)


# -- out of memory: a real allocation failure, not a simulated one ----------------------------------


def test_running_out_of_memory_gives_503_and_the_engine_goes_on(tiny_format_model_dir, tmp_path):
    # The engine caps its address space at what the loaded model uses plus 0.5 GB; a 4000×4000 tile needs
    # more than that for its pixel patches alone (about 0.6 GB), so the allocation really fails.
    eng = start_engine(tmp_path, ["--model", str(tiny_format_model_dir), "--memory-headroom-gb", "0.5"])
    try:
        with eng.client() as api:
            flat = Image.new("RGB", (4000, 4000), (90, 120, 60))
            big = {"image": b64(encoded(flat)), "expression": "all storage tanks"}
            error = assert_error(api.post("/ground", json={"items": [big], **FAST}), 503, "out of memory")
            assert "smaller tiles" in error["message"]
            small = api.post("/ground", json={"items": [_png_item(96, 96)], **FAST})
            assert small.status_code == 200, small.text
            assert api.get("/health").status_code == 200
        assert "address space capped" in eng.log_tail()
    finally:
        assert eng.stop() in CLEAN_EXIT, eng.log_tail()


def test_an_adapter_given_at_start_is_the_active_one(tiny_format_model_dir, lora_dir, tmp_path):
    # a bare PATH: the adapter is named after its folder
    eng = start_engine(tmp_path, ["--model", str(tiny_format_model_dir), "--adapter", str(lora_dir)])
    try:
        with eng.client() as api:
            info = api.get("/info").json()
            assert info["adapter"] == lora_dir.name and info["adapters"] == [lora_dir.name]
            assert api.get("/adapters").json()["available"] == {lora_dir.name: str(lora_dir)}
            r = api.post("/ground", json={"items": [_png_item(96, 96)], **FAST})
            assert r.status_code == 200 and r.json()["adapter"] == lora_dir.name
    finally:
        assert eng.stop() in CLEAN_EXIT, eng.log_tail()
