"""LoRA (Hu et al., 2021): h = W x + (alpha / r) · B A x, with W frozen and only A, B trained.

Adapters are saved and loaded in PEFT's format (adapter_model.safetensors + adapter_config.json),
so `peft.PeftModel.from_pretrained` reads ours and we read PEFT's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorafit.checkpoint import read_safetensors
from lorafit.io import save_safetensors, write_atomically, write_json
from lorafit.ops import is_plain_linear, keep_product
from lorafit.quant import QuantizedLinear

# Short target names -> the module names in the model (Hugging Face's, so they also name PEFT's target_modules).
TARGETS = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
    "lm_head": "lm_head",
}
# "all" means every linear layer inside the blocks; like PEFT's "all-linear" it leaves out the LM head.
ALL_LINEAR = ("q", "k", "v", "o", "gate", "up", "down")

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


def parse_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """Target names from "q,v", "all" or a sequence of TARGETS keys, validated and in TARGETS order.

    PEFT's spellings work too: module names ("q_proj,v_proj"), module-name suffixes ("self_attn.q_proj")
    and "all-linear" (the same as "all").
    """
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else [t.strip() for t in targets]
    names = [n for n in names if n]
    by_module = {module: key for key, module in TARGETS.items()}
    short = []
    for name in names:
        if name in ("all", "all-linear"):
            short += ALL_LINEAR
        elif name in TARGETS:
            short.append(name)
        elif name.rpartition(".")[2] in by_module:
            # PEFT matches a target by module-name suffix, so "self_attn.q_proj" means q_proj.
            short.append(by_module[name.rpartition(".")[2]])
        else:
            short.append(name)
    unknown = [n for n in short if n not in TARGETS]
    if unknown:
        raise ValueError(
            f"unknown LoRA target(s) {', '.join(map(repr, unknown))}; known: {', '.join(TARGETS)}, all "
            f"(or PEFT's module names {', '.join(TARGETS.values())}, all-linear)"
        )
    if not short:
        raise ValueError("no LoRA targets given")
    return tuple(t for t in TARGETS if t in short)


@dataclass
class LoRAConfig:
    """LoRA hyperparameters."""

    r: int = 8
    """Rank of the update B A."""
    alpha: float = 16
    """Scale of the update: it is multiplied by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.05
    """Dropout on the LoRA branch's input during training."""
    targets: tuple[str, ...] = ("q", "v")
    """Which linear layers get LoRA: q,k,v,o,gate,up,down,lm_head, all (every linear in the blocks), or PEFT's
    module names (q_proj,v_proj, all-linear)."""
    rslora: bool = False
    """Rank-stabilised scaling (Kalajdzievski, 2023): alpha / sqrt(r) instead of alpha / r."""
    dora: bool = False
    """DoRA (Liu et al., 2024; PEFT's use_dora): also learn a magnitude per output feature of each adapted layer."""

    def __post_init__(self) -> None:
        self.targets = parse_targets(self.targets)
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be at least 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class _LoRAUpdate(torch.autograd.Function):
    """scaling · B A dropout(x), saving x, a boolean dropout mask and A x for backward.

    Autograd would keep the float dropout output per adapted layer; x is the norm output that q, k and v
    share, so saving it instead costs nothing extra when several projections are adapted. The mask is drawn
    exactly as F.dropout draws it, so a seeded run is the same as with nn.Dropout.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, p: float) -> torch.Tensor:
        mask = torch.empty_like(x).bernoulli_(1 - p) if p > 0 else None
        h = x * mask / (1 - p) if p > 0 else x
        a = F.linear(h, A)
        ctx.save_for_backward(x, None if mask is None else mask.bool(), a, A, B)
        ctx.scaling, ctx.p = scaling, p
        return F.linear(a, B) * scaling

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, mask, a, A, B = ctx.saved_tensors
        # Under autocast the forward ran in bf16; backward (outside autocast) works in the LoRA weights' dtype.
        grad, a = grad.to(A.dtype) * ctx.scaling, a.to(A.dtype)
        grad_a = grad @ B
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[2]:
            grad_B = grad.reshape(-1, grad.size(-1)).t() @ a.reshape(-1, a.size(-1))
        if ctx.needs_input_grad[1]:
            h = x * mask / (1 - ctx.p) if mask is not None else x
            grad_A = grad_a.reshape(-1, grad_a.size(-1)).t() @ h.reshape(-1, h.size(-1))
        if ctx.needs_input_grad[0]:
            grad_x = grad_a @ A
            if mask is not None:
                grad_x = grad_x * mask / (1 - ctx.p)
        return grad_x, grad_A, grad_B, None, None


class _DoRAUpdate(torch.autograd.Function):
    """DoRA's addition to the base output: (g - 1) · W h + g · scaling · B A h, h = dropout(x), g = m / ||W + s B A||.

    This is PEFT's formula: without dropout W h is the base layer's output (passed in as `base`, not recomputed);
    with dropout it is W applied to the dropped input (`weight` is then a function returning W, called again in
    backward, so a dequantised base weight is never kept alive between forward and backward). Saves x, a boolean
    dropout mask, A h and W h + s B A h (the last for g's gradient), like _LoRAUpdate instead of float copies.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        g: torch.Tensor,
        base: torch.Tensor | None,
        weight: Callable[[], torch.Tensor],
        scaling: float,
        p: float,
    ) -> torch.Tensor:
        mask = torch.empty_like(x).bernoulli_(1 - p) if p > 0 else None
        h = x * mask / (1 - p) if p > 0 else x
        a = F.linear(h, A)
        lora = F.linear(a, B) * scaling
        wh = base.to(A.dtype) if base is not None else F.linear(h, weight().to(A.dtype))
        ctx.save_for_backward(x, None if mask is None else mask.bool(), a, A, B, g, wh + lora)
        ctx.scaling, ctx.p, ctx.weight = scaling, p, weight
        ctx.base_dtype = None if base is None else base.dtype
        return (g - 1) * wh + g * lora

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, mask, a, A, B, g, u = ctx.saved_tensors
        # Under autocast the forward ran in bf16; backward (outside autocast) works in the LoRA weights' dtype.
        grad, a = grad.to(A.dtype), a.to(A.dtype)
        grad_x = grad_A = grad_B = grad_g = grad_base = None
        if ctx.needs_input_grad[3]:
            grad_g = (grad * u).reshape(-1, grad.size(-1)).sum(0).to(g.dtype)
        grad_lora = grad * g * ctx.scaling
        grad_a = grad_lora @ B
        if ctx.needs_input_grad[2]:
            grad_B = grad_lora.reshape(-1, grad.size(-1)).t() @ a.reshape(-1, a.size(-1))
        if ctx.needs_input_grad[1]:
            h = x * mask / (1 - ctx.p) if mask is not None else x
            grad_A = grad_a.reshape(-1, grad_a.size(-1)).t() @ h.reshape(-1, h.size(-1)).to(A.dtype)
        if ctx.needs_input_grad[4]:
            grad_base = (grad * (g - 1)).to(ctx.base_dtype)
        if ctx.needs_input_grad[0]:
            grad_h = grad_a @ A
            if ctx.base_dtype is None:  # W h was computed here, on the dropped input
                grad_h = grad_h + (grad * (g - 1)) @ ctx.weight().to(A.dtype)
            grad_x = (grad_h * mask / (1 - ctx.p) if mask is not None else grad_h).to(x.dtype)
        return grad_x, grad_A, grad_B, grad_g, grad_base, None, None, None


class LoRALinear(nn.Linear):
    """A frozen nn.Linear plus a trainable low-rank update; the base weight keeps its name `weight`.

    With DoRA it also learns `lora_magnitude_vector` (PEFT's name), one magnitude per output feature. Over a
    quantised base (lorafit.quant.QuantizedLinear, kept as `base_layer` as PEFT does) `weight` is None until
    merge, which folds the update into the dequantised base weight in the base's dtype.
    """

    product = staticmethod(F.linear)
    """W x + b; use_decode_kernels gives a decoding model ops.linear instead."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        scaling: float,
        dropout: float = 0.0,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        dora: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.r, self.scaling = r, scaling
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        magnitude = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if dora else None
        self.lora_magnitude_vector = magnitude
        self.base_layer: QuantizedLinear | None = None
        self.merged = False
        # m / ||W + s B A|| at merge time, to take a DoRA merge back out exactly.
        self._dora_factor: torch.Tensor | None = None
        self.reset_lora_parameters()

    @classmethod
    def from_linear(
        cls, linear: nn.Linear | QuantizedLinear, r: int, scaling: float, dropout: float = 0.0, dora: bool = False
    ) -> LoRALinear:
        """Wrap an existing (possibly quantised) layer, sharing (not copying) its weight; LoRA weights go beside it."""
        quantized = isinstance(linear, QuantizedLinear)
        # Built on meta so the base weight is not allocated and initialised a second time.
        lora = cls(
            linear.in_features,
            linear.out_features,
            r,
            scaling,
            dropout,
            bias=linear.bias is not None,
            device="meta",
            dtype=linear.dtype if quantized else linear.weight.dtype,
            dora=dora,
        )
        if quantized:
            lora.weight, lora.bias, lora.base_layer = None, linear.bias, linear
        else:
            lora.weight, lora.bias = linear.weight, linear.bias
        lora.materialize()
        keep_product(linear, lora)
        return lora

    @property
    def dora(self) -> bool:
        return self.lora_magnitude_vector is not None

    def base_weight(self) -> torch.Tensor:
        """The frozen base weight W (dequantised, in the base's dtype, for a quantised base)."""
        if self.base_layer is not None:
            return self.base_layer.dequantize()
        return self.weight

    def _base_is_meta(self) -> bool:
        return self.base_layer.is_meta if self.base_layer is not None else self.weight.is_meta

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A as nn.Linear initialises its weight, B zero, m = ||W|| per row: training starts exactly at the base."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.dora and not self._base_is_meta():
            self.lora_magnitude_vector.copy_(self.weight_norm())

    def materialize(self) -> None:
        """Give LoRA weights still on the meta device real, initialised storage on the base weight's device."""
        if self.lora_A.weight.is_meta and not self._base_is_meta():
            device = self.base_layer.device if self.base_layer is not None else self.weight.device
            self.lora_A.to_empty(device=device)
            self.lora_B.to_empty(device=device)
            if self.dora:
                self.lora_magnitude_vector = nn.Parameter(
                    torch.empty_like(self.lora_magnitude_vector, device=device),
                    requires_grad=self.lora_magnitude_vector.requires_grad,
                )
            self.reset_lora_parameters()

    def delta_weight(self) -> torch.Tensor:
        """scaling · B A, in the base weight's dtype (computed in float32)."""
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()
        return (delta * self.scaling).to(self._base_dtype())

    def _base_dtype(self) -> torch.dtype:
        return self.base_layer.dtype if self.base_layer is not None else self.weight.dtype

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W + scaling · B A|| per output feature, in float32; DoRA treats it as a constant (no gradient)."""
        A, B = self.lora_A.weight.float(), self.lora_B.weight.float()
        return torch.linalg.norm(self.base_weight().float() + self.scaling * (B @ A), dim=1)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The weight that computes the same as base + update: W + s B A, with DoRA m · (W + s B A) / ||W + s B A||."""
        weight = self.base_weight().float() + self.delta_weight().float()
        if self.dora:
            weight = (self.lora_magnitude_vector.float() / torch.linalg.norm(weight, dim=1))[:, None] * weight
        return weight.to(self._base_dtype())

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into W, so forward costs the base's: in place, or over a quantised base into a new W."""
        if self.merged:
            return
        if self.dora:
            self._dora_factor = self.lora_magnitude_vector.float() / self.weight_norm()
        if self.base_layer is not None:
            self.weight = nn.Parameter(self.merged_weight(), requires_grad=False)
        else:
            self.weight.copy_(self.merged_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of W."""
        if not self.merged:
            return
        if self.base_layer is not None:
            self.weight = None
        elif self.dora:
            weight = self.weight.float() / self._dora_factor[:, None] - self.delta_weight().float()
            self.weight.copy_(weight.to(self.weight.dtype))
        else:
            self.weight -= self.delta_weight()
        self._dora_factor = None
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.product(x, self.weight, self.bias)
        out = self.base_layer(x) if self.base_layer is not None else self.product(x, self.weight, self.bias)
        # The LoRA weights may be kept in a wider dtype than the frozen base (e.g. float32 beside bfloat16).
        h = x.to(self.lora_A.weight.dtype)
        p = self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) and self.training else 0.0
        if not self.dora:
            delta = _LoRAUpdate.apply(h, self.lora_A.weight, self.lora_B.weight, self.scaling, p)
            return out + delta.to(out.dtype)
        g = self.lora_magnitude_vector / self.weight_norm().to(self.lora_magnitude_vector.dtype)
        # Without dropout the base output (less its bias) is W x; with it PEFT applies W to the dropped input.
        base = None if p > 0 else (out if self.bias is None else out - self.bias)
        delta = _DoRAUpdate.apply(h, self.lora_A.weight, self.lora_B.weight, g, base, self.base_weight, self.scaling, p)
        return out + delta.to(out.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}, dora={self.dora}, merged={self.merged}"


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(name, module) for every LoRALinear in the model."""
    return ((name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def apply_lora(model: nn.Module, config: LoRAConfig) -> int:
    """Put LoRA on the configured linear layers in place, freeze everything else; return the trainable count."""
    targets = parse_targets(config.targets)
    if any(True for _ in lora_modules(model)):
        raise ValueError("the model already has LoRA layers")
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(model, "embed_tokens", None)
    if "lm_head" in targets and lm_head is not None and embed is not None and lm_head.weight is embed.weight:
        raise ValueError(
            "LoRA target 'lm_head' is not supported on a model with tied embeddings (tie_embeddings=True): "
            "lm_head shares its weight with embed_tokens, so merging would change the embedding too"
        )
    chosen = target_linears(model, targets)
    if not chosen:
        raise ValueError(f"the model has no linear layers named {', '.join(TARGETS[t] for t in targets)}")
    for name, linear in chosen:
        _replace(model, name, LoRALinear.from_linear(linear, config.r, config.scaling, config.dropout, config.dora))
    for param in model.parameters():
        param.requires_grad = False
    for _, module in lora_modules(model):
        module.lora_A.weight.requires_grad = True
        module.lora_B.weight.requires_grad = True
        if module.dora:
            module.lora_magnitude_vector.requires_grad = True
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def target_linears(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, nn.Linear | QuantizedLinear]]:
    """The plain (or quantised) linear layers that the given targets name."""
    wanted = {TARGETS[t] for t in targets}
    return [
        (name, m)
        for name, m in model.named_modules()
        if name.rpartition(".")[2] in wanted and (is_plain_linear(m) or isinstance(m, QuantizedLinear))
    ]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA (and DoRA magnitude) tensors, under lorafit's names (layers.0.self_attn.q_proj.lora_A.weight)."""
    tensors = {}
    for name, module in lora_modules(model):
        tensors[f"{name}.lora_A.weight"] = module.lora_A.weight.detach()
        tensors[f"{name}.lora_B.weight"] = module.lora_B.weight.detach()
        if module.dora:
            tensors[f"{name}.lora_magnitude_vector"] = module.lora_magnitude_vector.detach()
    return tensors


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight and put plain nn.Linear layers back.

    A quantised base is dequantised first: the merged layer holds a full weight in the base's dtype.
    """
    for name, module in list(lora_modules(model)):
        module.merge()
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight, linear.bias = module.weight, module.bias
        _replace(model, name, linear)


def unwrap_lora(model: nn.Module) -> None:
    """Put back the layer every (unmerged) LoRALinear wraps: the model as it was before apply_lora."""
    for name, module in list(lora_modules(model)):
        if module.merged:
            raise ValueError(f"{name}: the LoRA update is merged into the weight; unmerge it before unwrapping")
        base = module.base_layer
        if base is None:
            base = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            base.weight, base.bias = module.weight, module.bias
        _replace(model, name, base)


# ---- PEFT format ------------------------------------------------------------------------------


def to_peft_key(name: str) -> str:
    """lorafit tensor name -> PEFT's: the model's own body sits under `model.` in LlamaForCausalLM."""
    return PEFT_PREFIX + (name if name.startswith("lm_head.") else "model." + name)


def from_peft_key(key: str) -> str:
    """PEFT tensor name -> lorafit's (the inverse of to_peft_key)."""
    name = key.removeprefix(PEFT_PREFIX).removeprefix("model.")
    # PEFT calls the layer it wraps `base_layer`; ours is the LoRALinear itself.
    return name.replace(".base_layer.", ".")


def peft_config(config: LoRAConfig, base_model_name_or_path: str, revision: str | None = None) -> dict[str, Any]:
    """adapter_config.json's contents for this LoRA config."""
    alpha = int(config.alpha) if float(config.alpha).is_integer() else config.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": revision,
        "r": config.r,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "target_modules": [TARGETS[t] for t in config.targets],
        "use_rslora": config.rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": config.dora,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def save_peft_adapter(
    model: nn.Module,
    config: LoRAConfig,
    out_dir: str | Path,
    base_model_name_or_path: str,
    revision: str | None = None,
) -> None:
    """Write adapter_model.safetensors + adapter_config.json as PEFT does (revision: a hub base's, as PEFT has it)."""
    tensors = {to_peft_key(k): v.to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    if not tensors:
        raise ValueError("the model has no LoRA layers to save; call apply_lora first")
    out = Path(out_dir)
    write_atomically(out / ADAPTER_WEIGHTS, lambda p: save_safetensors(tensors, p, {"format": "pt"}))
    write_json(out / ADAPTER_CONFIG, peft_config(config, base_model_name_or_path, revision))


# Fields of adapter_config.json that describe something lorafit's LoRA does not do, with the value meaning "off".
_UNSUPPORTED_FIELDS = (
    "lora_bias",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "exclude_modules",
    "trainable_token_indices",
    "target_parameters",
    "layer_replication",
    "use_qalora",
    "alora_invocation_tokens",
)
# Initialisations that rewrite the base weights, so the adapter only fits a base model we do not have.
_BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda")


def config_from_peft(peft: dict[str, Any], where: str) -> LoRAConfig:
    """A LoRAConfig from adapter_config.json's contents, or a clear error naming the field we cannot honour."""
    if peft.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type={peft['peft_type']!r} is not supported (only 'LORA')")
    if peft.get("bias", "none") != "none":
        raise ValueError(f"{where}: bias={peft['bias']!r} is not supported (only 'none')")
    if peft.get("fan_in_fan_out"):
        raise ValueError(f"{where}: fan_in_fan_out=true is not supported (that is for GPT-2's Conv1D layers)")
    for key in _UNSUPPORTED_FIELDS:
        if peft.get(key) not in (None, False, {}, []):
            raise ValueError(f"{where}: {key}={peft[key]!r} is not supported")
    init = peft.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ValueError(f"{where}: init_lora_weights={init!r} changes the base weights; not supported")
    return LoRAConfig(
        r=peft["r"],
        alpha=peft.get("lora_alpha", 8),
        dropout=peft.get("lora_dropout", 0.0),
        targets=_targets_from_peft(peft.get("target_modules"), where),
        rslora=bool(peft.get("use_rslora", False)),
        dora=bool(peft.get("use_dora", False)),
    )


def _targets_from_peft(modules: Any, where: str) -> tuple[str, ...]:
    """PEFT's target_modules (a list of module names, or "all-linear") as lorafit target names."""
    if modules == "all-linear":
        return ALL_LINEAR
    if isinstance(modules, str) or not modules:
        raise ValueError(
            f"{where}: target_modules={modules!r} is not supported (a list of module names or 'all-linear')"
        )
    # Only module names count here: lorafit's short names ("q") are not PEFT's.
    unknown = [m for m in modules if m.rpartition(".")[2] not in TARGETS.values()]
    if unknown:
        raise ValueError(
            f"{where}: target_modules {unknown} cannot be mapped; lorafit's LoRA targets are "
            f"{', '.join(TARGETS.values())}"
        )
    return parse_targets(modules)


def adapter_base_model(adapter_dir: str | Path) -> str:
    """The base model an adapter was trained on, as its adapter_config.json names it."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_CONFIG}; not a LoRA run or PEFT adapter directory")
    base = json.loads(path.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{path}: base_model_name_or_path is empty; name the base model with --checkpoint")
    return base


def load_peft_adapter(model: nn.Module, adapter_dir: str | Path) -> LoRAConfig:
    """Apply a PEFT LoRA adapter (made by PEFT or by lorafit) to the model; return its config."""
    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found (a PEFT adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})"
            )
    config = config_from_peft(json.loads(config_path.read_text()), str(config_path))
    tensors = {from_peft_key(k): v for k, v in read_safetensors(weights_path).items()}
    check_lora_tensors(model, config, tensors, str(weights_path))
    apply_lora(model, config)
    # Copy into the model's tensors; where they are still on meta (a model built there), take the tensors themselves.
    current = model.state_dict()
    tensors = {k: t.to(current[k].dtype) for k, t in tensors.items()}
    model.load_state_dict(tensors, strict=False, assign=any(current[k].is_meta for k in tensors))
    return config


def check_lora_tensors(model: nn.Module, config: LoRAConfig, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Check, before touching the model, that the adapter's tensors are exactly the ones its config implies."""
    expected, optional = {}, {}
    for name, linear in target_linears(model, config.targets):
        expected[f"{name}.lora_A.weight"] = (config.r, linear.in_features)
        expected[f"{name}.lora_B.weight"] = (linear.out_features, config.r)
        if config.dora:
            expected[f"{name}.lora_magnitude_vector"] = (linear.out_features,)
        # PEFT also saves the base weight of a targeted lm_head (in case the vocabulary was resized); it loads it.
        optional[f"{name}.weight"] = (linear.out_features, linear.in_features)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected) - set(optional))
    if missing:
        raise ValueError(
            f"{where}: missing LoRA tensor(s) {', '.join(to_peft_key(n) for n in missing[:4])}"
            + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        )
    if extra:
        raise ValueError(
            f"{where}: unexpected tensor(s) {', '.join(to_peft_key(n) for n in extra[:4])}"
            + (f" and {len(extra) - 4} more" if len(extra) > 4 else "")
            + " for the model and this adapter's target_modules"
        )
    for name, tensor in tensors.items():
        shape = expected.get(name) or optional[name]
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"{where}: tensor {to_peft_key(name)} has shape {tuple(tensor.shape)}, the model expects {shape}"
            )
