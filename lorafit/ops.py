"""Kernels the model's plain PyTorch form leaves slow: two elementwise pieces as autograd functions that keep
only what backward needs, the LM head fused with the loss, and linears for the few rows of a decode step.

In a LoRA run the frozen linear layers save nothing for backward, so elementwise leftovers are a
large share of the activation memory. Plain autograd keeps gate, silu(gate) and up for
`silu(gate) * up`, and the normalised value for `weight * normed` when the norm's weight trains
(full finetuning, LLaMA-Adapter v2). These functions save their inputs only and recompute the rest
(a few cheap elementwise passes) in backward: per layer and token of SmolLM2-135M, 1536 floats
fewer for SwiGLU and 2 x 576 for the norms when they train. tests/test_ops.py checks values and
gradients against the plain expressions.

Decoding multiplies one token (or a few, one per request) by every weight, so it is bound by reading the
weights. PyTorch's CPU path for that, MKL's matrix-vector product, runs on one thread and reads float32
weights at about 12 GB/s on the AMD EPYC we measure on, a third of the 34 GB/s two threads can read. The
same product written as a batch over slices of the weight's rows (torch.bmm) is spread over the threads:
about 30 GB/s on 2 threads for 1 to 2 rows and still ahead up to 64 (benchmarks/generate.py has the end-to-end
figures). `linear` picks it for the few-row float32 products of inference; training's products have thousands
of rows. bf16 weights take F.linear, for one or two rows without oneDNN (see ONEDNN_MIN_ROWS).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_normed = (grad * weight).float()
            # d/dx of x * rstd(x): rstd * (g - normed * mean(g * normed)).
            grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(x.dtype)).reshape(-1, x.size(-1)).sum(0).to(weight.dtype)
        return grad_x, grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x), the normalisation in float32 (as Llama does).

    With a frozen weight autograd keeps only x and 1/rms already, and PyTorch's fused kernel is one pass
    instead of five; the function that saves less is used where the weight trains.
    """
    if torch.is_grad_enabled() and weight.requires_grad:
        return _RMSNorm.apply(x, weight, eps)
    if x.dtype == weight.dtype == torch.float32:
        # The same products in the same order, one operation fewer (a decoded token runs 61 norms).
        return F.rms_norm(x, (x.size(-1),), weight, eps)
    return weight * F.rms_norm(x.float(), (x.size(-1),), eps=eps).to(x.dtype)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        # PyTorch's fused silu backward: one pass, as autograd's own SiluBackward.
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return grad_gate, grad * F.silu(gate)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, saving gate and up only (silu(gate) is recomputed in backward)."""
    if not torch.is_grad_enabled() or not (gate.requires_grad or up.requires_grad):
        return F.silu(gate) * up
    return _SwiGLU.apply(gate, up)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.size(0), chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = F.linear(h, weight).float()
            log_normaliser = logits.logsumexp(-1, keepdim=True)
            total += (log_normaliser.squeeze(-1) - logits.gather(-1, t[:, None]).squeeze(-1)).sum()
            # d(loss)/d(logits) = softmax - one_hot(target), built in place of the logits.
            grad_logits = logits.sub_(log_normaliser).exp_()
            grad_logits[torch.arange(len(t), device=t.device), t] -= 1
            grad_logits = grad_logits.to(h.dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad.to(g.dtype)  # noqa: E731
        return scale(grad_hidden), scale(grad_weight), None, None


def linear_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 128
) -> torch.Tensor:
    """Summed cross-entropy of the logits hidden @ weight.T (N, vocab) against targets (N,), chunk rows at a time.

    The gradients are formed during the forward pass, one chunk at a time, and kept (hidden's size, and
    the weight's if it trains): no float32 (N, vocab) logits ever exist, and backward recomputes nothing.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.size(0), chunk):
        logits = F.linear(hidden[start : start + chunk], weight).float()
        total += F.cross_entropy(logits, targets[start : start + chunk], reduction="sum")
    return total


SPLIT_ROWS = 64
"""Up to this many rows a float32 product on the CPU is split over row slices of the weight (measured faster)."""


ONEDNN_MIN_ROWS = 3
"""Below this many rows a bf16 product on the CPU skips oneDNN: PyTorch's own kernel streams the weight faster.

Measured on the 2-core AMD EPYC (avx512_bf16), 120 Llama-block weights read cold: 1 row 29.6 against 14.4 GB/s
through oneDNN, 2 rows 18.5 against 13.9; from 4 rows oneDNN is ahead (9.7 against 12.7). Same values.
"""


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); without autograd, the few rows of decoding on the CPU take a faster kernel:
    float32 goes through row slices in parallel, one or two bf16 rows through PyTorch's kernel instead of oneDNN's.
    """
    parts = max(2, torch.get_num_threads())
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    decoding = 0 < rows and not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == weight.dtype
    if decoding and rows < ONEDNN_MIN_ROWS and x.dtype == torch.bfloat16:
        return _linear_without_onednn(x, weight, bias)
    fast = (
        decoding
        and rows <= SPLIT_ROWS
        and bias is None
        and x.dtype == torch.float32
        and weight.shape[0] % parts == 0
        and weight.is_contiguous()
    )
    if not fast:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    # (parts, out / parts, in) @ (in, rows): each slice of output features is one matrix product of the batch.
    out = torch.bmm(weight.view(parts, -1, weight.shape[1]), flat.t().expand(parts, -1, -1))
    # Back to (rows, out) in memory too: later ops on the transposed view were 2-3x slower at 8-32 rows.
    return out.view(weight.shape[0], rows).t().contiguous().view(*x.shape[:-1], weight.shape[0])


def _linear_without_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) with PyTorch's oneDNN (mkldnn) kernels switched off for the call.

    The switch is the process's (torch.backends.mkldnn.enabled): a product another thread runs meanwhile takes
    PyTorch's kernel too, with the same values. Decoding runs on one thread (a server's decode loop).
    """
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        return F.linear(x, weight, bias)
    finally:
        torch.backends.mkldnn.enabled = enabled


class DecodeLinear(torch.nn.Linear):
    """An nn.Linear that computes through `linear`; use_decode_kernels puts it in a decoding model's place."""

    product = staticmethod(linear)
    joined: JoinedWeights | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x, self.weight, self.bias)

    @staticmethod
    def joined_product(layers: Sequence[DecodeLinear], weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """x times the joined weight of `layers` (join_linears)."""
        return partial(linear, weight=weight)

    @classmethod
    def wrap(cls, plain: torch.nn.Linear) -> DecodeLinear:
        """The same layer, sharing (not copying) its weight and bias."""
        layer = cls(plain.in_features, plain.out_features, bias=False, device="meta")
        layer.weight, layer.bias = plain.weight, plain.bias
        return layer


@dataclass(frozen=True)
class JoinedWeights:
    """Several layers' weights as the row blocks of one tensor (join_linears), so `project` does one product.

    `product(x)` multiplies by all of them at once, with the layers' own kernel. `pointers` are the members'
    weights' addresses when joined: a member whose weight was replaced since (a LoRA merge, .to(), loading) no
    longer matches, and `project` computes the layers one by one again.
    """

    product: Callable[[torch.Tensor], torch.Tensor]
    sizes: tuple[int, ...]
    pointers: tuple[int, ...]


def is_plain_linear(module: torch.nn.Module) -> bool:
    """Whether `module` is a linear layer with nothing added to it (decoding kernels aside)."""
    return type(module) in (torch.nn.Linear, DecodeLinear)


def decode_weight(layer: torch.nn.Module) -> torch.Tensor | None:
    """The tensor a decode step streams for `layer`: a linear layer's weight (a LoRA layer's frozen base too), or
    what another layer offers as its `decode_weight` (an int8 QuantizedLinear's codes); None if there is none."""
    if isinstance(layer, torch.nn.Linear):
        return layer.weight if isinstance(layer.weight, torch.Tensor) else None
    return getattr(layer, "decode_weight", None)


def joinable(layers: Sequence[torch.nn.Module]) -> bool:
    """Whether join_linears can store these layers' weights (decode_weight) as one tensor. Several layers must be
    of one type that can compute them as one product (`joined_product`: DecodeLinear, int8 QuantizedLinear),
    without bias, their weights sharing dtype, device and input width; a single layer only needs a decode_weight."""
    weights = [decode_weight(layer) for layer in layers]
    if not layers or any(w is None for w in weights):
        return False
    if len(layers) > 1:
        kind = type(layers[0])
        if not hasattr(kind, "joined_product") or any(type(x) is not kind or x.bias is not None for x in layers):
            return False
    return len({(w.dtype, w.device, w.shape[1]) for w in weights}) == 1 and not weights[0].is_meta


def join_linears(layers: Sequence[torch.nn.Module], joined: torch.Tensor) -> None:
    """Make the decode weights of layers that read the same input views of `joined`, which holds them as row
    blocks in the layers' order (runtime.pack_decode_weights copies them there).

    Each linear layer keeps its own weight parameter (same name, values, requires_grad, and any tying, as a tied
    LM head's); other layers take the view through `place_decode_weight`. For several layers the first records
    the join for `project`. The layers must be `joinable`.
    """
    views = joined.split([decode_weight(layer).shape[0] for layer in layers])
    for layer, view in zip(layers, views, strict=True):
        if isinstance(layer, torch.nn.Linear):
            layer.weight.data = view  # the same Parameter: a tied embedding follows the LM head
        else:
            layer.place_decode_weight(view)
    if len(layers) > 1:
        product = type(layers[0]).joined_product(layers, joined)
        layers[0].joined = JoinedWeights(product, tuple(len(v) for v in views), tuple(v.data_ptr() for v in views))


def project(x: torch.Tensor, layers: Sequence[torch.nn.Module]) -> list[torch.Tensor]:
    """[layer(x) for layer in layers], as one product over their joined weight when join_linears joined them.

    Decoding on the CPU pays a fixed cost per product (a parallel region, a few small tensor operations), and
    the query, key and value projections are small: one product for all three, and one for the MLP's gate and
    up, take 5 of a Llama block's 7 products down to 2 (tests/test_ops.py checks the values). Only without
    autograd: the layers' own parameters are what training sees.
    """
    joined = getattr(layers[0], "joined", None)
    if (
        joined is None
        or torch.is_grad_enabled()
        or any(type(layer) is not type(layers[0]) for layer in layers)
        or tuple(decode_weight(layer).data_ptr() for layer in layers) != joined.pointers
    ):
        return [layer(x) for layer in layers]
    return list(joined.product(x).split(joined.sizes, dim=-1))


def keep_product(source: torch.nn.Module, wrapper: torch.nn.Module) -> None:
    """A layer that wraps `source` computes W x + b as source did (ops.linear once use_decode_kernels set it)."""
    if getattr(source, "product", None) is linear:
        wrapper.product = linear
