"""Do lorafit's GGUF exports run in llama.cpp as they run in lorafit? Greedy tokens, logits and speed, side by side.

    python benchmarks/llamacpp_check.py [--checkpoint BASE] [--adapter LORA_RUN] [--outtypes f32,f16,q8_0]
                                        [--prompts 8] [--max-new-tokens 32] [--threads 2]

Exports the base with `lorafit export --format gguf` at each outtype and, with --adapter, the merged model (f32)
and the LoRA run as a llama.cpp adapter (`--format gguf-adapter`, f32). Each export is run in llama.cpp through
llama-cpp-python: greedy (argmax of its logits, no sampler), the same prompt ids (the chat template rendered by
lorafit), and compared with lorafit's own greedy decoding of the float32 model it came from (the base, or the
base with the run merged in). Per export the table gives: prompts whose tokens are all equal, where the others
first differ, the largest |logit difference| over the positions both sides saw the same tokens, and decode
tokens/s in llama.cpp beside lorafit's, the two alternated prompt by prompt in this one process. It also checks
llama.cpp's tokenizer (from the GGUF's metadata) against lorafit's, llama.cpp's chat template handling and the
Ollama Modelfile's TEMPLATE against the Jinja template, and that the adapter changes llama.cpp's answers.

Needs llama-cpp-python (it compiles llama.cpp when installed, so it is not a dependency); without it the script
says so and exits 0.
"""

from __future__ import annotations

import argparse
import ctypes
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Give three tips for staying healthy.",
    "What is the capital of France? Answer in one sentence.",
    "Explain what a hash table is to a beginner.",
    "Translate 'good morning, how are you?' into French.",
    "List the planets of the solar system in order from the sun.",
    "Extract the contact details from the note as JSON with keys name, email, phone, company, date (YYYY-MM-DD).\n\n"
    "Met Ana Ruiz (Lopez & Sons) on 3 March 2025; ana.ruiz@lopez.io, +1 415 555 0133.",
    "Write a haiku about the sea in winter.",
    "Why is the sky blue? Keep it short.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
]


@dataclass
class Answer:
    """One prompt's greedy decoding: the tokens, the logits that chose them, and the decode time."""

    tokens: list[int]
    logits: Any  # numpy (len(tokens), vocab)
    decode_s: float


@dataclass
class Row:
    """One export's comparison with lorafit over all prompts."""

    name: str
    equal: int = 0
    divergences: list[str] = field(default_factory=list)
    max_logit_diff: float = 0.0
    ours_tokens: int = 0
    ours_s: float = 0.0
    theirs_tokens: int = 0
    theirs_s: float = 0.0
    changed_vs_base: int | None = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="the base model (default: the run's base, else SmolLM2)")
    parser.add_argument("--adapter", default=None, help="a LoRA run to merge and to export as a llama.cpp adapter")
    parser.add_argument("--outtypes", default="f32,f16,q8_0", help="comma-separated outtypes of the base export")
    parser.add_argument("--prompts", type=int, default=8, help=f"how many of the {len(PROMPTS)} built-in prompts")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="threads for both torch and llama.cpp")
    parser.add_argument("--workdir", default=None, help="where the exports go (default: a temporary directory)")
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("skipped: llama-cpp-python is not installed (`pip install llama-cpp-python` compiles llama.cpp)")
        return

    import torch

    from lorafit.export import export
    from lorafit.generate import LLM

    torch.set_num_threads(args.threads)
    outtypes = [t for t in args.outtypes.split(",") if t]
    prompts = PROMPTS[: args.prompts]
    base_path = llm_checkpoint(args.checkpoint, args.adapter)
    references = {"base": LLM.load(base_path, dtype="float32", device="cpu")}
    if args.adapter:
        references["merged"] = LLM.load(args.checkpoint, adapter=args.adapter, dtype="float32", device="cpu")
    tokenizer = references["base"].tokenizer
    chat = tokenizer.chat_template is not None
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) if chat else p for p in prompts]
    ids = [references["base"].prompt_ids(p, chat=chat) for p in prompts]
    expected = {key: [lorafit_answer(llm, i, args.max_new_tokens) for i in ids] for key, llm in references.items()}

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        # (row name, lorafit reference, model file, adapter file)
        runs: list[tuple[str, str, Path, Path | None]] = []
        for outtype in outtypes:
            model_file, modelfile = export(base_path, tmp / f"base-{outtype}.gguf", outtype=outtype)
            runs.append((f"model {outtype}", "base", model_file, None))
        if args.adapter:
            merged_file, _ = export(args.adapter, tmp / "merged-f32.gguf", checkpoint=args.checkpoint)
            adapter_file, _ = export(args.adapter, tmp / "adapter-f32.gguf", fmt="gguf-adapter", checkpoint=base_path)
            base_f32 = tmp / "base-f32.gguf"
            if not base_f32.exists():
                base_f32, _ = export(base_path, base_f32)
            runs.append(("merged model f32", "merged", merged_file, None))
            runs.append(("base f32 + adapter f32", "merged", base_f32, adapter_file))

        rows, base_tokens = [], None
        for name, key, model_file, lora_file in runs:
            print(f"running {name} ...", file=sys.stderr, flush=True)  # a row takes minutes on a loaded machine
            llama = open_llama(llama_cpp, model_file, lora_file, ids, args)
            row = Row(name)
            tokens_here = []
            for prompt_ids, want in zip(ids, expected[key], strict=True):
                # lorafit then llama.cpp, prompt by prompt, so both see the same machine load.
                again = lorafit_answer(references[key], prompt_ids, args.max_new_tokens, logits=False)
                assert again.tokens == want.tokens, "lorafit's greedy decoding is not deterministic"
                row.ours_tokens += len(again.tokens) - 1
                row.ours_s += again.decode_s
                theirs = llama_cpp_answer(llama, prompt_ids, args.max_new_tokens)
                row.theirs_tokens += len(theirs.tokens) - 1
                row.theirs_s += theirs.decode_s
                tokens_here.append(theirs.tokens)
                compare(row, len(tokens_here), want, theirs)
            if name == f"model {outtypes[0]}":
                base_tokens = tokens_here
            if lora_file is not None and base_tokens is not None:
                row.changed_vs_base = sum(a != b for a, b in zip(tokens_here, base_tokens, strict=True))
            if name == f"model {outtypes[0]}":
                checks = side_checks(llama_cpp, llama, tokenizer, prompts, texts, ids, modelfile)
            rows.append(row)
            del llama

    print(f"{len(prompts)} prompts (chat: {chat}), {args.max_new_tokens} new tokens each, {args.threads} threads")
    print(f"llama-cpp-python {llama_cpp.__version__}; lorafit in float32 on torch {torch.__version__}\n")
    print(
        "| llama.cpp run | lorafit reference | greedy tokens equal | first divergence (prompt:token) "
        "| max abs logit diff | llama.cpp tokens/s | lorafit tokens/s | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row, (_, key, _, _) in zip(rows, runs, strict=True):
        theirs, ours = row.theirs_tokens / row.theirs_s, row.ours_tokens / row.ours_s
        print(
            f"| {row.name} | {key} | {row.equal}/{len(prompts)} | {', '.join(row.divergences) or 'none'} "
            f"| {row.max_logit_diff:.2e} | {theirs:.1f} | {ours:.1f} | {theirs / ours:.2f}x |"
        )
    for row in rows:
        if row.changed_vs_base is not None:
            print(f"\n{row.name}: llama.cpp's answer differs from the base's on {row.changed_vs_base}/{len(prompts)}")
    print()
    for line in checks:
        print(line)


def lorafit_answer(llm: Any, prompt_ids: list[int], max_new_tokens: int, logits: bool = True) -> Answer:
    """lorafit's greedy answer (no stop tokens: the same length everywhere) and, optionally, its logits."""
    import torch

    from lorafit.generate import GenerationStats, generate

    stats = GenerationStats()
    tokens = list(generate(llm.model, prompt_ids, max_new_tokens, stats=stats))
    decode_s = stats.total_s - stats.time_to_first_token_s
    if not logits:
        return Answer(tokens, None, decode_s)
    llm.model.clear_kv_cache()  # a plain forward pass over prompt + answer, from position 0
    with torch.inference_mode():
        out = llm.model(torch.tensor([prompt_ids + tokens[:-1]]))[0, len(prompt_ids) - 1 :]
    return Answer(tokens, out.float().numpy(), decode_s)


def open_llama(llama_cpp: Any, model_file: Path, lora_file: Path | None, ids: list[list[int]], args: Any) -> Any:
    """A llama.cpp context for the longest prompt plus its answer, keeping every position's logits."""
    n_ctx = max(len(i) for i in ids) + args.max_new_tokens + 8
    kwargs = {"lora_path": str(lora_file)} if lora_file else {}
    return llama_cpp.Llama(
        str(model_file), n_ctx=n_ctx, n_threads=args.threads, n_threads_batch=args.threads, logits_all=True,
        verbose=False, **kwargs,
    )  # fmt: skip


def llama_cpp_answer(llama: Any, prompt_ids: list[int], max_new_tokens: int) -> Answer:
    """llama.cpp's greedy answer: the argmax of its own logits after each step, timed after the prefill."""
    import numpy as np

    llama.reset()
    llama.eval(prompt_ids)
    rows = [np.array(llama.scores[llama.n_tokens - 1])]
    tokens = [int(rows[-1].argmax())]
    t0 = time.perf_counter()
    while len(tokens) < max_new_tokens:
        llama.eval([tokens[-1]])
        rows.append(np.array(llama.scores[llama.n_tokens - 1]))
        tokens.append(int(rows[-1].argmax()))
    return Answer(tokens, np.stack(rows), time.perf_counter() - t0)


def compare(row: Row, number: int, ours: Answer, theirs: Answer) -> None:
    """Count an equal answer, or note where it first differs; logits only where both saw the same tokens."""
    first = next((i for i, (a, b) in enumerate(zip(ours.tokens, theirs.tokens, strict=True)) if a != b), None)
    if first is None:
        row.equal += 1
    else:
        row.divergences.append(f"{number}:{first}")
    end = len(ours.tokens) if first is None else first + 1
    diff = abs(ours.logits[:end] - theirs.logits[:end]).max()
    row.max_logit_diff = max(row.max_logit_diff, float(diff))


def side_checks(
    llama_cpp: Any,
    llama: Any,
    tokenizer: Any,
    prompts: list[str],
    texts: list[str],
    ids: list[list[int]],
    modelfile: Path,
) -> list[str]:
    """Tokenizer, chat template and Ollama TEMPLATE agreement, as lines of text."""
    lines = []

    # As llama-server tokenizes: BOS added when the GGUF says so, special tokens parsed.
    def tokenize(text: str) -> list[int]:
        return llama.tokenize(text.encode(), add_bos=True, special=True)

    chat_equal = sum(tokenize(t) == i for t, i in zip(texts, ids, strict=True))
    text_equal = sum(tokenize(p) == tokenizer.encode(p) for p in prompts)
    lines.append(
        f"tokenizer: llama.cpp's ids equal lorafit's for {chat_equal}/{len(ids)} chat-rendered prompts and "
        f"{text_equal}/{len(prompts)} plain texts (BOS: llama.cpp adds {llama._model.add_bos_token()}, "
        f"lorafit {tokenizer.add_bos})"
    )
    template = llama.metadata.get("tokenizer.chat_template")
    if template is None:
        return lines
    conversations = [
        [{"role": "user", "content": prompts[0]}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": prompts[1]},
            {"role": "assistant", "content": "Sleep, move, eat plants."},
            {"role": "user", "content": prompts[2]},
        ],
    ]
    ours = [tokenizer.apply_chat_template(c) for c in conversations]
    native = [llama_cpp_chat(llama_cpp, template, c) for c in conversations]
    go_template, system = modelfile_template(modelfile.read_text())
    ollama = [render_go(go_template, c, system) for c in conversations] if go_template else [None, None]
    for name, rendered in (("llama.cpp's llama_chat_apply_template", native), ("the Modelfile's TEMPLATE", ollama)):
        verdicts = ["equal" if r == o else f"differs: {r!r}" for r, o in zip(rendered, ours, strict=True)]
        lines.append(f"chat template, {name} vs lorafit's Jinja: user only {verdicts[0]}; with system {verdicts[1]}")
    return lines


def llama_cpp_chat(llama_cpp: Any, template: str, messages: list[dict[str, str]]) -> str | None:
    """The conversation rendered by llama.cpp's built-in template handling (it recognises templates, not Jinja)."""
    array = (llama_cpp.llama_chat_message * len(messages))(
        *(llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages)
    )
    size = 4096
    buffer = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_chat_apply_template(template.encode(), array, len(messages), True, buffer, size)
    return None if n < 0 else buffer.raw[:n].decode()


def modelfile_template(text: str) -> tuple[str | None, str | None]:
    """The Modelfile's TEMPLATE and SYSTEM (None when it falls back to the plain prompt)."""
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M)
    if template is None or ".Messages" not in template.group(1):
        return None, None
    return template.group(1), system.group(1) if system else None


def render_go(template: str, messages: list[dict[str, str]], system: str | None) -> str:
    """Ollama's rendering of the one Go template shape lorafit writes: a range over .Messages, then a tail.

    Ollama puts SYSTEM in front of a conversation that has no system message of its own.
    """
    if system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    match = re.fullmatch(r"\{\{- range \.Messages \}\}(.*?)\{\{ end \}\}(.*)", template, re.S)
    if match is None:
        raise ValueError(f"not the Go template shape lorafit writes: {template!r}")
    body, tail = match.groups()
    turns = (body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"]) for m in messages)
    return "".join(turns) + tail


def llm_checkpoint(checkpoint: str | None, adapter: str | None = None) -> str:
    """The base checkpoint path lorafit would load (the adapter's base when none is given)."""
    from lorafit.hub import resolve_checkpoint
    from lorafit.lora import adapter_base_model

    return str(resolve_checkpoint(checkpoint or (adapter_base_model(adapter) if adapter else None)))


if __name__ == "__main__":
    main()
