"""`lorafit demo`: the whole story on the embedded default model, on a CPU, in minutes.

Generate a contact-note -> JSON task, measure the base model on held-out notes, LoRA-finetune,
load the saved adapter, measure again, and print a before/after table with sample outputs.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lorafit.checkpoint import load_model
from lorafit.data import format_prompt
from lorafit.data.demo_task import make_contact_notes, score, split
from lorafit.finetune import DataOptions, finetune
from lorafit.generate import generate_batch
from lorafit.hub import DEFAULT_MODEL, download
from lorafit.lora import LoRAConfig, load_peft_adapter, merge_lora
from lorafit.model import LLaMA
from lorafit.runtime import use_decode_layout
from lorafit.tokenizer import Tokenizer
from lorafit.train import TrainConfig


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
    learning_rate: float = 2e-3
    micro_batch_size: int = 4
    global_batch_size: int = 8
    warmup_steps: int = 2
    max_new_tokens: int = 80

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(n_train=64, n_val=8, n_test=12)


def answer_all(
    model: LLaMA, tokenizer: Tokenizer, records: list[dict], style: str, max_new_tokens: int, batch_size: int = 20
) -> list[str]:
    """Greedy answers to each record's prompt, formatted exactly as in training, several prompts per batch."""
    prompts = [tokenizer.encode(format_prompt(r["instruction"], r["input"], style, tokenizer)) for r in records]
    answers = []
    for i in range(0, len(prompts), batch_size):
        for ids in generate_batch(model, prompts[i : i + batch_size], max_new_tokens, stop_ids=tokenizer.stop_ids):
            answers.append(tokenizer.decode([t for t in ids if t not in tokenizer.stop_ids], skip_special_tokens=True))
    return answers


def run_demo(out_dir: str | Path = "out/demo", config: DemoConfig | None = None) -> dict:
    """Run the demo end to end; returns (and writes to out_dir/results.json) the measured scores."""
    cfg = config or DemoConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    checkpoint = download(DEFAULT_MODEL)
    tokenizer = Tokenizer.from_checkpoint(checkpoint)
    style = "chat"

    records = make_contact_notes(cfg.n_train + cfg.n_val + cfg.n_test, seed=cfg.seed)
    train_records, test_records = split(records, cfg.n_test)
    (out_dir / "notes_train.json").write_text(json.dumps(train_records, indent=1))
    (out_dir / "notes_test.json").write_text(json.dumps(test_records, indent=1))
    example = test_records[0]
    print(
        f"task: {len(train_records)} generated contact notes for training (of which {cfg.n_val} validation), "
        f"{len(test_records)} held out; e.g.\n  note:   {example['input']}\n  target: {example['output']}"
    )
    references = [r["output"] for r in test_records]

    print(f"\n[1/3] the base model on {len(test_records)} held-out notes")
    base_model = load_model(checkpoint)
    use_decode_layout(base_model)
    base_answers = answer_all(base_model, tokenizer, test_records, style, cfg.max_new_tokens)
    before = score(base_answers, references)
    del base_model

    print("\n[2/3] LoRA finetuning")
    run_dir = out_dir / "run"
    train_config = TrainConfig(
        epochs=1,
        micro_batch_size=cfg.micro_batch_size,
        global_batch_size=cfg.global_batch_size,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        eval_interval=max(1, cfg.n_train // cfg.global_batch_size // 4),
        eval_batches=0,
        save_interval=0,
        max_seq_length=256,
        seed=cfg.seed,
    )
    lora = LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, targets=cfg.lora_targets)
    result = finetune(
        "lora",
        out_dir / "notes_train.json",
        run_dir,
        checkpoint,
        train_config,
        lora,
        DataOptions(prompt_style=style, val_size=cfg.n_val),
        overwrite=True,
    )

    print(f"\n[3/3] the finetuned model (adapter loaded from {run_dir}) on the same held-out notes")
    tuned_model = load_model(checkpoint)
    load_peft_adapter(tuned_model, run_dir)
    merge_lora(tuned_model)
    use_decode_layout(tuned_model)
    tuned_answers = answer_all(tuned_model, tokenizer, test_records, style, cfg.max_new_tokens)
    after = score(tuned_answers, references)

    results = {
        "config": asdict(cfg),
        "n_test": len(test_records),
        "before": before,
        "after": after,
        "train_seconds": result.seconds,
        "train_tokens_per_s": result.tokens_per_s,
        "peak_memory_bytes": result.peak_memory_bytes,
        "total_seconds": time.perf_counter() - started,
        "samples": [
            {"note": r["input"], "expected": r["output"], "base": b, "lora": t}
            for r, b, t in list(zip(test_records, base_answers, tuned_answers, strict=True))[:3]
        ],
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    print(report(results, run_dir))
    return results


def report(results: dict, run_dir: Path) -> str:
    """The before/after table and sample outputs, as Markdown."""
    n = results["n_test"]
    before, after = results["before"], results["after"]
    lines = [
        "",
        f"| held-out notes (n={n}) | base model | + LoRA |",
        "|---|---|---|",
        f"| exact match | {round(before['exact_match'] * n)}/{n} | {round(after['exact_match'] * n)}/{n} |",
        f"| valid JSON | {round(before['valid_json'] * n)}/{n} | {round(after['valid_json'] * n)}/{n} |",
        f"| fields right | {before['field_accuracy']:.0%} | {after['field_accuracy']:.0%} |",
        "",
    ]
    for i, sample in enumerate(results["samples"], 1):
        lines += [
            f"sample {i}: {sample['note']}",
            f"  expected: {sample['expected']}",
            f"  base:     {sample['base'].strip()[:300]}",
            f"  + LoRA:   {sample['lora'].strip()}",
            "",
        ]
    lines.append(
        f"training: {results['train_seconds']:.0f} s at {results['train_tokens_per_s']:.0f} tokens/s; "
        f"whole demo {results['total_seconds']:.0f} s; adapter, loss.png and metrics in {run_dir}"
    )
    return "\n".join(lines)
