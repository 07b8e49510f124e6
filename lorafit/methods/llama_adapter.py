"""LLaMA-Adapter v1 and v2 as methods (lorafit/adapter.py has the layers).

A run writes adapter.safetensors (the trainable tensors under lorafit's names) and
llama_adapter_config.json ({"method", "prompt_length", "start_layer", "base_model_name_or_path"}).
Runs written before lorafit 0.2 named that file adapter_config.json, PEFT's name for a different
format; they are still read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch

from lorafit import distributed
from lorafit.adapter import (
    AdapterConfig,
    adapter_parameters,
    adapter_state_dict,
    apply_adapter,
    base_state_dict,
    fold_scales,
)
from lorafit.checkpoint import read_safetensors
from lorafit.io import save_safetensors, write_atomically, write_json
from lorafit.methods.base import Method
from lorafit.model import LLaMA

WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "llama_adapter_config.json"
LEGACY_CONFIG_FILE = "adapter_config.json"
V1_NOTHING_TO_MERGE = (
    "a LLaMA-Adapter (v1) run has nothing to merge into the base weights (its prompts and gates need the "
    "adapter's attention)"
)


def read_fields(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """(path, contents) of a LLaMA-Adapter directory's config file, the new name or the legacy one; None if neither."""
    for name in (CONFIG_FILE, LEGACY_CONFIG_FILE):
        path = Path(run_dir) / name
        if path.is_file():
            try:
                fields = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err})") from err
            if isinstance(fields, dict) and "method" in fields:
                return path, fields
    return None


class LlamaAdapter(Method):
    name: ClassVar[str] = "adapter"
    summary: ClassVar[str] = "LLaMA-Adapter: learned prompts behind zero-initialised gates in the upper layers"
    config_class: ClassVar[type] = AdapterConfig
    flag_prefix: ClassVar[str] = "adapter"
    v2: ClassVar[bool] = False

    def describe(self, config: AdapterConfig) -> str:
        return f"{config.prompt_length} prompt tokens from layer {config.start_layer}"

    def apply(self, model: LLaMA, config: AdapterConfig) -> int:
        return apply_adapter(model, config, v2=self.v2)

    def fused_head(self, config: AdapterConfig) -> bool:
        return not self.v2  # v2 gives the LM head a trainable bias and scale

    def save(self, model: LLaMA, config: AdapterConfig, run_dir: Path, base: Path, base_reference: str) -> None:
        if not distributed.is_main():  # DDP: whole, identical weights on every rank
            return
        tensors = {k: v.to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
        if not tensors:
            raise ValueError("the model has no LLaMA-Adapter to save; apply it first")
        run_dir = Path(run_dir)
        write_atomically(run_dir / WEIGHTS_FILE, lambda tmp: save_safetensors(tensors, tmp, {"format": "pt"}))
        fields = {
            "method": self.name,
            "prompt_length": config.prompt_length,
            "start_layer": config.start_layer,
            "base_model_name_or_path": base_reference,
        }
        write_json(run_dir / CONFIG_FILE, fields)

    def has_files(self, run_dir: Path) -> bool:
        found = read_fields(run_dir)
        return found is not None and found[1]["method"] == self.name

    def base_reference(self, run_dir: Path) -> str | None:
        found = read_fields(run_dir)
        return found[1].get("base_model_name_or_path") if found else None

    def read_config(self, run_dir: Path) -> AdapterConfig:
        found = read_fields(run_dir)
        if found is None:
            raise FileNotFoundError(f"{run_dir}: no {CONFIG_FILE}; not a LLaMA-Adapter run directory")
        path, fields = found
        for key in ("prompt_length", "start_layer"):
            if not isinstance(fields.get(key), int) or isinstance(fields.get(key), bool):
                raise ValueError(f"{path}: {key} must be an integer, got {fields.get(key)!r}")
        return AdapterConfig(prompt_length=fields["prompt_length"], start_layer=fields["start_layer"])

    def load(self, model: LLaMA, run_dir: Path) -> AdapterConfig:
        config = self.read_config(run_dir)
        weights_path = Path(run_dir) / WEIGHTS_FILE
        if not weights_path.is_file():
            raise FileNotFoundError(f"{weights_path} not found (a LLaMA-Adapter directory holds {WEIGHTS_FILE})")
        tensors = read_safetensors(weights_path)
        self.apply(model, config)
        params = adapter_parameters(model)
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        if missing:
            raise ValueError(f"{weights_path}: missing tensor(s) {', '.join(missing[:4])}" + _more(missing))
        if extra:
            raise ValueError(
                f"{weights_path}: unexpected tensor(s) {', '.join(extra[:4])}{_more(extra)} for method {self.name!r}"
            )
        with torch.no_grad():
            for name, p in params.items():
                if tensors[name].shape != p.shape:
                    raise ValueError(
                        f"{weights_path}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                        f"the model expects {tuple(p.shape)}"
                    )
                p.copy_(tensors[name])
        return config

    def check_mergeable(self, run_dir: Path) -> None:
        if not self.v2:
            raise ValueError(f"{run_dir}: {V1_NOTHING_TO_MERGE}; use it with --adapter instead")

    def fold(self, model: LLaMA) -> dict[str, torch.Tensor]:
        if not self.v2:
            raise ValueError(V1_NOTHING_TO_MERGE)
        fold_scales(model)
        return base_state_dict(model)


class LlamaAdapterV2(LlamaAdapter):
    name: ClassVar[str] = "adapter-v2"
    summary: ClassVar[str] = "LLaMA-Adapter v2: v1 plus a bias and scale on every linear layer and trainable norms"
    v2: ClassVar[bool] = True

    def unfoldable(self, model: LLaMA) -> list[str]:
        """Open gates (a prompt behind a zero gate adds nothing), non-zero biases and the scale of a tied LM head."""
        state = adapter_state_dict(model)
        live = [n for n, t in state.items() if n.endswith((".gate", ".adapter_bias")) and bool(t.any())]
        head_scale = state.get("lm_head.adapter_scale")
        if model.lm_head.weight is model.embed_tokens.weight and head_scale is not None and (head_scale != 1).any():
            live.append("lm_head.adapter_scale")  # a tied head cannot take its scale without changing the embedding
        return live

    def merge_notes(self, out_dir: Path) -> list[str]:
        return [f"prompts, gates and biases do not fit a Llama checkpoint: also pass --adapter {out_dir / 'adapter'}"]

    def merge(self, model: LLaMA, run_dir: Path, out_dir: Path, base: Path) -> None:
        """Fold the scales (and the trained norms) into the weights; prompts, gates and biases, which a Llama
        checkpoint has no place for, go to out_dir/adapter, an adapter over the merged model."""
        config = self.read_config(run_dir)
        super().merge(model, run_dir, out_dir, base)
        # A subdirectory: an adapter config beside config.json could make other tools look for an adapter there.
        self.save(model, config, out_dir / "adapter", out_dir, base_reference=str(out_dir.resolve()))


def _more(names: list[str]) -> str:
    return f" and {len(names) - 4} more" if len(names) > 4 else ""
