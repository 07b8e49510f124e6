"""This machine's limits, measured once per run: float32 and bf16 matmul GFLOP/s and memory read bandwidth.

    python benchmarks/machine.py                 # a few seconds; --threads N, --json FILE

Ratios to a peer move with the machine; shares of the machine's own limits do not. So every CPU benchmark
measures the limits with `probe()` on the threads it uses and prints, beside its peer ratio:

- training: model FLOP/s as a share of the float32 matmul peak (the best of a few large square products).
  Model FLOPs (`training_flops`) count each sample's real tokens, no padding: benchmarks/gpu.py's
  `model_flops_per_step` (forward plus input gradients of the frozen block matmuls, 4N per token; LoRA's own
  products; causal attention) with its LM head term at the sample's labelled positions, as lorafit computes
  it; full finetuning adds the weight gradients (the standard 6N per token, and the head's at the labelled
  positions); the LLaMA-Adapter methods are counted as their frozen model (their prompt's few products left out).
- decoding: bytes of weights read per token (`decode_weight_bytes`: every block matrix, the norms and the LM
  head, which is the embedding when tied; not the KV cache, a few % at these lengths) x tokens/s, as a share of
  the read bandwidth (summing a large float32 tensor: sum, amax and dot all read at the same rate).
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import torch
from gpu import model_flops_per_step, supervised_positions

from lorafit.config import Config
from lorafit.estimate import linear_shapes
from lorafit.lora import LoRAConfig
from lorafit.runtime import cpu_model, huge_page_empty, matmul_gflops

MATMUL_SIZE = 2048  # large enough to reach the peak on a few cores, 17 GFLOP a product
READ_BYTES = 512 * 2**20  # well beyond any last-level cache
NO_LORA = SimpleNamespace(r=0, targets=())  # model_flops_per_step with no LoRA terms (LoRAConfig needs a target)


def read_bandwidth(nbytes: int = READ_BYTES, repeats: int = 5) -> float:
    """Best read bandwidth in GB/s (1e9 bytes): summing an nbytes float32 tensor on torch's threads.

    The tensor lies on huge pages, as decoding's packed weights do (runtime.pack_decode_weights): on 4 KiB
    pages the same sum read 10-40% slower on our 2-core AMD EPYC, which would flatter every share of it.
    """
    x = huge_page_empty(nbytes).view(torch.float32).fill_(1.0)
    x.sum()  # the first pass also faults the pages in
    best = float("inf")
    for _ in range(repeats):
        tick = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - tick)
    return x.numel() * 4 / best / 1e9


def probe(threads: int | None = None, repeats: int = 3) -> dict:
    """This machine's limits on `threads` threads (default: torch's): CPU model, matmul GFLOP/s, read GB/s."""
    if threads is not None:
        torch.set_num_threads(threads)
    return {
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": date.today().isoformat(),
        "float32_gflops": matmul_gflops(torch.float32, MATMUL_SIZE, repeats),
        "bfloat16_gflops": matmul_gflops(torch.bfloat16, MATMUL_SIZE, repeats),
        "read_gb_per_s": read_bandwidth(READ_BYTES),
    }


def describe(machine: dict) -> str:
    """The probe as one line, for a benchmark's header."""
    return (
        f"{machine['cpu']}, {machine['threads']} threads, torch {machine['torch']} ({machine['date']}): matmul "
        f"float32 {machine['float32_gflops']:.1f} GFLOP/s, bf16 {machine['bfloat16_gflops']:.1f} GFLOP/s; "
        f"read bandwidth {machine['read_gb_per_s']:.1f} GB/s"
    )


def share(value: float | None, limit: float) -> str:
    """value / limit as a percentage for a table cell ('-' when there is no value)."""
    return "-" if value is None else f"{value / limit:.0%}"


def training_flops(config: Config, method: str, samples: list[tuple[int, int]], lora: LoRAConfig | None = None) -> int:
    """Model FLOPs of one training pass over samples given as (tokens, labelled positions), padding not counted.

    method: "lora" (with `lora`), "full", or an adapter method (counted as its frozen model).
    """
    head_per_position = 4 * config.vocab_size * config.n_embd  # forward + input gradient, as gpu.py counts it
    block_weights = config.n_layer * sum(i * o for i, o in linear_shapes(config).values())
    total = 0
    for length, labelled in samples:
        flops = model_flops_per_step(config, lora if method == "lora" else NO_LORA, 1, length)
        flops += head_per_position * (labelled - supervised_positions(1, length))  # gpu.py assumes half labelled
        if method == "full":  # weight gradients too: 6N per token, and the head's at the labelled positions
            flops += 2 * block_weights * length + head_per_position // 2 * labelled
        total += flops
    return total


def decode_weight_bytes(config: Config, element_size: int) -> int:
    """Bytes of weights one decoded token reads: block matrices, norms and the LM head (one embedding row aside)."""
    block = sum(i * o for i, o in linear_shapes(config).values()) + 2 * config.n_embd
    return (config.n_layer * block + config.n_embd + config.vocab_size * config.n_embd) * element_size


def weight_bytes_read(model: torch.nn.Module) -> int:
    """Bytes of weights one decoded token reads: every linear as stored (quantised ones: codes and constants),
    the norms and the LM head (the embedding when tied); the embedding's one row and the KV cache aside."""
    from lorafit.model import RMSNorm
    from lorafit.quant import QuantizedLinear

    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            total += module.nbytes
        elif isinstance(module, torch.nn.Linear | RMSNorm) and module.weight.data_ptr() not in seen:
            seen.add(module.weight.data_ptr())
            total += module.weight.numel() * module.weight.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed matmuls per dtype (the best is kept)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    machine = probe(args.threads, args.repeats)
    print(describe(machine))
    if args.json:
        args.json.write_text(json.dumps(machine, indent=2) + "\n")


if __name__ == "__main__":
    main()
