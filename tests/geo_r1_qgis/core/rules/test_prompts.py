"""Byte-exact checks of engine/prompts.py against literals copied from GEO-R1.md and Geo-R1/VLM-R1 sources."""

from __future__ import annotations

import pytest

from geo_r1_qgis.core.errors import ConfigError
from geo_r1_qgis.core.rules import prompts
from geo_r1_qgis.core.rules.prompts import PromptSpec, build_messages, build_prompt

# ---- expected prompts, written out by hand (do NOT build these from the module's constants) ----------

REC_REASONING = (
    "Please provide the bounding box coordinate of the region this sentence describes: "
    "the large white storage tank near the road First output the thinking process in <think> </think> "
    "tags and then output the final answer in <answer> </answer> tags. Output the final answer in JSON format."
)

REC_SFT = (
    "Please provide the bounding box coordinate of the region this sentence describes: "
    "the large white storage tank near the road Output the detected target's bbox coordinates in JSON "
    'format. The format of the bbox coordinates is:\n```json\n[\n\t{"bbox_2d": [x1, y1, x2, y2]}\n]\n```\n'
    "If there are no such targets in the image, simply respond with None."
)

OVD_PLAIN = """Please carefully check the image and detect the following objects: storage tank. Output each detected target's bbox coordinates in JSON format. The format of the bbox coordinates is:
```json
[
    {"bbox_2d": [x1, y1, x2, y2], "label": "target name"},
    {"bbox_2d": [x1, y1, x2, y2], "label": "target name"}
]
```
If there are no such targets in the image, simply respond with None."""  # noqa: E501

OVD_REASONING = (
    "First thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>\n" + OVD_PLAIN
)

GRES_FILLED = (
    "First thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>\n"
    "Please carefully check the image and answer: Q. Based on your answer, detect all relevant objects in "
    "the image.Output each detected target's bbox coordinates in JSON format. The format of the bbox "
    'coordinates is:\n```json\n[\n    {"bbox_2d": [x1, y1, x2, y2], "keypoint1": [x3, y3], '
    '"keypoint2": [x4, y4]},\n    {"bbox_2d": [x1, y1, x2, y2], "keypoint1": [x3, y3], '
    '"keypoint2": [x4, y4]}\n]\n```\nIf there are no such targets in the image, simply respond with None.'
)


@pytest.mark.parametrize(
    ("expression", "task", "reasoning", "expected"),
    [
        ("the large white storage tank near the road", "rec", True, REC_REASONING),
        ("the large white storage tank near the road", "rec", False, REC_SFT),
        ("storage tank", "multi", False, OVD_PLAIN),
        ("storage tank", "multi", True, OVD_REASONING),
        ("  storage tank \n", "multi", False, OVD_PLAIN),  # stripped
        ("\tthe large white storage tank near the road  ", "rec", True, REC_REASONING),
    ],
)
def test_build_prompt_is_byte_exact(expression: str, task: str, reasoning: bool, expected: str) -> None:
    assert build_prompt(expression, task, reasoning) == expected


def test_default_is_rec_with_reasoning() -> None:
    assert build_prompt("the large white storage tank near the road") == REC_REASONING


def test_geo_r1_md_rec_example_question() -> None:
    # GEO-R1.md: "{Question} First output the thinking process ... in JSON format."
    assert prompts.REC_TEMPLATE.format(Question="{Q}") == (
        "{Q} First output the thinking process in <think> </think> tags and then output the final answer "
        "in <answer> </answer> tags. Output the final answer in JSON format."
    )
    assert prompts.REC_QUESTION_PREFIX == (
        "Please provide the bounding box coordinate of the region this sentence describes: "
    )


def test_exported_constants_are_exact() -> None:
    assert prompts.REASONING_INSTRUCTION + prompts.REASONING_SEPARATOR == (
        "First thinks about the reasoning process in the mind and then provides the user with the answer. "
        "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
        "respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>\n"
    )
    assert prompts.SFT_SUFFIX == (
        " Output the detected target's bbox coordinates in JSON format. The format of the bbox coordinates "
        'is:\n```json\n[\n\t{"bbox_2d": [x1, y1, x2, y2]}\n]\n```\n'
        "If there are no such targets in the image, simply respond with None."
    )
    assert prompts.SFT_REC_TEMPLATE.format(Question="Q") == "Q" + prompts.SFT_SUFFIX
    assert prompts.OVD_TEMPLATE.format(category="storage tank") == OVD_PLAIN
    assert prompts.OVD_REASONING_TEMPLATE.format(Question="P") == OVD_REASONING.replace(OVD_PLAIN, "P")
    assert prompts.GRES_TEMPLATE.format(Question="Q") == GRES_FILLED


def test_prompt_version_is_a_nonempty_id() -> None:
    assert prompts.PROMPT_VERSION == "geo-r1-vlmr1-2025.09"


@pytest.mark.parametrize(
    ("expression", "needle"),
    [
        ("tank {0} {Question} {category}", "describes: tank {0} {Question} {category} First"),
        ('the "big" tank', 'describes: the "big" tank First'),
        ("réservoir 储罐 🛢", "describes: réservoir 储罐 🛢 First"),
        ("line one\nline two", "describes: line one\nline two First"),
    ],
)
def test_expression_is_inserted_verbatim(expression: str, needle: str) -> None:
    assert needle in build_prompt(expression, "rec", True)


def test_braces_in_multi_expression_are_not_reformatted() -> None:
    text = build_prompt("tank {category}", "multi", True)
    assert "detect the following objects: tank {category}. Output" in text
    assert text.count('{"bbox_2d"') == 2


@pytest.mark.parametrize("expression", ["", " ", "\n\t  ", "\u3000"])
def test_empty_expression_is_a_config_error_naming_the_fix(expression: str) -> None:
    with pytest.raises(ConfigError, match=r"expression is empty.*describe what to find"):
        build_prompt(expression, "rec")


@pytest.mark.parametrize("expression", [None, 42, b"tank", ["tank"]])
def test_non_text_expression_is_a_config_error(expression: object) -> None:
    with pytest.raises(ConfigError, match="must be text"):
        build_prompt(expression, "rec")  # type: ignore[arg-type]


def test_too_long_expression_is_a_config_error() -> None:
    build_prompt("a" * prompts.MAX_EXPRESSION_CHARS, "rec")
    with pytest.raises(ConfigError, match="shorten it"):
        build_prompt("a" * (prompts.MAX_EXPRESSION_CHARS + 1), "rec")


@pytest.mark.parametrize("task", ["REC", "ovd", "GRES", "", None, "multi "])
def test_unknown_task_is_a_config_error(task: object) -> None:
    with pytest.raises(ConfigError, match=r"task must be one of \('rec', 'multi', 'gres'\)"):
        build_prompt("tank", task)  # type: ignore[arg-type]


def test_gres_task_is_geo_r1s_gres_prompt() -> None:
    assert build_prompt("Q", "gres") == GRES_FILLED
    want = GRES_FILLED.replace("answer: Q.", "answer: the tanks next to the road.")
    assert build_prompt("  the tanks next to the road ", "gres") == want
    with pytest.raises(ConfigError, match="only Geo-R1's reasoning prompt"):
        build_prompt("tank", "gres", reasoning=False)


@pytest.mark.parametrize("reasoning", [1, 0, "yes", None])
def test_reasoning_must_be_bool(reasoning: object) -> None:
    with pytest.raises(ConfigError, match="reasoning must be True or False"):
        build_prompt("tank", "rec", reasoning)  # type: ignore[arg-type]


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        build_prompt("", "rec")


@pytest.mark.parametrize(("task", "reasoning"), [("rec", True), ("rec", False), ("multi", True), ("multi", False)])
def test_build_messages_layout(task: str, reasoning: bool) -> None:
    messages = build_messages("storage tank", task, reasoning)
    assert messages == [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": build_prompt("storage tank", task, reasoning)},
            ],
        }
    ]
    assert all(m["role"] != "system" for m in messages)


def test_build_messages_validates() -> None:
    with pytest.raises(ConfigError):
        build_messages("   ", "multi", True)


def test_prompt_spec_is_frozen_and_normalised() -> None:
    spec = PromptSpec("  tank  ", "multi", False)
    assert spec.expression == "tank"
    assert spec.text == build_prompt("tank", "multi", False)
    with pytest.raises(AttributeError):
        spec.task = "rec"  # type: ignore[misc]
    assert PromptSpec("tank ", "rec") == PromptSpec(" tank", "rec")


def test_prompts_module_is_pure() -> None:
    import ast
    import pathlib

    tree = ast.parse(pathlib.Path(prompts.__file__).read_text(encoding="utf-8"))
    imported = {
        (n.module or "").split(".")[0] if isinstance(n, ast.ImportFrom) else a.name.split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, ast.Import | ast.ImportFrom)
        for a in n.names
    }
    assert imported <= {"__future__", "dataclasses", "typing", "geo_r1_qgis"}


def test_generation_limits_per_task_are_geo_r1s():
    from geo_r1_qgis.core.rules.prompts import MAX_NEW_TOKENS, default_max_new_tokens

    assert MAX_NEW_TOKENS == {"rec": 256, "multi": 1024, "gres": 1024}
    assert default_max_new_tokens("rec") == 256
    assert default_max_new_tokens("multi") == 1024
    assert default_max_new_tokens(["rec", "multi", "rec"]) == 1024  # a mixed request gets the larger
    assert default_max_new_tokens(iter(["rec"])) == 256
