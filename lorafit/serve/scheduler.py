"""Continuous batching: one decode loop serves every running request, each row with its own adapter and sampling.

A new request is prefilled (alone, into its own KV-cache slot) between two decode steps and joins the
batch at that step; at most one prefill runs per step while others decode (an idle batch admits all
waiting requests at once), so a running request is never held up by more than one prefill. A finished
or cancelled request leaves at once. Active requests always occupy
slots 0..n-1 (a leaving row's place is taken by the last row, copying its cache), so a step decodes
exactly the running rows. Every row's position is its own: the model takes per-row positions.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lorafit.generate import sample_next
from lorafit.model import KVCache, LLaMA
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


class Engine:
    """The decode loop: a background thread that runs until stop(), batching up to max_batch requests."""

    def __init__(
        self,
        model: LLaMA,
        adapters: AdapterStore,
        max_batch: int,
        max_length: int,
        on_step: Callable[[int, int], None] | None = None,
    ) -> None:
        self.model, self.adapters = model, adapters
        self.max_batch, self.max_length = max_batch, max_length
        self.on_step = on_step  # (running rows, waiting requests) after each step, for metrics
        self.device = model.embed_tokens.weight.device
        param = model.embed_tokens.weight
        self.caches = [
            KVCache(max_batch, b.self_attn.n_kv_head, max_length, b.self_attn.head_dim, param.dtype, param.device)
            for b in model.layers
        ]
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.wake = threading.Condition()
        self.stopping = False
        self.peak_occupancy = 0  # the most rows one step has decoded together
        self.thread = threading.Thread(target=self._loop, name="lorafit-decode", daemon=True)

    def start(self) -> None:
        """Start the decode thread."""
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
        with torch.inference_mode():
            while True:
                with self.wake:
                    while not self.stopping and not self.waiting and not self.running:
                        self.wake.wait()
                    if self.stopping:
                        break
                    # One prefill per step while others decode, so none of them waits longer than that;
                    # an idle batch takes every waiting request at once.
                    room = min(self.max_batch - len(self.running), 1 if self.running else self.max_batch)
                    admitted = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
                try:
                    with self.adapters.lock:
                        for request in admitted:
                            self._prefill(request)
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

    def _use_rows(self, first: int, last: int, slots: list[int]) -> None:
        for block, cache in zip(self.model.layers, self.caches, strict=True):
            block.self_attn.kv_cache = cache.rows(first, last)
        self.adapters.batch.set(torch.tensor(slots, dtype=torch.long, device=self.device))

    def _prefill(self, request: Request) -> None:
        """Run the prompt into the next free cache row and emit the first token."""
        if request.cancelled:
            self._finish(request, "cancelled")
            return
        row = len(self.running)
        self._use_rows(row, row + 1, [request.slot])
        prompt = torch.tensor([request.prompt], dtype=torch.long, device=self.device)
        hidden = self.model.hidden_states(prompt, 0)
        logits = self.model.lm_head(hidden[:, -1])
        request.position = len(request.prompt)
        self.running.append(request)
        self._take(request, self._sample(request, logits[0]))

    def _decode_step(self) -> None:
        n = len(self.running)
        self.peak_occupancy = max(self.peak_occupancy, n)
        self._use_rows(0, n, [r.slot for r in self.running])
        tokens = torch.tensor([[r.next_token] for r in self.running], dtype=torch.long, device=self.device)
        positions = torch.tensor([r.position for r in self.running], dtype=torch.long, device=self.device)
        logits = self.model(tokens, positions)[:, -1]
        greedy = logits.argmax(dim=-1).tolist()
        for i, request in enumerate(self.running):
            request.position += 1
            token = greedy[i] if request.generator is None else self._sample(request, logits[i])
            self._take(request, token)

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
                for cache in self.caches:
                    cache.k[row, :, :end] = cache.k[last, :, :end]
                    cache.v[row, :, :end] = cache.v[last, :, :end]
                self.running[row] = self.running[last]
            self.running.pop()
