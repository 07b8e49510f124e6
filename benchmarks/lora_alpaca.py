"""LoRA end to end on real data: lorafit against Hugging Face PEFT + transformers, same recipe, same batches.

SmolLM2-135M-Instruct (lorafit's default checkpoint, float32, CPU) is LoRA-finetuned on the Alpaca 3k sample
(2,699 train / 300 val: lorafit's split, val_size=300, seed 42, one empty record skipped; chat prompts, prompt
masked, max length 256).
Both sides get exactly the same tokenised samples (lorafit's prepared TokenDataset) in lorafit's BatchPlan order,
each micro-batch right-padded to its longest sample:

- lorafit: `lorafit.train.train` on `lorafit.lora.apply_lora` (its own model, LM head only where labels exist);
- PEFT: `get_peft_model` on transformers' LlamaForCausalLM (SDPA, attention mask), in a plain PyTorch loop.

Same recipe: LoRA on q,v with r=8, alpha=16, dropout 0.05; AdamW lr 3e-4, betas (0.9, 0.999), eps 1e-8, weight
decay 0; linear warm-up then cosine decay to 0 (lorafit's schedule, given to PEFT as a LambdaLR); gradient
clipping at norm 1; micro-batch 4 accumulated to the global batch; loss = mean over the supervised tokens of the
whole global batch (PEFT: HF's `num_items_in_batch`). LoRA A matrices get the same seeded values on both sides
and the torch seed is the same, so dropout masks match too: the two runs should follow the same loss curve.

Each framework runs in its own subprocess; we report validation loss at step 0 and after N steps (on the same
fixed val subset), training wall and CPU time, real (non-padding) tokens/s and peak RSS (ru_maxrss) of that
process. CPU time well under 2x wall time on 2 cores means other work shared the machine: re-run on a quiet one.

    python benchmarks/lora_alpaca.py                    # 16 steps of global batch 8: ~20 min on 2 busy cores
    python benchmarks/lora_alpaca.py --steps 2 --val-samples 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft_side import hf_batch, peak_rss_bytes, peft_model, supervised

from lorafit.data import BatchPlan, TokenDataset, load_prepared, prepare_source
from lorafit.hub import resolve_checkpoint
from lorafit.lora import LoRAConfig
from lorafit.tokenizer import Tokenizer
from lorafit.train import TrainConfig, learning_rate_at

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_3k.json"
FRAMEWORKS = ("lorafit", "peft")
LORA = LoRAConfig(r=8, alpha=16, dropout=0.05, targets=("q", "v"))


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The one recipe both sides follow."""
    return TrainConfig(
        max_steps=args.steps,
        micro_batch_size=4,
        global_batch_size=args.global_batch,
        learning_rate=3e-4,
        weight_decay=0.0,
        warmup_steps=args.warmup,
        grad_clip=1.0,
        max_seq_length=256,
        eval_interval=0,
        eval_batches=0,
        save_interval=0,
        precision="32-true",
    )


def val_subset(val: TokenDataset, n: int) -> TokenDataset:
    """The first n validation samples (the split is already shuffled), the same for both frameworks."""
    return TokenDataset.from_samples([(val[i][0].tolist(), val[i][1].tolist()) for i in range(min(n, len(val)))])


def seed_lora_a(model: torch.nn.Module, seed: int) -> None:
    """Give every LoRA A the same seeded values on both sides (PEFT's and lorafit's default init distribution)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_A" in name:  # same module order in both models: layer by layer, q before v
                bound = 1 / math.sqrt(weight.shape[1])
                weight.copy_(torch.empty_like(weight).uniform_(-bound, bound, generator=generator))


def run_lorafit(args: argparse.Namespace, train_set: TokenDataset, val_set: TokenDataset) -> dict:
    """Train with lorafit's own loop; validation with lorafit's evaluate."""
    from lorafit.checkpoint import load_model
    from lorafit.lora import apply_lora
    from lorafit.train import evaluate, train

    cfg = train_config(args)
    model = load_model(resolve_checkpoint(args.checkpoint))
    apply_lora(model, LORA)
    seed_lora_a(model, cfg.seed)
    val_loss_0 = evaluate(model, val_set, cfg, args.pad_id, torch.device("cpu"))
    torch.manual_seed(cfg.seed)
    run_dir = Path(args.data_dir) / "lorafit_run"
    cpu_started = time.process_time()
    result = train(model, train_set, None, cfg, run_dir, args.pad_id, progress=False)
    losses = [json.loads(line)["train_loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "val_loss_0": val_loss_0,
        "val_loss": evaluate(model, val_set, cfg, args.pad_id, torch.device("cpu")),
        "train_losses": losses,
        "seconds": result.seconds,
        "cpu_seconds": time.process_time() - cpu_started,
        "tokens_per_s": result.tokens_per_s,
    }


@torch.no_grad()
def peft_val_loss(model: torch.nn.Module, val_set: TokenDataset, pad_id: int) -> float:
    """Mean per-token loss over length-sorted micro-batches of 4 (as lorafit's evaluate with eval_batches=0)."""
    model.eval()
    order = sorted(range(len(val_set)), key=val_set.lengths.__getitem__)
    total, count = 0.0, 0
    for start in range(0, len(order), 4):
        batch = hf_batch(val_set, order[start : start + 4], pad_id)
        n = supervised(batch["labels"])
        total += model(**batch, num_items_in_batch=n).loss.item() * n  # HF: sum / num_items_in_batch
        count += n
    model.train()
    return total / count


def run_peft(args: argparse.Namespace, train_set: TokenDataset, val_set: TokenDataset) -> dict:
    """Train the PEFT model in a plain loop over lorafit's batches, in lorafit's order."""
    cfg = train_config(args)
    model = peft_model(resolve_checkpoint(args.checkpoint), LORA)
    seed_lora_a(model, cfg.seed)
    val_loss_0 = peft_val_loss(model, val_set, args.pad_id)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_at(step, args.steps, cfg) / cfg.learning_rate
    )
    plan = BatchPlan(train_set.lengths, cfg.micro_batch_size, cfg.seed)
    steps_per_epoch = math.ceil(len(plan) / cfg.accumulation)
    torch.manual_seed(cfg.seed)
    model.train()
    losses, real_tokens, started, cpu_started = [], 0, time.perf_counter(), time.process_time()
    for step in range(args.steps):
        epoch, index = divmod(step, steps_per_epoch)
        indices = plan.batches(epoch)[index * cfg.accumulation : (index + 1) * cfg.accumulation]
        batches = [hf_batch(train_set, b, args.pad_id) for b in indices]
        n_supervised = sum(supervised(b["labels"]) for b in batches)
        loss_sum = 0.0
        for batch in batches:
            loss = model(**batch, num_items_in_batch=n_supervised).loss
            loss.backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss_sum)
        real_tokens += sum(train_set.lengths[i] for b in indices for i in b)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return {
        "val_loss_0": val_loss_0,
        "val_loss": peft_val_loss(model, val_set, args.pad_id),
        "train_losses": losses,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "tokens_per_s": real_tokens / seconds,
    }


def worker(args: argparse.Namespace) -> None:
    """One framework's run, in this process; the result goes to args.result as JSON."""
    train_set, val_set = load_prepared(args.data_dir)
    run = run_lorafit if args.worker == "lorafit" else run_peft
    result = run(args, train_set, val_subset(val_set, args.val_samples))
    result["peak_rss_bytes"] = peak_rss_bytes()
    Path(args.result).write_text(json.dumps(result))


def markdown_table(results: dict[str, dict], steps: int) -> str:
    """lorafit and PEFT side by side, with the ratio lorafit / PEFT."""
    rows = [
        ("val loss, step 0", "val_loss_0", "{:.4f}"),
        (f"val loss, step {steps}", "val_loss", "{:.4f}"),
        ("training wall time (s)", "seconds", "{:.1f}"),
        ("training CPU time (s)", "cpu_seconds", "{:.1f}"),
        ("real tokens/s", "tokens_per_s", "{:.0f}"),
        ("peak RSS (MiB)", "peak_rss_mib", "{:.0f}"),
    ]
    lines = ["| metric | lorafit | PEFT | lorafit / PEFT |", "|---|---:|---:|---:|"]
    for label, key, fmt in rows:
        ours, theirs = results["lorafit"][key], results["peft"][key]
        lines.append(f"| {label} | {fmt.format(ours)} | {fmt.format(theirs)} | {ours / theirs:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps")
    parser.add_argument("--global-batch", type=int, default=8, help="samples per optimizer step")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: steps // 5)")
    parser.add_argument("--val-samples", type=int, default=100, help="validation samples (of the 300)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--checkpoint", default=None, help="default: lorafit's SmolLM2-135M-Instruct")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--pad-id", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.warmup = args.warmup if args.warmup is not None else max(1, args.steps // 5)
    if args.worker:
        return worker(args)

    tokenizer = Tokenizer.from_checkpoint(resolve_checkpoint(args.checkpoint))
    results = {}
    with tempfile.TemporaryDirectory(prefix="lora_alpaca-") as tmp:
        info = prepare_source(
            args.data,
            tokenizer,
            Path(tmp) / "data",
            max_seq_length=256,
            mask_prompt=True,
            val_size=300,
            seed=42,
            progress=False,
        )
        print(
            f"data: {info.train} train / {info.val} val ({info.prompt_style} prompts); {args.steps} steps of "
            f"{args.global_batch} samples, {args.warmup} warm-up; val loss on {args.val_samples} samples",
            flush=True,
        )
        for name in FRAMEWORKS:
            out = Path(tmp) / f"{name}.json"
            command = [
                sys.executable,
                __file__,
                "--worker",
                name,
                "--data-dir",
                info.out_dir,
                "--result",
                str(out),
                "--pad-id",
                str(tokenizer.eos_id),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--global-batch",
                str(args.global_batch),
                "--val-samples",
                str(args.val_samples),
            ]
            if args.checkpoint:
                command += ["--checkpoint", str(args.checkpoint)]
            subprocess.run(command, check=True)
            results[name] = json.loads(out.read_text())
            results[name]["peak_rss_mib"] = results[name]["peak_rss_bytes"] / 2**20
            print(
                f"{name}: val loss {results[name]['val_loss']:.4f} after {results[name]['seconds']:.0f} s", flush=True
            )
    print(markdown_table(results, args.steps))
    gap = results["lorafit"]["val_loss"] / results["peft"]["val_loss"] - 1
    print(f"\nval loss gap lorafit vs PEFT: {100 * gap:+.2f}% (target: within 2%)")
    if args.json:
        setup = {k: getattr(args, k) for k in ("steps", "global_batch", "warmup", "val_samples")}
        args.json.write_text(json.dumps({"setup": setup, **results}, indent=2))


if __name__ == "__main__":
    main()
