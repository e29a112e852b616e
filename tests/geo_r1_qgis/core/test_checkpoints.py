"""Tests of geo_r1_qgis/core/checkpoints.py (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from geo_r1_qgis.core.checkpoints import (
    BASE_MODEL,
    KNOWN_MODELS,
    TASKS,
    default_mode_for,
    known_model,
    processor_for,
)

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


RELEASED = {  # GEO-R1.md "Checkpoints": every released name, its task and its processor
    **{f"Geo-R1/Geo-R1-3B-GRPO-REC-{n}shot": ("rec", BASE_MODEL) for n in (1, 5, 10)},
    **{f"Geo-R1/Geo-R1-3B-GRPO-GRES-{n}shot": ("gres", BASE_MODEL) for n in (1, 5, 10)},
    **{f"Geo-R1/Geo-R1-3B-GRPO-OVD-{n}shot": ("ovd", BASE_MODEL) for n in (5, 10)},
    "Geo-R1/Geo-R1-7B-GRPO-REC-10shot": ("rec", "Qwen/Qwen2.5-VL-7B-Instruct"),
}


@pytest.mark.parametrize(("model", "expected"), list(RELEASED.items()))
def test_every_released_checkpoint_is_known_with_its_task_and_processor(model, expected):
    task, processor = expected
    known = known_model(model)
    assert known is not None, f"{model} is not listed"
    assert (known.task, known.processor) == (task, processor)
    assert processor_for(model, current="other") == processor


@pytest.mark.parametrize(
    ("model", "mode"),
    [
        ("Geo-R1/Geo-R1-3B-GRPO-OVD-5shot", "all"),  # every object of a category
        ("Geo-R1/Geo-R1-3B-GRPO-OVD-10shot", "all"),
        ("Geo-R1/Geo-R1-3B-GRPO-GRES-1shot", "all"),  # zero or more objects
        ("Geo-R1/Geo-R1-3B-GRPO-REC-5shot", "one"),  # exactly one object per expression
        ("Geo-R1/Geo-R1-7B-GRPO-REC-10shot", "one"),
    ],
)
def test_a_known_checkpoint_brings_its_default_mode(model, mode):
    assert known_model(model).default_mode == mode
    assert default_mode_for(model, current="one" if mode == "all" else "all") == mode


def test_other_models_keep_the_mode_the_user_chose():
    assert default_mode_for("/data/my-model", current="one") == "one"
    assert default_mode_for(BASE_MODEL, current="one") == "one"  # the base model answers either way
    assert known_model(BASE_MODEL).task == "" and known_model(BASE_MODEL).default_mode is None


def test_listed_tasks_and_modes_are_valid():
    from geo_r1_qgis.core.merge import MODES

    for m in KNOWN_MODELS:
        assert m.task in ("", *TASKS)
        assert m.default_mode is None or m.default_mode in MODES
