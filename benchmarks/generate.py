"""Decoding speed and memory: lorafit against transformers' `generate` on the same checkpoint.

    python benchmarks/generate.py [--checkpoint DIR] [--dtype float32 bfloat16] [--threads 2] [--runs 5]

All engines get the same prompt ids, dtype and thread count, decode exactly --new-tokens tokens
greedily (no early stop), warm up once, and report the median of --runs runs. Each (engine, dtype)
runs in its own process, so peak memory (the process's peak resident set on the CPU) is its own.
"lorafit --compile" decodes through lorafit.generate.compiled_decode_step; its warm-up (which
compiles, or loads inductor's on-disk cache) is timed and reported apart.

Beside the ratio to transformers: the bytes of weights each token reads (machine.py's
`decode_weight_bytes`) times decode tokens/s, and that as a share of this machine's read bandwidth,
measured by machine.py's `probe` on --threads threads before the runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
from machine import decode_weight_bytes, describe, probe

ENGINES = ("transformers", "lorafit", "lorafit --compile")
PROMPT = "Explain in a few paragraphs why the sky is blue and why sunsets are red."


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    from lorafit.hub import resolve_checkpoint

    checkpoint = resolve_checkpoint(args.checkpoint)
    machine = probe(args.threads)
    print(f"machine: {describe(machine)}", file=sys.stderr, flush=True)
    results = []
    for dtype in args.dtype:
        for engine in ENGINES:
            command = [
                sys.executable,
                __file__,
                "--worker",
                engine,
                "--checkpoint",
                str(checkpoint),
                "--dtype",
                dtype,
                "--threads",
                str(args.threads),
                "--runs",
                str(args.runs),
                "--new-tokens",
                str(args.new_tokens),
            ]
            print(f"running {engine} {dtype} ...", file=sys.stderr, flush=True)
            out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    print(table(results, checkpoint, args, machine))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "results": results}, indent=2))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="checkpoint directory, name or HF repo id (default: the default model)")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    parser.add_argument("--runs", type=int, default=5, help="timed runs after one warm-up; the median is reported")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    return parser.parse_args()


def run_worker(args: argparse.Namespace) -> dict:
    """Warm up, then time --runs generations of one engine; the medians as a dict."""
    from lorafit.runtime import peak_memory_bytes
    from lorafit.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype[0])
    prompt_ids = Tokenizer.from_checkpoint(args.checkpoint).encode(PROMPT)
    if args.worker == "transformers":
        run = hf_runner(args.checkpoint, dtype)
    else:
        run = lorafit_runner(args.checkpoint, dtype, compile=args.worker == "lorafit --compile")
    started = time.perf_counter()
    run(prompt_ids, args.new_tokens)  # warm-up
    warmup_s = time.perf_counter() - started
    timings = [run(prompt_ids, args.new_tokens) for _ in range(args.runs)]
    return {
        "engine": args.worker,
        "dtype": args.dtype[0],
        "threads": args.threads,
        "prompt_tokens": len(prompt_ids),
        "new_tokens": args.new_tokens,
        "warmup_s": warmup_s,
        "time_to_first_token_s": statistics.median(t[0] for t in timings),
        "decode_tokens_per_s": statistics.median(t[1] for t in timings),
        "peak_memory_bytes": peak_memory_bytes("cpu"),
    }


def lorafit_runner(checkpoint: str, dtype: torch.dtype, compile: bool):
    """A function (prompt_ids, n) -> (time to first token, decode tokens/s) using lorafit."""
    from lorafit.generate import LLM, GenerationStats, generate

    model = LLM.load(checkpoint, dtype=dtype, device="cpu", compile=compile).model

    def run(prompt_ids: list[int], n: int) -> tuple[float, float]:
        stats = GenerationStats()
        tokens = list(generate(model, prompt_ids, n, stats=stats, compiled=compile))
        assert len(tokens) == n, f"lorafit produced {len(tokens)} tokens, not {n}"
        return stats.time_to_first_token_s, stats.decode_tokens_per_s

    return run


class _Clock:
    """A transformers streamer that only notes when each new token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_runner(checkpoint: str, dtype: torch.dtype):
    """A function (prompt_ids, n) -> (time to first token, decode tokens/s) using transformers' generate."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval()

    def run(prompt_ids: list[int], n: int) -> tuple[float, float]:
        clock = _Clock()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([prompt_ids]),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                streamer=clock,
                pad_token_id=0,
            )
        assert out.size(1) - len(prompt_ids) == n, f"transformers produced {out.size(1) - len(prompt_ids)} tokens"
        # The streamer's first call is the prompt, then one call per new token.
        first, last = clock.times[1], clock.times[-1]
        return first - start, (n - 1) / (last - first)

    return run


def table(results: list[dict], checkpoint: Path, args: argparse.Namespace, machine: dict) -> str:
    """The results as a Markdown table: the lorafit/transformers decode ratio and the share of read bandwidth."""
    from lorafit.checkpoint import load_config

    config = load_config(checkpoint)
    base = {r["dtype"]: r["decode_tokens_per_s"] for r in results if r["engine"] == "transformers"}
    bandwidth = machine["read_gb_per_s"]
    lines = [
        f"Decoding {args.new_tokens} tokens greedily from {checkpoint.name}, {args.threads} threads, "
        f"median of {args.runs} runs ({date.today()}). Machine: {describe(machine)}.",
        "",
        "| engine | dtype | warm-up | time to first token | decode tokens/s | peak memory | vs transformers "
        f"| weight GB/s | share of {bandwidth:.1f} GB/s read |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ratio = r["decode_tokens_per_s"] / base[r["dtype"]] if r["dtype"] in base else float("nan")
        weight_bytes = decode_weight_bytes(config, getattr(torch, r["dtype"]).itemsize)
        streamed = weight_bytes * r["decode_tokens_per_s"] / 1e9
        lines.append(
            f"| {r['engine']} | {r['dtype']} | {r['warmup_s']:.1f} s | {r['time_to_first_token_s'] * 1000:.0f} ms | "
            f"{r['decode_tokens_per_s']:.1f} | {r['peak_memory_bytes'] / 2**30:.2f} GiB | {ratio:.2f}x "
            f"| {streamed:.1f} | {streamed / bandwidth:.0%} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
