"""QLoRA (Dettmers et al., 2023) as a method: LoRA (or DoRA) trained over a frozen base held in 4-bit NF4.

The base is quantised while it is loaded (lorafit/quant.py, bitsandbytes), layer by layer from the
memory-mapped checkpoint; only the linear layers inside the blocks are quantised (the embedding, LM
head and norms stay in the run's dtype, as in the paper and PEFT). The adapter is an ordinary PEFT
LoRA adapter; the scheme is recorded in lorafit_run.json (Method.run_config), so generate and merge rebuild
the same base.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch

from lorafit.lora import LoRAConfig, merge_lora
from lorafit.methods.lora import LoRA
from lorafit.model import LLaMA
from lorafit.quant import (
    dequantize_model,
    is_block_linear,
    load_quantized,
    quantize_model,
    quantized_linears,
    stored_bytes,
)


@dataclass
class QLoRAConfig(LoRAConfig):
    """LoRA's settings, and how the frozen base is stored."""

    quantize: Literal["nf4", "nf4-dq"] = field(default="nf4-dq", metadata={"flag": "quantize"})
    """The base's 4-bit format: NF4 codes in blocks of 64 with float32 absmax constants, or nf4-dq with the
    constants quantised again to 8 bits in blocks of 256 (double quantisation)."""


class QLoRA(LoRA):
    name: ClassVar[str] = "qlora"
    summary: ClassVar[str] = "QLoRA: LoRA (or DoRA) over a frozen base quantised to 4-bit NF4 while loading"
    config_class: ClassVar[type] = QLoRAConfig
    removable: ClassVar[bool] = False  # its load quantises the base
    # Every call of a quantised layer dequantises its weight into a fresh buffer, between the activations kept for
    # backward: glibc's heap fragments around them (measured at 1 x 128, 5 steps: peak RSS 1091 MiB, barely below
    # float32 LoRA's 1135; with this 896), at no measurable cost per step.
    cpu_mmap_threshold: ClassVar[int | None] = 1 << 20

    def describe(self, config: QLoRAConfig) -> str:
        return f"{super().describe(config)}, base in {config.quantize}"

    def load_base(self, path: Path, dtype: torch.dtype, device: torch.device | str, config: QLoRAConfig) -> LLaMA:
        return load_quantized(path, config.quantize, dtype, device)

    def load(self, model: LLaMA, run_dir: Path) -> LoRAConfig:
        """The adapter over the base quantised as in training (quantised here if it was loaded in full precision)."""
        if not quantized_linears(model):
            quantize_model(model, self.run_config(run_dir).quantize)
        return super().load(model, run_dir)

    def prepare_for_inference(self, model: LLaMA) -> None:
        """Nothing: merging would dequantise the base; the adapter stays beside it."""

    def merge_notes(self, out_dir: Path) -> list[str]:
        return ["the update was folded into the dequantised 4-bit base, in the base's dtype"]

    def fold(self, model: LLaMA) -> dict[str, torch.Tensor]:
        """LoRA folded into the dequantised base, in the base's dtype: a plain Llama state dict."""
        merge_lora(model)
        dequantize_model(model)
        return model.state_dict()

    def parameter_count(self, model: LLaMA) -> int:
        """The quantised weights count too (they are buffers of codes, not parameters)."""
        quantised = sum(m.in_features * m.out_features for _, m in quantized_linears(model))
        return super().parameter_count(model) + quantised

    def stored_weight_bytes(self, model: LLaMA, config: QLoRAConfig) -> int:
        """The block linears at their quantised size, the rest as stored (for estimate)."""
        total = super().stored_weight_bytes(model, config)
        for weight in _block_weights(model):
            total += stored_bytes(weight.numel(), config.quantize) - weight.numel() * weight.element_size()
        return total

    def workspace_bytes(self, model: LLaMA, config: QLoRAConfig) -> int:
        """Each quantised linear is dequantised for its product, in forward and again in backward: one at a time."""
        return max((w.numel() * w.element_size() for w in _block_weights(model)), default=0)


def _block_weights(model: LLaMA) -> list[torch.Tensor]:
    """The weights of the linear layers that QLoRA quantises (as a model built for estimate still holds them)."""
    return [m.weight for n, m in model.named_modules() if is_block_linear(n) and getattr(m, "weight", None) is not None]
