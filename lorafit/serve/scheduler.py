"""Continuous batching: one decode loop serves every running request, each row with its own adapter and sampling.

Between two decode steps, waiting requests are prefilled together: as many as fit a token budget
(--max-prefill-tokens, counted with padding; at least one), right-padded into one forward, each into its own
KV-cache row. Right padding needs no mask: a real token only attends to earlier positions, all real; the pad
positions' keys are overwritten by the row's own decode steps before any query reaches them. So a running
request waits for at most one prefill forward per step, and N requests arriving together cost about N / (budget /
prompt length) forwards instead of N. A finished or cancelled request leaves at once. Active requests always occupy
slots 0..n-1 (a leaving row's place is taken by the last row, copying its cache), so a step decodes exactly the
running rows, each at its own position, over the cache's first (furthest position + 1) positions.

With `compiled`, the decode step is generate.compiled_decode_step: compiled once, in the decode thread, before the
engine reports ready (a batch of one row and one of two rows: the two graphs every later step reuses).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx.experimental._config as fx_config

from lorafit.generate import compiled_decode_step, sample_next
from lorafit.model import KVCache, LLaMA
from lorafit.runtime import allow_matvec_reductions
from lorafit.serve import DEFAULT_MAX_PREFILL_TOKENS
from lorafit.serve.adapters import AdapterStore


@dataclass
class Sampling:
    """One request's sampling settings."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None


@dataclass
class Request:
    """A generation request: prompt ids in, token events out through `emit` (called from the decode thread).

    emit(token_id, None) for each new token, then emit(None, reason) once: "stop", "length",
    "cancelled" or an error message starting with "error: ".
    """

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    stop_ids: frozenset[int]
    emit: Callable[[int | None, str | None], None]
    slot: int = -1  # adapter slot, -1: the base model
    cancelled: bool = False
    done: bool = False
    generated: int = 0
    position: int = 0  # where the next token goes in the KV cache
    next_token: int = 0
    generator: torch.Generator | None = field(default=None, repr=False)


class CacheRows:
    """The rows and positions of a layer's KVCache that one forward uses, as plain tensors.

    Not an nn.Module: torch.compile fixes the shapes of module buffers, and these change every step (rows join
    and leave, positions grow); as plain attributes they are dynamic sizes of one compiled graph.
    """

    update = KVCache.update

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache
        self.k, self.v = cache.k, cache.v

    def select(self, first: int, last: int, length: int) -> None:
        """Use rows first..last-1 and positions 0..length-1."""
        self.k = self.cache.k[first:last, :, :length]
        self.v = self.cache.v[first:last, :, :length]


class Engine:
    """The decode loop: a background thread that runs until stop(), batching up to max_batch requests."""

    def __init__(
        self,
        model: LLaMA,
        adapters: AdapterStore,
        max_batch: int,
        max_length: int,
        on_step: Callable[[int, int], None] | None = None,
        compiled: bool = False,
        max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS,
        threads: int | None = None,
    ) -> None:
        if max_prefill_tokens < 1:
            raise ValueError(f"--max-prefill-tokens must be at least 1, got {max_prefill_tokens}")
        self.model, self.adapters = model, adapters
        self.max_batch, self.max_length = max_batch, max_length
        self.max_prefill_tokens = max_prefill_tokens
        self.on_step = on_step  # (running rows, waiting requests) after each step, for metrics
        self.device = model.embed_tokens.weight.device
        param = model.embed_tokens.weight
        caches = [
            KVCache(max_batch, b.self_attn.n_kv_head, max_length, b.self_attn.head_dim, param.dtype, param.device)
            for b in model.layers
        ]
        self.caches = [CacheRows(cache) for cache in caches]
        for block, rows in zip(model.layers, self.caches, strict=True):
            # A KVCache module left by earlier use would refuse a plain object in its place.
            block.self_attn._modules.pop("kv_cache", None)
            block.self_attn.kv_cache = rows
        model.rope(0, max_length, self.device)  # the tables every position will need, built once
        self.compiled = compiled
        # Set in the decode thread itself: torch's thread count is per thread, and a new thread takes whatever count
        # some thread set last (every other thread of a server works on one: runtime.one_thread).
        self.threads = threads or torch.get_num_threads()
        self.decode: Callable[..., torch.Tensor] = model  # compiled in the decode thread, see _warm_up
        if compiled:
            adapters.batch.always = adapters.batch.any = True  # one graph for base-only and mixed batches
        self.ready = threading.Event()  # set once the decode step is compiled (at once when it is not)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.wake = threading.Condition()
        self.stopping = False
        self.peak_occupancy = 0  # the most rows one step has decoded together
        # Counters for /metrics and tests: forwards and requests prefilled, decode steps run.
        self.prefill_forwards = self.prefilled_requests = self.decode_steps = 0
        self.thread = threading.Thread(target=self._loop, name="lorafit-decode", daemon=True)

    def start(self) -> None:
        """Start the decode thread (which first compiles the decode step, when compiled)."""
        self.thread.start()

    def submit(self, request: Request) -> None:
        """Queue a request; it joins the batch at the next step."""
        if len(request.prompt) + request.max_tokens > self.max_length:
            raise ValueError(f"prompt + max_tokens exceed the server's {self.max_length} positions")
        if request.sampling.temperature > 0:
            request.generator = torch.Generator(self.device)
            if request.sampling.seed is not None:
                request.generator.manual_seed(request.sampling.seed)
            else:
                request.generator.seed()
        with self.wake:
            if self.stopping:
                raise RuntimeError("the server is shutting down")
            self.waiting.append(request)
            self.wake.notify()

    def cancel(self, request: Request) -> None:
        """Stop a request (its client went away); its slot frees at the next step."""
        request.cancelled = True
        with self.wake:
            self.wake.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Fail what is still queued or running with a clear error and end the loop."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    @property
    def occupancy(self) -> int:
        """Rows in the running batch."""
        return len(self.running)

    # ---------------------------------------------------------------------------- the loop
    def _loop(self) -> None:
        # torch takes a new thread's count from the last one set anywhere at the thread's first call, which
        # get_num_threads makes now, before setting this thread's own.
        torch.get_num_threads()
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            if self.compiled:
                with self.adapters.lock:
                    self._warm_up()
            self.ready.set()
            while True:
                with self.wake:
                    while not self.stopping and not self.waiting and not self.running:
                        self.wake.wait()
                    if self.stopping:
                        break
                    admitted = self._admit()
                try:
                    with self.adapters.lock:
                        self._prefill(admitted)
                        self._drop_finished()
                        if self.running:
                            self._decode_step()
                        self._drop_finished()
                except Exception as error:  # a bug or an out-of-memory must not leave clients hanging
                    for request in [*self.running, *admitted]:
                        self._finish(request, f"error: {type(error).__name__}: {error}")
                    self.running = []
                if self.on_step is not None:
                    self.on_step(len(self.running), len(self.waiting))
        for request in [*self.running, *self.waiting]:
            self._finish(request, "error: the server is shutting down")
        self.running, self.waiting = [], deque()

    def _admit(self) -> list[Request]:
        """Waiting requests for this step's prefill: in arrival order, while free rows and the token budget allow.

        The budget counts padded tokens (rows x the longest prompt); the first request is always taken.
        """
        admitted: list[Request] = []
        longest = 0
        while self.waiting and len(self.running) + len(admitted) < self.max_batch:
            request = self.waiting[0]
            if request.cancelled:
                self.waiting.popleft()
                self._finish(request, "cancelled")
                continue
            padded = (len(admitted) + 1) * max(longest, len(request.prompt))
            if admitted and padded > self.max_prefill_tokens:
                break
            admitted.append(self.waiting.popleft())
            longest = max(longest, len(request.prompt))
        return admitted

    def _use_rows(self, first: int, last: int, length: int, slots: list[int]) -> None:
        for rows in self.caches:
            rows.select(first, last, length)
        self.adapters.batch.set(slots)

    def _prefill(self, requests: list[Request]) -> None:
        """Run the prompts, right-padded, in one forward into the next free cache rows; emit each first token."""
        if not requests:
            return
        first, lengths = len(self.running), [len(r.prompt) for r in requests]
        longest = max(lengths)
        self._use_rows(first, first + len(requests), longest, [r.slot for r in requests])
        prompts = torch.zeros(len(requests), longest, dtype=torch.long, device=self.device)
        for row, request in enumerate(requests):
            prompts[row, : lengths[row]] = torch.tensor(request.prompt, dtype=torch.long)
        hidden = self.model.hidden_states(prompts, 0)
        last = torch.tensor(lengths, device=self.device) - 1
        logits = self.model.lm_head(hidden[torch.arange(len(requests), device=self.device), last])
        self.prefill_forwards += 1
        self.prefilled_requests += len(requests)
        greedy = logits.argmax(dim=-1).tolist()
        for row, request in enumerate(requests):
            request.position = lengths[row]
            self.running.append(request)
            token = greedy[row] if request.generator is None else self._sample(request, logits[row])
            self._take(request, token)

    def _decode_step(self) -> None:
        n = len(self.running)
        self.peak_occupancy = max(self.peak_occupancy, n)
        self._use_rows(0, n, max(r.position for r in self.running) + 1, [r.slot for r in self.running])
        tokens = torch.tensor([[r.next_token] for r in self.running], dtype=torch.long, device=self.device)
        positions = torch.tensor([r.position for r in self.running], dtype=torch.long, device=self.device)
        logits = self.decode(tokens, positions)[:, -1]
        self.decode_steps += 1
        greedy = logits.argmax(dim=-1).tolist()
        for i, request in enumerate(self.running):
            request.position += 1
            token = greedy[i] if request.generator is None else self._sample(request, logits[i])
            self._take(request, token)

    def _warm_up(self) -> None:
        """Compile the decode step for one row and for several (the first row count after one is special-cased)."""
        # Compiler settings are per thread, and the step compiles in this one: the matvec pass must be allowed here
        # (compiled_decode_step does so only where it is first called).
        allow_matvec_reductions()
        # Inductor otherwise ties sizes that happen to be equal while tracing (a batch of 2 and a rank-2 adapter,
        # say) and compiles again when they differ.
        fx_config.use_duck_shape = False
        self.decode = compiled_decode_step(self.model)
        for rows in (1, min(2, self.max_batch)):
            self._use_rows(0, rows, 3, [-1] * rows)
            tokens = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
            self.decode(tokens, torch.full((rows,), 2, dtype=torch.long, device=self.device))

    def _sample(self, request: Request, logits: torch.Tensor) -> int:
        s = request.sampling
        return int(sample_next(logits, s.temperature, s.top_k, s.top_p, request.generator))

    def _take(self, request: Request, token: int) -> None:
        """Record one new token and emit it; mark the request done at a stop token or its length."""
        request.generated += 1
        request.next_token = token
        request.emit(token, None)
        if token in request.stop_ids:
            self._finish(request, "stop")
        elif request.generated >= request.max_tokens:
            self._finish(request, "length")

    def _finish(self, request: Request, reason: str) -> None:
        """Emit the end (once) and give the adapter slot back; the row leaves at the next _drop_finished."""
        if request.done:
            return
        request.done = request.cancelled = True
        request.emit(None, reason)
        if request.slot >= 0:
            self.adapters.release(request.slot)

    def _drop_finished(self) -> None:
        """Remove finished and cancelled rows, moving the last rows' caches into the gaps."""
        row = 0
        while row < len(self.running):
            request = self.running[row]
            if not request.cancelled:
                row += 1
                continue
            self._finish(request, "cancelled")
            last = len(self.running) - 1
            if row != last:
                end = self.running[last].position
                for rows in self.caches:
                    rows.cache.k[row, :, :end] = rows.cache.k[last, :, :end]
                    rows.cache.v[row, :, :end] = rows.cache.v[last, :, :end]
                self.running[row] = self.running[last]
            self.running.pop()
