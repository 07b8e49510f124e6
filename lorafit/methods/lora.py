"""LoRA as a method: low-rank updates beside frozen linear layers, saved as a PEFT adapter (layer: lorafit/lora.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import torch

from lorafit import distributed
from lorafit.lora import (
    ADAPTER_CONFIG,
    LoRAConfig,
    adapter_base_model,
    apply_lora,
    load_peft_adapter,
    merge_lora,
    save_peft_adapter,
    unwrap_lora,
)
from lorafit.methods.base import Method
from lorafit.model import LLaMA
from lorafit.quant import quantized_linears


class LoRA(Method):
    name: ClassVar[str] = "lora"
    summary: ClassVar[str] = "LoRA: train low-rank updates B A beside frozen linear layers (PEFT-format adapter)"
    config_class: ClassVar[type] = LoRAConfig
    flag_prefix: ClassVar[str] = "lora"
    removable: ClassVar[bool] = True

    def describe(self, config: LoRAConfig) -> str:
        return f"{'DoRA ' if config.dora else ''}r={config.r}, alpha={config.alpha:g} on {','.join(config.targets)}"

    def apply(self, model: LLaMA, config: LoRAConfig) -> int:
        return apply_lora(model, config)

    def store_for_training(self, model: LLaMA, config: LoRAConfig, precision: str) -> None:
        if not config.dora:  # DoRA takes the norm ||W + s B A|| of the float32 weight every step
            super().store_for_training(model, config, precision)

    def fused_head(self, config: LoRAConfig) -> bool:
        return "lm_head" not in config.targets

    def save(self, model: LLaMA, config: LoRAConfig, run_dir: Path, base: Path, base_reference: str) -> None:
        if distributed.is_main():  # DDP keeps whole, identical LoRA weights on every rank
            save_peft_adapter(model, config, run_dir, base_model_name_or_path=base_reference)

    def has_files(self, run_dir: Path) -> bool:
        path = Path(run_dir) / ADAPTER_CONFIG
        if not path.is_file():
            return False
        fields = json.loads(path.read_text())
        # lorafit's LLaMA-Adapter runs of before 0.2 also wrote adapter_config.json, with a "method" field.
        return "method" not in fields and fields.get("peft_type", "LORA") == "LORA"

    def base_reference(self, run_dir: Path) -> str | None:
        return adapter_base_model(run_dir)

    def load(self, model: LLaMA, run_dir: Path) -> LoRAConfig:
        return load_peft_adapter(model, run_dir)

    def remove(self, model: LLaMA) -> None:
        """Unwrap every LoRALinear, unmerged, back into the plain layer it wraps: the base weights never changed."""
        unwrap_lora(model)

    def prepare_for_inference(self, model: LLaMA) -> None:
        """Fold the update into the base weights (then it costs nothing per token), unless the base is quantised."""
        if quantized_linears(model):
            return  # merging would dequantise the base
        dtype = model.embed_tokens.weight.dtype
        merge_lora(model)
        model.to(dtype)

    def fold(self, model: LLaMA) -> dict[str, torch.Tensor]:
        merge_lora(model)
        return model.state_dict()
