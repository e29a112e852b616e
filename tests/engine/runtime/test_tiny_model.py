"""Tests for engine/runtime/tiny_model.py: the tiny checkpoint loads and behaves like a real Qwen2.5-VL one."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from engine.runtime.loading import has_torchvision, load_processor
from engine.runtime.tiny_model import ADDED_TOKENS, TinyModelConfig, build_tiny_model
from geo_r1_qgis.core.errors import ConfigError
from geo_r1_qgis.core.rules.parsing import format_ok, parse_output
from geo_r1_qgis.core.rules.prompts import build_prompt


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _chat(processor, prompt: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"seed": -1},
        {"learn_format_steps": -5},
        {"padding_side": "middle"},
        {"hidden_size": 60, "num_attention_heads": 4},  # head_dim 15
        {"num_attention_heads": 4, "num_key_value_heads": 3},
        {"bpe_vocab_size": 10},
        {"vision_hidden_size": 30, "vision_num_heads": 2},
    ],
)
def test_config_rejects_bad_values(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        TinyModelConfig(out_dir=tmp_path, **kwargs)


def test_config_mrope_and_full_attention():
    config = TinyModelConfig(out_dir="x")
    assert sum(config.mrope_section) == config.head_dim // 2
    assert config.fullatt_block_indexes == [config.vision_depth - 1]


def test_loads_through_the_real_code_path(tiny_model_dir):
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForImageTextToText,
        AutoTokenizer,
        Qwen2_5_VLForConditionalGeneration,
    )

    config = AutoConfig.from_pretrained(tiny_model_dir, local_files_only=True)
    assert config.model_type == "qwen2_5_vl"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    image_processor = AutoImageProcessor.from_pretrained(tiny_model_dir, local_files_only=True)
    assert image_processor.patch_size == 14 and image_processor.merge_size == 2
    assert image_processor.temporal_patch_size == 2
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, local_files_only=True)
    auto = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, local_files_only=True)
    assert type(auto) is type(model)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    # special ids in the config are the tokenizer's
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_end_token_id == tokenizer.convert_tokens_to_ids("<|vision_end|>")
    assert config.text_config.vocab_size >= len(tokenizer)
    assert model.generation_config.do_sample is False


def test_auto_processor(tiny_model_dir):
    """AutoProcessor works with torchvision; without it transformers 5.x cannot build the video
    processor, which is why engine.runtime.loading falls back to an image-only processor."""
    from transformers import AutoProcessor

    if has_torchvision():
        processor = AutoProcessor.from_pretrained(tiny_model_dir, local_files_only=True)
        assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == processor.image_token_id
    else:
        with pytest.raises(ImportError, match=r"(?i)torchvision"):
            AutoProcessor.from_pretrained(tiny_model_dir, local_files_only=True)


def test_tokenizer_tokens_and_template(tiny_model_dir):
    processor = load_processor(str(tiny_model_dir))
    tok = processor.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t, _ in ADDED_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(ADDED_TOKENS)))
    for text, _ in ADDED_TOKENS:
        assert tok.encode(text, add_special_tokens=False) == [tok.convert_tokens_to_ids(text)]
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    answer = '<think> a tank </think> <answer>[{"bbox_2d": [12, 34, 56, 78], "label": "tank"}]</answer>'
    assert tok.decode(tok.encode(answer, add_special_tokens=False)) == answer
    text = _chat(processor, "Find it.")
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Find it.<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = processor.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], tokenize=False
    )
    assert with_system == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


@pytest.mark.parametrize(("side", "grid", "pads"), [(512, 36, 324), (800, 58, 841)])
def test_image_tokens_follow_smart_resize(tiny_model_dir, side, grid, pads):
    processor = load_processor(str(tiny_model_dir))
    inputs = processor(
        text=[_chat(processor, "Find it.")], images=[Image.new("RGB", (side, side))], return_tensors="pt"
    )
    assert inputs["image_grid_thw"].tolist() == [[1, grid, grid]]  # 504 = 36*14, 812 = 58*14
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((inputs["input_ids"] == pad).sum()) == pads


def test_generate_batch_left_padded(tiny_model_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor = load_processor(str(tiny_model_dir))  # left padding
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, local_files_only=True).eval()
    texts = [_chat(processor, "Find the tank."), _chat(processor, "Find every airplane in this image, please.")]
    images = [Image.new("RGB", (512, 512), (20, 80, 40)), Image.new("RGB", (300, 140), (90, 10, 10))]
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    assert inputs["attention_mask"][:, -1].tolist() == [1, 1]  # left padded
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 2 and inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 5
    assert len(processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)) == 2


def test_same_seed_gives_identical_weights(tiny_model_dir, tmp_path):
    out = build_tiny_model(TinyModelConfig(out_dir=tmp_path / "again", seed=0))
    assert (out / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    assert (out / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["do_sample"] is False


def test_cli_refuses_non_empty_dir_without_force(tmp_path, capsys):
    from engine.cli import main

    (tmp_path / "keep.txt").write_text("x")
    assert main(["tiny-model", str(tmp_path)]) == 1
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").exists()


@pytest.mark.slow
def test_learn_format_answers_in_geo_r1_format(tiny_format_model_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor = load_processor(str(tiny_format_model_dir))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_format_model_dir, local_files_only=True).eval()
    prompts = [
        build_prompt("the white storage tank in the top left corner", "rec"),
        build_prompt("airplane", "multi"),
    ]
    images = [Image.new("RGB", (512, 512), (30, 60, 90)), Image.new("RGB", (512, 512), (60, 30, 20))]
    inputs = processor(text=[_chat(processor, p) for p in prompts], images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=120)
    texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    rec = texts[0]
    assert format_ok(rec, "rec"), rec  # Geo-R1's REC format reward's regex
    boxes = json.loads(parse_output(rec, "rec").answer)  # the first <answer>'s content
    x1, y1, x2, y2 = boxes[0]["bbox_2d"]
    assert 0 <= x1 < x2 <= 504 and 0 <= y1 < y2 <= 504, rec
    assert texts[1].startswith("<think>") and '"bbox_2d": [' in texts[1], texts[1]


def test_the_tiny_models_prompts_are_the_rules_prompts():
    """Its --learn-format prompts are build_prompt's text, byte for byte: neither the text nor how its pieces
    join is copied."""
    import itertools

    from engine.runtime import tiny_model as t

    head, tail = build_prompt("\x00", "rec").split("\x00")
    multi = {build_prompt(c, "multi") for c in t._CATEGORIES}
    seen = set()
    for _, prompt, _ in itertools.islice(t.synthetic_examples(0), 40):
        if prompt in multi:
            seen.add("multi")
        else:
            assert prompt.startswith(head) and prompt.endswith(tail), prompt
            assert build_prompt(prompt[len(head) : -len(tail)], "rec") == prompt
            seen.add("rec")
    assert seen == {"rec", "multi"}
    assert all(piece in t._corpus() for piece in t._PROMPT_PIECES)  # the tokenizer learns the templates' text
