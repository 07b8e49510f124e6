"""Base model, LoRA, DoRA, QLoRA, LLaMA-Adapter v1/v2 and full finetuning side by side: the seed article's comparison.

SmolLM2-135M-Instruct (lorafit's default checkpoint, float32, CPU) on the Alpaca 3k sample, prepared once for every
method (lorafit's split: val_size=300, seed 42; chat prompts, prompt masked, max length 256). Every method trains
through `lorafit.finetune.finetune` in a process of its own, on the same batches in the same order (same seed,
global batch, micro-batch 4, warm-up then cosine decay, gradient clipping at 1, weight decay 0), for the same number
of steps; only the learning rate is each method's usual one (lit-llama's finetune/ scripts: LoRA 3e-4, Adapter and
Adapter v2 9e-3, full 3e-5; those scripts also use weight decay 0.02 for the adapters, 0 for LoRA and full, and
warm the adapters up over 2 epochs, where here every method warms up for steps // 5; `--lr METHOD=LR` overrides).
LoRA: q,v with r=8, alpha 16, dropout 0.05; DoRA the same with a learned magnitude; QLoRA the same over an nf4-dq
base (its model FLOPs counted as LoRA's). Adapter: 10 prompt tokens from layer 2 on. The base model is not trained.

Per method: trainable parameters (the tensors of the saved file; for base none), the saved file (LoRA's and the
adapters' weights file, full's model.safetensors; base: its own model.safetensors), peak RSS of the process
(ru_maxrss, taken when finetune() returns: loading, training, evaluating, saving; base: loading and evaluating),
median seconds per optimizer step, real (non-padding) tokens/s over the training steps, validation loss after the
last step (lorafit's evaluate on the same fixed spread of `--eval-batches` length-sorted val micro-batches), decode
tokens/s for `--new-tokens` greedy tokens (best of 3, after `lorafit.generate.LLM.load` of the run) and the greedy,
chat-templated answer to QUESTION. Beside them, the shares of this machine's limits (machine.py's `probe`, run
once before the methods): training model FLOP/s (machine.py's `training_flops` over the samples the run's
batches held, per method: LoRA-adjusted, 6N for full, the frozen model for the adapters) against the float32
matmul peak, and decoding's weight bytes per token x tokens/s against the read bandwidth.

    python benchmarks/compare_methods.py --json compare_methods.json   # defaults: 7.6 min on 2 quiet CPU cores
    python benchmarks/compare_methods.py --steps 1 --global-batch 4 --eval-batches 1 --new-tokens 8   # smoke test
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import torch
from machine import decode_weight_bytes, describe, probe, share, training_flops
from safetensors import safe_open

from lorafit.adapter import AdapterConfig
from lorafit.checkpoint import load_config
from lorafit.data import IGNORE_INDEX, BatchPlan, TokenDataset, load_prepared, prepare_source
from lorafit.finetune import finetune
from lorafit.generate import LLM, GenerationStats, generate
from lorafit.hub import resolve_checkpoint
from lorafit.lora import ADAPTER_WEIGHTS as LORA_WEIGHTS
from lorafit.lora import LoRAConfig
from lorafit.methods.llama_adapter import WEIGHTS_FILE as ADAPTER_WEIGHTS
from lorafit.methods.qlora import QLoRAConfig
from lorafit.tokenizer import Tokenizer
from lorafit.train import TrainConfig, evaluate

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_3k.json"
LORA = LoRAConfig(r=8, alpha=16, dropout=0.05, targets=("q", "v"))
ADAPTER = AdapterConfig(prompt_length=10, start_layer=2)
ROWS = {  # row -> (the registered method, its config)
    "lora": ("lora", LORA),
    "dora": ("lora", replace(LORA, dora=True)),
    "qlora": ("qlora", QLoRAConfig(**asdict(LORA), quantize="nf4-dq")),
    "adapter": ("adapter", ADAPTER),
    "adapter-v2": ("adapter-v2", ADAPTER),
    "full": ("full", None),
}
METHODS = ("base", *ROWS)
LORA_ROWS = ("lora", "dora", "qlora")
# lit-llama's finetune/ scripts; DoRA and QLoRA at LoRA's
LEARNING_RATES = {"lora": 3e-4, "dora": 3e-4, "qlora": 3e-4, "adapter": 9e-3, "adapter-v2": 9e-3, "full": 3e-5}
QUESTION = "Explain how weight decay works."
MAX_LENGTH = 256


def train_config(args: argparse.Namespace, method: str) -> TrainConfig:
    """The shared recipe; the learning rate is the method's own (base: unused)."""
    return TrainConfig(
        max_steps=args.steps,
        micro_batch_size=4,
        global_batch_size=args.global_batch,
        learning_rate=args.learning_rates.get(method, 1.0),  # base trains nothing, but TrainConfig wants lr > 0
        weight_decay=0.0,
        warmup_steps=max(1, args.steps // 5),
        grad_clip=1.0,
        max_seq_length=MAX_LENGTH,
        eval_interval=0,
        eval_batches=args.eval_batches,
        save_interval=0,
        precision="32-true",
    )


def saved_file(method: str, run_dir: Path, base: Path) -> Path:
    """The file a method's run leaves to be shipped."""
    if method in LORA_ROWS:
        return run_dir / LORA_WEIGHTS
    if method in ("adapter", "adapter-v2"):
        return run_dir / ADAPTER_WEIGHTS
    return (run_dir / "model" if method == "full" else base) / "model.safetensors"


def tensor_elements(path: Path) -> int:
    """Elements stored in a safetensors file (read from its header)."""
    total = 0
    with safe_open(path, "pt") as f:
        for name in f.keys():
            total += torch.Size(f.get_slice(name).get_shape()).numel()
    return total


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def train_timing(run_dir: Path, real_tokens: float) -> dict:
    """Median seconds per step and tokens/s over the training steps alone, from the run's metrics.jsonl."""
    elapsed = [json.loads(line)["elapsed_s"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_seconds = [b - a for a, b in zip([0.0, *elapsed], elapsed, strict=False)]
    return {
        "seconds_per_step": statistics.median(step_seconds),
        "tokens_per_s": real_tokens / elapsed[-1],
        "train_seconds": elapsed[-1],
    }


def trained_samples(train_set: TokenDataset, cfg: TrainConfig, steps: int) -> list[tuple[int, int]]:
    """(tokens, labelled positions) of each sample in the run's first `steps` steps, batched as train.train does."""
    plan = BatchPlan(train_set.lengths, cfg.micro_batch_size, cfg.seed)
    steps_per_epoch = -(-len(plan) // cfg.accumulation)
    samples = []
    for step in range(steps):
        epoch, index = divmod(step, steps_per_epoch)
        for batch in plan.batches(epoch)[index * cfg.accumulation : (index + 1) * cfg.accumulation]:
            for i in batch:
                _, labels = train_set[i]
                samples.append((train_set.lengths[i], int((labels[1:] != IGNORE_INDEX).sum())))
    return samples


def generation(llm: LLM, new_tokens: int) -> dict:
    """The greedy chat answer to QUESTION, then decode speed for exactly new_tokens tokens (no stop), best of 3."""
    answer = llm.generate(QUESTION, chat=True, max_new_tokens=new_tokens)
    ids = llm.prompt_ids(QUESTION, chat=True)
    speeds = []
    for _ in range(3):
        stats = GenerationStats()
        for _ in generate(llm.model, ids, new_tokens, stats=stats):
            pass
        speeds.append(stats.decode_tokens_per_s)
    return {"answer": answer.strip(), "generate_tokens_per_s": max(speeds)}


def run_method(args: argparse.Namespace, method: str) -> dict:
    """One method in this process: finetune (unless base), then load the result for generation."""
    base = resolve_checkpoint(args.checkpoint)
    cfg = train_config(args, method)
    run_dir = Path(args.work_dir) / method
    if method == "base":
        llm = LLM.load(base)
        tokenizer = Tokenizer.from_checkpoint(base)
        _, val_set = load_prepared(args.data_dir)
        out = {"val_loss": evaluate(llm.model, val_set, cfg, tokenizer.eos_id, torch.device("cpu"))}
        llm.model.eval()  # evaluate() leaves the model in training mode
        out |= {"trainable": 0, "peak_rss_bytes": peak_rss_bytes()}
    else:
        torch.manual_seed(cfg.seed)
        registered, method_config = ROWS[method]
        result = finetune(
            registered, args.data_dir, run_dir, args.checkpoint, cfg, method_config, overwrite=True, progress=False
        )
        real_tokens = round(result.tokens_per_s * result.seconds)
        samples = trained_samples(load_prepared(args.data_dir)[0], cfg, result.steps)
        counted = sum(length for length, _ in samples)
        if counted != real_tokens:  # then these are not the batches it trained on
            raise RuntimeError(f"{method}: FLOPs counted over {counted} tokens, but the run trained {real_tokens}")
        out = {
            "val_loss": result.final_val_loss,
            "peak_rss_bytes": peak_rss_bytes(),
            "trainable": tensor_elements(saved_file(method, run_dir, base)),
            # QLoRA and DoRA count as LoRA: dequantising and DoRA's weight norms are work beyond the model's FLOPs.
            "model_flops": training_flops(
                load_config(base), "lora" if method in LORA_ROWS else registered, samples, LORA
            ),
            **train_timing(run_dir, real_tokens),
        }
        llm = LLM.load(args.checkpoint, adapter=run_dir)
    out["file_bytes"] = saved_file(method, run_dir, base).stat().st_size
    out["weight_bytes"] = decode_weight_bytes(load_config(base), next(llm.model.parameters()).element_size())
    return out | generation(llm, args.new_tokens)


def cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(results: dict[str, dict], learning_rates: dict[str, float], machine: dict) -> str:
    """One row per method (base: no training, so no learning rate or training speed), with shares of the limits."""
    peak, bandwidth = machine["float32_gflops"], machine["read_gb_per_s"]
    lines = [
        "| method | lr | trainable params | saved file (MiB) | peak RSS (MiB) | s/step | real tokens/s "
        f"| share of {peak:.1f} GFLOP/s matmul | val loss | generate tokens/s | share of {bandwidth:.1f} GB/s read |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, r in results.items():
        gflops = r["model_flops"] / r["train_seconds"] / 1e9 if "model_flops" in r else None
        lines.append(
            f"| {method} | {cell(learning_rates.get(method), 'g')} | {r['trainable']:,} "
            f"| {r['file_bytes'] / 2**20:.3f} | {r['peak_rss_bytes'] / 2**20:.0f} "
            f"| {cell(r.get('seconds_per_step'), '.2f')} | {cell(r.get('tokens_per_s'), '.0f')} "
            f"| {share(gflops, peak)} "
            f"| {r['val_loss']:.4f} | {r['generate_tokens_per_s']:.1f} "
            f"| {share(r['weight_bytes'] * r['generate_tokens_per_s'] / 1e9, bandwidth)} |"
        )
    return "\n".join(lines)


def answers(results: dict[str, dict], width: int) -> str:
    """Each method's answer on one line, cut at `width` characters."""
    lines = [f'Answers to "{QUESTION}" (greedy, chat template):', ""]
    for method, r in results.items():
        text = " ".join(r["answer"].split())
        lines.append(f"- **{method}**: {text[:width] + ('...' if len(text) > width else '')}")
    return "\n".join(lines)


def compare(args: argparse.Namespace, work_dir: Path) -> None:
    """Prepare the data once, run every method in a process of its own, print and save the comparison."""
    tokenizer = Tokenizer.from_checkpoint(resolve_checkpoint(args.checkpoint))
    info = prepare_source(
        args.data,
        tokenizer,
        work_dir / "data",
        max_seq_length=MAX_LENGTH,
        mask_prompt=True,
        val_size=300,
        seed=42,
        progress=False,
    )
    print(
        f"data: {info.train} train / {info.val} val ({info.prompt_style} prompts); {args.steps} steps of "
        f"{args.global_batch} samples per method; val loss on {args.eval_batches} micro-batches of 4",
        flush=True,
    )
    machine = probe()  # before any method runs, on the threads the workers will use
    print(f"machine: {describe(machine)}", flush=True)
    results = {}
    for method in args.methods:
        out = work_dir / f"{method}.json"
        shutil.rmtree(work_dir / method, ignore_errors=True)  # an earlier comparison's run: finetune won't overwrite it
        # The same command line, so the worker sees the same settings.
        command = [
            sys.executable,
            __file__,
            *sys.argv[1:],
            "--worker",
            method,
            "--data-dir",
            info.out_dir,
            "--work-dir",
            str(work_dir),
            "--result",
            str(out),
        ]
        subprocess.run(command, check=True)
        results[method] = json.loads(out.read_text())
        print(f"{method}: val loss {results[method]['val_loss']:.4f}", flush=True)
    print(f"\n{markdown_table(results, args.learning_rates, machine)}\n\n{answers(results, width=160)}")
    if args.json:
        setup = {k: getattr(args, k) for k in ("steps", "global_batch", "eval_batches", "new_tokens", "learning_rates")}
        args.json.write_text(json.dumps({"setup": setup, "machine": machine, **results}, indent=2))


def learning_rate(pair: str) -> tuple[str, float]:
    """METHOD=LR from the command line."""
    method, _, value = pair.partition("=")
    if method not in LEARNING_RATES or not value:
        raise SystemExit(f"--lr {pair!r}: expected METHOD=LR with METHOD one of {', '.join(LEARNING_RATES)}")
    return method, float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per method")
    parser.add_argument("--global-batch", type=int, default=8, help="samples per optimizer step")
    parser.add_argument("--eval-batches", type=int, default=25, help="val micro-batches of 4 (of 75) to score")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens for the answer and the speed")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--checkpoint", default=None, help="default: lorafit's SmolLM2-135M-Instruct")
    parser.add_argument("--lr", nargs="+", default=[], metavar="METHOD=LR", help="override a learning rate")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--work-dir", help="keep the data, runs and results here (default: a temporary directory)")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.learning_rates = LEARNING_RATES | dict(learning_rate(pair) for pair in args.lr)
    if args.worker:
        Path(args.result).write_text(json.dumps(run_method(args, args.worker)))
        return
    if args.work_dir:
        return compare(args, Path(args.work_dir))
    with tempfile.TemporaryDirectory(prefix="compare_methods-") as tmp:
        compare(args, Path(tmp))


if __name__ == "__main__":
    main()
