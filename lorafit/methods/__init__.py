"""The finetuning methods, one object each, in one registry (the way PEFT keeps its tuners).

Adding a method is one module with a Method subclass (see base.py) plus one line below.
Everything else (finetune, generate, merge, estimate, the CLI) looks methods up here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorafit.methods.base import Method
from lorafit.methods.full import Full
from lorafit.methods.llama_adapter import LlamaAdapter, LlamaAdapterV2
from lorafit.methods.lora import LoRA
from lorafit.methods.qlora import QLoRA
from lorafit.model import LLaMA

METHODS: dict[str, Method] = {m.name: m for m in (LoRA(), QLoRA(), LlamaAdapter(), LlamaAdapterV2(), Full())}


def get_method(name: str | Method) -> Method:
    """The registered method of that name (a Method is returned as is)."""
    if isinstance(name, Method):
        return name
    if name not in METHODS:
        raise ValueError(f"unknown finetuning method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def method_of_run(run_dir: str | Path) -> Method:
    """The method whose output a directory holds: a lorafit run, or an adapter made by another tool (PEFT)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run or adapter directory")
    for method in METHODS.values():
        if method.owns(run_dir):
            return method
    raise ValueError(
        f"{run_dir}: not a finetuning run or adapter directory (no adapter_config.json, "
        "llama_adapter_config.json or model/config.json)"
    )


def load_run(
    run_dir: str | Path,
    checkpoint: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[LLaMA, Path, Method]:
    """A run's model (base + its adapter, or the finetuned model), the directory of its tokenizer, and its method."""
    method = method_of_run(run_dir)
    model, tokenizer_dir = method.load_run(Path(run_dir), checkpoint, dtype, device)
    return model, tokenizer_dir, method


def merge_run(
    run_dir: str | Path, out_dir: str | Path, checkpoint: str | Path | None = None, dtype: torch.dtype | None = None
) -> Path:
    """Fold a run into its base model and write a Hugging Face model directory in the base's dtype (or `dtype`)."""
    from lorafit.hub import resolve_checkpoint

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    method = method_of_run(run_dir)
    method.check_mergeable(run_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; choose a new output directory")
    base = resolve_checkpoint(checkpoint or method.base_reference(run_dir))
    model, base = method.load_run(run_dir, base, dtype or _stored_dtype(base))
    method.merge(model, run_dir, out_dir, base)
    return out_dir


def _stored_dtype(checkpoint: Path) -> torch.dtype:
    """The dtype a checkpoint stores its weights in (read lazily: safetensors are memory-mapped)."""
    from lorafit.checkpoint import load_state_dict

    state = load_state_dict(checkpoint)
    return state["embed_tokens.weight"].dtype


__all__ = ["METHODS", "Method", "get_method", "load_run", "merge_run", "method_of_run"]
