"""``geo-r1 tiny-sam``: build a small, randomly initialised SAM 2 checkpoint from its config.

No SAM weights can be downloaded on the project's machines, yet :mod:`engine.runtime.sam` must load and run the
real thing. This writes, with ``save_pretrained``, a ``Sam2Model`` checkpoint that loads through exactly the
code path of ``facebook/sam2.1-hiera-tiny`` (``Sam2Model.from_pretrained(dir)``), and a
``preprocessor_config.json`` in ``Sam2ImageProcessor``'s form (so transformers' ``Sam2Processor`` reads it
where torchvision is installed).

- ``real_size=False`` (the tests): a Hiera backbone of five blocks in four stages (global attention in
  block 3), 16–128 channels, a 128 px input, about 0.35 M parameters; built and run in well under a second
  on one CPU core.
- ``real_size=True`` (the benchmarks): transformers' default ``Sam2Config``, which is SAM 2.1-tiny's
  architecture (Hiera-T: stages 1/2/7/2, 96–768 channels, global attention in blocks 5, 7, 9; 1024 px input;
  31.4 M parameters in transformers' image-only Sam2Model), with random weights. Its masks mean nothing; its
  cost is the real model's.

Random weights do not outline objects: masks of either model are noise shaped by the prompts. torch and
transformers are imported inside functions only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

from geo_r1_qgis.core.errors import OutputError

log = logging.getLogger(__name__)

#: The tiny model's square input, in pixels (the real SAM 2's is 1024).
TINY_IMAGE_SIZE = 128


def tiny_sam_config(real_size: bool = False, image_size: int = TINY_IMAGE_SIZE):  # -> transformers.Sam2Config
    """The configuration :func:`build_tiny_sam` builds: tiny, or SAM 2.1-tiny's (``Sam2Config()``).

    ``image_size`` (tiny only; a multiple of 32, the backbone's stride): the square input, 128 for the tests'
    random model, 224 for the trained sample SAM (:mod:`train.sample_sam`)."""
    from transformers import Sam2Config

    if real_size:
        return Sam2Config()
    s = image_size
    return Sam2Config(
        vision_config={
            "backbone_config": {
                "model_type": "sam2_hiera_det_model",
                "hidden_size": 16,
                "image_size": [s, s],
                "blocks_per_stage": [1, 1, 2, 1],
                "embed_dim_per_stage": [16, 32, 64, 128],
                "num_attention_heads_per_stage": [1, 1, 2, 2],
                "window_size_per_stage": [4, 4, 4, 4],
                "global_attention_blocks": [3],
                "window_positional_embedding_background_size": [2, 2],
            },
            "backbone_channel_list": [128, 64, 32, 16],
            "backbone_feature_sizes": [[s // 4, s // 4], [s // 8, s // 8], [s // 16, s // 16]],
            "fpn_hidden_size": 32,
        },
        prompt_encoder_config={"hidden_size": 32, "image_size": s, "patch_size": 16},
        mask_decoder_config={"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2, "iou_head_hidden_dim": 32},
    )


def preprocessor_config(image_size: int) -> dict:
    """``preprocessor_config.json`` as ``Sam2ImageProcessor`` writes it, for a square input of ``image_size``."""
    return {
        "image_processor_type": "Sam2ImageProcessor",
        "processor_class": "Sam2Processor",
        "do_resize": True,
        "size": {"height": image_size, "width": image_size},
        "mask_size": {"height": image_size // 4, "width": image_size // 4},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "do_convert_rgb": True,
    }


@dataclasses.dataclass(frozen=True)
class TinySamConfig:
    """``geo-r1 tiny-sam``'s options."""

    out_dir: Path = dataclasses.field(
        metadata={"positional": True, "metavar": "OUT_DIR", "help": "directory to write the checkpoint into"}
    )
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of the random weights"})
    real_size: bool = dataclasses.field(
        default=False,
        metadata={"help": "SAM 2.1-tiny's architecture (31 M parameters, 1024 px input) instead of the tiny one: "
                          "random weights of the real cost, for benchmarks"},
    )  # fmt: skip
    force: bool = dataclasses.field(default=False, metadata={"help": "replace OUT_DIR if it is not empty"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))


def build_tiny_sam(out_dir: str | Path, seed: int = 0, *, real_size: bool = False, force: bool = False) -> Path:
    """Write a random SAM 2 checkpoint to ``out_dir`` (created; it must not exist unless ``force``) and return it."""
    import torch
    from transformers import Sam2Model

    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        if not force:
            raise OutputError(f"{out} exists and is not empty; choose another directory or pass --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_sam_config(real_size)
    torch.manual_seed(seed)
    model = Sam2Model(config).eval()
    model.save_pretrained(out)
    size = int(config.prompt_encoder_config.image_size)
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(size), indent=2), encoding="utf-8")
    n = sum(p.numel() for p in model.parameters())
    log.info(
        "random SAM 2 (%s, %d parameters, %d px input) written to %s",
        "2.1-tiny size" if real_size else "tiny",
        n,
        size,
        out,
    )
    return out
