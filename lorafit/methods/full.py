"""Full finetuning as a method: every weight trains; the result is a whole Hugging Face model in run_dir/model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from lorafit import distributed
from lorafit.checkpoint import load_model
from lorafit.methods.base import Method, save_hf_directory
from lorafit.model import LLaMA

MODEL_DIR = "model"


class Full(Method):
    name: ClassVar[str] = "full"
    summary: ClassVar[str] = "full finetuning: every weight trains (FSDP shards them over several processes)"
    strategy: ClassVar[str] = "fsdp"

    def apply(self, model: LLaMA, config: Any) -> int:
        for p in model.parameters():
            p.requires_grad_(True)
        return sum(p.numel() for p in model.parameters())

    def save(self, model: LLaMA, config: Any, run_dir: Path, base: Path, base_reference: str) -> None:
        from lorafit.train import gather_on_main

        state = gather_on_main(model.state_dict().items())  # every rank takes part in gathering FSDP shards
        if distributed.is_main():
            save_hf_directory(model, base, Path(run_dir) / MODEL_DIR, state, replace=True)

    def has_files(self, run_dir: Path) -> bool:
        return (Path(run_dir) / MODEL_DIR / "config.json").is_file()

    def load(self, model: LLaMA, run_dir: Path) -> None:
        """Put the finetuned weights of run_dir/model into a loaded model of the same shapes."""
        from lorafit.checkpoint import load_state_dict

        state = load_state_dict(Path(run_dir) / MODEL_DIR)
        model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()}, strict=False)
        model.tie_weights()

    def load_run(
        self,
        run_dir: Path,
        checkpoint: str | Path | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> tuple[LLaMA, Path]:
        """The finetuned model itself (run_dir/model); a base checkpoint has no part in it."""
        model_dir = Path(run_dir) / MODEL_DIR
        return load_model(model_dir, dtype=dtype, device=device), model_dir

    def check_mergeable(self, run_dir: Path) -> None:
        raise ValueError(
            f"{run_dir}: a full finetune is already a whole model, in {Path(run_dir) / MODEL_DIR}; nothing to merge"
        )

    def fold(self, model: LLaMA) -> dict[str, torch.Tensor]:
        return model.state_dict()  # the model is the result: nothing to fold
