"""``geo-r1 tiny-model``: build a tiny, randomly initialised Qwen2.5-VL checkpoint.

No weights can be downloaded on the project's machines, yet the loading and inference code must be
the real thing. This module writes, with ``save_pretrained``, a checkpoint of a few hundred thousand
parameters that loads through exactly the code path of ``Qwen/Qwen2.5-VL-3B-Instruct``:
``AutoProcessor.from_pretrained(dir)`` and ``Qwen2_5_VLForConditionalGeneration.from_pretrained(dir)``
(or ``AutoModelForImageTextToText``). It holds:

- a byte-level BPE tokenizer trained here with ``tokenizers`` on a small built-in corpus, with the same
  normaliser, pre-tokeniser and decoder as Qwen2's, and every Qwen2.5-VL added token in Qwen's order
  (``<|endoftext|>`` first, so ``pad``/``bos`` is the first id after the BPE vocabulary);
- a chat template written like Qwen2.5-VL's (default system line, image parts as
  ``<|vision_start|><|image_pad|><|vision_end|>``, ``add_generation_prompt``);
- Qwen2-VL's image processor settings as Qwen2.5-VL ships them (patch 14, temporal patch 2, merge 2,
  min_pixels 3136, max_pixels 12845056, CLIP mean/std), so ``smart_resize`` maps 512×512 to 504×504.
  ``AutoProcessor`` picks the torchvision image processor when torchvision is importable and the PIL
  one otherwise, exactly as for the real checkpoint;
- a tiny ``Qwen2_5_VLConfig`` whose special token ids match the tokenizer, tied embeddings, and an
  embedding matrix padded past the tokenizer's length (as the real model's is);
- a greedy ``generation_config.json``.

With ``--learn-format STEPS`` the model is then briefly trained on CPU on synthetic image/answer pairs,
so that greedy decoding of Geo-R1's REC and multi-object prompts produces text in Geo-R1's answer
format (``<think> … </think> <answer>…</answer>`` with JSON boxes). The boxes are real parsed outputs of
a real model, but they mean nothing.

torch and transformers are imported inside functions only, so that ``geo-r1 --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from geo_r1_qgis.core.errors import ConfigError, OutputError
from geo_r1_qgis.core.rules.prompts import (
    OVD_TEMPLATE,
    REASONING_INSTRUCTION,
    REASONING_SEPARATOR,
    REC_TEMPLATE,
    build_prompt,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Tokens, prompts and template
# --------------------------------------------------------------------------------------------------

#: Qwen2.5-VL's added tokens, in the order of their ids (151643 onwards in the real tokenizer), with
#: whether they are "special" (skipped by ``decode(skip_special_tokens=True)``).
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

#: With ``number_tokens``: every whole number a box coordinate in a tile of up to 1000 pixels can take, and the
#: separator of a coordinate list, each one token (added after :data:`ADDED_TOKENS`, not special).
NUMBER_TOKENS: tuple[str, ...] = (*(str(i) for i in range(1001)), ", ")

#: Listed as ``extra_special_tokens`` in the real tokenizer config.
EXTRA_SPECIAL_TOKENS: tuple[str, ...] = tuple(
    tok for tok, special in ADDED_TOKENS if special and tok != "<|endoftext|>"
)

#: A chat template written like Qwen2.5-VL's: the default system line when the conversation has no
#: system message, image/video parts as vision placeholders that the processor expands, and the
#: assistant header when ``add_generation_prompt`` is set.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)

# Geo-R1's prompts come from their one home (geo_r1_qgis.core.rules.prompts): the tokenizer corpus and
# --learn-format use build_prompt's very text, and the corpus also holds the templates' fixed pieces.
_PROMPT_PIECES = (REC_TEMPLATE.format(Question=""), REASONING_INSTRUCTION + REASONING_SEPARATOR, OVD_TEMPLATE)

_CATEGORIES = (
    "airplane", "ship", "storage tank", "vehicle", "bridge", "harbor", "tennis court", "basketball court",
    "ground track field", "baseball field", "roundabout", "swimming pool", "building", "tree", "road",
    "tank", "car", "truck", "house", "field",
)  # fmt: skip
_ADJECTIVES = ("large", "small", "white", "dark", "red", "blue", "gray", "long", "round", "square")
_PLACES = (
    "at the top", "at the bottom", "on the left", "on the right", "in the center", "near the road",
    "next to the river", "in the top left corner", "in the bottom right corner", "beside the building",
    "in the top right corner", "in the bottom left corner", "at the top left", "at the top right",
    "at the bottom left", "at the bottom right",
)  # fmt: skip
_SCENES = (
    "an aerial view of an airport", "a harbor with several ships", "a dense urban area",
    "farmland with fields", "an industrial zone with tanks", "a residential area with houses",
    "a parking lot", "a sports complex", "a river with a bridge", "a forest and a road",
)  # fmt: skip
_WORDS = (
    "aerial satellite image remote sensing scene object objects target targets located position region "
    "left right top bottom upper lower middle center corner edge near next beside between above below "
    "the a an of in on at with and is are there one two three several many only this that it its "
    "I see find locate look first then so answer think reasoning process box bounding coordinate "
    "coordinates pixel pixels image sentence describes expression refers referring detect detected "
    "shadow roof parking lot runway apron pier dock water river lake sea coast shore grass bare soil "
    "airport airfield terminal hangar taxiway helipad helicopter aircraft jet plane vessel boat yacht "
    "tanker container crane wharf marina breakwater canal dam reservoir pond stream creek waterfall "
    "highway motorway freeway overpass interchange intersection crossroads railway railroad station "
    "platform train locomotive wagon bus van pickup trailer tractor excavator bulldozer construction "
    "factory warehouse plant refinery chimney silo greenhouse barn farm orchard vineyard plantation "
    "cropland meadow pasture wetland marsh swamp desert dune beach cliff mountain hill valley ridge "
    "glacier snow ice forest woodland shrub bush hedge park garden cemetery church mosque temple "
    "stadium arena court pitch golf course racetrack swimming pool fountain square plaza market mall "
    "school university hospital prison barracks villa apartment tower skyscraper chimney windmill "
    "turbine solar panel substation pylon transmission line pipeline parking garage roundabout "
    "residential commercial industrial agricultural urban rural suburban coastal mountainous "
    "rectangular circular elongated oval triangular irregular narrow wide tall short tiny huge "
    "bright dim green brown yellow black orange purple pink silver golden shiny rusty parked moving "
    "docked anchored crowded empty scattered clustered aligned adjacent surrounded isolated "
    "northern southern eastern western northwest northeast southwest southeast horizontal vertical "
    "diagonal leftmost rightmost topmost bottommost nearest farthest largest smallest second third"
)


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TinyModelConfig:
    """What :func:`build_tiny_model` builds. Every field has a working default."""

    out_dir: Path = dataclasses.field(
        metadata={"positional": True, "metavar": "OUT_DIR", "help": "directory to write the checkpoint into"}
    )
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of the random weights"})
    force: bool = dataclasses.field(default=False, metadata={"help": "overwrite OUT_DIR if it is not empty"})
    learn_format_steps: int = dataclasses.field(
        default=0,
        metadata={"flags": ("--learn-format",), "metavar": "STEPS",
                  "help": "briefly train on CPU so greedy decoding follows Geo-R1's answer format (0: purely random; "
                  "300 takes well under a minute)"},
    )  # fmt: skip
    # Tokenizer
    bpe_vocab_size: int = dataclasses.field(default=2048, metadata={"help": "BPE vocabulary, no added tokens"})
    padding_side: str = dataclasses.field(
        default="right", metadata={"help": "saved tokenizer padding side (Qwen's is right; engines use left)"}
    )
    number_tokens: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "add the whole numbers 0..1000 and ', ' as single (non-special) tokens after Qwen's, "
            "so a box [x1, y1, x2, y2] costs 9 tokens instead of about 19"
        },
    )
    # Language model
    hidden_size: int = dataclasses.field(default=64, metadata={"help": "text hidden size"})
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 4096
    rope_theta: float = dataclasses.field(
        default=1000000.0,
        metadata={
            "help": "text rotary base (Qwen2.5-VL: 1e6); 10 lets a model this small tell x positions apart "
            "(TRAINING-NOTES.md), which localisation needs"
        },
    )
    # Vision tower
    vision_depth: int = 2
    vision_hidden_size: int = 32
    vision_num_heads: int = 2
    vision_intermediate_size: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}; pass --seed 0 or another non-negative int")
        if self.learn_format_steps < 0:
            raise ConfigError(
                f"learn_format_steps must be >= 0, got {self.learn_format_steps}; use 0 for random weights"
            )
        if not 300 <= self.bpe_vocab_size <= 32768:
            raise ConfigError(f"bpe_vocab_size must be in [300, 32768], got {self.bpe_vocab_size}")
        if self.padding_side not in ("left", "right"):
            raise ConfigError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "vision_depth", "vision_hidden_size", "vision_num_heads",
                     "vision_intermediate_size", "max_position_embeddings"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} must be a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of num_key_value_heads "
                f"{self.num_key_value_heads}"
            )
        if self.head_dim % 4 or self.head_dim < 8:
            raise ConfigError(f"text head_dim {self.head_dim} must be a multiple of 4 and >= 8 (M-RoPE)")
        if self.vision_hidden_size % self.vision_num_heads or (self.vision_hidden_size // self.vision_num_heads) % 4:
            raise ConfigError(
                f"vision_hidden_size {self.vision_hidden_size} / vision_num_heads {self.vision_num_heads} "
                "must give a head dim that is a multiple of 4 (2-D rotary)"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mrope_section(self) -> list[int]:
        """Temporal/height/width split of ``head_dim // 2`` rotary pairs, in Qwen2.5-VL's 2:3:3 ratio."""
        half = self.head_dim // 2
        t = max(1, round(half * 2 / 8))
        h = (half - t) // 2
        return [t, h, half - t - h]

    @property
    def fullatt_block_indexes(self) -> list[int]:
        """The last vision block uses full attention (Qwen2.5-VL: every 8th block), the others windows."""
        return [self.vision_depth - 1]


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def _random_box(rng: random.Random, size: int = 504) -> list[int]:
    w = rng.randint(12, size // 3)
    h = rng.randint(12, size // 3)
    x1 = rng.randint(0, size - w - 1)
    y1 = rng.randint(0, size - h - 1)
    return [x1, y1, x1 + w, y1 + h]


def _box_json(box: list[int], label: str) -> str:
    return json.dumps({"bbox_2d": box, "label": label})


def _corpus() -> list[str]:
    """The tokenizer's built-in training corpus. Fixed (seed-independent), so every tiny model shares it."""
    rng = random.Random(1234)
    lines = [*_PROMPT_PIECES, _WORDS, "You are a helpful assistant."]
    lines += [" ".join(_WORDS.split()[i : i + 12]) for i in range(0, len(_WORDS.split()), 6)]
    for _ in range(400):
        cat = rng.choice(_CATEGORIES)
        expr = f"the {rng.choice(_ADJECTIVES)} {cat} {rng.choice(_PLACES)}"
        lines.append(build_prompt(expr, "rec"))
        lines.append(build_prompt(cat, "multi"))
        lines.append(_answer_text(rng, [(_random_box(rng), cat)], cat, multi=rng.random() < 0.5))
        lines.append(" ".join(str(rng.randint(0, 1000)) for _ in range(8)))
    return lines


def build_tokenizer(config: TinyModelConfig) -> Any:
    """Train the byte-level BPE and wrap it as transformers' ``Qwen2Tokenizer`` (tokenizers-backed)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import AddedToken, Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    # Same pipeline as Qwen2Tokenizer, so that reloading (which rebuilds it from vocab + merges) is exact.
    bpe = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.bpe_vocab_size,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|endoftext|>",  # set to <|im_end|> below, once the added tokens have their ids
        pad_token="<|endoftext|>",
        errors="replace",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        model_max_length=131072,
        padding_side=config.padding_side,
    )
    tokenizer.add_tokens([AddedToken(tok, special=special, normalized=False) for tok, special in ADDED_TOKENS])
    tokenizer.add_special_tokens({"additional_special_tokens": list(EXTRA_SPECIAL_TOKENS)})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHAT_TEMPLATE
    base = len(model["vocab"])
    for i, (tok, _) in enumerate(ADDED_TOKENS):
        got = tokenizer.convert_tokens_to_ids(tok)
        if got != base + i:  # a programming error, not a user error
            raise RuntimeError(f"added token {tok} got id {got}, expected {base + i}")
    if config.number_tokens:
        # After Qwen's added tokens, so their ids stay where the real tokenizer has them relative to the BPE.
        tokenizer.add_tokens([AddedToken(tok, special=False, normalized=False) for tok in NUMBER_TOKENS])
    return tokenizer


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def build_processor(config: TinyModelConfig) -> Any:
    """Qwen2.5-VL's processor: the tokenizer above and Qwen2-VL's PIL image processor, real settings.

    Without torchvision it is the image-only variant from :mod:`engine.runtime.loading` (transformers 5.x cannot
    build Qwen2-VL's video processor without torchvision); the files it saves are the same.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from engine.runtime.loading import image_only_processor_class

    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=3136,
        max_pixels=12845056,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor_class = image_only_processor_class()
    return processor_class(
        image_processor=image_processor, tokenizer=build_tokenizer(config), chat_template=CHAT_TEMPLATE
    )


def save_processor(processor: Any, out: Path) -> None:
    """Write the processor files like a real Qwen2.5-VL checkpoint: tokenizer files, chat template and
    ``preprocessor_config.json``, each naming ``Qwen2_5_VLProcessor`` as their processor class."""
    processor.tokenizer.save_pretrained(out)
    processor.image_processor.save_pretrained(out)
    for name in ("tokenizer_config.json", "preprocessor_config.json"):
        path = out / name
        data = json.loads(path.read_text(encoding="utf-8"))
        data["processor_class"] = "Qwen2_5_VLProcessor"
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def model_config(config: TinyModelConfig, tokenizer: Any) -> Any:
    """The tiny ``Qwen2_5_VLConfig``, with special token ids taken from ``tokenizer``."""
    from transformers import Qwen2_5_VLConfig

    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok, _ in ADDED_TOKENS}
    vocab_size = -(-len(tokenizer) // 64) * 64  # padded past the tokenizer, like the real 151936
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "max_window_layers": config.num_hidden_layers,
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": config.rope_theta,
            "mrope_section": config.mrope_section,
        },
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision_config = {
        "depth": config.vision_depth,
        "hidden_size": config.vision_hidden_size,
        "hidden_act": "silu",
        "intermediate_size": config.vision_intermediate_size,
        "num_heads": config.vision_num_heads,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
        "window_size": 112,
        "out_hidden_size": config.hidden_size,
        "fullatt_block_indexes": config.fullatt_block_indexes,
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def generation_config(tokenizer: Any) -> Any:
    """Greedy decoding, stopping at ``<|im_end|>`` or ``<|endoftext|>`` (Qwen2.5-VL's eos pair)."""
    from transformers import GenerationConfig

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return GenerationConfig(
        do_sample=False, bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot, max_new_tokens=256
    )


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def build_tiny_model(config: TinyModelConfig) -> Path:
    """Write the tiny checkpoint into ``config.out_dir`` and return that directory.

    The same config (seed included) gives byte-identical ``model.safetensors``.
    """
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = config.out_dir
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a directory; choose another OUT_DIR")
    if out.is_dir() and any(out.iterdir()):
        if not config.force:
            raise OutputError(f"{out} is not empty; pass --force to overwrite it, or choose another OUT_DIR")
        shutil.rmtree(out)

    processor = build_processor(config)
    mconfig = model_config(config, processor.tokenizer)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: deterministic reductions, and the 1-core budget
    try:
        _seed_everything(config.seed)
        model = Qwen2_5_VLForConditionalGeneration(mconfig).to(torch.float32)
        model.generation_config = generation_config(processor.tokenizer)
        if config.learn_format_steps:
            learn_format(model, processor, config.learn_format_steps, seed=config.seed)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    log.info("tiny Qwen2.5-VL: %d parameters, vocab %d (tokenizer %d)", n_params,
             mconfig.text_config.vocab_size, len(processor.tokenizer))  # fmt: skip

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_processor(processor, out)
    log.info("wrote %s", out)
    return out


# --------------------------------------------------------------------------------------------------
# --learn-format: teach the tiny model Geo-R1's answer format on synthetic examples
# --------------------------------------------------------------------------------------------------

_THINKS = (
    "The image shows {scene}. The {cat} is {place}, so I locate it there.",
    "I look for the {cat}. It is {place} of the image.",
    "There is {scene}. I find the {cat} {place} and give its box.",
)


def _answer_text(
    rng: random.Random, boxes: list[tuple[list[int], str]], cat: str, multi: bool, place: str | None = None
) -> str:
    place = place or rng.choice(_PLACES)
    think = rng.choice(_THINKS).format(scene=rng.choice(_SCENES), cat=cat, place=place)
    del multi  # both kinds answer with a JSON list, as Qwen2.5-VL grounding does
    answer = "[" + ", ".join(_box_json(b, label) for b, label in boxes) + "]"
    return f"<think> {think} </think> <answer>{answer}</answer>"


#: Box corners and sizes of the synthetic examples, in pixels of a 504×504 view (a 512 tile as the model
#: sees it). A small discrete set, so that a few hundred steps teach greedy decoding well-formed boxes.
_ANCHORS = (28, 140, 252, 364)
_SIZES = (56, 84, 112)


def _place(x1: int, y1: int) -> str:
    vertical = "top" if y1 < 200 else "bottom"
    horizontal = "left" if x1 < 200 else "right"
    return f"in the {vertical} {horizontal} corner" if x1 != y1 else f"at the {vertical} {horizontal}"


def synthetic_examples(seed: int, sides: tuple[int, ...] = (56, 84, 112)) -> Iterator[tuple[Any, str, str]]:
    """Endless ``(image, prompt, answer)`` triples: a flat background with bright rectangles.

    Half are Geo-R1 REC prompts (the expression names the object and where it is) answered with one
    box, half are multi-object prompts (OVD with the reasoning prefix) answered with a list of one to
    three boxes. Boxes are in the pixels of a 504×504 view; the rectangles are drawn at the same
    relative place in an image whose side is drawn from ``sides``.
    """
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    while True:
        side = rng.choice(sides)
        image = Image.new("RGB", (side, side), tuple(rng.randint(0, 120) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        cat = rng.choice(_CATEGORIES)
        multi = rng.random() < 0.5
        boxes: list[tuple[list[int], str]] = []
        corners = rng.sample([(x, y) for x in _ANCHORS for y in _ANCHORS], rng.randint(1, 3) if multi else 1)
        for x1, y1 in sorted(corners, key=lambda c: (c[1], c[0])):
            box = [x1, y1, x1 + rng.choice(_SIZES), y1 + rng.choice(_SIZES)]
            boxes.append((box, cat))
            scale = side / 504
            fill = tuple(rng.randint(150, 255) for _ in range(3))
            draw.rectangle([round(v * scale) for v in box], fill=fill)
        place = _place(*boxes[0][0][:2])
        if multi:
            prompt = build_prompt(cat, "multi")
        else:
            prompt = build_prompt(f"the {rng.choice(_ADJECTIVES)} {cat} {place}", "rec")
        yield image, prompt, _answer_text(rng, boxes, cat, multi, place)


def learn_format(model: Any, processor: Any, steps: int, seed: int = 0, batch_size: int = 6) -> float:
    """Train ``model`` in place for ``steps`` AdamW steps on :func:`synthetic_examples`; return the last loss.

    Only the answer tokens (and the closing ``<|im_end|>``) are supervised, as in SFT.
    """
    import torch

    tokenizer = processor.tokenizer
    saved_padding_side, tokenizer.padding_side = tokenizer.padding_side, "right"
    # Batches of one image size each (no padding waste), small ones mostly; a full 504-pixel view now
    # and then, with a smaller batch, so that the model also copes with 324 image tokens (a 512 tile).
    size_mix = ((56, batch_size), (112, batch_size), (224, max(1, batch_size * 2 // 3)), (504, max(1, batch_size // 3)))
    streams = [(synthetic_examples(seed * 7919 + i, (side,)), n) for i, (side, n) in enumerate(size_mix)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20) * (1 - s / steps))
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        images, texts, prompt_lens = [], [], []
        examples, n = streams[step % len(streams)]
        for _ in range(n):
            image, prompt, answer = next(examples)
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            head = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            images.append(image)
            texts.append(head + answer + "<|im_end|>\n")
            prompt_lens.append(head)
        batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
        heads = processor(text=prompt_lens, images=images, return_tensors="pt", padding=True)
        labels = batch["input_ids"].clone()
        head_len = heads["attention_mask"].sum(dim=1)
        for i, n in enumerate(head_len.tolist()):
            labels[i, :n] = -100
        labels[batch["attention_mask"] == 0] = -100
        out = model(**batch, labels=labels)
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_value = float(out.loss.detach())
        if step % 50 == 0 or step == steps - 1:
            log.info("learn-format step %d/%d: loss %.3f", step + 1, steps, loss_value)
    model.eval()
    tokenizer.padding_side = saved_padding_side
    return loss_value
