"""`lorafit demo`: the whole story on the embedded default model, on a CPU, in minutes.

Generate a contact-note -> JSON task, measure the base model on held-out notes, LoRA-finetune,
load the saved adapter, measure again, and print a before/after table with sample outputs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lorafit.checkpoint import load_model
from lorafit.data.demo_task import make_contact_notes, score, split
from lorafit.evaluate import EvalData, adapter_applied, format_samples, format_table, load_eval_data, measure
from lorafit.finetune import DataOptions, finetune
from lorafit.hub import DEFAULT_MODEL, download
from lorafit.io import write_json
from lorafit.lora import LoRAConfig
from lorafit.model import LLaMA
from lorafit.runtime import trim_heap, use_decode_kernels
from lorafit.tokenizer import Tokenizer
from lorafit.train import TrainConfig, TrainResult

STYLE = "chat"  # prompts in the model's chat template


@dataclass
class DemoConfig:
    """Sizes and recipe of the demo; `quick()` is a smaller run for a first look."""

    n_train: int = 320
    n_val: int = 16
    n_test: int = 40
    seed: int = 0
    lora_r: int = 16
    lora_alpha: float = 32
    lora_targets: str = "all"
    lora_dropout: float = 0.05
    learning_rate: float = 2e-3
    micro_batch_size: int = 4
    global_batch_size: int = 8
    warmup_steps: int = 2
    max_new_tokens: int = 80

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(n_train=64, n_val=8, n_test=12)

    def training(self) -> TrainConfig:
        """The training loop's settings for this recipe: one epoch, validation four times, no checkpoints."""
        return TrainConfig(
            epochs=1,
            micro_batch_size=self.micro_batch_size,
            global_batch_size=self.global_batch_size,
            learning_rate=self.learning_rate,
            warmup_steps=self.warmup_steps,
            eval_interval=max(1, self.n_train // self.global_batch_size // 4),
            eval_batches=0,
            save_interval=0,
            max_seq_length=256,
            seed=self.seed,
        )

    def lora(self) -> LoRAConfig:
        """The LoRA settings for this recipe."""
        return LoRAConfig(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout, targets=self.lora_targets)


def run_demo(out_dir: str | Path = "out/demo", config: DemoConfig | None = None) -> dict:
    """Run the demo end to end; returns (and writes to out_dir/results.json) the measured scores."""
    cfg = config or DemoConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    checkpoint = download(DEFAULT_MODEL)
    tokenizer = Tokenizer.from_checkpoint(checkpoint)

    train_records, test_records = write_notes(cfg, out_dir)
    example = test_records[0]
    print(
        f"task: {len(train_records)} generated contact notes for training (of which {cfg.n_val} validation), "
        f"{len(test_records)} held out; e.g.\n  note:   {example['input']}\n  target: {example['output']}"
    )

    print(f"\n[1/3] the base model on {len(test_records)} held-out notes")
    test_data = load_eval_data(out_dir / "notes_test.json", tokenizer, STYLE)
    base_model = load_base(checkpoint)
    before = measure(base_model, tokenizer, test_data, True, cfg.max_new_tokens, score)
    del base_model  # training loads its own copy

    print("\n[2/3] LoRA finetuning")
    run_dir = out_dir / "run"
    result = train_adapter(cfg, out_dir, checkpoint, run_dir)
    # Training's freed memory stays in glibc's heap; the evaluation's packed weights would come on top of it
    # (`lorafit demo --quick`, whole process: 2.55 GiB peak without this, 2.22 with it, 2.24 before packing).
    trim_heap()

    print(f"\n[3/3] the finetuned model (adapter loaded from {run_dir}) on the same held-out notes")
    after = measure_adapter(cfg, run_dir, checkpoint, tokenizer, test_data)

    results = {
        "config": asdict(cfg),
        "records": len(test_records),
        "models": [{"name": "base model", **before}, {"name": "+ LoRA", **after}],
        "train_seconds": result.seconds,
        "train_tokens_per_s": result.tokens_per_s,
        "peak_memory_bytes": result.peak_memory_bytes,
        "total_seconds": time.perf_counter() - started,
    }
    write_json(out_dir / "results.json", results)
    print(report(results, run_dir))
    return results


def write_notes(cfg: DemoConfig, out_dir: Path) -> tuple[list[dict], list[dict]]:
    """The seed's notes, written to out_dir as notes_train.json and notes_test.json; (train, held-out) records."""
    records = make_contact_notes(cfg.n_train + cfg.n_val + cfg.n_test, seed=cfg.seed)
    train_records, test_records = split(records, cfg.n_test)
    write_json(out_dir / "notes_train.json", train_records)
    write_json(out_dir / "notes_test.json", test_records)
    return train_records, test_records


def train_adapter(
    cfg: DemoConfig, out_dir: Path, checkpoint: Path, run_dir: Path, progress: bool = True
) -> TrainResult:
    """The demo's LoRA finetuning on out_dir/notes_train.json (write_notes), into run_dir."""
    return finetune(
        "lora",
        out_dir / "notes_train.json",
        run_dir,
        checkpoint,
        cfg.training(),
        cfg.lora(),
        DataOptions(prompt_style=STYLE, val_size=cfg.n_val),
        overwrite=True,
        progress=progress,
    )


def measure_adapter(
    cfg: DemoConfig, run_dir: Path, checkpoint: Path, tokenizer: Tokenizer, data: EvalData, samples: int = 3
) -> dict:
    """The demo's evaluation of an adapter (a lorafit run or a PEFT adapter directory) on the held-out notes."""
    base_model = load_base(checkpoint)
    with adapter_applied(base_model, run_dir, lambda: load_base(checkpoint)) as tuned_model:
        return measure(tuned_model, tokenizer, data, True, cfg.max_new_tokens, score, samples)


def load_base(checkpoint: Path) -> LLaMA:
    """The default model, set up for decoding (use_decode_kernels)."""
    model = load_model(checkpoint)
    use_decode_kernels(model)
    return model


def report(results: dict, run_dir: Path) -> str:
    """`lorafit evaluate`'s before/after table and sample outputs, and where the run went."""
    return "\n".join(
        [
            "",
            format_table(results),
            "",
            format_samples(results),
            f"training: {results['train_seconds']:.0f} s at {results['train_tokens_per_s']:.0f} tokens/s; "
            f"whole demo {results['total_seconds']:.0f} s; adapter, loss.png and metrics in {run_dir}",
        ]
    )
