"""Read checkpoints in place (HF safetensors, GGUF, Meta .pth, llama2.c .bin) and write HF-format models.

Every reader returns tensors under lorafit's names, which are Hugging Face's LlamaForCausalLM names
without the leading "model.", with queries and keys in HF's rotate-half RoPE layout. Nothing is
converted on disk: safetensors and .pth files are memory-mapped and mapped by name at load time.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lorafit.config import Config, RopeScaling
from lorafit.io import atomic_directory, write_json
from lorafit.model import LLaMA, rope_inverse_frequencies
from lorafit.runtime import drop_pages, file_mapped


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing files or tensors, wrong shapes, unsupported formats."""


# Tensors some checkpoints carry that the model recomputes, so they are dropped silently.
HARMLESS_SUFFIXES = ("rotary_emb.inv_freq",)

WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "consolidated.00.pth + params.json",
)


# ---------------------------------------------------------------------------------------------
# Public API


def load_config(path: str | Path) -> Config:
    """The Config of a checkpoint: an HF directory (config.json), a .gguf file, a Meta dir (params.json)."""
    path = Path(path)
    if path.is_file():
        return _read_single_file(path, want_tensors=False)[0]
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    if (path / "config.json").exists():
        try:
            return Config.from_hf(path / "config.json", name=path.name)
        except KeyError as err:
            raise CheckpointError(f"{path / 'config.json'}: missing key {err}") from None
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{path / 'config.json'}: {err}") from None
    if (path / "params.json").exists():
        return _meta_config(path)
    raise CheckpointError(f"{path}: no config.json (Hugging Face) or params.json (Meta) found")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint under lorafit's names; safetensors and .pth files stay memory-mapped."""
    path = Path(path)
    if path.is_file():
        return _read_single_file(path, want_tensors=True)[1]
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    if (path / "model.safetensors.index.json").exists():
        return _hf_names(_read_sharded(path / "model.safetensors.index.json", read_safetensors))
    if (path / "model.safetensors").exists():
        return _hf_names(read_safetensors(path / "model.safetensors"))
    if (path / "pytorch_model.bin.index.json").exists():
        return _hf_names(_read_sharded(path / "pytorch_model.bin.index.json", _read_torch))
    if (path / "pytorch_model.bin").exists():
        return _hf_names(_read_torch(path / "pytorch_model.bin"))
    meta_shards = sorted(path.glob("consolidated.*.pth"))
    if len(meta_shards) > 1:
        raise CheckpointError(
            f"{path}: {len(meta_shards)} consolidated.*.pth shards; multi-shard Meta checkpoints are not supported, "
            "convert them with transformers' convert_llama_weights_to_hf first"
        )
    if meta_shards and (path / "params.json").exists():
        return _meta_names(_read_torch(meta_shards[0]), _meta_config(path))
    raise CheckpointError(f"{path}: no weights found; looked for {', '.join(WEIGHT_FILES)}")


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    make_linear: Callable[[str, torch.Tensor], nn.Module | None] | None = None,
) -> LLaMA:
    """Build the model on the meta device and assign the checkpoint's tensors, so it never exists twice.

    make_linear(name, tensor), when given, sees each tensor as the checkpoint holds it (memory-mapped, before the
    cast to dtype and device) and may return a module to stand in place of the linear layer that owns it
    (lorafit.quant quantises layer by layer this way).
    """
    path = Path(path)
    if path.is_file():
        config, state = _read_single_file(path, want_tensors=True)
    else:
        config, state = load_config(path), load_state_dict(path)
    with torch.device("meta"):
        model = LLaMA(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_embeddings:
        # The head is the embedding; a copy some checkpoints still carry is not needed.
        expected.pop("lm_head.weight")
        state.pop("lm_head.weight", None)
    _check_tensors(state, expected, path)
    fingerprint = weights_fingerprint(state, config)
    # Move tensors one at a time, dropping each source as we go, so a cast never holds two copies. A memory-mapped
    # source's pages stay resident until the file is closed even so: a cast lets them go itself (loading the
    # float32 default model as bf16 peaked at 1080 MiB with them, ~540 MiB of them the file's).
    mapped = {id(tensor) for tensor in file_mapped(list(state.values()))}
    loaded = {}
    for name in expected:
        tensor = state.pop(name)
        module = make_linear(name, tensor) if make_linear is not None else None
        if module is None:
            loaded[name] = tensor.to(device=device, dtype=dtype)
            if id(tensor) in mapped and loaded[name].data_ptr() != tensor.data_ptr():
                drop_pages(tensor)
        else:
            parent, _, child = name.removesuffix(".weight").rpartition(".")
            setattr(model.get_submodule(parent), child, module)
    model.load_state_dict(loaded, strict=False, assign=True)
    model.tie_weights()
    model.checkpoint_fingerprint = fingerprint
    return model.eval()


def weights_fingerprint(state: dict[str, torch.Tensor], config: Config) -> str:
    """A short hash of the embedding's first 8 rows and two norms of a state dict: two bases with the same shapes
    still differ in it. The block linears are never read (a quantised base holds them as codes)."""
    digest = hashlib.sha256()
    names = ["norm.weight", f"layers.{config.n_layer - 1}.post_attention_layernorm.weight"]
    for tensor in [state["embed_tokens.weight"][:8], *(state[name] for name in names)]:
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def read_gguf(path: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """Config and dequantised float32 tensors of a llama-architecture GGUF file."""
    return _read_gguf(Path(path), want_tensors=True)


def save_hf_model(
    state_dict: dict[str, torch.Tensor], config: Config, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30
) -> None:
    """Write a model transformers can load: config.json and (sharded) safetensors, via a temporary dir."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CheckpointError(f"{out_dir}: already exists and is not empty; choose a new output directory")
    tensors = {
        ("" if name == "lm_head.weight" else "model.") + name: tensor.detach().contiguous()
        for name, tensor in state_dict.items()
        if not (config.tie_embeddings and name == "lm_head.weight")
    }
    hf_config = config.to_hf()
    hf_config["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked above; the finished directory takes its name
    with atomic_directory(out_dir) as staging:
        write_json(staging / "config.json", hf_config)
        _write_safetensors(tensors, staging, max_shard_bytes)


# ---------------------------------------------------------------------------------------------
# Validation


def _check_tensors(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], path: Path) -> None:
    """Raise on a missing tensor, a wrong shape or an unknown extra tensor; drop harmless extras."""
    for name, shape in expected.items():
        if name not in state:
            raise CheckpointError(f"{path}: missing tensor {name!r} (expected shape {list(shape)})")
        if tuple(state[name].shape) != shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {list(state[name].shape)}, expected {list(shape)}"
            )
    unexpected = [name for name in state if name not in expected and not name.endswith(HARMLESS_SUFFIXES)]
    if unexpected:
        shown = ", ".join(repr(n) for n in unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
        raise CheckpointError(f"{path}: {len(unexpected)} unexpected tensor(s) the model has no place for: {shown}")
    for name in [n for n in state if n not in expected]:
        del state[name]


# ---------------------------------------------------------------------------------------------
# Hugging Face layout


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file (memory-mapped); a missing, cut-off or garbled file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such safetensors file")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        # safetensors checks the header against the file size, so a cut-off copy fails here, not in training.
        raise CheckpointError(f"{path}: not a readable safetensors file ({err}); is it truncated?") from None


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    # weights_only refuses pickled code; mmap leaves the weights on disk until used.
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint: {err}") from err


def _read_sharded(index_path: Path, read) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{index_path}: not a shard index with a 'weight_map' object ({err})") from None
    folder = Path(os.path.normpath(index_path.parent.absolute()))
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        shard_path = index_path.parent / str(shard)
        # Shards live beside their index: a name like ../x or /etc/x would read files the checkpoint does not own.
        # The check is on the names, not resolved links: a Hugging Face cache snapshot links its files to blobs.
        if Path(os.path.normpath(shard_path.absolute())).parent != folder:
            raise CheckpointError(f"{index_path}: shard {shard!r} is outside the checkpoint directory {folder}")
        if not shard_path.exists():
            raise CheckpointError(f"{index_path}: lists shard {shard!r}, which is not in {index_path.parent}")
        state.update(read(shard_path))
    return state


def _hf_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name.removeprefix("model."): tensor for name, tensor in state.items()}


def _write_safetensors(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    shards = list(_shard(tensors, max_shard_bytes))
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_json(out / "model.safetensors.index.json", index)


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    """Split tensors in order into groups of at most max_bytes (a bigger tensor gets a shard alone)."""
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = tensor
        size += nbytes
    yield shard


# ---------------------------------------------------------------------------------------------
# Interleaved RoPE (Meta, llama.cpp, llama2.c) -> HF rotate-half


def interleaved_to_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from interleaved RoPE pairs (2i, 2i+1) to HF's (i, i + head_dim/2)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _unpermute_qk(state: dict[str, torch.Tensor], config: Config) -> None:
    for i in range(config.n_layer):
        for proj, heads in (("q_proj", config.n_head), ("k_proj", config.n_kv_head)):
            name = f"layers.{i}.self_attn.{proj}.weight"
            if name in state:
                state[name] = interleaved_to_half(state[name], heads)


# ---------------------------------------------------------------------------------------------
# Meta's original layout (consolidated.00.pth + params.json)

META_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
META_TOP = {
    "tok_embeddings.weight": "embed_tokens.weight",
    "norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}


def _meta_config(path: Path) -> Config:
    params_path = path / "params.json"
    params = json.loads(params_path.read_text())
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointError(f"{path}: params.json but no consolidated.*.pth weights")
    # Meta's params.json leaves vocab_size at -1 and derives the MLP width; the tensors say both exactly.
    weights = _read_torch(shards[0])
    try:
        vocab_size, dim = weights["tok_embeddings.weight"].shape
        intermediate = weights["layers.0.feed_forward.w1.weight"].shape[0]
        scaling = RopeScaling(factor=params.get("rope_scaling_factor", 8.0)) if params.get("use_scaled_rope") else None
        return Config(
            name=path.name,
            vocab_size=vocab_size,
            n_layer=params["n_layers"],
            n_embd=dim,
            n_head=params["n_heads"],
            n_kv_head=params.get("n_kv_heads") or params["n_heads"],
            intermediate_size=intermediate,
            block_size=params.get("max_seq_len", 4096),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            norm_eps=params.get("norm_eps", 1e-5),
            tie_embeddings="output.weight" not in weights,
        )
    except KeyError as err:
        raise CheckpointError(f"{params_path}: missing {err} (in params.json or the weights)") from err


def _meta_names(weights: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in weights.items():
        if name in META_TOP:
            state[META_TOP[name]] = tensor
            continue
        parts = name.split(".")  # layers.N.attention.wq.weight
        key = ".".join(parts[2:-1])
        if parts[0] == "layers" and key in META_NAMES:
            state[f"layers.{parts[1]}.{META_NAMES[key]}.{parts[-1]}"] = tensor
        else:
            state[name] = tensor  # e.g. rope.freqs: left for validation to judge
    _unpermute_qk(state, config)
    return state


# ---------------------------------------------------------------------------------------------
# Single files: .gguf, .safetensors, .pth / .bin, llama2.c's legacy .bin


def _read_single_file(path: Path, want_tensors: bool) -> tuple[Config, dict[str, torch.Tensor]]:
    if path.suffix == ".gguf":
        return _read_gguf(path, want_tensors)
    if path.suffix == ".bin" and not zipfile.is_zipfile(path):
        return _read_llama2c(path, want_tensors)
    if path.suffix == ".safetensors":
        state = _hf_names(read_safetensors(path)) if want_tensors else {}
    elif path.suffix in (".pth", ".pt", ".bin"):
        state = _hf_names(_read_torch(path)) if want_tensors else {}
    else:
        raise CheckpointError(f"{path}: unknown checkpoint file type; expected .gguf, .safetensors, .pth or .bin")
    if not (path.parent / "config.json").exists():
        raise CheckpointError(f"{path}: a bare weights file needs a config.json beside it")
    return load_config(path.parent), state


# ---------------------------------------------------------------------------------------------
# GGUF (llama.cpp)

GGUF_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
GGUF_TOP = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}


def _read_gguf(path: Path, want_tensors: bool) -> tuple[Config, dict[str, torch.Tensor]]:
    import gguf  # imported here: its reader is only needed for GGUF files

    if not path.exists():
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable GGUF file: {err}") from err
    config = _gguf_config(reader, path)
    state = {}
    if want_tensors:
        for tensor in reader.tensors:
            if tensor.name == "rope_freqs.weight":
                continue  # folded into config.rope_scaling
            state[_gguf_name(tensor.name, path)] = _dequantize(tensor, path, gguf)
        _unpermute_qk(state, config)
    return config, state


def _gguf_name(name: str, path: Path) -> str:
    base, _, suffix = name.rpartition(".")
    if base in GGUF_TOP:
        return f"{GGUF_TOP[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in GGUF_NAMES:
        return f"layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{suffix}"
    raise CheckpointError(f"{path}: unknown GGUF tensor {name!r}")


def _dequantize(tensor, path: Path, gguf) -> torch.Tensor:
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as err:
        raise CheckpointError(
            f"{path}: tensor {tensor.name!r} has GGUF type {tensor.tensor_type.name}, which cannot be dequantised"
        ) from err
    # The reader already gives numpy (row-major) shapes: GGUF's ne order reversed, i.e. (out, in).
    # F32 tensors come back as views of the read-only file map; training writes to weights, so copy those.
    return torch.from_numpy(values.astype(np.float32, copy=not values.flags.writeable))


def _gguf_config(reader, path: Path) -> Config:
    def field(key: str, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported; lorafit reads 'llama'")
    try:
        n_head = field("llama.attention.head_count")
        n_embd = field("llama.embedding_length")
        vocab = field("llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
        config = Config(
            name=path.stem,
            vocab_size=int(vocab),
            n_layer=field("llama.block_count"),
            n_embd=n_embd,
            n_head=n_head,
            n_kv_head=field("llama.attention.head_count_kv", n_head),
            intermediate_size=field("llama.feed_forward_length"),
            head_dim=field("llama.attention.key_length", n_embd // n_head),
            block_size=field("llama.context_length", 4096),
            rope_theta=float(field("llama.rope.freq_base", 10000.0)),
            norm_eps=float(field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            tie_embeddings=all(t.name != "output.weight" for t in reader.tensors),
        )
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: GGUF metadata lacks a llama shape field ({err})") from err
    # Round float32 metadata (1e-5 is stored as 9.99999974e-06) to what the original config said.
    config.norm_eps = float(f"{config.norm_eps:.6g}")
    for token in ("bos", "eos"):
        if f"tokenizer.ggml.{token}_token_id" in reader.fields:
            config.extra[f"{token}_token_id"] = int(field(f"tokenizer.ggml.{token}_token_id"))
    scaling_type = field("llama.rope.scaling.type", "none")
    if scaling_type != "none":
        raise CheckpointError(f"{path}: rope scaling type {scaling_type!r} is not supported")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        config.rope_scaling = _llama3_scaling(np.asarray(freqs.data, dtype=np.float32), config, path)
    return config


def _llama3_scaling(freq_factors: np.ndarray, config: Config, path: Path) -> RopeScaling:
    """Recover Llama 3 RoPE scaling from llama.cpp's per-frequency divisors (rope_freqs.weight)."""
    # llama.cpp stores only the divisors; Llama 3.x always used these band edges, with factor 8 or 32.
    scaling = RopeScaling(factor=float(freq_factors.max()))
    plain = Config(**{**config.to_dict(), "rope_scaling": None})
    scaled = Config(**{**config.to_dict(), "rope_scaling": scaling})
    divisors = (rope_inverse_frequencies(plain) / rope_inverse_frequencies(scaled)).numpy()
    if not np.allclose(divisors, freq_factors, rtol=1e-3):
        raise CheckpointError(f"{path}: rope_freqs.weight does not match Llama 3 RoPE scaling; not supported")
    return scaling


# ---------------------------------------------------------------------------------------------
# llama2.c's legacy .bin (Karpathy's tinyllamas): 7 int32 header values, then float32 weights


def _read_llama2c(path: Path, want_tensors: bool) -> tuple[Config, dict[str, torch.Tensor]]:
    data = path.read_bytes() if want_tensors else path.open("rb").read(28)
    if len(data) < 28:
        raise CheckpointError(f"{path}: too short for a llama2.c checkpoint header")
    dim, hidden, n_layer, n_head, n_kv_head, vocab, seq_len = struct.unpack("7i", data[:28])
    if min(dim, hidden, n_layer, n_head, n_kv_head, seq_len) <= 0 or dim % n_head:
        raise CheckpointError(f"{path}: not a llama2.c checkpoint (header {dim, hidden, n_layer, n_head, n_kv_head})")
    config = Config(
        name=path.stem,
        vocab_size=abs(vocab),
        n_layer=n_layer,
        n_embd=dim,
        n_head=n_head,
        n_kv_head=n_kv_head,
        intermediate_size=hidden,
        block_size=seq_len,
        tie_embeddings=vocab > 0,  # negative vocab: separate head
    )
    if not want_tensors:
        return config, {}
    flat = torch.frombuffer(bytearray(data[28:]), dtype=torch.float32)
    kv_dim = n_kv_head * (dim // n_head)
    L = n_layer
    # Storage order of llama2.c's export.py (version 0); the freq_cis tables are skipped.
    layout = [
        ("embed_tokens.weight", None, (abs(vocab), dim)),
        ("input_layernorm.weight", L, (dim,)),
        ("self_attn.q_proj.weight", L, (dim, dim)),
        ("self_attn.k_proj.weight", L, (kv_dim, dim)),
        ("self_attn.v_proj.weight", L, (kv_dim, dim)),
        ("self_attn.o_proj.weight", L, (dim, dim)),
        ("post_attention_layernorm.weight", L, (dim,)),
        ("mlp.gate_proj.weight", L, (hidden, dim)),
        ("mlp.down_proj.weight", L, (dim, hidden)),
        ("mlp.up_proj.weight", L, (hidden, dim)),
        ("norm.weight", None, (dim,)),
        ("freq_cis", None, (seq_len, dim // n_head)),
    ]
    if vocab < 0:
        layout.append(("lm_head.weight", None, (-vocab, dim)))
    state, offset = {}, 0
    for name, layers, shape in layout:
        size = int(np.prod(shape)) * (layers or 1)
        if offset + size > flat.numel():
            raise CheckpointError(f"{path}: file ends inside tensor {name!r}; not a llama2.c checkpoint?")
        chunk = flat[offset : offset + size]
        offset += size
        if layers is None:
            state[name] = chunk.view(shape)
        else:
            for i, tensor in enumerate(chunk.view(layers, *shape)):
                state[f"layers.{i}.{name}"] = tensor
    if offset != flat.numel():
        raise CheckpointError(f"{path}: {flat.numel() - offset} values beyond the llama2.c layout its header describes")
    del state["freq_cis"]
    _unpermute_qk(state, config)
    return config, state
