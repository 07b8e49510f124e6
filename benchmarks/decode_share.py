"""Decoding's share of the read bandwidth at the same moment: a probe and each engine's steps in turn, one process.

    python benchmarks/decode_share.py                  # 30 rounds of 20 steps, float32, the default model
    python benchmarks/decode_share.py --weights float32 bfloat16 int8   # the weight formats side by side
    python benchmarks/decode_share.py --rounds 3 --steps 4 --no-compile   # a smoke run

generate.py times whole generations a row at a time, each in its own process, minutes apart; the memory bus
of a shared virtual machine gives 33-67 GB/s from one minute to the next, so its rows' shares carry that noise.
Here every round probes the read bandwidth (machine.read_bandwidth, huge pages) and then runs --steps decode
steps of each engine, so each share is of the bandwidth measured a second before; the table gives the median
share over the rounds and its range, and each engine's speed against eager lorafit's in the same round.

Engines: lorafit eager and compiled as generate, chat and serve load them (weights packed into one buffer on
huge pages, runtime.pack_decode_weights), and the same two with the weights left where loading put them (the
checkpoint's memory-mapped pages), which is what packing is measured against. --weights adds bf16 and int8
(weight-only, LLM.load(quantize="int8")) eager and compiled engines, loaded as generate loads them: their speed
against float32 eager's in the same round is the ratio issue 14's int8 target is about, free of the minutes
between generate.py's rows.

What a token costs besides its weights: each round also times both packed engines' steps on a model of the same
depth, heads and head size whose hidden layers are 16 wide (a few MB of weights; the same operations, the same
attention over the same KV cache). That fixed cost caps the share a step can reach at a given bandwidth:
ceiling = (W / read) / (W / read + fixed) for W bytes of weights, and the weights themselves stream at
W / (step - fixed); the table gives both, so a shortfall can be told apart from a slow product.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from contextlib import ExitStack
from unittest import mock

import torch
from machine import describe, probe, read_bandwidth, weight_bytes_read

PROMPT_TOKENS = 30
WEIGHTS = ("float32", "bfloat16", "int8")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    machine = probe(args.threads)
    engines = load_engines(args)
    weight_bytes = {name: weight_bytes_read(model) for name, (model, _) in engines.items()}
    engines |= fixed_cost_engines(engines, args)
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    reads = []
    token = torch.tensor([[5]])
    for round in range(args.rounds + 1):  # round 0 warms every engine up at every position, and is not counted
        read = read_bandwidth(repeats=3)
        for name, (_, step) in engines.items():
            start = time.perf_counter()
            for i in range(args.steps):
                step(token, PROMPT_TOKENS + i)
            if round:
                seconds[name].append((time.perf_counter() - start) / args.steps)
        if round:
            reads.append(read)
    print(table(seconds, reads, weight_bytes, args, machine))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="checkpoint directory, name or HF repo id (default: the default model)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=20, help="decode steps per engine per round")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-compile", action="store_true", help="leave the compiled engines out (no compiler)")
    parser.add_argument("--weights", nargs="+", choices=WEIGHTS, default=["float32"], help="float32 always runs")
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be >= 1")
    return args


def load_engines(args: argparse.Namespace) -> dict[str, tuple[torch.nn.Module, object]]:
    """name -> (model, step function (token, position) -> logits), each with a KV cache holding a prompt."""
    from lorafit.generate import LLM, compiled_decode_step

    engines = {}
    weights = ["float32"] + [w for w in args.weights if w != "float32"]
    for compile in (False,) if args.no_compile else (False, True):
        for weight, packed in [(w, True) for w in weights] + [("float32", False)]:
            with ExitStack() as stack:
                if not packed:  # loading as before packing: the same model, its weights where loading put them
                    for module in ("lorafit.runtime", "lorafit.generate"):
                        stack.enter_context(mock.patch(f"{module}.pack_decode_weights", lambda model, join: 0))
                quantize = "int8" if weight == "int8" else None
                dtype = torch.bfloat16 if weight == "bfloat16" else torch.float32
                load = LLM.load(args.checkpoint, dtype=dtype, device="cpu", compile=compile, quantize=quantize)
            model = load.model
            model.setup_kv_cache(1, PROMPT_TOKENS + args.steps)
            model(torch.arange(100, 100 + PROMPT_TOKENS)[None], 0)
            step = compiled_decode_step(model) if compile else model
            name = "lorafit --compile" if compile else "lorafit"
            name += ("" if weight == "float32" else f" {weight}") + ("" if packed else ", weights as loaded")
            engines[name] = (model, step)
    return engines


FIXED = ", fixed cost"
"""Suffix of the engine that times `name`'s step on the narrow model (fixed_cost_engines)."""


def fixed_cost_engines(engines: dict, args: argparse.Namespace) -> dict[str, tuple[torch.nn.Module, object]]:
    """For each packed engine, the same step on a model of the same depth, heads and head size, 16 wide."""
    from lorafit.generate import compiled_decode_step, prepare_for_decoding
    from lorafit.model import LLaMA

    fixed = {}
    for name in ("lorafit", "lorafit --compile"):
        if name not in engines:
            continue
        config = engines[name][0].config
        narrow = dataclasses.replace(config, n_embd=16, intermediate_size=16, vocab_size=256)
        model = LLaMA(narrow).eval()
        prepare_for_decoding(model, None, compile=name.endswith("--compile"))
        model.setup_kv_cache(1, PROMPT_TOKENS + args.steps)
        model(torch.arange(100, 100 + PROMPT_TOKENS)[None], 0)
        fixed[name + FIXED] = (model, compiled_decode_step(model) if name.endswith("--compile") else model)
    return fixed


def table(seconds: dict[str, list[float]], reads: list[float], weight_bytes: dict[str, int], args, machine) -> str:
    """Per engine: median tokens/s, GB/s, share of the probe before each round (median, range), vs eager lorafit;
    for an engine with a fixed-cost twin, that cost, the share it leaves possible, and the weights' own stream."""
    reference = seconds["lorafit"]
    lines = [
        f"{args.rounds} rounds of a read probe then {args.steps} decode steps per engine, one token at a time after a "
        f"{PROMPT_TOKENS}-token prompt, {weight_bytes['lorafit'] / 1e9:.3f} GB of float32 weights per token. Machine: "
        f"{describe(machine)}. Probes before the rounds: median {statistics.median(reads):.1f} GB/s "
        f"({min(reads):.1f}-{max(reads):.1f}).",
        "",
        "| engine | weight GB/token | tokens/s (median) | weight GB/s "
        "| share of the read probed before the round (median) | range over the rounds "
        "| speed vs lorafit eager, same round (median) | fixed cost per token "
        "| share possible with that fixed cost | weights streamed once the fixed cost is taken out |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, times in seconds.items():
        if name.endswith(FIXED):
            continue
        size = weight_bytes[name]
        shares = [size / t / 1e9 / read for t, read in zip(times, reads, strict=True)]
        ratio = statistics.median(r / t for t, r in zip(times, reference, strict=True))
        speed = 1 / statistics.median(times)
        row = f"| {name} | {size / 1e9:.3f} | {speed:.1f} | {speed * size / 1e9:.1f} | {statistics.median(shares):.0%} "
        row += f"| {min(shares):.0%}-{max(shares):.0%} | {ratio:.2f}x |"
        fixed = seconds.get(name + FIXED)
        if fixed:
            reading = [size / 1e9 / read for read in reads]  # seconds to read the weights at the probe's rate
            ceiling = [r / (r + f) for r, f in zip(reading, fixed, strict=True)]
            streamed = [r / (t - f) for r, t, f in zip(reading, times, fixed, strict=True)]
            row += f" {statistics.median(fixed) * 1e3:.1f} ms | {statistics.median(ceiling):.0%} "
            row += f"| {statistics.median(streamed):.0%} |"
        else:
            row += " - | - | - |"
        lines.append(row)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
