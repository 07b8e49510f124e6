"""The memory estimate: exact parameter counts, and the peak against tensor memory measured on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lorafit.config import Config
from lorafit.estimate import count_parameters, estimate_memory, format_estimate
from lorafit.lora import LoRAConfig
from lorafit.methods import get_method
from lorafit.model import LLaMA
from lorafit.train import TrainConfig, autocast, make_optimizer, supervised_loss_sum

SMALL = Config(vocab_size=4096, n_layer=4, n_embd=256, n_head=4, n_kv_head=2, intermediate_size=688)


@pytest.mark.parametrize(
    ("method", "expected"),
    [("lora", 4_194_304), ("adapter", 1_229_760), ("adapter-v2", 4_279_744), ("full", 6_738_415_616)],
)
def test_llama2_7b_trainable_counts(method, expected):
    trainable, total, _ = count_parameters(Config.from_name("Llama-2-7B"), method, LoRAConfig(r=8, targets="q,v"))
    assert trainable == expected
    added = 0 if method == "full" else expected  # LoRA and adapters add their weights beside the frozen base
    assert total == 6_738_415_616 + added


def test_lora_count_matches_a_real_model():
    model = LLaMA(SMALL)
    lora = LoRAConfig(r=4, targets="all")
    get_method("lora").apply(model, lora)
    trainable, total, _ = count_parameters(SMALL, "lora", lora)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in model.parameters())


def _live_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def measured_peak_bytes(model: LLaMA, input_ids: torch.Tensor, labels: torch.Tensor, precision: str) -> int:
    """Peak tensor memory of a steady-state train.py step: live bytes before it plus the profiler's allocation peak.

    The first step creates AdamW's state; the second is profiled, and every CPU allocation and free it
    makes is replayed in time order, so the peak counts temporaries inside kernels too.
    """
    optimizer = make_optimizer(model, TrainConfig(precision=precision))
    device = torch.device("cpu")

    def step() -> None:
        with autocast(precision, device):
            loss = supervised_loss_sum(model, input_ids, labels) / input_ids.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    states = [t for state in optimizer.state.values() for t in state.values() if t.ndim]
    before = _live_bytes([*model.parameters(), *states, *model._rope])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return before + peak


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_estimate_within_25_percent_of_measured_peak(method, precision):
    torch.manual_seed(0)
    model = LLaMA(SMALL).to(torch.bfloat16 if precision == "bf16-true" else torch.float32)
    get_method(method).apply(model, LoRAConfig() if method == "lora" else None)
    model.train()
    input_ids = torch.randint(0, SMALL.vocab_size, (2, 128))
    labels = input_ids.clone()
    labels[:, :64] = -100  # a masked prompt: half the positions reach the LM head
    measured = measured_peak_bytes(model, input_ids, labels, precision)
    fraction = (labels[:, 1:] != -100).float().mean().item()
    est = estimate_memory(SMALL, method, 2, 128, precision, supervised_fraction=fraction, device="cpu")
    assert 0.75 <= est.total / measured <= 1.25, (est, measured)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_activations_match_the_tensors_autograd_saves(method):
    torch.manual_seed(0)
    model = LLaMA(SMALL)
    get_method(method).apply(model, LoRAConfig() if method == "lora" else None)
    model.train()
    input_ids = torch.randint(0, SMALL.vocab_size, (2, 64))
    saved = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        supervised_loss_sum(model, input_ids, input_ids.clone())
    persistent = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model._rope]}
    measured = sum(n for ptr, n in saved.items() if ptr not in persistent)
    est = estimate_memory(SMALL, method, 2, 64, "32-true", device="cpu")
    batch = 2 * input_ids.numel() * 8  # the estimate also counts the ids and labels the loop holds
    assert est.activations - batch == pytest.approx(measured, rel=0.02)


def test_activation_checkpointing_saves_memory_and_bf16_halves_lora_weights():
    config = Config.from_name("Llama-2-7B")
    plain = estimate_memory(config, "lora", 4, 256, "bf16-true")
    checkpointed = estimate_memory(config, "lora", 4, 256, "bf16-true", activation_checkpointing=True)
    fp32 = estimate_memory(config, "lora", 4, 256, "32-true")
    assert checkpointed.activations < plain.activations / 5
    assert plain.weights * 2 == pytest.approx(fp32.weights, rel=1e-3)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="unknown finetuning method 'qlora'"):
        estimate_memory(SMALL, "qlora", 1, 128, "32-true")
    with pytest.raises(ValueError, match="precision must be one of 32-true, bf16-mixed, bf16-true; got 'fp16'"):
        estimate_memory(SMALL, "lora", 1, 128, "fp16")


def test_format_estimate_reports_counts_and_a_gib_table():
    text = format_estimate(Config.from_name("Llama-2-7B"), "lora", 4, 256, "bf16-true")
    assert "trainable parameters: 4,194,304 of 6,742,609,920" in text
    assert "| **peak total** |" in text
    assert "r=8 on q,v" in text
