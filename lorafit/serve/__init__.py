"""`lorafit serve`: one base model, many LoRA adapters, an OpenAI-compatible API, requests batched together.

The HTTP side (fastapi, uvicorn, prometheus_client) is the `serve` extra, imported only when serving.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_MODEL_LEN = 1024
DEFAULT_MAX_LOADED_ADAPTERS = 16


def require_serve_extra() -> None:
    """Fail in one line, saying what to install, when the server's packages are missing."""
    missing = []
    for module in ("fastapi", "uvicorn", "prometheus_client"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise RuntimeError(f'lorafit serve needs {", ".join(missing)}: pip install "lorafit[serve]"')


def parse_adapter_spec(spec: str) -> tuple[str, Path]:
    """NAME=RUN_DIR from --adapter."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--adapter {spec!r}: expected NAME=RUN_DIR")
    return name, Path(path)


def build_app(
    checkpoint: str | Path | None = None,
    adapters: Sequence[tuple[str, Path]] = (),
    adapter_dir: str | Path | None = None,
    allow_any_adapter_path: bool = False,
    api_key: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_loaded_adapters: int = DEFAULT_MAX_LOADED_ADAPTERS,
    max_model_len: int = DEFAULT_MAX_MODEL_LEN,
    max_body_bytes: int = 1 << 20,
    served_model_name: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> Any:
    """Load the base model and the start-up adapters and return the FastAPI app that serves them."""
    require_serve_extra()
    import torch

    from lorafit.checkpoint import load_model
    from lorafit.generate import resolve_dtype, use_decode_layout
    from lorafit.hub import DEFAULT_MODEL, resolve_checkpoint
    from lorafit.serve.adapters import AdapterStore
    from lorafit.serve.app import ServeSettings, create_app
    from lorafit.tokenizer import Tokenizer

    if max_batch < 1:
        raise ValueError(f"--max-batch must be at least 1, got {max_batch}")
    if adapter_dir is not None and not Path(adapter_dir).is_dir():
        raise FileNotFoundError(f"--adapter-dir {adapter_dir}: not a directory")
    path = resolve_checkpoint(checkpoint)
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(path, dtype=resolve_dtype(dtype, torch_device), device=torch_device)
    if torch_device.type == "cpu":
        use_decode_layout(model)
    tokenizer = Tokenizer.from_checkpoint(path)
    max_model_len = min(max_model_len, model.config.block_size)
    store = AdapterStore(model, max_loaded_adapters, adapter_dir, allow_any_adapter_path)
    for name, run in adapters:
        store.load(name, run)
    settings = ServeSettings(
        base_name=served_model_name or str(checkpoint or DEFAULT_MODEL),
        api_key=api_key,
        max_batch=max_batch,
        max_model_len=max_model_len,
        max_body_bytes=max_body_bytes,
    )
    return create_app(model, tokenizer, store, settings)


def cmd_serve(args: argparse.Namespace) -> None:
    """Start the server and block until SIGTERM or Ctrl-C."""
    require_serve_extra()
    import uvicorn

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
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(f"lorafit serve: warning: listening on {args.host} without --api-key", file=sys.stderr)
    # On SIGTERM uvicorn stops accepting, lets running requests finish for up to this long, then the app's
    # shutdown fails whatever is still running with a clear error.
    uvicorn.run(app, host=args.host, port=args.port, timeout_graceful_shutdown=30, log_level=args.log_level)


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register `lorafit serve`."""
    p = commands.add_parser("serve", help="serve the model and its LoRA adapters over an OpenAI-compatible API")
    p.add_argument("--checkpoint", default=None, help="the base model: a path, known name or HF repo id")
    p.add_argument(
        "--adapter", action="append", default=[], metavar="NAME=RUN_DIR", help="a LoRA run served as model NAME"
    )
    p.add_argument("--adapter-dir", default=None, help="adapters loaded on first request by directory name")
    p.add_argument(
        "--allow-any-adapter-path",
        action="store_true",
        help="let /v1/load_lora_adapter read adapters outside --adapter-dir",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every route but /health")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="requests decoded together")
    p.add_argument(
        "--max-loaded-adapters", type=int, default=DEFAULT_MAX_LOADED_ADAPTERS, help="adapters held in memory"
    )
    p.add_argument(
        "--max-model-len", type=int, default=DEFAULT_MAX_MODEL_LEN, help="positions per request (prompt + output)"
    )
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--served-model-name", default=None, help="the base model's name in the API")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(handler=cmd_serve)
