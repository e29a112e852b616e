"""Masks from boxes and points with a frozen SAM 2 (Geo-R1's GRES task, GEO-R1.md "GRES", Eq. 7).

:class:`SamMasker` loads a SAM 2 checkpoint with transformers' own ``Sam2Model`` (a directory, e.g. from
``geo-r1 tiny-sam DIR``, or a hub id such as ``facebook/sam2.1-hiera-tiny`` already in the Hugging Face cache;
offline, as the VLM loads: :mod:`engine.runtime.loading`) and turns :class:`MaskPrompt` s (a box and its
positive points, in image pixels) into boolean masks of the image's size, each clipped to its box.

Choices worth knowing:

- **As Geo-R1's evaluation prompts SAM** (``test_gres_eval.py``, SAM 2.1 through ``SAM2ImagePredictor``): one
  image embedding per image; per target the box plus its keypoints as positive points (label 1),
  ``multimask_output=False``; the mask is the logits upsampled to the image's size (bilinear) and ``> 0``; then
  clipped to the box (``clip_mask_to_bbox``: the box's coordinates truncated with ``int()``, clamped to the
  image; pixels outside ``[y1:y2, x1:x2]`` are cleared). A box given alone ("refine to outline") is a box
  prompt without points.
- **No torchvision.** transformers' ``Sam2Processor`` needs its torchvision image processor, and the engine's
  venv has no torchvision on purpose (it would switch the Qwen processor: see loading.py). So the processor's
  steps are done here, in torch, exactly as its configuration says: resize to the model's square input
  (``prompt_encoder_config.image_size``, 1024 for real checkpoints) bilinearly with antialiasing and rounded
  back to bytes (torchvision resizes uint8 images as uint8), scale by 1/255, normalise by the checkpoint's
  ``preprocessor_config.json`` mean and std (ImageNet's when it has none); coordinates scaled by
  ``size / width`` and ``size / height`` (``Sam2Processor._normalize_coordinates``). Prompts with the same number
  of points go through the decoder together (no padded points).
- **float32** on every device: the model is small (SAM 2.1-tiny: 31 M parameters as an image model), and masks
  are thresholds of logits, where half precision moves edges.

torch and transformers are imported inside functions only.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from geo_r1_qgis.core.errors import ConfigError

log = logging.getLogger(__name__)

#: ImageNet's mean and std, Sam2ImageProcessor's defaults.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Most prompts sent through the mask decoder at once (bounds its memory on images with many targets).
DECODER_CHUNK = 32


@dataclass(frozen=True)
class MaskPrompt:
    """One SAM prompt: a box ``(x1, y1, x2, y2)`` in image pixels (x1 <= x2, y1 <= y2) and positive points."""

    box: tuple[float, float, float, float]
    points: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        box = tuple(self.box)
        if len(box) != 4 or not all(_finite(v) for v in box):
            raise ConfigError(f"a mask prompt's box must be four finite numbers (x1, y1, x2, y2), got {self.box!r}")
        if box[0] > box[2] or box[1] > box[3]:
            raise ConfigError(f"a mask prompt's box must have x1 <= x2 and y1 <= y2, got {box}; order its corners")
        points = tuple(tuple(p) for p in self.points)
        if not all(len(p) == 2 and all(_finite(v) for v in p) for p in points):
            raise ConfigError(f"a mask prompt's points must be (x, y) pairs of finite numbers, got {self.points!r}")
        object.__setattr__(self, "box", tuple(float(v) for v in box))
        object.__setattr__(self, "points", tuple((float(x), float(y)) for x, y in points))


def _finite(v: object) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def clip_to_box(mask: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """Eq. 7's clip, as Geo-R1's ``clip_mask_to_bbox``: keep ``mask[y1:y2, x1:x2]`` (coordinates truncated by
    ``int()``, clamped to the mask), clear the rest. A box with no pixel inside gives an empty mask."""
    out = np.zeros(mask.shape, dtype=bool)
    x1, y1, x2, y2 = (int(c) for c in box)
    x1, y1 = max(x1, 0), max(y1, 0)
    x2, y2 = min(x2, mask.shape[1]), min(y2, mask.shape[0])
    if x1 < x2 and y1 < y2:
        out[y1:y2, x1:x2] = mask[y1:y2, x1:x2]
    return out


def _sam_config_or_error(source: str, offline: bool) -> Any:
    """The checkpoint's config, which must be a SAM 2 one; ModelNotFoundError / ConfigError otherwise."""
    from transformers import AutoConfig

    from engine.runtime.loading import _looks_like_path, _not_found

    if _looks_like_path(source):
        path = Path(source).expanduser()
        if not path.is_dir() or not (path / "config.json").is_file():
            raise _not_found("SAM 2 model", source, offline)
        if not any(path.glob("*.safetensors")) and not (path / "pytorch_model.bin").is_file():
            raise _not_found("SAM 2 weights for", source, offline)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=offline, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise _not_found("SAM 2 model", source, offline, exc) from exc
    if getattr(config, "model_type", None) != "sam2":
        raise ConfigError(
            f"--sam {source!r} is a {getattr(config, 'model_type', '?')!r} checkpoint, not SAM 2; pass a SAM 2 "
            "checkpoint (e.g. facebook/sam2.1-hiera-tiny in the Hugging Face cache, or `geo-r1 tiny-sam DIR`)"
        )
    return config


def _preprocessor_settings(source: str, offline: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The checkpoint's normalisation (mean, std), from its preprocessor_config.json when it has one."""
    from transformers.utils import cached_file

    try:
        found = cached_file(
            source,
            "preprocessor_config.json",
            local_files_only=offline,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except OSError:
        found = None
    if not found:
        return IMAGENET_MEAN, IMAGENET_STD
    settings = json.loads(Path(found).read_text(encoding="utf-8"))
    mean = tuple(float(v) for v in settings.get("image_mean") or IMAGENET_MEAN)
    std = tuple(float(v) for v in settings.get("image_std") or IMAGENET_STD)
    if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
        raise ConfigError(f"{found}: image_mean and image_std must be three numbers each (std > 0), got {mean}, {std}")
    return mean, std


class SamMasker:
    """A frozen SAM 2 on one device that turns prompts into clipped boolean masks (see the module docstring)."""

    def __init__(self, model: Any, source: str, mean: Sequence[float], std: Sequence[float], device: str) -> None:
        self.model = model
        self.source = source
        self.device = device
        self.size = int(model.config.prompt_encoder_config.image_size)
        import torch

        self._mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    @classmethod
    def load(cls, model: str | Path, device: str = "cpu", *, local_files_only: bool | None = None) -> SamMasker:
        """Load SAM 2 from a directory or a hub id in the cache (offline when HF_HUB_OFFLINE is set, or asked).

        ``device``: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (as the VLM's). Raises ModelNotFoundError
        (with the fix) when the weights are not there, ConfigError when they are not SAM 2's.
        """
        from engine.runtime.loading import _offline, resolve_device_dtype

        source = str(model)
        if not source.strip():
            raise ConfigError("the SAM model is empty; pass a SAM 2 directory or hub id (e.g. `geo-r1 tiny-sam DIR`)")
        device, _ = resolve_device_dtype(device, "float32")
        offline = _offline(local_files_only)
        _sam_config_or_error(source, offline)
        mean, std = _preprocessor_settings(source, offline)
        from transformers import Sam2Model

        try:
            net = Sam2Model.from_pretrained(source, local_files_only=offline, dtype="float32")
        except OSError as exc:
            from engine.runtime.loading import _not_found

            raise _not_found("SAM 2 weights for", source, offline, exc) from exc
        net.to(device).eval()
        log.info(
            "SAM 2 %s loaded on %s (input %d px)", source, device, int(net.config.prompt_encoder_config.image_size)
        )
        return cls(net, source, mean, std, device)

    def pixel_values(self, rgb: np.ndarray) -> Any:
        """The model's input for an (H, W, 3) uint8 image: (1, 3, size, size) float32 (see the module docstring)."""
        import torch
        import torch.nn.functional as F

        image = torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device).permute(2, 0, 1)[None].float()
        if image.shape[-2:] != (self.size, self.size):
            image = F.interpolate(image, (self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
            image = image.round_().clamp_(0, 255)
        return (image / 255.0 - self._mean) / self._std

    def masks(self, rgb: np.ndarray, prompts: Sequence[MaskPrompt]) -> list[np.ndarray]:
        """One boolean (H, W) mask per prompt, in order, each clipped to its box (Eq. 7)."""
        if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            got = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
            raise ConfigError(f"SAM needs an RGB image as a (height, width, 3) uint8 array, got {got}")
        height, width = rgb.shape[:2]
        if height < 1 or width < 1:
            raise ConfigError(f"SAM needs a non-empty image, got {width}x{height}")
        prompts = list(prompts)
        for p in prompts:
            if not isinstance(p, MaskPrompt):
                raise ConfigError(f"SAM prompts must be MaskPrompt values, got {type(p).__name__}")
        if not prompts:
            return []
        import torch

        out: list[np.ndarray | None] = [None] * len(prompts)
        sx, sy = self.size / width, self.size / height
        with torch.inference_mode():
            embeddings = self.model.get_image_embeddings(self.pixel_values(rgb))
            groups: dict[int, list[int]] = {}
            for i, p in enumerate(prompts):
                groups.setdefault(len(p.points), []).append(i)
            for n_points, indices in groups.items():
                for start in range(0, len(indices), DECODER_CHUNK):
                    chunk = indices[start : start + DECODER_CHUNK]
                    boxes = torch.tensor(
                        [
                            [
                                [p.box[0] * sx, p.box[1] * sy, p.box[2] * sx, p.box[3] * sy]
                                for p in (prompts[i] for i in chunk)
                            ]
                        ],
                        dtype=torch.float32,
                        device=self.device,
                    )
                    kwargs: dict[str, Any] = {"input_boxes": boxes}
                    if n_points:
                        pts = [[[x * sx, y * sy] for x, y in prompts[i].points] for i in chunk]
                        kwargs["input_points"] = torch.tensor([pts], dtype=torch.float32, device=self.device)
                        kwargs["input_labels"] = torch.ones(
                            (1, len(chunk), n_points), dtype=torch.int64, device=self.device
                        )
                    result = self.model(image_embeddings=embeddings, multimask_output=False, **kwargs)
                    logits = result.pred_masks[0, :, 0]  # (n, h, w) low-resolution logits
                    full = torch.nn.functional.interpolate(
                        logits[:, None], (height, width), mode="bilinear", align_corners=False
                    )[:, 0]
                    binary = (full > 0).cpu().numpy()
                    for k, i in enumerate(chunk):
                        out[i] = clip_to_box(binary[k], prompts[i].box)
        return [m for m in out if m is not None]
