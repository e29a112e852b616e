"""engine/runtime/sam.py with a real (tiny, random) SAM 2 through transformers' Sam2Model, and the tiny builder."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from engine.runtime.sam import IMAGENET_MEAN, IMAGENET_STD, MaskPrompt, SamMasker, clip_to_box
from engine.runtime.tiny_sam import TINY_IMAGE_SIZE, build_tiny_sam, tiny_sam_config
from geo_r1_qgis.core.errors import ConfigError, ModelNotFoundError, OutputError


@pytest.fixture(scope="module")
def masker(tiny_sam_dir: Path) -> SamMasker:
    return SamMasker.load(tiny_sam_dir)


def image(h: int = 96, w: int = 160, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_tiny_sam_loads_as_sam2(masker: SamMasker, tiny_sam_dir: Path) -> None:
    assert type(masker.model).__name__ == "Sam2Model"
    assert masker.size == TINY_IMAGE_SIZE
    assert not masker.model.training
    settings = json.loads((tiny_sam_dir / "preprocessor_config.json").read_text())
    assert settings["size"] == {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    assert sum(p.numel() for p in masker.model.parameters()) < 1_000_000


def test_masks_are_boolean_image_sized_and_clipped_to_their_boxes(masker: SamMasker) -> None:
    rgb = image()
    prompts = [
        MaskPrompt((10, 20, 70, 80), ((30, 40), (50, 60))),
        MaskPrompt((100.7, 5.2, 150.9, 90.5)),
        MaskPrompt((0, 0, 160, 96), ((5, 5), (150, 90))),
    ]
    masks = masker.masks(rgb, prompts)
    assert len(masks) == 3
    for mask, p in zip(masks, prompts, strict=True):
        assert mask.shape == (96, 160) and mask.dtype == bool
        x1, y1, x2, y2 = (int(v) for v in p.box)
        outside = mask.copy()
        outside[y1:y2, x1:x2] = False
        assert not outside.any(), p
    # a random SAM still answers something somewhere in the whole-image box
    assert masks[2].any()


def test_grouped_batches_give_each_prompt_its_own_mask(masker: SamMasker) -> None:
    rgb = image(seed=1)
    prompts = [
        MaskPrompt((0, 0, 160, 96), ((20, 20), (30, 30))),
        MaskPrompt((0, 0, 160, 96)),
        MaskPrompt((0, 0, 160, 96), ((120, 70), (140, 80))),
        MaskPrompt((0, 0, 160, 96), ((60, 50),)),
    ]
    together = masker.masks(rgb, prompts)
    alone = [masker.masks(rgb, [p])[0] for p in prompts]
    for a, b in zip(together, alone, strict=True):
        assert np.array_equal(a, b)
    again = masker.masks(rgb, prompts)  # frozen and deterministic
    assert all(np.array_equal(a, b) for a, b in zip(again, together, strict=True))


def test_prompts_change_the_masks(masker: SamMasker) -> None:
    rgb = image(seed=2)
    whole = (0, 0, 160, 96)
    a, b = masker.masks(rgb, [MaskPrompt(whole, ((10, 10), (20, 15))), MaskPrompt(whole, ((140, 80), (150, 85)))])
    assert not np.array_equal(a, b)


def test_no_prompts_no_masks(masker: SamMasker) -> None:
    assert masker.masks(image(), []) == []


def test_pixel_values_of_an_image_at_the_model_size(masker: SamMasker) -> None:
    rgb = image(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, seed=3)
    got = masker.pixel_values(rgb).numpy()[0]
    want = (rgb.transpose(2, 0, 1) / 255.0 - np.array(IMAGENET_MEAN)[:, None, None]) / np.array(IMAGENET_STD)[
        :, None, None
    ]
    assert got.shape == (3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    assert np.abs(got - want).max() < 1e-5


def test_pixel_values_resize_a_flat_image_to_itself(masker: SamMasker) -> None:
    rgb = np.full((50, 70, 3), (10, 200, 90), dtype=np.uint8)
    got = masker.pixel_values(rgb).numpy()[0]
    want = (np.array([10, 200, 90]) / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert got.shape == (3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    assert np.abs(got - want[:, None, None]).max() < 1e-5


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None, reason="Sam2Processor needs torchvision, which .venv has not"
)
def test_same_inputs_as_sam2_processor(masker: SamMasker, tiny_sam_dir: Path) -> None:
    import torch
    from transformers import Sam2Processor

    proc = Sam2Processor.from_pretrained(tiny_sam_dir)
    rgb = image(seed=4)
    enc = proc(images=rgb, input_boxes=[[[10, 20, 70, 80]]], return_tensors="pt")
    assert torch.allclose(enc["pixel_values"], masker.pixel_values(rgb), atol=1e-4)


def test_clip_to_box_is_geo_r1s() -> None:
    full = np.ones((10, 12), dtype=bool)
    got = clip_to_box(full, (2.9, 1.2, 5.99, 4.0))  # int() truncates: [1:4, 2:5]
    want = np.zeros((10, 12), dtype=bool)
    want[1:4, 2:5] = True
    assert np.array_equal(got, want)
    assert clip_to_box(full, (-5, -5, 100, 100)).all()  # clamped to the mask
    assert not clip_to_box(full, (8, 2, 3, 9)).any()  # reversed: nothing
    assert not clip_to_box(full, (20, 20, 30, 30)).any()  # outside


@pytest.mark.parametrize(
    "box, points",
    [
        ((1, 2, 3), ()),
        ((5, 0, 1, 4), ()),
        ((0, 0, float("nan"), 4), ()),
        ((0, 0, 4, 4), ((1, 2, 3),)),
        ((0, 0, 4, 4), ((True, 2),)),
    ],
)
def test_mask_prompt_rejects_bad_values(box: tuple, points: tuple) -> None:
    with pytest.raises(ConfigError, match="mask prompt"):
        MaskPrompt(box, points)


@pytest.mark.parametrize(
    "rgb",
    [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 4), np.uint8), np.zeros((10, 10, 3), np.float32), [[0, 0, 0]]],
)
def test_masks_reject_what_is_not_an_rgb_image(masker: SamMasker, rgb: object) -> None:
    with pytest.raises(ConfigError, match="uint8"):
        masker.masks(rgb, [MaskPrompt((0, 0, 4, 4))])  # type: ignore[arg-type]


def test_load_errors_say_what_to_pass(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        SamMasker.load(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="not SAM 2"):
        SamMasker.load(tiny_model_dir)  # the tiny Qwen2.5-VL
    with pytest.raises(ModelNotFoundError, match="Hugging Face cache"):
        SamMasker.load("facebook/sam2.1-hiera-nonexistent", local_files_only=True)
    with pytest.raises(ConfigError, match="empty"):
        SamMasker.load(" ")


def test_build_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("keep")
    with pytest.raises(OutputError, match="--force"):
        build_tiny_sam(tmp_path / "x")
    assert (tmp_path / "x" / "file").read_text() == "keep"


def test_real_size_config_is_sam21_tiny() -> None:
    cfg = tiny_sam_config(real_size=True)
    backbone = cfg.vision_config.backbone_config
    assert list(backbone.blocks_per_stage) == [1, 2, 7, 2]
    assert list(backbone.embed_dim_per_stage) == [96, 192, 384, 768]
    assert list(backbone.global_attention_blocks) == [5, 7, 9]
    assert cfg.prompt_encoder_config.image_size == 1024


def test_the_command_builds_what_the_masker_loads(tmp_path: Path) -> None:
    from engine.cli import main as cli

    assert cli(["tiny-sam", str(tmp_path / "sam"), "--seed", "3"]) == 0
    masker = SamMasker.load(tmp_path / "sam")
    assert masker.size == TINY_IMAGE_SIZE
    assert cli(["tiny-sam", str(tmp_path / "sam")]) == 1  # not empty, no --force: refused with the fix
