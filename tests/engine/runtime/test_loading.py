"""Tests for engine/loading.py: config checks, device table, loading, clear errors, LoRA adapters."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from engine.runtime.loading import (
    AdapterManager,
    LoadConfig,
    LoadedModel,
    load_model,
    resolve_attn_implementation,
    resolve_device_dtype,
)
from geo_r1_qgis.core.errors import ConfigError, ModelNotFoundError


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"model": ""},
        {"model": "x", "processor": "  "},
        {"model": "x", "device": "gpu"},
        {"model": "x", "device": "cuda:a"},
        {"model": "x", "dtype": "fp16"},
        {"model": "x", "attn_implementation": "flash"},
        {"model": "x", "adapters": {"": "dir"}},
        {"model": "x", "adapters": {"a": ""}},
    ],
)
def test_load_config_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        LoadConfig(**kwargs)


def test_load_config_is_frozen_and_normalised():
    config = LoadConfig(model=" Qwen/Qwen2.5-VL-3B-Instruct ", device="CUDA:1", adapters={"a": "/x"})
    assert config.model == "Qwen/Qwen2.5-VL-3B-Instruct" and config.device == "cuda:1"
    assert config.processor_source == config.model
    with pytest.raises(TypeError):
        config.adapters["b"] = "/y"  # type: ignore[index]


@pytest.mark.parametrize(
    ("device", "dtype", "cuda", "bf16", "mps", "expected"),
    [
        ("auto", "auto", True, True, False, ("cuda:0", "bfloat16")),
        ("auto", "auto", True, False, False, ("cuda:0", "float16")),
        ("cuda:1", "auto", True, True, False, ("cuda:1", "bfloat16")),
        ("auto", "auto", False, False, True, ("mps", "float32")),
        ("mps", "float16", False, False, True, ("mps", "float16")),
        ("auto", "auto", False, False, False, ("cpu", "float32")),
        ("cpu", "bfloat16", True, True, False, ("cpu", "bfloat16")),
        ("auto", "float32", True, True, False, ("cuda:0", "float32")),
    ],
)
def test_resolve_device_dtype_table(device, dtype, cuda, bf16, mps, expected):
    assert resolve_device_dtype(device, dtype, cuda_available=cuda, cuda_bf16=bf16, mps_available=mps) == expected


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_resolve_device_unavailable(device):
    with pytest.raises(ConfigError, match="not available"):
        resolve_device_dtype(device, "auto", cuda_available=False, cuda_bf16=False, mps_available=False)


def test_resolve_attn_implementation():
    assert resolve_attn_implementation("auto", "cpu", "float32") == "sdpa"
    assert resolve_attn_implementation("eager", "cpu", "float32") == "eager"
    with pytest.raises(ConfigError):
        resolve_attn_implementation("flash_attention_2", "cpu", "float32")


def test_load_model_tiny(tiny_model_dir):
    loaded = load_model(LoadConfig(model=str(tiny_model_dir), device="cpu"))
    assert isinstance(loaded, LoadedModel)
    assert loaded.device == "cpu" and loaded.dtype == "float32" and loaded.attn_implementation == "sdpa"
    assert loaded.model.training is False
    assert loaded.processor.tokenizer.padding_side == "left"
    assert loaded.model_name == loaded.processor_name == str(tiny_model_dir)
    assert loaded.has_torchvision in (True, False)
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert loaded.adapters.list() == [] and loaded.adapters.active is None


def test_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelNotFoundError, match="nope") as info:
        load_model(LoadConfig(model=str(missing)))
    assert "does not exist" in str(info.value)


def test_directory_without_weights(tiny_model_dir, tmp_path):
    target = tmp_path / "noweights"
    target.mkdir()
    shutil.copy(tiny_model_dir / "config.json", target / "config.json")
    with pytest.raises(ModelNotFoundError, match="noweights"):
        load_model(LoadConfig(model=str(target)))


def test_unknown_hub_id_offline():
    with pytest.raises(ModelNotFoundError) as info:
        load_model(LoadConfig(model="geo-r1-tests/does-not-exist", local_files_only=True))
    message = str(info.value)
    assert "geo-r1-tests/does-not-exist" in message
    assert "models--geo-r1-tests--does-not-exist" in message
    assert "huggingface-cli download geo-r1-tests/does-not-exist" in message


def _make_adapter(base_dir, out, seed, r):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir, local_files_only=True)
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        init_lora_weights=False,
    )
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def two_adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return _make_adapter(tiny_model_dir, root / "a1", 1, 4), _make_adapter(tiny_model_dir, root / "a2", 2, 8)


def _logits(loaded):
    processor = loaded.processor
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find the tank."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[Image.new("RGB", (56, 84), (9, 99, 199))], return_tensors="pt")
    with torch.no_grad():
        return loaded.model(**inputs).logits


def test_adapters_switch_without_reloading(tiny_model_dir, two_adapters):
    a1, a2 = two_adapters
    loaded = load_model(LoadConfig(model=str(tiny_model_dir), adapters={"one": str(a1), "two": str(a2)}))
    assert loaded.adapters.list() == ["one", "two"]
    assert loaded.adapters.active is None
    base = _logits(loaded)
    loaded.adapters.activate("one")
    one = _logits(loaded)
    loaded.adapters.activate("two")
    two = _logits(loaded)
    loaded.adapters.activate(None)
    again = _logits(loaded)
    assert not torch.allclose(base, one) and not torch.allclose(base, two) and not torch.allclose(one, two)
    assert torch.equal(base, again)
    loaded.adapters.activate("one")
    assert torch.equal(one, _logits(loaded))


def test_adapter_errors(tiny_model_dir, two_adapters, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, local_files_only=True)
    manager = AdapterManager(model)
    with pytest.raises(ModelNotFoundError, match="missing"):
        manager.register("x", tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match=r"adapter_config\.json"):
        manager.register("x", empty)
    broken = tmp_path / "broken"
    shutil.copytree(two_adapters[0], broken)
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="JSON"):
        manager.register("x", broken)
    not_lora = tmp_path / "notlora"
    shutil.copytree(two_adapters[0], not_lora)
    data = json.loads((not_lora / "adapter_config.json").read_text())
    data["peft_type"] = "IA3"
    (not_lora / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="LORA"):
        manager.register("x", not_lora)
    with pytest.raises(ConfigError, match="unknown adapter"):
        manager.activate("nope")
    manager.register("one", two_adapters[0])
    with pytest.raises(ConfigError, match="already registered"):
        manager.register("one", two_adapters[1])


def test_the_served_tile_comes_from_the_models_manifest(tmp_path, caplog):
    from engine.runtime.loading import MODEL_MANIFEST, served_tile

    assert served_tile(str(tmp_path)) is None  # no manifest: not stated
    (tmp_path / MODEL_MANIFEST).write_text(json.dumps({"tile": 224}), encoding="utf-8")
    assert served_tile(str(tmp_path)) == 224
    for bad in ({"tile": 230}, {"tile": "224"}, {"tile": True}, [224]):
        (tmp_path / MODEL_MANIFEST).write_text(json.dumps(bad), encoding="utf-8")
        assert served_tile(str(tmp_path)) is None, bad
    (tmp_path / MODEL_MANIFEST).write_text("{not json", encoding="utf-8")
    with caplog.at_level("WARNING"):
        assert served_tile(str(tmp_path)) is None
    assert MODEL_MANIFEST in caplog.text and "could not be read" in caplog.text
