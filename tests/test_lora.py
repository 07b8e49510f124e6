"""LoRA: exactness at init, merge, freezing, PEFT interop both ways, training, and error messages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lorafit.config import Config
from lorafit.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_peft_adapter,
    lora_modules,
    lora_state_dict,
    merge_lora,
    parse_targets,
    save_peft_adapter,
)
from lorafit.model import LLaMA

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 64
ALL_HF = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_hf(tie: bool = True, seed: int = 0) -> transformers.LlamaForCausalLM:
    """A tiny random LlamaForCausalLM with grouped-query attention, in eval mode."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(config).eval()


def to_lorafit(hf: nn.Module) -> LLaMA:
    """The same weights in lorafit's LLaMA (names are HF's without the leading "model.")."""
    model = LLaMA(Config.from_hf(hf.config.to_dict()))
    model.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()})
    model.tie_weights()
    return model.eval()


def randomize_lora_B(model: nn.Module, seed: int = 1) -> None:
    """Make every LoRA update non-zero (B starts at zero), in lorafit or PEFT models alike."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


@pytest.fixture
def idx() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def logits(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    out = model(idx)
    return out if isinstance(out, torch.Tensor) else out.logits


# ---- the layer and the model ---------------------------------------------------------------------


def test_zero_B_gives_base_logits_bitwise(idx):
    model = to_lorafit(tiny_hf())
    base = logits(model, idx)
    apply_lora(model, LoRAConfig(r=4, targets="all", dropout=0.1))
    model.eval()
    assert torch.equal(logits(model, idx), base)


def test_merge_equals_unmerged_and_unmerge_restores_weights(idx):
    model = to_lorafit(tiny_hf())
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets="all"))
    randomize_lora_B(model)
    model.eval()
    before = {name: m.weight.clone() for name, m in lora_modules(model)}
    unmerged = logits(model, idx)
    for _, module in lora_modules(model):
        module.merge()
    assert all(m.merged for _, m in lora_modules(model))
    torch.testing.assert_close(logits(model, idx), unmerged, atol=1e-5, rtol=0)
    for name, module in lora_modules(model):
        module.unmerge()
        torch.testing.assert_close(module.weight, before[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, idx), unmerged, atol=1e-6, rtol=0)


def test_merge_lora_gives_an_ordinary_llama(idx):
    hf = tiny_hf()
    model = to_lorafit(hf)
    apply_lora(model, LoRAConfig(r=4, targets="q,v,down"))
    randomize_lora_B(model)
    model.eval()
    expected = logits(model, idx)
    merge_lora(model)
    assert not list(lora_modules(model))
    assert type(model.layers[0].self_attn.q_proj) is nn.Linear
    assert model.lm_head.weight is model.embed_tokens.weight
    torch.testing.assert_close(logits(model, idx), expected, atol=1e-5, rtol=0)
    # Its state dict loads strictly into a plain LLaMA and gives the same logits.
    plain = LLaMA(model.config).eval()
    plain.load_state_dict(model.state_dict())
    plain.tie_weights()
    torch.testing.assert_close(logits(plain, idx), expected, atol=1e-5, rtol=0)


def test_only_lora_parameters_train():
    model = to_lorafit(tiny_hf())
    n = apply_lora(model, LoRAConfig(r=4, targets=("q", "v")))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert len(trainable) == 2 * 2 * 2  # layers x (q, v) x (A, B)
    # q: 4 x 32 + 32 x 4; v (2 KV heads of 8): 4 x 32 + 16 x 4
    assert n == 2 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))
    assert model.layers[0].self_attn.q_proj.weight.requires_grad is False


def test_trainable_count_llama2_7b_on_meta():
    with torch.device("meta"):
        model = LLaMA(Config.from_name("Llama-2-7B"))
    assert apply_lora(model, LoRAConfig(r=8, targets=("q", "v"))) == 4_194_304
    q = model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and q.weight.is_meta and q.lora_A.weight.is_meta
    assert "layers.0.self_attn.q_proj.weight" in model.state_dict()


def test_lora_training_lowers_the_loss():
    torch.manual_seed(0)
    model = to_lorafit(tiny_hf())
    apply_lora(model, LoRAConfig(r=8, alpha=16, dropout=0.0, targets="all"))
    model.train()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    batch = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(3))
    x, y = batch[:, :-1], batch[:, 1:]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # The random base starts near uniform (ln 64 = 4.16) and learns slowly through its small weights.
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())


# ---- state dicts and the PEFT format --------------------------------------------------------------


def test_lora_state_dict_and_saved_adapter_hold_only_lora(tmp_path):
    model = to_lorafit(tiny_hf())
    config = LoRAConfig(r=4, alpha=16, dropout=0.05, targets="q,v")
    apply_lora(model, config)
    state = lora_state_dict(model)
    assert sorted(state) == sorted(
        f"layers.{i}.self_attn.{m}_proj.{ab}.weight" for i in range(2) for m in "qv" for ab in ("lora_A", "lora_B")
    )
    save_peft_adapter(model, config, tmp_path, "tiny/llama")
    assert sorted(p.name for p in tmp_path.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    saved = load_file(tmp_path / ADAPTER_WEIGHTS)
    assert sorted(saved) == sorted(f"base_model.model.model.{k}" for k in state)
    meta = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert meta["peft_type"] == "LORA" and meta["task_type"] == "CAUSAL_LM"
    assert (meta["r"], meta["lora_alpha"], meta["lora_dropout"]) == (4, 16, 0.05)
    assert meta["target_modules"] == ["q_proj", "v_proj"]
    assert meta["use_rslora"] is False and meta["bias"] == "none" and meta["fan_in_fan_out"] is False
    assert meta["base_model_name_or_path"] == "tiny/llama" and meta["inference_mode"] is True


@pytest.mark.parametrize(
    "targets, tie, rslora",
    [("q,v", True, False), ("all", True, False), ("all,lm_head", False, False), ("q,k,down", True, True)],
)
def test_lorafit_adapter_loads_in_peft(tmp_path, idx, targets, tie, rslora):
    hf = tiny_hf(tie=tie)
    model = to_lorafit(hf)
    config = LoRAConfig(r=4, alpha=8, targets=targets, rslora=rslora)
    apply_lora(model, config)
    randomize_lora_B(model)
    model.eval()
    save_peft_adapter(model, config, tmp_path, "tiny")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    if "lm_head" in targets:
        assert isinstance(peft_model.base_model.model.lm_head, peft.tuners.lora.LoraLayer)
    torch.testing.assert_close(logits(peft_model, idx), logits(model, idx), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "target_modules, tie, rslora, expected_targets",
    [
        (["q_proj", "v_proj"], True, False, ("q", "v")),
        ("all-linear", True, False, ("q", "k", "v", "o", "gate", "up", "down")),
        (ALL_HF, True, True, ("q", "k", "v", "o", "gate", "up", "down")),
        (["self_attn.o_proj", "lm_head"], False, False, ("o", "lm_head")),
    ],
)
def test_peft_adapter_loads_in_lorafit(tmp_path, idx, target_modules, tie, rslora, expected_targets):
    hf = tiny_hf(tie=tie)
    model = to_lorafit(hf)  # before PEFT wraps hf in place
    peft_config = peft.LoraConfig(
        r=4, lora_alpha=12, lora_dropout=0.1, target_modules=target_modules, use_rslora=rslora, task_type="CAUSAL_LM"
    )
    peft_model = peft.get_peft_model(hf, peft_config)
    randomize_lora_B(peft_model)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path)
    config = load_peft_adapter(model, tmp_path)
    assert config == LoRAConfig(r=4, alpha=12, dropout=0.1, targets=expected_targets, rslora=rslora)
    model.eval()
    torch.testing.assert_close(logits(model, idx), logits(peft_model, idx), atol=1e-5, rtol=0)


def test_peft_adapter_loads_into_a_model_built_on_meta(tmp_path, idx):
    hf = tiny_hf()
    base = to_lorafit(hf)
    config = LoRAConfig(r=4, targets="all")
    apply_lora(base, config)
    randomize_lora_B(base)
    save_peft_adapter(base, config, tmp_path, "tiny")
    with torch.device("meta"):
        model = LLaMA(base.config)
    load_peft_adapter(model, tmp_path)
    model.load_state_dict({k: v for k, v in base.state_dict().items() if "lora_" not in k}, strict=False, assign=True)
    model.tie_weights()
    model.eval()
    base.eval()
    assert torch.equal(logits(model, idx), logits(base, idx))


# ---- errors ------------------------------------------------------------------------------------


def test_unknown_target_is_named():
    message = (
        "unknown LoRA target(s) 'qkv', 'mlp'; known: q, k, v, o, gate, up, down, lm_head, all (or PEFT's module "
        "names q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head, all-linear)"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        LoRAConfig(targets=("q", "qkv", "mlp"))
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_targets("q,qkv,mlp")
    assert parse_targets("v, q") == ("q", "v")


def test_lm_head_on_tied_embeddings_is_refused():
    model = to_lorafit(tiny_hf(tie=True))
    with pytest.raises(ValueError, match=r"LoRA target 'lm_head' is not supported on a model with tied embeddings"):
        apply_lora(model, LoRAConfig(targets="q,lm_head"))
    assert not list(lora_modules(model))


def test_applying_lora_twice_is_refused():
    model = to_lorafit(tiny_hf())
    apply_lora(model, LoRAConfig())
    with pytest.raises(ValueError, match="the model already has LoRA layers"):
        apply_lora(model, LoRAConfig())


def _saved_adapter(path: Path) -> Path:
    model = to_lorafit(tiny_hf())
    config = LoRAConfig(r=4, targets="q,v")
    apply_lora(model, config)
    save_peft_adapter(model, config, path, "tiny")
    return path


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("bias", "lora_only", "bias='lora_only' is not supported (only 'none')"),
        ("modules_to_save", ["lm_head"], "modules_to_save=['lm_head'] is not supported"),
        ("layers_to_transform", [0], "layers_to_transform=[0] is not supported"),
        ("layers_pattern", "layers", "layers_pattern='layers' is not supported"),
        ("rank_pattern", {"q_proj": 2}, "rank_pattern={'q_proj': 2} is not supported"),
        ("alpha_pattern", {"q_proj": 2}, "alpha_pattern={'q_proj': 2} is not supported"),
        ("peft_type", "IA3", "peft_type='IA3' is not supported (only 'LORA')"),
        ("init_lora_weights", "pissa", "init_lora_weights='pissa' changes the base weights; not supported"),
        ("target_modules", ".*q_proj", "target_modules='.*q_proj' is not supported"),
        ("target_modules", ["q_proj", "c_attn"], "target_modules ['c_attn'] cannot be mapped"),
    ],
)
def test_unsupported_adapter_config_fields_are_named(tmp_path, field, value, message):
    adapter = _saved_adapter(tmp_path / "adapter")
    config_path = adapter / ADAPTER_CONFIG
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), field: value}))
    model = to_lorafit(tiny_hf())
    with pytest.raises(ValueError, match=re.escape(f"{config_path}: {message}")):
        load_peft_adapter(model, adapter)
    assert not list(lora_modules(model))


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: {**t, Q_A: torch.zeros(3, 32)}, f"tensor {Q_A} has shape (3, 32), the model expects (4, 32)"),
        (lambda t: {k: v for k, v in t.items() if k != Q_A}, f"missing LoRA tensor(s) {Q_A}"),
        (
            lambda t: {**t, "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 32)},
            "unexpected tensor(s) base_model.model.model.layers.0.mlp.up_proj.lora_A.weight",
        ),
    ],
    ids=["shape", "missing", "extra"],
)
def test_adapter_tensor_mismatches_are_named(tmp_path, edit, message):
    adapter = _saved_adapter(tmp_path / "adapter")
    weights_path = adapter / ADAPTER_WEIGHTS
    save_file(edit(load_file(weights_path)), weights_path)
    model = to_lorafit(tiny_hf())
    with pytest.raises(ValueError, match=re.escape(f"{weights_path}: {message}")):
        load_peft_adapter(model, adapter)
    assert not list(lora_modules(model))


def test_missing_adapter_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / ADAPTER_CONFIG} not found")):
        load_peft_adapter(to_lorafit(tiny_hf()), tmp_path)


@pytest.mark.parametrize(
    "spelling, expected",
    [
        ("q_proj,v_proj", ("q", "v")),
        ("all-linear", ("q", "k", "v", "o", "gate", "up", "down")),
        ("self_attn.q_proj, mlp.down_proj", ("q", "down")),
        (["model.layers.0.self_attn.k_proj", "lm_head"], ("k", "lm_head")),
        ("all,lm_head", ("q", "k", "v", "o", "gate", "up", "down", "lm_head")),
        ("v,q_proj", ("q", "v")),
    ],
)
def test_targets_in_peft_spellings(spelling, expected):
    assert parse_targets(spelling) == expected
    assert LoRAConfig(targets=spelling).targets == expected


def test_peft_suffix_with_an_unknown_module_is_named():
    with pytest.raises(ValueError, match=re.escape("unknown LoRA target(s) 'self_attn.qkv_proj'")):
        parse_targets("self_attn.qkv_proj")
    with pytest.raises(ValueError, match="no LoRA targets given"):
        parse_targets(" , ")
