"""checkpoint.py: every format loads to transformers' logits; HF output loads back; errors name what is wrong."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lorafit.checkpoint import (
    CheckpointError,
    load_config,
    load_model,
    load_state_dict,
    read_gguf,
    save_hf_model,
)
from lorafit.model import LLaMA
from tests.conftest import rss_file_kib, shared_file, tiny_config

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so that the tiny head's frequencies fall in all three bands of the scaling.
    "original_max_position_embeddings": 64,
}


def tiny_hf(n_kv_head: int = 4, tied: bool = False, rope_scaling: dict | None = None) -> LlamaForCausalLM:
    """A random tiny Llama, with non-trivial norm weights so a swapped norm would show."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=n_kv_head,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=500.0,
        rope_scaling=rope_scaling,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def hf_logits(model: LlamaForCausalLM, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits


def our_logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)


IDX = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------- HF safetensors


@pytest.mark.parametrize(
    "n_kv_head, tied, rope_scaling, shard",
    [
        (4, False, None, None),  # multi-head attention, separate head, one file
        (2, True, None, None),  # grouped-query, tied embeddings
        (2, False, LLAMA3_ROPE, "20KB"),  # Llama 3 RoPE scaling, sharded with an index
    ],
)
def test_hf_safetensors_matches_transformers(tmp_path, n_kv_head, tied, rope_scaling, shard):
    hf = tiny_hf(n_kv_head, tied, rope_scaling)
    hf.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard)

    model = load_model(tmp_path)

    assert model.config.tie_embeddings == tied and model.config.n_kv_head == n_kv_head
    assert (model.config.rope_scaling is not None) == bool(rope_scaling)
    assert (our_logits(model, IDX) - hf_logits(hf, IDX)).abs().max() <= 1e-5
    if tied:
        assert model.lm_head.weight is model.embed_tokens.weight


def test_load_model_casts_dtype_and_keeps_names(tmp_path):
    hf = tiny_hf()
    hf.save_pretrained(tmp_path)
    state = load_state_dict(tmp_path)
    assert set(state) == {k.removeprefix("model.") for k in hf.state_dict()}

    model = load_model(tmp_path, dtype=torch.bfloat16)

    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert not model.training


def test_pytorch_bin_is_read_with_weights_only(tmp_path):
    hf = tiny_hf(n_kv_head=2)
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")

    assert (our_logits(load_model(tmp_path), IDX) - hf_logits(hf, IDX)).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------- save_hf_model


@pytest.mark.parametrize("tied, max_shard_bytes", [(False, 5 * 2**30), (True, 30_000)])
def test_save_hf_model_round_trip(tmp_path, tied, max_shard_bytes):
    hf = tiny_hf(n_kv_head=2, tied=tied, rope_scaling=LLAMA3_ROPE)
    hf.save_pretrained(tmp_path / "src")
    model = load_model(tmp_path / "src")

    save_hf_model(model.state_dict(), model.config, tmp_path / "out", max_shard_bytes=max_shard_bytes)

    sharded = (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert sharded == (max_shard_bytes < 5 * 2**30)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert (hf_logits(reloaded, IDX) - hf_logits(hf, IDX)).abs().max() <= 1e-5
    if not sharded:
        names = set(load_file(tmp_path / "out" / "model.safetensors"))
        assert ("lm_head.weight" in names) != tied and "model.embed_tokens.weight" in names
    assert {p.name for p in tmp_path.iterdir()} == {"src", "out"}  # no temporary directory left behind


def test_save_hf_model_refuses_non_empty_dir_and_accepts_empty(tmp_path):
    model = load_model(_saved_tiny(tmp_path / "src"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")

    with pytest.raises(CheckpointError, match=r"busy: already exists and is not empty"):
        save_hf_model(model.state_dict(), model.config, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"

    (tmp_path / "empty").mkdir()
    save_hf_model(model.state_dict(), model.config, tmp_path / "empty")
    assert (tmp_path / "empty" / "model.safetensors").exists()
    assert not list(tmp_path.glob(".*tmp*"))


# ------------------------------------------------------------------------------------- Meta .pth


def meta_permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows -> Meta's interleaved rows (the inverse of convert_llama_weights_to_hf)."""
    rows = weight.shape[0]
    return weight.view(n_heads, 2, rows // n_heads // 2, -1).transpose(1, 2).reshape(weight.shape)


def save_meta(hf: LlamaForCausalLM, out: Path) -> None:
    """Write hf's weights in Meta's original layout: consolidated.00.pth + params.json."""
    c = hf.config
    renames = {
        "self_attn.q_proj": "attention.wq",
        "self_attn.k_proj": "attention.wk",
        "self_attn.v_proj": "attention.wv",
        "self_attn.o_proj": "attention.wo",
        "mlp.gate_proj": "feed_forward.w1",
        "mlp.down_proj": "feed_forward.w2",
        "mlp.up_proj": "feed_forward.w3",
        "input_layernorm": "attention_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    meta = {"tok_embeddings.weight": hf.model.embed_tokens.weight, "norm.weight": hf.model.norm.weight}
    if not c.tie_word_embeddings:
        meta["output.weight"] = hf.lm_head.weight
    for i, layer in enumerate(hf.model.layers):
        for hf_name, meta_name in renames.items():
            weight = layer.get_submodule(hf_name).weight
            if hf_name == "self_attn.q_proj":
                weight = meta_permute(weight, c.num_attention_heads)
            elif hf_name == "self_attn.k_proj":
                weight = meta_permute(weight, c.num_key_value_heads)
            meta[f"layers.{i}.{meta_name}.weight"] = weight.detach().clone()
    out.mkdir()
    torch.save(meta, out / "consolidated.00.pth")
    params = {
        "dim": c.hidden_size,
        "n_layers": c.num_hidden_layers,
        "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads,
        "multiple_of": 16,
        "norm_eps": c.rms_norm_eps,
        "rope_theta": 500.0,
        "vocab_size": -1,
    }
    (out / "params.json").write_text(json.dumps(params))


def test_meta_pth_matches_transformers(tmp_path):
    hf = tiny_hf(n_kv_head=2)
    save_meta(hf, tmp_path / "meta")

    model = load_model(tmp_path / "meta")

    assert model.config.vocab_size == 101 and model.config.intermediate_size == 64
    assert (our_logits(model, IDX) - hf_logits(hf, IDX)).abs().max() <= 1e-5


def test_multi_shard_meta_is_refused(tmp_path):
    save_meta(tiny_hf(), tmp_path / "meta")
    (tmp_path / "meta" / "consolidated.01.pth").write_bytes(b"")

    with pytest.raises(CheckpointError, match=r"meta: 2 consolidated\.\*\.pth shards; multi-shard Meta"):
        load_state_dict(tmp_path / "meta")


# ------------------------------------------------------------------------------------- GGUF


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows for its interleaved RoPE."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
Q = gguf.GGMLQuantizationType


def write_gguf(hf: LlamaForCausalLM, path: Path, qtype: Q = Q.F32, arch: str = "llama") -> None:
    """A tiny GGUF as llama.cpp's converter writes it: permuted q/k, matrices in qtype, norms in F32."""
    c = hf.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(500.0)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_token_list([f"t{i}" for i in range(c.vocab_size)])  # no vocab_size key: from the token list
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, tensor in hf.state_dict().items():
        array = tensor.numpy()
        parts = name.split(".")
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            if c.tie_word_embeddings:
                continue
            gguf_name = "output.weight"
        else:
            module = ".".join(parts[3:-1])
            gguf_name = f"blk.{parts[2]}.{GGUF_NAMES[module]}.weight"
            if module == "self_attn.q_proj":
                array = llama_cpp_permute(array, c.num_attention_heads)
            elif module == "self_attn.k_proj":
                array = llama_cpp_permute(array, c.num_key_value_heads)
        if array.ndim == 1 or qtype == Q.F32:
            writer.add_tensor(gguf_name, array.astype(np.float32))
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def through(array: np.ndarray, qtype: Q) -> torch.Tensor:
    """What a weight becomes after a round trip through qtype."""
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype).astype(np.float32))


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0])
def test_gguf_matches_original_weights(tmp_path, qtype):
    hf = tiny_hf(n_kv_head=2, tied=qtype != Q.F32)
    write_gguf(hf, tmp_path / "tiny.gguf", qtype)

    config, state = read_gguf(tmp_path / "tiny.gguf")

    assert (config.n_head, config.n_kv_head, config.vocab_size) == (4, 2, 101)
    assert config.tie_embeddings == (qtype != Q.F32) and config.norm_eps == 1e-6
    assert config.extra["bos_token_id"] == 1 and config.extra["eos_token_id"] == 2
    expected = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    if config.tie_embeddings:
        del expected["lm_head.weight"]
    assert set(state) == set(expected)
    for name, tensor in expected.items():
        want = tensor if tensor.ndim == 1 or qtype == Q.F32 else through(tensor.numpy(), qtype)
        torch.testing.assert_close(state[name], want, rtol=0, atol=0, msg=name)
    if qtype == Q.F32:
        assert (our_logits(load_model(tmp_path / "tiny.gguf"), IDX) - hf_logits(hf, IDX)).abs().max() <= 1e-5


@pytest.mark.slow
def test_default_gguf_matches_transformers(default_gguf):
    config, state = read_gguf(default_gguf)
    assert (config.n_layer, config.n_embd, config.n_head, config.n_kv_head) == (30, 576, 9, 3)
    assert config.vocab_size == 49152 and config.tie_embeddings and config.rope_theta == 100000.0
    model = load_model(default_gguf)
    hf = AutoModelForCausalLM.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name, dtype=torch.float32)
    idx = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))

    assert (our_logits(model, idx) - hf_logits(hf.eval(), idx)).abs().max() <= 1e-3


# ------------------------------------------------------------------------------------- llama2.c


def test_llama2c_tinyllamas_tells_its_story():
    from lorafit.tokenizer import Tokenizer

    model = load_model(shared_file("models/stories260K.bin"))
    tokenizer = Tokenizer.from_checkpoint(shared_file("models/tok512.model"))
    idx = torch.tensor([tokenizer.encode("Once upon a time")])
    with torch.no_grad():
        for _ in range(30):
            idx = torch.cat([idx, model(idx)[:, -1:].argmax(-1)], dim=1)

    text = tokenizer.decode(idx[0].tolist(), skip_special_tokens=True)
    assert text.startswith(
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
    ), text


# ------------------------------------------------------------------------------------- errors


def _saved_tiny(path: Path, **kwargs) -> Path:
    tiny_hf(**kwargs).save_pretrained(path)
    return path


def test_directory_without_weights(tmp_path):
    with pytest.raises(CheckpointError, match=r"no config\.json \(Hugging Face\) or params\.json \(Meta\) found"):
        load_config(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_state_dict(tmp_path)
    assert str(err.value) == (
        f"{tmp_path}: no weights found; looked for model.safetensors.index.json, model.safetensors, "
        "pytorch_model.bin.index.json, pytorch_model.bin, consolidated.00.pth + params.json"
    )


def test_missing_tensor_is_named(tmp_path):
    path = _saved_tiny(tmp_path / "ckpt")
    state = load_file(path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})

    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert str(err.value) == f"{path}: missing tensor 'layers.1.mlp.up_proj.weight' (expected shape [64, 32])"


def test_shape_mismatch_names_both_shapes(tmp_path):
    path = _saved_tiny(tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 48
    (path / "config.json").write_text(json.dumps(config))

    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert str(err.value) == f"{path}: tensor 'layers.0.mlp.gate_proj.weight' has shape [64, 32], expected [48, 32]"


def test_unexpected_tensors(tmp_path):
    path = _saved_tiny(tmp_path / "ckpt")
    state = load_file(path / "model.safetensors")
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # old transformers wrote these
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    load_model(path)

    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 unexpected tensor\(s\) .*'layers\.0\.self_attn\.q_norm\.weight'"):
        load_model(path)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))

    with pytest.raises(CheckpointError, match=r"config\.json: .*unsupported architecture \['GPT2LMHeadModel'\]"):
        load_model(tmp_path)


def test_unsupported_gguf_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    write_gguf(tiny_hf(), path, arch="gpt2")

    with pytest.raises(CheckpointError) as err:
        read_gguf(path)
    assert str(err.value) == f"{path}: GGUF architecture 'gpt2' is not supported; lorafit reads 'llama'"


def test_unsupported_gguf_tensor_type(tmp_path):
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in dict(block_count=1, embedding_length=32, feed_forward_length=64, head_count=4).items():
        getattr(writer, f"add_{key}")(value)
    writer.add_vocab_size(8)
    # Q8_1 is llama.cpp's internal activation format; the gguf package cannot dequantise it.
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    writer.add_tensor("token_embd.weight", np.zeros((8, 32 // block_size * type_size), np.uint8), raw_dtype=Q.Q8_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    with pytest.raises(CheckpointError) as err:
        read_gguf(path)
    assert str(err.value) == f"{path}: tensor 'token_embd.weight' has GGUF type Q8_1, which cannot be dequantised"


@pytest.mark.skipif(sys.platform != "linux", reason="Linux's madvise and /proc/self")
def test_a_cast_while_loading_lets_the_checkpoints_pages_go(tmp_path: Path) -> None:
    """Loading float32 weights as bf16 reads the memory-mapped file; its pages must not stay resident beside the
    copies until the file is closed (the default model's bf16 load peaked at 1080 MiB with them, 770 without)."""
    config = dataclasses.replace(tiny_config(), n_embd=256, intermediate_size=512, vocab_size=8192)
    torch.manual_seed(0)
    model = LLaMA(config)
    save_hf_model(model.state_dict(), config, tmp_path / "ckpt")
    file_kib = (tmp_path / "ckpt" / "model.safetensors").stat().st_size // 1024
    resident = []  # RssFile each time the loader takes the next tensor, all earlier ones cast by then

    def observe(name: str, tensor: torch.Tensor) -> None:
        resident.append(rss_file_kib())

    loaded = load_model(tmp_path / "ckpt", dtype=torch.bfloat16, make_linear=observe)
    # From the first tensor on (loading's own first imports map files too): without the drop, most of the file.
    assert max(resident) - resident[0] < file_kib / 4
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.to(torch.bfloat16)), name
