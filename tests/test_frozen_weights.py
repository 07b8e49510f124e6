"""bf16-mixed keeps the frozen linear weights in bf16 (Method.store_for_training): the same step, less memory."""

import copy
import gc
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafit.checkpoint import load_model
from lorafit.lora import LoRAConfig
from lorafit.methods import get_method
from lorafit.model import LLaMA
from lorafit.runtime import autocast, store_frozen_linears
from lorafit.train import supervised_loss_sum
from tests.conftest import VOCAB, tiny_config
from tests.test_runs import run

CPU = torch.device("cpu")


def applied(method: str, config=None, tie: bool = True) -> tuple[LLaMA, object]:
    torch.manual_seed(0)
    model = LLaMA(tiny_config(n_layer=3, tie=tie))  # the adapters' default first layer is 2
    config = config if config is not None else get_method(method).default_config()
    get_method(method).apply(model, config)
    return model.train(), config


def step(model: LLaMA, fused_head: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One bf16-mixed training step's loss and trainable gradients (dropout drawn from the same seed)."""
    torch.manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (2, 24))
    labels = input_ids.clone()
    labels[:, :10] = -100
    with autocast("bf16-mixed", CPU):
        loss = supervised_loss_sum(model, input_ids, labels, fused_head)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "adapter-v2"])
def test_frozen_weights_in_bf16_give_the_bf16_mixed_step_bit_for_bit(method):
    model, config = applied(method)
    stored = copy.deepcopy(model)
    get_method(method).store_for_training(stored, config, "bf16-mixed")

    linears = [m for m in stored.layers.modules() if isinstance(m, torch.nn.Linear)]
    frozen = [m.weight for m in linears if not m.weight.requires_grad]
    assert frozen and all(w.dtype == torch.bfloat16 for w in frozen)
    assert all(p.dtype == torch.float32 for p in stored.parameters() if p.requires_grad)
    # The embedding is the tied LM head: it stays float32, and stays tied.
    assert stored.embed_tokens.weight.dtype == torch.float32
    assert stored.lm_head.weight is stored.embed_tokens.weight

    fused_head = get_method(method).fused_head(config)
    loss, grads = step(model, fused_head)
    stored_loss, stored_grads = step(stored, fused_head)
    assert torch.equal(loss, stored_loss)
    assert grads.keys() == stored_grads.keys()
    assert all(torch.equal(grads[name], stored_grads[name]) for name in grads)


@pytest.mark.parametrize(
    ("method", "config", "precision"),
    [
        ("lora", LoRAConfig(r=2, dora=True), "bf16-mixed"),  # DoRA takes ||W + s B A|| in float32
        ("lora", None, "32-true"),
        ("full", None, "bf16-mixed"),  # every weight trains: AdamW's master copy is float32
    ],
)
def test_weights_stay_float32_where_training_needs_them(method, config, precision):
    model, config = applied(method, config, tie=False)
    get_method(method).store_for_training(model, config, precision)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_the_checkpoint_s_memory_map_is_let_go(tiny_checkpoint, tmp_path):
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs Linux's /proc/self/maps")
    checkpoint = tmp_path / "base"  # a path of its own, which no other test has mapped
    shutil.copytree(tiny_checkpoint, checkpoint)
    weights = str(checkpoint / "model.safetensors")
    model = load_model(checkpoint)
    assert weights in maps.read_text()  # loaded memory-mapped, as for any run
    get_method("lora").apply(model, LoRAConfig(r=2))
    get_method("lora").store_for_training(model, LoRAConfig(r=2), "bf16-mixed")
    gc.collect()
    assert weights not in maps.read_text()  # the float32 pages are not kept beside their bf16 copies
    assert model.lm_head.weight.dtype == torch.bfloat16  # untied here: a frozen linear like the others
    assert model.embed_tokens.weight.dtype == torch.float32


def test_a_bf16_mixed_run_samples_and_saves_a_float32_adapter(tiny_checkpoint, tmp_path, capsys):
    records = [{"instruction": f"Say {i}.", "input": "", "output": f"{i} {i}"} for i in range(12)]
    data, out = tmp_path / "numbers.json", tmp_path / "run"
    data.write_text(json.dumps(records))
    run(data, out, tiny_checkpoint, precision="bf16-mixed", eval_interval=2, max_steps=2)
    printed = capsys.readouterr().out
    assert "held-out answer:" in printed  # generated in bf16-mixed beside the bf16 weights
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())


def test_linears_that_share_a_frozen_weight_still_share_it():
    first, second = torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False)
    second.weight = first.weight
    first.weight.requires_grad_(False)
    model = torch.nn.Sequential(first, second)
    assert store_frozen_linears(model, torch.bfloat16) == 1
    assert model[0].weight is model[1].weight
    assert model[0].weight.dtype == torch.bfloat16
