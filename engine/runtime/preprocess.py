"""Model inputs for tiles that need no resize, without the image processor's slow path.

Qwen2-VL's PIL image processor spends most of its 13-24 ms per 504x504 tile on float64 rescale and
normalise passes and array copies (BENCHMARKS.md). For an image that ``smart_resize`` leaves unchanged
(sides multiples of 28 within the pixel bounds: every default tile), the whole job is a reorder of the
pixels into patches, ``x * a + b`` per channel in float32 and one write of the two temporal frames, done here
in numpy on the bytes Pillow holds. The result equals the processor's: the same
``image_grid_thw``, ``input_ids``, ``attention_mask`` and ``mm_token_type_ids``, and ``pixel_values`` within
1e-6 (tested). Anything else (an image that needs resizing, a processor with other settings) returns None
and the caller uses the processor as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from geo_r1_qgis.core.rules.coords import QWEN_FACTOR, smart_resize


def _settings(image_processor: Any) -> tuple[float, list[float], list[float], int, int, int, int, int] | None:
    ip = image_processor
    try:
        if not (ip.do_rescale and ip.do_normalize) or getattr(ip, "do_convert_rgb", True) is False:
            return None
        size = ip.size
        # a SizeDict; the min_pixels/max_pixels attributes exist only on some versions, so no .get(default)
        min_pixels = size["shortest_edge"] if "shortest_edge" in size else ip.min_pixels  # noqa: SIM401
        max_pixels = size["longest_edge"] if "longest_edge" in size else ip.max_pixels  # noqa: SIM401
        mean, std = list(ip.image_mean), list(ip.image_std)
        patch, temporal, merge = int(ip.patch_size), int(ip.temporal_patch_size), int(ip.merge_size)
        if patch * merge != QWEN_FACTOR or len(mean) != 3 or len(std) != 3:
            return None
        return float(ip.rescale_factor), mean, std, patch, temporal, merge, int(min_pixels), int(max_pixels)
    except (AttributeError, KeyError, TypeError):
        return None


def patch_pixels(image: Any, patch: int, merge: int) -> Any:
    """The RGBX bytes of an RGB image whose sides are multiples of ``patch * merge``, reordered into the
    processor's patch order: a flat uint8 array of (patches, P, P, RGBX), patches row by row in merge blocks.

    RGBX is how Pillow holds an RGB image, so ``tobytes`` only copies it (faster than packing RGB), and the
    reorder moves whole words, two pixels at once when ``patch`` is even, instead of single bytes."""
    import numpy as np

    w, h = image.size
    word = np.int64 if patch % 2 == 0 else np.int32
    per_row = patch * 4 // np.dtype(word).itemsize  # words per patch row
    words = np.frombuffer(image.tobytes("raw", "RGBX"), dtype=word)
    words = words.reshape(h // (patch * merge), merge, patch, w // (patch * merge), merge, per_row)
    return np.ascontiguousarray(words.transpose(0, 3, 1, 4, 2, 5)).view(np.uint8).reshape(-1)


def normalised_planes(pixels: Any, a: Sequence[Any], b: Sequence[Any]) -> Any:
    """``x * a[c] + b[c]`` in float32 for channel c of the RGBX ``pixels``, as a (3, pixels) array: one channel
    at a time, so each numpy loop runs over all the pixels at once."""
    import numpy as np

    planes = np.empty((3, pixels.size // 4), dtype=np.float32)
    for c in range(3):
        plane = planes[c]
        plane[...] = pixels[c::4]
        plane *= a[c]
        plane += b[c]
    return planes


def fast_pixel_values(images: Sequence[Any], image_processor: Any) -> tuple[Any, Any] | None:
    """``(pixel_values, image_grid_thw)`` as the Qwen2-VL image processor computes them, or None when any
    image would be resized (or the processor is configured in a way this path does not cover)."""
    import numpy as np
    import torch

    settings = _settings(image_processor)
    if settings is None or not images:
        return None
    rescale, mean, std, patch, temporal, merge, min_pixels, max_pixels = settings
    for im in images:
        w, h = im.size
        if getattr(im, "mode", "RGB") != "RGB" or smart_resize(h, w, QWEN_FACTOR, min_pixels, max_pixels) != (h, w):
            return None
    # (x * rescale - mean) / std == x * a + b, per channel, in float32 (within 1e-6 of the processor)
    a = [np.float32(rescale / s) for s in std]
    b = [np.float32(-m / s) for m, s in zip(mean, std, strict=True)]
    grids = [[1, im.size[1] // patch, im.size[0] // patch] for im in images]
    rows = [g[1] * g[2] for g in grids]
    area = patch * patch
    # Fresh for each call (the model may still hold the last one), written in place: no concat, no torch copy
    out = np.empty((sum(rows), 3, temporal, area), dtype=np.float32)
    start = 0
    for im, n in zip(images, rows, strict=True):
        planes = normalised_planes(patch_pixels(im, patch, merge), a, b)
        # (patches, C, T, P*P): each frame written twice by one broadcast, as one image is two identical frames
        out[start : start + n] = planes.reshape(3, n, 1, area).transpose(1, 0, 2, 3)
        start += n
    return torch.from_numpy(out.reshape(sum(rows), -1)), torch.tensor(grids, dtype=torch.int64)


_PROMPT_IDS: dict[tuple[int, str], list[int]] = {}


def _prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """The token ids of a prompt (with its one image token), cached: a run asks the same prompt per tile."""
    key = (id(tokenizer), text)
    ids = _PROMPT_IDS.get(key)
    if ids is None:
        if len(_PROMPT_IDS) > 512:
            _PROMPT_IDS.clear()
        ids = _PROMPT_IDS[key] = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


def fast_inputs(processor: Any, texts: Sequence[str], images: Sequence[Any]) -> Any | None:
    """What ``processor(text=texts, images=images, padding=True, return_tensors="pt")`` returns, for one image
    per text and images that need no resize; None otherwise."""
    from transformers import BatchFeature

    if len(texts) != len(images):
        return None
    pixels = fast_pixel_values(images, processor.image_processor)
    if pixels is None:
        return None
    pixel_values, grid = pixels
    import torch

    tok = processor.tokenizer
    token = getattr(processor, "image_token", "<|image_pad|>")
    image_id = tok.convert_tokens_to_ids(token)
    merge_len = int(processor.image_processor.merge_size) ** 2
    rows = []
    for text, g in zip(texts, grid.tolist(), strict=True):
        if text.count(token) != 1:
            return None
        # Special tokens are atomic, so the prompt with one image token, tokenized once and cached, then that
        # token repeated, equals the tokenization of the expanded prompt (tested against the processor).
        ids = _prompt_ids(tok, text)
        at = ids.index(image_id)
        rows.append(ids[:at] + [image_id] * (g[0] * g[1] * g[2] // merge_len) + ids[at + 1 :])
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if tok.padding_side == "left" else slice(0, len(r))
        input_ids[i, sl] = torch.tensor(r, dtype=torch.long)
        attention[i, sl] = 1
    data = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "mm_token_type_ids": (input_ids == image_id).to(torch.long),
        "pixel_values": pixel_values,
        "image_grid_thw": grid,
    }
    return BatchFeature(data=data)
