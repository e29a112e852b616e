"""Tests of train/sample_sam.py: the sample SAM's config, chips, prompts, loss and a short real build."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engine.cli import main as cli  # noqa: E402
from engine.runtime.sam import MaskPrompt, SamMasker, clip_to_box  # noqa: E402
from geo_r1_qgis.core.errors import ConfigError  # noqa: E402
from train.sample_sam import (  # noqa: E402
    HELDOUT_SEED0,
    SAM_MANIFEST,
    MaskBank,
    SampleSamConfig,
    chip_objects,
    command_line,
    jitter_box,
    keypoints,
    mask_loss,
    read_window,
    sample_chip,
)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 200}, "multiple of 32"),
        ({"train_scenes": HELDOUT_SEED0 + 1}, "held-out seeds"),
        ({"box_jitter": 0.5}, "--box-jitter"),
        ({"point_fraction": 1.5}, "--point-fraction"),
        ({"steps": 0}, "--steps"),
        ({"image_size": 1024}, "smaller than --scene-size"),
    ],
)
def test_config_refuses_bad_values(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SampleSamConfig(out_dir=tmp_path, **kwargs)


def test_command_line_rebuilds_the_config(tmp_path):
    config = SampleSamConfig(out_dir=tmp_path / "sam", steps=12, time_budget_s=30.0)
    assert command_line(config) == f"geo-r1 sample-sam build -o {tmp_path / 'sam'} --steps 12 --time-budget-s 30.0"


def test_chip_objects_are_the_visible_parts_of_the_true_masks():
    bank = MaskBank([3], 512)
    image, objects, labels = bank.scene(3)
    rgb, lab = read_window(image, labels, (0, 0, 224, 224), 224)
    assert rgb.shape == (224, 224, 3) and np.array_equal(rgb, image[:224, :224])
    found = chip_objects(lab, objects, 12)
    assert found and {o.category for o in found} <= {"tank", "building", "field", "river", "road"}
    for o in found:
        x1, y1, x2, y2 = o.box
        assert o.mask[y1:y2, x1:x2].sum() == o.mask.sum() >= 12  # the box holds the whole visible mask
        assert o.mask[y1, x1:x2].any() and o.mask[y2 - 1, x1:x2].any()  # and is tight
    # a downsampled window keeps the labels' objects (nearest), the image resized
    rgb2, lab2 = read_window(image, labels, (0, 0, 448, 448), 224)
    assert rgb2.shape == (224, 224, 3) and set(np.unique(lab2)) <= set(np.unique(labels[:448, :448]))


def test_prompts_stay_in_the_chip_and_points_inside_the_object():
    rng = random.Random(0)
    mask = np.zeros((64, 64), bool)
    mask[10:30, 20:40] = True
    for _ in range(50):
        x1, y1, x2, y2 = jitter_box((20, 10, 40, 30), 0.1, 64, rng)
        assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
        assert abs(x1 - 20) <= 3 and abs(y2 - 30) <= 3  # 10 % of 20 px, plus one
        for x, y in keypoints(mask, 2, rng):
            assert mask[int(y), int(x)]


def test_training_chips_hold_objects():
    config = SampleSamConfig(out_dir="unused", train_scenes=2, scene_size=512, image_size=128)
    bank, rng = MaskBank(config.train_seeds, 512), random.Random(1)
    for _ in range(10):
        rgb, found = sample_chip(bank, rng, config)
        assert rgb.shape == (128, 128, 3) and found


def test_loss_counts_only_inside_the_box():
    target = torch.zeros(1, 1, 8, 8)
    target[..., 2:5, 2:5] = 1
    weights = torch.zeros(1, 1, 8, 8)
    weights[..., 1:6, 1:6] = 1
    good = torch.where(target > 0, 20.0, -20.0)
    noisy_outside = good.clone()
    noisy_outside[..., 7, :] = 20.0  # wrong outside the box: the engine clears it, the loss ignores it
    assert mask_loss(good, target, weights) == pytest.approx(mask_loss(noisy_outside, target, weights))
    assert mask_loss(good, target, weights) < 0.01 < mask_loss(-good, target, weights)


def test_a_short_build_loads_through_the_ordinary_path(tmp_path, capsys):
    out = tmp_path / "sam"
    argv = ["sample-sam", "build", "-o", str(out), "--steps", "3", "--train-scenes", "2", "--heldout-scenes", "1",
            "--scene-size", "256", "--image-size", "128", "--batch-size", "2", "--warmup-steps", "1"]  # fmt: skip
    assert cli(argv) == 0
    manifest = json.loads((out / SAM_MANIFEST).read_text())
    assert manifest["command"].startswith(f"geo-r1 sample-sam build -o {out} --steps 3")
    assert manifest["steps"] == 3 and manifest["final"] is True
    assert manifest["data"]["heldout_seeds"] == [HELDOUT_SEED0, HELDOUT_SEED0]
    held = manifest["heldout"]
    for kind in ("box", "box+points", "box_as_mask"):
        assert set(held[kind]) == {"tank", "building", "field", "river", "road"}
    assert held["box_as_mask"]["building"]["mean_iou"] == pytest.approx(1.0)  # a rectangle is its box
    assert held["box_as_mask"]["tank"]["mean_iou"] < 0.9  # a disk is not
    masker = SamMasker.load(out, "cpu", local_files_only=True)
    assert masker.size == 128
    assert next(masker.model.parameters()).dtype == torch.float32  # fp16 on disk, float32 loaded
    rgb = np.zeros((100, 100, 3), np.uint8)
    (mask,) = masker.masks(rgb, [MaskPrompt((10, 10, 50, 60))])
    assert not (mask & ~clip_to_box(np.ones_like(mask), (10, 10, 50, 60))).any()
    assert cli(argv) == 1  # the directory is not empty now
    assert "pass --force" in capsys.readouterr().err
