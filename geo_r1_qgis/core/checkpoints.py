"""The released Geo-R1 checkpoints the plugin offers by name, each with the processor it must be loaded with.

Pure (no QGIS): the engine widget fills the processor field from here when a known id is chosen, and the
panel sets its mode to the checkpoint's default (REC: the one best match; GRES and OVD: all matching
objects). Only names the Geo-R1 release publishes are listed (the Hugging Face organisation ``Geo-R1``:
REC at 1, 5 and 10 shots, GRES at 1, 5 and 10, OVD at 5 and 10, and a 7B REC at 10, whose processor comes
from the 7B base); any other Hugging Face id or a local directory can still be typed in.
"""

from __future__ import annotations

from dataclasses import dataclass

#: the base model the released 3B Geo-R1 checkpoints were fine-tuned from; their processor comes from it
BASE_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
#: the base of the 7B checkpoint, and its processor
BASE_MODEL_7B = "Qwen/Qwen2.5-VL-7B-Instruct"
#: what a checkpoint was trained for: one object per expression, zero or more, all of a category
TASKS = ("rec", "gres", "ovd")
#: the panel's run mode for each task (``core.merge.MODES``): REC answers one box, GRES and OVD every object
DEFAULT_MODES = {"rec": "one", "gres": "all", "ovd": "all"}
_TASK_WORDS = {
    "rec": "one object per expression (REC)",
    "gres": "zero or more objects (GRES)",
    "ovd": "every object of a category (OVD)",
}


@dataclass(frozen=True)
class KnownModel:
    model_id: str
    #: the processor to pass with ``--processor`` ("" when the model directory carries its own)
    processor: str
    description: str
    #: rec, gres or ovd ("" for the base model, which does any)
    task: str = ""

    def __post_init__(self) -> None:
        if self.task not in ("", *TASKS):
            raise ValueError(f"task must be one of {TASKS} or empty, got {self.task!r}")

    @property
    def default_mode(self) -> str | None:
        """The run mode the panel picks for this checkpoint ("one" or "all"); None: the user's choice."""
        return DEFAULT_MODES.get(self.task)


def _release(size: str, task: str, shots: int) -> KnownModel:
    processor = BASE_MODEL_7B if size == "7B" else BASE_MODEL
    return KnownModel(f"Geo-R1/Geo-R1-{size}-GRPO-{task.upper()}-{shots}shot", processor,
                      f"Geo-R1 {size}, GRPO, {shots}-shot, {_TASK_WORDS[task]}", task)  # fmt: skip


KNOWN_MODELS: tuple[KnownModel, ...] = (
    *(_release("3B", "rec", n) for n in (10, 5, 1)),
    _release("7B", "rec", 10),
    *(_release("3B", "gres", n) for n in (10, 5, 1)),
    *(_release("3B", "ovd", n) for n in (10, 5)),
    KnownModel(BASE_MODEL, "", "the base model, zero-shot (and the base of your own LoRA adapters)"),
)


def known_model(model_id: str) -> KnownModel | None:
    """The entry for ``model_id`` (exact id, surrounding spaces ignored), or None."""
    wanted = model_id.strip()
    return next((m for m in KNOWN_MODELS if m.model_id == wanted), None)


def processor_for(model_id: str, current: str = "") -> str:
    """The processor field after choosing ``model_id``: a known checkpoint's processor, else ``current``."""
    known = known_model(model_id)
    return known.processor if known is not None else current


def default_mode_for(model_id: str, current: str) -> str:
    """The run mode after choosing ``model_id``: a known checkpoint's default (OVD and GRES: "all", REC:
    "one"), else ``current`` (the base model and unknown models keep what the user chose)."""
    known = known_model(model_id)
    mode = known.default_mode if known is not None else None
    return mode or current
