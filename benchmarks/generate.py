"""Decoding speed, memory and accuracy: lorafit's weight formats (float32, bf16, int8, nf4; eager and
compiled) against float32 eager and transformers' `generate` on the same checkpoint.

    python benchmarks/generate.py --adapter out/demo/run                 # every row, 40 demo notes each
    python benchmarks/generate.py --adapter out/demo/run --notes 4 --runs 1 --new-tokens 32   # a smoke run

Speed: every row gets the same prompt ids and thread count, decodes exactly --new-tokens tokens greedily (no
early stop), warms up once and reports the median of --runs runs. Each row runs in its own process, so peak
memory (the process's peak resident set on the CPU) is its own. The compiled rows decode through
lorafit.generate.compiled_decode_step; their warm-up (which compiles, or loads inductor's on-disk cache) is
timed and reported apart. Weight formats: `float32` and `bfloat16` are the model's dtype; `int8` and `nf4` keep
the block linears quantised (lorafit.quant) and compute in float32.

Bandwidth: the bytes of weights one token reads (each block linear as it is stored, the norms and the LM
head; machine.py's `weight_bytes_read`) times decode tokens/s, as a share of the read bandwidth machine.py
measures in the row's own process, on its threads, just before each timed run; the table gives the median of
the runs' shares. The memory bus is shared with other guests and what it gives moves by half from minute to
minute (28-60 GB/s on 2026-11-30), so a probe taken at the start, or even around a row, misstates it. Peak
memory is read before the first probe (after the warm-up and the notes), so the probe's buffer is not in it.

Accuracy: with --adapter (a LoRA run of `lorafit demo`, e.g. `lorafit demo --out out/demo` then `--adapter
out/demo/run`), each lorafit row merges the adapter into its base before quantising, answers the first
--notes of the demo's held-out contact notes greedily through the same decode path it was timed on (one note
at a time), and is scored as the demo scores (lorafit.data.demo_task.score: exact match), and by how many
answers equal the float32 eager row's. Without --adapter those columns are left out. The speed runs use the
same merged model, whose shapes are the base model's.
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
from machine import decode_weight_bytes, describe, probe, read_bandwidth, weight_bytes_read

ENGINES = ("transformers", "lorafit", "lorafit --compile")
WEIGHTS = ("float32", "bfloat16", "int8", "nf4")
PROMPT = "Explain in a few paragraphs why the sky is blue and why sunsets are red."
NOTE_TOKENS = 80  # the demo's max_new_tokens for an answer


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    from lorafit.hub import resolve_checkpoint

    checkpoint = resolve_checkpoint(args.checkpoint or base_of(args.adapter))
    if args.adapter is None:
        print(
            "no --adapter: the exact-match columns need a finetuned demo adapter; make one with "
            "`lorafit demo --out out/demo` and pass --adapter out/demo/run",
            file=sys.stderr,
        )
    machine = probe(args.threads)
    print(f"machine: {describe(machine)}", file=sys.stderr, flush=True)
    results = []
    for engine, weights in rows(args):
        command = [sys.executable, __file__, "--worker", engine, "--weights", weights, "--checkpoint", str(checkpoint)]
        command += ["--threads", str(args.threads), "--runs", str(args.runs), "--new-tokens", str(args.new_tokens)]
        if args.adapter and engine != "transformers":
            command += ["--adapter", str(args.adapter), "--notes", str(args.notes)]
        print(f"running {engine} {weights} ...", file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode == 0:
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        else:  # a row that fails says why, and the others still run
            error = (done.stderr.strip().splitlines() or ["no message"])[-1]
            print(f"  failed: {error}", file=sys.stderr, flush=True)
            results.append({"engine": engine, "weights": weights, "error": error, "answers": []})
    print(table(results, checkpoint, args, machine))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "results": results}, indent=2))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="checkpoint directory, name or HF repo id (default: the adapter's base)")
    parser.add_argument("--adapter", type=Path, help="a `lorafit demo` LoRA run (its run/ directory) for exact match")
    parser.add_argument("--notes", type=int, default=40, help="held-out demo notes to answer per row (0: none)")
    parser.add_argument("--weights", nargs="+", default=list(WEIGHTS), choices=WEIGHTS)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    parser.add_argument("--runs", type=int, default=5, help="timed runs after one warm-up; the median is reported")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.notes < 0:
        parser.error(f"--notes must be >= 0, got {args.notes}")
    if args.adapter is not None and not (args.adapter / "lorafit_run.json").is_file():
        parser.error(f"--adapter {args.adapter}: no lorafit_run.json there (pass the run/ directory of `lorafit demo`)")
    return args


def base_of(adapter: Path | None) -> str | None:
    """The base checkpoint a lorafit run recorded (None without a run: the default model)."""
    if adapter is None:
        return None
    return json.loads((adapter / "lorafit_run.json").read_text())["base_checkpoint"]


def rows(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(engine, weights) pairs to run: float32 eager lorafit first (the others' reference); transformers in float32
    and bf16 only."""
    chosen = [(e, w) for w in args.weights for e in args.engines if e != "transformers" or w in ("float32", "bfloat16")]
    reference = ("lorafit", "float32")
    return sorted(chosen, key=lambda row: row != reference)


def run_worker(args: argparse.Namespace) -> dict:
    """Warm up, then time --runs generations of one row; the medians (and the notes' answers) as a dict."""
    from lorafit.runtime import peak_memory_bytes
    from lorafit.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    weights = args.weights[0]
    prompt_ids = Tokenizer.from_checkpoint(args.checkpoint).encode(PROMPT)
    compile = args.worker == "lorafit --compile"
    answers: list[str] = []
    if args.worker == "transformers":
        run, weight_bytes = hf_runner(args.checkpoint, getattr(torch, weights))
    else:
        llm = load_lorafit(args.checkpoint, args.adapter, weights, compile)
        run, weight_bytes = lorafit_runner(llm.model, compile), weight_bytes_read(llm.model)
    started = time.perf_counter()
    run(prompt_ids, args.new_tokens)  # warm-up
    warmup_s = time.perf_counter() - started
    if args.worker != "transformers" and args.adapter is not None and args.notes:
        answers = answer_notes(llm, args.notes)
    peak_memory = peak_memory_bytes("cpu")  # before the probes' buffer
    runs = []
    for _ in range(args.runs):
        read_gb_per_s = read_bandwidth()
        time_to_first_token_s, decode_tokens_per_s = run(prompt_ids, args.new_tokens)
        runs.append({"read_gb_per_s": read_gb_per_s, "decode_tokens_per_s": decode_tokens_per_s})
        runs[-1]["time_to_first_token_s"] = time_to_first_token_s
    return {
        "engine": args.worker,
        "weights": weights,
        "threads": args.threads,
        "prompt_tokens": len(prompt_ids),
        "new_tokens": args.new_tokens,
        "weight_bytes": weight_bytes,
        "warmup_s": warmup_s,
        "time_to_first_token_s": statistics.median(r["time_to_first_token_s"] for r in runs),
        "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs),
        "read_gb_per_s": statistics.median(r["read_gb_per_s"] for r in runs),
        "runs": runs,
        "peak_memory_bytes": peak_memory,
        "answers": answers,
    }


def load_lorafit(checkpoint: str, adapter: Path | None, weights: str, compile: bool):
    """An LLM in the row's weight format: a dtype, or int8/nf4 block linears computing in float32."""
    from lorafit.generate import LLM

    quantize = weights if weights in ("int8", "nf4") else None
    dtype = torch.float32 if quantize else getattr(torch, weights)
    return LLM.load(checkpoint, adapter, dtype=dtype, device="cpu", compile=compile, quantize=quantize)


def lorafit_runner(model, compile: bool):
    """A function (prompt_ids, n) -> (time to first token, decode tokens/s) using lorafit."""
    from lorafit.generate import GenerationStats, generate

    def run(prompt_ids: list[int], n: int) -> tuple[float, float]:
        stats = GenerationStats()
        tokens = list(generate(model, prompt_ids, n, stats=stats, compiled=compile))
        assert len(tokens) == n, f"lorafit produced {len(tokens)} tokens, not {n}"
        return stats.time_to_first_token_s, stats.decode_tokens_per_s

    return run


def demo_notes(n: int) -> list[dict[str, str]]:
    """The first n of `lorafit demo`'s held-out note records (its default seed and sizes)."""
    from lorafit.data.demo_task import make_contact_notes, split
    from lorafit.demo import DemoConfig

    config = DemoConfig()
    records = make_contact_notes(config.n_train + config.n_val + config.n_test, seed=config.seed)
    return split(records, config.n_test)[1][:n]


def answer_notes(llm, n: int) -> list[str]:
    """Greedy answers to the first n held-out demo notes, one at a time through the row's decode path."""
    from lorafit.data import encode_record
    from lorafit.evaluate import prompt_and_reference
    from lorafit.generate import generate

    tokenizer, stop = llm.tokenizer, llm.tokenizer.stop_ids
    answers = []
    for record in demo_notes(n):
        input_ids, labels, _ = encode_record(record, tokenizer, "chat", 2048)
        prompt, _ = prompt_and_reference(torch.tensor(input_ids), torch.tensor(labels))
        ids = list(generate(llm.model, prompt, NOTE_TOKENS, stop_ids=stop, compiled=llm.compile))
        answers.append(tokenizer.decode([t for t in ids if t not in stop], skip_special_tokens=True))
    return answers


class _Clock:
    """A transformers streamer that only notes when each new token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_runner(checkpoint: str, dtype: torch.dtype):
    """(A function (prompt_ids, n) -> (time to first token, decode tokens/s) using transformers' generate, and the
    bytes of weights a token reads)."""
    import transformers

    from lorafit.checkpoint import load_config

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

    return run, decode_weight_bytes(load_config(Path(checkpoint)), dtype.itemsize)


def table(results: list[dict], checkpoint: Path, args: argparse.Namespace, machine: dict) -> str:
    """The results as a Markdown table: ratios to lorafit float32 eager and transformers, bandwidth share, accuracy."""
    from lorafit.data.demo_task import score

    by_row = {(r["engine"], r["weights"]): r for r in results if "error" not in r}
    reference = by_row.get(("lorafit", "float32"))
    notes = [r for r in results if r["answers"]]
    references = [record["output"] for record in demo_notes(len(notes[0]["answers"]))] if notes else []
    header = (
        "| engine | weights | warm-up | time to first token | decode tokens/s | peak memory | vs float32 eager "
        "| vs transformers | weight GB/token | weight GB/s | read GB/s before each run | share of that read |"
    )
    if references:
        header += f" exact match (n={len(references)}) | same answer as float32 eager |"
    lines = [
        f"Decoding {args.new_tokens} tokens greedily from {checkpoint.name}"
        + (f" + {args.adapter}" if args.adapter else "")
        + f", {args.threads} threads, median of {args.runs} runs ({date.today()}). Machine: {describe(machine)}.",
        "",
        header,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if references else ""),
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['engine']} | {r['weights']} | failed: {r['error'][:150]} |")
            continue
        speed = r["decode_tokens_per_s"]
        hf = by_row.get(("transformers", r["weights"]))
        streamed = r["weight_bytes"] * speed / 1e9
        cells = [
            r["engine"],
            r["weights"],
            f"{r['warmup_s']:.1f} s",
            f"{r['time_to_first_token_s'] * 1000:.0f} ms",
            f"{speed:.1f}",
            f"{r['peak_memory_bytes'] / 2**30:.2f} GiB",
            f"{speed / reference['decode_tokens_per_s']:.2f}x" if reference else "-",
            f"{speed / hf['decode_tokens_per_s']:.2f}x" if hf else "-",
            f"{r['weight_bytes'] / 1e9:.3f}",
            f"{streamed:.1f}",
            f"{r['read_gb_per_s']:.1f}",
            f"{bandwidth_share(r):.0%}",
        ]
        if references:
            if r["answers"]:
                exact = round(score(r["answers"], references)["exact_match"] * len(references))
                cells.append(f"{exact}/{len(references)}")
                same = reference is not None and reference["answers"]
                agree = sum(a == b for a, b in zip(r["answers"], reference["answers"], strict=True)) if same else None
                cells.append("-" if agree is None else f"{agree}/{len(references)}")
            else:
                cells += ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bandwidth_share(result: dict) -> float:
    """The median over a row's runs of the weight bytes it streamed per second over the read probed before it."""
    return statistics.median(
        result["weight_bytes"] * run["decode_tokens_per_s"] / 1e9 / run["read_gb_per_s"] for run in result["runs"]
    )


if __name__ == "__main__":
    main()
