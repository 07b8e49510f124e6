"""lorafit serve under load: concurrent streaming clients against a live server on the default model.

    python benchmarks/serve.py [--checkpoint DIR] [--clients 1 8 32] [--max-tokens 32] [--requests 2] [--compile]

One server process (started here, on 127.0.0.1) holds the base model and --adapters random LoRA adapters
(q,v, r=8, in an --adapter-dir, all loaded by a warm-up pass first). Every scenario sends the same
prompts with the same max_tokens, greedy, with stop tokens ignored by ending on max_tokens
(the prompts ask for long answers). Each client streams its requests one after another, --requests
each (the 1-client base row is the naive way: one request at a time). Reported per scenario: generated
tokens per second over the scenario's wall time, time to first token (p50/p99) and per-token latency
(a request's decode time over its tokens after the first, p50/p99), and the throughput as a ratio to
the naive row and to the base at the same concurrency. From the server's /metrics: decode steps and prefill
forwards per scenario, the decode steps' weight reads (every block matrix, norm and the LM head once per step,
machine.py's `decode_weight_bytes`) as a share of the read bandwidth probed just before the scenario (machine.py's
`read_bandwidth`, huge pages, with the server idle: a shared machine's bus gives 33-67 GB/s from one minute to the
next), and prefill forwards per request (below 1 when arrivals were prefilled together).

The baseline "PEFT set_adapter" is the usual way to serve several adapters without a server of one's own:
transformers' LlamaForCausalLM with every adapter loaded into one peft PeftModel, requests served one at a time,
`set_adapter(name)` before each `generate` (the base with the adapters disabled); the same chat prompts (lorafit's
tokens) and max_tokens, greedy, in this process after the server has stopped; --peft-requests requests per mix.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
from machine import decode_weight_bytes, describe, probe, read_bandwidth

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

        before = engine_counters(url)
        start = time.perf_counter()
        results = [x for xs in await asyncio.gather(*(run_client(c) for c in range(clients))) for x in xs]
        wall = time.perf_counter() - start
        after = engine_counters(url)
    counts = {key: after[key] - before.get(key, 0.0) for key in after}
    return summarise(results, wall) | counts


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, linearly interpolated (statistics.quantiles needs two values)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_counters(url: str) -> dict[str, float]:
    """The server's decode-step and prefill counters, from /metrics."""
    names = ("lorafit_decode_steps_total", "lorafit_prefill_forwards_total", "lorafit_prefilled_requests_total")
    values = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            values[name.removeprefix("lorafit_").removesuffix("_total")] = float(value)
    return values


def peft_baseline(
    checkpoint: Path, adapter_dir: Path, mixes: dict[str, list[str]], args: argparse.Namespace
) -> list[dict[str, float]]:
    """Naive multi-adapter serving: one transformers + peft model, one request at a time, set_adapter before each."""
    import torch
    import transformers
    from peft import PeftModel

    from lorafit.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_checkpoint(checkpoint)
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    names = sorted({m for models in mixes.values() for m in models if m != "base"}, key=lambda n: int(n[7:]))
    if names:
        model = PeftModel.from_pretrained(model, adapter_dir / names[0], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapter_dir / name, adapter_name=name)
    model.eval()
    stop_ids = sorted(tokenizer.stop_ids)
    rows = []
    for label, models in mixes.items():
        results = []
        start = time.perf_counter()
        for k in range(args.peft_requests):
            name, prompt = models[k % len(models)], PROMPTS[k % len(PROMPTS)]
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            ids = torch.tensor([tokenizer.encode(text, bos=False)])
            clock = Clock()
            tick = time.perf_counter()
            with torch.inference_mode():
                if name == "base" and names:
                    with model.disable_adapter():
                        out = generate_greedy(model, ids, args.max_tokens, stop_ids, clock)
                else:
                    if names:
                        model.set_adapter(name)
                    out = generate_greedy(model, ids, args.max_tokens, stop_ids, clock)
            tokens = out.size(1) - ids.size(1)
            first, last = clock.times[1], clock.times[-1]  # the streamer's first call is the prompt
            per_token = (last - first) / (tokens - 1) if tokens > 1 else 0.0
            results.append({"ttft": first - tick, "per_token": per_token, "tokens": tokens})
        rows.append({"mix": label, "clients": 1, **summarise(results, time.perf_counter() - start)})
        print(f"  PEFT set_adapter, {label}: {rows[-1]['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    return rows


class Clock:
    """A transformers streamer that only notes when each new token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: object) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def generate_greedy(model, ids, max_tokens: int, stop_ids: list[int], clock: Clock):
    """transformers' greedy generate, stopping at the chat's stop tokens as the server does."""
    return model.generate(
        ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=stop_ids, pad_token_id=0, streamer=clock
    )


def summarise(results: list[dict[str, float]], wall: float) -> dict[str, float]:
    """Throughput and latency percentiles of one scenario's requests."""
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


def start_server(checkpoint: Path, adapter_dir: Path, args: argparse.Namespace, port: int) -> subprocess.Popen:
    command = [sys.executable, "-c", "from lorafit.cli import main; main()", "serve", "--checkpoint", str(checkpoint)]
    command += ["--adapter-dir", str(adapter_dir), "--port", str(port), "--max-batch", str(max(args.clients))]
    command += ["--max-loaded-adapters", str(args.adapters), "--served-model-name", "base", "--log-level", "warning"]
    command += ["--max-model-len", "512"] + (["--compile"] if args.compile else [])
    process = subprocess.Popen(command)
    deadline = time.monotonic() + 600
    while True:
        if process.poll() is not None:
            sys.exit(f"the server exited with status {process.returncode}")
        if time.monotonic() > deadline:
            process.kill()
            sys.exit("the server did not start (and compile) within 600 s")
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
    parser.add_argument("--compile", action="store_true", help="serve with --compile")
    parser.add_argument("--peft-requests", type=int, default=8, help="requests per mix for the PEFT baseline (0: none)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    from lorafit.checkpoint import load_config
    from lorafit.hub import resolve_checkpoint
    from lorafit.io import write_json

    machine = probe()
    print(f"machine: {describe(machine)}", file=sys.stderr, flush=True)
    checkpoint = resolve_checkpoint(args.checkpoint)
    weight_bytes = decode_weight_bytes(load_config(checkpoint), 4)  # float32
    started = time.perf_counter()
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
                    read = read_bandwidth(repeats=3)
                    result = asyncio.run(scenario(url, models, clients, args.requests, args.max_tokens))
                    rows.append({"mix": label, "clients": clients, "read_gb_per_s": read, **result})
                    print(f"  {label} @ {clients}: {result['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
        finally:
            server.terminate()
            server.wait(60)
        if args.peft_requests > 0:
            for row in peft_baseline(checkpoint, adapter_dir, mixes, args):
                rows.append(row | {"mix": f"PEFT set_adapter: {row['mix']}"})
    naive = next((r["tokens_per_s"] for r in rows if r["mix"] == "base" and r["clients"] == 1), float("nan"))
    base_at = {r["clients"]: r["tokens_per_s"] for r in rows if r["mix"] == "base"}
    print(f"lorafit serve{' --compile' if args.compile else ''}, {datetime.now():%Y-%m-%d %H:%M}, max_tokens "
          f"{args.max_tokens}, {args.requests} requests per client ({args.peft_requests} per PEFT row), "
          f"{time.perf_counter() - started:.0f} s in all; naive = base, 1 client (one request at a time)")  # fmt: skip
    print(f"machine: {describe(machine)}")
    print(
        "| mix | clients | tokens/s | x naive | x base (same clients) | TTFT p50 / p99 ms | per token p50 / p99 ms "
        "| decode steps/s | read GB/s just before | weight reads, share of that read | prefill forwards per request |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        speed, ms = r["tokens_per_s"], {k: r[k] * 1e3 for k in ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99")}
        steps = r.get("decode_steps")
        steps_s = "-" if steps is None else f"{steps / r['wall_s']:.1f}"
        read = "-" if steps is None else f"{r['read_gb_per_s']:.1f}"
        share = "-" if steps is None else f"{steps * weight_bytes / r['wall_s'] / 1e9 / r['read_gb_per_s']:.0%}"
        prefills = "-" if steps is None else f"{r['prefill_forwards'] / max(r['prefilled_requests'], 1):.2f}"
        print(
            f"| {r['mix']} | {r['clients']} | {speed:.1f} | {speed / naive:.2f} | "
            f"{speed / base_at.get(r['clients'], float('nan')):.2f} | "
            f"{ms['ttft_p50']:.0f} / {ms['ttft_p99']:.0f} | {ms['tpot_p50']:.0f} / {ms['tpot_p99']:.0f} | "
            f"{steps_s} | {read} | {share} | {prefills} |"
        )
    if args.json:
        write_json(args.json, {"machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
