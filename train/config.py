"""The one configuration of ``geo-r1 train``: a frozen dataclass that checks itself, and YAML recipes.

The recipe presets live in ``train/recipes/<name>.yaml``: ``sft``, ``grpo``, ``dapo`` (GEO-R1.md's settings)
and ``cpu-smoke`` (a few tiny steps). ``geo-r1 train METHOD`` starts from the preset named after the method,
then applies ``--config RECIPE.yaml``, then the command line's options: the last one wins.

Choices where GEO-R1.md leaves room (each recorded in the adapter's manifest):

- **β (KL weight).** 0.04 for ``grpo`` and for ``dapo``. VLM-R1's scripts, which Geo-R1 trains with, set 0.04,
  and its DAPO ("more params") script keeps it; β = 0 is the DAPO paper's choice, not a published Geo-R1
  setting. Set ``beta: 0.0`` in a recipe to follow the DAPO paper (no reference pass: cheaper).
- **DAPO** = trl's ``loss_type: dapo`` (token-level normalisation) + ``epsilon_high: 0.28``. With
  ``num_iterations: 1`` the ratio is exactly 1, so the clip bounds change nothing (GEO-R1.md).
- **KL estimator.** VLM-R1's plain k3: ``use_bias_correction_kl`` is turned off (trl 1.16 defaults to on).
- **Learning rate.** VLM-R1's LoRA recipe: 1e-5, r 64, α 128, dropout 0.05. Geo-R1's own are unpublished.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geo_r1_qgis.core.errors import ConfigError
from geo_r1_qgis.core.rules.prompts import TASKS

METHODS = ("sft", "grpo", "dapo")
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
LOSS_TYPES = ("grpo", "dapo", "bnpo", "dr_grpo")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one ``geo-r1 train`` run needs. Paths are kept as given; ``__post_init__`` checks values."""

    # What
    method: str = field(
        metadata={"positional": True, "choices": METHODS,
                  "help": "sft (supervised baseline), grpo or dapo (reasoning-first RL)"},
    )  # fmt: skip
    data: Path = field(metadata={"help": "dataset directory from 'geo-r1 dataset build|synthetic'"})
    model: str = field(metadata={"help": "base model: a Hugging Face id or a local directory"})
    output_dir: Path = field(
        metadata={"flags": ("-o", "--output"), "aliases": ("--output-dir",),
                  "help": "where the adapter (safetensors) and its manifest go"},
    )  # fmt: skip
    processor: str | None = field(default=None, metadata={"help": "processor source (default: the model)"})
    task: str = field(
        default="rec",
        metadata={
            "choices": TASKS,
            "help": "rec (one box), multi (all boxes, 'None' when none) or gres (boxes and keypoints, "
            "scored as masks through --sam)",
        },
    )
    reasoning: bool | None = field(
        default=None,
        metadata={
            "action": "boolean",
            "help": "think-then-answer prompt and targets; default False for sft (the paper's SFT "
            "baseline), True for grpo/dapo",
        },
    )
    init_adapter: Path | None = field(
        default=None,
        metadata={"help": "continue training this LoRA adapter (e.g. an SFT warm start) instead of a new one"},
    )
    # LoRA
    lora_r: int = field(default=64, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=128, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    train_vision_tower: bool = field(
        default=False, metadata={"help": "also train the vision tower fully (frozen by default, as in Geo-R1)"}
    )
    # Optimisation
    learning_rate: float = field(default=1e-5, metadata={"help": "peak learning rate"})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "transformers scheduler name"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "fraction of steps for linear warm-up"})
    num_train_epochs: float = field(default=2.0, metadata={"help": "epochs over the training records"})
    max_steps: int = field(default=-1, metadata={"help": "stop after this many optimiser steps (-1: epochs decide)"})
    max_seconds: float | None = field(
        default=None, metadata={"help": "stop after this many seconds of training (a wall-clock budget)"}
    )
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "per device; for grpo/dapo counted in completions, as in trl"}
    )
    gradient_accumulation_steps: int = field(default=2, metadata={"help": "gradient accumulation"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    seed: int = field(default=42, metadata={"help": "seed of everything (data order, sampling, LoRA init)"})
    # GRPO / DAPO
    num_generations: int = field(default=8, metadata={"help": "completions per prompt (the group)"})
    beta: float = field(default=0.04, metadata={"help": "KL weight (k3 estimator); 0 disables the reference pass"})
    epsilon: float = field(default=0.2, metadata={"help": "lower clip of the ratio"})
    epsilon_high: float | None = field(default=None, metadata={"help": "upper clip (DAPO: 0.28); None: = epsilon"})
    loss_type: str = field(default="grpo", metadata={"help": "grpo (per sequence, then mean) or dapo (token-level)"})
    num_iterations: int = field(default=1, metadata={"help": "policy updates per generation batch"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (VLM-R1 hard-codes 1.0)"})
    max_completion_length: int = field(default=2048, metadata={"help": "longest completion sampled"})
    scale_rewards: str = field(
        default="group", metadata={"help": "group: (r - mean) / (std + 1e-4) per group, as VLM-R1; none: no std"}
    )
    reward_funcs: tuple[str, ...] = field(
        default=(), metadata={"help": "reward names from train/rewards.py (default: the task's format + metric)"}
    )
    sam: str | None = field(
        default=None,
        metadata={"metavar": "MODEL",
                  "help": "the frozen SAM (Hugging Face id or local directory, offline) that turns GRES answers into "
                          "masks for the gres reward; needed by --task gres"},
    )  # fmt: skip
    # Runtime
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N or mps"})
    bf16: bool | None = field(default=None, metadata={"help": "bfloat16 training (default: on CUDA only)"})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "default: on CUDA only"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch (default: all cores)"})
    logging_steps: int = field(default=1, metadata={"help": "log every N steps (console, train_log.jsonl)"})
    save_steps: int = field(default=50, metadata={"help": "checkpoint every N steps (for --resume)"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept"})
    eval_limit: int = field(default=32, metadata={"help": "val queries scored before and after (0: skip)"})
    keep_checkpoints: bool = field(
        default=False,
        metadata={"help": "keep checkpoints/ after a finished run (default: removed; they only serve --resume)"},
    )
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint in output_dir"})
    force: bool = field(default=False, metadata={"help": "overwrite a non-empty output_dir"})
    report_to: str = field(default="none", metadata={"help": "trl/transformers report_to (none, tensorboard, wandb)"})
    use_vllm: bool = field(default=False, metadata={"help": "generate with vLLM (GPU only; see README)"})
    vllm_mode: str = field(default="colocate", metadata={"help": "colocate or server"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", Path(self.data))
        object.__setattr__(self, "output_dir", Path(self.output_dir))
        if self.init_adapter is not None:
            object.__setattr__(self, "init_adapter", Path(self.init_adapter))
        object.__setattr__(self, "reward_funcs", tuple(self.reward_funcs))
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {self.task!r}: 'rec' (one box) or 'multi' (all boxes)"
                              + (" or 'gres' (masks)" if "gres" in TASKS else ""))  # fmt: skip
        if not str(self.model).strip():
            raise ConfigError("model is empty: pass --model with a Hugging Face id or a local directory")
        positive = ("lora_r", "lora_alpha", "per_device_train_batch_size", "gradient_accumulation_steps",
                    "num_generations", "num_iterations", "max_completion_length", "logging_steps", "save_steps",
                    "save_total_limit")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"max_steps must be -1 (use epochs) or >= 1, got {self.max_steps}")
        if self.max_steps == -1 and not self.num_train_epochs > 0:
            raise ConfigError(f"num_train_epochs must be > 0, got {self.num_train_epochs}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ConfigError(f"max_seconds must be > 0, got {self.max_seconds}")
        if self.beta < 0:
            raise ConfigError(f"beta must be >= 0, got {self.beta}")
        if not 0 < self.epsilon < 1 or (self.epsilon_high is not None and not 0 < self.epsilon_high < 10):
            raise ConfigError(f"epsilon must be in (0, 1) and epsilon_high in (0, 10), got {self.epsilon}, "
                              f"{self.epsilon_high}")  # fmt: skip
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ConfigError(f"scale_rewards must be group, batch or none, got {self.scale_rewards!r}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0 (GRPO samples), got {self.temperature}")
        if self.method != "sft" and self.num_generations < 2:
            raise ConfigError("num_generations must be >= 2: GRPO's advantage compares completions of one prompt")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.eval_limit < 0:
            raise ConfigError(f"eval_limit must be >= 0, got {self.eval_limit}")
        if self.vllm_mode not in ("colocate", "server"):
            raise ConfigError(f"vllm_mode must be colocate or server, got {self.vllm_mode!r}")
        from train.rewards import MASK_REWARDS, REWARDS

        for name in self.reward_funcs:
            if name not in REWARDS and name not in MASK_REWARDS:
                raise ConfigError(f"unknown reward {name!r}; known: {', '.join([*REWARDS, *MASK_REWARDS])}")
        if self.method != "sft" and self.sam is None and any(n in MASK_REWARDS for n in self.rewards):
            raise ConfigError(
                f"the {self.task} rewards {', '.join(n for n in self.rewards if n in MASK_REWARDS)} turn answers into "
                "masks with a frozen SAM: pass --sam MODEL (a SAM 2 directory or Hugging Face id)"
            )

    @property
    def uses_reasoning(self) -> bool:
        return self.reasoning if self.reasoning is not None else self.method != "sft"

    @property
    def rewards(self) -> tuple[str, ...]:
        from train.rewards import TASK_REWARDS

        return self.reward_funcs or TASK_REWARDS[self.task]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for k, v in out.items():
            if isinstance(v, Path):
                out[k] = str(v)
            elif isinstance(v, tuple):
                out[k] = list(v)
        return out


FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(TrainConfig))


def load_recipe(path: Path) -> dict[str, Any]:
    """A YAML recipe as a dict of TrainConfig fields; unknown keys are an error that names them."""
    import yaml

    path = Path(path)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
        raise ConfigError(f"recipe {path} does not exist (built-in recipes: {known})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of option: value")
    unknown = sorted(set(data) - FIELD_NAMES)
    if unknown:
        raise ConfigError(f"recipe {path}: unknown options {unknown}; see 'geo-r1 train grpo --help'")
    return data


def recipe_path(name_or_path: str | Path) -> Path:
    """A built-in recipe name (``grpo``) or a path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    return RECIPES_DIR / f"{name_or_path}.yaml"


def build_config(method: str, overrides: dict[str, Any], recipe: str | Path | None = None) -> TrainConfig:
    """The method's preset, then ``recipe``, then ``overrides`` (None values are ignored)."""
    values: dict[str, Any] = {}
    preset = RECIPES_DIR / f"{method}.yaml"
    if preset.is_file():
        values.update(load_recipe(preset))
    if recipe is not None:
        values.update(load_recipe(recipe_path(recipe)))
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["method"] = method
    missing = [k for k in ("data", "model", "output_dir") if k not in values]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}: pass --data DIR --model M -o ADAPTER_DIR")
    try:
        return TrainConfig(**values)
    except TypeError as exc:
        raise ConfigError(f"bad training options: {exc}") from exc
