"""`lorafit <command>`: parses arguments and calls the library; no logic of its own."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

CHECKPOINT_HELP = (
    "a checkpoint directory, a .gguf file, a known model name or a Hugging Face repo id "
    "(downloaded on first use); default: the embedded SmolLM2-135M-Instruct"
)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    parser.add_argument("--adapter", default=None, help="a finetuning run directory (or PEFT adapter) to apply")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="weight dtype (default: float32 on CPU, bfloat16 on CUDA)",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="decode through a torch.compile'd step: ~2x faster on CPU after a one-time compile of about a minute",
    )


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)


def cmd_download(args: argparse.Namespace) -> None:
    from lorafit.hub import download

    path = download(args.name, token=args.token)
    print(f"checkpoint ready: {path}")


def load_llm(args: argparse.Namespace):
    import time

    from lorafit.generate import LLM

    started = time.perf_counter()
    llm = LLM.load(args.checkpoint, adapter=args.adapter, dtype=args.dtype, device=args.device, compile=args.compile)
    print(f"loaded in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return llm


def cmd_generate(args: argparse.Namespace) -> None:
    llm = load_llm(args)
    for text in llm.stream(
        args.prompt,
        chat=args.chat,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    ):
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(llm.last_stats.summary(), file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    llm = load_llm(args)
    print("Chatting with the model; an empty line or Ctrl-D ends, /reset forgets the history.", file=sys.stderr)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    while True:
        try:
            line = input(">> ")
        except EOFError:
            break
        if not line.strip():
            break
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        for text in llm.stream(
            messages,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        ):
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

    source = args.source or args.dataset
    if args.dataset == "json" and not args.source:
        raise SystemExit("lorafit prepare json needs --source FILE|URL")
    tokenizer = Tokenizer.from_checkpoint(resolve_checkpoint(args.checkpoint))
    val_size = args.val_size if args.val_size is not None else (2000 if args.dataset == "alpaca" else 0)
    info = prepare_source(
        source,
        tokenizer,
        args.out,
        fmt=None if args.dataset == "json" else args.dataset,
        style=args.prompt_style,
        max_seq_length=args.max_seq_length,
        mask_prompt=not args.no_mask_prompt,
        val_size=val_size,
        seed=args.seed,
    )
    print(
        f"{info.train:,} train / {info.val:,} val samples in {info.out_dir} ({info.prompt_style} prompts; "
        f"{info.skipped_empty} empty outputs skipped; {info.truncated} truncated to {info.max_seq_length} tokens)"
        + (" [cached]" if info.cached else "")
    )


def cmd_finetune(args: argparse.Namespace) -> None:
    from lorafit.adapter import AdapterConfig
    from lorafit.finetune import DataOptions, finetune
    from lorafit.lora import LoRAConfig
    from lorafit.train import TrainConfig

    train_config = TrainConfig(
        epochs=args.epochs,
        max_steps=args.max_steps,
        micro_batch_size=args.micro_batch_size,
        global_batch_size=args.global_batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        max_seq_length=args.max_seq_length,
        eval_interval=args.eval_interval,
        save_interval=args.save_interval,
        precision=args.precision,
        seed=args.seed,
        activation_checkpointing=args.activation_checkpointing,
        cpu_mmap_threshold=args.cpu_mmap_threshold,
    )
    lora = LoRAConfig(
        r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=args.lora_targets, rslora=args.rslora
    )
    adapter = AdapterConfig(prompt_length=args.adapter_prompt_length, start_layer=args.adapter_start_layer)
    data_options = DataOptions(
        prompt_style=args.prompt_style, mask_prompt=not args.no_mask_prompt, val_size=args.val_size
    )
    finetune(
        args.method,
        args.data,
        args.out,
        args.checkpoint,
        train_config,
        lora,
        data_options,
        args.resume,
        args.device,
        devices=args.devices,
        nodes=args.nodes,
        adapter=adapter,
    )


def cmd_merge(args: argparse.Namespace) -> None:
    from lorafit.finetune import merge_adapter

    out = merge_adapter(args.run, args.out, args.checkpoint)
    print(f"merged model written to {out} (loads with transformers.AutoModelForCausalLM.from_pretrained)")
    if (out / "adapter").is_dir():
        print(f"prompts, gates and biases do not fit a Llama checkpoint: also pass --adapter {out / 'adapter'}")


def cmd_demo(args: argparse.Namespace) -> None:
    from lorafit.demo import DemoConfig, run_demo

    config = DemoConfig.quick() if args.quick else DemoConfig()
    config.seed = args.seed
    run_demo(args.out, config)


def cmd_estimate(args: argparse.Namespace) -> None:
    from lorafit.config import Config
    from lorafit.estimate import format_estimate
    from lorafit.lora import LoRAConfig

    model = Path(args.model)
    config = Config.from_hf(model / "config.json") if model.is_dir() else Config.from_name(args.model)
    lora = LoRAConfig(r=args.lora_r, dropout=args.lora_dropout, targets=args.lora_targets)
    print(
        format_estimate(
            config,
            args.method,
            args.micro_batch_size,
            args.max_seq_length,
            args.precision,
            lora,
            args.activation_checkpointing,
            args.supervised_fraction,
            args.device,
        )
    )


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    from lorafit.finetune import METHODS

    p.add_argument("method", choices=METHODS)
    p.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    p.add_argument("--data", required=True, help="a prepared directory (lorafit prepare) or a JSON/JSONL file")
    p.add_argument("--out", required=True, help="run directory: adapter, metrics, loss.png, checkpoints")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=128, help="samples per optimizer step")
    p.add_argument("--learning-rate", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", default="q,v", help="comma-separated among q,k,v,o,gate,up,down,lm_head, or all")
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    p.add_argument("--adapter-prompt-length", type=int, default=10, help="LLaMA-Adapter: prompt tokens per layer")
    p.add_argument("--adapter-start-layer", type=int, default=2, help="LLaMA-Adapter: first layer with a prompt")
    p.add_argument("--eval-interval", type=int, default=100, help="steps between evaluations")
    p.add_argument("--save-interval", type=int, default=1000, help="steps between resumable checkpoints")
    p.add_argument("--resume", default=None, help="a checkpoint directory, or auto for the run's latest")
    p.add_argument("--precision", default="auto", choices=["auto", "32-true", "bf16-mixed", "bf16-true"])
    p.add_argument("--activation-checkpointing", action="store_true", help="trade compute for memory")
    p.add_argument(
        "--cpu-mmap-threshold",
        type=int,
        default=None,
        help="CPU: return freed buffers of >= this many bytes to the system (e.g. 1048576: less RSS, maybe slower)",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default=None)
    p.add_argument(
        "--devices", type=int, default=1, help="processes (GPUs) per node: DDP for LoRA/adapters, FSDP for full"
    )
    p.add_argument("--nodes", type=int, default=1, help="machines, each started with the same command")
    p.add_argument(
        "--prompt-style",
        default=None,
        choices=["alpaca", "chat"],
        help="for raw data files (default: chat when the model has a chat template)",
    )
    p.add_argument("--no-mask-prompt", action="store_true", help="also train on the prompt tokens")
    p.add_argument("--val-size", type=int, default=2000, help="validation samples split off a raw data file")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="lorafit", description="Finetune LLaMA-family models cheaply.")
    recipe = argparse.ArgumentParser(add_help=False)
    recipe.add_argument(
        "--config", default=None, help="a YAML recipe whose keys (flag names) set this command's defaults"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("download", parents=[recipe], help="fetch a model into the cache and make it ready to load")
    p.add_argument("name", help="smollm2-135m-instruct (the embedded default), a known name or an HF repo id")
    p.add_argument("--token", default=None, help="Hugging Face token (default: $HF_TOKEN)")
    p.set_defaults(handler=cmd_download)

    p = commands.add_parser("generate", parents=[recipe], help="complete a prompt, streaming the text")
    add_model_arguments(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_sampling_arguments(p, max_new_tokens=128)
    p.set_defaults(handler=cmd_generate)

    p = commands.add_parser("chat", parents=[recipe], help="talk with the model, multi-turn")
    add_model_arguments(p)
    p.add_argument("--system", default=None, help="a system message")
    add_sampling_arguments(p, max_new_tokens=512)
    p.set_defaults(handler=cmd_chat)

    p = commands.add_parser(
        "prepare", parents=[recipe], help="tokenise an instruction dataset (prompt masked) for finetuning"
    )
    p.add_argument("dataset", choices=["alpaca", "dolly", "json"])
    p.add_argument("--source", default=None, help="a file or URL (default: the dataset's public download)")
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint", default=None, help="whose tokenizer and chat template to use; " + CHECKPOINT_HELP)
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--val-size", type=int, default=None, help="default: 2000 for alpaca, else 0")
    p.add_argument("--prompt-style", default=None, choices=["alpaca", "chat"])
    p.add_argument("--no-mask-prompt", action="store_true")
    p.add_argument("--seed", type=int, default=42)
    p.set_defaults(handler=cmd_prepare)

    p = commands.add_parser(
        "finetune", parents=[recipe], help="finetune with LoRA (or all weights) on instruction data"
    )
    add_finetune_arguments(p)
    p.set_defaults(handler=cmd_finetune)

    p = commands.add_parser(
        "merge",
        parents=[recipe],
        help="fold a LoRA (or LLaMA-Adapter v2) run into its base model, written in Hugging Face format",
    )
    p.add_argument("run", help="a finetuning run directory or PEFT adapter directory")
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint", default=None, help="the base model (default: the one the run names)")
    p.set_defaults(handler=cmd_merge)

    from lorafit.estimate import METHODS as ESTIMATE_METHODS
    from lorafit.estimate import PRECISIONS

    p = commands.add_parser("estimate", parents=[recipe], help="predict the peak memory of a finetuning run")
    p.add_argument("--model", required=True, help="a known model name (e.g. llama-2-7b) or a checkpoint directory")
    p.add_argument("--method", choices=ESTIMATE_METHODS, default="lora")
    p.add_argument("--micro-batch-size", "--micro-batch", type=int, default=4)
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--precision", choices=PRECISIONS, default="bf16-true")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", default="q,v", help="comma-separated among q,k,v,o,gate,up,down,lm_head, or all")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument(
        "--supervised-fraction",
        type=float,
        default=1.0,
        help="share of positions with a label (masked prompts lower it)",
    )
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.set_defaults(handler=cmd_estimate)

    p = commands.add_parser(
        "demo", parents=[recipe], help="the whole story on the default model: measure, LoRA-finetune, measure"
    )
    p.add_argument("--out", default="out/demo")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run")
    p.add_argument("--seed", type=int, default=0, help="seeds the generated notes and the training run")
    p.set_defaults(handler=cmd_demo)

    from lorafit.evaluate import add_command as add_evaluate  # `lorafit evaluate` (its module owns the flags)

    add_evaluate(commands)
    return parser, commands.choices


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse argv; a `--config` YAML recipe supplies defaults (required ones too) that explicit flags override."""
    argv = sys.argv[1:] if argv is None else argv
    parser, subparsers = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    recipe_path = pre.parse_known_args(argv)[0].config
    command = next((a for a in argv if a in subparsers), None)
    if recipe_path and command:
        recipe = {k.replace("-", "_"): v for k, v in (yaml.safe_load(Path(recipe_path).read_text()) or {}).items()}
        actions = {a.dest: a for a in subparsers[command]._actions}
        unknown = sorted(k for k in recipe if k not in actions or k in ("help", "config"))
        if unknown:
            parser.error(f"{recipe_path}: unknown keys for `lorafit {command}`: {', '.join(unknown)}")
        for key in recipe:
            actions[key].required = False
        subparsers[command].set_defaults(**recipe)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        args.handler(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except (ValueError, OSError, RuntimeError) as error:
        # Bad input is reported in one line that names the file/field; LORAFIT_DEBUG=1 shows the traceback.
        if os.environ.get("LORAFIT_DEBUG"):
            raise
        sys.exit(f"lorafit {args.command}: error: {error}")
