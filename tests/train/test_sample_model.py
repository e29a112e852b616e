"""geo-r1 sample-model build: the config's checks, the number tokens, the data seeds, the templated reasoning and a
real (few-step) build that the engine loads through its normal path."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from engine.runtime.tiny_model import TinyModelConfig, build_tokenizer
from geo_r1_qgis.core.errors import ConfigError, OutputError
from train.data_format import place_words
from train.sample_data import TANK_BRIGHT, render_scene
from train.sample_model import (
    HELDOUT_SEED0,
    MANIFEST,
    Batcher,
    SampleModelConfig,
    SceneBank,
    heldout_chips,
    match_boxes,
    sample_chip,
    target_text,
    think_text,
)

TILE = 224


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"tile": 200}, "multiple of 28"),
        ({"steps": 0}, "--steps must be a whole number >= 1"),
        ({"train_scenes": HELDOUT_SEED0 + 1}, "held-out seeds"),
        ({"device": "tpu"}, "--device must be one of cpu, cuda"),
        ({"learning_rate": 0.0}, "--learning-rate must be in (0, 1)"),
        ({"rec_fraction": 1.5}, "--rec-fraction must be in [0, 1]"),
        ({"time_budget_s": -5.0}, "--time-budget-s must be > 0"),
        ({"heldout_scenes": 2, "checkpoint_heldout_scenes": 3}, "exceeds --heldout-scenes"),
        ({"tile": 1036, "scene_size": 1024}, "smaller than --scene-size"),
    ],
)
def test_config_refuses_bad_values_with_a_clear_message(tmp_path, values, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        SampleModelConfig(out_dir=tmp_path / "m", **values)


def test_config_refuses_an_init_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match=r"holds no config\.json"):
        SampleModelConfig(out_dir=tmp_path / "m", init=tmp_path)


def test_flags_come_from_the_config_fields(tmp_path):
    import argparse
    import dataclasses

    from engine.cli.options import config_from_args
    from engine.cli.sample_model import add_arguments
    from train.sample_model import command_line

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["build", "-o", str(tmp_path), "--tile", "252", "--no-number-tokens",
                              "--time-budget-s", "60"])  # fmt: skip
    config = config_from_args(SampleModelConfig, args)
    assert (config.tile, config.number_tokens, config.time_budget_s, config.steps) == (252, False, 60.0, 6000)
    build_help = parser._subparsers._group_actions[0].choices["build"].format_help()
    for f in dataclasses.fields(SampleModelConfig):  # every field is a flag (its own spelling, or the one it names)
        assert f.metadata.get("flags", (f"--{f.name.replace('_', '-')}",))[-1] in build_help
    assert "--out-dir" not in build_help  # the old spelling still parses, unlisted
    old = parser.parse_args(["build", "--out-dir", str(tmp_path)])
    assert config_from_args(SampleModelConfig, old).out_dir == tmp_path
    # The recorded command rebuilds the same config.
    again = config_from_args(SampleModelConfig, parser.parse_args(command_line(config).split()[2:]))
    assert again == config


def test_number_tokens_round_trip_a_box_in_fewer_tokens():
    plain = build_tokenizer(TinyModelConfig(out_dir=Path("unused")))
    numbers = build_tokenizer(TinyModelConfig(out_dir=Path("unused"), number_tokens=True))
    text = (
        '<think> There are 3 storage tanks. </think> <answer>[{"bbox_2d": [123, 45, 167, 1000], "label": "x"}]</answer>'
    )
    ids = numbers(text)["input_ids"]
    assert numbers.decode(ids, skip_special_tokens=True) == text
    box = "[123, 45, 167, 209]"
    assert len(numbers(box)["input_ids"]) == 9  # [ 123 ", " 45 ", " 167 ", " 209 ]
    assert len(plain(box)["input_ids"]) > 15
    assert len(numbers(text)["input_ids"]) < len(plain(text)["input_ids"])
    for n in (0, 7, 42, 224, 999, 1000):  # every whole number of a box is one token (0..9 already are)
        assert numbers.convert_ids_to_tokens(numbers(f"[{n}, {n}]")["input_ids"]) == ["[", str(n), ", ", str(n), "]"]


def test_heldout_seeds_never_overlap_the_training_seeds(tmp_path):
    widest = SampleModelConfig(out_dir=tmp_path, train_scenes=HELDOUT_SEED0, heldout_scenes=50)
    assert not set(widest.train_seeds) & set(widest.heldout_seeds)
    config = SampleModelConfig(out_dir=tmp_path, train_scenes=3, heldout_scenes=2, checkpoint_heldout_scenes=1,
                               scene_size=512)  # fmt: skip
    bank = SceneBank(config.train_seeds, config.scene_size)
    rng = random.Random(0)
    seen = {sample_chip(bank, rng, task, TILE, 0.2).seed for task in ("rec", "multi") for _ in range(20)}
    assert seen <= set(config.train_seeds)
    rec, multi = heldout_chips(config.heldout_seeds, TILE, config.scene_size)
    assert {c.seed for c in rec + multi} == set(config.heldout_seeds)


def _bright(chip) -> np.ndarray:
    return (np.asarray(chip.image) >= TANK_BRIGHT).all(axis=2)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_the_templated_think_is_true_of_the_chip(seed):
    """Count and place in the reasoning match the truth computed here from the scene, and the answer's boxes
    hold tank roofs (the scene's only bright pixels)."""
    bank = SceneBank([seed], 1024)
    _, objects = render_scene(1024, seed)
    tanks = [o.box.as_tuple() for o in objects if o.category == "tank"]
    rng = random.Random(seed)
    for task in ("rec", "multi", "multi", "multi"):
        chip = sample_chip(bank, rng, task, TILE, 0.3)
        x1, y1, x2, y2 = chip.window
        counted = []
        for t in tanks:
            w = max(0.0, min(t[2], x2) - max(t[0], x1))
            h = max(0.0, min(t[3], y2) - max(t[1], y1))
            if w * h > 0.5 * (t[2] - t[0]) * (t[3] - t[1]):
                counted.append(t)
        think = think_text(chip, TILE)
        assert think in target_text(chip, TILE)
        number = re.search(r"There (?:is|are) (\d+|none)", think).group(1)
        n_said = 0 if number == "none" else int(number)
        if task == "rec":
            assert n_said == len(counted)
            largest = max(counted, key=lambda t: (t[2] - t[0]) * (t[3] - t[1]))
            assert chip.boxes == (tuple(int(v) for v in _scaled(largest, chip.window)),)
            assert think.endswith(f"{place_words(chip.boxes[0], (TILE, TILE))}.")
        else:
            assert n_said == len(counted) == len(chip.boxes)
            for b in chip.boxes:
                assert place_words(b, (TILE, TILE)) in think
        bright = _bright(chip)
        for b in chip.boxes:  # a disk fills pi/4 of its box; the rim and resampling take a little
            assert bright[b[1] : b[3], b[0] : b[2]].mean() > 0.4
        if task == "multi" and not chip.boxes:
            assert not bright.any()


def _scaled(box, window):
    import math

    s = TILE / (window[2] - window[0])
    x1 = max(0, math.floor((box[0] - window[0]) * s + 1e-6))
    y1 = max(0, math.floor((box[1] - window[1]) * s + 1e-6))
    x2 = min(TILE, math.ceil((box[2] - window[0]) * s - 1e-6))
    y2 = min(TILE, math.ceil((box[3] - window[1]) * s - 1e-6))
    return (x1, y1, x2, y2)


def test_matching_is_strict_and_ignores_tanks_cut_by_the_tile():
    truth = [(0, 0, 10, 10), (20, 20, 30, 30)]
    assert match_boxes([(0, 0, 10, 10), (0, 0, 10, 10)], truth) == (1, 1)  # one-to-one
    assert match_boxes([(0, 0, 10, 5)], truth) == (0, 1)  # IoU exactly 0.5 is a miss
    assert match_boxes([(50, 50, 60, 60)], truth, ignore=[(50, 50, 60, 61)]) == (0, 0)


def test_training_batches_supervise_only_the_answer(tmp_path):
    from engine.runtime.tiny_model import build_processor

    config = SampleModelConfig(out_dir=tmp_path, train_scenes=2, scene_size=512, batch_size=3, rec_fraction=0.5)
    processor = build_processor(TinyModelConfig(out_dir=tmp_path, number_tokens=True))
    batcher = Batcher(processor, config)
    _task, inputs, labels = batcher.batch(0)
    first = labels[0][labels[0] != -100].tolist()
    text = processor.tokenizer.decode(first)
    assert text.startswith("<think> I look for") and text.endswith("</answer><|im_end|>\n")
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (inputs["input_ids"][0] == image_pad).sum() == (TILE // 28) ** 2


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    from engine.cli import main

    out = tmp_path_factory.mktemp("sample") / "model"
    assert main(["sample-model", "build", "-o", str(out), "--steps", "4", "--batch-size", "2", "--train-scenes", "2",
                 "--heldout-scenes", "1", "--checkpoint-heldout-scenes", "1", "--scene-size", "512",
                 "--multi-max-new-tokens", "16", "--eval-every-s", "0.01"]) == 0  # fmt: skip
    return out


def test_build_writes_a_checkpoint_and_an_honest_manifest(built):
    manifest = json.loads((built / MANIFEST).read_text())
    weights = built / "model.safetensors"
    assert manifest["sha256"]["model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert manifest["tile"] == TILE and manifest["steps"] == 4 and manifest["final"] is True
    assert manifest["command"].startswith("geo-r1 sample-model build -o ") and "--steps 4" in manifest["command"]
    assert manifest["data"]["train_seeds"] == [0, 1] and manifest["data"]["heldout_seeds"] == [9000, 9000]
    held = manifest["heldout"]
    assert 0.0 <= held["largest_tank"]["acc@0.5"] <= 1.0 and held["all_tanks"]["true_tanks"] > 0
    assert manifest["versions"]["torch"] and manifest["hardware"].startswith("cpu")
    assert manifest["evaluations"], "a checkpoint evaluation was logged"
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float16"}  # noqa: SIM118


def test_build_refuses_a_non_empty_directory(built):
    with pytest.raises(OutputError, match="--force"):
        from train.sample_model import build

        build(SampleModelConfig(out_dir=built, steps=1))


def test_the_engine_loads_the_built_checkpoint(built):
    from PIL import Image

    from engine.runtime.backend import GenerationSettings, GroundItem
    from engine.runtime.loading import LoadConfig, load_model
    from engine.runtime.local import LocalBackend

    loaded = load_model(LoadConfig(model=str(built), device="cpu"))
    tokenizer = loaded.tokenizer
    assert tokenizer.convert_ids_to_tokens(tokenizer("[123, 45]")["input_ids"]) == ["[", "123", ", ", "45", "]"]
    backend = LocalBackend(LoadConfig(model=str(built), device="cpu"), batch_size=2, max_wait_ms=10)
    try:
        image = Image.new("RGB", (TILE, TILE), (120, 120, 110))
        results = backend.ground([GroundItem(image=image, expression="all storage tanks", task="multi")],
                                 GenerationSettings(max_new_tokens=8))  # fmt: skip
        assert len(results) == 1
    finally:
        backend.close()


def test_a_continued_run_records_the_runs_it_continues(tmp_path):
    import json

    from geo_r1_qgis.core.errors import ConfigError
    from train.sample_model import MANIFEST, lineage

    assert lineage(None) == [] and lineage(tmp_path) == []  # from scratch
    held = {"scenes": 3, "largest_tank": {"acc@0.5": 0.5}, "all_tanks": {"recall@0.5": 0.1}, "seconds": 1}
    first = {"command": "geo-r1 sample-model build -o a", "steps": 10, "train_seconds": 5.0, "hardware": "cpu",
             "sha256": {"model.safetensors": "ab"}, "heldout": held}  # fmt: skip
    (tmp_path / MANIFEST).write_text(json.dumps(first), encoding="utf-8")
    (run,) = lineage(tmp_path)
    assert run["command"] == first["command"] and run["steps"] == 10 and "seconds" not in run["heldout"]
    second = {**first, "command": "geo-r1 sample-model build -o b --init a", "lineage": [run]}
    (tmp_path / MANIFEST).write_text(json.dumps(second), encoding="utf-8")
    assert [r["command"] for r in lineage(tmp_path)] == [first["command"], second["command"]]
    (tmp_path / MANIFEST).write_text("{", encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot be read"):
        lineage(tmp_path)
