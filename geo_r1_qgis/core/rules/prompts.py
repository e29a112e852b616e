"""Geo-R1's prompts, byte-exact, in one place.

The released Geo-R1 checkpoints were trained on these exact strings, so a changed space, newline or tab
is a distribution shift. Every prompt the engine, the remote backend and the trainer send is built here.

Tasks
-----
``"rec"``
    Referring-expression comprehension: exactly one box. The expression is wrapped in VRSBench's
    question, ``Please provide the bounding box coordinate of the region this sentence describes: <expr>``.
``"multi"``
    Zero, one or many boxes, OVD style: the expression fills ``{category}`` of Geo-R1's NWPU OVD prompt
    (``test_ovd_nwpu_eval.py``), which ends "If there are no such targets in the image, simply respond
    with None."
``"gres"``
    Geo-R1's GRES task (``test_gres_eval.py``): the expression fills ``{Question}`` of :data:`GRES_TEMPLATE`,
    which asks for a box and two keypoints per target (or None); a frozen SAM turns them into masks
    (the engine's ``--sam``). Reasoning only: Geo-R1 has no SFT-baseline GRES prompt.

Variants
--------
=========  ===============================================  ==============================================
task       ``reasoning=True`` (Geo-R1 / VLM-R1 GRPO)        ``reasoning=False`` (SFT baseline)
=========  ===============================================  ==============================================
rec        :data:`REC_TEMPLATE` (VLM-R1                     :data:`SFT_REC_TEMPLATE` (Geo-R1
           ``get_question_template("rec")``, also Geo-R1    ``test_rec_baseline_eval.py``)
           ``test_rec_r1_eval.py``)
multi      :data:`OVD_REASONING_TEMPLATE` around             :data:`OVD_TEMPLATE` alone (Geo-R1
           :data:`OVD_TEMPLATE` (VLM-R1                      ``test_ovd_nwpu_eval.py``)
           ``get_question_template("odLength")``)
=========  ===============================================  ==============================================

Choices where the sources disagree or GEO-R1.md elides text (deliberate; see PROMPT_VERSION)
--------------------------------------------------------------------------------------------
1. SFT baseline (REC, no reasoning). GEO-R1.md elides the format block with "…". We use Geo-R1's
   ``test_rec_baseline_eval.py`` byte for byte: the example item is indented with ONE TAB,
   ``[\\n\\t{"bbox_2d": [x1, y1, x2, y2]}\\n]`` (not four spaces as in the OVD prompt), no label key.
2. OVD with reasoning. Geo-R1's OVD evaluation script has a commented-out wrapper
   ``"{problem} Output the thinking process in <think> </think> and final answer in <answer> </answer>
   tags."`` and by default sends the OVD prompt without any reasoning instruction. VLM-R1 trains OVD
   (task ``odLength``) with the reasoning instruction in front: ``REASONING_INSTRUCTION + "\\n" +
   question``. Since checkpoints follow their training prompt, ``multi`` + ``reasoning=True`` uses
   VLM-R1's training form; ``multi`` + ``reasoning=False`` is the evaluation script's default prompt.
3. The reasoning instruction is VLM-R1's ``odLength`` text; it starts with "First thinks" (sic) and its
   line break is the separator ``"\\n"``, not part of :data:`REASONING_INSTRUCTION` (GEO-R1.md shows
   it with the trailing ``\\n`` because it is always followed by the question).
4. GRES (Geo-R1 ``test_gres_eval.py``) is the task ``"gres"``: :data:`GRES_TEMPLATE` with the expression as
   ``{Question}``, as upstream fills it with the dataset's question. ``reasoning=False`` is refused (no
   upstream prompt). Adding the task changed no byte of the other prompts, so PROMPT_VERSION stays.
5. The expression is inserted after ``str.strip()``; nothing else about it is changed (no punctuation is
   added or removed: "storage tanks." gives "...objects: storage tanks.. Output..." as upstream would).
6. There is no system message: the Qwen chat template supplies its default system line. The image comes
   first in the user turn, then the text, as in every Geo-R1 and VLM-R1 script.

Templates ending in ``_TEMPLATE`` are :meth:`str.format` strings exactly as upstream writes them: literal
braces are doubled and placeholders are ``{Question}`` or ``{category}``. ``str.format`` does not
re-read the substituted value, so an expression containing braces is safe. The other constants are
plain text.

Bump rule for :data:`PROMPT_VERSION`: any change to the bytes of any prompt :func:`build_prompt` can
return (template text, expression normalisation, message layout) bumps it. Results, caches and
training runs record it, so a mismatch between a checkpoint and the prompt it is served with is visible.

This module is pure: standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from geo_r1_qgis.core.client import MAX_EXPRESSION_CHARS as _MAX_EXPRESSION_CHARS
from geo_r1_qgis.core.errors import ConfigError

__all__ = [
    "GRES_TEMPLATE",
    "MAX_EXPRESSION_CHARS",
    "OVD_REASONING_TEMPLATE",
    "OVD_TEMPLATE",
    "PROMPT_VERSION",
    "REASONING_INSTRUCTION",
    "REASONING_SEPARATOR",
    "REC_QUESTION_PREFIX",
    "REC_TEMPLATE",
    "SFT_REC_TEMPLATE",
    "SFT_SUFFIX",
    "TASKS",
    "PromptSpec",
    "build_messages",
    "build_prompt",
]

#: Identifies the exact prompt bytes. Bump on ANY change to what build_prompt/build_messages return.
PROMPT_VERSION = "geo-r1-vlmr1-2025.09"

#: Tasks understood by :func:`build_prompt`.
TASKS: tuple[str, ...] = ("rec", "multi", "gres")

#: Longest accepted expression, in characters (a referring expression is a sentence, not a document). Defined in
#: the pure core, which the plugin ships too, so that its history keeps no longer entry than any engine accepts.
MAX_EXPRESSION_CHARS = _MAX_EXPRESSION_CHARS

#: VRSBench's REC question, followed directly by the expression (GEO-R1.md).
REC_QUESTION_PREFIX = "Please provide the bounding box coordinate of the region this sentence describes: "

#: VLM-R1 ``get_question_template("rec")``; Geo-R1 ``test_rec_r1_eval.py`` QUESTION_TEMPLATE.
REC_TEMPLATE = (
    "{Question} First output the thinking process in <think> </think> tags and then output the final "
    "answer in <answer> </answer> tags. Output the final answer in JSON format."
)

#: Geo-R1 ``test_rec_baseline_eval.py``: what follows ``{Question}`` in the SFT-baseline REC prompt
#: (plain text, braces single). Note the TAB before the example item.
SFT_SUFFIX = (
    " Output the detected target's bbox coordinates in JSON format. The format of the bbox coordinates is:\n"
    "```json\n"
    "[\n"
    '\t{"bbox_2d": [x1, y1, x2, y2]}\n'
    "]\n"
    "```\n"
    "If there are no such targets in the image, simply respond with None."
)

#: The SFT-baseline REC template, as upstream's format string.
SFT_REC_TEMPLATE = "{Question}" + SFT_SUFFIX.replace("{", "{{").replace("}", "}}")

#: Geo-R1 ``test_ovd_nwpu_eval.py`` PROBLEM_TEMPLATE (four-space indented items, with labels).
OVD_TEMPLATE = (
    "Please carefully check the image and detect the following objects: {category}. "
    "Output each detected target's bbox coordinates in JSON format. The format of the bbox coordinates is:\n"
    "```json\n"
    "[\n"
    '    {{"bbox_2d": [x1, y1, x2, y2], "label": "target name"}},\n'
    '    {{"bbox_2d": [x1, y1, x2, y2], "label": "target name"}}\n'
    "]\n"
    "```\n"
    "If there are no such targets in the image, simply respond with None."
)

#: VLM-R1 ``get_question_template("odLength")`` instruction (also Geo-R1 GRES), without its separator.
REASONING_INSTRUCTION = (
    "First thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>"
)

#: What joins :data:`REASONING_INSTRUCTION` and the question.
REASONING_SEPARATOR = "\n"

#: VLM-R1 ``odLength``: the reasoning instruction in front of the question (here: the OVD prompt).
OVD_REASONING_TEMPLATE = REASONING_INSTRUCTION + REASONING_SEPARATOR + "{Question}"

#: Geo-R1 ``test_gres_eval.py`` FULL_PROMPT_TEMPLATE (for the trainer; not a task of build_prompt).
#: "image.Output" without a space is in the original.
GRES_TEMPLATE = (
    REASONING_INSTRUCTION
    + REASONING_SEPARATOR
    + "Please carefully check the image and answer: {Question}. Based on your answer, detect all relevant "
    "objects in the image.Output each detected target's bbox coordinates in JSON format. "
    'The format of the bbox coordinates is:\n```json\n[\n    {{"bbox_2d": [x1, y1, x2, y2], '
    '"keypoint1": [x3, y3], "keypoint2": [x4, y4]}},\n    '
    '{{"bbox_2d": [x1, y1, x2, y2], "keypoint1": [x3, y3], "keypoint2": [x4, y4]}}\n]\n```\n'
    "If there are no such targets in the image, simply respond with None."
)


#: Geo-R1's generation limits per task: 256 new tokens for REC, 1024 for OVD and GRES (its evaluation
#: scripts). A request that names no limit gets its task's; a request mixing tasks, the larger.
MAX_NEW_TOKENS: dict[str, int] = {"rec": 256, "multi": 1024, "gres": 1024}


def default_max_new_tokens(tasks: Any) -> int:
    """The generation limit for a request whose items have these tasks (a task name or an iterable)."""
    names = {tasks} if isinstance(tasks, str) else set(tasks)
    return max((MAX_NEW_TOKENS.get(t, MAX_NEW_TOKENS["multi"]) for t in names), default=MAX_NEW_TOKENS["rec"])


@dataclass(frozen=True)
class PromptSpec:
    """One prompt request: validated on construction, rendered by :attr:`text`.

    ``expression`` is what the user typed (stripped here); ``task`` is ``"rec"`` or ``"multi"``;
    ``reasoning`` picks the Geo-R1 think/answer prompt (True) or the SFT-baseline prompt (False).
    """

    expression: str
    task: str = "rec"
    reasoning: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.expression, str):
            raise ConfigError(
                f"the expression must be text, got {type(self.expression).__name__}: "
                "describe what to find, e.g. 'the white storage tank next to the road'"
            )
        stripped = self.expression.strip()
        if not stripped:
            raise ConfigError(
                f"the expression is empty ({self.expression!r}): describe what to find, "
                "e.g. 'the white storage tank next to the road'"
            )
        if len(stripped) > MAX_EXPRESSION_CHARS:
            raise ConfigError(
                f"the expression is {len(stripped)} characters long; shorten it to at most "
                f"{MAX_EXPRESSION_CHARS} (one sentence describing the target)"
            )
        if self.task not in TASKS:
            raise ConfigError(
                f"task must be one of {TASKS}, got {self.task!r}: use 'rec' for exactly one object, "
                "'multi' for zero, one or many, 'gres' for outlines (boxes and keypoints for SAM)"
            )
        if self.task == "gres" and self.reasoning is False:
            raise ConfigError(
                "task 'gres' has only Geo-R1's reasoning prompt (test_gres_eval.py); use reasoning=True, "
                "or task 'multi' with reasoning off and the outline option for masks from the boxes alone"
            )
        if not isinstance(self.reasoning, bool):
            raise ConfigError(f"reasoning must be True or False, got {self.reasoning!r}")
        object.__setattr__(self, "expression", stripped)

    @property
    def text(self) -> str:
        """The prompt text, byte-exact."""
        if self.task == "gres":
            return GRES_TEMPLATE.format(Question=self.expression)
        if self.task == "rec":
            question = REC_QUESTION_PREFIX + self.expression
            template = REC_TEMPLATE if self.reasoning else SFT_REC_TEMPLATE
            return template.format(Question=question)
        problem = OVD_TEMPLATE.format(category=self.expression)
        if self.reasoning:
            return OVD_REASONING_TEMPLATE.format(Question=problem)
        return problem

    def messages(self) -> list[dict[str, Any]]:
        """The Qwen chat messages: one user turn, image first, then the text; no system message."""
        return [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": self.text}],
            }
        ]


def build_prompt(expression: str, task: str = "rec", reasoning: bool = True) -> str:
    """Return the exact prompt text for ``expression`` (raises ConfigError on a bad value)."""
    return PromptSpec(expression, task, reasoning).text


def build_messages(expression: str, task: str = "rec", reasoning: bool = True) -> list[dict[str, Any]]:
    """Return the chat messages list for the Qwen processor's ``apply_chat_template``."""
    return PromptSpec(expression, task, reasoning).messages()
