"""A finetuning run: base model + method + data -> a self-describing run directory.

The method only decides which parameters exist and which train (and how the result is saved);
every method goes through the one loop in train.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit import distributed
from lorafit.adapter import METHODS as ADAPTER_METHODS
from lorafit.adapter import (
    AdapterConfig,
    adapter_method,
    apply_adapter,
    base_state_dict,
    fold_scales,
    load_adapter,
    save_adapter,
)
from lorafit.checkpoint import load_model, save_hf_model
from lorafit.data import format_prompt, load_prepared, prepare_source
from lorafit.data.prepare import read_info
from lorafit.hub import resolve_checkpoint
from lorafit.lora import LoRAConfig, adapter_base_model, apply_lora, load_peft_adapter, merge_lora, save_peft_adapter
from lorafit.model import LLaMA
from lorafit.tokenizer import Tokenizer
from lorafit.train import (
    TrainConfig,
    TrainResult,
    gather_on_main,
    latest_checkpoint,
    plot_losses,
    resolve_precision,
    train,
)

METHODS = ("lora", "adapter", "adapter-v2", "full")
RUN_FILE = "lorafit_run.json"
SAMPLE_INSTRUCTION = "Recommend a movie for me to watch during the weekend and explain the reason."


@dataclass
class DataOptions:
    """How a raw data file becomes training samples (ignored for an already prepared directory)."""

    prompt_style: str | None = None
    """alpaca or chat; default: chat when the model has a chat template."""
    mask_prompt: bool = True
    val_size: int | None = None
    """validation records split off a raw file; None: a tenth of them, at most 2000 (data.default_val_size)."""
    fmt: str | None = None
    """alpaca or dolly field names; default: detected."""


def setup_method(model: LLaMA, method: str, lora: LoRAConfig | None, adapter: AdapterConfig | None = None) -> int:
    """Add the method's parameters and freeze the rest; returns the trainable parameter count."""
    if method == "lora":
        return apply_lora(model, lora or LoRAConfig())
    if method in ADAPTER_METHODS:
        return apply_adapter(model, method, adapter or AdapterConfig())
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return sum(p.numel() for p in model.parameters())
    raise ValueError(f"unknown finetuning method {method!r}; choose one of {', '.join(METHODS)}")


def save_hf_directory(
    model: LLaMA, base: Path, out_dir: Path, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """A Hugging Face model directory: weights and config, plus the base model's tokenizer and generation config.

    state_dict replaces the model's own (e.g. whole tensors gathered from FSDP shards).
    """
    save_hf_model(model.state_dict() if state_dict is None else state_dict, model.config, out_dir)
    Tokenizer.from_checkpoint(base).save(out_dir)
    if (base / "generation_config.json").is_file():
        (out_dir / "generation_config.json").write_text((base / "generation_config.json").read_text())


def save_method_outputs(
    model: LLaMA,
    method: str,
    lora: LoRAConfig | None,
    run_dir: Path,
    base: str,
    adapter: AdapterConfig | None = None,
) -> None:
    """LoRA: a PEFT adapter in the run directory. LLaMA-Adapter: adapter.safetensors + adapter_config.json there.
    Full: a Hugging Face model in run_dir/model.

    Under torch.distributed every rank calls it (FSDP shards are gathered) and rank 0 writes.
    """
    if method == "lora":
        if distributed.is_main():  # DDP keeps whole, identical LoRA weights on every rank
            save_peft_adapter(model, lora, run_dir, base_model_name_or_path=base)
        return
    if method in ADAPTER_METHODS:
        if distributed.is_main():  # as with LoRA: DDP, whole weights on every rank
            save_adapter(model, method, adapter or AdapterConfig(), run_dir, base_model_name_or_path=base)
        return
    state = gather_on_main(model.state_dict().items())
    if distributed.is_main():
        save_hf_directory(model, Path(base), run_dir / "model", state)


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
        fmt=options.fmt,
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
    method: str,
    data: str | Path,
    run_dir: str | Path,
    checkpoint: str | Path | None = None,
    train_config: TrainConfig | None = None,
    lora: LoRAConfig | None = None,
    data_options: DataOptions | None = None,
    resume: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
    devices: int = 1,
    nodes: int = 1,
    adapter: AdapterConfig | None = None,
) -> TrainResult:
    """Finetune `checkpoint` on `data` with `method` (lora, adapter, adapter-v2, full); everything lands in run_dir.

    devices × nodes > 1 runs this same call in that many processes (DDP for LoRA and LLaMA-Adapter, FSDP2 for full
    finetuning); under torchrun the environment says so and nothing is launched here.
    """
    arguments = dict(locals())  # exactly this call, for the workers to repeat
    if distributed.should_launch(devices, nodes):
        cfg = train_config or TrainConfig()
        distributed.check_batch_layout(cfg.global_batch_size, cfg.micro_batch_size, devices * nodes)
        return distributed.launch(finetune, arguments, devices, nodes)
    device = distributed.device_for(device, distributed.environment())
    with distributed.process_group(device):
        return finetune_here(
            method, data, run_dir, checkpoint, train_config, lora, data_options, resume, device, progress, adapter
        )


def finetune_here(
    method: str,
    data: str | Path,
    run_dir: str | Path,
    checkpoint: str | Path | None,
    train_config: TrainConfig | None,
    lora: LoRAConfig | None,
    data_options: DataOptions | None,
    resume: str | Path | None,
    device: torch.device,
    progress: bool,
    adapter: AdapterConfig | None = None,
) -> TrainResult:
    """finetune() in this process, which may be one of several in a process group."""
    cfg = train_config or TrainConfig()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.precision = resolve_precision(cfg.precision, device)  # needed here to pick the weights' dtype
    base = resolve_checkpoint(checkpoint)
    tokenizer = Tokenizer.from_checkpoint(base)
    with distributed.main_first():  # rank 0 prepares the data, the others then find it cached
        data_dir = prepare_data(data, tokenizer, run_dir, cfg.max_seq_length, data_options or DataOptions(), cfg.seed)
    train_set, val_set = load_prepared(data_dir, tokenizer)  # refuses data prepared with another tokenizer
    prompt_style = read_info(data_dir).prompt_style

    dtype = torch.bfloat16 if cfg.precision == "bf16-true" else torch.float32
    model = load_model(base, dtype=dtype, device=device)
    trainable = setup_method(model, method, lora, adapter)
    total = sum(p.numel() for p in model.parameters() if not p.requires_grad) + trainable
    share = f"{100 * trainable / total:.3f}%"
    distributed.print_main(f"{method}: {trainable:,} trainable parameters of {total:,} ({share})")

    resume_path = None
    if resume == "auto":
        resume_path = latest_checkpoint(run_dir)
    elif resume is not None:
        resume_path = Path(resume)
    if distributed.is_main():
        write_run_file(
            run_dir,
            method=method,
            base_checkpoint=str(base),
            data=str(data_dir),
            prompt_style=prompt_style,
            train=vars(cfg),
            lora=vars(lora or LoRAConfig()) if method == "lora" else None,
            adapter=vars(adapter or AdapterConfig()) if method in ADAPTER_METHODS else None,
        )

    sample_prompt = tokenizer.encode(format_prompt(SAMPLE_INSTRUCTION, "", prompt_style, tokenizer))

    def show_sample(step: int, val_loss: float) -> None:
        from lorafit.generate import generate

        model.eval()
        ids = list(generate(model, sample_prompt, max_new_tokens=48, stop_ids=tokenizer.stop_ids))
        model.clear_kv_cache()  # training must not run through a decoding cache
        model.train()
        text = tokenizer.decode(ids, skip_special_tokens=True).strip().replace("\n", " ")
        print(f"\nstep {step}: val loss {val_loss:.4f}; sample: {text[:200]}")

    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    # Sampling runs on rank 0 alone, which cannot run a model whose weights FSDP shards over all ranks.
    on_eval = show_sample if distributed.strategy_for(model) != "fsdp" else None
    result = train(
        model, train_set, val_set, cfg, run_dir, pad_id, resume=resume_path, on_eval=on_eval, progress=progress
    )
    save_method_outputs(model, method, lora or LoRAConfig(), run_dir, str(base), adapter)
    if distributed.is_main():
        plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png", title=f"{method} on {Path(str(data)).name}")
        print(
            f"done: {result.steps} steps in {result.seconds:.0f} s, {result.tokens_per_s:.0f} tokens/s, "
            f"peak memory {result.peak_memory_bytes / 2**30:.2f} GiB; outputs in {run_dir}"
        )
    distributed.barrier()  # every rank returns once the outputs exist
    return result


def write_run_file(run_dir: Path, **fields) -> None:
    """What generate/merge need to use the run: method, base checkpoint, prompt style, hyperparameters."""
    tmp = run_dir / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(fields, indent=2, default=str))
    tmp.replace(run_dir / RUN_FILE)


def read_run_file(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a lorafit run directory (no {RUN_FILE})")
    return json.loads(path.read_text())


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Fold an adapter into its base model and write a Hugging Face model directory.

    LoRA folds completely. LLaMA-Adapter v2 folds its scales and norms; the rest (prompts, gates,
    biases: a Llama checkpoint has no place for them) is written to out_dir/adapter, an adapter over
    the merged model. v1 has nothing that folds, so it is refused.
    """
    method = adapter_method(adapter_dir)
    if method == "adapter":
        raise ValueError(
            f"{adapter_dir}: a LLaMA-Adapter (v1) run has nothing to fold into the base weights (its prompts and "
            "gates need the adapter's attention); use it with --adapter instead"
        )
    base = resolve_checkpoint(checkpoint or adapter_base_model(adapter_dir))
    model = load_model(base)
    out_dir = Path(out_dir)
    if method == "lora":
        load_peft_adapter(model, adapter_dir)
        merge_lora(model)
        save_hf_directory(model, base, out_dir)
        return out_dir
    _, config = load_adapter(model, adapter_dir)
    fold_scales(model)
    save_hf_directory(model, base, out_dir, base_state_dict(model))
    # A subdirectory: an adapter_config.json beside config.json would make transformers look for a PEFT adapter.
    save_adapter(model, method, config, out_dir / "adapter", base_model_name_or_path=str(out_dir.resolve()))
    return out_dir
