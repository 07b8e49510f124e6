"""QLoRA's quantised base: NF4 codes and values vs bitsandbytes and the paper, error bounds, bytes, loading
layer by layer, LoRA and DoRA over it (training, merge, PEFT format), and the error messages."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lorafit.checkpoint import load_model
from lorafit.config import Config
from lorafit.data import IGNORE_INDEX
from lorafit.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_peft_adapter,
    lora_modules,
    merge_lora,
    save_peft_adapter,
)
from lorafit.model import LLaMA
from lorafit.quant import (
    BLOCK_SIZE,
    SCALE_BLOCK_SIZE,
    QuantizationError,
    QuantizedLinear,
    check_not_quantized_gguf,
    check_scheme,
    dequantize_model,
    load_quantized,
    quantize_lm_head,
    quantize_model,
    quantized_linears,
    stored_bytes,
)
from lorafit.train import supervised_loss_sum

bnb_functional = pytest.importorskip("bitsandbytes.functional")

# The 16 NF4 levels as printed in the QLoRA paper (Dettmers et al., 2023, appendix E), to 4 decimals.
NF4_PAPER = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0]
NF4_PAPER += [0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]
# Round to nearest level: the worst case is half the widest gap (between -1 and -0.6962), times the block's absmax.
NF4_MAX_ERROR = (1.0 - 0.6962) / 2 + 1e-4
# Shapes with an input width that is not a multiple of 64 too (the tiny model's 32).
SHAPES = [(48, 32), (96, 64), (64, 160)]


def weight(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def unpack_nf4(layer: QuantizedLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4-bit codes (high nibble first, row-major) and each code's block absmax, decoded independently."""
    packed = layer.qweight.flatten()
    codes = torch.stack(((packed >> 4) & 15, packed & 15), dim=1).flatten().long()
    absmax = layer.absmax.float()
    if layer.scheme == "nf4-dq":
        # Double quantisation: 8-bit codes into bitsandbytes' dynamic map, one scale per 256 constants, plus a mean.
        blocks = torch.arange(len(absmax)) // SCALE_BLOCK_SIZE
        absmax = layer.code2[layer.absmax.long()] * layer.absmax2[blocks] + layer.offset
    return codes, absmax.repeat_interleave(BLOCK_SIZE)[: codes.numel()]


@pytest.mark.parametrize("scheme", ["nf4", "nf4-dq"])
@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_codes_and_values_equal_bitsandbytes_and_the_paper(scheme, shape):
    w = weight(shape)
    layer = QuantizedLinear.from_weight(w, scheme)
    q, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=scheme == "nf4-dq")
    assert torch.equal(layer.qweight, q) and torch.equal(layer.absmax, state.absmax)
    torch.testing.assert_close(layer.code, torch.tensor(NF4_PAPER), atol=5e-5, rtol=0)
    codes, absmax = unpack_nf4(layer)
    values = (layer.code[codes] * absmax).reshape(shape)
    torch.testing.assert_close(layer.dequantize(), values, atol=1e-8, rtol=1e-6)
    # bitsandbytes' own dequantisation, of the same weights quantised flat: 0.50's CPU kernel gets an (out, in)
    # shape wrong when `in` is not a multiple of 64 (48 x 32 here), and the flat codes are the same.
    q_flat, state_flat = bnb_functional.quantize_4bit(
        w.flatten(), blocksize=64, quant_type="nf4", compress_statistics=scheme == "nf4-dq"
    )
    assert torch.equal(q_flat, q)
    reference = bnb_functional.dequantize_4bit(q_flat, state_flat).reshape(shape)
    torch.testing.assert_close(layer.dequantize(), reference, atol=0, rtol=0)
    # Each weight got the NF4 level nearest to it over its block's absmax (first-level absmax, before any DQ).
    true_absmax = w.flatten().reshape(-1, BLOCK_SIZE).abs().amax(1).repeat_interleave(BLOCK_SIZE)
    scaled = w.flatten() / true_absmax
    chosen = (scaled - layer.code[codes]).abs()
    nearest = (scaled[:, None] - layer.code[None, :]).abs().amin(1)
    assert torch.all(chosen <= nearest + 1e-6)


@pytest.mark.parametrize("scheme", ["nf4", "nf4-dq"])
@pytest.mark.parametrize("shape", [*SHAPES, (7, 9), (3, 64 * 257)])
def test_nf4_weight_in_plain_pytorch_equals_bitsandbytes_dequantization(scheme, shape):
    """The form torch.compile traces: an odd count of codes (a padded last byte), a part block, more than 256 blocks."""
    layer = QuantizedLinear.from_weight(weight(shape), scheme)
    assert torch.equal(layer.nf4_weight(), layer.dequantize(torch.float32))


@pytest.mark.parametrize("scheme", ["nf4", "nf4-dq", "int8"])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantized_linear_is_within_the_schemes_error_bound(scheme, shape):
    """|W - Ŵ| <= 0.1519 a per weight (a: its block's absmax; with DQ + |a - â|), int8 <= scale / 2 per row;
    so each output is within sum_j |x_j| bound_ij of float32's."""
    w = weight(shape)
    layer = QuantizedLinear.from_weight(w, scheme)
    if scheme == "int8":
        bound = (layer.scale / 2)[:, None].expand(shape) * (1 + 1e-5)
    else:
        a = w.flatten().reshape(-1, BLOCK_SIZE).abs().amax(1).repeat_interleave(BLOCK_SIZE)
        a_hat = unpack_nf4(layer)[1]
        bound = (NF4_MAX_ERROR * a + (a - a_hat).abs()).reshape(shape)
    error = (layer.dequantize() - w).abs()
    assert torch.all(error <= bound)
    assert error.max() > 0.3 * bound.max()  # the bound is not vacuous
    x = torch.randn(5, shape[1], generator=torch.Generator().manual_seed(1))
    out_error = (layer(x) - F.linear(x, w)).abs()
    if scheme == "int8":  # the CPU kernel rounds the input and the output to bf16 (2^-9 relative each)
        bound = bound + 2**-8 * layer.dequantize().abs()
    assert torch.all(out_error <= x.abs() @ bound.t() + 1e-6)


def test_int8_scales_are_bf16_values_that_cover_each_row():
    """The kernel takes its scales in bf16: each float32 scale is a bf16 value, at least its row's absmax / 127."""
    w = weight((96, 64))
    layer = QuantizedLinear.from_weight(w, "int8")
    assert torch.equal(layer.scale_bf16.float(), layer.scale)
    absmax_scale = w.abs().amax(1) / 127
    assert torch.all(layer.scale >= absmax_scale) and torch.all(layer.scale <= absmax_scale * (1 + 2**-7))
    assert layer.qweight.abs().max() == 127


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [(1, 1), (3, 5)])
def test_int8_linear_is_the_product_with_the_dequantized_weight(monkeypatch, dtype, rows):
    """Inference's int8 paths against x @ dequantised(W).T (bias included): the fused CPU kernel (bf16 rounding of
    its input and output, nothing more), the form the compiled step uses (float tolerance), the autograd path."""
    w = weight((96, 64))
    layer = QuantizedLinear.from_weight(w.to(dtype), "int8", bias=torch.randn(96) * 0.1)
    x = torch.randn(*rows, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    deq = layer.dequantize(torch.float32)
    with torch.no_grad():
        kernel = layer(x)
        reference = x.float() @ deq.t() + layer.bias.float()
        # The kernel's own contract: exactly the float32 product of the bf16-rounded input, rounded to bf16.
        rounded = (x.to(torch.bfloat16).float() @ deq.t()).to(torch.bfloat16).float() + layer.bias.float()
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        compiled_form = layer(x)
        monkeypatch.undo()
    assert kernel.dtype == dtype and kernel.shape == (*rows, 96)
    torch.testing.assert_close(kernel.float(), rounded, atol=1e-6, rtol=2**-8 if dtype == torch.bfloat16 else 1e-6)
    torch.testing.assert_close(kernel.float(), reference, atol=2e-3, rtol=2**-7)
    # In float32 the other paths are float-exact; in bf16 they round like any bf16 product.
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-3, "rtol": 2**-7}
    if rows == (1, 1):  # the reduction form is for one row only
        torch.testing.assert_close(compiled_form.float(), reference, **tolerance)
    grad_path = layer(x.requires_grad_())  # training's: the dequantised weight, in x's dtype
    torch.testing.assert_close(grad_path.float(), reference, **tolerance)


def test_int8_inference_quantizes_the_lm_head_and_keeps_the_tied_embedding(tiny_checkpoint):
    from lorafit.generate import LLM

    llm = LLM.load(tiny_checkpoint, quantize="int8", device="cpu")
    assert isinstance(llm.model.lm_head, QuantizedLinear) and llm.model.lm_head.scheme == "int8"
    assert len(quantized_linears(llm.model)) == 2 * 7 + 1
    model = LLaMA(Config.from_name("SmolLM2-135M", n_layer=1))  # tied
    embedding = model.embed_tokens.weight.detach().clone()
    quantize_model(model, "int8")
    quantize_lm_head(model)
    assert torch.equal(model.embed_tokens.weight, embedding) and model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(model.lm_head.dequantize(), QuantizedLinear.from_weight(embedding, "int8").dequantize())


@pytest.mark.parametrize("scheme, ratio", [("nf4", 0.15), ("nf4-dq", 0.15), ("int8", 0.26)])
def test_quantized_layers_of_the_default_geometry_hold_few_bytes(scheme, ratio):
    """SmolLM2-135M's block linears (one random block): nf4 0.141x, nf4-dq 0.129x, int8 0.252x their float32 bytes."""
    torch.manual_seed(0)
    model = LLaMA(Config.from_name("SmolLM2-135M", n_layer=1))
    assert quantize_model(model, scheme) == 7
    layers = quantized_linears(model)
    assert len(layers) == 7
    for name, layer in layers:
        assert layer.nbytes <= ratio * layer.in_features * layer.out_features * 4, name
    # What stays unquantised: the (tied) embedding / LM head and the norms.
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.embed_tokens.weight
    assert model.embed_tokens.weight.dtype == torch.float32


@pytest.mark.parametrize("scheme", ["nf4", "nf4-dq", "int8"])
def test_load_quantized_equals_quantizing_the_loaded_model(tiny_checkpoint, scheme):
    quantized = load_quantized(tiny_checkpoint, scheme)
    reference = load_model(tiny_checkpoint)
    quantize_model(reference, scheme)
    assert [n for n, _ in quantized_linears(quantized)] == [n for n, _ in quantized_linears(reference)]
    assert len(quantized_linears(quantized)) == 2 * 7
    ours, theirs = quantized.state_dict(), reference.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert type(quantized.lm_head) is nn.Linear and quantized.lm_head.weight.dtype == torch.float32
    assert not any(t.is_meta for t in ours.values())


def test_load_quantized_keeps_the_requested_dtype(tiny_checkpoint):
    model = load_quantized(tiny_checkpoint, "nf4-dq", dtype=torch.bfloat16)
    layer = model.layers[0].self_attn.q_proj
    assert layer.dtype == torch.bfloat16 and layer.dequantize().dtype == torch.bfloat16
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert model(ids).dtype == torch.bfloat16


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 512, (4, 24), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[:, :8] = IGNORE_INDEX
    return ids, labels


@pytest.mark.parametrize("scheme, dora", [("nf4-dq", False), ("nf4", True), ("int8", False)])
def test_lora_trains_over_a_quantized_base(tiny_checkpoint, scheme, dora):
    torch.manual_seed(0)
    model = load_quantized(tiny_checkpoint, scheme)
    apply_lora(model, LoRAConfig(r=8, alpha=16, dropout=0.05, targets="all,lm_head", dora=dora))
    blocks = [m for n, m in lora_modules(model) if n != "lm_head"]
    assert len(blocks) == 14 and all(isinstance(m.base_layer, QuantizedLinear) and m.weight is None for m in blocks)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    ids, labels = _batch()
    tokens = (labels[:, 1:] != IGNORE_INDEX).sum()
    model.train()
    losses = []
    for _ in range(15):
        loss = supervised_loss_sum(model, ids, labels, fused_head=False) / tokens
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(m.lora_B.weight.abs().sum() > 0 for m in blocks)  # gradients flowed through the quantised layers
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())


def _randomize(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.rand(param.shape, generator=gen))


@pytest.mark.parametrize("dora", [False, True])
def test_merged_qlora_is_the_dequantized_base_plus_the_update(tiny_checkpoint, dora):
    model = load_quantized(tiny_checkpoint, "nf4-dq")
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets="q,v,down", dora=dora))
    _randomize(model)
    model.eval()
    expected = {}
    for name, module in lora_modules(model):
        w = module.base_layer.dequantize() + module.delta_weight()
        if dora:
            w = (module.lora_magnitude_vector / torch.linalg.norm(w, dim=1))[:, None] * w
        expected[f"{name}.weight"] = w
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        unmerged = model(ids)
        merge_lora(model)
        merged = model(ids)
    state = model.state_dict()
    for name, w in expected.items():
        torch.testing.assert_close(state[name], w, atol=1e-7, rtol=1e-6)
        assert state[name].dtype == torch.float32
    assert type(model.layers[0].self_attn.q_proj) is nn.Linear
    assert isinstance(model.layers[0].self_attn.k_proj, QuantizedLinear)  # not targeted: stays quantised
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)


def test_unmerge_over_a_quantized_base_restores_the_quantized_forward():
    layer = LoRALinear.from_linear(QuantizedLinear.from_weight(weight((48, 32)), "nf4"), r=4, scaling=2.0)
    _randomize(layer)
    x = torch.randn(3, 32)
    before = layer(x)
    layer.merge()
    assert layer.weight is not None
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=0)
    layer.unmerge()
    assert layer.weight is None and torch.equal(layer(x), before)


@pytest.mark.parametrize("dora", [False, True])
def test_qlora_adapter_loads_in_peft_on_the_dequantized_base(tmp_path, tiny_checkpoint, dora):
    """The adapter is PEFT's format: PEFT with it, on the same (dequantised) base, computes the same logits."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = load_quantized(tiny_checkpoint, "nf4")
    config = LoRAConfig(r=4, alpha=8, targets="q,v,gate", dora=dora)
    apply_lora(model, config)
    _randomize(model)
    model.eval()
    save_peft_adapter(model, config, tmp_path, str(tiny_checkpoint))
    hf = transformers.LlamaForCausalLM.from_pretrained(tiny_checkpoint, torch_dtype=torch.float32)
    with torch.no_grad():
        for name, layer in quantized_linears(model):
            hf.get_submodule("model." + name.removesuffix(".base_layer")).weight.copy_(layer.dequantize())
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids), atol=1e-5, rtol=0)


# ---- errors ------------------------------------------------------------------------------------


def test_unknown_scheme_is_named():
    with pytest.raises(
        QuantizationError, match=re.escape("unknown quantisation scheme 'nf3'; known: nf4, nf4-dq, int8")
    ):
        check_scheme("nf3")


def test_missing_bitsandbytes_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    message = 'NF4 quantisation needs bitsandbytes>=0.47, which is not installed: pip install "lorafit[quant]"'
    with pytest.raises(QuantizationError, match=re.escape(message)):
        check_scheme("nf4-dq")
    check_scheme("int8")  # plain PyTorch


@pytest.mark.parametrize("scheme", ["nf4", "nf4-dq"])
@pytest.mark.parametrize("shape", [(576, 576), (1536, 576), (192, 576), (10, 100)])
def test_stored_bytes_is_what_a_quantised_layer_holds(scheme, shape):
    layer = QuantizedLinear.from_weight(torch.randn(*shape), scheme)
    assert stored_bytes(shape[0] * shape[1], scheme) == layer.nbytes


def _gguf(path, qtype_name: str):
    gguf = pytest.importorskip("gguf")
    qtype = gguf.GGMLQuantizationType[qtype_name]
    writer = gguf.GGUFWriter(path, "llama")
    data = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    if qtype_name != "F32":
        data = gguf.quants.quantize(data, qtype)
    writer.add_tensor("blk.0.attn_q.weight", data, raw_dtype=qtype if qtype_name != "F32" else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_an_already_quantized_gguf_base_is_refused(tmp_path):
    path = _gguf(tmp_path / "q8.gguf", "Q8_0")
    message = f"{path}: tensor blk.0.attn_q.weight is already quantised (Q8_0); --quantize needs a float base"
    with pytest.raises(QuantizationError, match=re.escape(message)):
        check_not_quantized_gguf(path)
    with pytest.raises(QuantizationError, match=re.escape(message)):
        load_quantized(path, "nf4")
    check_not_quantized_gguf(_gguf(tmp_path / "f32.gguf", "F32"))


def test_quantizing_weights_still_on_meta_is_refused():
    with torch.device("meta"):
        model = LLaMA(Config.from_name("SmolLM2-135M", n_layer=1))
    with pytest.raises(QuantizationError, match="layers.0.self_attn.q_proj: the weight is still on the meta device"):
        quantize_model(model, "nf4")


def test_qlora_adapter_loads_in_peft_on_a_bitsandbytes_4bit_base(tmp_path):
    """transformers' BitsAndBytesConfig quantises to the very same codes; PEFT then runs our adapter on them.

    bitsandbytes' CPU 4-bit matmul is not exact (measured: 1.7e-3 off x W^T on this base, 2.7e-3 on the
    logits; lorafit and PEFT on the same dequantised base agree exactly, above), hence the tolerance.
    """
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,  # bitsandbytes' CPU kernel needs in_features a multiple of 64 (see QuantizedLinear)
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    base = tmp_path / "base"
    transformers.LlamaForCausalLM(hf_config).save_pretrained(base)
    model = load_quantized(base, "nf4-dq")
    config = LoRAConfig(r=4, alpha=8, targets="q,v,down")
    apply_lora(model, config)
    _randomize(model)
    model.eval()
    save_peft_adapter(model, config, tmp_path / "adapter", str(base))
    bnb_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    hf = transformers.LlamaForCausalLM.from_pretrained(base, quantization_config=bnb_config, device_map="cpu")
    theirs_q = hf.model.layers[0].self_attn.k_proj
    ours_q = model.layers[0].self_attn.k_proj
    assert torch.equal(theirs_q.weight.data.flatten(), ours_q.qweight.flatten())
    assert torch.equal(theirs_q.weight.quant_state.absmax, ours_q.absmax)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids), atol=1e-2, rtol=0)
        with theirs.disable_adapter():
            assert (theirs(ids).logits - model(ids)).abs().max() > 0.1  # the adapter matters beyond the tolerance


def test_merged_qlora_dequantizes_to_a_plain_llama(tiny_checkpoint):
    model = load_quantized(tiny_checkpoint, "nf4")
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets="q,v"))
    _randomize(model)
    model.eval()
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids)
    with pytest.raises(QuantizationError, match="the model still has LoRA layers; merge them"):
        dequantize_model(model)
    merge_lora(model)
    assert dequantize_model(model) == 2 * 5  # k, o, gate, up, down were never wrapped
    assert not quantized_linears(model)
    plain = LLaMA(model.config).eval()
    plain.load_state_dict(model.state_dict())  # strict: exactly a Llama's tensors
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dora", [False, True])
def test_qlora_adapter_round_trips_onto_a_fresh_quantized_base(tmp_path, tiny_checkpoint, dora):
    model = load_quantized(tiny_checkpoint, "nf4-dq")
    config = LoRAConfig(r=4, alpha=8, targets="all", dora=dora)
    apply_lora(model, config)
    _randomize(model)
    model.eval()
    save_peft_adapter(model, config, tmp_path, str(tiny_checkpoint))
    again = load_quantized(tiny_checkpoint, "nf4-dq")
    assert load_peft_adapter(again, tmp_path) == config
    again.eval()
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
