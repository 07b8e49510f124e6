"""`lorafit <command>`: parses arguments and calls the library; no logic of its own.

Training flags (and the YAML keys of `--config` recipes) are generated from the config dataclasses:
TrainConfig, DataOptions and each method's own config in lorafit/methods/. Every default and its help
text is therefore written once, in its dataclass.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import os
import sys
import textwrap
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from lorafit import __version__

CHECKPOINT_HELP = (
    "a checkpoint directory, a .gguf file, a known model name or a Hugging Face repo id "
    "(downloaded on first use); unset: the embedded SmolLM2-135M-Instruct"
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default, and the examples in the epilog as written."""


# ------------------------------------------------------------------------------------------------
# Flags from dataclasses


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass and its dataclass bases (the string under each field), as help."""
    docs = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, body[1:], strict=False):
            is_doc = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and is_doc:
                docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def field_dest(f: dataclasses.Field, prefix: str) -> str:
    """The flag destination of a dataclass field: {prefix}_{name}, or the field's own `flag` metadata."""
    return f.metadata.get("flag") or (f"{prefix}_{f.name}" if prefix else f.name)


def _argument_kind(hint: Any) -> dict[str, Any]:
    """argparse keywords for a field's type: bools as --x/--no-x, Literals as choices, tuples as "a,b"."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        return {"choices": choices, "type": type(choices[0])}
    if typing.get_origin(hint) is tuple:
        return {"type": str, "metavar": "A,B,..."}
    return {"type": hint}


@dataclasses.dataclass
class Leaf:
    """A command's parser and its destinations: the keys its YAML recipe may set, with their converters."""

    parser: argparse.ArgumentParser
    converters: dict[str, Callable[[str], Any] | None] = dataclasses.field(default_factory=dict)
    required: tuple[str, ...] = ()

    def add(self, *flags: str, **kwargs: Any) -> argparse.Action:
        action = self.parser.add_argument(*flags, **kwargs)
        self.converters[action.dest] = kwargs.get("type")
        return action

    def add_dataclass(self, cls: type, prefix: str = "", only: tuple[str, ...] | None = None) -> None:
        """One flag per field of `cls`: --{prefix}-{field}, typed, defaulted and documented by the class."""
        hints, docs = typing.get_type_hints(cls), field_docs(cls)
        for f in dataclasses.fields(cls):
            if only is not None and f.name not in only:
                continue
            dest = field_dest(f, prefix)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if isinstance(default, tuple):
                default = ",".join(default)
            flag = "--" + dest.replace("_", "-")
            self.add(flag, dest=dest, default=default, help=docs.get(f.name, ""), **_argument_kind(hints[f.name]))


def dataclass_from_args(cls: type, args: argparse.Namespace, prefix: str = "", **fixed: Any) -> Any:
    """An instance of `cls` from the flags add_dataclass made (fields not on the command line keep their default)."""
    values = {}
    for f in dataclasses.fields(cls):
        dest = field_dest(f, prefix)
        if hasattr(args, dest):
            values[f.name] = getattr(args, dest)
    return cls(**(values | fixed))


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# ------------------------------------------------------------------------------------------------
# Commands


def cmd_download(args: argparse.Namespace) -> None:
    from lorafit.hub import download

    path = download(args.name, token=args.token, revision=args.revision)
    print(f"checkpoint ready: {path}")


def load_llm(args: argparse.Namespace):
    import time

    from lorafit.generate import LLM

    started = time.perf_counter()
    llm = LLM.load(args.checkpoint, args.adapter, args.dtype, args.device, args.compile, args.quantize)
    print(f"loaded in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return llm


def sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
    }


def cmd_generate(args: argparse.Namespace) -> None:
    llm = load_llm(args)
    for text in llm.stream(args.prompt, chat=args.chat, **sampling(args)):
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(llm.last_stats.summary(), file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    llm = load_llm(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chatting with the model; an empty line or Ctrl-D ends, /reset forgets the history.", file=sys.stderr)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    while True:
        try:
            line = input(">> " if interactive else "")  # piped input gets answers only, no prompts
        except EOFError:
            break
        if not line.strip():
            break
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        for text in llm.stream(messages, **sampling(args)):
            reply.append(text)
            sys.stdout.write(text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
        print(llm.last_stats.summary(), file=sys.stderr)


def cmd_prepare(args: argparse.Namespace) -> None:
    from lorafit.data import prepare_source
    from lorafit.hub import resolve_checkpoint
    from lorafit.tokenizer import Tokenizer

    if args.dataset == "json" and not args.source:
        raise ValueError("lorafit prepare json needs --source FILE|URL")
    tokenizer = Tokenizer.from_checkpoint(resolve_checkpoint(args.checkpoint))
    info = prepare_source(
        args.source or args.dataset,
        tokenizer,
        args.out,
        fmt=None if args.dataset == "json" else args.dataset,
        style=args.prompt_style,
        max_seq_length=args.max_seq_length,
        mask_prompt=args.mask_prompt,
        val_size=args.val_size,
        seed=args.seed,
    )
    print(
        f"{info.train:,} train / {info.val:,} val samples in {info.out_dir} ({info.prompt_style} prompts; "
        f"{info.skipped_empty} empty outputs skipped; {info.truncated} truncated to {info.max_seq_length} tokens)"
        + (" [cached]" if info.cached else "")
    )


def method_config_from_args(args: argparse.Namespace):
    from lorafit.methods import get_method

    method = get_method(args.method)
    if method.config_class is None:
        return method, None
    return method, dataclass_from_args(method.config_class, args, method.flag_prefix)


def cmd_finetune(args: argparse.Namespace) -> None:
    from lorafit.finetune import DataOptions, finetune
    from lorafit.train import TrainConfig

    method, method_config = method_config_from_args(args)
    finetune(
        method,
        args.data,
        args.out,
        args.checkpoint,
        dataclass_from_args(TrainConfig, args),
        method_config,
        dataclass_from_args(DataOptions, args),
        resume=args.resume,
        overwrite=args.overwrite,
        device=args.device,
        devices=args.devices,
        nodes=args.nodes,
    )


def cmd_merge(args: argparse.Namespace) -> None:
    from lorafit.methods import merge_run, method_of_run
    from lorafit.runtime import DTYPES

    out = merge_run(args.run, args.out, args.checkpoint, DTYPES[args.dtype] if args.dtype else None)
    print(f"merged model written to {out} (loads with transformers.AutoModelForCausalLM.from_pretrained)")
    for note in method_of_run(args.run).merge_notes(out):
        print(note)


def cmd_export(args: argparse.Namespace) -> None:
    from lorafit.export import export

    out, modelfile = export(args.source, args.out, args.format, args.outtype, args.checkpoint, args.force)
    kind = "LoRA adapter" if args.format == "gguf-adapter" else "model"
    print(f"wrote {out} (llama.cpp GGUF {kind}, {args.outtype}, {out.stat().st_size / 2**20:.1f} MiB)")
    print(f"wrote {modelfile}")
    print(f"next: ollama create NAME -f {modelfile}")
    if args.format == "gguf-adapter":
        print(f"or: llama-cli -m BASE.gguf --lora {out}")


def cmd_serve(args: argparse.Namespace) -> None:
    from lorafit.serve import build_app, parse_adapter_spec, serve

    app = build_app(
        args.checkpoint,
        [parse_adapter_spec(spec) for spec in args.adapter],
        args.adapter_dir,
        args.allow_any_adapter_path,
        args.api_key,
        args.max_batch,
        args.max_loaded_adapters,
        args.max_model_len,
        args.max_body_bytes,
        args.served_model_name,
        args.device,
        args.dtype,
        args.compile,
        args.quantize,
        args.max_prefill_tokens,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(f"lorafit serve: warning: listening on {args.host} without --api-key", file=sys.stderr)
    serve(app, args.host, args.port, args.log_level)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from lorafit.evaluate import evaluate, format_samples, format_table

    results = evaluate(
        args.checkpoint,
        args.adapter,
        args.data,
        generate=args.generate,
        max_records=args.max_records,
        max_new_tokens=args.max_new_tokens,
        prompt_style=args.prompt_style,
        tasks=[t for t in (args.tasks or "").split(",") if t],
        limit=args.limit,
        include_path=args.include_path,
        dtype=args.dtype,
        device=args.device,
    )
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{results['data'] or ''}\n\n{format_table(results)}\n")
    print(format_samples(results))


def cmd_demo(args: argparse.Namespace) -> None:
    from lorafit.demo import DemoConfig, run_demo

    config = DemoConfig.quick() if args.quick else DemoConfig()
    config.seed = args.seed
    run_demo(args.out, config)


def cmd_estimate(args: argparse.Namespace) -> None:
    import torch

    from lorafit.estimate import config_for, format_estimate
    from lorafit.runtime import resolve_precision

    config = config_for(args.checkpoint)  # reads only a config: downloads nothing
    method, method_config = method_config_from_args(args)
    # The device the run would train on need not be here: only its type matters.
    precision = resolve_precision(args.precision, torch.device(args.device))
    print(
        format_estimate(
            config,
            method.name,
            args.micro_batch_size,
            args.max_seq_length,
            precision,
            method_config,
            args.activation_checkpointing,
            args.supervised_fraction,
            args.device,
        )
    )


# ------------------------------------------------------------------------------------------------
# The parser


EXAMPLES = {
    "download": "example:\n  lorafit download meta-llama/Llama-2-7b-hf",
    "generate": 'example:\n  lorafit generate --adapter out/run-1 --prompt "Explain weight decay" --chat',
    "chat": "example:\n  lorafit chat --adapter out/run-1 --system 'You are terse.'",
    "prepare": "example:\n  lorafit prepare json --source my.jsonl --out data/mine",
    "finetune": "example:\n  lorafit finetune lora --data data/alpaca --out out/run-1 --lora-r 16 --lora-targets all",
    "merge": "example:\n  lorafit merge out/run-1 --out out/merged --dtype bfloat16",
    "estimate": "example:\n  lorafit estimate lora --checkpoint llama-2-7b --micro-batch-size 4 --precision bf16-true",
    "export": "example:\n  lorafit export out/run-1 --format gguf --outtype q8_0 --out run-1.gguf",
    "serve": "example:\n  lorafit serve --adapter support=out/run-1 --adapter sales=out/run-2 --port 8000",
    "evaluate": "example:\n  lorafit evaluate --adapter out/run-1 --data test.jsonl --generate",
    "demo": "example:\n  lorafit demo --quick",
}


def add_command(commands: Any, name: str, help: str, recipe: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return commands.add_parser(
        name, parents=[recipe], help=help, description=help, epilog=EXAMPLES.get(name), formatter_class=HelpFormatter
    )


def add_model_arguments(leaf: Leaf) -> None:
    leaf.add("--checkpoint", default=None, help=CHECKPOINT_HELP)
    leaf.add("--adapter", default=None, help="a finetuning run directory (or PEFT adapter) to apply")
    dtypes = ["float32", "bfloat16", "float16"]
    leaf.add("--dtype", default=None, choices=dtypes, help="weight dtype (unset: float32 on CPU, bfloat16 on CUDA)")
    leaf.add("--device", default=None, help="cpu or cuda (unset: cuda when available)")
    from lorafit.quant import SCHEMES

    quantize_help = "keep the block linears (int8: the LM head too) quantised: fewer bytes per token (nf4: [quant])"
    leaf.add("--quantize", default=None, choices=SCHEMES, help=quantize_help)
    compile_help = "decode through a torch.compile'd step: faster on CPU after a one-time compile of about a minute"
    leaf.add("--compile", action="store_true", help=compile_help)


def add_sampling_arguments(leaf: Leaf, max_new_tokens: int) -> None:
    leaf.add("--temperature", type=float, default=0.0, help="0 = greedy")
    leaf.add("--top-k", type=positive_int, default=None, help="sample among the k most likely tokens")
    leaf.add("--top-p", type=float, default=None, help="sample among the most likely tokens of this total mass")
    leaf.add("--seed", type=int, default=None, help="seed for sampling")
    leaf.add("--max-new-tokens", type=positive_int, default=max_new_tokens, help="tokens to generate at most")


def add_method_commands(
    parent: argparse.ArgumentParser, recipe: argparse.ArgumentParser, leaves: dict, command: str, build: Callable
) -> None:
    """One sub-command per registered method, each with the shared flags (build) and the method's own."""
    from lorafit.methods import METHODS

    methods = parent.add_subparsers(dest="method", required=True, metavar="METHOD")
    for method in METHODS.values():
        p = add_command(methods, method.name, method.summary, recipe)
        p.epilog = EXAMPLES.get(command)
        leaf = Leaf(p)
        build(leaf)
        if method.config_class is not None:
            leaf.add_dataclass(method.config_class, method.flag_prefix)
        leaves[(command, method.name)] = leaf


def build_parser() -> tuple[argparse.ArgumentParser, dict[tuple[str, str | None], Leaf]]:
    """The parser, and each command's Leaf by (command, method or None)."""
    from lorafit.finetune import DataOptions
    from lorafit.train import TrainConfig

    parser = argparse.ArgumentParser(prog="lorafit", description="Finetune LLaMA-family models cheaply.")
    parser.add_argument("--version", action="version", version=f"lorafit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or LORAFIT_DEBUG=1)")
    recipe = argparse.ArgumentParser(add_help=False)
    recipe.add_argument("--config", default=None, help="a YAML recipe whose keys (flag names) set this command's flags")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    leaves: dict[tuple[str, str | None], Leaf] = {}

    def leaf(name: str, help: str, handler: Callable, required: tuple[str, ...] = ()) -> Leaf:
        p = add_command(commands, name, help, recipe)
        p.set_defaults(handler=handler)
        leaves[(name, None)] = made = Leaf(p, required=required)
        return made

    cmd = leaf("download", "fetch a model into the cache and make it ready to load", cmd_download)
    cmd.add("name", help="smollm2-135m-instruct (the embedded default), a known name or an HF repo id")
    cmd.add("--token", default=None, help="Hugging Face token (unset: $HF_TOKEN)")
    cmd.add("--revision", default=None, help="a branch, tag or commit of the Hugging Face repo (unset: main)")

    cmd = leaf("generate", "complete a prompt, streaming the text", cmd_generate, required=("prompt",))
    add_model_arguments(cmd)
    cmd.add("--prompt", default=None, help="the text to complete")
    cmd.add("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_sampling_arguments(cmd, max_new_tokens=128)

    cmd = leaf("chat", "talk with the model, multi-turn (reads stdin)", cmd_chat)
    add_model_arguments(cmd)
    cmd.add("--system", default=None, help="a system message")
    add_sampling_arguments(cmd, max_new_tokens=512)

    cmd = leaf("prepare", "tokenise an instruction dataset (prompt masked) for finetuning", cmd_prepare, ("out",))
    cmd.add("dataset", choices=["alpaca", "dolly", "json"], help="a public dataset, or json for your own file")
    cmd.add("--source", default=None, help="a file or URL (unset: the dataset's public download)")
    cmd.add("--out", default=None, help="the prepared directory to write")
    cmd.add("--checkpoint", default=None, help="whose tokenizer and chat template to use; " + CHECKPOINT_HELP)
    cmd.add_dataclass(TrainConfig, only=("max_seq_length", "seed"))
    cmd.add_dataclass(DataOptions, only=("prompt_style", "mask_prompt", "val_size"))

    def finetune_flags(leaf: Leaf) -> None:
        leaf.add("--checkpoint", default=None, help="the base model: " + CHECKPOINT_HELP)
        leaf.add("--data", default=None, help="a prepared directory (lorafit prepare) or a JSON/JSONL file")
        leaf.add("--out", default=None, help="run directory: adapter, metrics, loss.png, checkpoints")
        leaf.add("--resume", default=None, help="auto (the run's latest checkpoint) or a checkpoint directory")
        leaf.add("--overwrite", action="store_true", help="delete what --out holds and start afresh")
        leaf.add("--device", default=None, help="cpu or cuda (unset: cuda when available)")
        leaf.add("--devices", type=positive_int, default=1, help="processes (GPUs) per node")
        leaf.add("--nodes", type=positive_int, default=1, help="machines, each started with the same command")
        leaf.add_dataclass(TrainConfig)
        leaf.add_dataclass(DataOptions)
        leaf.required = ("data", "out")

    finetune = add_command(commands, "finetune", "finetune a model on instruction data", recipe)
    finetune.set_defaults(handler=cmd_finetune)
    add_method_commands(finetune, recipe, leaves, "finetune", finetune_flags)

    cmd = leaf("merge", "fold a finetuning run into its base model (Hugging Face format)", cmd_merge, ("out",))
    cmd.add("run", help="a finetuning run directory or PEFT adapter directory")
    cmd.add("--out", default=None, help="the merged model directory to write")
    cmd.add("--checkpoint", default=None, help="the base model (unset: the one the run names)")
    cmd.add("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: the base's dtype")

    def estimate_flags(leaf: Leaf) -> None:
        leaf.add(
            "--checkpoint", "--model", default=None, help="the model (only its config is read): " + CHECKPOINT_HELP
        )
        only = ("micro_batch_size", "max_seq_length", "precision", "activation_checkpointing")
        leaf.add_dataclass(TrainConfig, only=only)
        leaf.add("--supervised-fraction", type=float, default=1.0, help="share of positions with a label")
        leaf.add("--device", choices=["cuda", "cpu"], default="cuda", help="where the run would train")

    estimate = add_command(commands, "estimate", "predict the peak memory of a finetuning run", recipe)
    estimate.set_defaults(handler=cmd_estimate)
    add_method_commands(estimate, recipe, leaves, "estimate", estimate_flags)

    from lorafit.export import FORMATS, OUTTYPES

    export_help = "write a run or checkpoint as a llama.cpp GGUF (model or LoRA adapter) + Ollama Modelfile"
    cmd = leaf("export", export_help, cmd_export, ("out",))
    cmd.add("source", help="a finetuning run directory, a PEFT adapter, or any checkpoint")
    cmd.add("--format", choices=FORMATS, default="gguf", help="a merged model, or a LoRA adapter")
    cmd.add("--out", default=None, help="the .gguf file to write (a .Modelfile is written beside it)")
    cmd.add("--outtype", choices=OUTTYPES, default="f32", help="weight type of the matrices (norms stay f32)")
    cmd.add("--checkpoint", default=None, help="the base model (unset: the one the run names)")
    cmd.add("--force", action="store_true", help="overwrite existing output files")

    from lorafit import serve

    cmd = leaf("serve", "serve the model and its LoRA adapters over an OpenAI-compatible API", cmd_serve)
    cmd.add("--checkpoint", default=None, help="the base model: " + CHECKPOINT_HELP)
    cmd.add("--adapter", action="append", default=[], metavar="NAME=RUN_DIR", help="a LoRA run served as model NAME")
    cmd.add("--adapter-dir", default=None, help="adapters loaded on first request, by directory name")
    cmd.add("--allow-any-adapter-path", action="store_true", help="let /v1/load_lora_adapter read any path")
    cmd.add("--host", default="127.0.0.1", help="the address to listen on")
    cmd.add("--port", type=int, default=8000, help="the port to listen on")
    cmd.add("--api-key", default=None, help="require `Authorization: Bearer KEY` on every route but /health")
    cmd.add("--max-batch", type=positive_int, default=serve.DEFAULT_MAX_BATCH, help="requests decoded together")
    cmd.add("--max-loaded-adapters", type=positive_int, default=serve.DEFAULT_MAX_LOADED_ADAPTERS, help="in memory")
    cmd.add("--max-model-len", type=positive_int, default=serve.DEFAULT_MAX_MODEL_LEN, help="prompt + output tokens")
    cmd.add("--max-body-bytes", type=positive_int, default=serve.DEFAULT_MAX_BODY_BYTES, help="request size limit")
    prefill_help = "prompt tokens (padded) prefilled together in one forward between two decode steps"
    cmd.add("--max-prefill-tokens", type=positive_int, default=serve.DEFAULT_MAX_PREFILL_TOKENS, help=prefill_help)
    cmd.add("--served-model-name", default=None, help="the base model's name in the API (unset: --checkpoint)")
    cmd.add("--device", default=None, help="cpu or cuda (unset: cuda when available)")
    cmd.add("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="weight dtype")
    from lorafit.quant import SCHEMES

    quantize_help = "hold the block linears (int8: the LM head too) quantised; QLoRA runs need it (nf4: lorafit[quant])"
    cmd.add("--quantize", default=None, choices=SCHEMES, help=quantize_help)
    compile_help = "compile the batched decode step with torch.compile at start (/health says 503 until done)"
    cmd.add("--compile", action="store_true", help=compile_help)
    cmd.add("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"], help="uvicorn's")

    cmd = leaf(
        "evaluate", "loss, perplexity and generation metrics of a base and its adapters; lm-eval tasks", cmd_evaluate
    )
    cmd.add("--checkpoint", default=None, help="the base model (unset: the first adapter's base)")
    cmd.add("--adapter", action="append", default=[], help="a finetuning run or adapter directory (repeatable)")
    cmd.add("--data", default=None, help="a JSON/JSONL file of records or a prepared dataset directory")
    cmd.add("--generate", action="store_true", help="also answer each record and score the answers")
    cmd.add("--max-records", type=positive_int, default=None, help="evaluate on the first N records only")
    cmd.add("--max-new-tokens", type=positive_int, default=128, help="tokens per generated answer at most")
    cmd.add("--prompt-style", default=None, choices=["alpaca", "chat"], help="for a data file")
    cmd.add("--tasks", default=None, help="lm-evaluation-harness tasks, comma-separated (e.g. hellaswag,arc_easy)")
    cmd.add("--limit", type=positive_int, default=None, help="lm-eval: at most this many examples per task")
    cmd.add("--include-path", default=None, help="lm-eval: a directory of extra task YAML files")
    cmd.add("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="weight dtype")
    cmd.add("--device", default=None, help="cpu or cuda (unset: cuda when available)")
    cmd.add("--json", action="store_true", help="print the results as JSON")

    cmd = leaf("demo", "the whole story on the default model: measure, LoRA-finetune, measure", cmd_demo)
    cmd.add("--out", default="out/demo", help="where the demo's run and results go")
    cmd.add("--quick", action="store_true", help="a smaller, faster run")
    cmd.add("--seed", type=int, default=0, help="seeds the generated notes and the training run")
    return parser, leaves


# ------------------------------------------------------------------------------------------------


def read_recipe(path: str, leaf: Leaf, command: str) -> dict[str, Any]:
    """A --config YAML file as flag values for `command`, keys checked and values converted like flags."""
    try:
        recipe = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ValueError(f"--config {path}: {err.strerror or err}") from err
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from err
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: a recipe is a mapping of flag names to values, not a {type(recipe).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in recipe.items()}
    unknown = sorted(k for k in values if k not in leaf.converters or k in ("config", "help"))
    if unknown:
        raise ValueError(f"{path}: unknown keys for `lorafit {command}`: {', '.join(unknown)}")
    for key, value in values.items():
        convert = leaf.converters[key]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = ",".join(value)
        if isinstance(value, str) and convert is not None:
            try:
                values[key] = convert(value)
            except (ValueError, argparse.ArgumentTypeError) as err:
                raise ValueError(f"{path}: {key}: {value!r} is not valid ({err})") from err
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse argv; a `--config` YAML recipe supplies defaults that explicit flags override."""
    argv = sys.argv[1:] if argv is None else argv
    parser, leaves = build_parser()
    args = parser.parse_args(argv)
    key = (args.command, getattr(args, "method", None))
    leaf = leaves[key]
    if args.config:
        try:
            recipe = read_recipe(args.config, leaf, " ".join(k for k in key if k))
        except ValueError as err:
            parser.error(str(err))
        leaf.parser.set_defaults(**recipe)
        args = parser.parse_args(argv)
    missing = [dest for dest in leaf.required if getattr(args, dest, None) is None]
    if missing:
        flags = ", ".join("--" + d.replace("_", "-") for d in missing)
        leaf.parser.error(f"the following arguments are required: {flags} (as flags or --config keys)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        args.handler(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except (ValueError, OSError, RuntimeError) as error:
        # Bad input is reported in one line that names the file/field; --debug (or LORAFIT_DEBUG=1) shows
        # the traceback. Any other exception is a bug and keeps its traceback.
        if args.debug or os.environ.get("LORAFIT_DEBUG"):
            raise
        print(f"lorafit {args.command}: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
