"""Load a Qwen2.5-VL (Geo-R1) checkpoint, its processor and optional LoRA adapters.

One entry point, :func:`load_model`, takes one :class:`LoadConfig` and returns a :class:`LoadedModel`:
the model in eval mode on its device, and the processor with left padding (batched generation needs
it). The same code loads the real ``Qwen/Qwen2.5-VL-3B-Instruct``, a ``Geo-R1/...`` checkpoint and the
project's tiny test model (``geo-r1 tiny-model``).

Choices worth knowing:

- **Never remote code.** ``trust_remote_code=False`` is passed explicitly everywhere.
- **Offline.** ``from_pretrained`` already honours ``HF_HUB_OFFLINE`` and the HF cache; we also pass
  ``local_files_only=True`` when ``HF_HUB_OFFLINE`` is set in the environment (huggingface_hub reads it
  only once, at import). Missing weights become one :class:`ModelNotFoundError` that names the model,
  where it was looked for and how to fix it.
- **Devices.** CUDA loads in bfloat16 (float16 where the GPU lacks bf16); Apple ``mps`` loads in
  **float32**: Qwen2.5 activations overflow float16, and bfloat16 on MPS depends on the macOS version, so
  we trade memory (about 15 GB for the 3B model) for correct numbers; pass ``dtype="bfloat16"`` to try
  it. Everything else is CPU float32.
- **No torchvision.** transformers 5.x's ``AutoProcessor`` always builds Qwen2-VL's *video* processor,
  which needs torchvision, so ``AutoProcessor.from_pretrained`` raises ImportError for every
  Qwen2.5-VL checkpoint when torchvision is missing (huggingface/transformers#48558). We then load the
  same processor without its video part (:func:`image_only_processor_class`): the tokenizer and the
  image processor still come from ``from_pretrained`` of the same directory or id, and the image
  processor is the PIL one, which ``AutoImageProcessor`` picks by itself when torchvision is absent.
- **Geo-R1 checkpoints** need the base processor: pass ``processor="Qwen/Qwen2.5-VL-3B-Instruct"``. If
  their ``config.json`` fails to load with a ``to_dict()`` error (GEO-R1.md), the config of the
  ``processor`` source (the base model, same architecture) is used instead, with a warning.

torch, transformers and peft are imported inside functions only.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from geo_r1_qgis.core.errors import ConfigError, ModelNotFoundError
from geo_r1_qgis.core.rules.coords import QWEN_FACTOR

log = logging.getLogger(__name__)

DEVICES_HELP = "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclasses.dataclass(frozen=True)
class LoadConfig:
    """What to load and where. Validated when built; every message names the fix."""

    model: str = dataclasses.field(metadata={"help": "Hugging Face id or local directory of the model"})
    processor: str | None = dataclasses.field(
        default=None,
        metadata={"help": "id or directory of the processor if it differs (Geo-R1: the base Qwen2.5-VL)"},
    )
    adapters: Mapping[str, str] = dataclasses.field(
        default_factory=dict, metadata={"help": "LoRA adapters to register: name -> directory"}
    )
    device: str = dataclasses.field(default="auto", metadata={"help": DEVICES_HELP})
    dtype: str = dataclasses.field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16"})
    attn_implementation: str = dataclasses.field(
        default="auto", metadata={"help": "auto (flash_attention_2 on CUDA when installed, else sdpa), sdpa, eager"}
    )
    local_files_only: bool | None = dataclasses.field(
        default=None, metadata={"help": "never touch the network (None: only when HF_HUB_OFFLINE is set)"}
    )

    def __post_init__(self) -> None:
        model = str(self.model).strip() if self.model is not None else ""
        if not model:
            raise ConfigError("model is empty; pass a Hugging Face id (Qwen/Qwen2.5-VL-3B-Instruct) or a directory")
        object.__setattr__(self, "model", model)
        if self.processor is not None:
            processor = str(self.processor).strip()
            if not processor:
                raise ConfigError("processor is empty; leave it unset to load the processor from the model")
            object.__setattr__(self, "processor", processor)
        adapters: dict[str, str] = {}
        for name, path in dict(self.adapters or {}).items():
            if not isinstance(name, str) or not name.strip():
                raise ConfigError(f"adapter name {name!r} is empty; give each adapter a non-empty name")
            if path is None or not str(path).strip():
                raise ConfigError(f"adapter {name!r} has no path; pass the directory written by save_pretrained")
            adapters[name] = str(path)
        object.__setattr__(self, "adapters", MappingProxyType(adapters))
        device = str(self.device).strip().lower()
        if not _DEVICE_RE.match(device):
            raise ConfigError(f"device {self.device!r} is not valid; use {DEVICES_HELP}")
        object.__setattr__(self, "device", device)
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not valid; use one of {', '.join(DTYPES)}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(
                f"attn_implementation {self.attn_implementation!r} is not valid; "
                f"use one of {', '.join(ATTN_IMPLEMENTATIONS)}"
            )

    @property
    def processor_source(self) -> str:
        return self.processor or self.model


# --------------------------------------------------------------------------------------------------
# Device, dtype, attention
# --------------------------------------------------------------------------------------------------


def resolve_device_dtype(
    device: str = "auto",
    dtype: str = "auto",
    *,
    cuda_available: bool | None = None,
    cuda_bf16: bool | None = None,
    mps_available: bool | None = None,
) -> tuple[str, str]:
    """Return ``(device, dtype)`` as strings, e.g. ``("cuda:0", "bfloat16")``.

    ``auto`` picks CUDA, then Apple MPS, then CPU. ``auto`` dtype: bfloat16 on CUDA (float16 on GPUs
    without bf16), float32 on MPS (see the module docstring) and on CPU. An explicit dtype is kept.
    The ``*_available`` arguments default to asking torch; tests pass them to check the table.
    """
    if not _DEVICE_RE.match(device):
        raise ConfigError(f"device {device!r} is not valid; use {DEVICES_HELP}")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not valid; use one of {', '.join(DTYPES)}")
    if cuda_available is None or mps_available is None or cuda_bf16 is None:
        import torch

        if cuda_available is None:
            cuda_available = torch.cuda.is_available()
        if mps_available is None:
            mps_available = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
        if cuda_bf16 is None:
            cuda_bf16 = bool(cuda_available and torch.cuda.is_bf16_supported())

    if device == "auto":
        device = "cuda:0" if cuda_available else "mps" if mps_available else "cpu"
    elif device.startswith("cuda"):
        if not cuda_available:
            raise ConfigError(f"device {device!r} asked for, but CUDA is not available; use device='auto' or 'cpu'")
        if device == "cuda":
            device = "cuda:0"
    elif device == "mps" and not mps_available:
        raise ConfigError("device 'mps' asked for, but Apple MPS is not available; use device='auto' or 'cpu'")

    if dtype == "auto":
        dtype = ("bfloat16" if cuda_bf16 else "float16") if device.startswith("cuda") else "float32"
    elif device == "cpu" and dtype == "float16":
        log.warning("float16 on CPU is slow and poorly supported; consider dtype='float32' or 'bfloat16'")
    return device, dtype


def resolve_attn_implementation(attn: str, device: str, dtype: str) -> str:
    """``auto`` -> ``flash_attention_2`` when flash_attn is installed and the model runs on CUDA in
    16 bits, else ``sdpa``. An explicit ``flash_attention_2`` without those is a ConfigError."""
    flash_ok = device.startswith("cuda") and dtype in ("bfloat16", "float16")
    if attn == "auto":
        return "flash_attention_2" if flash_ok and _importable("flash_attn") else "sdpa"
    if attn == "flash_attention_2":
        if not _importable("flash_attn"):
            raise ConfigError("attn_implementation 'flash_attention_2' needs flash-attn; install it or use 'sdpa'")
        if not flash_ok:
            raise ConfigError(f"flash_attention_2 needs CUDA and bfloat16/float16, not {device}/{dtype}; use 'sdpa'")
    return attn


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def has_torchvision() -> bool:
    """Whether torchvision is importable (then transformers uses its fast image/video processors)."""
    return _importable("torchvision")


# --------------------------------------------------------------------------------------------------
# Locating weights
# --------------------------------------------------------------------------------------------------


def _offline(local_files_only: bool | None) -> bool:
    if local_files_only is not None:
        return local_files_only
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    from huggingface_hub import is_offline_mode

    return bool(is_offline_mode())


def _looks_like_path(source: str) -> bool:
    """A local directory, as opposed to a hub id (``org/name``, exactly one slash)."""
    if source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1:
        return True
    return Path(source).expanduser().exists()


def hub_cache_dir(model_id: str) -> Path:
    """Where huggingface_hub keeps ``model_id`` (it may not exist)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + model_id.replace("/", "--"))


def _not_found(what: str, source: str, offline: bool, cause: BaseException | None = None) -> ModelNotFoundError:
    path = Path(source).expanduser()
    if _looks_like_path(source):
        if not path.exists():
            where = f"the directory {path} does not exist"
        else:
            where = f"no {what} files were found in the directory {path}"
        fix = "pass the directory that holds config.json and the weights (e.g. from `geo-r1 tiny-model DIR`)"
    else:
        where = f"not found in the Hugging Face cache {hub_cache_dir(source)}"
        if not offline:
            where += " and not downloadable"
        fix = (
            f"run `huggingface-cli download {source}` on a connected machine and copy the cache, "
            "or pass a local directory"
        )
    detail = f" ({type(cause).__name__}: {str(cause).splitlines()[0][:200]})" if cause else ""
    mode = " [offline: HF_HUB_OFFLINE]" if offline else ""
    return ModelNotFoundError(f"{what} {source!r}: {where}{mode}; {fix}{detail}")


def _check_local_model_dir(source: str, offline: bool) -> None:
    path = Path(source).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file():
        raise _not_found("model", source, offline)
    if not any((path / name).is_file() for name in _WEIGHT_FILES) and not any(path.glob("*.safetensors")):
        raise _not_found("model weights for", source, offline)


# --------------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------------


@functools.cache
def image_only_processor_class() -> type:
    """``Qwen2_5_VLProcessor`` without its video processor, for environments without torchvision.

    ``ProcessorMixin`` reads the sub-processors from the ``__init__`` signature, so dropping the
    ``video_processor`` parameter is all it takes; images and text work exactly as in the original.
    """
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        """Qwen2.5-VL's processor for images and text only (no torchvision, hence no video)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(
                image_processor=image_processor,
                tokenizer=tokenizer,
                video_processor=None,
                chat_template=chat_template,
                **kwargs,
            )

    return ImageOnlyQwen2_5_VLProcessor


def load_processor(source: str, *, local_files_only: bool | None = None, padding_side: str = "left") -> Any:
    """Load the processor of ``source`` (id or directory), tokenizer padded on ``padding_side``."""
    offline = _offline(local_files_only)
    kwargs = {"trust_remote_code": False, "local_files_only": offline}
    if _looks_like_path(source):
        path = Path(source).expanduser()
        if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
            raise _not_found("processor", source, offline)
        source = str(path)
    try:
        if has_torchvision():
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(source, **kwargs)
        else:
            processor = image_only_processor_class().from_pretrained(source, **kwargs)
    except OSError as exc:
        raise _not_found("processor", source, offline, exc) from exc
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise ConfigError(
            f"{source!r} did not give a vision-language processor (got {type(processor).__name__}); "
            "pass processor='Qwen/Qwen2.5-VL-3B-Instruct' (or its local directory)"
        )
    processor.tokenizer.padding_side = padding_side
    return processor


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def _load_model_config(config: LoadConfig, offline: bool) -> Any:
    from transformers import AutoConfig

    kwargs = {"trust_remote_code": False, "local_files_only": offline}
    try:
        return AutoConfig.from_pretrained(config.model, **kwargs)
    except OSError as exc:
        raise _not_found("model", config.model, offline, exc) from exc
    except (AttributeError, TypeError) as exc:
        if "to_dict" not in str(exc) or config.processor is None:
            raise
        # Known Geo-R1 quirk: their config.json trips on to_dict(); the base model's config fixes it.
        log.warning(
            "config of %s failed (%s); using the config of the base model %s instead",
            config.model, exc, config.processor,
        )  # fmt: skip
        try:
            return AutoConfig.from_pretrained(config.processor, **kwargs)
        except OSError as exc2:
            raise _not_found("base model config", config.processor, offline, exc2) from exc2


def load_model(config: LoadConfig) -> LoadedModel:
    """Load model, processor and adapters as ``config`` says. Raises ModelNotFoundError or ConfigError."""
    import torch
    from transformers import AutoModelForImageTextToText

    offline = _offline(config.local_files_only)
    device, dtype = resolve_device_dtype(config.device, config.dtype)
    attn = resolve_attn_implementation(config.attn_implementation, device, dtype)
    if _looks_like_path(config.model):
        _check_local_model_dir(config.model, offline)
    model_config = _load_model_config(config, offline)
    processor = load_processor(config.processor_source, local_files_only=offline)
    log.info("loading %s on %s (%s, attention %s)", config.model, device, dtype, attn)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            config.model,
            config=model_config,
            dtype=getattr(torch, dtype),
            attn_implementation=attn,
            trust_remote_code=False,
            local_files_only=offline,
        )
    except OSError as exc:
        raise _not_found("model weights for", config.model, offline, exc) from exc
    model.to(device)
    model.eval()
    loaded = LoadedModel(
        base_model=model,
        processor=processor,
        device=device,
        dtype=dtype,
        attn_implementation=attn,
        model_name=config.model,
        processor_name=config.processor_source,
        has_torchvision=has_torchvision(),
        tile=served_tile(config.model),
    )
    for name, path in config.adapters.items():
        loaded.adapters.register(name, path)
    return loaded


class LoadedModel:
    """A loaded model, its processor and its adapters. Read-only attributes.

    ``model`` is what to call ``generate`` on: the base model, or the peft wrapper once an adapter is
    registered (then ``adapters.activate(None)`` makes it behave exactly like the base model).
    """

    def __init__(
        self,
        *,
        base_model: Any,
        processor: Any,
        device: str,
        dtype: str,
        attn_implementation: str,
        model_name: str,
        processor_name: str,
        has_torchvision: bool,
        tile: int | None = None,
    ) -> None:
        self._base_model = base_model
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self.attn_implementation = attn_implementation
        self.model_name = model_name
        self.processor_name = processor_name
        self.has_torchvision = has_torchvision
        #: the tile side the model was trained to serve (its manifest's ``"tile"``); None: not stated
        self.tile = tile
        self.adapters = AdapterManager(base_model, model_name)

    @property
    def model(self) -> Any:
        return self.adapters.model

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def __repr__(self) -> str:
        return (
            f"LoadedModel(model={self.model_name!r}, processor={self.processor_name!r}, device={self.device!r}, "
            f"dtype={self.dtype!r}, adapters={self.adapters.list()!r}, active={self.adapters.active!r})"
        )


#: The manifest the project writes beside a model it trains (``train/sample_model.py``); its ``"tile"`` is the
#: tile side the model serves, which ``GET /info`` reports and runs default to.
MODEL_MANIFEST = "geo_r1_sample_model.json"


def served_tile(source: str) -> int | None:
    """The tile side a model's manifest (:data:`MODEL_MANIFEST`) says it serves; None without one. A manifest
    that cannot be read, or a tile that is not a multiple of 28, is logged and ignored (the run's default holds)."""
    directory = model_directory(source)
    manifest = directory / MODEL_MANIFEST if directory is not None else None
    if manifest is None or not manifest.is_file():
        return None
    try:
        tile = json.loads(manifest.read_text(encoding="utf-8")).get("tile")
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("%s could not be read (%s): the model's serving tile is not known", manifest, exc)
        return None
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < QWEN_FACTOR or tile % QWEN_FACTOR:
        log.warning("%s gives tile %r, not a multiple of %d: ignored", manifest, tile, QWEN_FACTOR)
        return None
    return tile


#: The manifest a Geo-R1 trainer writes beside its adapter (``train/trainer.py``).
ADAPTER_MANIFEST = "geo_r1_adapter.json"
_FINGERPRINT_HEAD = 16 * 1024 * 1024


def model_directory(source: str, *, local_files_only: bool | None = None) -> Path | None:
    """The local directory of a model: ``source`` itself, or its snapshot in the Hugging Face cache."""
    if _looks_like_path(source) or Path(source).expanduser().is_dir():
        path = Path(source).expanduser()
        return path if path.is_dir() else None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception:  # not cached (or no hub library): no fingerprint
        return None


def model_fingerprint(source: str) -> str | None:
    """A cheap identity of a model's weights: sha256 over each weight file's name, size and first 16 MiB.

    Reads at most 16 MiB a file (a 3B model is hashed in well under a second). Small models are hashed
    whole. None when the weights are not on this machine.
    """
    directory = model_directory(source)
    if directory is None:
        return None
    files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file()
                   and not p.name.startswith("adapter_"))  # fmt: skip
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}\0{f.stat().st_size}\0".encode())
        with f.open("rb") as fh:
            digest.update(fh.read(_FINGERPRINT_HEAD))
    return digest.hexdigest()


def check_adapter_base(directory: Path, base_source: str, name: str) -> None:
    """Refuse an adapter whose Geo-R1 manifest names another base model (a message naming both)."""
    manifest_file = Path(directory) / ADAPTER_MANIFEST
    if not manifest_file.is_file():
        log.info("adapter %s has no %s; its base model cannot be checked", name, ADAPTER_MANIFEST)
        return
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        want = manifest.get("base_model_hash")
        want_name = manifest.get("base_model", "?")
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(
            f"adapter {name!r}: {manifest_file} is not valid JSON ({exc}); re-train or re-save it"
        ) from exc
    have = model_fingerprint(base_source)
    if want and have and want != have:
        raise ConfigError(
            f"adapter {name!r} ({directory}) was trained on the base model {want_name!r} (weights "
            f"{want[:12]}), but this engine serves {base_source!r} (weights {have[:12]}); serve it with "
            f"--model {want_name} or train the adapter on {base_source}"
        )


class AdapterManager:
    """Several peft LoRA adapters on one base model, switched without reloading the base.

    The first ``register`` wraps the base model with ``PeftModel.from_pretrained``; later ones use
    ``load_adapter``. ``activate(name)`` switches with ``set_adapter``; ``activate(None)`` disables the
    adapter layers, which gives exactly the base model's outputs. Registering never changes which
    adapter is active (the base model at first), so call ``activate`` explicitly.
    """

    def __init__(self, base_model: Any, base_source: str | None = None) -> None:
        self._base = base_model
        self._base_source = base_source
        self._peft: Any = None
        self._paths: dict[str, str] = {}
        self._active: str | None = None

    @property
    def model(self) -> Any:
        return self._peft if self._peft is not None else self._base

    @property
    def active(self) -> str | None:
        return self._active

    def list(self) -> list[str]:
        return list(self._paths)

    def path(self, name: str) -> str:
        return self._paths[name]

    def register(self, name: str, path: str | os.PathLike[str]) -> None:
        if not name or not str(name).strip():
            raise ConfigError("adapter name is empty; give it a non-empty name")
        if name in self._paths:
            raise ConfigError(f"adapter {name!r} is already registered (from {self._paths[name]}); use another name")
        try:
            directory = Path(path).expanduser()
        except RuntimeError as exc:  # "~nosuchuser": no such home directory
            raise ModelNotFoundError(
                f"adapter {name!r}: cannot resolve {path!r} ({exc}); pass an absolute path"
            ) from None
        config_file = directory / "adapter_config.json"
        if not directory.is_dir():
            raise ModelNotFoundError(
                f"adapter {name!r}: the directory {directory} does not exist; pass the directory that "
                "PeftModel.save_pretrained wrote (adapter_config.json + adapter_model.safetensors)"
            )
        if not config_file.is_file() or not any((directory / f).is_file() for f in _ADAPTER_WEIGHT_FILES):
            raise ModelNotFoundError(
                f"adapter {name!r}: {directory} holds no adapter_config.json and adapter_model.safetensors; "
                "pass the directory that PeftModel.save_pretrained wrote"
            )
        try:
            adapter_type = json.loads(config_file.read_text(encoding="utf-8")).get("peft_type")
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"adapter {name!r}: {config_file} is not valid JSON ({exc}); re-save the adapter"
            ) from exc
        if not (directory / "adapter_model.safetensors").is_file():
            raise ConfigError(
                f"adapter {name!r}: {directory} holds only adapter_model.bin (a pickle); only safetensors adapters "
                "are accepted. Save it again with save_pretrained(..., safe_serialization=True) where it was trained"
            )
        if adapter_type != "LORA":
            raise ConfigError(f"adapter {name!r}: peft_type is {adapter_type!r}, not 'LORA'; only LoRA is supported")

        if self._base_source is not None:
            check_adapter_base(directory, self._base_source, name)

        from peft import PeftModel

        was_active = self._active
        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(
                    self._base, str(directory), adapter_name=name, is_trainable=False
                )
                self._peft.eval()
            else:
                self._peft.load_adapter(str(directory), adapter_name=name, is_trainable=False)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ConfigError(
                f"adapter {name!r} from {directory} does not fit the model ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:300]}); it must be a LoRA trained on this base model"
            ) from exc
        self._paths[name] = str(directory)
        log.info("registered adapter %s from %s", name, directory)
        # Keep what was active before (the base model, for the first adapter).
        self.activate(was_active)

    def activate(self, name: str | None) -> None:
        """Make adapter ``name`` active, or the base model when ``name`` is None."""
        if name is not None and name not in self._paths:
            known = ", ".join(self._paths) or "none registered"
            raise ConfigError(f"unknown adapter {name!r} (known: {known}); register it first or pass None")
        if self._peft is None:
            self._active = None
            return
        if name is None:
            self._peft.base_model.disable_adapter_layers()
        else:
            self._peft.base_model.enable_adapter_layers()
            self._peft.set_adapter(name)
        self._peft.eval()
        self._active = name


def parse_adapters(values: list[str] | None) -> dict[str, str]:
    """``--adapter`` values, ``NAME=PATH`` or a bare ``PATH`` (named after its folder) -> {name: path}."""
    out: dict[str, str] = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep:
            name, path = Path(v).name, v
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise ConfigError(f"--adapter takes NAME=PATH or PATH, e.g. --adapter rec10=./runs/rec10, got {v!r}")
        if name in out:
            raise ConfigError(f"two adapters are named {name!r} ({out[name]} and {path}); name them: NAME=PATH")
        out[name] = path
    return out
