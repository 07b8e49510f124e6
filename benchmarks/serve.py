"""lorafit serve under load: concurrent streaming clients against a live server on the default model.

    python benchmarks/serve.py [--checkpoint DIR] [--clients 1 8 32] [--max-tokens 32] [--requests 2]

One server process (started here, on 127.0.0.1) holds the base model and --adapters random LoRA adapters
(q,v, r=8, in an --adapter-dir, all loaded by a warm-up pass first). Every scenario sends the same
prompts with the same max_tokens, greedy, with stop tokens ignored by ending on max_tokens
(the prompts ask for long answers). Each client streams its requests one after another, --requests
each (the 1-client base row is the naive way: one request at a time). Reported per scenario: generated
tokens per second over the scenario's wall time, time to first token (p50/p99) and per-token latency
(a request's decode time over its tokens after the first, p50/p99), and the throughput as a ratio to
the naive row and to the base at the same concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

PROMPTS = [
    "Write a long story about a dragon who learns to bake bread.",
    "Explain in detail how a bicycle works, part by part.",
    "Describe a day in the life of a lighthouse keeper.",
    "List many reasons why people enjoy gardening, and explain each.",
]


def make_adapters(checkpoint: Path, out: Path, count: int) -> None:
    """`count` LoRA adapters (q,v, r=8) with random non-zero B, as PEFT directories adapter0...; made once."""
    import torch

    from lorafit.checkpoint import load_model
    from lorafit.lora import LoRAConfig, apply_lora, lora_modules, save_peft_adapter

    model = load_model(checkpoint)
    config = LoRAConfig(r=8, alpha=16, targets="q,v", dropout=0.0)
    apply_lora(model, config)
    for i in range(count):
        generator = torch.Generator().manual_seed(i)
        for _, module in lora_modules(model):
            module.lora_B.weight.data = torch.randn(module.lora_B.weight.shape, generator=generator) * 0.01
        save_peft_adapter(model, config, out / f"adapter{i}", str(checkpoint))


async def one_request(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict[str, float]:
    """Stream one chat completion; time its first token and its tokens."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line.removeprefix("data: "))
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            elif data["choices"] and data["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    ttft = (first or time.perf_counter()) - start
    per_token = (last - first) / (tokens - 1) if first is not None and tokens > 1 else 0.0
    return {"ttft": ttft, "per_token": per_token, "tokens": tokens}


async def scenario(url: str, models: list[str], clients: int, requests: int, max_tokens: int) -> dict[str, float]:
    """`clients` concurrent clients, each sending `requests` requests in turn, models assigned round robin."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def run_client(c: int) -> list[dict[str, float]]:
            out = []
            for r in range(requests):
                k = c * requests + r
                out.append(await one_request(client, models[k % len(models)], PROMPTS[k % len(PROMPTS)], max_tokens))
            return out

        start = time.perf_counter()
        results = [x for xs in await asyncio.gather(*(run_client(c) for c in range(clients))) for x in xs]
        wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    return {
        "tokens_per_s": tokens / wall,
        "ttft_p50": percentile([r["ttft"] for r in results], 50),
        "ttft_p99": percentile([r["ttft"] for r in results], 99),
        "tpot_p50": percentile([r["per_token"] for r in results], 50),
        "tpot_p99": percentile([r["per_token"] for r in results], 99),
        "requests": len(results),
        "tokens": tokens,
        "wall_s": wall,
    }


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, linearly interpolated (statistics.quantiles needs two values)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, adapter_dir: Path, args: argparse.Namespace, port: int) -> subprocess.Popen:
    command = [sys.executable, "-c", "from lorafit.cli import main; main()", "serve", "--checkpoint", str(checkpoint)]
    command += ["--adapter-dir", str(adapter_dir), "--port", str(port), "--max-batch", str(max(args.clients))]
    command += ["--max-loaded-adapters", str(args.adapters), "--served-model-name", "base", "--log-level", "warning"]
    command += ["--max-model-len", "512"]
    process = subprocess.Popen(command)
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            sys.exit(f"the server exited with status {process.returncode}")
        if time.monotonic() > deadline:
            process.kill()
            sys.exit("the server did not start within 300 s")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="default: the embedded default model")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--adapters", type=int, default=64, help="distinct adapters for the widest mixed scenario")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument(
        "--mixes", nargs="+", choices=["base", "1", "8", "all"], default=["base", "1", "8", "all"],
        help="the base alone, 1 adapter, 8 adapters, all --adapters adapters",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    from lorafit.hub import resolve_checkpoint
    from lorafit.io import write_json

    checkpoint = resolve_checkpoint(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = Path(tmp)
        make_adapters(checkpoint, adapter_dir, args.adapters)
        port = free_port()
        server = start_server(checkpoint, adapter_dir, args, port)
        url = f"http://127.0.0.1:{port}"
        try:
            names = [f"adapter{i}" for i in range(args.adapters)]
            # Warm-up: every adapter loaded, every code path run once.
            asyncio.run(scenario(url, names, min(8, args.adapters), -(-args.adapters // 8), 2))
            available = {
                "base": ("base", ["base"]),
                "1": ("1 adapter", names[:1]),
                "8": ("8 adapters", names[:8]),
                "all": (f"{args.adapters} adapters", names),
            }
            mixes = dict(available[key] for key in args.mixes)
            rows = []
            for clients in args.clients:
                for label, models in mixes.items():
                    if len(models) > max(clients, 1) * args.requests:
                        continue  # fewer requests than adapters: the mix would not be what it says
                    result = asyncio.run(scenario(url, models, clients, args.requests, args.max_tokens))
                    rows.append({"mix": label, "clients": clients, **result})
                    print(f"  {label} @ {clients}: {result['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
        finally:
            server.terminate()
            server.wait(60)
    naive = next((r["tokens_per_s"] for r in rows if r["mix"] == "base" and r["clients"] == 1), float("nan"))
    base_at = {r["clients"]: r["tokens_per_s"] for r in rows if r["mix"] == "base"}
    print(f"lorafit serve, {datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} CPUs, max_tokens {args.max_tokens}, "
          f"{args.requests} requests per client; naive = base, 1 client (one request at a time)")  # fmt: skip
    print("| mix | clients | tokens/s | x naive | x base (same clients) | TTFT p50 / p99 ms | per token p50 / p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        speed, ms = r["tokens_per_s"], {k: r[k] * 1e3 for k in ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99")}
        print(
            f"| {r['mix']} | {r['clients']} | {speed:.1f} | {speed / naive:.2f} | "
            f"{speed / base_at.get(r['clients'], float('nan')):.2f} | "
            f"{ms['ttft_p50']:.0f} / {ms['ttft_p99']:.0f} | {ms['tpot_p50']:.0f} / {ms['tpot_p99']:.0f} |"
        )
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
