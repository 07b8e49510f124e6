"""benchmarks/machine.py: the model FLOP and weight byte counts the CPU benchmarks divide by the machine's limits."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lorafit.config import Config
from lorafit.estimate import count_parameters
from lorafit.lora import LoRAConfig

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
LORA = LoRAConfig(r=8, alpha=16, dropout=0.05, targets=("q", "v"))


@pytest.fixture(scope="module")
def machine():
    sys.path.insert(0, str(BENCHMARKS))  # machine.py imports gpu.py as the scripts there do
    try:
        import machine

        yield machine
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_lora_count_is_gpu_benchmarks_for_half_labelled_samples(machine):
    import gpu

    config = Config.from_name("Llama-2-7B")
    assert machine.training_flops(config, "lora", [(256, 128)] * 4, LORA) == gpu.model_flops_per_step(
        config, LORA, 4, 256
    )


def test_labelled_positions_move_only_the_head_term(machine):
    config = Config.from_name("Llama-2-7B")
    half = machine.training_flops(config, "lora", [(100, 50)], LORA)
    assert machine.training_flops(config, "lora", [(100, 80)], LORA) - half == 4 * 32000 * 4096 * 30


def test_full_is_6n_per_token_plus_head_and_attention(machine):
    config = Config.from_name("Llama-2-7B")
    n_blocks = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    samples = [(200, 120), (64, 10)]
    attention = sum(6 * length * length * 4096 * 32 for length, _ in samples)
    expected = sum(6 * n_blocks * length + 6 * 32000 * 4096 * labelled for length, labelled in samples) + attention
    assert machine.training_flops(config, "full", samples) == expected
    # The adapters are counted as the frozen model: forward and input gradients, 4N per token.
    frozen = sum(4 * n_blocks * length + 4 * 32000 * 4096 * labelled for length, labelled in samples) + attention
    assert machine.training_flops(config, "adapter", samples) == frozen


@pytest.mark.parametrize("tie", [True, False])
def test_decode_reads_every_parameter_but_the_embedding_table_once(machine, tie):
    config = Config(name="t", vocab_size=512, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=96)
    config.tie_embeddings = tie
    _, total, _ = count_parameters(config, "full")
    untied_embedding = 0 if tie else config.vocab_size * config.n_embd  # its one row per token is not counted
    assert machine.decode_weight_bytes(config, 4) == (total - untied_embedding) * 4
    assert machine.decode_weight_bytes(config, 2) == (total - untied_embedding) * 2


def test_probe_measures_and_describes(machine, monkeypatch, one_thread):
    monkeypatch.setattr(machine, "MATMUL_SIZE", 64)
    monkeypatch.setattr(machine, "READ_BYTES", 2**20)
    found = machine.probe(repeats=1)
    assert found["threads"] == torch.get_num_threads() == 1
    assert found["float32_gflops"] > 0 and found["bfloat16_gflops"] > 0 and found["read_gb_per_s"] > 0
    line = machine.describe(found | {"float32_gflops": 23.25, "bfloat16_gflops": 54.0, "read_gb_per_s": 7.46})
    assert line.endswith("matmul float32 23.2 GFLOP/s, bf16 54.0 GFLOP/s; read bandwidth 7.5 GB/s")
    assert machine.share(41.0, 50.0) == "82%" and machine.share(None, 50.0) == "-"
