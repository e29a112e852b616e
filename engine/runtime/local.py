"""The local grounding runtime: a transformers Qwen2.5-VL model in this process.

``LocalBackend`` implements :class:`engine.runtime.backend.Backend`. Items are generated in batches of
``batch_size`` with left padding; items that arrive at the same time from several clients are
micro-batched together by a single worker thread (:class:`MicroBatcher`), which is also the only
thread that touches the model, so adapter switches never race a generation.

Per generated token we record the log-probability of the chosen token and the probability mass of
None-starting tokens (:class:`_TokenRecorder`), from which :mod:`geo_r1_qgis.core.rules.confidence` computes the box
scores and the presence probability without ever keeping a full vocabulary of scores per step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from engine import __version__ as ENGINE_VERSION
from engine.runtime.backend import ChatResult, GenerationSettings, GroundItem, ItemResult, is_out_of_memory, item_result
from engine.runtime.loading import LoadConfig, load_model
from engine.runtime.preprocess import fast_inputs
from geo_r1_qgis.core.errors import ConfigError, EngineOverloadedError
from geo_r1_qgis.core.rules.confidence import confidence_from_tokens, is_none_piece
from geo_r1_qgis.core.rules.parsing import parse_output
from geo_r1_qgis.core.rules.prompts import PROMPT_VERSION, build_messages

log = logging.getLogger(__name__)


def _overloaded(exc: BaseException, batch: int, stage: str) -> EngineOverloadedError:
    return EngineOverloadedError(
        f"out of memory while {stage} for a batch of {batch}: send smaller tiles or fewer items, or lower"
        f" --batch-size ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})"
    )


def decode_with_pieces(tokenizer: Any, ids: Sequence[int]) -> tuple[str, list[str]]:
    """The text of ``ids`` decoded at once, as Geo-R1 decodes (``skip_special_tokens=True``,
    ``clean_up_tokenization_spaces=False``), and one piece per token such that ``"".join(pieces) == text``.

    A byte-level BPE can split one character across tokens; decoding token by token would turn it into
    U+FFFD. Here the tokens are decoded in runs that end on a whole character: the run's text goes to its
    last token, the tokens before it in the run get "". So per-token log-probabilities keep character
    offsets that match the real text.
    """
    kwargs = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
    text = tokenizer.decode(list(ids), **kwargs)
    pieces: list[str] = []
    start, done = 0, 0
    for i in range(len(ids)):
        run = tokenizer.decode(list(ids[start : i + 1]), **kwargs)
        if run.endswith("\ufffd") and i + 1 < len(ids):
            pieces.append("")  # an incomplete character: wait for the tokens that finish it
            continue
        if not text.startswith(run, done):  # not a clean cut after all: let the rest carry it
            pieces.append("")
            continue
        pieces.append(run)
        done += len(run)
        start = i + 1
    if done != len(text) and pieces:  # whatever is left (an unfinished character at the very end)
        pieces[-1] += text[done:]
    return text, pieces


class _TokenRecorder:
    """A logits processor that records, per step, log p(chosen token) and P(None-starting token).

    It sees the final scores of each step (transformers appends custom processors after its own), so
    the probabilities are those of the distribution each token was drawn from. It keeps only the last
    step's log-softmax (batch × vocab) in memory.
    """

    def __init__(self, none_ids: Sequence[int], top_k: int = 0) -> None:
        import torch

        self._torch = torch
        self.none_ids = torch.tensor(list(none_ids), dtype=torch.long)  # moved to the scores' device once
        self.top_k = top_k
        self.prev: Any = None
        self.chosen: list[Any] = []  # per step: (batch,) log-probs of the chosen tokens, on the device
        self.none_probs: list[Any] = []  # per step: (batch,), on the device
        self.tops: list[Any] = []  # per step: (values, indices) of the top_k log-probs
        #: after :meth:`finish`: per row, per step, as Python floats (one device-to-host copy in all)
        self.chosen_rows: list[list[float]] = []
        self.none_rows: list[list[float]] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        torch = self._torch
        logp = torch.log_softmax(scores.float(), dim=-1)
        if self.prev is not None:
            self.chosen.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev = logp
        if self.none_ids.device != logp.device:
            self.none_ids = self.none_ids.to(logp.device)
        self.none_probs.append(logp.index_select(1, self.none_ids).exp().sum(-1))
        if self.top_k:
            self.tops.append(torch.topk(logp, self.top_k, dim=-1))
        return scores

    def finish(self, sequences: Any) -> None:
        """Record the last token and bring everything to the host in one copy per quantity."""
        if self.prev is not None:
            self.chosen.append(self.prev.gather(1, sequences[:, -1:]).squeeze(1))
            self.prev = None
        if self.chosen:
            torch = self._torch
            self.chosen_rows = torch.stack(self.chosen, dim=1).tolist()
            self.none_rows = torch.stack(self.none_probs, dim=1).tolist()


@dataclass
class _Job:
    item: Any
    settings: GenerationSettings
    future: Future
    #: set for :meth:`MicroBatcher.call` jobs: a function to run alone, between batches
    call: Callable[[], Any] | None = None


class MicroBatcher:
    """One worker thread; concurrent submissions are grouped into batches of at most ``batch_size``.

    The worker takes the first waiting job, then waits up to ``max_wait_ms`` for more jobs with the
    same generation settings, and runs them as one batch. Jobs with other settings wait for the next
    batch. ``run_batch(items, settings) -> results`` runs on the worker thread only.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Any], GenerationSettings], list[Any]],
        batch_size: int = 8,
        max_wait_ms: float = 5.0,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self._run_batch = run_batch
        self.batch_size = batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._held: list[_Job] = []
        self._thread = threading.Thread(target=self._loop, name="geo-r1-batcher", daemon=True)
        self._thread.start()

    def submit(self, item: Any, settings: GenerationSettings) -> Future:
        fut: Future = Future()
        self._queue.put(_Job(item, settings, fut))
        return fut

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the worker thread, between batches (for adapter switches)."""
        fut: Future = Future()
        self._queue.put(_Job(None, GenerationSettings(), fut, call=fn))
        return fut.result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _next(self, timeout: float | None) -> _Job | None:
        if self._held:
            return self._held.pop(0)
        return self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()

    def _loop(self) -> None:
        while True:
            job = self._next(None)
            if job is None:
                return
            if job.call is not None:
                self._resolve([job], lambda _items, _s, call=job.call: [call()])
                continue
            batch = [job]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.batch_size:
                try:
                    nxt = self._next(deadline - time.monotonic())
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                if nxt.call is None and nxt.settings == job.settings:
                    batch.append(nxt)
                else:
                    self._held.append(nxt)
                    break
            self._resolve(batch, self._run_batch)

    @staticmethod
    def _resolve(batch: list[_Job], fn: Callable[[list[Any], GenerationSettings], list[Any]]) -> None:
        try:
            results = fn([j.item for j in batch], batch[0].settings)
        except BaseException as exc:  # handed to every waiting caller; the worker goes on
            for j in batch:
                j.future.set_exception(exc)
            return
        for j, r in zip(batch, results, strict=True):
            j.future.set_result(r)


class LocalBackend:
    """A transformers model in this process, behind the :class:`engine.runtime.backend.Backend` interface."""

    kind = "local"
    #: which pixels the model's boxes are in (geo_r1_qgis.core.rules.coords.BOX_FRAMES); the server sets it
    box_frame = "model"
    #: tiles that need no resize skip the image processor's slow path (engine/runtime/preprocess.py)
    fast_preprocess = True
    #: longest chat prompt accepted, in tokens (None: the model's context); the server sets it
    max_prompt_tokens: int | None = None

    def __init__(self, load_config: LoadConfig, batch_size: int = 8, max_wait_ms: float = 5.0) -> None:
        self.load_config = load_config
        self.loaded = load_model(load_config)
        self.processor = self.loaded.processor
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.none_ids = self._none_token_ids()
        self.eos_ids = self._eos_ids()
        self.batch_size = batch_size
        self._batcher = MicroBatcher(self._run_batch, batch_size=batch_size, max_wait_ms=max_wait_ms)
        log.info(
            "engine ready: model=%s device=%s dtype=%s batch_size=%d",
            self.loaded.model_name,
            self.loaded.device,
            self.loaded.dtype,
            batch_size,
        )

    # -- Backend interface ------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {
            "backend": self.kind,
            "model": self.loaded.model_name,
            "processor": self.loaded.processor_name,
            "adapter": self.loaded.adapters.active,
            "adapters": sorted(self.loaded.adapters.list()),
            "device": str(self.loaded.device),
            "dtype": str(self.loaded.dtype),
            "torchvision": self.loaded.has_torchvision,
            "prompt_version": PROMPT_VERSION,
            "engine_version": ENGINE_VERSION,
            "batch_size": self.batch_size,
            "box_frame": self.box_frame,
            "tile": self.loaded.tile,
        }

    def ground(self, items: list[GroundItem], settings: GenerationSettings) -> list[ItemResult]:
        futures = [self._batcher.submit(item, settings) for item in items]
        return [f.result() for f in futures]

    def ground_batched(self, items: list[GroundItem], settings: GenerationSettings) -> list[ItemResult]:
        """Generate ``items`` as exactly one batch, bypassing the micro-batcher (benchmarks)."""
        return self._batcher.call(lambda: self._run_batch(items, settings))

    def chat(
        self,
        messages: list[dict[str, Any]],
        images: list[Any],
        settings: GenerationSettings,
        top_logprobs: int = 0,
        cancel: threading.Event | None = None,
    ) -> ChatResult:
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        self._check_prompt_length(text, images)  # here, in the request's thread: no model work, no queue
        return self._batcher.call(lambda: self._run_chat(text, images, settings, top_logprobs, cancel))

    @property
    def context_tokens(self) -> int:
        """The model's context length (text positions), the default prompt limit."""
        cfg = self.loaded.model.config
        text = getattr(cfg, "text_config", cfg)
        return int(getattr(text, "max_position_embeddings", 32768))

    def _check_prompt_length(self, text: str, images: list[Any]) -> None:
        from geo_r1_qgis.core.rules.coords import model_input_size

        limit = self.max_prompt_tokens or self.context_tokens
        if len(text) > 64 * limit:  # no token is that long: reject before even tokenizing
            n = len(text) // 64
        else:
            n = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        for im in images:
            w, h = model_input_size(im.size)
            n += (w // 28) * (h // 28)
        if n > limit:
            source = "--max-prompt-tokens" if self.max_prompt_tokens else "the model's context"
            raise ConfigError(
                f"the prompt is {'more than ' if len(text) > 64 * limit else ''}{n} tokens (text and images); "
                f"this engine takes at most {limit} ({source}): shorten the messages"
            )

    def adapters(self) -> dict[str, Any]:
        names = self.loaded.adapters.list()
        return {"active": self.loaded.adapters.active, "available": {n: self.loaded.adapters.path(n) for n in names}}

    def load_adapter(self, name: str, path: str) -> None:
        self._batcher.call(lambda: self.loaded.adapters.register(name, path))

    def activate_adapter(self, name: str | None) -> None:
        self._batcher.call(lambda: self.loaded.adapters.activate(name))

    def close(self) -> None:
        self._batcher.close()

    # -- internals --------------------------------------------------------------------------------
    def _none_token_ids(self) -> list[int]:
        ids = []
        for tok_id in range(len(self.tokenizer)):
            piece = self.tokenizer.decode([tok_id])
            if is_none_piece(piece):
                ids.append(tok_id)
        return ids

    def _eos_ids(self) -> set[int]:
        ids = set()
        for tok in ("<|im_end|>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid >= 0:
                ids.add(tid)
        gen_eos = getattr(self.loaded.model.generation_config, "eos_token_id", None)
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif isinstance(gen_eos, list):
            ids.update(gen_eos)
        return ids

    def _prepare(self, texts: list[str], images: list[Any]) -> Any:
        import torch

        try:
            inputs = fast_inputs(self.processor, texts, images) if self.fast_preprocess and images else None
            if inputs is None:  # an image that needs resizing, or a processor the fast path does not cover
                inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
            inputs = inputs.to(self.loaded.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(getattr(torch, str(self.loaded.dtype)))
        except BaseException as exc:
            if is_out_of_memory(exc):
                raise _overloaded(exc, len(texts), "preparing the images") from None
            raise
        return inputs

    def _generate(self, inputs: Any, settings: GenerationSettings, top_k: int = 0,
                  cancel: threading.Event | None = None):  # fmt: skip
        import torch

        recorder = _TokenRecorder(self.none_ids, top_k=top_k)
        kwargs: dict[str, Any] = {
            "max_new_tokens": settings.max_new_tokens,
            "do_sample": settings.do_sample,
            "logits_processor": [recorder],
            "return_dict_in_generate": True,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if settings.do_sample:
            kwargs["temperature"] = settings.temperature
        if cancel is not None:  # the client left: stop at the next token
            from transformers import StoppingCriteria, StoppingCriteriaList

            class _Cancelled(StoppingCriteria):
                def __call__(self, input_ids: Any, scores: Any, **_: Any) -> Any:
                    return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

            kwargs["stopping_criteria"] = StoppingCriteriaList([_Cancelled()])
        try:
            with torch.inference_mode():
                out = self.loaded.model.generate(**inputs, **kwargs)
        except BaseException as exc:
            if not is_out_of_memory(exc):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise _overloaded(exc, int(inputs["input_ids"].shape[0]), "generating") from None
        recorder.finish(out.sequences)
        return out.sequences, recorder

    def _row_tokens(self, sequences: Any, input_len: int, recorder: _TokenRecorder, row: int):
        gen = sequences[row, input_len:].tolist()
        n = len(gen)
        for i, tid in enumerate(gen):
            if tid in self.eos_ids:
                n = i
                break
        finished = n < len(gen)
        ids = gen[:n]
        _, pieces = decode_with_pieces(self.tokenizer, ids)
        logprobs = recorder.chosen_rows[row][:n] if n else []
        none_probs = recorder.none_rows[row][:n] if n else []
        return ids, pieces, logprobs, none_probs, finished

    def _run_batch(self, items: list[GroundItem], settings: GenerationSettings) -> list[ItemResult]:
        t0 = time.perf_counter()
        texts, images = [], []
        for item in items:
            messages = build_messages(item.expression, item.task, item.reasoning)
            texts.append(self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
            images.append(item.image.convert("RGB") if item.image.mode != "RGB" else item.image)
        inputs = self._prepare(texts, images)
        t1 = time.perf_counter()
        sequences, recorder = self._generate(inputs, settings)
        t2 = time.perf_counter()
        input_len = inputs["input_ids"].shape[1]
        grid = inputs["image_grid_thw"].tolist()
        patch = int(getattr(self.processor.image_processor, "patch_size", 14))
        results = []
        for row, item in enumerate(items):
            tp = time.perf_counter()
            ids, pieces, logprobs, none_probs, _ = self._row_tokens(sequences, input_len, recorder, row)
            text = "".join(pieces)
            parsed = parse_output(text, item.task, item.reasoning)
            scores, presence = confidence_from_tokens(pieces, logprobs, none_probs, parsed)
            _, gh, gw = grid[row]
            n = len(items)
            timings = {"preprocess": (t1 - t0) * 1000 / n, "generate": (t2 - t1) * 1000 / n}
            result = item_result(
                text,
                parsed,
                scores,
                presence,
                (gw * patch, gh * patch),
                item.image.size,
                len(ids),
                timings,
                n,
                box_frame=self.box_frame,
            )
            result.timings_ms["parse"] = (time.perf_counter() - tp) * 1000
            results.append(result)
        return results

    def _run_chat(
        self,
        text: str,
        images: list[Any],
        settings: GenerationSettings,
        top_logprobs: int,
        cancel: threading.Event | None = None,
    ) -> ChatResult:
        """One chat completion of an already templated prompt."""
        rgb = [im.convert("RGB") if im.mode != "RGB" else im for im in images]
        inputs = self._prepare([text], rgb)
        if cancel is not None and cancel.is_set():
            raise ConfigError("the client disconnected before generation started")
        sequences, recorder = self._generate(inputs, settings, top_k=top_logprobs, cancel=cancel)
        input_len = inputs["input_ids"].shape[1]
        ids, pieces, logprobs, _, finished = self._row_tokens(sequences, input_len, recorder, 0)
        lp = None
        if top_logprobs:
            lp = []
            for i, (piece, logp) in enumerate(zip(pieces, logprobs, strict=True)):
                values, indices = recorder.tops[i]
                alts = {}
                for v, t in zip(values[0].tolist(), indices[0].tolist(), strict=True):
                    alts.setdefault(self.tokenizer.decode([t]), float(v))
                lp.append((piece, logp, alts))
            lp = tuple(lp)
        return ChatResult(
            text="".join(pieces),
            prompt_tokens=int(inputs["attention_mask"][0].sum()),
            completion_tokens=len(ids),
            finish_reason="stop" if finished else "length",
            logprobs=lp,
        )
