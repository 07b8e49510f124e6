"""DoRA: parity with PEFT's use_dora (forward, gradients, merge), the adapter format both ways, the fused loss."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lorafit.checkpoint import load_model
from lorafit.data import IGNORE_INDEX
from lorafit.lora import (
    ADAPTER_CONFIG,
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_peft_adapter,
    lora_modules,
    lora_state_dict,
    merge_lora,
    save_peft_adapter,
)
from lorafit.train import supervised_loss_sum

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ALL = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")  # tiny_checkpoint has an untied head


@pytest.fixture
def idx() -> torch.Tensor:
    return torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(7))


def hf_model(path) -> nn.Module:
    return transformers.LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def randomize(model: nn.Module, seed: int = 1) -> None:
    """Non-zero B (it starts at zero) and magnitudes away from the row norms, in lorafit or PEFT models alike."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.rand(param.shape, generator=gen))


def lorafit_name(peft_name: str) -> str:
    """PEFT's live parameter name -> lorafit's."""
    name = peft_name.removeprefix("base_model.model.").removeprefix("model.").replace(".default", "")
    return name.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


def logits(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    out = model(idx)
    return out if isinstance(out, torch.Tensor) else out.logits


def peft_dora(path, dropout: float = 0.0) -> nn.Module:
    """PEFT's DoRA on every linear layer of the tiny model, its untied LM head included."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets, use_dora=True)
    return peft.get_peft_model(hf_model(path), config)


def test_magnitude_starts_at_peft_row_norms_and_output_at_base(tiny_checkpoint, idx):
    model = load_model(tiny_checkpoint)
    base = logits(model, idx)
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets=ALL, dora=True))
    model.eval()
    torch.testing.assert_close(logits(model, idx), base, atol=1e-5, rtol=0)
    theirs = {lorafit_name(n): p for n, p in peft_dora(tiny_checkpoint).named_parameters() if "magnitude" in n}
    ours = {k: v for k, v in lora_state_dict(model).items() if "magnitude" in k}
    assert sorted(ours) == sorted(theirs) and len(ours) == 2 * 7 + 1
    for name, magnitude in ours.items():
        torch.testing.assert_close(magnitude, theirs[name], atol=1e-6, rtol=1e-6)


def test_peft_dora_adapter_loads_in_lorafit_with_identical_outputs(tmp_path, tiny_checkpoint, idx):
    theirs = peft_dora(tiny_checkpoint)
    randomize(theirs)
    theirs.eval().save_pretrained(tmp_path)
    model = load_model(tiny_checkpoint)
    config = load_peft_adapter(model, tmp_path)
    assert config.dora and config.targets == ALL
    model.eval()
    torch.testing.assert_close(logits(model, idx), logits(theirs, idx), atol=1e-5, rtol=0)


def test_lorafit_dora_adapter_loads_in_peft_with_identical_outputs(tmp_path, tiny_checkpoint, idx):
    model = load_model(tiny_checkpoint)
    config = LoRAConfig(r=4, alpha=8, targets="all,lm_head", dora=True)
    apply_lora(model, config)
    randomize(model)
    model.eval()
    save_peft_adapter(model, config, tmp_path, str(tiny_checkpoint))
    assert json.loads((tmp_path / ADAPTER_CONFIG).read_text())["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(hf_model(tiny_checkpoint), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, idx), logits(model, idx), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_training_forward_and_gradients_equal_peft(tiny_checkpoint, idx, dropout):
    theirs = peft_dora(tiny_checkpoint, dropout)
    randomize(theirs)
    model = load_model(tiny_checkpoint)
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=dropout, targets=ALL, dora=True))
    ours = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:
                ours[lorafit_name(name)].copy_(param)
    results = []
    for m in (theirs, model):
        m.train()
        torch.manual_seed(3)  # the same dropout masks: both draw one per layer, in the same order
        out = logits(m, idx)
        F.cross_entropy(out[:, :-1].flatten(0, 1), idx[:, 1:].flatten()).backward()
        results.append(out.detach())
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=0)
    grads = {lorafit_name(n): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert sorted(grads) == sorted(n for n, p in ours.items() if p.requires_grad)
    for name, grad in grads.items():
        torch.testing.assert_close(ours[name].grad, grad, atol=1e-5, rtol=1e-4, msg=name)


def test_merge_equals_peft_merge_and_unload(tiny_checkpoint, idx):
    theirs = peft_dora(tiny_checkpoint)
    randomize(theirs)
    model = load_model(tiny_checkpoint)
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets=ALL, dora=True))
    ours = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:
                ours[lorafit_name(name)].copy_(param)
    model.eval()
    unmerged = logits(model, idx)
    merged_peft = theirs.merge_and_unload().eval()
    merge_lora(model)
    assert not list(lora_modules(model)) and type(model.lm_head) is nn.Linear
    expected = {k.removeprefix("model."): v for k, v in merged_peft.state_dict().items()}
    for name, weight in model.state_dict().items():
        torch.testing.assert_close(weight, expected[name], atol=1e-6, rtol=1e-6, msg=name)
    torch.testing.assert_close(logits(model, idx), unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(model, idx), logits(merged_peft, idx), atol=1e-5, rtol=0)


def test_merge_then_unmerge_restores_the_layer():
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(nn.Linear(24, 16, bias=True), r=4, scaling=2.0, dora=True)
    randomize(layer)
    x = torch.randn(3, 24)
    weight, unmerged = layer.weight.clone(), layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, atol=1e-6, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-6, rtol=0)


def test_dora_backward_passes_gradcheck():
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(nn.Linear(6, 5, bias=True).double(), r=2, scaling=1.5, dora=True)
    randomize(layer)
    layer.double()
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    params = (layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector)

    def f(x, A, B, m):
        # The norm is a constant in DoRA's gradient, so gradcheck compares against that definition.
        with torch.no_grad():
            norm = torch.linalg.norm(layer.weight + layer.scaling * B @ A, dim=1)
        weight = (m / norm)[:, None] * (layer.weight + layer.scaling * B @ A)
        return F.linear(x, weight, layer.bias)

    torch.testing.assert_close(layer(x), f(x, *params))
    out_grad = torch.randn(2, 3, 5, dtype=torch.float64)
    ours = torch.autograd.grad(layer(x), (x, *params), out_grad)
    reference = torch.autograd.grad(f(x, *params), (x, *params), out_grad)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b)


def test_dora_head_with_the_loss_at_labels_only(tiny_checkpoint):
    """The training loss runs the LM head only where labels are, in checkpointed chunks: DoRA there trains too."""
    torch.manual_seed(0)
    model = load_model(tiny_checkpoint)
    apply_lora(model, LoRAConfig(r=8, alpha=16, dropout=0.05, targets=ALL, dora=True))
    ids = torch.randint(3, 512, (4, 24), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[:, :10] = IGNORE_INDEX
    model.eval()
    with torch.no_grad():
        full = logits(model, ids)[:, :-1]
        keep = labels[:, 1:] != IGNORE_INDEX
        expected = F.cross_entropy(full[keep], labels[:, 1:][keep], reduction="sum")
        torch.testing.assert_close(
            supervised_loss_sum(model, ids, labels, fused_head=False), expected, atol=1e-4, rtol=1e-5
        )
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(15):
        loss = supervised_loss_sum(model, ids, labels, fused_head=False) / keep.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert model.lm_head.lora_magnitude_vector.grad is not None


def test_dora_with_dropout_saves_a_boolean_mask_not_float_copies():
    """Autograd keeps what _DoRAUpdate saves: x (shared with the base matmul), a bool mask, A h and W h + s B A h."""
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(nn.Linear(64, 48), r=4, scaling=2.0, dropout=0.1, dora=True).train()
    x = torch.randn(8, 64, requires_grad=True)
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    activations = [t for t in saved if t.shape[:1] == (8,)]  # per-token tensors, not weights or magnitudes
    distinct = {t.untyped_storage().data_ptr(): t for t in activations}.values()
    assert sorted((tuple(t.shape), str(t.dtype)) for t in distinct) == [
        ((8, 4), "torch.float32"),
        ((8, 48), "torch.float32"),
        ((8, 64), "torch.bool"),
        ((8, 64), "torch.float32"),
    ]
    assert all(
        t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
        for t in activations
        if t.shape == x.shape and t.dtype == x.dtype
    )


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_dora_under_bf16_autocast_matches_float32(dropout):
    """Mixed precision: the forward runs in bf16 under autocast, backward in the (float32) DoRA weights' dtype."""
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(nn.Linear(64, 48), r=4, scaling=2.0, dropout=dropout, dora=True).train()
    randomize(layer)
    x = torch.randn(5, 64)
    results = []
    for autocast in (False, True):
        layer.zero_grad()
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = layer(x)
        out.float().square().sum().backward()
        results.append((out.float(), [p.grad.clone() for p in (layer.lora_A.weight, layer.lora_magnitude_vector)]))
    (ref, ref_grads), (out, grads) = results
    assert out.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    torch.testing.assert_close(out, ref, atol=0.05, rtol=0.02)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, atol=0.05 * ref_grad.abs().max().item(), rtol=0.05)
