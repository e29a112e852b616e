"""The released Geo-R1 checkpoints the plugin offers by name, each with the processor it must be loaded with.

Pure (no QGIS): the engine widget fills the processor field from here when a known id is chosen. Only names
the Geo-R1 release itself publishes are listed (see README and the paper's model card); any other Hugging
Face id or a local directory can still be typed in.
"""

from __future__ import annotations

from dataclasses import dataclass

#: the base model every released Geo-R1 checkpoint was fine-tuned from; their processor comes from it
BASE_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"


@dataclass(frozen=True)
class KnownModel:
    model_id: str
    #: the processor to pass with ``--processor`` ("" when the model directory carries its own)
    processor: str
    description: str


KNOWN_MODELS: tuple[KnownModel, ...] = (
    KnownModel("Geo-R1/Geo-R1-3B-GRPO-REC-10shot", BASE_MODEL, "Geo-R1 3B, GRPO, one object per expression (REC)"),
    KnownModel("Geo-R1/Geo-R1-3B-GRPO-GRES-10shot", BASE_MODEL, "Geo-R1 3B, GRPO, zero or more objects (GRES)"),
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
