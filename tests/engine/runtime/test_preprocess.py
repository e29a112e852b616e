"""The fast model-input path equals the processor's, and the engine's answers do not change with it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from PIL import Image

from engine.runtime.loading import load_processor
from engine.runtime.preprocess import fast_inputs, fast_pixel_values
from geo_r1_qgis.core.rules.prompts import build_messages


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_processor(str(tiny_model_dir))


def _images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.mark.parametrize("sizes", [[(504, 504)], [(504, 504), (112, 140)], [(56, 56), (1008, 504), (28 * 7, 28 * 3)]])
def test_fast_inputs_equal_the_processors(processor, sizes):
    images = _images(sizes)
    texts = [processor.apply_chat_template(build_messages("tanks " * (i + 1), "multi", True), tokenize=False,
                                           add_generation_prompt=True) for i in range(len(images))]  # fmt: skip
    ref = processor(text=texts, images=images, padding=True, return_tensors="pt")
    got = fast_inputs(processor, texts, images)
    assert got is not None and sorted(got.keys()) == sorted(ref.keys())
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert got[key].dtype == ref[key].dtype and bool((got[key] == ref[key]).all()), key
    assert got["pixel_values"].shape == ref["pixel_values"].shape
    assert float((got["pixel_values"] - ref["pixel_values"]).abs().max()) <= 1e-6


def test_an_odd_patch_side_moves_pixels_one_word_at_a_time(processor):
    # The fast path moves two RGBX pixels as one 8-byte word when the patch side is even (14); with an odd
    # side (7 x merge 4, still 28) it moves one pixel per 4-byte word. The processor itself is the reference.
    image_processor = copy.deepcopy(processor.image_processor)
    image_processor.patch_size, image_processor.merge_size = 7, 4
    images = _images([(56, 84), (112, 56)], seed=1)
    ref = image_processor(images=images, return_tensors="pt")
    got = fast_pixel_values(images, image_processor)
    assert got is not None and bool((got[1] == ref["image_grid_thw"]).all())
    assert got[0].shape == ref["pixel_values"].shape == (12 * 8 + 8 * 16, 3 * 2 * 7 * 7)
    assert float((got[0] - ref["pixel_values"]).abs().max()) <= 1e-6


@pytest.mark.parametrize("size", [(512, 512), (100, 130), (20, 20)])
def test_images_that_need_resizing_take_the_processor(processor, size):
    assert fast_pixel_values(_images([size]), processor.image_processor) is None


def test_a_grey_image_takes_the_processor(processor):
    assert fast_pixel_values([Image.new("L", (56, 56))], processor.image_processor) is None


def test_the_engine_answers_the_same_with_and_without_the_fast_path(tiny_format_model_dir):
    from engine.runtime.backend import GenerationSettings, GroundItem
    from engine.runtime.loading import LoadConfig
    from engine.runtime.local import LocalBackend

    backend = LocalBackend(LoadConfig(model=str(tiny_format_model_dir), device="cpu"), batch_size=4)
    try:
        items = [GroundItem(image=im, expression="storage tanks") for im in _images([(504, 504), (224, 224)] * 2)]
        settings = GenerationSettings(max_new_tokens=48)
        fast = backend.ground_batched(items, settings)
        backend.fast_preprocess = False
        slow = backend.ground_batched(items, settings)
    finally:
        backend.close()
    assert [r.raw_text for r in fast] == [r.raw_text for r in slow]
    for f, s in zip(fast, slow, strict=True):  # same boxes; scores equal up to float rounding
        corners = [[(b.x1, b.y1, b.x2, b.y2, b.label) for b in r.boxes] for r in (f, s)]
        assert corners[0] == corners[1]
        assert [b.score for b in f.boxes] == pytest.approx([b.score for b in s.boxes], abs=1e-5)
