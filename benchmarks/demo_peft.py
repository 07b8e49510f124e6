"""The demo's task trained by lorafit and by HF PEFT + transformers' Trainer, seed by seed, scored alike.

For each seed: `lorafit demo`'s notes, its LoRA recipe (DemoConfig: every linear layer, r=16, alpha 32,
dropout 0.05, lr 2e-3 with 2 warm-up steps then cosine decay, batches of 8 as 2 micro-batches of 4, one
epoch) trained by lorafit exactly as the demo trains it, then by PEFT's `get_peft_model` and transformers'
`Trainer` (random micro-batches, float32 unless --peft-bf16) on the very samples lorafit trained on (its
prepared training split: same prompts, same masking). Both adapters are scored by the demo's evaluation
(greedy, exact match of the JSON on the 40 held-out notes); PEFT's also by transformers' own `generate`,
an evaluation that shares no code with lorafit's.

usage: python benchmarks/demo_peft.py [--seeds 0 1 2] [--json demo_peft.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from peft_side import hf_batch, peft_lora_config

from lorafit.data import TokenDataset
from lorafit.data.demo_task import score
from lorafit.demo import STYLE, DemoConfig, measure_adapter, train_adapter, write_notes
from lorafit.evaluate import EvalData, load_eval_data, prompt_and_reference
from lorafit.hub import DEFAULT_MODEL, download
from lorafit.io import write_json
from lorafit.rundir import RUN_FILE
from lorafit.tokenizer import Tokenizer


class Indices(torch.utils.data.Dataset):
    """Sample indices as transformers' Trainer feeds them to its collator (peft_side.hf_batch pads them)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, int]:
        return {"index": i}


def peft_adapter(cfg: DemoConfig, checkpoint: Path, train_file: Path, out: Path, bf16: bool) -> tuple[Path, dict]:
    """Train the same recipe with PEFT and transformers' Trainer; (adapter directory, training figures)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    from transformers.utils import logging

    logging.disable_progress_bar()
    dataset = TokenDataset.load(train_file)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    model = get_peft_model(model, peft_lora_config(cfg.lora()))
    train = cfg.training()
    args = TrainingArguments(
        output_dir=str(out / "peft-trainer"),
        per_device_train_batch_size=train.micro_batch_size,
        gradient_accumulation_steps=train.accumulation,
        learning_rate=train.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=train.warmup_steps,
        weight_decay=train.weight_decay,
        max_grad_norm=train.grad_clip or 0.0,
        num_train_epochs=train.epochs,
        seed=cfg.seed,
        bf16=bf16,
        use_cpu=True,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    pad_id = Tokenizer.from_checkpoint(checkpoint).eos_id
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Indices(len(dataset)),
        data_collator=lambda rows: hf_batch(dataset, [row["index"] for row in rows], pad_id),
    )
    started = time.perf_counter()
    state = trainer.train()
    seconds = time.perf_counter() - started
    adapter_dir = out / "peft"
    model.save_pretrained(adapter_dir)
    figures = {"seconds": seconds, "tokens_per_s": dataset.num_tokens() / seconds, "steps": state.global_step}
    return adapter_dir, figures


@torch.no_grad()
def transformers_score(adapter_dir: Path, checkpoint: Path, tokenizer: Tokenizer, data: EvalData, cfg: DemoConfig):
    """PEFT's adapter on transformers' model, answers by its greedy `generate`, one note at a time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    answers, references = [], []
    for i in range(len(data.dataset)):
        prompt, reference = prompt_and_reference(*data.dataset[i])
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=cfg.max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(tokenizer.stop_ids),
            pad_token_id=tokenizer.eos_id,
        )
        answers.append(tokenizer.decode(out[0, len(prompt) :].tolist(), skip_special_tokens=True))
        references.append(tokenizer.decode(reference, skip_special_tokens=True))
    return score(answers, references)


def run_seed(cfg: DemoConfig, checkpoint: Path, tokenizer: Tokenizer, peft_bf16: bool) -> dict:
    with TemporaryDirectory() as tmp:
        out = Path(tmp)
        write_notes(cfg, out)
        data = load_eval_data(out / "notes_test.json", tokenizer, STYLE)
        ours_dir = out / "lorafit"
        result = train_adapter(cfg, out, checkpoint, ours_dir, progress=False)
        ours = {"seconds": result.seconds, "tokens_per_s": result.tokens_per_s, "steps": result.steps}
        ours["score"] = measure_adapter(cfg, ours_dir, checkpoint, tokenizer, data, samples=0)
        peft_dir, theirs = peft_adapter(cfg, checkpoint, ours_dir / "data" / "train.safetensors", out, peft_bf16)
        theirs["score"] = measure_adapter(cfg, peft_dir, checkpoint, tokenizer, data, samples=0)
        theirs["transformers_generate"] = transformers_score(peft_dir, checkpoint, tokenizer, data, cfg)
        ours["precision"] = json.loads((ours_dir / RUN_FILE).read_text())["train"]["precision"]
    theirs["precision"] = "bf16-mixed" if peft_bf16 else "32-true"
    return {"seed": cfg.seed, "notes": cfg.n_test, "lorafit": ours, "peft": theirs}


def notes(share: float, n: int) -> str:
    """A share of n notes as 'k/n'."""
    return f"{round(share * n)}/{n}"


def table(rows: list[dict]) -> str:
    lines = [
        "| seed | lorafit exact | lorafit loss | PEFT exact | PEFT exact (transformers generate) | PEFT loss "
        "| lorafit tokens/s / PEFT's |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ours, theirs, n = row["lorafit"], row["peft"], row["notes"]
        lines.append(
            f"| {row['seed']} | {notes(ours['score']['generation']['exact_match'], n)} | {ours['score']['loss']:.4f} "
            f"| {notes(theirs['score']['generation']['exact_match'], n)} "
            f"| {notes(theirs['transformers_generate']['exact_match'], n)} | {theirs['score']['loss']:.4f} "
            f"| {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--peft-bf16", action="store_true", help="PEFT under bf16 autocast (default float32)")
    parser.add_argument("--quick", action="store_true", help="the demo's --quick sizes (64 notes, 12 held out)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    checkpoint = download(DEFAULT_MODEL)
    tokenizer = Tokenizer.from_checkpoint(checkpoint)
    rows = []
    for seed in args.seeds:
        sizes = DemoConfig.quick() if args.quick else DemoConfig()
        rows.append(run_seed(replace(sizes, seed=seed), checkpoint, tokenizer, args.peft_bf16))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{platform.machine()}, torch {torch.__version__}; exact match on the held-out notes")
    print(table(rows))
    for name in ("lorafit", "peft"):
        exact = [round(r[name]["score"]["generation"]["exact_match"] * r["notes"]) for r in rows]
        print(f"{name}: exact match {exact} on seeds {args.seeds}")
    if args.json:
        write_json(args.json, {"rows": rows})


if __name__ == "__main__":
    main()
