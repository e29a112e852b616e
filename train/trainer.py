"""``geo-r1 train sft|grpo|dapo``: LoRA fine-tuning of a Qwen2.5-VL on a dataset directory, with trl.

Reads top to bottom: :func:`run` takes one :class:`~train.config.TrainConfig`, loads the records, the model
and the processor (the engine's own loading code), builds trl's trainer, trains, saves the adapter
(safetensors only) with its ``geo_r1_adapter.json`` manifest, and plots the curves.

- **SFT** (trl ``SFTTrainer``): prompt/completion pairs, so the loss covers the answer only. The prompt is the
  paper's SFT-baseline prompt (no reasoning) unless ``reasoning`` is set (a think-then-answer warm start).
- **GRPO / DAPO** (trl ``GRPOTrainer``): the reasoning prompt, the task's rewards from ``train/rewards.py``,
  the ground truth passed to the rewards through the dataset's ``solution`` and ``image_size`` columns.
- **LoRA** (peft) on every linear layer of the language model; the vision tower and ``lm_head`` are frozen.
- **Logs**: a progress bar on the console, and every logged step as one line of ``train_log.jsonl``
  (step, reward, format, iou, kl, lr, loss, seconds, and everything else trl logs).

Runs under ``accelerate launch`` as they are (``accelerate launch -m engine.cli train grpo …``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from geo_r1_qgis.core.errors import ConfigError, OutputError
from geo_r1_qgis.core.rules.prompts import PROMPT_VERSION, PromptSpec
from train.config import TrainConfig
from train.data_format import MANIFEST, SPLITS, TASKS, ChipRecord, jsonl_name, read_manifest, read_records, target_text

log = logging.getLogger(__name__)

TRAIN_LOG = "train_log.jsonl"
CURVES_PNG = "curves.png"
CHECKPOINTS = "checkpoints"
#: LoRA targets: every linear layer of the language model; never the vision tower (``model.visual``). VLM-R1's
#: LoRA also wraps ``lm_head``; trl 1.16 refuses that (it computes log-probabilities from ``lm_head.weight``
#: directly, so such an adapter would never be trained), so ``lm_head`` stays frozen here.
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
#: Short names for the JSONL log, beside trl's own keys.
LOG_ALIASES = {
    "rewards/format_reward/mean": "format",
    "rewards/iou_reward/mean": "iou",
    "rewards/ovd_format_reward/mean": "format",
    "rewards/od_length_reward/mean": "od",
    "rewards/od_sqrt_reward/mean": "od",
    "rewards/gres_mask_reward/mean": "iou",
    "learning_rate": "lr",
}


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def dataset_hash(data_dir: Path) -> str:
    """sha256 over the manifest and every record file of a dataset directory (what the adapter was trained on)."""
    digest = hashlib.sha256()
    for name in [MANIFEST] + [jsonl_name(s, t) for s in SPLITS for t in TASKS]:
        path = Path(data_dir) / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _rows(config: TrainConfig, records: list[ChipRecord]) -> list[dict[str, Any]]:
    from PIL import Image

    rows = []
    for r in records:
        path = config.data / r.image
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except OSError as exc:
            raise ConfigError(f"chip {path} of record {r.id} cannot be read ({exc}); rebuild the dataset") from exc
        row: dict[str, Any] = {
            "prompt": PromptSpec(r.expression, r.task, config.uses_reasoning).messages(),
            "image": image,
            "solution": [list(b) for b in r.boxes],
            "image_size": list(r.image_size),
        }
        if r.task == "gres":  # the true outlines for the mask reward, as JSON text (ragged nesting, one Arrow type)
            row["outlines"] = json.dumps(ChipRecord.to_json(r)["outlines"])
        if config.method == "sft":
            text = target_text(r, config.uses_reasoning)
            row["completion"] = [{"role": "assistant", "content": [{"type": "text", "text": text}]}]
        rows.append(row)
    return rows


def load_train_dataset(config: TrainConfig) -> Any:
    """The train split as a ``datasets.Dataset`` with trl's columns (``prompt``, ``image``, [``completion``])."""
    from datasets import Dataset

    records = read_records(config.data, "train", config.task)
    if not records:
        raise ConfigError(
            f"{config.data} has no {config.task} training records ({jsonl_name('train', config.task)} is empty); "
            "draw or import more boxes, or pick the other --task"
        )
    return Dataset.from_list(_rows(config, records))


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def lora_config(config: TrainConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=LORA_TARGETS,
        modules_to_save=["visual"] if config.train_vision_tower else None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _load(config: TrainConfig, padding_side: str) -> tuple[Any, Any, str]:
    from engine.runtime.loading import LoadConfig, load_model

    loaded = load_model(LoadConfig(model=config.model, processor=config.processor, device=config.device))
    processor = loaded.processor
    processor.tokenizer.padding_side = padding_side
    model = loaded.model
    if config.init_adapter is not None:
        from peft import PeftModel

        from engine.runtime.loading import check_adapter_base

        if not (config.init_adapter / "adapter_config.json").is_file():
            raise ConfigError(
                f"--init-adapter {config.init_adapter} holds no adapter_config.json; pass an adapter directory"
            )
        check_adapter_base(config.init_adapter, config.model, "init")
        model = PeftModel.from_pretrained(model, str(config.init_adapter), is_trainable=True)
    return model, processor, loaded.device


# --------------------------------------------------------------------------------------------------
# trl arguments
# --------------------------------------------------------------------------------------------------


def _common_args(config: TrainConfig, device: str, out: Path) -> dict[str, Any]:
    on_cuda = device.startswith("cuda")
    return {
        "output_dir": str(out / CHECKPOINTS),
        "per_device_train_batch_size": config.per_device_train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "learning_rate": config.learning_rate,
        "lr_scheduler_type": config.lr_scheduler_type,
        "warmup_steps": config.warmup_ratio,  # transformers 5: a float < 1 is a ratio
        "num_train_epochs": config.num_train_epochs,
        "max_steps": config.max_steps,
        "max_grad_norm": config.max_grad_norm,
        "weight_decay": config.weight_decay,
        "seed": config.seed,
        "data_seed": config.seed,
        "logging_steps": config.logging_steps,
        "save_steps": config.save_steps,
        "save_total_limit": config.save_total_limit,
        "report_to": config.report_to,
        # trl defaults both to on, even on a CPU, where they only cost time (TRAINING-NOTES.md)
        "bf16": config.bf16 if config.bf16 is not None else on_cuda,
        "activation_checkpointing": (
            config.gradient_checkpointing if config.gradient_checkpointing is not None else on_cuda
        ),
        "use_cpu": device == "cpu",
        "remove_unused_columns": False,
        "dataloader_num_workers": 0,
        "disable_tqdm": False,
    }


def _sft_trainer(config: TrainConfig, model: Any, processor: Any, dataset: Any, device: str, out: Path,
                 callbacks: list[Any]) -> Any:  # fmt: skip
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**_common_args(config, device, out), max_length=None, completion_only_loss=True)
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=None if config.init_adapter else lora_config(config),
        callbacks=callbacks,
    )


def reward_functions(config: TrainConfig, device: str) -> list[Any]:
    """The run's reward functions by name (``train/rewards.py``); the mask rewards get the frozen SAM
    (``engine.runtime.sam.SamMasker``, loaded once, on the training device)."""
    from train.rewards import MASK_REWARDS, REWARDS

    masker = None
    funcs = []
    for name in config.rewards:
        if name in MASK_REWARDS:
            if masker is None:
                from engine.runtime.sam import SamMasker

                masker = SamMasker.load(config.sam, device)
            funcs.append(MASK_REWARDS[name](masker))
        else:
            funcs.append(REWARDS[name])
    return funcs


def _grpo_trainer(config: TrainConfig, model: Any, processor: Any, dataset: Any, device: str, out: Path,
                  callbacks: list[Any]) -> Any:  # fmt: skip
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        **_common_args(config, device, out),
        num_generations=config.num_generations,
        beta=config.beta,
        epsilon=config.epsilon,
        epsilon_high=config.epsilon_high if config.epsilon_high is not None else config.epsilon,
        loss_type=config.loss_type,
        num_iterations=config.num_iterations,
        temperature=config.temperature,
        max_completion_length=config.max_completion_length,
        scale_rewards=config.scale_rewards,
        use_bias_correction_kl=False,  # VLM-R1's plain k3 gradient
        use_vllm=config.use_vllm,
        vllm_mode=config.vllm_mode,
        log_completions=False,
    )
    return GRPOTrainer(
        model=model,
        reward_funcs=reward_functions(config, device),
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=None if config.init_adapter else lora_config(config),
        callbacks=callbacks,
    )


# --------------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------------


def _jsonl_callback(path: Path) -> Any:
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        """Every logged step as one JSON line: trl's keys, short aliases, and seconds since the start."""

        def __init__(self) -> None:
            self.t0 = time.monotonic()
            self.offset = 0.0
            if path.is_file():  # a resumed run goes on counting
                lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
                if lines:
                    self.offset = float(json.loads(lines[-1]).get("seconds", 0.0))

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
            if not state.is_world_process_zero or not logs:
                return
            row: dict[str, Any] = {"step": state.global_step, "epoch": state.epoch,
                                   "seconds": round(self.offset + time.monotonic() - self.t0, 3)}  # fmt: skip
            for key, value in logs.items():
                if isinstance(value, (int, float)):
                    row[key] = value
                    if key in LOG_ALIASES:
                        row[LOG_ALIASES[key]] = value
            with path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

    return JsonlLog()


def _budget_callback(seconds: float) -> Any:
    from transformers import TrainerCallback

    class Budget(TrainerCallback):
        """Stop at the first step end past a wall-clock budget (the model is then saved as usual)."""

        t0 = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            self.t0 = time.monotonic()

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if time.monotonic() - self.t0 > seconds:
                control.should_training_stop = True

    return Budget()


# --------------------------------------------------------------------------------------------------
# Before/after check on the val split
# --------------------------------------------------------------------------------------------------


def quick_scores(model: Any, processor: Any, config: TrainConfig, masker: Any = None) -> dict[str, Any] | None:
    """Greedy Acc@0.5 and mean IoU of up to ``eval_limit`` val rec queries, with the run's prompt; for gres (with
    the run's frozen SAM ``masker``), gIoU and cIoU of up to ``eval_limit`` val gres queries.

    Scored Geo-R1's way (``train.metrics``); the full evaluation is ``geo-r1 eval``.
    """
    if config.eval_limit == 0 or config.task not in ("rec", "gres") or (config.task == "gres" and masker is None):
        return None
    if config.task == "gres":
        return _quick_gres_scores(model, processor, config, masker)
    records = read_records(config.data, "val", "rec")[: config.eval_limit]
    if not records:
        return None
    from train.evaluate import score_rec_run
    from train.generation import generate_texts

    texts = generate_texts(model, processor, config.data, records, reasoning=config.uses_reasoning,
                           max_new_tokens=min(256, config.max_completion_length))  # fmt: skip
    _, scores, _ = score_rec_run(records, texts, "geo-r1" if config.uses_reasoning else "sft")
    return {
        "queries": scores["counts"]["overall"],
        "acc50": scores["acc@0.5"]["overall"] / 100,
        "mean_iou": scores["mean_iou"],
        "format": None if scores["format_ok"] is None else scores["format_ok"] / 100,
    }  # fmt: skip (None: sft)


def _quick_gres_scores(model: Any, processor: Any, config: TrainConfig, masker: Any) -> dict[str, Any] | None:
    records = read_records(config.data, "val", "gres")[: config.eval_limit]
    if not records:
        return None
    from train.evaluate import score_gres_run
    from train.generation import generate_texts

    texts = generate_texts(model, processor, config.data, records, reasoning=True,
                           max_new_tokens=min(1024, config.max_completion_length))  # fmt: skip
    _, scores, _ = score_gres_run(records, texts, "geo-r1", masker, config.data)
    return {"queries": scores["counts"]["queries"], "giou": scores["gIoU"] / 100, "ciou": scores["cIoU"] / 100,
            "format": None if scores["format_ok"] is None else scores["format_ok"] / 100}  # fmt: skip


def _run_masker(trainer: Any) -> Any:
    """The frozen SAM of the run's mask reward (None without one: SFT, or a task without masks)."""
    from train.rewards import GresMaskReward

    return next((f.masker for f in getattr(trainer, "reward_funcs", []) if isinstance(f, GresMaskReward)), None)


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("geo-r1", "torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def _prepare_output(config: TrainConfig) -> Path:
    out = config.output_dir
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a directory; choose another -o")
    if config.resume:
        if not any((out / CHECKPOINTS).glob("checkpoint-*")):
            raise ConfigError(f"--resume: there is no checkpoint in {out / CHECKPOINTS}; run without --resume")
        return out
    if out.is_dir() and any(out.iterdir()):
        if not config.force:
            raise OutputError(f"{out} is not empty; pass --force to overwrite it, --resume to continue, or another -o")
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"cannot write the adapter to {out} ({exc.strerror or exc}); choose a writable -o") from exc
    return out


def job_callback(cancel_file: Path, progress_file: Path) -> Any:
    """What a training job of the engine (:mod:`engine.jobs.runner`) hands to :func:`run`: the trainer stops at the
    end of the step in which ``cancel_file`` appears, saving a checkpoint there first (so the job can resume), and
    after every step ``progress_file`` says ``{"step", "first_step", "max_steps", "seconds"}`` (written atomically;
    ``seconds`` since this run's training began, ``first_step`` the step it began at, >0 after a resume)."""
    import os

    from transformers import TrainerCallback

    class JobControl(TrainerCallback):
        t0 = 0.0
        first_step = 0

        def _progress(self, state: Any) -> None:
            tmp = progress_file.with_name(progress_file.name + ".tmp")
            tmp.write_text(json.dumps({"step": state.global_step, "first_step": self.first_step,
                                       "max_steps": state.max_steps,
                                       "seconds": round(time.monotonic() - self.t0, 3)}), encoding="utf-8")  # fmt: skip
            os.replace(tmp, progress_file)

        def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            self.t0 = time.monotonic()
            self.first_step = state.global_step
            if state.is_world_process_zero:
                self._progress(state)

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if state.is_world_process_zero:
                self._progress(state)
            if cancel_file.exists():
                log.warning("cancelled (%s appeared): stopping after step %d", cancel_file.name, state.global_step)
                control.should_training_stop = True
                control.should_save = True  # a checkpoint at this step, for a resume

    return JobControl()


def run(config: TrainConfig, callbacks: Sequence[Any] = ()) -> Path:
    """Train as ``config`` says; return the adapter directory. ``callbacks``: more transformers
    ``TrainerCallback``s (an engine job's :func:`job_callback`)."""
    import torch
    from transformers import set_seed

    data_manifest = read_manifest(config.data)
    if config.threads:
        torch.set_num_threads(config.threads)
    set_seed(config.seed)
    out = _prepare_output(config)
    dataset = load_train_dataset(config)
    padding_side = "right" if config.method == "sft" else "left"
    model, processor, device = _load(config, padding_side)
    log.info("%s on %s: %d training records, task %s, reasoning %s", config.method, device, len(dataset),
             config.task, config.uses_reasoning)  # fmt: skip

    all_callbacks = [_jsonl_callback(out / TRAIN_LOG), *callbacks]
    if config.max_seconds:
        all_callbacks.append(_budget_callback(config.max_seconds))
    build = _sft_trainer if config.method == "sft" else _grpo_trainer
    trainer = build(config, model, processor, dataset, device, out, all_callbacks)
    distributed = trainer.accelerator.num_processes > 1
    main_process = trainer.accelerator.is_main_process

    before = None
    if not distributed and not config.resume:
        processor.tokenizer.padding_side = "left"
        before = quick_scores(trainer.model, processor, config, _run_masker(trainer))
        processor.tokenizer.padding_side = padding_side
    t0 = time.monotonic()
    result = trainer.train(resume_from_checkpoint=True if config.resume else None)
    seconds = time.monotonic() - t0
    after = None
    if not distributed:
        processor.tokenizer.padding_side = "left"
        after = quick_scores(trainer.model, processor, config, _run_masker(trainer))

    if main_process:
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        unwrapped.save_pretrained(str(out), safe_serialization=True)
        _write_manifest(config, out, data_manifest, before, after, trainer.state.global_step, seconds, result,
                        trainer.accelerator.num_processes)  # fmt: skip
        if (out / TRAIN_LOG).is_file():
            from train.eval_plots import learning_curves  # the report's plot, for this one run

            learning_curves({config.method: out / TRAIN_LOG}, out / CURVES_PNG)
        if not config.keep_checkpoints:  # they only serve --resume of an interrupted run
            shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        log.info("adapter written to %s", out)
    trainer.accelerator.wait_for_everyone()
    return out


def _write_manifest(config: TrainConfig, out: Path, data_manifest: dict[str, Any], before: Any, after: Any,
                    steps: int, seconds: float, result: Any, world_size: int) -> None:  # fmt: skip
    from engine.runtime.loading import model_fingerprint

    train_records = len(read_records(config.data, "train", config.task))
    manifest = {
        "format": "geo-r1-adapter/1",
        "method": config.method,
        "task": config.task,
        "reasoning": config.uses_reasoning,
        "prompt_version": PROMPT_VERSION,
        "base_model": config.model,
        "base_model_hash": model_fingerprint(config.model),
        "base_model_hash_kind": "sha256 over each weight file's name, size and first 16 MiB (engine.runtime.loading)",
        "processor": config.processor or config.model,
        "init_adapter": str(config.init_adapter) if config.init_adapter else None,
        "chip_size": data_manifest.get("chip", data_manifest.get("chip_size")),
        "gsd": data_manifest.get("gsd_m", data_manifest.get("gsd")),
        "crs": data_manifest.get("crs"),
        "frame": "model",
        "frame_note": "boxes in pixels of the image as the model saw it; chips are multiples of 28, so this is "
        "also the chip's own frame (GEO-R1.md, Coordinates)",
        "data": {
            "dir": str(config.data),
            "dataset_sha256": dataset_hash(config.data),
            "annotations_sha256": data_manifest.get("annotations_sha256"),
            "train_records": train_records,
            "counts": data_manifest.get("counts"),
        },
        "recipe": config.to_dict(),
        "lora_targets": LORA_TARGETS,
        "metrics": {"before": before, "after": after, "split": "val", "limit": config.eval_limit},
        "steps": steps,
        "world_size": world_size,
        "train_seconds": round(seconds, 1),
        "train_loss": getattr(result, "training_loss", None),
        "versions": _library_versions(),
    }
    (out / "geo_r1_adapter.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
