"""The memory estimate: exact parameter counts, traced activations against a real step, the peak against
tensor memory measured on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lorafit.adapter import AdapterConfig
from lorafit.checkpoint import load_config
from lorafit.cli import main
from lorafit.config import Config
from lorafit.estimate import SavedTensors, count_parameters, estimate_memory, format_estimate
from lorafit.lora import LoRAConfig
from lorafit.methods import get_method
from lorafit.model import LLaMA
from lorafit.runtime import autocast
from lorafit.train import TrainConfig, make_optimizer, supervised_loss_sum

SMALL = Config(vocab_size=4096, n_layer=4, n_embd=256, n_head=4, n_kv_head=2, intermediate_size=688)
LLAMA2_7B_PARAMS = 6_738_415_616


@pytest.mark.parametrize(
    ("method", "expected", "added"),
    [
        ("lora", 4_194_304, 4_194_304),
        ("adapter", 1_229_760, 1_229_760),
        # v2 also trains the base's 65 RMSNorm weights; only the biases and scales are new: 2 x (32 x 44_032 + 32_000).
        ("adapter-v2", 4_279_744, 4_013_504),
        ("full", LLAMA2_7B_PARAMS, 0),
    ],
)
def test_llama2_7b_trainable_counts(method, expected, added):
    config = LoRAConfig(r=8, targets="q,v") if method == "lora" else None
    trainable, total, _ = count_parameters(Config.from_name("Llama-2-7B"), method, config)
    assert trainable == expected
    assert total == LLAMA2_7B_PARAMS + added


def test_lora_count_matches_a_real_model():
    model = LLaMA(SMALL)
    lora = LoRAConfig(r=4, targets="all")
    get_method("lora").apply(model, lora)
    trainable, total, _ = count_parameters(SMALL, "lora", lora)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in model.parameters())


def test_saved_tensors_counts_each_storage_once():
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(16, 4, requires_grad=True)
    with SavedTensors() as saved:
        y = x @ w  # saves x and w
        saved.label = "square"
        z = (y * y).sum()  # saves y (twice: one storage)
    assert saved.nbytes() == (8 * 16 + 16 * 4 + 8 * 4) * 4
    assert saved.nbytes_by_label() == {None: (8 * 16 + 16 * 4) * 4, "square": 8 * 4 * 4}
    assert saved.nbytes(exclude=[w, x[:2]]) == 8 * 4 * 4  # a view excludes its whole storage
    assert z.requires_grad


def _small_model(method: str, precision: str, config: LoRAConfig | AdapterConfig | None = None) -> LLaMA:
    torch.manual_seed(0)
    model = LLaMA(SMALL).to(torch.bfloat16 if precision == "bf16-true" else torch.float32)
    config = config or get_method(method).default_config()
    get_method(method).apply(model, config)
    get_method(method).store_for_training(model, config, precision)  # as finetune does
    return model.train()


def _fused(method: str, config: LoRAConfig | AdapterConfig | None = None) -> bool:
    return get_method(method).fused_head(config or get_method(method).default_config())


def _masked_batch(batch: int, length: int, prompt: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Random ids and labels whose first `prompt` positions are masked, and the supervised fraction."""
    input_ids = torch.randint(0, SMALL.vocab_size, (batch, length))
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    return input_ids, labels, (labels[:, 1:] != -100).float().mean().item()


HEAD_LORA = LoRAConfig(r=4, dropout=0.0, targets="q,k,v,o,gate,up,down,lm_head")  # the head is recomputed per chunk


@pytest.mark.parametrize(
    ("method", "precision", "checkpointing", "lora", "adapter", "prompt"),
    [
        ("lora", "32-true", False, None, None, 20),
        ("full", "32-true", False, None, None, 20),
        ("lora", "bf16-mixed", False, None, None, 20),
        ("full", "bf16-true", False, None, None, 20),
        ("lora", "bf16-true", False, HEAD_LORA, None, 20),
        ("lora", "32-true", False, None, None, 64),  # nothing supervised
        ("adapter", "32-true", False, None, AdapterConfig(prompt_length=24, start_layer=1), 20),
        ("adapter-v2", "bf16-mixed", False, None, None, 20),
        ("adapter-v2", "bf16-true", False, None, AdapterConfig(prompt_length=3, start_layer=0), 20),
        ("lora", "32-true", True, None, None, 20),
        ("full", "bf16-mixed", True, None, None, 20),
    ],
)
def test_activations_match_the_tensors_autograd_saves(method, precision, checkpointing, lora, adapter, prompt):
    config = lora or adapter
    model = _small_model(method, precision, config)
    model.activation_checkpointing = checkpointing
    input_ids, labels, fraction = _masked_batch(2, 64, prompt)
    with SavedTensors() as saved, autocast(precision, torch.device("cpu")):
        saved.add(input_ids)  # the loop holds the batch too, as the estimate counts
        saved.add(labels)
        supervised_loss_sum(model, input_ids, labels, _fused(method, config))
    measured = saved.nbytes(exclude=[*model.parameters(), *model._rope])
    est = estimate_memory(SMALL, method, 2, 64, precision, config, checkpointing, fraction, "cpu")
    assert est.activations == measured  # the same step, traced on fake tensors: byte for byte


def test_adapter_prompt_length_and_start_layer_are_honoured():
    config = Config.from_name("Llama-2-7B")
    default = estimate_memory(config, "adapter", 1, 64, "bf16-true")
    longer = estimate_memory(config, "adapter", 1, 64, "bf16-true", method_config=AdapterConfig(prompt_length=20))
    later = estimate_memory(config, "adapter", 1, 64, "bf16-true", method_config=AdapterConfig(start_layer=16))
    # 10 more prompt vectors in each of the 30 adapted layers: their weights, gradients and AdamW state.
    assert longer.trainable_params - default.trainable_params == 10 * 30 * 4096
    assert longer.activations > default.activations
    assert later.activations < default.activations  # layers below the first prompt save nothing


def measured_peak_bytes(
    model: LLaMA, input_ids: torch.Tensor, labels: torch.Tensor, precision: str, fused_head: bool
) -> int:
    """Peak tensor memory of a steady-state train.py step: live bytes before it plus the profiler's allocation peak.

    The first step creates AdamW's state; the second is profiled, and every CPU allocation and free it
    makes is replayed in time order, so the peak counts temporaries inside kernels too.
    """
    optimizer = make_optimizer(model, TrainConfig(precision=precision))
    device = torch.device("cpu")

    def step() -> None:
        with autocast(precision, device):
            loss = supervised_loss_sum(model, input_ids, labels, fused_head) / input_ids.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    states = [t for state in optimizer.state.values() for t in state.values() if t.ndim]
    before = SavedTensors()
    for t in [*model.parameters(), *states, *model._rope]:
        before.add(t)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return before.nbytes() + peak


@pytest.mark.parametrize(
    ("method", "precision", "checkpointing"),
    [
        ("lora", "32-true", False),
        ("lora", "bf16-true", False),
        ("full", "32-true", False),
        ("full", "bf16-true", False),
        ("adapter-v2", "32-true", False),
        ("lora", "32-true", True),
        ("full", "bf16-true", True),
    ],
)
def test_estimate_within_25_percent_of_measured_peak(method, precision, checkpointing):
    model = _small_model(method, precision)
    model.activation_checkpointing = checkpointing
    input_ids, labels, fraction = _masked_batch(2, 128, 64)  # a masked prompt: half the positions reach the head
    measured = measured_peak_bytes(model, input_ids, labels, precision, _fused(method))
    est = estimate_memory(SMALL, method, 2, 128, precision, None, checkpointing, fraction, "cpu")
    assert 0.75 <= est.total / measured <= 1.25, (est, measured)


def test_activation_checkpointing_saves_memory_and_bf16_halves_lora_weights():
    config = Config.from_name("Llama-2-7B")
    plain = estimate_memory(config, "lora", 4, 256, "bf16-true")
    checkpointed = estimate_memory(config, "lora", 4, 256, "bf16-true", activation_checkpointing=True)
    fp32 = estimate_memory(config, "lora", 4, 256, "32-true")
    assert checkpointed.activations < plain.activations / 5
    assert plain.weights * 2 == pytest.approx(fp32.weights, rel=1e-3)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="unknown finetuning method 'dpo'"):
        estimate_memory(SMALL, "dpo", 1, 128, "32-true")
    with pytest.raises(ValueError, match="precision must be one of 32-true, bf16-mixed, bf16-true; got 'fp16'"):
        estimate_memory(SMALL, "lora", 1, 128, "fp16")


def test_cli_reads_the_checkpoint_config_and_the_method_flags(tiny_checkpoint, capsys):
    flags = ["--adapter-prompt-length", "5", "--adapter-start-layer", "1"]
    main(["estimate", "adapter", "--checkpoint", str(tiny_checkpoint), *flags])
    out = capsys.readouterr().out
    model = LLaMA(load_config(tiny_checkpoint))
    trainable = get_method("adapter").apply(model, AdapterConfig(prompt_length=5, start_layer=1))
    assert f"trainable parameters: {trainable:,} of {sum(p.numel() for p in model.parameters()):,}" in out
    assert "adapter (5 prompt tokens from layer 1)" in out
    with pytest.raises(SystemExit) as exit:
        main(["estimate", "lora", "--checkpoint", "no-such-model"])
    assert exit.value.code == 2
    assert "lorafit estimate: error: --checkpoint: unknown model name 'no-such-model'" in capsys.readouterr().err


def test_format_estimate_reports_counts_and_a_gib_table():
    text = format_estimate(Config.from_name("Llama-2-7B"), "lora", 4, 256, "bf16-true")
    assert "trainable parameters: 4,194,304 of 6,742,609,920" in text
    assert "| **peak total** |" in text
    assert "r=8, alpha=16 on q,v" in text


def test_a_repo_id_needs_only_its_config_json(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """estimate --checkpoint org/name fetches config.json alone (here from a hand-built huggingface_hub cache)."""
    sha = "b" * 40
    storage = tmp_path / "hf" / "models--org--tiny"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(sha)
    (storage / "snapshots" / sha).mkdir(parents=True)
    (storage / "snapshots" / sha / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    main(["estimate", "lora", "--checkpoint", "org/tiny", "--device", "cpu"])
    model = LLaMA(load_config(tiny_checkpoint))
    trainable = get_method("lora").apply(model, LoRAConfig())
    assert f"trainable parameters: {trainable:,} of {sum(p.numel() for p in model.parameters()):,}" in (
        capsys.readouterr().out
    )
