"""ONE training loop for every finetuning method.

A method (LoRA, full, ...) only decides which parameters exist and which train; this loop trains
whatever requires grad. One optimizer step consumes `global_batch_size / micro_batch_size`
micro-batches in a fixed, seeded order, so the data position is a function of the step number and
a resumed run continues exactly where the interrupted one stopped. Under torch.distributed the
same loop runs in every process, each taking its share of every step's micro-batches
(lorafit.distributed).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from lorafit import distributed
from lorafit.checkpoint import read_safetensors
from lorafit.data.batching import MEGA_BATCH_FACTOR, BatchPlan, collate
from lorafit.data.prepare import IGNORE_INDEX
from lorafit.io import atomic_directory, save_safetensors, write_text
from lorafit.model import LLaMA
from lorafit.ops import is_plain_linear, linear_cross_entropy_sum
from lorafit.runtime import autocast, peak_memory_bytes, release_large_buffers, resolve_precision


@dataclass
class TrainConfig:
    """Hyperparameters of one run; defaults follow lit-llama's LoRA recipe."""

    epochs: int = 1
    """Passes over the training data (unless max_steps is set)."""
    max_steps: int | None = None
    """Optimizer steps to run; overrides epochs when set."""
    micro_batch_size: int = 4
    """Samples per forward/backward pass."""
    global_batch_size: int = 128
    """Samples per optimizer step (micro-batches are accumulated up to it)."""
    learning_rate: float = 3e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay, applied to matrices only."""
    warmup_steps: int = 100
    """Steps of linear warm-up before the cosine decay."""
    min_lr_ratio: float = 0.0
    """The cosine schedule decays to learning_rate * min_lr_ratio."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0: no clipping)."""
    max_seq_length: int = 256
    """Longer samples are truncated to this many tokens."""
    group_by_length: bool = True
    """Batch samples of similar length together (less padding, so faster); off: each micro-batch is a random draw."""
    eval_interval: int = 100
    """Steps between evaluations (0: only at the end)."""
    eval_batches: int = 50
    """Micro-batches of validation data per evaluation (0: all)."""
    save_interval: int = 1000
    """Steps between resumable checkpoints (0: never); the last step is always saved when not 0."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    precision: Literal["auto", "32-true", "bf16-mixed", "bf16-true"] = "auto"
    """auto is bf16-mixed on CUDA; on the CPU, bf16-mixed where its measured bf16 matmul beats float32, else 32-true."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward: less memory, about a third more compute."""
    cpu_mmap_threshold: int | None = None
    """On the CPU (glibc): buffers of at least this many bytes get their own memory mapping and go back to the
    system when freed (runtime.release_large_buffers); None leaves malloc's adaptive threshold."""
    seed: int = 42
    """Seeds the data order, the method's initialisation and dropout: the same command gives the same run."""

    def __post_init__(self) -> None:
        positive = ("epochs", "micro_batch_size", "global_batch_size", "max_seq_length", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        non_negative = ("warmup_steps", "eval_interval", "eval_batches", "save_interval", "weight_decay", "grad_clip")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1 (or unset to train whole epochs), got {self.max_steps}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be between 0 and 1, got {self.min_lr_ratio}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"micro_batch_size ({self.micro_batch_size})"
            )

    @property
    def accumulation(self) -> int:
        return self.global_batch_size // self.micro_batch_size


MIN_STEPS = 8
"""A run adapted to small data (fit_to_data) gets at least this many optimizer steps where the data allows."""


def fit_to_data(cfg: TrainConfig, n_samples: int, n_processes: int = 1) -> list[str]:
    """Shrink the global batch and the warm-up to what the data allows; returns one line per change made.

    With lit-llama's defaults (global batch 128, 100 warm-up steps) a 25-record file is one optimizer
    step at a learning rate of 3e-6: nothing is learned. The global batch is halved (in whole
    micro-batches on every process) until an epoch has MIN_STEPS steps (unless max_steps fixes the run's
    length), and the warm-up takes at most half of the run, so every run reaches its peak learning rate.
    """
    notes = []
    unit = cfg.micro_batch_size * n_processes
    original = cfg.global_batch_size
    # A run of a set number of steps (max_steps) keeps its batch: its length is the user's choice.
    while (
        not cfg.max_steps and cfg.global_batch_size > unit and math.ceil(n_samples / cfg.global_batch_size) < MIN_STEPS
    ):
        cfg.global_batch_size = max(unit, (cfg.global_batch_size // 2) // unit * unit)
    if cfg.global_batch_size != original:
        notes.append(
            f"{n_samples} training samples: global batch {original} -> {cfg.global_batch_size} "
            f"so that an epoch has {math.ceil(n_samples / cfg.global_batch_size)} optimizer steps"
        )
    total = total_steps(cfg, n_samples)
    if cfg.warmup_steps > total // 2:
        warmup = max(1, total // 10) if total > 1 else 0
        notes.append(f"warm-up {cfg.warmup_steps} -> {warmup} steps: the run has {total} optimizer steps")
        cfg.warmup_steps = warmup
    return notes


def total_steps(cfg: TrainConfig, n_samples: int) -> int:
    """Optimizer steps of the run: max_steps, else whole epochs of length-grouped micro-batches."""
    if cfg.max_steps:
        return cfg.max_steps
    micro_batches = math.ceil(n_samples / cfg.micro_batch_size)
    return cfg.epochs * math.ceil(micro_batches / cfg.accumulation)


def learning_rate_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up to the peak, then cosine decay to min_lr_ratio * peak."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    floor = cfg.learning_rate * cfg.min_lr_ratio
    return floor + (cfg.learning_rate - floor) * 0.5 * (1 + math.cos(math.pi * progress))


LOSS_CHUNK = 128
"""Positions per LM-head + cross-entropy chunk: its float32 logits are the largest tensor of a small model's step."""


def supervised_loss_sum(
    model: LLaMA, input_ids: torch.Tensor, labels: torch.Tensor, fused_head: bool = True
) -> torch.Tensor:
    """Summed next-token cross-entropy over supervised positions only.

    The LM head runs only where a label exists: with prompts masked and short answers that is a
    fraction of the positions, and for a small model the vocabulary projection is a large share of
    all the work. It runs LOSS_CHUNK positions at a time, so no (positions x vocabulary) float32
    logits tensor ever exists, only one chunk's. `fused_head` (the method's Method.fused_head) says
    the head is a plain linear layer, whose product with the loss is fused (ops.linear_cross_entropy_sum);
    a head with trainable parts of its own (LoRA, LLaMA-Adapter v2) is run as a module, each chunk
    recomputed in backward.
    """
    hidden = model.hidden_states(input_ids)[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[keep], targets[keep]
    head = model.lm_head
    if fused_head:
        if not is_plain_linear(head) or head.bias is not None:
            raise ValueError(f"fused_head=True needs a plain bias-free nn.Linear LM head, not {type(head).__name__}")
        return linear_cross_entropy_sum(hidden, head.weight, targets, LOSS_CHUNK)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), LOSS_CHUNK):
        chunk = (head, hidden[start : start + LOSS_CHUNK], targets[start : start + LOSS_CHUNK])
        total = total + checkpoint(_head_loss_sum, *chunk, use_reentrant=False)
    return total


def _head_loss_sum(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")


class SupervisedLoss(nn.Module):
    """supervised_loss_sum as a module's forward, the call that DDP and FSDP hook their communication into."""

    def __init__(self, model: LLaMA, fused_head: bool = True) -> None:
        super().__init__()
        self.model = model
        self.fused_head = fused_head

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return supervised_loss_sum(self.model, input_ids, labels, self.fused_head)


def count_supervised(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; matrices decay, vectors (norms, gates, biases) do not."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("no parameter requires grad: the finetuning method left nothing to train")
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    # One kernel per step instead of several passes over the parameters: on the CPU 3x faster than the default
    # (foreach) for 133M parameters (0.09 vs 0.26 s), which full finetuning pays every step.
    fused = trainable[0].device.type in ("cuda", "cpu")
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate, fused=fused)


# ------------------------------------------------------------------------------------------------
# Resumable checkpoints: safetensors + JSON, no pickles. The same files whatever the number of
# processes that wrote them: whole tensors by parameter name, so a run resumes on any number.


def gather_on_main(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Whole tensors by name on rank 0's CPU, nothing elsewhere; FSDP shards are gathered (every rank must call).

    One tensor at a time, so no GPU ever holds more than one whole tensor beyond its shards.
    """
    keep = distributed.is_main()
    out = {}
    for name, tensor in named:
        full = distributed.full_tensor(tensor.detach())
        if keep:
            out[name] = full.cpu().contiguous()
    return out


def save_checkpoint(
    run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, keep: int, run_id: str = ""
) -> Path:
    """Write trainable weights, optimizer state and RNG state for `step`; keep the newest `keep`.

    The checkpoint carries the run's identity, so a resume never picks up another run's weights.
    Under torch.distributed every rank calls it and rank 0 writes.
    """
    final = run_dir / "checkpoints" / f"step-{step:06d}"
    trainable = gather_on_main((n, p) for n, p in model.named_parameters() if p.requires_grad)
    names = {id(p): n for n, p in model.named_parameters()}
    state = optimizer.state_dict()
    params_in_order = [p for g in optimizer.param_groups for p in g["params"]]
    tensors = gather_on_main(
        (f"{names[id(params_in_order[index])]}::{key}", value)
        for index, param_state in state["state"].items()
        for key, value in param_state.items()
    )
    tensors |= distributed.all_rng_states()
    if not distributed.is_main():
        return final
    with atomic_directory(final, replace=True) as tmp:
        save_safetensors(trainable, tmp / "trainable.safetensors")
        save_safetensors(tensors, tmp / "optimizer.safetensors")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "run_id": run_id}))
    for old in sorted((run_dir / "checkpoints").glob("step-??????"))[: -max(keep, 1)]:
        shutil.rmtree(old)
    return final


def checkpoint_state(path: Path) -> dict:
    """trainer_state.json of a checkpoint: its step and the identity of the run that wrote it."""
    for required in ("trainable.safetensors", "optimizer.safetensors", "trainer_state.json"):
        if not (path / required).exists():
            raise FileNotFoundError(f"{path}: not a lorafit checkpoint (missing {required})")
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        int(state["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path / 'trainer_state.json'}: unreadable ({err})") from err
    return state


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore a checkpoint written by save_checkpoint; returns the step it was taken at.

    Under torch.distributed every rank reads the files (the run directory must be shared).
    """
    step = int(checkpoint_state(path)["step"])
    params = dict(model.named_parameters())
    weights = read_safetensors(path / "trainable.safetensors")
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(
            f"{path}: checkpoint does not match this run's trainable parameters "
            f"(missing {missing[:3]}, unexpected {extra[:3]})"
        )
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(distributed.shard_like(value, params[name]))
    tensors = read_safetensors(path / "optimizer.safetensors")
    names = {id(p): n for n, p in params.items()}
    state = optimizer.state_dict()
    params_in_order = [p for g in optimizer.param_groups for p in g["params"]]
    for index, param in enumerate(params_in_order):
        prefix = names[id(param)] + "::"
        param_state = {
            k[len(prefix) :]: distributed.shard_like(v, param) for k, v in tensors.items() if k.startswith(prefix)
        }
        if param_state:
            state["state"][index] = param_state
    optimizer.load_state_dict(state)
    distributed.restore_rng_states(tensors)
    return step


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("step-??????"))
    return found[-1] if found else None


# ------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    steps: int
    final_train_loss: float
    final_val_loss: float | None
    tokens_per_s: float
    seconds: float
    peak_memory_bytes: int


def evaluate(
    model: LLaMA,
    val_set,
    cfg: TrainConfig,
    pad_id: int,
    device: torch.device,
    loss_module: nn.Module | None = None,
    fused_head: bool = True,
) -> float:
    """Mean per-token validation loss over the first eval_batches length-sorted micro-batches.

    Under torch.distributed pass train's wrapped loss_module: the batches are shared out among the ranks.
    Otherwise `fused_head` is the method's Method.fused_head, as for train.
    """
    loss_module = loss_module or SupervisedLoss(model, fused_head)
    order = sorted(range(len(val_set)), key=lambda i: val_set.lengths[i])
    batches = [order[i : i + cfg.micro_batch_size] for i in range(0, len(order), cfg.micro_batch_size)]
    if cfg.eval_batches:
        # Spread the evaluated batches over all lengths rather than taking only the shortest.
        stride = max(1, len(batches) // cfg.eval_batches)
        batches = batches[::stride][: cfg.eval_batches]
    was_training = model.training  # the wrapper made here is always in training mode
    loss_module.eval()
    total, count = 0.0, 0
    with torch.no_grad(), autocast(cfg.precision, device):
        for batch, counts in distributed.local_micro_batches(batches, distributed.rank(), distributed.world_size()):
            input_ids, labels = collate([val_set[i] for i in batch], pad_id)
            input_ids, labels = input_ids.to(device), labels.to(device)
            loss = loss_module(input_ids, labels).item()
            if counts:
                total += loss
                count += count_supervised(labels)
    distributed.reshard(loss_module)
    loss_module.train(was_training)
    total, count = distributed.all_reduce_sum([total, count], device)
    return total / max(count, 1)


def keep_metrics_until(metrics_path: Path, step: int) -> None:
    """Drop records after `step`: an interrupted run logged steps past its last checkpoint, which resume redoes."""
    if not metrics_path.exists():
        return
    kept = []
    for line in metrics_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the interruption
            continue
        if record["step"] <= step:
            kept.append(line + "\n")
    write_text(metrics_path, "".join(kept))


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm stopped being finite; the step that found it was not applied."""


def train(
    model: LLaMA,
    train_set,
    val_set,
    cfg: TrainConfig,
    run_dir: Path,
    pad_id: int,
    resume: Path | None = None,
    on_eval: Callable[[int, float], None] | None = None,
    progress: bool = True,
    strategy: str = "ddp",
    fused_head: bool = True,
    run_id: str = "",
) -> TrainResult:
    """Train the parameters of `model` that require grad on train_set; evaluate on val_set.

    `strategy` and `fused_head` come from the finetuning method (Method.strategy, Method.fused_head);
    `run_id` is written into every checkpoint. Under torch.distributed every rank calls it with the same
    arguments and takes its share of each step (lorafit.distributed); metrics, checkpoint files, on_eval
    and the progress bar are rank 0's. A non-finite loss or gradient norm stops the run before its
    optimizer step (TrainingDiverged), so checkpoints and outputs only ever hold finite weights.
    """
    device = next(model.parameters()).device
    cfg.precision = resolve_precision(cfg.precision, device)
    env = distributed.environment()
    if env.world_size > 1:
        distributed.check_batch_layout(cfg.global_batch_size, cfg.micro_batch_size, env.world_size)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"
    plan = BatchPlan(train_set.lengths, cfg.micro_batch_size, cfg.seed, MEGA_BATCH_FACTOR if cfg.group_by_length else 1)
    steps_per_epoch = math.ceil(len(plan) / cfg.accumulation)
    n_steps = total_steps(cfg, len(train_set))
    model.activation_checkpointing = cfg.activation_checkpointing
    if device.type == "cpu" and cfg.cpu_mmap_threshold:
        release_large_buffers(cfg.cpu_mmap_threshold)
    loss_module = SupervisedLoss(model, fused_head)
    loss_module = distributed.parallelize(
        loss_module, model.layers, strategy if env.world_size > 1 else "single", device
    )
    optimizer = make_optimizer(model, cfg)  # after FSDP, which replaces the parameters by shards
    trainable = [p for p in model.parameters() if p.requires_grad]
    if env.rank > 0:
        # Each rank draws its own dropout masks; rank 0 keeps the caller's stream, as one process would.
        torch.manual_seed(cfg.seed + env.rank)

    start_step = 0
    if resume is not None:
        start_step = load_checkpoint(resume, model, optimizer)
        if env.is_main:
            keep_metrics_until(metrics_path, start_step)
        distributed.print_main(f"resumed from {resume} at step {start_step}")
    elif env.is_main and metrics_path.exists():
        metrics_path.unlink()  # a fresh run starts a fresh log

    def micro_batches_of(step: int) -> list[list[int]]:
        epoch, index = divmod(step, steps_per_epoch)
        batches = plan.batches(epoch)
        return batches[index * cfg.accumulation : (index + 1) * cfg.accumulation]

    loss_module.train()
    train_loss, val_loss = float("nan"), None
    real_tokens, started = 0, time.perf_counter()
    bar = tqdm(
        range(start_step, n_steps),
        initial=start_step,
        total=n_steps,
        disable=not (progress and env.is_main),
        desc="finetune",
        unit="step",
        dynamic_ncols=True,
    )
    for step in bar:
        step_started = time.perf_counter()
        lr = learning_rate_at(step, n_steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        mine = distributed.local_micro_batches(micro_batches_of(step), env.rank, env.world_size)
        batches = [(collate([train_set[i] for i in b], pad_id), counts) for b, counts in mine]
        local_tokens = sum(train_set.lengths[i] for b, counts in mine if counts for i in b)  # real tokens, no padding
        local_supervised = sum(count_supervised(labels) for (_, labels), counts in batches if counts)
        # Normalise by the supervised tokens of the whole step, on all ranks, so accumulation equals one big batch.
        step_tokens, n_supervised = distributed.all_reduce_sum([local_tokens, local_supervised], device)
        n_supervised = max(1, int(n_supervised))
        loss_sum = 0.0
        for index, ((input_ids, labels), counts) in enumerate(batches):
            input_ids, labels = input_ids.to(device), labels.to(device)
            with distributed.gradient_sync(loss_module, enabled=index == len(batches) - 1):
                with autocast(cfg.precision, device):
                    loss = loss_module(input_ids, labels) / n_supervised
                # DDP and FSDP average gradients over the ranks, but each rank's loss is already its share of
                # the step's mean: scale so the average is the sum. Padding micro-batches count for nothing.
                (loss * (env.world_size if counts else 0)).backward()
            if counts:
                loss_sum += loss.item()
            # Free the finished graph now, not when the next forward's loss replaces it: its thousands of small
            # objects, freed in the middle of the next step's activations, fragment the CPU heap (measured on
            # benchmarks/train_cpu.py's largest batch, repeated: 1.80 GiB RSS after a step instead of 1.40).
            del loss
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip or math.inf))
        train_loss = distributed.all_reduce_sum([loss_sum], device)[0]
        if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):
            raise TrainingDiverged(diverged_message(step + 1, train_loss, grad_norm, cfg, run_dir))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        real_tokens += int(step_tokens)
        elapsed = time.perf_counter() - started
        record = {
            "step": step + 1,
            "train_loss": train_loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "step_tokens_per_s": step_tokens / (time.perf_counter() - step_started),
            "elapsed_s": elapsed,
        }
        is_last = step + 1 == n_steps
        if (cfg.eval_interval and (step + 1) % cfg.eval_interval == 0) or is_last:
            if val_set is not None and len(val_set):
                val_loss = evaluate(model, val_set, cfg, pad_id, device, loss_module)
                record |= {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
                if on_eval is not None and env.is_main:
                    on_eval(step + 1, val_loss)
        if env.is_main:
            with metrics_path.open("a") as f:
                f.write(metrics_line(record))
        bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{real_tokens / elapsed:.0f}", refresh=False)
        if cfg.save_interval and ((step + 1) % cfg.save_interval == 0 or is_last):
            save_checkpoint(run_dir, step + 1, model, optimizer, cfg.keep_checkpoints, run_id)
    bar.close()
    seconds = time.perf_counter() - started
    return TrainResult(
        steps=n_steps - start_step,
        final_train_loss=train_loss,
        final_val_loss=val_loss,
        tokens_per_s=real_tokens / seconds if seconds else 0.0,
        seconds=seconds,
        peak_memory_bytes=peak_memory_bytes(device),
    )


def metrics_line(record: dict) -> str:
    """One metrics.jsonl line: strict JSON, with a value that is not finite written as null."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


def diverged_message(step: int, loss: float, grad_norm: float, cfg: TrainConfig, run_dir: Path) -> str:
    """What went wrong, what was kept, and what to try."""
    last = latest_checkpoint(run_dir)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written before it"
    hint = f"lower --learning-rate (now {cfg.learning_rate:g})"
    if cfg.precision != "32-true":
        hint += f" or train in --precision 32-true (now {cfg.precision})"
    return (
        f"training diverged at step {step}: loss {loss:g}, gradient norm {grad_norm:g}; the step was not applied and "
        f"nothing was written for it ({kept}); {hint}"
    )


def plot_losses(metrics_path: Path, png_path: Path, title: str = "") -> None:
    """Train and validation loss against step, from metrics.jsonl, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["train_loss"] for r in records], label="train", lw=1)
    val = [r for r in records if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path.with_name(png_path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(png_path)
