"""The local runtime on a real (tiny) Qwen2.5-VL model: batching, coordinates, confidence, chat."""

import threading

import numpy as np
import pytest
from PIL import Image

from engine.runtime.backend import GenerationSettings, GroundItem
from engine.runtime.loading import LoadConfig
from engine.runtime.local import LocalBackend, MicroBatcher
from geo_r1_qgis.core.rules.coords import model_to_image_box, smart_resize
from geo_r1_qgis.core.rules.parsing import parse_output

pytestmark = pytest.mark.slow


def _image(size, seed=0):
    w, h = size
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def backend(tiny_format_model_dir):
    b = LocalBackend(LoadConfig(model=str(tiny_format_model_dir)), batch_size=4, max_wait_ms=50)
    yield b
    b.close()


SETTINGS = GenerationSettings(max_new_tokens=48)

# tile sizes that are multiples of 28 and sizes that are not
SIZES = [(224, 224), (300, 300), (512, 512), (280, 196), (333, 250)]


def test_results_come_back_in_order_with_the_model_size_smart_resize_gives(backend):
    items = [GroundItem(image=_image(s, i), expression="all storage tanks", task="multi") for i, s in enumerate(SIZES)]
    results = backend.ground(items, SETTINGS)
    assert len(results) == len(items)
    for (w, h), r in zip(SIZES, results, strict=True):
        assert r.image_size == (w, h)
        mh, mw = smart_resize(h, w)
        assert r.model_size == (mw, mh)
        assert 0.0 <= r.presence <= 1.0
        assert r.tokens_generated <= SETTINGS.max_new_tokens
        assert set(r.timings_ms) >= {"preprocess", "generate", "parse"}


def test_boxes_are_the_models_numbers_scaled_back_to_the_client_image(backend):
    items = [
        GroundItem(image=_image(s, 7 + i), expression="the largest storage tank", task="rec")
        for i, s in enumerate(SIZES)
    ]
    results = backend.ground(items, GenerationSettings(max_new_tokens=128))
    checked = 0
    for item, r in zip(items, results, strict=True):
        parsed = parse_output(r.raw_text, "rec")
        expected = [model_to_image_box((b.x1, b.y1, b.x2, b.y2), r.model_size, r.image_size) for b in parsed.boxes]
        expected = [e for e in expected if e is not None]
        assert len(r.boxes) == len(expected)
        for got, exp in zip(r.boxes, expected, strict=True):
            assert (got.x1, got.y1, got.x2, got.y2) == pytest.approx((exp.x1, exp.y1, exp.x2, exp.y2))
            assert 0 <= got.x1 < got.x2 <= item.image.size[0]
            assert 0 <= got.y1 < got.y2 <= item.image.size[1]
            assert 0.0 < got.score <= 1.0
            checked += 1
    assert checked, "the format-trained tiny model should have produced at least one box: " + results[0].raw_text


def test_left_padded_batches_generate_what_single_items_generate(backend):
    items = [
        GroundItem(image=_image(s, 20 + i), expression="all buildings", task="multi") for i, s in enumerate(SIZES[:4])
    ]
    batched = backend.ground_batched(items, SETTINGS)
    single = [backend.ground_batched([it], SETTINGS)[0] for it in items]
    assert [r.batch_size for r in batched] == [4] * 4
    same = sum(a.raw_text == b.raw_text for a, b in zip(batched, single, strict=True))
    # float32 on CPU: padding must not change greedy decoding (allow one near-tie flip)
    assert same >= 3, [(a.raw_text[:60], b.raw_text[:60]) for a, b in zip(batched, single, strict=True)]


def test_concurrent_clients_are_micro_batched_together(backend):
    results = {}

    def client(k):
        item = GroundItem(image=_image((224, 224), 40 + k), expression="all storage tanks")
        results[k] = backend.ground([item], SETTINGS)[0]

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 4
    assert max(r.batch_size for r in results.values()) > 1


def test_chat_returns_text_usage_and_top_logprobs(backend):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    res = backend.chat(messages, [_image((224, 224))], GenerationSettings(max_new_tokens=8), top_logprobs=3)
    assert res.completion_tokens <= 8
    assert res.prompt_tokens > 64  # 64 image tokens for 224x224 plus the template
    assert res.logprobs is not None and len(res.logprobs) == res.completion_tokens
    for _piece, lp, alts in res.logprobs:
        assert lp <= 0.0
        assert len(alts) >= 1
        assert max(alts.values()) == pytest.approx(lp, abs=1e-5)  # greedy picks the most likely token


def test_micro_batcher_groups_by_settings_and_survives_errors():
    seen = []

    def run(items, settings):
        seen.append((len(items), settings.max_new_tokens))
        if "boom" in items:
            raise ValueError("bad batch")
        return [f"{i}:{settings.max_new_tokens}" for i in items]

    mb = MicroBatcher(run, batch_size=3, max_wait_ms=200)
    try:
        a = GenerationSettings(max_new_tokens=5)
        b = GenerationSettings(max_new_tokens=6)
        futs = [mb.submit("x", a), mb.submit("y", a), mb.submit("z", b), mb.submit("w", a)]
        assert [f.result(timeout=10) for f in futs] == ["x:5", "y:5", "z:6", "w:5"]
        assert all(n <= 3 for n, _ in seen)
        bad = mb.submit("boom", a)
        with pytest.raises(ValueError, match="bad batch"):
            bad.result(timeout=10)
        assert mb.submit("ok", a).result(timeout=10) == "ok:5"  # the worker goes on
    finally:
        mb.close()


# -- decoding: the whole sequence at once, pieces aligned with it (issue 7, item 1) ------------------

MULTIBYTE = [
    '<think> The tank at 40° north of the 飞机 hangar. </think> <answer>[{"bbox_2d": [10, 20, 30, 40], '
    '"label": "油罐 °"}]</answer>',
    '<think> no-break space between numbers </think> <answer>[{"bbox_2d": [1,\u00a02, 3, 4]}]</answer>',
    "飞机飞机 ° \u00a0 end",
]


@pytest.mark.parametrize("text", MULTIBYTE)
def test_decode_keeps_multibyte_characters_that_tokens_split(tiny_model_dir, text):
    from engine.runtime.loading import load_processor
    from engine.runtime.local import decode_with_pieces
    from geo_r1_qgis.core.rules.confidence import token_offsets

    tok = load_processor(str(tiny_model_dir)).tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    old = "".join(tok.batch_decode([[t] for t in ids], skip_special_tokens=True))
    assert "\ufffd" in old or text.isascii()  # the byte-level BPE really splits these characters
    decoded, pieces = decode_with_pieces(tok, ids)
    assert decoded == text
    assert "".join(pieces) == decoded and len(pieces) == len(ids)
    assert "\ufffd" not in decoded
    # offsets still locate every ASCII token where it is in the text
    for (a, b), piece in zip(token_offsets(pieces), pieces, strict=True):
        assert decoded[a:b] == piece


def test_decode_then_parse_finds_the_box_between_no_break_spaces(tiny_model_dir):
    from engine.runtime.loading import load_processor
    from engine.runtime.local import decode_with_pieces

    tok = load_processor(str(tiny_model_dir)).tokenizer
    text = MULTIBYTE[1]
    decoded, _ = decode_with_pieces(tok, tok.encode(text, add_special_tokens=False))
    parsed = parse_output(decoded, "multi", True)
    assert [b.xyxy for b in parsed.boxes] == [(1.0, 2.0, 3.0, 4.0)]


def test_special_tokens_are_skipped_and_get_empty_pieces(tiny_model_dir):
    from engine.runtime.loading import load_processor
    from engine.runtime.local import decode_with_pieces

    tok = load_processor(str(tiny_model_dir)).tokenizer
    ids = [*tok.encode("a°b", add_special_tokens=False), tok.convert_tokens_to_ids("<|im_end|>")]
    decoded, pieces = decode_with_pieces(tok, ids)
    assert decoded == "a°b" and pieces[-1] == ""
