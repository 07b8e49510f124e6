"""LLaMA-Adapter (Zhang et al., 2023): learned prompt tokens behind a zero-initialised gate; v2 adds more.

v1: every layer from `start_layer` on gets `prompt_length` learned prompt vectors. They go through
that layer's frozen k_proj/v_proj (no RoPE: the prompt has no position), the queries attend to them
in a softmax of their own, and the result, times a per-head gate that starts at zero, is added to
the ordinary attention output. At initialisation the model is therefore exactly the base model.

v2 (Gao et al., 2023) adds, as lit-llama does: a bias and a scale on the output of every linear
layer, the LM head included (y = scale * (W x + bias), starting at scale 1, bias 0), and trainable
RMSNorm weights (every norm, the final one too).

This module holds the layers; lorafit/methods/llama_adapter.py holds the methods (v1, v2) and their
files. PEFT's adaption_prompt differs (other names, a tanh gate, fewer pieces), so the files are
lorafit's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorafit.config import Config
from lorafit.model import LLaMA, RMSNorm
from lorafit.ops import is_plain_linear, keep_product


@dataclass
class AdapterConfig:
    """LLaMA-Adapter hyperparameters (shared by v1 and v2)."""

    prompt_length: int = 10
    """Learned prompt tokens per adapted layer."""
    start_layer: int = 2
    """The first layer that gets a prompt; the layers below it see none."""

    def __post_init__(self) -> None:
        if self.prompt_length < 1:
            raise ValueError(f"adapter prompt_length must be at least 1, got {self.prompt_length}")
        if self.start_layer < 0:
            raise ValueError(f"adapter start_layer must be >= 0, got {self.start_layer}")


class PromptAdapter(nn.Module):
    """One layer's learned prompt and per-head gate; called by CausalSelfAttention with its queries."""

    def __init__(
        self, prompt_length: int, config: Config, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.n_kv_head, self.head_dim = config.n_kv_head, config.head_dim
        self.prompt = nn.Embedding(prompt_length, config.n_embd, device=device, dtype=dtype)
        # Zero: the prompt contributes nothing until training opens the gate.
        self.gate = nn.Parameter(torch.zeros(config.n_head, device=device, dtype=dtype))
        # (weight versions, (keys, values)) of the prompt, reused while no weight changes (decoding).
        self._cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward(self, q: torch.Tensor, k_proj: nn.Module, v_proj: nn.Module) -> torch.Tensor:
        """Gated attention of queries q (B, n_head, T, head_dim) over the prompt; same shape out."""
        k, v = self.prompt_kv(k_proj, v_proj)
        B = q.size(0)
        k, v = k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)
        # Every query sees every prompt token: no mask, and a softmax separate from the sequence's.
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=k.size(1) != q.size(1))
        return y * self.gate.view(1, -1, 1, 1).to(y.dtype)

    def prompt_kv(self, k_proj: nn.Module, v_proj: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt's keys and values (1, n_kv_head, prompt_length, head_dim), cached when no gradient is taken."""
        if torch.is_grad_enabled():
            self._cache = None
            return self._project(k_proj, v_proj)
        # Any in-place update (optimizer step, load, merge) bumps a version; .to()/.data swaps change the pointer.
        params = chain(self.prompt.parameters(), k_proj.parameters(), v_proj.parameters())
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in params)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._project(k_proj, v_proj))
        return self._cache[1]

    def _project(self, k_proj: nn.Module, v_proj: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        prompt = self.prompt.weight.unsqueeze(0)  # (1, L, n_embd)
        shape = (1, prompt.size(1), self.n_kv_head, self.head_dim)
        return k_proj(prompt).view(shape).transpose(1, 2), v_proj(prompt).view(shape).transpose(1, 2)

    def train(self, mode: bool = True) -> PromptAdapter:
        self._cache = None  # a cache made in one mode is never reused in the other
        return super().train(mode)


class AdapterV2Linear(nn.Linear):
    """A frozen nn.Linear whose output gets a trainable scale and bias: scale * (W x + bias)."""

    product = staticmethod(F.linear)
    """W x + b; use_decode_kernels gives a decoding model ops.linear instead."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.adapter_bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        self.adapter_scale = nn.Parameter(torch.ones(out_features, device=device, dtype=dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> AdapterV2Linear:
        """Wrap an existing layer, sharing (not copying) its weight."""
        weight = linear.weight
        # Built on meta so the base weight is not allocated a second time; the new vectors are then made for real.
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta", dtype=weight.dtype)
        layer.weight, layer.bias = weight, linear.bias
        layer.adapter_bias = nn.Parameter(torch.zeros(linear.out_features, device=weight.device, dtype=weight.dtype))
        layer.adapter_scale = nn.Parameter(torch.ones(linear.out_features, device=weight.device, dtype=weight.dtype))
        keep_product(linear, layer)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter_scale * (self.product(x, self.weight, self.bias) + self.adapter_bias)

    @torch.no_grad()
    def fold_scale(self) -> None:
        """Move the scale into W's rows (and the bias): scale * (W x + b) = (scale W) x + scale b; scale becomes 1."""
        self.weight.mul_(self.adapter_scale.to(self.weight.dtype)[:, None])
        if self.bias is not None:
            self.bias.mul_(self.adapter_scale.to(self.bias.dtype))
        self.adapter_bias.mul_(self.adapter_scale)
        self.adapter_scale.fill_(1.0)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def apply_adapter(model: LLaMA, config: AdapterConfig, v2: bool = False) -> int:
    """Add LLaMA-Adapter (v1, or v2 with v2=True) in place, freeze the rest; return the trainable count."""
    n_layer = len(model.layers)
    if config.start_layer >= n_layer:
        raise ValueError(f"adapter start_layer {config.start_layer} leaves no layer to adapt (the model has {n_layer})")
    if any(block.self_attn.adapter is not None for block in model.layers):
        raise ValueError("the model already has a LLaMA-Adapter")
    weight = model.embed_tokens.weight
    for block in model.layers[config.start_layer :]:
        block.self_attn.adapter = PromptAdapter(config.prompt_length, model.config, weight.device, weight.dtype)
    if v2:
        linears = [(n, m) for n, m in model.named_modules() if is_plain_linear(m)]
        for name, linear in linears:
            _replace(model, name, AdapterV2Linear.from_linear(linear))
    for p in model.parameters():
        p.requires_grad_(False)
    for p in adapter_parameters(model).values():
        p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter's trainable parameters by name: prompts and gates; with v2 also every linear's bias and
    scale and every RMSNorm weight (a model with no AdapterV2Linear is v1, whose norms stay frozen)."""
    v2 = any(isinstance(m, AdapterV2Linear) for m in model.modules())
    params = {}
    for module_name, module in model.named_modules():
        prefix = module_name + "." if module_name else ""
        if isinstance(module, PromptAdapter):
            names = ("prompt.weight", "gate")
        elif isinstance(module, AdapterV2Linear):
            names = ("adapter_bias", "adapter_scale")
        elif v2 and isinstance(module, RMSNorm):
            names = ("weight",)
        else:
            continue
        for name in names:
            params[prefix + name] = module.get_parameter(name)
    return params


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter's tensors, under lorafit's names (e.g. layers.2.self_attn.adapter.gate)."""
    return {name: p.detach() for name, p in adapter_parameters(model).items()}


def fold_scales(model: LLaMA) -> list[str]:
    """Fold every v2 scale into its layer's weight; returns the layers left alone because their weight is
    shared (a tied LM head: folding would change the embedding too)."""
    skipped = []
    for name, module in model.named_modules():
        if isinstance(module, AdapterV2Linear):
            if module.weight is model.embed_tokens.weight:
                skipped.append(name)
            else:
                module.fold_scale()
    return skipped


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors without the adapter's own (prompts, gates, v2 biases and scales): what a
    Hugging Face Llama checkpoint can hold. v2's trained norm weights are ordinary weights and stay."""

    def own(name: str) -> bool:
        return ".adapter." in name or name.endswith((".adapter_bias", ".adapter_scale"))

    return {n: t for n, t in model.state_dict().items() if not own(n)}
