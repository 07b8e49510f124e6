"""LoRA training speed and memory on CPU: lorafit against HF PEFT + transformers, each in its usual practice.

Same model (lorafit's default checkpoint, SmolLM2-135M-Instruct, float32), same data, same recipe; what differs
is how each framework feeds it, as its users would:

- data: the first 256 Alpaca records with a non-empty output (shared/data/alpaca_3k.json, file order), tokenised
  once by lorafit (`encode_record`: chat template, prompt masked, max length 256), so both see identical token
  ids and labels;
- recipe: LoRA on q,v with r=8, alpha 16, dropout 0.05; AdamW lr 3e-4 (weight decay 0) with lorafit's schedule
  (linear warm-up over a tenth of the steps, then cosine; PEFT gets it as a LambdaLR); gradient clipping at 1;
  micro-batch 4 = global batch (no accumulation); one epoch = 64 optimizer steps;
- lorafit: `lorafit.train.train` with its defaults, no switch: BatchPlan's length-grouped batches, the LM head only
  where labels exist, fused AdamW, `--precision auto` (bf16 mixed where this machine's bf16 matmul is >= 1.2x
  float32, else float32; the table says which), under bf16 mixed the frozen linear weights kept in bf16 as
  finetune keeps them (Method.store_for_training), and lorafit.process's settings, made when lorafit is imported
  (large buffers on transparent huge pages, 64 oneDNN primitives kept per cache) (--change picks an earlier row
  of CHANGES, or adds a switch);
- PEFT: `get_peft_model` on transformers' LlamaForCausalLM (SDPA attention, no KV cache) in a plain PyTorch
  loop: records in file order, each batch padded to its longest sample (dynamic padding, as a DataCollator
  does) with an attention mask, HF's loss = mean over the labelled tokens; float32, its default (--changes also
  runs it under bf16 autocast, which its users can switch on); torch's and oneDNN's own defaults in its worker
  (which imports lorafit's data code, so they are set explicitly: LIBRARY_DEFAULTS).

Runs alternate (lorafit, PEFT, lorafit, PEFT, ...), each in its own subprocess; per framework we print the median
over --repeats of: wall time of the epoch, real (non-padding) tokens/s, padding share of the tokens fed, peak
RSS (ru_maxrss of that process, model loading included) and the final loss (mean train loss of the last 8
steps; the two see their batches in different orders, so expect close, not equal, values); and lorafit / PEFT.
Beside the peer ratio, each side's model FLOP/s (machine.py's `training_flops` of the epoch's real tokens over
its wall time) as a share of this machine's matmul peak in the precision it trained in (float32 or bf16),
measured by machine.py's `probe` at the start (every mode prints that share).

--changes runs PEFT once, then lorafit once per row of CHANGES, each row adding one of lorafit's speed or memory
changes to the row above (the earlier rows are rebuilt by swapping lorafit functions for their plain PyTorch form in
that worker process), and prints tokens/s and peak RSS with their ratios to PEFT.

--scaling measures lorafit alone on synthetic sequences of exactly max length (second half labelled) for every
max length x micro-batch cell, each cell in its own subprocess: tokens/s over --steps timed steps after one
warm-up step, and peak RSS.

    python benchmarks/train_cpu.py --json train_cpu.json              # 2 repeats: ~15 min on 2 quiet cores
    python benchmarks/train_cpu.py --records 8 --repeats 1            # smoke test, under a minute
    python benchmarks/train_cpu.py --changes --json train_cpu_changes.json     # 15 runs: ~50 min
    python benchmarks/train_cpu.py --scaling --json train_cpu_scaling.json                 # 12 cells, ~10 min
    python benchmarks/train_cpu.py --scaling --lengths 128,256 --batches 1,4 --steps 1     # smoke test, ~1 min

The estimates assume ~200 tokens/s for lorafit on 2 quiet cores (one busy core measured ~120 at max length 256,
micro-batch 4). The scaling grid feeds 4 x 24,960 tokens plus a model load per cell; its largest cell (1024 x 8)
needs roughly 17 GiB of RSS (about 2 MiB per token in flight): trim it with --lengths / --batches on a smaller
machine (a cell that fails is reported as failed and the grid goes on).

litgpt is not a third column: `pip install litgpt` (0.5.13) pins huggingface_hub<1.4, while transformers 5
needs >=1.31, so it cannot share this environment; the script says so when litgpt is not importable.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import describe, probe, share, training_flops
from peft_side import hf_batch, peak_rss_bytes, peft_model

from lorafit.data import IGNORE_INDEX, BatchPlan, TokenDataset, default_style, encode_record, load_records
from lorafit.estimate import config_for
from lorafit.hub import resolve_checkpoint
from lorafit.lora import LoRAConfig
from lorafit.process import PROCESS_ENV
from lorafit.tokenizer import Tokenizer
from lorafit.train import TrainConfig, learning_rate_at

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_3k.json"
FRAMEWORKS = ("lorafit", "peft")
LORA = LoRAConfig(r=8, alpha=16, dropout=0.05, targets=("q", "v"))
MAX_LENGTH = 256
MICRO_BATCH = 4
LAST_STEPS = 8  # the final loss averages this many last steps
SEED = 42
LITGPT_MISSING = (
    "litgpt: not installed (`pip install litgpt` 0.5.13 pins huggingface_hub<1.4, transformers 5 needs >=1.31)"
)


def train_config(
    steps: int, micro_batch: int = MICRO_BATCH, max_length: int = MAX_LENGTH, precision: str = "32-true"
) -> TrainConfig:
    """The recipe: one optimizer step per micro-batch, lorafit's warm-up + cosine schedule, no evaluation."""
    return TrainConfig(
        max_steps=steps,
        micro_batch_size=micro_batch,
        global_batch_size=micro_batch,
        learning_rate=3e-4,
        weight_decay=0.0,
        warmup_steps=max(1, steps // 10),
        grad_clip=1.0,
        max_seq_length=max_length,
        eval_interval=0,
        eval_batches=0,
        save_interval=0,
        precision=precision,
        seed=SEED,
    )


def alpaca_dataset(path: Path, n_records: int, tokenizer: Tokenizer) -> TokenDataset:
    """The first n records with a non-empty output, in file order, tokenised as lorafit's prepare does."""
    records = load_records(path).records[:n_records]  # load_records drops the empty ones
    style = default_style(tokenizer)
    samples = [encode_record(r, tokenizer, style, MAX_LENGTH, mask_prompt=True)[:2] for r in records]
    return TokenDataset.from_samples(samples)


def synthetic_dataset(vocab_size: int, length: int, n_samples: int) -> TokenDataset:
    """Random sequences of exactly `length` tokens, the second half labelled (like a masked prompt + answer)."""
    generator = torch.Generator().manual_seed(SEED)
    samples = []
    for _ in range(n_samples):
        ids = torch.randint(vocab_size, (length,), generator=generator).tolist()
        samples.append((ids, [IGNORE_INDEX] * (length // 2) + ids[length // 2 :]))
    return TokenDataset.from_samples(samples)


def padding_share(dataset: TokenDataset, batches: list[list[int]]) -> tuple[int, float]:
    """(real tokens, share of the fed tokens that are padding) when each batch is padded to its longest sample."""
    real = sum(dataset.lengths[i] for batch in batches for i in batch)
    fed = sum(max(dataset.lengths[i] for i in batch) * len(batch) for batch in batches)
    return real, 1 - real / fed


def file_order_batches(n: int, micro_batch: int) -> list[list[int]]:
    return [list(range(start, min(start + micro_batch, n))) for start in range(0, n, micro_batch)]


def epoch_flops(dataset: TokenDataset, checkpoint: str | None) -> int:
    """Model FLOPs of one LoRA epoch over the dataset's real tokens and labelled positions (padding not counted)."""
    samples = [(len(ids), int((labels[1:] != IGNORE_INDEX).sum())) for ids, labels in dataset]
    return training_flops(config_for(str(resolve_checkpoint(checkpoint))), "lora", samples, LORA)


def metrics_records(run_dir: Path) -> list[dict]:
    """The per-step records lorafit.train.train wrote to run_dir/metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------
# --changes: lorafit with its speed/memory changes added one at a time. Each step below is the state
# before a change, rebuilt here by swapping one lorafit function for its plain PyTorch form.


def plain_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def plain_lora_forward(self, x: torch.Tensor) -> torch.Tensor:
    """LoRALinear.forward through nn.Dropout and autograd (saves the float mask and the dropped-out input)."""
    h = self.lora_dropout(x) if self.training else x
    return torch.nn.functional.linear(x, self.weight) + self.lora_B(self.lora_A(h)) * self.scaling


def unchunked_loss_sum(model, input_ids: torch.Tensor, labels: torch.Tensor, fused_head: bool = True) -> torch.Tensor:
    """The LM head and cross-entropy at the supervised positions in one piece (fused_head: as train passes it)."""
    hidden = model.hidden_states(input_ids)[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = model.lm_head(hidden[keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")


def full_head_loss_sum(model, input_ids: torch.Tensor, labels: torch.Tensor, fused_head: bool = True) -> torch.Tensor:
    """The LM head at every position, then cross-entropy ignoring the unlabelled ones (what HF does; fused_head:
    as train passes it)."""
    logits = model(input_ids)[:, :-1].float()
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


class FileOrderPlan(BatchPlan):
    """Batches of consecutive records in file order, each padded to its longest (as PEFT's side is fed)."""

    def batches(self, epoch: int) -> list[list[int]]:
        return file_order_batches(len(self.lengths), self.micro_batch_size)


class ShuffledPlan(BatchPlan):
    """Length-grouped batches in shuffled order, the largest wherever the shuffle puts it."""

    def batches(self, epoch: int) -> list[list[int]]:
        return self.shuffled_batches(epoch)


CHANGES = (
    ("lorafit's model fed as PEFT's side: file order, LM head at every position, float32", "baseline"),
    ("+ length-grouped batches (BatchPlan)", "grouping"),
    ("+ LM head and cross-entropy only at supervised positions", "supervised-head"),
    ("+ SwiGLU and LoRA dropout saving less (ops.py, LoRALinear)", "lean-autograd"),
    ("+ LM head + cross-entropy fused, 128 positions at a time", "fused-head"),
    ("+ largest batch first (BatchPlan)", "largest-first"),
    ("+ AdamW fused on the CPU", "fused-adamw"),
    ("+ precision by measurement (--precision auto: bf16 mixed where bf16 matmul is faster)", "auto-precision"),
    (
        "+ buffers >= 2 MiB on transparent huge pages (lorafit.process, set on import)",
        "huge-pages",
    ),  # fmt: skip
    ("+ frozen linear weights kept in bf16 under bf16 mixed (Method.store_for_training)", "frozen-bf16"),
    (
        "+ oneDNN's and ideep's caches keep 64 primitives, not 1024 (lorafit.process) = lorafit's defaults",
        "primitive-cache",
    ),  # fmt: skip
    (
        "+ each block compiled by torch.compile, dynamic shapes (this row only; measured here, not a lorafit switch)",
        "compile-blocks",
    ),  # fmt: skip
    ("+ buffers >= 1 MiB returned to the system when freed (--cpu-mmap-threshold 1048576, a switch)", "mmap-threshold"),
    ("+ activation checkpointing (--activation-checkpointing, a switch)", "activation-checkpointing"),
)
CHANGE_KEYS = [key for _, key in CHANGES]
PEFT_ROWS = ("HF PEFT + transformers, float32 (the peer, as its users run it)", "HF PEFT, bf16 autocast (a switch)")
DEFAULTS = "primitive-cache"  # the last row of lorafit as it runs without a switch


def plain_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """make_optimizer as it was: AdamW's default (foreach) implementation on the CPU."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate, weight_decay=0)


def undo_changes_after(change: str) -> list[str]:
    """Put back the plain form of every change listed after `change` in CHANGES (this process only); return them."""
    import lorafit.lora
    import lorafit.model
    import lorafit.train

    later = CHANGE_KEYS[CHANGE_KEYS.index(change) + 1 :]
    if "grouping" in later:
        lorafit.train.BatchPlan = FileOrderPlan
    elif "largest-first" in later:
        lorafit.train.BatchPlan = ShuffledPlan
    if "supervised-head" in later:
        lorafit.train.supervised_loss_sum = full_head_loss_sum
    elif "fused-head" in later:
        lorafit.train.supervised_loss_sum = unchunked_loss_sum
    if "lean-autograd" in later:
        lorafit.model.swiglu = plain_swiglu
        lorafit.lora.LoRALinear.forward = plain_lora_forward
    if "fused-adamw" in later:
        lorafit.train.make_optimizer = plain_optimizer
    return later


def run_lorafit(dataset: TokenDataset, args: argparse.Namespace, run_dir: Path) -> dict:
    """One epoch of lorafit's own loop on its length-grouped batches (minus the changes after args.change)."""
    import lorafit.train
    from lorafit.checkpoint import load_model
    from lorafit.methods import get_method
    from lorafit.runtime import resolve_precision

    undone = undo_changes_after(args.change)
    batches = lorafit.train.BatchPlan(dataset.lengths, MICRO_BATCH, SEED).batches(0)
    model = load_model(resolve_checkpoint(args.checkpoint))
    precision = resolve_precision("32-true" if "auto-precision" in undone else "auto", torch.device("cpu"))
    lora = get_method("lora")
    lora.apply(model, LORA)
    if "frozen-bf16" not in undone:
        lora.store_for_training(model, LORA, precision)
    cfg = train_config(len(batches), precision=precision)
    cfg.activation_checkpointing = args.change == "activation-checkpointing"
    if args.change == "compile-blocks":
        # Regional compilation, as torchtune compiles its layers: inductor writes each block's forward and backward.
        # The blocks share one code object, so one graph (per shape family) serves all 30; compiling is in the time.
        for block in model.layers:
            block.compile(dynamic=True)
    if "mmap-threshold" not in undone:
        cfg.cpu_mmap_threshold = 1 << 20
    result = lorafit.train.train(model, dataset, None, cfg, run_dir, args.pad_id, progress=False)
    real, padding = padding_share(dataset, batches)
    losses = [r["train_loss"] for r in metrics_records(run_dir)]
    return {"seconds": result.seconds, "real_tokens": real, "padding_share": padding, "losses": losses,
            "precision": cfg.precision}  # fmt: skip


def run_peft(dataset: TokenDataset, args: argparse.Namespace) -> dict:
    """One epoch of a plain PyTorch loop over the PEFT model, records in file order, dynamic padding."""
    batches = file_order_batches(len(dataset), MICRO_BATCH)
    cfg = train_config(len(batches))
    model = peft_model(resolve_checkpoint(args.checkpoint), LORA)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_at(step, len(batches), cfg) / cfg.learning_rate
    )
    model.train()
    precision = "bf16-mixed" if args.peft_autocast else "32-true"
    losses, started = [], time.perf_counter()
    for indices in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.peft_autocast):
            loss = model(**hf_batch(dataset, indices, args.pad_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    seconds = time.perf_counter() - started
    real, padding = padding_share(dataset, batches)
    return {"seconds": seconds, "real_tokens": real, "padding_share": padding, "losses": losses, "precision": precision}


def run_scaling_cell(args: argparse.Namespace, run_dir: Path) -> dict:
    """lorafit on full-length synthetic batches: tokens/s over the timed steps that follow one warm-up step."""
    from lorafit.checkpoint import load_model
    from lorafit.lora import apply_lora
    from lorafit.train import train

    model = load_model(resolve_checkpoint(args.checkpoint))
    apply_lora(model, LORA)
    total_steps = 1 + args.steps
    dataset = synthetic_dataset(model.config.vocab_size, args.length, args.batch * total_steps)
    cfg = train_config(total_steps, args.batch, args.length, precision="auto")
    train(model, dataset, None, cfg, run_dir, 0, progress=False)
    elapsed = [r["elapsed_s"] for r in metrics_records(run_dir)]  # after each step, from the loop's start
    seconds = elapsed[-1] - elapsed[0]
    tokens_per_s = args.steps * args.batch * args.length / seconds
    return {"seconds": seconds, "tokens_per_s": tokens_per_s, "precision": cfg.precision}


def worker(args: argparse.Namespace) -> None:
    """One run in this process; its result goes to args.result as JSON."""
    torch.manual_seed(SEED)  # LoRA init and dropout masks: repeats of a run are the same computation
    with tempfile.TemporaryDirectory(prefix="train_cpu-run-") as tmp:
        if args.worker == "scale":
            result = run_scaling_cell(args, Path(tmp))
        else:
            dataset = TokenDataset.load(args.data_file)
            result = run_lorafit(dataset, args, Path(tmp)) if args.worker == "lorafit" else run_peft(dataset, args)
            result["tokens_per_s"] = result["real_tokens"] / result["seconds"]
            result["final_loss"] = statistics.mean(result["losses"][-LAST_STEPS:])
    result["peak_rss_mib"] = peak_rss_bytes() / 2**20
    Path(args.result).write_text(json.dumps(result))


PROCESS_SETTINGS = {
    "huge-pages": ("THP_MEM_ALLOC_ENABLE",),
    "primitive-cache": ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"),
}
"""The CHANGES row that turns each of lorafit.process's settings on."""
# torch's allocator, oneDNN's and ideep's own defaults
LIBRARY_DEFAULTS = {
    "THP_MEM_ALLOC_ENABLE": "0",
    "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024",
    "LRU_CACHE_CAPACITY": "1024",
}


def worker_env(options: list[str]) -> dict[str, str]:
    """A worker's environment: each of lorafit's process settings (lorafit.process) from its row of CHANGES on;
    PEFT and the earlier rows get the libraries' own defaults, as a program that never imports lorafit does.
    They must be in place when the interpreter starts (lorafit.process leaves a value already set alone), so
    they cannot be undone inside the worker."""
    framework = options[options.index("--worker") + 1]
    change = options[options.index("--change") + 1] if "--change" in options else DEFAULTS
    env = dict(os.environ)
    for row, names in PROCESS_SETTINGS.items():
        applied = framework != "peft" and CHANGE_KEYS.index(change) >= CHANGE_KEYS.index(row)
        env |= {name: PROCESS_ENV[name] if applied else LIBRARY_DEFAULTS[name] for name in names}
    return env


def run_worker(args: argparse.Namespace, out: Path, options: list[str]) -> dict | None:
    """Run `options` in a fresh interpreter; its result, or None when it failed."""
    command = [sys.executable, __file__, "--result", str(out), *options]
    if args.checkpoint:
        command += ["--checkpoint", str(args.checkpoint)]
    if subprocess.run(command, env=worker_env(options)).returncode:
        return None
    return json.loads(out.read_text())


COMPARED = (
    ("epoch wall time (s)", "seconds", "{:.1f}"),
    ("real tokens/s", "tokens_per_s", "{:.0f}"),
    ("model GFLOP/s", "model_gflops", "{:.1f}"),
    ("padding share of fed tokens", "padding_share", "{:.1%}"),
    ("peak RSS (MiB)", "peak_rss_mib", "{:.0f}"),
    (f"final loss (mean of last {LAST_STEPS} steps)", "final_loss", "{:.4f}"),
)


def peak_gflops(machine: dict, precision: str) -> float:
    """The matmul peak of the precision a run's products ran in."""
    return machine["bfloat16_gflops" if precision.startswith("bf16") else "float32_gflops"]


def peak_share(run: dict, machine: dict) -> str:
    """Model FLOP/s as a share of the matmul peak of the run's precision, e.g. '61% of bf16's 406 GFLOP/s'."""
    name = "bf16" if run["precision"].startswith("bf16") else "float32"
    peak = peak_gflops(machine, run["precision"])
    return f"{share(run['model_gflops'], peak)} of {name}'s {peak:.0f} GFLOP/s"


def compare_table(medians: dict[str, dict], machine: dict) -> str:
    """lorafit and PEFT side by side: lorafit / PEFT, and model FLOP/s as shares of the machine's matmul peaks."""
    lines = ["| median | lorafit | PEFT | lorafit / PEFT |", "|---|---:|---:|---:|"]
    precisions = [medians[name]["precision"] for name in FRAMEWORKS]
    lines.append(f"| precision | {precisions[0]} | {precisions[1]} | |")
    for label, key, fmt in COMPARED:
        ours, theirs = medians["lorafit"][key], medians["peft"][key]
        ratio = f"{ours / theirs:.3f}" if theirs else "n/a"
        lines.append(f"| {label} | {fmt.format(ours)} | {fmt.format(theirs)} | {ratio} |")
    ours, theirs = (peak_share(medians[name], machine) for name in FRAMEWORKS)
    lines.append(f"| model FLOP/s as a share of the matmul peak | {ours} | {theirs} | |")
    float32 = machine["float32_gflops"]
    ours, theirs = (share(medians[name]["model_gflops"], float32) for name in FRAMEWORKS)
    lines.append(f"| ... of the float32 peak ({float32:.0f} GFLOP/s) | {ours} | {theirs} | |")
    return "\n".join(lines)


def compare(args: argparse.Namespace) -> dict:
    """Alternate lorafit and PEFT runs on the same tokenised records; print and return the medians."""
    tokenizer = Tokenizer.from_checkpoint(resolve_checkpoint(args.checkpoint))
    dataset = alpaca_dataset(args.data, args.records, tokenizer)
    flops = epoch_flops(dataset, args.checkpoint)
    steps = len(file_order_batches(len(dataset), MICRO_BATCH))
    print(
        f"data: {len(dataset)} records, {dataset.num_tokens()} tokens (max length {MAX_LENGTH}); one epoch = "
        f"{steps} steps of {MICRO_BATCH}; {args.repeats} repeat(s)",
        flush=True,
    )
    runs: dict[str, list[dict]] = {name: [] for name in FRAMEWORKS}
    with tempfile.TemporaryDirectory(prefix="train_cpu-") as tmp:
        data_file = Path(tmp) / "train.safetensors"
        dataset.save(data_file)
        for repeat in range(args.repeats):
            for name in FRAMEWORKS:
                options = ["--worker", name, "--data-file", str(data_file), "--pad-id", str(tokenizer.eos_id)]
                result = run_worker(args, Path(tmp) / f"{name}-{repeat}.json", options)
                if result is None:
                    sys.exit(f"{name} run {repeat + 1} failed")
                result["model_gflops"] = flops / result["seconds"] / 1e9
                runs[name].append(result)
                print(
                    f"{name} run {repeat + 1}: {result['seconds']:.1f} s, {result['tokens_per_s']:.0f} tokens/s, "
                    f"peak RSS {result['peak_rss_mib']:.0f} MiB, final loss {result['final_loss']:.4f}",
                    flush=True,
                )
    medians = {
        name: {key: statistics.median(r[key] for r in results) for _, key, _ in COMPARED}
        | {"precision": results[0]["precision"]}
        for name, results in runs.items()
    }
    print(compare_table(medians, args.machine))
    litgpt = "litgpt: installed but not benchmarked" if importlib.util.find_spec("litgpt") else LITGPT_MISSING
    print(f"\n{litgpt}")
    setup = {
        "records": len(dataset),
        "steps": steps,
        "micro_batch": MICRO_BATCH,
        "repeats": args.repeats,
        "model_flops_per_epoch": flops,
    }
    return {"setup": setup, "median": medians, "runs": runs, "litgpt": litgpt}


def changes_table(rows: list[tuple[str, dict]], peft: dict, machine: dict) -> str:
    """One row per run: tokens/s and peak RSS, both as ratios to PEFT's (float32), and its share of matmul peak."""
    lines = [
        "| change | real tokens/s | peak RSS (MiB) | tokens/s / PEFT | peak RSS / PEFT | model FLOP/s: share of peak |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, r in rows:
        speed, memory = r["tokens_per_s"] / peft["tokens_per_s"], r["peak_rss_mib"] / peft["peak_rss_mib"]
        lines.append(
            f"| {label} | {r['tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} | {speed:.2f} | {memory:.2f} "
            f"| {peak_share(r, machine)} |"
        )
    return "\n".join(lines)


def changes(args: argparse.Namespace) -> dict:
    """PEFT once, then lorafit once per row of CHANGES (each adds one change to the row above)."""
    tokenizer = Tokenizer.from_checkpoint(resolve_checkpoint(args.checkpoint))
    dataset = alpaca_dataset(args.data, args.records, tokenizer)
    flops = epoch_flops(dataset, args.checkpoint)
    rows, results = [], {}
    with tempfile.TemporaryDirectory(prefix="train_cpu-changes-") as tmp:
        data_file = Path(tmp) / "train.safetensors"
        dataset.save(data_file)
        common = ["--data-file", str(data_file), "--pad-id", str(tokenizer.eos_id)]
        first = CHANGE_KEYS.index(args.changes_from)
        peers = [(PEFT_ROWS[0], "peft"), (PEFT_ROWS[1], "peft-autocast")]
        for label, key in [*peers, *CHANGES[first:]]:
            worker = ["--worker", "lorafit", "--change", key]
            if key.startswith("peft"):
                worker = ["--worker", "peft"] + (["--peft-autocast"] if key == "peft-autocast" else [])
            result = run_worker(args, Path(tmp) / f"{key}.json", worker + common)
            if result is None:
                sys.exit(f"{label}: run failed")
            result["model_gflops"] = flops / result["seconds"] / 1e9
            tokens_per_s, rss = result["tokens_per_s"], result["peak_rss_mib"]
            print(f"{label}: {tokens_per_s:.0f} tokens/s, peak RSS {rss:.0f} MiB", flush=True)
            results[key] = result
            rows.append((label, result))
    print(changes_table(rows, results["peft"], args.machine))
    setup = {"records": len(dataset), "micro_batch": MICRO_BATCH, "model_flops_per_epoch": flops}
    return {"setup": setup, "runs": results}


def scaling_table(cells: list[dict], lengths: list[int], batches: list[int], machine: dict) -> str:
    """tokens/s, share of the matmul peak (of the precision run) and peak RSS per (max length, micro-batch) cell."""
    found = {(c["max_length"], c["micro_batch"]): c for c in cells}
    header = " | ".join(f"batch {b}: tokens/s, share of matmul peak, peak RSS" for b in batches)
    lines = [f"| max length | {header} |", "|---:|" + "---:|" * len(batches)]
    for length in lengths:
        row = []
        for batch in batches:
            cell = found[length, batch]
            ok = cell["tokens_per_s"] is not None
            shown = f"{cell['tokens_per_s']:.0f} tok/s, {peak_share(cell, machine)}, {cell['peak_rss_mib']:.0f} MiB"
            row.append(shown if ok else "failed")
        lines.append(f"| {length} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def scaling(args: argparse.Namespace) -> dict:
    """lorafit alone over max length x micro-batch, one subprocess per cell."""
    cells = []
    config = config_for(str(resolve_checkpoint(args.checkpoint)))
    with tempfile.TemporaryDirectory(prefix="train_cpu-scaling-") as tmp:
        for length in args.lengths:
            for batch in args.batches:
                options = ["--worker", "scale", "--length", str(length), "--batch", str(batch)]
                result = run_worker(args, Path(tmp) / f"{length}x{batch}.json", options + ["--steps", str(args.steps)])
                cell = {"max_length": length, "micro_batch": batch, "steps": args.steps}
                cell |= result or {"tokens_per_s": None, "peak_rss_mib": None}
                if result:  # synthetic_dataset labels the second half: length - length // 2 labelled positions
                    per_sample = training_flops(config, "lora", [(length, length - length // 2)], LORA)
                    cell["model_gflops"] = per_sample * result["tokens_per_s"] / length / 1e9
                cells.append(cell)
                shown = f"{cell['tokens_per_s']:.0f} tokens/s" if result else "failed"
                print(f"max length {length}, micro-batch {batch}: {shown}", flush=True)
    print(scaling_table(cells, args.lengths, args.batches, args.machine))
    return {"setup": {"steps": args.steps, "warmup_steps": 1}, "cells": cells}


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs per framework (the median is reported)")
    parser.add_argument("--records", type=int, default=256, help="Alpaca records to train on (one epoch)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--checkpoint", default=None, help="default: lorafit's SmolLM2-135M-Instruct")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--scaling", action="store_true", help="lorafit alone: max length x micro-batch grid")
    parser.add_argument("--changes", action="store_true", help="PEFT, then lorafit adding one change at a time")
    parser.add_argument("--changes-from", choices=CHANGE_KEYS, default=CHANGE_KEYS[0], help="--changes: first row")
    parser.add_argument("--change", choices=CHANGE_KEYS, default=DEFAULTS, help="lorafit run: the last change applied")
    parser.add_argument("--peft-autocast", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lengths", type=int_list, default=[128, 256, 512, 1024], help="--scaling max lengths")
    parser.add_argument("--batches", type=int_list, default=[1, 4, 8], help="--scaling micro-batch sizes")
    parser.add_argument("--steps", type=int, default=3, help="--scaling timed steps per cell (after 1 warm-up)")
    parser.add_argument("--worker", choices=(*FRAMEWORKS, "scale"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--data-file", help=argparse.SUPPRESS)
    parser.add_argument("--pad-id", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    args.machine = probe()  # before any run, on the threads the workers will use
    print(f"machine: {describe(args.machine)}", flush=True)
    report = scaling(args) if args.scaling else changes(args) if args.changes else compare(args)
    report["torch_threads"] = torch.get_num_threads()
    report["machine"] = args.machine
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
