"""How much memory a finetuning run needs, before running it.

Activations are not modelled by hand: `estimate_memory` builds the real model (lorafit.model.LLaMA with
the method applied) out of fake tensors, which carry shapes and dtypes but no data, runs one training
step's loss (train.supervised_loss_sum, under the run's precision and activation checkpointing), and
adds up the distinct storages autograd saves for backward (`SavedTensors`). Whatever the model, its
lean autograd functions (lorafit/ops.py, LoRALinear), the method's knobs (LoRA targets, rank and
dropout, the adapter's prompt length and first layer) or autocast save, the estimate sees. The labels
have no values, so the number of supervised positions is given (`supervised_fraction`). All 32 blocks of
a 7B model trace in 1-4 seconds on a CPU, allocating nothing.

Kept by hand, because they happen outside the traced forward pass:
- Gradients and AdamW's exp_avg and exp_avg_sq: one tensor each per trainable parameter, in its dtype.
- AdamW's scratch: none on CUDA (fused), two temporaries of the largest trainable tensor on the CPU
  (it steps one tensor at a time).
- Workspace on top of the saved tensors: one LM-head chunk's logits and their gradients, the head's
  weight gradient, and the top block's backward (with checkpointing, one block's activations recomputed).
The peak is the larger of two moments of a steady-state step (optimizer state already exists): the start
of backward, when every saved activation is alive plus the workspace, and the end of backward / optimizer
step, when every gradient is alive. Between the two, saved activations are freed about as fast as
gradients appear, so live memory peaks at an end.

The trace makes PyTorch's CPU choices (CPU autocast's op list under bf16-mixed): attention through the
fused SDPA kernel saves q, k, v, its output and a float32 logsumexp, as the CUDA flash and
memory-efficient kernels do, never the T x T probabilities. Not modelled: the CUDA context, the caching
allocator's fragmentation and rounding, cuBLAS workspaces, the data loader; a GPU run's reported
reserved memory is that much higher.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch._subclasses import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from lorafit.config import Config
from lorafit.methods import Method, get_method
from lorafit.model import LLaMA
from lorafit.runtime import PRECISIONS, autocast, weights_dtype
from lorafit.train import LOSS_CHUNK, supervised_loss_sum

GIB = 1024**3


@dataclass
class MemoryEstimate:
    """Estimated peak memory of one training step, in bytes, by what holds it."""

    method: str
    precision: str
    micro_batch_size: int
    max_seq_length: int
    trainable_params: int
    total_params: int
    weights: int
    """All parameters in their storage dtype, plus the rotary tables."""
    gradients: int
    optimizer: int
    """AdamW's exp_avg and exp_avg_sq, in the parameters' dtype (PyTorch's zeros_like(param))."""
    activations: int
    """Tensors saved for backward at the end of the forward pass, and the batch (bf16-mixed: with autocast's
    weight copies)."""
    workspace: int
    """Short-lived buffers on top of the activations at their peak: the loss head's gradients, one layer's backward."""
    total: int
    """Peak: weights + optimizer + max(activations + workspace, gradients + optimizer-step scratch)."""
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        """The estimate as a Markdown table in GiB."""
        rows = [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer state (AdamW)", self.optimizer),
            ("activations", self.activations),
            ("workspace", self.workspace),
            ("**peak total**", self.total),
        ]
        lines = ["| memory | GiB |", "|---|---:|"]
        lines += [f"| {name} | {nbytes / GIB:.2f} |" for name, nbytes in rows]
        return "\n".join(lines)


def linear_shapes(config: Config) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer in a block, by lorafit.lora target name."""
    d, inter = config.n_embd, config.intermediate_size
    q_dim, kv_dim = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    return {
        "q": (d, q_dim),
        "k": (d, kv_dim),
        "v": (d, kv_dim),
        "o": (q_dim, d),
        "gate": (d, inter),
        "up": (d, inter),
        "down": (inter, d),
    }


def _storage_key(t: torch.Tensor) -> int:
    # The address of the storage object itself: fake and meta tensors have no data pointer to tell them apart.
    return t.untyped_storage()._cdata


class SavedTensors:
    """While active (a context manager), the distinct storages autograd saves for backward, each counted once.

    A tensor saved by several ops, or views of one storage, count once. `label` tags the storages first
    saved while it is set (estimate_memory sets it to the running block).
    """

    def __init__(self) -> None:
        self.storages: dict[int, torch.UntypedStorage] = {}
        self.labels: dict[int, object] = {}
        self.label: object = None
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.add, lambda t: t)

    def add(self, t: torch.Tensor) -> torch.Tensor:
        """Record t's storage (also for tensors the caller holds beside autograd, such as the batch)."""
        key = _storage_key(t)
        if key not in self.storages:
            self.storages[key] = t.untyped_storage()  # kept alive, so no later storage can reuse its address
            self.labels[key] = self.label
        return t

    def __enter__(self) -> SavedTensors:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    def nbytes(self, exclude: Iterable[torch.Tensor] = ()) -> int:
        """Bytes of the recorded storages, less those behind `exclude` (parameters, persistent tables)."""
        return sum(self.nbytes_by_label(exclude).values())

    def nbytes_by_label(self, exclude: Iterable[torch.Tensor] = ()) -> dict[object, int]:
        """nbytes split by the label each storage was first saved under."""
        skip = {_storage_key(t) for t in exclude}
        totals: dict[object, int] = {}
        for key, storage in self.storages.items():
            if key not in skip:
                totals[self.labels[key]] = totals.get(self.labels[key], 0) + storage.nbytes()
        return totals


def build_model(
    config: Config, method: str | Method, method_config: Any = None, dtype: torch.dtype = torch.float32
) -> LLaMA:
    """The model on the meta device (no memory), in `dtype`, with the method applied as finetune does."""
    method = get_method(method)
    with torch.device("meta"):
        model = LLaMA(config).to(dtype)
    method.apply(model, method.default_config() if method_config is None else method_config)
    return model


def count_parameters(config: Config, method: str | Method, method_config: Any = None) -> tuple[int, int, int]:
    """(trainable, total, largest trainable tensor) parameter counts for a method, computed exactly."""
    params = list(build_model(config, method, method_config).parameters())  # tied weights appear once
    trainable = [p.numel() for p in params if p.requires_grad]
    return sum(trainable), sum(p.numel() for p in params), max(trainable, default=0)


def _fake_parameters(model: nn.Module) -> None:
    """Replace every meta parameter and buffer by a fake CPU tensor (call under a FakeTensorMode); ties kept.

    Fake CPU tensors, unlike meta ones, go through CPU autocast and pick the CPU kernels (e.g. SDPA's).
    """
    fakes: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in fakes:
            fakes[id(t)] = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")
        return fakes[id(t)]

    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = nn.Parameter(fake(p), requires_grad=p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = fake(b)


class _SupervisedRows(TorchDispatchMode):
    """Gives boolean-mask indexing by the supervised-position mask (batch, seq - 1) a known number of rows.

    How many positions the loss keeps depends on the labels' values, which fake tensors do not have; the
    estimate is asked for that number (the supervised fraction) instead.
    """

    def __init__(self, mask_shape: tuple[int, int], rows: int) -> None:
        super().__init__()
        self.mask_shape, self.rows = mask_shape, rows

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func is torch.ops.aten.index.Tensor:
            source, indices = args
            mask = indices[0] if len(indices) == 1 else None
            if mask is not None and mask.dtype == torch.bool and tuple(mask.shape) == self.mask_shape:
                return source.new_empty((self.rows, *source.shape[mask.ndim :]))
        return func(*args, **(kwargs or {}))


@dataclass
class _Trace:
    """What one traced training step saved, and what the arithmetic by hand needs from the traced model."""

    activations: int
    """Saved for backward, and the batch, less parameters and the rotary tables."""
    per_block: list[int]
    """Saved bytes first saved inside each block (a trace without activation checkpointing)."""
    fused_head: bool
    """Whether the loss took ops.linear_cross_entropy_sum's path (gradients formed in the forward pass)."""
    model: LLaMA
    rope_bytes: int


def _graph_names(root: torch.Tensor) -> set[str]:
    """The names of the backward nodes reachable from root's grad_fn."""
    names, seen, todo = set(), set(), [root.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        todo.extend(next_node for next_node, _ in node.next_functions)
    return names


def _trace_step(
    model: LLaMA, fused_head: bool, batch: int, seq: int, precision: str, rows: int, activation_checkpointing: bool
) -> _Trace:
    """Run supervised_loss_sum once on fake tensors, recording what autograd saves; `model` is made fake in place."""
    with FakeTensorMode():
        _fake_parameters(model)
        model.train()
        model.activation_checkpointing = activation_checkpointing
        input_ids = torch.zeros((batch, seq), dtype=torch.long)
        labels = torch.zeros((batch, seq), dtype=torch.long)
        saved = SavedTensors()
        saved.add(input_ids)  # the loop holds the batch through the step
        saved.add(labels)
        hooks = [
            block.register_forward_pre_hook(lambda _, __, i=i: setattr(saved, "label", i))
            for i, block in enumerate(model.layers)
        ]
        hooks.append(model.norm.register_forward_pre_hook(lambda *_: setattr(saved, "label", None)))
        try:
            with _SupervisedRows((batch, seq - 1), rows), saved, autocast(precision, torch.device("cpu")):
                loss = supervised_loss_sum(model, input_ids, labels, fused_head)
        finally:
            for hook in hooks:
                hook.remove()
        rope = list(model._rope)
        persistent = [*model.parameters(), *model.buffers(), *rope]
        by_block = saved.nbytes_by_label(persistent)
        fused = any("LinearCrossEntropy" in name for name in _graph_names(loss)) if loss.requires_grad else False
        return _Trace(
            activations=saved.nbytes(persistent),
            per_block=[by_block.get(i, 0) for i in range(len(model.layers))],
            fused_head=fused,
            model=model,
            rope_bytes=sum(t.untyped_storage().nbytes() for t in rope),
        )


def estimate_memory(
    config: Config,
    method: str | Method,
    micro_batch_size: int,
    max_seq_length: int,
    precision: str,
    method_config: Any = None,
    activation_checkpointing: bool = False,
    supervised_fraction: float = 1.0,
    device: str = "cuda",
) -> MemoryEstimate:
    """Estimated peak memory of a steady-state training step of lorafit's loop (train.py) on `device`."""
    if not 0.0 <= supervised_fraction <= 1.0:
        raise ValueError(f"supervised_fraction must be between 0 and 1; got {supervised_fraction}")
    if micro_batch_size < 1 or max_seq_length < 2:
        raise ValueError(
            f"micro_batch_size must be >= 1 and max_seq_length >= 2; got {micro_batch_size}, {max_seq_length}"
        )
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu'; got {device!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    method = get_method(method)
    method_config = method.default_config() if method_config is None else method_config
    fused_head = method.fused_head(method_config)
    dtype = weights_dtype(precision)
    # Next-token targets exist for T - 1 positions per row; only the supervised ones reach the head.
    rows = round(supervised_fraction * micro_batch_size * (max_seq_length - 1))
    shape = (micro_batch_size, max_seq_length, precision, rows)

    def trace(checkpointing: bool) -> _Trace:
        model = build_model(config, method, method_config, dtype)
        method.store_for_training(model, method_config, precision)
        return _trace_step(model, fused_head, *shape, checkpointing)

    plain = trace(False)
    traced = trace(True) if activation_checkpointing else plain

    params = list(plain.model.parameters())  # tied weights appear once
    trainable = [p for p in params if p.requires_grad]
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainable)
    weights = method.stored_weight_bytes(plain.model, method_config) + plain.rope_bytes
    gradients = trainable_bytes
    optimizer = 2 * trainable_bytes

    # Workspace on top of the saved tensors: one chunk's logits (in the linear dtype and float32) and their
    # gradient, or for a recomputed chunk its logits, log-probabilities and their two float32 gradients;
    # then the LM head's weight gradient if it trains; and the top block's backward (three
    # intermediate-sized gradients plus the residual's).
    lin = 4 if precision == "32-true" else 2  # bytes of a linear layer's output (autocast's bf16 or the weights')
    tokens, vocab = micro_batch_size * max_seq_length, config.vocab_size
    head = plain.model.lm_head.weight
    head_grad = head.numel() * head.element_size() if head.requires_grad else 0
    loss_phase = (8 + 2 * lin if plain.fused_head else 16) * min(rows, LOSS_CHUNK) * vocab
    head_phase = head_grad + rows * config.n_embd * lin
    layer_phase = head_grad + 3 * tokens * config.intermediate_size * lin + tokens * config.n_embd * 4
    if activation_checkpointing:
        layer_phase += max(plain.per_block)  # one block's activations, recomputed
    workspace = max(loss_phase, head_phase, layer_phase) + method.workspace_bytes(plain.model, method_config)
    # AdamW on the CPU steps tensor by tensor; sqrt(v) / bias_correction makes two temporaries of the largest.
    largest = max((p.numel() * p.element_size() for p in trainable), default=0)
    step_scratch = 0 if device == "cuda" else 2 * largest
    activations = traced.activations
    total = weights + optimizer + max(activations + workspace, gradients + step_scratch)
    notes = [
        "activations traced from one step of the model on fake tensors (CPU kernels; fused SDPA, no T x T matrix)",
        f"AdamW {'fused (CUDA)' if device == 'cuda' else 'single-tensor (CPU)'}; state in the parameters' dtype",
        "excludes the CUDA context (~0.5 GiB) and the caching allocator's fragmentation",
    ]
    return MemoryEstimate(
        method=method.name,
        precision=precision,
        micro_batch_size=micro_batch_size,
        max_seq_length=max_seq_length,
        trainable_params=sum(p.numel() for p in trainable),
        total_params=sum(p.numel() for p in params),
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations,
        workspace=workspace,
        total=total,
        notes=notes,
    )


def format_estimate(
    config: Config,
    method: str | Method,
    micro_batch_size: int,
    max_seq_length: int,
    precision: str,
    method_config: Any = None,
    activation_checkpointing: bool = False,
    supervised_fraction: float = 1.0,
    device: str = "cuda",
) -> str:
    """A printable report: what was estimated, the table, and what the estimate leaves out."""
    method = get_method(method)
    method_config = method.default_config() if method_config is None else method_config
    est = estimate_memory(
        config,
        method,
        micro_batch_size,
        max_seq_length,
        precision,
        method_config,
        activation_checkpointing,
        supervised_fraction,
        device,
    )
    what = f"{config.name}, {method.name}" + (
        f" ({method.describe(method_config)})" if method.describe(method_config) else ""
    )
    header = (
        f"Memory estimate: {what}; micro-batch {micro_batch_size} x {max_seq_length} tokens, {precision}"
        + (", activation checkpointing" if activation_checkpointing else "")
        + f" ({device})\n"
        f"trainable parameters: {est.trainable_params:,} of {est.total_params:,} "
        f"({100 * est.trainable_params / est.total_params:.3f}%)\n"
    )
    return header + est.table() + "\n" + "".join(f"- {note}\n" for note in est.notes)


def config_for(spec: str | None) -> Config:
    """The Config of a checkpoint path (directory, .gguf, ...), a known model name, or a Hugging Face repo id (only
    its config.json is fetched): the weights are never needed."""
    from lorafit.checkpoint import load_config
    from lorafit.hub import DEFAULT_MODEL, HubError, hf_cache_dir, is_repo_id

    if spec is not None and Path(spec).exists():
        return load_config(spec)
    try:
        return Config.from_name(spec or DEFAULT_MODEL)
    except ValueError as err:
        if not (spec and is_repo_id(spec)):
            raise ValueError(f"--checkpoint: {err}; or give a checkpoint path or a Hugging Face repo id") from err
    import huggingface_hub

    try:
        path = huggingface_hub.hf_hub_download(spec, "config.json", cache_dir=hf_cache_dir())
        return Config.from_hf(path, name=spec.split("/")[1])
    except Exception as err:  # offline, gated, no such repo: huggingface_hub's many error types
        raise HubError(f"--checkpoint {spec}: could not fetch its config.json from Hugging Face ({err})") from err
