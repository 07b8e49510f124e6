"""A finetuning run: base model + method + data -> a self-describing run directory.

The method (lorafit/methods/) decides which parameters exist and which train, and how the result is
saved; every method goes through the one loop in train.py. The run directory belongs to this run
(lorafit/rundir.py): locked while it trains, refused when it holds another run, resumed only with
compatible settings.
"""

from __future__ import annotations

import copy
import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lorafit import distributed
from lorafit.data import load_prepared, prepare_source
from lorafit.data.prepare import IGNORE_INDEX, TokenDataset, read_info
from lorafit.hub import checkpoint_origin, resolve_checkpoint
from lorafit.methods import Method, get_method
from lorafit.methods.base import base_fingerprint
from lorafit.model import LLaMA
from lorafit.rundir import (
    LOSS_PLOT,
    RunDirectoryError,
    RunLock,
    check_resume,
    read_run_file,
    start_fresh,
    write_run_file,
)
from lorafit.runtime import auto_precision_note, autocast, release_large_buffers, resolve_precision, weights_dtype
from lorafit.tokenizer import Tokenizer
from lorafit.train import (
    TrainConfig,
    TrainResult,
    checkpoint_state,
    fit_to_data,
    latest_checkpoint,
    plot_losses,
    total_steps,
    train,
)


@dataclass
class DataOptions:
    """How a raw data file becomes training samples (ignored for an already prepared directory)."""

    prompt_style: Literal["alpaca", "chat"] | None = None
    """Prompt template; default: chat when the model has a chat template, else alpaca."""
    mask_prompt: bool = True
    """Train on the answers only: the prompt's tokens get no loss."""
    val_size: int | None = None
    """Validation samples split off a raw data file; default: min(2000, a tenth of the records)."""
    data_format: Literal["alpaca", "dolly"] | None = None
    """Field names of the records; default: detected."""


def prepare_data(
    data: str | Path, tokenizer: Tokenizer, run_dir: Path, max_seq_length: int, options: DataOptions, seed: int
) -> Path:
    """A prepared dataset directory: `data` itself when already prepared, else prepared into run_dir/data."""
    if read_info(data) is not None:
        return Path(data)
    info = prepare_source(
        data,
        tokenizer,
        run_dir / "data",
        fmt=options.data_format,
        style=options.prompt_style,
        max_seq_length=max_seq_length,
        mask_prompt=options.mask_prompt,
        val_size=options.val_size,
        seed=seed,
    )
    distributed.print_main(
        f"data: {info.train:,} train / {info.val:,} val samples ({info.prompt_style} prompts; "
        f"{info.skipped_empty} empty skipped, {info.truncated} truncated to {max_seq_length} tokens)"
        + (" [cached]" if info.cached else "")
    )
    return Path(info.out_dir)


def finetune(
    method: str | Method,
    data: str | Path,
    run_dir: str | Path,
    checkpoint: str | Path | None = None,
    train_config: TrainConfig | None = None,
    method_config: Any = None,
    data_options: DataOptions | None = None,
    resume: str | Path | None = None,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = True,
    devices: int = 1,
    nodes: int = 1,
) -> TrainResult:
    """Finetune `checkpoint` on `data` with `method` (a name in lorafit.methods.METHODS); everything lands in run_dir.

    A fresh run needs an empty run_dir (overwrite=True clears it); resume ("auto" or a checkpoint path)
    continues the run run_dir holds. devices × nodes > 1 runs this same call in that many processes
    (the method's strategy: DDP or FSDP2); under torchrun the environment says so and nothing is launched here.
    """
    arguments = dict(locals())  # exactly this call, for the workers to repeat
    if resume is not None and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite deletes it: choose one")
    if distributed.should_launch(devices, nodes):
        cfg = train_config or TrainConfig()
        distributed.check_batch_layout(cfg.global_batch_size, cfg.micro_batch_size, devices * nodes)
        return distributed.launch(finetune, arguments, devices, nodes)
    device = distributed.device_for(device, distributed.environment())
    with distributed.process_group(device):
        run_dir = Path(run_dir).absolute()
        # Rank 0 holds the run directory's lock for the whole run; the other ranks work under it.
        with RunLock(run_dir) if distributed.is_main() else nullcontext():
            return finetune_here(
                get_method(method),
                data,
                run_dir,
                checkpoint,
                copy.deepcopy(train_config or TrainConfig()),
                method_config,
                data_options or DataOptions(),
                resume,
                overwrite,
                device,
                progress,
            )


def finetune_here(
    method: Method,
    data: str | Path,
    run_dir: Path,
    checkpoint: str | Path | None,
    cfg: TrainConfig,
    method_config: Any,
    data_options: DataOptions,
    resume: str | Path | None,
    overwrite: bool,
    device: torch.device,
    progress: bool,
) -> TrainResult:
    """finetune() in this process, which may be one of several in a process group."""
    method_config = method.default_config() if method_config is None else method_config
    with distributed.main_first():  # rank 0 times 'auto''s CPU matmul probe and caches it; the others read it
        if cfg.precision == "auto" and (note := auto_precision_note(device)):
            distributed.print_main(note)
        cfg.precision = resolve_precision(cfg.precision, device)  # needed here to pick the weights' dtype
    base = resolve_checkpoint(checkpoint).absolute()
    tokenizer = Tokenizer.from_checkpoint(base)
    saved, run_id = None, None
    with distributed.main_first():  # rank 0 claims the directory and prepares the data; the others then find it
        if distributed.is_main():
            saved = read_run_file(run_dir) if resume is not None else None
            if saved is None:
                run_id = start_fresh(run_dir, overwrite)
        data_dir = prepare_data(data, tokenizer, run_dir, cfg.max_seq_length, data_options, cfg.seed)
    train_set, val_set = load_prepared(data_dir, tokenizer)  # refuses data prepared with another tokenizer
    info = read_info(data_dir)
    for note in fit_to_data(cfg, len(train_set), distributed.world_size()):
        distributed.print_main(f"note: {note}")

    origin = checkpoint_origin(base)
    fields = {
        "method": method.name,
        method.name: asdict(method_config) if method_config is not None else None,
        "base_checkpoint": str(base),
        "base_origin": origin,
        "data": str(Path(data_dir).absolute()),
        "data_fingerprint": info.cache_key,
        "prompt_style": info.prompt_style,
        "train": asdict(cfg),
    }
    fields = json.loads(json.dumps(fields))  # as the run file holds them (tuples become lists), for check_resume
    resume_path = None
    if distributed.is_main():
        if saved is None:
            fields |= {"run_id": run_id, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        else:
            for note in check_resume(saved, fields, run_dir):
                print(f"resume: {note}")
            fields |= {k: saved.get(k) for k in ("run_id", "started", "base_fingerprint")}
            # The loss plot is written last: a run killed before it has not finished writing its outputs.
            outputs_written = method.has_files(run_dir) and (run_dir / LOSS_PLOT).exists()
            n_steps = total_steps(cfg, len(train_set))
            resume_path = checkpoint_to_resume(run_dir, resume, saved["run_id"], n_steps, outputs_written)
        write_run_file(run_dir, fields)
    distributed.barrier()
    if not distributed.is_main():  # the others follow rank 0's decisions, read back from the shared directory
        fields = read_run_file(run_dir)
        resume_path = None if resume is None else checkpoint_to_resume(run_dir, resume, fields["run_id"], None)

    torch.manual_seed(cfg.seed)  # the method's initialisation (LoRA's A) and dropout follow --seed
    model = method.load_base(base, weights_dtype(cfg.precision), device, method_config)
    if distributed.is_main():  # the base's fingerprint: the run is never applied to, nor resumed on, another base
        fingerprint = base_fingerprint(model)
        if saved is None:
            write_run_file(run_dir, fields | {"base_fingerprint": fingerprint})
        elif saved.get("base_fingerprint") not in (None, fingerprint):
            raise RunDirectoryError(f"{run_dir}: the run was trained on other base weights than {base}")
    if cfg.max_seq_length > model.config.block_size:
        distributed.print_main(
            f"warning: --max-seq-length {cfg.max_seq_length} is beyond the model's context of "
            f"{model.config.block_size} positions; positions past it were never trained"
        )
    trainable = method.apply(model, method_config)
    method.store_for_training(model, method_config, cfg.precision)
    total = method.parameter_count(model)
    distributed.print_main(
        f"{method.name}{f' ({method.describe(method_config)})' if method.describe(method_config) else ''}: "
        f"{trainable:,} trainable parameters of {total:,} "
        f"({100 * trainable / total:.3f}%)"
    )

    # Sampling runs on rank 0 alone, which cannot run a model whose weights FSDP shards over all ranks.
    sample = held_out_sample(val_set if len(val_set) else train_set)
    on_eval = None
    if method.strategy != "fsdp" or distributed.world_size() == 1:
        on_eval = sample_printer(model, tokenizer, *sample, precision=cfg.precision)
    if device.type == "cpu" and cfg.cpu_mmap_threshold is None and method.cpu_mmap_threshold:
        release_large_buffers(method.cpu_mmap_threshold)
    result = train(
        model,
        train_set,
        val_set,
        cfg,
        run_dir,
        tokenizer.eos_id if tokenizer.eos_id is not None else 0,
        resume=resume_path,
        on_eval=on_eval,
        progress=progress,
        strategy=method.strategy,
        fused_head=method.fused_head(method_config),
        run_id=fields["run_id"],
    )
    # Name the base as the hub does where it came from there, so the adapter loads on other machines too.
    method.save(model, method_config, run_dir, base, base_reference=origin.get("repo_id") or str(base))
    if distributed.is_main():
        plot_losses(run_dir / "metrics.jsonl", run_dir / LOSS_PLOT, title=f"{method.name} on {Path(str(data)).name}")
        print(
            f"done: {result.steps} steps in {result.seconds:.0f} s, {result.tokens_per_s:.0f} tokens/s, "
            f"peak memory {result.peak_memory_bytes / 2**30:.2f} GiB; outputs in {run_dir}"
        )
    distributed.barrier()  # every rank returns once the outputs exist
    return result


def checkpoint_to_resume(
    run_dir: Path, resume: str | Path, run_id: str, n_steps: int | None, outputs_written: bool = True
) -> Path:
    """The checkpoint a resume starts from, checked to belong to this run and to lie within its schedule.

    A run stopped after its last checkpoint but before its outputs were written (`outputs_written` False) resumes
    from that checkpoint: no step is left, and the outputs are written from it.
    """
    path = latest_checkpoint(run_dir) if str(resume) == "auto" else Path(resume)
    if path is None:
        raise RunDirectoryError(
            f"{run_dir}: no checkpoint to resume from in {run_dir / 'checkpoints'} (checkpoints are written every "
            "--save-interval steps and at the end)"
        )
    state = checkpoint_state(path)
    if state.get("run_id") != run_id:
        raise RunDirectoryError(f"{path}: this checkpoint belongs to another run than the one in {run_dir}")
    finished = state["step"] == n_steps
    if finished and not outputs_written:
        print(f"resume: the run had trained all {n_steps} steps; writing its outputs from {path}")
    elif n_steps is not None and state["step"] >= n_steps:
        raise RunDirectoryError(
            f"{path}: the run {'already finished' if finished else 'went beyond'} step {n_steps} "
            f"(checkpoint at step {state['step']}); nothing to resume. To train on, ask for more steps "
            "(--max-steps or --epochs)"
        )
    return path


def held_out_sample(dataset: TokenDataset) -> tuple[list[int], list[int]]:
    """(prompt ids, reference answer ids) of the dataset's first record: the tokens before and after its first label."""
    input_ids, labels = dataset[0]
    supervised = (labels != IGNORE_INDEX).nonzero()
    start = int(supervised[0]) if len(supervised) else len(input_ids)
    return input_ids[:start].tolist(), input_ids[start:].tolist()


def sample_printer(model: LLaMA, tokenizer: Tokenizer, prompt: list[int], reference: list[int], precision: str):
    """An on_eval callback that prints the model's greedy answer to a held-out record beside the reference.

    It generates in the training precision (under bf16-mixed the frozen weights may be stored in bf16).
    """
    from lorafit.generate import generate

    def clean(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True).strip().replace("\n", " ")[:200]

    def show(step: int, val_loss: float) -> None:
        model.eval()
        with autocast(precision, next(model.parameters()).device):
            ids = list(generate(model, prompt, max_new_tokens=64, stop_ids=tokenizer.stop_ids))
        model.clear_kv_cache()  # training must not run through a decoding cache
        model.train()
        print(f"\nstep {step}: val loss {val_loss:.4f}")
        print(f"  held-out answer: {clean(ids)}")
        print(f"  reference:       {clean(reference)}")

    return show
