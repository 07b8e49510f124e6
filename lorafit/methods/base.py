"""What a finetuning method is: the one interface that finetune, generate, merge, estimate and the CLI talk to.

A method decides which parameters exist and which train (`apply`), how its result is written to and
read from a run directory (`save`, `owns`, `load`), how it is folded into the base weights (`merge`),
how it is served (`prepare_for_inference`) and how several processes train it (`strategy`). Its
hyperparameters are one dataclass (`config_class`), whose fields become its command-line flags and
YAML keys. Nothing outside lorafit/methods/ asks a method for its name to decide what to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from lorafit.checkpoint import load_model, save_hf_model, weights_fingerprint
from lorafit.model import LLaMA
from lorafit.runtime import store_frozen_linears
from lorafit.tokenizer import Tokenizer


class Method:
    """A finetuning method; subclasses set the class attributes and implement apply, save, owns and load."""

    name: ClassVar[str]
    """The name on the command line (`lorafit finetune NAME`) and in lorafit_run.json."""
    summary: ClassVar[str]
    """One line for --help."""
    config_class: ClassVar[type | None] = None
    """The hyperparameters' dataclass; its fields are the flags --{flag_prefix}-{field}."""
    flag_prefix: ClassVar[str] = ""
    removable: ClassVar[bool] = False
    """Whether `remove` can take a loaded run off its base again (evaluating several runs on one loaded base)."""
    strategy: ClassVar[str] = "ddp"
    """How several processes train it: "ddp" (replicated weights, all-reduced gradients) or "fsdp" (sharded)."""
    cpu_mmap_threshold: ClassVar[int | None] = None
    """Where set, training on the CPU maps buffers of at least this many bytes on their own unless the user chose
    (TrainConfig.cpu_mmap_threshold): for a method whose forward allocates a large temporary per layer and call."""

    def default_config(self) -> Any:
        return self.config_class() if self.config_class is not None else None

    def config_from_dict(self, values: dict[str, Any]) -> Any:
        """The config from its fields by name (lorafit_run.json, YAML); unknown fields are an error."""
        if self.config_class is None:
            return None
        known = set(self.config_class.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{self.name}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return self.config_class(**values)

    def describe(self, config: Any) -> str:
        """The method's settings in a few words, for logs and estimate's header ("" for none)."""
        return ""

    def apply(self, model: LLaMA, config: Any) -> int:
        """Add the method's parameters to the model and freeze the rest; returns the trainable parameter count."""
        raise NotImplementedError

    def fused_head(self, config: Any) -> bool:
        """Whether the LM head stays a plain linear layer, so the loss can fuse it with cross-entropy."""
        return True

    def save(self, model: LLaMA, config: Any, run_dir: Path, base: Path, base_reference: str) -> None:
        """Write the result into run_dir. Under torch.distributed every rank calls it; rank 0 writes.

        `base` is the base checkpoint's local path, `base_reference` what the files should name it by (a hub
        repo id where there is one, else the absolute path).
        """
        raise NotImplementedError

    def owns(self, run_dir: Path) -> bool:
        """Whether run_dir holds this method's output (a run, or an adapter made by another tool)."""
        claimed = run_record(run_dir).get("method", self.name)  # a run file settles it (QLoRA's files are LoRA's)
        return claimed == self.name and self.has_files(run_dir)

    def has_files(self, run_dir: Path) -> bool:
        """Whether run_dir holds the files this method writes."""
        raise NotImplementedError

    def load_base(self, path: Path, dtype: torch.dtype, device: torch.device | str, config: Any) -> LLaMA:
        """The base model the method trains on; by default as the checkpoint stores it, in `dtype`."""
        return load_model(path, dtype=dtype, device=device)

    def store_for_training(self, model: LLaMA, config: Any, precision: str) -> None:
        """Keep the applied model's weights in the dtypes training needs: under bf16-mixed the frozen linear
        weights only enter autocast's bf16 products, so they are kept in bf16 (runtime.store_frozen_linears)."""
        if precision == "bf16-mixed":
            store_frozen_linears(model, torch.bfloat16)

    def parameter_count(self, model: LLaMA) -> int:
        """The model's parameters, frozen and trained (tied weights once)."""
        return sum(p.numel() for p in model.parameters())

    def stored_weight_bytes(self, model: LLaMA, config: Any) -> int:
        """Bytes of the model's weights as the method keeps them (for estimate; tied weights once)."""
        return sum(p.numel() * p.element_size() for p in model.parameters())

    def workspace_bytes(self, model: LLaMA, config: Any) -> int:
        """Short-lived memory the method adds to a training step beyond the traced activations (for estimate)."""
        return 0

    def base_reference(self, run_dir: Path) -> str | None:
        """The base model the output in run_dir was trained on, as its files name it."""
        return None

    def run_config(self, run_dir: Path) -> Any:
        """The method's settings as the run recorded them in lorafit_run.json (defaults where there is none)."""
        recorded = run_record(run_dir).get(self.name)
        return self.config_from_dict(recorded) if recorded else self.default_config()

    def load(self, model: LLaMA, run_dir: Path) -> Any:
        """Apply the output saved in run_dir to a freshly loaded base model; returns the method's config."""
        raise NotImplementedError

    def load_run(
        self,
        run_dir: Path,
        checkpoint: str | Path | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> tuple[LLaMA, Path]:
        """The base model with run_dir's output applied, and the directory whose tokenizer it uses."""
        from lorafit.hub import resolve_checkpoint

        reference = checkpoint or self.base_reference(run_dir)
        if reference is None:
            raise ValueError(f"{run_dir}: the run does not name its base model; pass --checkpoint")
        base = resolve_checkpoint(reference)
        model = self.load_base(base, dtype, device, self.run_config(run_dir))
        check_base(model, run_dir, base)
        self.load(model, run_dir)
        return model, base

    def remove(self, model: LLaMA) -> None:
        """Take the method's layers off a model it was loaded onto, leaving the base exactly as it was (only where
        `removable`; elsewhere load the run onto a fresh base instead)."""
        raise ValueError(f"a {self.name} run cannot be taken off the model it was loaded onto")

    def prepare_for_inference(self, model: LLaMA) -> None:
        """Make a loaded run fast to decode (e.g. fold LoRA into the weights); by default nothing."""

    def check_mergeable(self, run_dir: Path) -> None:
        """Raise, saying what to do instead, when `merge` makes no sense for this method's runs."""

    def fold(self, model: LLaMA) -> dict[str, torch.Tensor]:
        """Fold the trained weights into the base weights in place; returns the tensors a Llama checkpoint holds."""
        raise ValueError(f"a {self.name} run has nothing that folds into the base weights")

    def unfoldable(self, model: LLaMA) -> list[str]:
        """Names of a loaded run's trained tensors that `fold` cannot put into Llama weights though they matter."""
        return []

    def merge_notes(self, out_dir: Path) -> list[str]:
        """What a user should know about a merge this method wrote (printed by `lorafit merge`)."""
        return []

    def merge(self, model: LLaMA, run_dir: Path, out_dir: Path, base: Path) -> None:
        """Write the loaded run (model), folded, as a Hugging Face model directory out_dir."""
        save_hf_directory(model, base, out_dir, self.fold(model))


def run_record(run_dir: Path) -> dict[str, Any]:
    """lorafit_run.json of a run directory, {} where there is none (an adapter made by another tool)."""
    import json

    from lorafit.rundir import RUN_FILE

    path = Path(run_dir) / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def base_fingerprint(model: LLaMA) -> str:
    """The base's fingerprint (checkpoint.weights_fingerprint) of its tensors as the checkpoint stores them.

    load_model takes it before casting, so a run trained in float32 applies to its base loaded in bf16 too (and
    the other way round). A model not loaded from a checkpoint is fingerprinted from its weights as they are.
    """
    stored = getattr(model, "checkpoint_fingerprint", None)
    return stored if stored is not None else loaded_fingerprint(model)


def loaded_fingerprint(model: LLaMA) -> str:
    """The fingerprint of the model's weights as loaded (in its dtype): what runs recorded before 2026-11-30."""
    return weights_fingerprint(model.state_dict(), model.config)


def check_base(model: LLaMA, run_dir: Path, base: Path) -> None:
    """Refuse to apply a run to a base other than the one it was trained on (same shapes are not enough)."""
    expected = run_record(run_dir).get("base_fingerprint")  # none for an adapter made by another tool
    # An older run's fingerprint was of its base as loaded for training (bf16-true: in bf16); it still matches so.
    if expected and expected not in (base_fingerprint(model), loaded_fingerprint(model)):
        raise ValueError(
            f"{run_dir}: trained on another base model than {base} (weights fingerprint {expected}, this base's "
            f"{base_fingerprint(model)}); pass the base it was trained on with --checkpoint"
        )


def save_hf_directory(
    model: LLaMA,
    base: Path,
    out_dir: Path,
    state_dict: dict[str, torch.Tensor] | None = None,
    replace: bool = False,
) -> None:
    """A Hugging Face model directory: weights and config, plus the base model's tokenizer and generation config.

    state_dict replaces the model's own (e.g. whole tensors gathered from FSDP shards). Weights that are
    not finite (a diverged run) are refused. An existing out_dir is an error unless replace, in which
    case it is swapped for the new one only once that is complete.
    """
    from lorafit.io import atomic_directory

    state_dict = model.state_dict() if state_dict is None else state_dict
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{name} holds NaN or infinite values (a diverged run?); refusing to write {out_dir}")
    # One directory that appears whole: a crash never leaves weights without their tokenizer.
    with atomic_directory(out_dir, replace=replace) as staging:
        save_hf_model(state_dict, model.config, staging)
        Tokenizer.from_checkpoint(base).save(staging)
        if (base / "generation_config.json").is_file():
            (staging / "generation_config.json").write_text((base / "generation_config.json").read_text())
