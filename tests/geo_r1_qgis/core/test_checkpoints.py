"""Tests of geo_r1_qgis/core/checkpoints.py (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from geo_r1_qgis.core.checkpoints import BASE_MODEL, KNOWN_MODELS, known_model, processor_for

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("model", ["Geo-R1/Geo-R1-3B-GRPO-REC-10shot", " Geo-R1/Geo-R1-3B-GRPO-GRES-10shot "])
def test_released_checkpoints_take_the_base_models_processor(model):
    assert processor_for(model) == "Qwen/Qwen2.5-VL-3B-Instruct" == BASE_MODEL
    assert known_model(model) is not None


def test_other_models_keep_what_the_user_typed():
    assert processor_for("/data/my-model", current="/data/proc") == "/data/proc"
    assert processor_for("Geo-R1/geo-r1-3b-grpo-rec-10shot", current="") == ""  # ids are case-sensitive
    assert processor_for(BASE_MODEL, current="x") == ""  # the base model carries its own processor


def test_every_listed_id_is_named_in_the_readme():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    shared = REPO.parent / "shared" / "GEO-R1.md"
    names = readme + (shared.read_text(encoding="utf-8") if shared.is_file() else "")
    for m in KNOWN_MODELS:
        assert m.model_id in names, f"{m.model_id} is not a released name"
    assert len({m.model_id for m in KNOWN_MODELS}) == len(KNOWN_MODELS)
