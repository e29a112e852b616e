"""The trainers for a few steps on the tiny model: real trl, real peft, a real engine and a real accelerate launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from geo_r1_qgis.core.errors import ConfigError, OutputError
from train.config import RECIPES_DIR, TrainConfig, build_config, load_recipe

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "engine"))
from _serve_helpers import start_engine  # noqa: E402


def _lora_tensors(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def _train(method: str, data: Path, model: Path, out: Path, **over) -> Path:
    from train.trainer import run

    values = dict(data=data, model=str(model), output_dir=out, force=True)
    values.update(over)
    return run(build_config(method, values, "cpu-smoke"))


def _check_adapter(out: Path, method: str, model: Path) -> dict:
    names = sorted(p.name for p in out.iterdir())
    assert "adapter_model.safetensors" in names and "adapter_config.json" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth"))], names  # safetensors only
    assert not (out / "checkpoints").exists()
    manifest = json.loads((out / "geo_r1_adapter.json").read_text())
    assert manifest["method"] == method
    assert manifest["base_model"] == str(model)
    assert len(manifest["base_model_hash"]) == 64
    assert manifest["prompt_version"] and manifest["frame"] == "model"
    assert manifest["data"]["dataset_sha256"] and manifest["data"]["train_records"] == 12
    assert manifest["recipe"]["method"] == method
    assert {"torch", "transformers", "trl", "peft"} <= set(manifest["versions"])
    assert set(manifest["metrics"]["before"]) >= {"acc50", "mean_iou"}
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert all("seconds" in r and "lr" in r for r in rows if "loss" in r)
    assert (out / "curves.png").stat().st_size > 1000
    cfg = json.loads((out / "adapter_config.json").read_text())
    from train.trainer import LORA_TARGETS

    assert cfg["target_modules"] == LORA_TARGETS  # the language model's linear layers, never model.visual
    tensors = _lora_tensors(out)
    assert tensors and all("visual" not in k for k in tensors), "LoRA reached into the vision tower"
    return manifest


@pytest.mark.slow
def test_sft_two_steps_changes_lora_and_saves(grid_dataset, tiny_rope10_dir, tmp_path):
    out = _train("sft", grid_dataset, tiny_rope10_dir, tmp_path / "sft")
    manifest = _check_adapter(out, "sft", tiny_rope10_dir)
    assert manifest["reasoning"] is False  # the paper's SFT baseline prompt
    # LoRA B starts at zero: after two steps some B must have moved
    tensors = _lora_tensors(out)
    moved = [k for k, v in tensors.items() if "lora_B" in k and float(v.abs().max()) > 0]
    assert moved, "no LoRA B weight changed: the optimiser never stepped"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "dapo"])
def test_grpo_and_dapo_two_steps_change_lora(method, grid_dataset, tiny_format_model_dir, tmp_path):
    # The format-trained model writes <think>/<answer> often enough that sampled completions differ in
    # reward, so the group advantages are non-zero and the LoRA weights must move.
    out = _train(
        method, grid_dataset, tiny_format_model_dir, tmp_path / method, learning_rate=1e-2, max_completion_length=160
    )
    manifest = _check_adapter(out, method, tiny_format_model_dir)
    assert manifest["reasoning"] is True
    assert manifest["recipe"]["loss_type"] == ("dapo" if method == "dapo" else "grpo")
    if method == "dapo":
        assert manifest["recipe"]["epsilon_high"] == 0.28
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert any(r.get("format", 0) > 0 for r in rows), "no completion had the format: the test proves nothing"
    tensors = _lora_tensors(out)
    assert any(float(v.abs().max()) > 0 for k, v in tensors.items() if "lora_B" in k), "LoRA B never moved"


@pytest.mark.slow
def test_engine_serves_the_adapter_and_refuses_another_base(grid_dataset, tiny_rope10_dir, tiny_other_dir,
                                                             tmp_path):  # fmt: skip
    out = _train("sft", grid_dataset, tiny_rope10_dir, tmp_path / "sft")
    # a real engine process, started with the adapter
    engine = start_engine(tmp_path / "e1", ["--model", str(tiny_rope10_dir), "--adapter", f"mine={out}"])
    try:
        with engine.client() as api:
            info = api.get("/info").json()
            assert info["adapter"] == "mine"
            image = {"image": _png_b64(grid_dataset / "images" / "val" / "0000.png"), "expression": "bright square",
                     "task": "rec", "reasoning": False}  # fmt: skip
            r = api.post("/ground", json={"items": [image], "max_new_tokens": 16})
            assert r.status_code == 200, r.text
            assert r.json()["adapter"] == "mine"
    finally:
        engine.stop()
    # the same adapter on another base model: refused at start, with both models named
    engine2 = None
    try:
        engine2 = start_engine(tmp_path / "e2", ["--model", str(tiny_other_dir)])
        with engine2.client() as api:
            r = api.post("/adapters", json={"name": "mine", "path": str(out)})
            assert r.status_code in (400, 409, 422), r.text
            msg = r.json()["error"]["message"]
            assert str(tiny_rope10_dir) in msg and str(tiny_other_dir) in msg
    finally:
        if engine2:
            engine2.stop()


def _png_b64(path: Path) -> str:
    import base64

    return base64.b64encode(path.read_bytes()).decode()


@pytest.mark.slow
def test_resume_continues_from_the_last_checkpoint(grid_dataset, tiny_rope10_dir, tmp_path):
    out = tmp_path / "sft"
    _train("sft", grid_dataset, tiny_rope10_dir, out, keep_checkpoints=True)
    assert any((out / "checkpoints").glob("checkpoint-2"))
    _train("sft", grid_dataset, tiny_rope10_dir, out, max_steps=3, resume=True, force=None)
    manifest = json.loads((out / "geo_r1_adapter.json").read_text())
    assert manifest["steps"] == 3
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert 3 in steps and steps.count(1) == 1  # steps 1-2 not trained again


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(grid_dataset, tiny_format_model_dir, tmp_path):
    out = tmp_path / "acc"
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(RECIPES_DIR / "accelerate" / "cpu-2proc.yaml"),
           "-m", "engine.cli", "train", "grpo", "--data", str(grid_dataset), "--model", str(tiny_format_model_dir),
           "-o", str(out), "--config", "cpu-smoke", "--set", "per_device_train_batch_size=4"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "geo_r1_adapter.json").read_text())
    assert manifest["steps"] == 2
    assert manifest["metrics"]["before"] is None  # not computed across processes
    assert manifest["world_size"] == 2  # two processes really trained (DDP over gloo)


# -- configuration ---------------------------------------------------------------------------------


def test_presets_follow_geo_r1():
    grpo = load_recipe(RECIPES_DIR / "grpo.yaml")
    assert grpo["beta"] == 0.04 and grpo["num_generations"] == 8 and grpo["temperature"] == 1.0
    assert grpo["lora_r"] == 64 and grpo["lora_alpha"] == 128 and grpo["learning_rate"] == 1e-5
    dapo = load_recipe(RECIPES_DIR / "dapo.yaml")
    assert dapo["loss_type"] == "dapo" and dapo["epsilon_high"] == 0.28
    for path in RECIPES_DIR.glob("*.yaml"):
        load_recipe(path)  # every shipped recipe loads
    cfg = build_config("grpo", {"data": "d", "model": "m", "output_dir": "o"})
    assert cfg.uses_reasoning and cfg.rewards == ("format", "iou")
    sft = build_config("sft", {"data": "d", "model": "m", "output_dir": "o"})
    assert not sft.uses_reasoning


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"method": "ppo"}, "method"),
        ({"lora_r": 0}, "lora_r"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"num_generations": 1}, "num_generations"),
        ({"loss_type": "x"}, "loss_type"),
        ({"reward_funcs": ("nope",)}, "unknown reward"),
        ({"max_steps": 0}, "max_steps"),
        ({"task": "ovd"}, "task"),
        ({"task": "gres"}, "--sam MODEL"),  # the gres reward needs the frozen SAM
    ],
)
def test_config_rejects_bad_values(over, needle):
    values = dict(method="grpo", data="d", model="m", output_dir="o")
    values.update(over)
    with pytest.raises(ConfigError, match=needle):
        TrainConfig(**values)


def test_recipe_with_unknown_key_is_named(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("learning_rate: 1e-4\nlearnig_rate: 3\n")
    with pytest.raises(ConfigError, match="learnig_rate"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="built-in recipes"):
        build_config("sft", {"data": "d", "model": "m", "output_dir": "o"}, tmp_path / "missing.yaml")


def test_output_dir_is_never_overwritten_silently(grid_dataset, tmp_path):
    from train.trainer import _prepare_output

    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    cfg = build_config("sft", {"data": grid_dataset, "model": "m", "output_dir": out})
    with pytest.raises(OutputError, match="--force"):
        _prepare_output(cfg)
    assert (out / "keep.txt").is_file()
    with pytest.raises(ConfigError, match="no checkpoint"):
        _prepare_output(build_config("sft", {"data": grid_dataset, "model": "m", "output_dir": out, "resume": True}))
    blocked = tmp_path / "file.txt"
    blocked.write_text("")
    with pytest.raises(OutputError):
        _prepare_output(build_config("sft", {"data": grid_dataset, "model": "m", "output_dir": blocked / "sub"}))


def test_cli_train_reports_a_bad_dataset_in_one_line(tmp_path):
    cmd = [sys.executable, "-m", "engine.cli", "train", "sft", "--data", str(tmp_path), "--model", "m", "-o",
           str(tmp_path / "o")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "is not a Geo-R1 dataset" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_wall_clock_budget_stops_training(grid_dataset, tiny_rope10_dir, tmp_path):
    out = _train("sft", grid_dataset, tiny_rope10_dir, tmp_path / "b", max_steps=10_000, max_seconds=3.0,
                 eval_limit=0)  # fmt: skip
    manifest = json.loads((out / "geo_r1_adapter.json").read_text())
    assert 1 <= manifest["steps"] < 10_000
    assert manifest["train_seconds"] < 60


@pytest.mark.slow
def test_grpo_gres_two_steps_with_the_sam_reward(tiny_format_model_dir, tiny_sam_dir, tmp_path):
    """A real GRPO run on gres records: the mask reward through the tiny SAM 2 is computed and logged, and the
    LoRA weights move."""
    from train.dataset import SyntheticConfig, build_synthetic

    data = tmp_path / "data"
    build_synthetic(SyntheticConfig(out_dir=data, shots=1, negatives=1, chips_per_box=1))
    with pytest.raises(ConfigError, match="--sam MODEL"):
        build_config("grpo", dict(data=data, model=str(tiny_format_model_dir), output_dir=tmp_path / "x",
                                  task="gres"), "cpu-smoke")  # fmt: skip
    out = _train("grpo", data, tiny_format_model_dir, tmp_path / "gres", task="gres", sam=str(tiny_sam_dir),
                 learning_rate=1e-2, max_completion_length=160)  # fmt: skip
    manifest = json.loads((out / "geo_r1_adapter.json").read_text())
    assert manifest["task"] == "gres" and manifest["recipe"]["sam"] == str(tiny_sam_dir)
    for when in ("before", "after"):  # the val gres queries through the same frozen SAM
        m = manifest["metrics"][when]
        assert m["queries"] == 4 and 0.0 <= m["giou"] <= 1.0 and 0.0 <= m["ciou"] <= 1.0 and m["format"] is not None
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all("rewards/gres_mask_reward/mean" in r and "rewards/ovd_format_reward/mean" in r for r in steps)
    assert all(0.0 <= r["iou"] <= 1.0 for r in steps)  # the mask reward's alias
    assert any(r.get("format", 0) > 0 for r in rows), "no completion had the format: the test proves nothing"
    tensors = _lora_tensors(out)
    assert any(float(v.abs().max()) > 0 for k, v in tensors.items() if "lora_B" in k), "LoRA B never moved"
