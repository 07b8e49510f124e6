"""`lorafit evaluate`: a base model and its adapters measured on the same records, side by side.

Loss and perplexity are taken on the supervised tokens only, tokenised and masked exactly as for
training (lorafit.data.encode_record, or a prepared directory as it is) and summed by the training
loop's own supervised_loss_sum. Generation metrics (optional) decode greedily from each record's
prompt, the tokens before its first supervised one, and compare the answer with the supervised
text. With `tasks`, lm-evaluation-harness benchmarks run through lorafit's lm-eval model
(lorafit.lm_eval_model). The base model is loaded once; each adapter is applied and taken off again.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorafit.data import IGNORE_INDEX, TokenDataset, collate, encode_record, load_prepared, load_records
from lorafit.data.prepare import read_info
from lorafit.data.prompts import resolve_style
from lorafit.model import LLaMA
from lorafit.train import count_supervised, supervised_loss_sum

Score = Callable[[Sequence[str], Sequence[str]], dict[str, float]]
# Metrics shown as "k/n" in the table (shares of records); any other metric is shown as a percentage.
COUNTED = ("exact_match", "valid_json")


@dataclass
class EvalData:
    """Tokenised records to evaluate on, with their source records when they came from a file."""

    dataset: TokenDataset
    records: list[dict[str, Any]] | None
    description: str


def load_eval_data(
    data: str | Path,
    tokenizer: Any,
    style: str | None = None,
    max_seq_length: int = 2048,
    max_records: int | None = None,
) -> EvalData:
    """A prepared directory (its validation split, else its training split) or a JSON/JSONL file of records.

    A file is tokenised and masked as `lorafit prepare` would (all records, in file order, none held out).
    """
    if max_records is not None and max_records < 1:
        raise ValueError(f"--max-records must be at least 1, got {max_records}")
    info = read_info(data)
    if info is not None:
        train, val = load_prepared(data)
        split, dataset = ("val", val) if len(val) else ("train", train)
        n = min(len(dataset), max_records or len(dataset))
        samples = [tuple(t.tolist() for t in dataset[i]) for i in range(n)]
        return EvalData(TokenDataset.from_samples(samples), None, f"{data} ({split} split, {n} records)")
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"{data}: neither a prepared dataset directory nor a data file")
    records = load_records(path).records[:max_records]
    style = resolve_style(style, tokenizer)
    samples = [encode_record(r, tokenizer, style, max_seq_length)[:2] for r in records]
    return EvalData(TokenDataset.from_samples(samples), records, f"{path} ({len(records)} records, {style} prompts)")


@torch.no_grad()
def supervised_loss(model: LLaMA, dataset: TokenDataset, pad_id: int, batch_size: int = 8) -> dict[str, float]:
    """Mean loss per supervised token, its perplexity, and the tokens/s it ran at (batches of similar length)."""
    order = sorted(range(len(dataset)), key=lambda i: dataset.lengths[i])
    device = model.embed_tokens.weight.device
    total, count, started = 0.0, 0, time.perf_counter()
    for start in range(0, len(order), batch_size):
        input_ids, labels = collate([dataset[i] for i in order[start : start + batch_size]], pad_id)
        total += supervised_loss_sum(model, input_ids.to(device), labels.to(device)).item()
        count += count_supervised(labels)
    if not count:
        raise ValueError("the data has no supervised tokens to evaluate (every label is masked)")
    seconds = time.perf_counter() - started
    loss = total / count
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50)),
        "supervised_tokens": count,
        "tokens_per_s": sum(dataset.lengths) / seconds,
    }


def prompt_and_reference(input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[list[int], list[int]]:
    """A sample split at its first supervised token: (the prompt generation starts from, the first response)."""
    supervised = (labels != IGNORE_INDEX).tolist()
    if True not in supervised:
        raise ValueError("a record has no supervised tokens, so it has no reference answer")
    start = supervised.index(True)
    end = supervised.index(False, start) if False in supervised[start:] else len(supervised)
    return input_ids[:start].tolist(), input_ids[start:end].tolist()


def generate_answers(
    model: LLaMA,
    tokenizer: Any,
    dataset: TokenDataset,
    max_new_tokens: int,
    batch_size: int = 20,
) -> tuple[list[str], list[str], float]:
    """(answers, references, new tokens/s): greedy answers to every sample's prompt, several prompts per batch."""
    from lorafit.generate import generate_batch

    pairs = [prompt_and_reference(*dataset[i]) for i in range(len(dataset))]
    stop = tokenizer.stop_ids

    def text(ids: list[int]) -> str:
        return tokenizer.decode([t for t in ids if t not in stop], skip_special_tokens=True)

    # Prompts of similar length share a batch: less left padding to compute through.
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))
    answers: list[str] = [""] * len(pairs)
    new_tokens, started = 0, time.perf_counter()
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = generate_batch(model, [pairs[i][0] for i in rows], max_new_tokens, stop)
        for row, ids in zip(rows, batch, strict=True):
            answers[row] = text(ids)
            new_tokens += len(ids)
    seconds = time.perf_counter() - started
    return answers, [text(reference) for _, reference in pairs], new_tokens / seconds


def default_score(answers: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """exact_match (equal to the reference but for outer whitespace); valid_json too when the references are JSON."""
    n = len(references)
    scores = {"exact_match": sum(a.strip() == r.strip() for a, r in zip(answers, references, strict=True)) / n}
    if all(_is_json(r) for r in references):
        scores["valid_json"] = sum(_is_json(a) for a in answers) / n
    return scores


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def measure(
    model: LLaMA,
    tokenizer: Any,
    data: EvalData,
    generate: bool = False,
    max_new_tokens: int = 128,
    score: Score = default_score,
    samples: int = 3,
    batch_size: int = 8,
) -> dict[str, Any]:
    """One column of the table: loss and perplexity, and with generate=True the score of greedy answers."""
    model.eval()
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    result: dict[str, Any] = supervised_loss(model, data.dataset, pad_id, batch_size)
    if generate:
        answers, references, tokens_per_s = generate_answers(model, tokenizer, data.dataset, max_new_tokens)
        shown = [
            {"prompt": _prompt_text(data, i, tokenizer), "expected": references[i], "answer": answers[i]}
            for i in range(min(samples, len(answers)))
        ]
        result["generation"] = {**score(answers, references), "tokens_per_s": tokens_per_s, "samples": shown}
    return result


def _prompt_text(data: EvalData, index: int, tokenizer: Any) -> str:
    """What a sample was asked: the record's input (or instruction) when known, else the decoded prompt."""
    if data.records is not None and "instruction" in data.records[index]:
        record = data.records[index]
        return record.get("input") or record["instruction"]
    prompt, _ = prompt_and_reference(*data.dataset[index])
    return tokenizer.decode(prompt, skip_special_tokens=True)


# ---- adapters: the one place that knows how each kind is applied (the method registry replaces it) ----


@contextmanager
def adapter_applied(model: LLaMA, adapter_dir: str | Path, reload_base: Callable[[], LLaMA]) -> Iterator[LLaMA]:
    """The base model with a run's adapter on it for the duration of the block; the base is as it was afterwards.

    A method that can take itself off again (LoRA: its layers wrap the base's, unmerged) goes onto `model` and
    comes off after, so no weight ever changes; any other goes onto a fresh base from reload_base().
    """
    from lorafit.methods import method_of_run
    from lorafit.methods.base import check_base

    adapter_dir = Path(adapter_dir)
    method = method_of_run(adapter_dir)
    target = model if method.removable else reload_base()
    check_base(target, adapter_dir, Path(adapter_dir.name))
    method.load(target, adapter_dir)
    try:
        yield target.eval()
    finally:
        if method.removable:
            method.remove(model)


def adapter_name(adapter_dir: str | Path) -> str:
    """A short column heading for an adapter: its directory's name."""
    return "+ " + Path(adapter_dir).resolve().name


def evaluate(
    checkpoint: str | Path | None,
    adapters: Sequence[str | Path] = (),
    data: str | Path | None = None,
    generate: bool = False,
    max_records: int | None = None,
    max_new_tokens: int = 128,
    prompt_style: str | None = None,
    tasks: Sequence[str] = (),
    limit: int | None = None,
    include_path: str | Path | None = None,
    dtype: str | None = None,
    device: str | None = None,
    score: Score = default_score,
) -> dict[str, Any]:
    """Measure the base model and each adapter on `data` (and/or lm-eval `tasks`); one entry per model."""
    from lorafit.checkpoint import load_config, load_model
    from lorafit.hub import resolve_checkpoint
    from lorafit.methods import method_of_run
    from lorafit.runtime import resolve_device, resolve_dtype, use_decode_kernels
    from lorafit.tokenizer import Tokenizer

    if data is None and not tasks:
        raise ValueError("nothing to evaluate: give --data, --tasks or both")
    if checkpoint is None and adapters:
        checkpoint = method_of_run(adapters[0]).base_reference(Path(adapters[0]))
    base = resolve_checkpoint(checkpoint)
    tokenizer = Tokenizer.from_checkpoint(base)
    run_tasks = None
    if tasks:
        from lorafit.lm_eval_model import task_runner

        run_tasks = task_runner(tasks, limit, include_path)  # checks the task names before any model is loaded
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)

    def load_base() -> LLaMA:
        model = load_model(base, dtype=torch_dtype, device=torch_device)
        use_decode_kernels(model)
        return model

    eval_data = None
    if data is not None:
        eval_data = load_eval_data(data, tokenizer, prompt_style, load_config(base).block_size, max_records)

    def column(name: str, model: LLaMA) -> dict[str, Any]:
        print(f"evaluating {name} ...", file=sys.stderr)
        result: dict[str, Any] = {"name": name}
        if eval_data is not None:
            result |= measure(model, tokenizer, eval_data, generate, max_new_tokens, score)
        if run_tasks is not None:
            result["tasks"] = run_tasks(model, tokenizer)
        return result

    model = load_base()
    columns = [column("base", model)]
    for adapter in adapters:
        with adapter_applied(model, adapter, load_base) as adapted:
            columns.append(column(adapter_name(adapter), adapted))
    return {
        "checkpoint": str(base),
        "data": eval_data.description if eval_data is not None else None,
        "records": len(eval_data.dataset) if eval_data is not None else None,
        "models": columns,
    }


def format_table(results: dict[str, Any]) -> str:
    """The models side by side as a Markdown table: loss, perplexity, generation metrics, task metrics."""
    models = results["models"]
    n = results.get("records")
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, cells: list[str]) -> None:
        rows.append((label, cells))

    if "loss" in models[0]:
        row("loss (supervised tokens)", [f"{m['loss']:.4f}" for m in models])
        row("perplexity", [f"{m['perplexity']:.2f}" for m in models])
    if "generation" in models[0]:
        metrics = [k for k in models[0]["generation"] if k not in ("tokens_per_s", "samples")]
        for key in metrics:
            values = [m["generation"][key] for m in models]
            if key in COUNTED and n:
                row(key.replace("_", " "), [f"{round(v * n)}/{n}" for v in values])
            else:
                row(key.replace("_", " "), [f"{v:.0%}" for v in values])
        row("generation tokens/s", [f"{m['generation']['tokens_per_s']:.0f}" for m in models])
    for task, metrics in (models[0].get("tasks") or {}).items():
        for metric in metrics:
            row(f"{task} {metric}", [_number(m["tasks"][task][metric]) for m in models])
    header = f"| {'n=' + str(n) if n else ''} | " + " | ".join(m["name"] for m in models) + " |"
    lines = [header, "|---" * (len(models) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return "\n".join(lines)


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def format_samples(results: dict[str, Any], width: int = 300) -> str:
    """Each model's answer to the first few records, below the prompt and the expected answer."""
    models = [m for m in results["models"] if "generation" in m]
    if not models:
        return ""
    lines = []
    for i, sample in enumerate(models[0]["generation"]["samples"], 1):
        lines += [f"sample {i}: {sample['prompt']}", f"  expected: {sample['expected']}"]
        for m in models:
            answer = m["generation"]["samples"][i - 1]["answer"].strip().replace("\n", " ")
            lines.append(f"  {m['name']}: {answer[:width]}")
        lines.append("")
    return "\n".join(lines)
