"""The model against transformers' LlamaForCausalLM on tiny random checkpoints."""

import pytest
import torch

from lorafit.model import LLaMA
from tests import conftest

transformers = pytest.importorskip("transformers")

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
CASES = {
    "multi-head, untied": dict(num_key_value_heads=4, tie_word_embeddings=False),
    "grouped-query, tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "llama3 rope scaling": dict(num_key_value_heads=1, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING),
}


def make_pair(**overrides) -> tuple[torch.nn.Module, LLaMA]:
    return conftest.make_pair(num_hidden_layers=3, **overrides)


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case):
    hf, model = make_pair(**CASES[case])
    idx = torch.randint(0, 128, (2, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = hf(idx).logits, model(idx)
    assert (expected - got).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", CASES)
def test_kv_cache_decoding_equals_full_recomputation(case):
    _, model = make_pair(**CASES[case])
    idx = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx)
        model.setup_kv_cache(batch_size=2, max_length=64)
        # a prefill, a continued prefill (needs a mask), then single-token steps
        pieces = [model(idx[:, :20]), model(idx[:, 20:30], start=20)]
        pieces += [model(idx[:, t : t + 1], start=t) for t in range(30, 40)]
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-5


def test_tied_embeddings_share_storage():
    _, model = make_pair(num_key_value_heads=2, tie_word_embeddings=True)
    assert model.lm_head.weight is model.embed_tokens.weight


def test_kv_cache_overflow_is_a_clear_error():
    _, model = make_pair(num_key_value_heads=2)
    model.setup_kv_cache(batch_size=1, max_length=8)
    with pytest.raises(ValueError, match="KV cache holds 8 positions; asked for 9"), torch.no_grad():
        model(torch.zeros(1, 9, dtype=torch.long))


def test_activation_checkpointing_gives_same_gradients():
    _, model = make_pair(num_key_value_heads=2)
    idx = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    model.train()
    model(idx).sum().backward()
    expected = model.layers[0].mlp.up_proj.weight.grad.clone()
    model.zero_grad()
    model.activation_checkpointing = True
    model(idx).sum().backward()
    torch.testing.assert_close(model.layers[0].mlp.up_proj.weight.grad, expected)
