"""Do lorafit's GGUF exports run in llama.cpp as they run in lorafit? Greedy tokens, side by side.

    python benchmarks/llamacpp_check.py [--checkpoint BASE] [--adapter LORA_RUN] [--max-new-tokens 32]

Exports the base (or, with --adapter, the merged model) with `lorafit export --format gguf` and, with --adapter,
the adapter with `--format gguf-adapter`; then decodes the same prompt ids greedily in lorafit and in llama.cpp
(through llama-cpp-python): the exported model alone, and the exported base + exported adapter. Prints the
number of leading tokens on which each llama.cpp run agrees with lorafit. Needs llama-cpp-python (it compiles
llama.cpp when installed, so it is optional); without it the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

PROMPT = "Write a short story about a robot who learns to paint."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="the base model (default: the run's base, else SmolLM2)")
    parser.add_argument("--adapter", default=None, help="a LoRA run to merge and to export as a llama.cpp adapter")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--outtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"])
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("skipped: llama-cpp-python is not installed (`pip install llama-cpp-python` compiles llama.cpp)")
        return

    from lorafit.export import export
    from lorafit.generate import LLM, generate

    llm = LLM.load(args.checkpoint, adapter=args.adapter, dtype="float32", device="cpu")
    ids = llm.prompt_ids(args.prompt, chat=llm.tokenizer.chat_template is not None)
    ours = list(generate(llm.model, ids, args.max_new_tokens))  # no stop ids: the same length everywhere

    def llama_cpp_tokens(model_path: Path, lora_path: Path | None = None) -> list[int]:
        kwargs = {"lora_path": str(lora_path)} if lora_path else {}
        model = llama_cpp.Llama(str(model_path), n_ctx=len(ids) + args.max_new_tokens + 8, verbose=False, **kwargs)
        tokens = []
        for token in model.generate(ids, temp=0.0, top_k=1, reset=True):
            tokens.append(token)
            if len(tokens) == args.max_new_tokens:
                break
        return tokens

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = args.adapter or llm_checkpoint(args.checkpoint)
        merged, _ = export(source, tmp / "model.gguf", outtype=args.outtype, checkpoint=args.checkpoint)
        runs = {f"exported model ({args.outtype})": llama_cpp_tokens(merged)}
        if args.adapter:
            base, _ = export(llm_checkpoint(args.checkpoint, args.adapter), tmp / "base.gguf", outtype=args.outtype)
            adapter, _ = export(args.adapter, tmp / "adapter.gguf", fmt="gguf-adapter", checkpoint=args.checkpoint)
            runs["exported base + exported adapter"] = llama_cpp_tokens(base, adapter)

    print(f"prompt: {len(ids)} tokens; lorafit greedy: {llm.tokenizer.decode(ours)!r}")
    print("| llama.cpp run | tokens equal to lorafit's (leading) | of |\n|---|---|---|")
    for name, tokens in runs.items():
        pairs = zip(ours, tokens, strict=False)  # llama.cpp may stop early at an end-of-generation token
        same = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(ours), len(tokens)))
        print(f"| {name} | {same} | {len(ours)} |")


def llm_checkpoint(checkpoint: str | None, adapter: str | None = None) -> str:
    """The base checkpoint path lorafit would load (the adapter's base when none is given)."""
    from lorafit.hub import resolve_checkpoint
    from lorafit.lora import adapter_base_model

    return str(resolve_checkpoint(checkpoint or (adapter_base_model(adapter) if adapter else None)))


if __name__ == "__main__":
    main()
