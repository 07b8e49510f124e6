"""`lorafit serve`: one base model, many LoRA adapters, an OpenAI-compatible API, requests batched together.

The HTTP side (fastapi, uvicorn, prometheus_client) is the `serve` extra, imported only when serving.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_MODEL_LEN = 1024
DEFAULT_MAX_LOADED_ADAPTERS = 16
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_PREFILL_TOKENS = 512


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
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    served_model_name: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    compile: bool = False,
    quantize: str | None = None,
    max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS,
) -> Any:
    """Load the base model (quantised with `quantize`) and the start-up adapters and return the FastAPI app.

    compile=True decodes through generate's compiled step, compiled when the app starts (/health answers 503
    until then).
    """
    require_serve_extra()
    import torch

    from lorafit.checkpoint import load_model
    from lorafit.generate import prepare_for_decoding
    from lorafit.hub import DEFAULT_MODEL, resolve_checkpoint
    from lorafit.quant import load_quantized
    from lorafit.runtime import one_thread, resolve_device, resolve_dtype
    from lorafit.serve.adapters import AdapterStore
    from lorafit.serve.app import ServeSettings, create_app
    from lorafit.tokenizer import Tokenizer

    if max_batch < 1:
        raise ValueError(f"--max-batch must be at least 1, got {max_batch}")
    if adapter_dir is not None and not Path(adapter_dir).is_dir():
        raise FileNotFoundError(f"--adapter-dir {adapter_dir}: not a directory")
    # Everything here runs on one thread, so only the decode thread ever starts an OpenMP team (runtime.one_thread);
    # the decode thread uses the threads torch has here.
    threads = torch.get_num_threads()
    with one_thread():
        path = resolve_checkpoint(checkpoint)
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        # As LLM.load (generate, chat) loads it: block linears quantised while loading, then made ready for decoding.
        if quantize:
            model = load_quantized(path, quantize, torch_dtype, torch_device)
        else:
            model = load_model(path, dtype=torch_dtype, device=torch_device)
        prepare_for_decoding(model, quantize, compile)
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
            compile=compile,
            max_prefill_tokens=max_prefill_tokens,
            threads=threads,
        )
        return create_app(model, tokenizer, store, settings)


def serve(app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the app under uvicorn until SIGTERM or Ctrl-C."""
    require_serve_extra()
    import uvicorn

    # On SIGTERM uvicorn stops accepting, lets running requests finish for up to this long, then the app's
    # shutdown fails whatever is still running with a clear error.
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=30, log_level=log_level)
