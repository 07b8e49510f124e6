"""What the CPU benchmarks share: the Hugging Face PEFT model, its batches, and a process's peak RSS.

Imported by benchmarks/lora_alpaca.py, train_cpu.py and gpu.py, which run as scripts (so this directory is
on sys.path).
"""

from __future__ import annotations

import resource
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from lorafit.data import IGNORE_INDEX, TokenDataset, collate
from lorafit.lora import TARGETS, LoRAConfig


def peak_rss_bytes() -> int:
    """This process's peak resident set size (ru_maxrss: KiB on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def peft_model(checkpoint: Path, lora: LoRAConfig) -> torch.nn.Module:
    """transformers' float32 LlamaForCausalLM with SDPA attention, wrapped by PEFT with LoRA as in `lora`."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # keep benchmark output to results
    # PEFT 0.21 still calls a transformers 5 method that warns it is deprecated: noise in every run.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="sdpa")
    base.config.use_cache = False  # training needs no KV cache; HF's fine-tuning examples switch it off too
    return get_peft_model(base, peft_lora_config(lora))


def peft_lora_config(lora: LoRAConfig):
    """lorafit's LoRA hyperparameters as PEFT's LoraConfig for a causal LM."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=[TARGETS[t] for t in lora.targets],
        task_type="CAUSAL_LM",
    )


def hf_batch(dataset: TokenDataset, indices: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Samples right-padded to the longest of them (as a DataCollator does), with the attention mask HF needs."""
    input_ids, labels = collate([dataset[i] for i in indices], pad_id)
    lengths = torch.tensor([dataset.lengths[i] for i in indices])
    mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def supervised(labels: torch.Tensor) -> int:
    """Positions the causal-LM loss counts: labelled tokens after the first."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
