"""LoRA training speed and memory of a Llama-2-7B-shaped model on one CUDA GPU: lorafit against HF PEFT.

    python benchmarks/gpu.py --json benchmarks/gpu_results.json        # a few minutes on one GPU
    python benchmarks/gpu.py --dry-run --json /tmp/gpu_dry.json        # tiny model on the CPU, seconds (CI)

The model has Llama-2-7B's shape (`Config.from_name("Llama-2-7B")`, 6.7B parameters) with random bf16 weights
drawn directly on the GPU (nothing is downloaded), so the speed is the real model's and the loss is meaningless.
Both frameworks train exactly the same base tensors: the transformers model is built on the meta device and
takes lorafit's weights by reference.

- lorafit: `lorafit.train.train` (the one training loop: LM head only where labels exist, AdamW fused on CUDA,
  gradient clipping at 1) on `lorafit.lora.apply_lora`, over a synthetic `TokenDataset`.
- PEFT: `get_peft_model` on transformers' `LlamaForCausalLM` (SDPA attention), in a plain PyTorch loop with
  the same optimizer, schedule and clipping; HF's loss computes logits at every position.

Setting: LoRA on q,v with r=8, alpha 16, dropout 0.05; bf16-true (frozen weights bf16, and the LoRA weights
bf16 too, on both sides, as lit-llama's bf16-true run had them); micro-batch 4 = global batch (no accumulation,
so an optimizer step is one micro-batch); synthetic token ids of exactly max length (256 and 512) with labels
on the second half of each sequence, to mimic masked prompts. A few warm-up steps, then --steps timed steps.

Model FLOPs per step, for MFU (against the GPU's dense bf16 peak; an unknown GPU gets n/a): N = the block
matmuls' parameters, tokens = batch x length. Forward 2·N·tokens; backward only the input gradients,
2·N·tokens, because frozen weights get no weight gradient (full finetuning would count 6·N·tokens); the LM
head 4·vocab·n_embd per supervised position (the loss needs no other logits, so MFU does not credit the ones
PEFT computes anyway); LoRA's own matmuls 6·r·(in + out) per token and adapted layer; causal attention
2·batch·length²·n_embd per layer forward and twice that backward. (Layer 0's frozen q/k/v need no input
gradient either; that 0.4% is not subtracted.)

The extrapolation to the seed's Alpaca run is explicit: samples x epochs / micro-batch optimizer steps times the
measured seconds per step at max length 256. Real Alpaca samples are mostly shorter than 256 tokens, and
length-grouped batches pad little, so a real run's steps are faster than these full-length ones.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from lorafit.config import Config
from lorafit.data import IGNORE_INDEX, TokenDataset, collate
from lorafit.estimate import GIB, estimate_memory, linear_shapes
from lorafit.lora import LoRAConfig, apply_lora
from lorafit.model import LLaMA
from lorafit.runtime import peak_memory_bytes
from lorafit.train import TrainConfig, learning_rate_at, train

LORA = LoRAConfig(r=8, alpha=16, dropout=0.05, targets=("q", "v"))
MICRO_BATCH = 4
INIT_STD = 0.02
SEED = 1337

# Dense bf16 peak FLOP/s (no sparsity), by a substring of torch.cuda.get_device_name; the first match wins.
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
)

# The seed's reference run: lit-llama's LoRA on Alpaca, one A100, about 192 minutes and 21 GB for 62,400 reported
# iterations. Its finetune/lora.py schedules max_iters = 50000 * 3 // micro_batch_size micro-batches of 4
# (50,000 samples x 3 epochs); we extrapolate both counts.
SEED_RUN = {
    "samples": 50_000,
    "epochs": 3,
    "micro_batch": 4,
    "seed_iterations": 62_400,
    "seed_minutes": 192,
    "seed_memory_gb": 21,
    "gpu": "A100",
}
EXTRAPOLATION_LENGTH = 256
DEFAULTS = {"steps": 30, "warmup": 3, "lengths": [256, 512]}


def tiny_config() -> Config:
    """The --dry-run model: a few thousand parameters, so the whole script runs on a CPU in seconds."""
    return Config(name="tiny", vocab_size=256, n_layer=2, n_embd=64, n_head=4, n_kv_head=4, intermediate_size=128)


def build_model(config: Config, device: torch.device, dtype: torch.dtype) -> LLaMA:
    """A model with random weights made on `device` in `dtype`: allocated empty, then one normal_ per tensor."""
    with torch.device("meta"):
        model = LLaMA(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, INIT_STD)
    return model


def synthetic_dataset(vocab_size: int, length: int, n_samples: int, seed: int) -> TokenDataset:
    """Random token ids of exactly `length`, labels only on the second half (a masked prompt, then the answer)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab_size, (n_samples, length), generator=generator)
    labels = ids.clone()
    labels[:, : length // 2] = IGNORE_INDEX
    return TokenDataset.from_samples(list(zip(ids.tolist(), labels.tolist(), strict=True)))


def supervised_positions(batch: int, length: int) -> int:
    """Positions whose next token has a label: the second half of each sequence."""
    return batch * (length - length // 2)


def model_flops_per_step(config: Config, lora: LoRAConfig, batch: int, length: int) -> int:
    """LoRA training FLOPs of one micro-batch, as the module docstring counts them."""
    d, layers = config.n_embd, config.n_layer
    shapes = linear_shapes(config)
    n_blocks = layers * sum(i * o for i, o in shapes.values())
    tokens = batch * length
    frozen = 4 * n_blocks * tokens  # forward + input gradients
    head = 4 * config.vocab_size * d * supervised_positions(batch, length)
    lora_terms = 6 * lora.r * layers * tokens * sum(sum(shapes[t]) for t in lora.targets if t in shapes)
    attention = (
        3 * 2 * batch * length * length * config.n_head * config.head_dim * layers
    )  # causal: half of 4·B·T²·d forward; backward 2x
    return frozen + head + lora_terms + attention


def peak_flops(device_name: str) -> float | None:
    """The GPU's dense bf16 peak FLOP/s from PEAK_BF16_FLOPS, or None when unknown."""
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in device_name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measured(
    framework: str,
    length: int,
    seconds: float,
    steps: int,
    peak_bytes: int,
    loss: float,
    flops: int,
    peak: float | None,
    lora_dtype: torch.dtype,
) -> dict:
    """One result row: throughput, MFU and memory of `steps` timed steps."""
    s_per_step = seconds / steps
    return {
        "framework": framework,
        "max_length": length,
        "steps": steps,
        "s_per_step": s_per_step,
        "tokens_per_s": MICRO_BATCH * length / s_per_step,
        "model_flops_per_step": flops,
        "mfu": flops / s_per_step / peak if peak else None,
        "peak_memory_bytes": peak_bytes,
        "final_loss": loss,
        "lora_param_dtype": str(lora_dtype).removeprefix("torch."),
    }


def run_lorafit(
    model: LLaMA,
    length: int,
    args: argparse.Namespace,
    precision: str,
    peak: float | None,
    variant: str = "lorafit",
    method: str = "lora",
    method_config: LoRAConfig = LORA,
) -> dict:
    """Warm-up plus timed steps of lorafit's own training loop; timing from its per-step metrics log.

    variant names the row ("lorafit", "lorafit DoRA", "lorafit QLoRA nf4-dq"); method and method_config are what
    `lorafit estimate` is asked about for the same run.
    """
    device = next(model.parameters()).device
    total = args.warmup + args.steps
    data = synthetic_dataset(model.config.vocab_size, length, MICRO_BATCH * total, SEED + length)
    cfg = TrainConfig(
        max_steps=total,
        micro_batch_size=MICRO_BATCH,
        global_batch_size=MICRO_BATCH,
        max_seq_length=length,
        warmup_steps=args.warmup,
        eval_interval=0,
        save_interval=0,
        precision=precision,
        seed=SEED,
    )
    reset_peak(device)
    with tempfile.TemporaryDirectory() as run_dir:
        result = train(model, data, None, cfg, Path(run_dir), pad_id=0, progress=False)
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    # elapsed_s is taken after each step's loss.item(), so the difference leaves the warm-up steps out.
    seconds = records[-1]["elapsed_s"] - records[args.warmup - 1]["elapsed_s"]
    lora_dtype = model.layers[0].self_attn.q_proj.lora_A.weight.dtype
    row = measured(
        variant,
        length,
        seconds,
        args.steps,
        result.peak_memory_bytes,
        result.final_train_loss,
        model_flops_per_step(model.config, LORA, MICRO_BATCH, length),
        peak,
        lora_dtype,
    )
    estimate = estimate_memory(
        model.config,
        method,
        MICRO_BATCH,
        length,
        precision,
        method_config,
        supervised_fraction=supervised_positions(1, length) / (length - 1),
        device=device.type,
    )
    row["estimated_peak_bytes"] = estimate.total
    return row


def variant_rows(
    config: Config,
    device: torch.device,
    dtype: torch.dtype,
    args: argparse.Namespace,
    precision: str,
    peak: float | None,
) -> list[dict]:
    """DoRA and QLoRA (nf4-dq base) rows through the same loop, each on a fresh model with the same weights."""
    from dataclasses import asdict, replace

    from lorafit.methods.qlora import QLoRAConfig
    from lorafit.quant import quantize_model

    rows = []
    dora, qlora = replace(LORA, dora=True), QLoRAConfig(**asdict(LORA), quantize="nf4-dq")
    for variant, method, method_config in (("lorafit DoRA", "lora", dora), ("lorafit QLoRA nf4-dq", "qlora", qlora)):
        if method == "qlora" and not importlib.util.find_spec("bitsandbytes"):
            continue
        torch.manual_seed(SEED)
        model = build_model(config, device, dtype)
        if method == "qlora":
            quantize_model(model, qlora.quantize)
        apply_lora(model, method_config)
        rows += [
            run_lorafit(model, length, args, precision, peak, variant, method, method_config) for length in args.lengths
        ]
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def base_weights(model: LLaMA) -> dict[str, torch.Tensor]:
    """The frozen base tensors under transformers' LlamaForCausalLM names (shared, not copied)."""
    return {
        (name if name.startswith("lm_head.") else "model." + name): tensor
        for name, tensor in model.state_dict().items()
        if ".lora_" not in name
    }


def peft_model(config: Config, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """transformers' LlamaForCausalLM (SDPA) on the given tensors, with PEFT LoRA in `dtype` on q and v."""
    from peft import get_peft_model
    from peft_side import peft_lora_config
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf = config.to_hf()
    hf.pop("torch_dtype")
    hf_config = LlamaConfig(**hf, dtype=dtype)
    hf_config._attn_implementation = "sdpa"
    device = next(iter(weights.values())).device
    # Built on meta, so the 7B model costs no memory and no init time before it takes lorafit's tensors.
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_config)
    model.load_state_dict(weights, strict=True, assign=True)
    with torch.device(device):
        model.model.rotary_emb = LlamaRotaryEmbedding(hf_config)  # its buffers are not in the state dict
    model.tie_weights()
    meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"tensors left on the meta device: {meta[:4]}")
    # autocast_adapter_dtype=False keeps the LoRA weights in the model's dtype, as lorafit's bf16-true does.
    return get_peft_model(model, peft_lora_config(LORA), autocast_adapter_dtype=False)


def run_peft(model: nn.Module, config: Config, length: int, args: argparse.Namespace, peak: float | None) -> dict:
    """The same steps in a plain loop: HF loss (mean over labelled tokens), AdamW, clipping, lorafit's schedule."""
    device = next(model.parameters()).device
    total = args.warmup + args.steps
    data = synthetic_dataset(config.vocab_size, length, MICRO_BATCH * total, SEED + length)
    cfg = TrainConfig(
        max_steps=total, micro_batch_size=MICRO_BATCH, global_batch_size=MICRO_BATCH, warmup_steps=args.warmup
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0, fused=device.type == "cuda")
    model.train()
    reset_peak(device)
    started, loss_value = 0.0, float("nan")
    for step in range(total):
        if step == args.warmup:
            synchronize(device)
            started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, total, cfg)
        input_ids, labels = collate([data[i] for i in range(step * MICRO_BATCH, (step + 1) * MICRO_BATCH)], 0)
        loss = model(input_ids=input_ids.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()  # one host sync per step, as lorafit's loop has
    synchronize(device)
    seconds = time.perf_counter() - started
    return measured(
        "peft",
        length,
        seconds,
        args.steps,
        peak_memory_bytes(device),
        loss_value,
        model_flops_per_step(config, LORA, MICRO_BATCH, length),
        peak,
        params[0].dtype,
    )


def extrapolate(rows: list[dict]) -> list[dict]:
    """The seed's Alpaca run at each framework's measured s/step at max length 256: samples x epochs / micro-batch."""
    steps = SEED_RUN["samples"] * SEED_RUN["epochs"] // SEED_RUN["micro_batch"]
    return [
        {
            "framework": row["framework"],
            "max_length": row["max_length"],
            **SEED_RUN,
            "optimizer_steps": steps,
            "s_per_step": row["s_per_step"],
            "minutes": steps * row["s_per_step"] / 60,
            "minutes_at_seed_iterations": SEED_RUN["seed_iterations"] * row["s_per_step"] / 60,
        }
        for row in rows
        if row["max_length"] == EXTRAPOLATION_LENGTH
    ]


def markdown(report: dict) -> str:
    """The results as a Markdown table, with the machine, the setting and the extrapolation."""
    meta = report["meta"]
    lines = [
        f"**{meta['model']}**, LoRA {meta['lora']}, {meta['precision']}, micro-batch {MICRO_BATCH} (= global "
        f"batch), labels on the second half of each sequence; {meta['steps']} timed steps after "
        f"{meta['warmup_steps']} warm-up. {meta['device_name']}, torch {meta['torch']}, {meta['date']}.",
        "",
        "| framework | max length | tokens/s | s/step | model TFLOP/step | MFU | peak GiB | lorafit estimate GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["results"]:
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
        estimate = f"{row['estimated_peak_bytes'] / GIB:.2f}" if "estimated_peak_bytes" in row else ""
        lines.append(
            f"| {row['framework']} | {row['max_length']} | {row['tokens_per_s']:,.0f} | {row['s_per_step']:.4f} | "
            f"{row['model_flops_per_step'] / 1e12:.2f} | {mfu} | {row['peak_memory_bytes'] / GIB:.2f} | {estimate} |"
        )
    for ext in report["extrapolation"]:
        lines.append(
            f"\n{ext['framework']}: the seed's Alpaca run = {ext['samples']:,} samples x {ext['epochs']} epochs / "
            f"micro-batch {ext['micro_batch']} = {ext['optimizer_steps']:,} steps x {ext['s_per_step']:.4f} s "
            f"(max length {ext['max_length']}) = **{ext['minutes']:.0f} min**; at the seed's "
            f"{ext['seed_iterations']:,} reported iterations, {ext['minutes_at_seed_iterations']:.0f} min "
            f"(lit-llama: {ext['seed_minutes']} min and {ext['seed_memory_gb']} GB on an {ext['gpu']})"
        )
    if report["skipped"]:
        lines.append(f"\nnot run: {report['skipped']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("gpu_results.json"))
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 30; dry run 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; dry run 1)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="max lengths (default 256 512)")
    parser.add_argument("--dry-run", action="store_true", help="a tiny float32 model on the CPU: checks the script")
    args = parser.parse_args(argv)
    defaults = {"steps": 2, "warmup": 1, "lengths": [16, 32]} if args.dry_run else DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1 (the warm-up step compiles kernels and allocates)")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; write the JSON, print the table; return the report."""
    args = parse_args(argv)
    if args.dry_run:
        device, dtype, precision, config = torch.device("cpu"), torch.float32, "32-true", tiny_config()
        device_name = "CPU (dry run)"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU: this benchmark needs one (use --dry-run to check the script on a CPU)")
        device, dtype, precision = torch.device("cuda"), torch.bfloat16, "bf16-true"
        config, device_name = Config.from_name("Llama-2-7B"), torch.cuda.get_device_name()
    peak = None if args.dry_run else peak_flops(device_name)
    torch.manual_seed(SEED)

    started = time.perf_counter()
    model = build_model(config, device, dtype)
    synchronize(device)
    build_s = time.perf_counter() - started
    apply_lora(model, LORA)
    rows = [run_lorafit(model, length, args, precision, peak) for length in args.lengths]

    skipped = ""
    if importlib.util.find_spec("transformers") and importlib.util.find_spec("peft"):
        weights = base_weights(model)
        del model  # the PEFT model keeps the base tensors; lorafit's LoRA weights go
        hf = peft_model(config, weights, dtype)
        del weights
        rows += [run_peft(hf, config, length, args, peak) for length in args.lengths]
    else:
        skipped = "PEFT (transformers and peft are not both installed)"
    rows += variant_rows(config, device, dtype, args, precision, peak)

    report = {
        "meta": {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device_name": device_name,
            "torch": torch.__version__,
            "transformers": package_version("transformers"),
            "peft": package_version("peft"),
            "dry_run": args.dry_run,
            "model": config.name,
            "precision": precision,
            "lora": f"r={LORA.r} alpha={LORA.alpha:g} dropout={LORA.dropout} on {','.join(LORA.targets)}",
            "micro_batch": MICRO_BATCH,
            "steps": args.steps,
            "warmup_steps": args.warmup,
            "labels": "second half of each sequence (the first half masked, like a prompt)",
            "peak_bf16_flops": peak,
            "flops": "4N per token (forward + input gradients) + LM head at labelled positions + LoRA + attention",
            "model_build_s": build_s,
        },
        "results": rows,
        "extrapolation": extrapolate(rows),
        "skipped": skipped,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    return report


def package_version(name: str) -> str | None:
    """An installed package's version, or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
