"""Text generation: prefill the prompt once, then decode one token at a time from the KV cache.

`generate` yields token ids as they are chosen (greedy, or temperature / top-k / top-p sampling
from a seedable generator); `TextStreamer` turns them into text pieces; `LLM` is the small
object a Python user loads once and asks questions.
"""

from __future__ import annotations

import sys
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from lorafit.model import LLaMA
from lorafit.runtime import (
    allow_matvec_reductions,
    pack_decode_weights,
    peak_memory_bytes,
    resolve_device,
    resolve_dtype,
    use_decode_kernels,
)

# KV caches grow in steps of this many positions, so a chat's growing prompt rarely reallocates.
CACHE_STEP = 256


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token from logits (..., vocab): argmax at temperature 0, else sample; returns (...,) ids."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    flat = probs.reshape(-1, probs.size(-1))
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (to -inf) all but the smallest set of most likely tokens whose probabilities sum to >= top_p."""
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    # A token is dropped when the tokens ranked above it already reach top_p; the top one always stays.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop_sorted = mass_before >= top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def ensure_kv_cache(model: LLaMA, length: int) -> None:
    """Give the model a batch-1 KV cache of at least `length` positions in its dtype (reuse one that fits)."""
    cache = model.layers[0].self_attn.kv_cache
    param = model.embed_tokens.weight
    fits = (
        cache is not None
        and cache.k.size(0) == 1
        and cache.k.size(2) >= length
        and cache.k.dtype == param.dtype
        and cache.k.device == param.device
    )
    if not fits:
        if length > model.config.block_size:
            print(
                f"lorafit: warning: {length} positions exceed the model's block_size {model.config.block_size}",
                file=sys.stderr,
            )
        model.setup_kv_cache(1, -(-length // CACHE_STEP) * CACHE_STEP)


@dataclass
class GenerationStats:
    """How one generation went: sizes, latency, throughput and memory."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    time_to_first_token_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    total_s: float = 0.0
    peak_memory_bytes: int = 0

    def summary(self) -> str:
        """One line for the end of a command."""
        return (
            f"{self.prompt_tokens} prompt + {self.new_tokens} new tokens in {self.total_s:.2f} s; "
            f"first token after {self.time_to_first_token_s * 1000:.0f} ms, "
            f"decode {self.decode_tokens_per_s:.1f} tokens/s; peak memory {self.peak_memory_bytes / 2**30:.2f} GiB"
        )


@torch.inference_mode()
def generate(
    model: LLaMA,
    prompt_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Iterable[int] = (),
    generator: torch.Generator | None = None,
    cached_tokens: int = 0,
    stats: GenerationStats | None = None,
    compiled: bool = False,
) -> Iterator[int]:
    """Yield up to max_new_tokens new token ids after prompt_ids, ending after the first one in stop_ids.

    `cached_tokens` says how many leading prompt tokens the model's KV cache already holds (from an
    earlier call with the same prefix), so only the rest is prefilled. `stats`, when given, is filled in.
    `compiled` decodes through compiled_decode_step (its first use compiles).
    """
    device = model.embed_tokens.weight.device
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=device).reshape(1, -1)
    n_prompt = prompt.size(1)
    if n_prompt == 0:
        raise ValueError("the prompt is empty; generation needs at least one token (e.g. BOS)")
    if not 0 <= cached_tokens < n_prompt:
        raise ValueError(f"cached_tokens must be in [0, {n_prompt - 1}], got {cached_tokens}")
    stop = set(stop_ids)
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens, stats.new_tokens = n_prompt, 0
    if max_new_tokens <= 0:
        return
    ensure_kv_cache(model, n_prompt + max_new_tokens)

    t0 = time.perf_counter()
    # Prefill: the LM head only for the last position, the one that predicts the next token.
    hidden = model.hidden_states(prompt[:, cached_tokens:], cached_tokens)
    token = sample_next(model.lm_head(hidden[:, -1]), temperature, top_k, top_p, generator)
    t_first = time.perf_counter()
    stats.time_to_first_token_s = t_first - t0
    step = DecodeStep(model, compiled)
    position = n_prompt
    try:
        for i in range(max_new_tokens):
            token_id = int(token)
            stats.new_tokens = i + 1
            yield token_id
            if token_id in stop or i == max_new_tokens - 1:
                break
            token = sample_next(step(token, position), temperature, top_k, top_p, generator)
            position += 1
    finally:
        t_end = time.perf_counter()
        stats.total_s = t_end - t0
        decode_steps = stats.new_tokens - 1
        stats.decode_tokens_per_s = decode_steps / (t_end - t_first) if decode_steps > 0 else 0.0
        stats.peak_memory_bytes = peak_memory_bytes(device)


@torch.inference_mode()
def generate_batch(
    model: LLaMA,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Iterable[int] = (),
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """New token ids for several prompts at once (each list ends at its first stop id).

    The prompts are left-padded into one batch with the padding hidden from attention; RoPE only
    sees relative positions, so each answer equals its own unbatched one (up to float rounding).
    Decoding is bound by reading the weights, so a batch of B costs little more than one prompt.
    """
    device = model.embed_tokens.weight.device
    batch, longest = len(prompts), max(len(p) for p in prompts)
    total = longest + max_new_tokens
    idx = torch.zeros(batch, longest, dtype=torch.long, device=device)
    key_mask = torch.ones(batch, total, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        pad = longest - len(prompt)
        idx[row, pad:] = torch.as_tensor(prompt, device=device)
        key_mask[row, :pad] = False
    stop = set(stop_ids)
    answers: list[list[int]] = [[] for _ in prompts]
    finished = [False] * batch
    model.setup_kv_cache(batch, total)
    try:
        logits = model.lm_head(model.hidden_states(idx, 0, key_mask[:, :longest])[:, -1])
        for step in range(max_new_tokens):
            tokens = sample_next(logits, temperature, generator=generator)
            for row, token in enumerate(tokens.tolist()):
                if not finished[row]:
                    answers[row].append(token)
                    finished[row] = token in stop
            if all(finished) or step == max_new_tokens - 1:
                break
            position = longest + step
            logits = model(tokens.reshape(batch, 1), position, key_mask[:, : position + 1])[:, -1]
    finally:
        model.clear_kv_cache()  # batch-sized; the next single-prompt call sets up its own
    return answers


class DecodeStep:
    """One token in, next-token logits out, writing its keys and values to the model's KV cache."""

    def __init__(self, model: LLaMA, compiled: bool = False) -> None:
        self.forward = compiled_decode_step(model) if compiled else model
        self.idx = torch.zeros(1, 1, dtype=torch.long, device=model.embed_tokens.weight.device)

    def __call__(self, token: torch.Tensor, position: int) -> torch.Tensor:
        self.idx.copy_(token.reshape(1, 1))
        return self.forward(self.idx, position)[:, -1]


_compiled_steps: weakref.WeakKeyDictionary[LLaMA, Callable[..., torch.Tensor]] = weakref.WeakKeyDictionary()


def compiled_decode_step(model: LLaMA) -> Callable[..., torch.Tensor]:
    """model(idx, position) compiled by torch.compile for one-token steps, once per model.

    Decoding one token is matrix-vector products, bound by reading every weight once. Inductor is
    asked to emit each as a fused multiply-and-sum along the weight's rows instead of a BLAS call
    (its decompose_mm pass, allowed for any width): on 2 AVX2 cores that reads row-major float32
    weights at about twice the bandwidth MKL reaches for one token (int8 layers write their own reduction,
    which reads the int8 codes: lorafit.quant.int8_linear). The position is dynamic, so one
    graph serves every step. The first call compiles (about a minute for SmolLM2-135M on 2 cores;
    inductor caches it on disk for later processes) and needs a C++ compiler. It writes its own kernels,
    so LLM.load(compile=True) does not apply use_decode_kernels.
    """
    if model not in _compiled_steps:
        allow_matvec_reductions()
        _compiled_steps[model] = torch.compile(model.forward, dynamic=True)
    return _compiled_steps[model]


class _Decodes(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


class TextStreamer:
    """Incremental detokenisation: feed token ids, get the text they add.

    Text is held back while it ends in an incomplete UTF-8 character (decoded as U+FFFD), and only
    a short window of recent tokens is decoded each time, so streaming stays linear in the output.
    """

    def __init__(self, tokenizer: _Decodes, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        # Text of ids[prefix:read] has been emitted; ids[read:] are pending. Decoding from `prefix`
        # rather than `read` keeps the context that decides leading spaces (SentencePiece's "▁").
        self._prefix = 0
        self._read = 0

    def put(self, ids: int | Iterable[int]) -> str:
        """Add token ids; return the newly completed text (possibly empty)."""
        self.ids.extend([ids] if isinstance(ids, int) else ids)
        emitted = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        if len(text) <= len(emitted) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(emitted) :]

    def flush(self) -> str:
        """The text still held back (e.g. an incomplete character at the very end)."""
        emitted = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return text[len(emitted) :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


def prepare_for_decoding(model: LLaMA, quantize: str | None, compile: bool) -> None:
    """What generate, chat and serve do to a loaded model before decoding with it, in place.

    int8 gives the model an int8 LM head too (the largest matrix a token reads); eager decoding on the CPU
    sends its few-row products through ops.linear (use_decode_kernels), the compiled step writes its own; both
    read the weights from one buffer in reading order (pack_decode_weights).
    """
    from lorafit.quant import quantize_lm_head

    if quantize == "int8":
        quantize_lm_head(model)
    if compile:
        pack_decode_weights(model, join=False)
    else:
        use_decode_kernels(model)


class LLM:
    """A loaded model and tokenizer, ready to answer prompts: `lorafit.load().generate("Hi")`.

    Successive calls reuse the KV cache for the tokens a prompt shares with the previous prompt and
    answer (as a multi-turn chat does), so only the new turn is prefilled.
    """

    def __init__(self, model: LLaMA, tokenizer, compile: bool = False) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.compile = compile
        self.last_stats: GenerationStats | None = None
        self._cached_ids: list[int] = []

    @classmethod
    def load(
        cls,
        checkpoint: str | Path | None = None,
        adapter: str | Path | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        compile: bool = False,
        quantize: str | None = None,
    ) -> LLM:
        """Load a checkpoint (path, known name, HF repo id) and optionally a finetuning run on it (a LoRA run or
        PEFT adapter, a LLaMA-Adapter run, a full finetune).

        Without a checkpoint: the adapter's base model, else the embedded default model. compile=True
        decodes through compiled_decode_step (the first answer waits for the compilation). quantize
        ("int8", "nf4", "nf4-dq") stores the block linears quantised: fewer bytes to read per token; a plain
        checkpoint is quantised while loading, a run after its adapter is folded in. int8 quantises the LM head
        too (a copy: a tied embedding stays float for lookups).
        """
        from lorafit.checkpoint import load_model
        from lorafit.hub import resolve_checkpoint
        from lorafit.methods import load_run
        from lorafit.quant import load_quantized, quantize_model
        from lorafit.tokenizer import Tokenizer

        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        if adapter is None:
            path = resolve_checkpoint(checkpoint)
            model = load_quantized(path, quantize, dtype, device) if quantize else load_model(path, dtype, device)
        else:
            model, path, method = load_run(adapter, checkpoint, dtype, device)
            # LoRA folds into the weights; LLaMA-Adapter stays live, its prompt's keys/values computed once.
            method.prepare_for_inference(model)
            if quantize:
                quantize_model(model, quantize)  # the plain block linears; layers with an adapter of their own stay
        prepare_for_decoding(model, quantize, compile)
        return cls(model, Tokenizer.from_checkpoint(path), compile)

    def prompt_ids(self, prompt: str | list[dict[str, str]], chat: bool = False) -> list[int]:
        """Token ids for a prompt: plain text, or (chat=True, or a list of messages) the chat template's rendering."""
        if isinstance(prompt, list) or chat:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            # The template writes the special tokens itself (BOS included where the model wants one).
            return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages), bos=False)
        return self.tokenizer.encode(prompt)

    def stream(
        self,
        prompt: str | list[dict[str, str]],
        chat: bool = False,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Yield the answer's text piece by piece as it is generated (stops at the model's stop tokens)."""
        ids = self.prompt_ids(prompt, chat)
        generator = None
        if seed is not None:
            generator = torch.Generator(self.model.embed_tokens.weight.device).manual_seed(seed)
        cached = self._reusable_prefix(ids, max_new_tokens)
        self._cached_ids = ids[:cached]  # stays consistent if the caller stops early
        self.last_stats = GenerationStats()
        streamer = TextStreamer(self.tokenizer)
        new: list[int] = []
        stop = self.tokenizer.stop_ids
        for token in generate(
            self.model,
            ids,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            stop,
            generator,
            cached_tokens=cached,
            stats=self.last_stats,
            compiled=self.compile,
        ):
            new.append(token)
            # The cache holds every token fed to the model: all but the latest one.
            self._cached_ids = ids + new[:-1]
            if token not in stop:
                yield streamer.put(token)
        yield streamer.flush()

    def generate(
        self,
        prompt: str | list[dict[str, str]],
        chat: bool = False,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> str:
        """The whole answer as one string (see `stream`)."""
        return "".join(self.stream(prompt, chat, max_new_tokens, temperature, top_k, top_p, seed))

    def _reusable_prefix(self, ids: list[int], max_new_tokens: int) -> int:
        """How many leading ids the KV cache already holds (at least one token is always prefilled)."""
        if self.model.kv_cache_length < len(ids) + max_new_tokens:
            return 0  # the cache will be reallocated, losing what it holds
        n = 0
        for a, b in zip(self._cached_ids, ids[:-1], strict=False):
            if a != b:
                break
            n += 1
        return n
