"""Greedy generation over dataset records, Geo-R1's way: batched with left padding, and the whole generated
sequence decoded at once (``skip_special_tokens=True``, ``clean_up_tokenization_spaces=False``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from geo_r1_qgis.core.rules.prompts import PromptSpec
from train.data_format import ChipRecord


def generate_texts(model: Any, processor: Any, data_dir: Path, records: Sequence[ChipRecord], *, reasoning: bool,
                   max_new_tokens: int = 256, batch_size: int = 8) -> list[str]:  # fmt: skip
    """One greedy completion per record, in order. The tokenizer must pad on the left."""
    import torch
    from PIL import Image

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for i in range(0, len(records), batch_size):
            batch = records[i : i + batch_size]
            images, texts = [], []
            for r in batch:
                with Image.open(Path(data_dir) / r.image) as im:
                    images.append(im.convert("RGB"))
                messages = PromptSpec(r.expression, r.task, reasoning).messages()
                texts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
            inputs = processor(text=texts, images=images, return_tensors="pt", padding=True).to(device)
            with torch.no_grad():
                ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = ids[:, inputs["input_ids"].shape[1] :]
            out.extend(processor.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False))
    finally:
        if was_training:
            model.train()
    return out
