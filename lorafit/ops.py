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
    """weight * x / rms(x), the normalisation in float32 (as Llama does); saves x and 1/rms for backward."""
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad):
        # Inference: PyTorch's fused kernel is one pass instead of five (this runs twice per layer per token).
        return weight * F.rms_norm(x.float(), (x.size(-1),), eps=eps).to(x.dtype)
    return _RMSNorm.apply(x, weight, eps)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        sigmoid = torch.sigmoid(gate)
        silu = gate * sigmoid
        # silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g))).
        grad_gate = grad * up * sigmoid * (1 + gate * (1 - sigmoid))
        return grad_gate, grad * silu


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, saving gate and up only (silu(gate) is recomputed in backward)."""
    if not torch.is_grad_enabled() or not (gate.requires_grad or up.requires_grad):
        return F.silu(gate) * up
    return _SwiGLU.apply(gate, up)
