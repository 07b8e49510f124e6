"""Two of the model's elementwise pieces as autograd functions that keep only what backward needs.

In a LoRA run the frozen linear layers save nothing for backward, so elementwise leftovers are a
large share of the activation memory. Plain autograd keeps gate, silu(gate) and up for
`silu(gate) * up`, and the normalised value for `weight * normed` when the norm's weight trains
(full finetuning, LLaMA-Adapter v2). These functions save their inputs only and recompute the rest
(a few cheap elementwise passes) in backward: per layer and token of SmolLM2-135M, 1536 floats
fewer for SwiGLU and 2 x 576 for the norms when they train. tests/test_ops.py checks values and
gradients against the plain expressions.
"""

from __future__ import annotations

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
