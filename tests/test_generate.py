"""Generation: KV-cache decoding, parity with transformers' generate, sampling rules, streaming text."""

import shutil

import pytest
import torch

from lorafit.generate import GenerationStats, TextStreamer, generate, generate_batch, sample_next, top_p_filter
from lorafit.model import LLaMA
from tests import conftest
from tests.conftest import shared_file

transformers = pytest.importorskip("transformers")


def make_pair(**overrides) -> tuple[torch.nn.Module, LLaMA]:
    return conftest.make_pair(tie_word_embeddings=True, **overrides)


PROMPT = [5, 17, 33, 2, 71, 8, 40]


def assert_greedy_by_recomputation(model, tokens: list[int]) -> None:
    """Each token is the argmax of a full forward over the prompt and the tokens before it (no KV cache)."""
    model.clear_kv_cache()
    seq = list(PROMPT)
    with torch.no_grad():
        for expected in tokens:
            assert int(model(torch.tensor([seq]))[0, -1].argmax()) == expected
            seq.append(expected)


def test_generate_picks_what_full_recomputation_picks():
    """generate()'s cached decoding chooses each token as a cache-free forward would (the cache's logits are
    checked against recomputation once, in test_model.py)."""
    _, model = make_pair()
    tokens = list(generate(model, PROMPT, max_new_tokens=12))
    assert_greedy_by_recomputation(model, tokens)


def test_greedy_equals_transformers_generate():
    hf, model = make_pair()
    with torch.no_grad():
        expected = hf.generate(
            torch.tensor([PROMPT]),
            max_new_tokens=20,
            min_new_tokens=20,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )[0, len(PROMPT) :].tolist()
    assert list(generate(model, PROMPT, max_new_tokens=20)) == expected


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")), reason="torch.compile needs a C++ compiler")
def test_compiled_decoding_equals_eager_and_uses_reductions():
    """The compiled one-token step gives the eager tokens, with its matrix-vector products rewritten as reductions."""
    from torch._dynamo.utils import counters

    _, model = make_pair()
    eager = list(generate(model, PROMPT, max_new_tokens=10))
    counters.clear()
    compiled = list(generate(model, PROMPT, max_new_tokens=10, compiled=True))
    assert compiled == eager
    # The step's q, k, v, o, gate, up, down and LM head products: each one rewritten once per compiled graph.
    assert counters["inductor"]["decompose_mm"] >= 8


def test_int8_greedy_decoding_picks_what_its_own_recomputation_picks():
    """With int8 block linears (the fused kernel, one row per step), cached decoding chooses each token as a
    cache-free int8 forward does."""
    from lorafit.quant import quantize_model

    _, model = conftest.make_pair()  # untied: its greedy tokens vary, unlike the tied model's
    assert quantize_model(model, "int8") == 14
    tokens = list(generate(model, PROMPT, max_new_tokens=12))
    assert len(set(tokens)) > 3
    assert_greedy_by_recomputation(model, tokens)


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")), reason="torch.compile needs a C++ compiler")
def test_compiled_int8_decoding_equals_eager_int8():
    """The compiled step gives eager int8's tokens, its block linears written as int8 reductions (lorafit.quant's
    int8_linear), not matrix products over a float copy of the weight: only the LM head is an mm to rewrite."""
    from torch._dynamo.utils import counters

    from lorafit.quant import quantize_model

    _, model = conftest.make_pair()
    quantize_model(model, "int8")
    eager = list(generate(model, PROMPT, max_new_tokens=10))
    counters.clear()
    compiled = list(generate(model, PROMPT, max_new_tokens=10, compiled=True))
    assert compiled == eager and len(set(eager)) > 3
    # One graph (as in the float32 test, whose eight products are each rewritten once): the LM head's alone.
    assert counters["inductor"]["decompose_mm"] == 1


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")), reason="torch.compile needs a C++ compiler")
def test_compiled_nf4_decoding_equals_eager_nf4():
    """bitsandbytes' CPU operator cannot be traced; under torch.compile the nf4 layers dequantise in plain PyTorch
    (QuantizedLinear.nf4_weight) inside the one-row reduction, and give the eager nf4 tokens."""
    pytest.importorskip("bitsandbytes")
    from lorafit.quant import quantize_model

    _, model = conftest.make_pair()
    quantize_model(model, "nf4-dq")
    eager = list(generate(model, PROMPT, max_new_tokens=10))
    compiled = list(generate(model, PROMPT, max_new_tokens=10, compiled=True))
    assert compiled == eager and len(set(eager)) > 3


def test_generation_stops_after_a_stop_id():
    _, model = make_pair()
    free = list(generate(model, PROMPT, max_new_tokens=15))
    stop = free[4]
    first = free.index(stop)
    stats = GenerationStats()
    stopped = list(generate(model, PROMPT, max_new_tokens=15, stop_ids={stop}, stats=stats))
    assert stopped == free[: first + 1]
    assert stats.new_tokens == first + 1 and stats.prompt_tokens == len(PROMPT)


def test_continuing_from_a_cached_prefix_equals_a_fresh_prefill():
    _, model = make_pair()
    first = list(generate(model, PROMPT, max_new_tokens=6))
    follow_up = PROMPT + first + [9, 10]
    # The cache now holds PROMPT + first[:-1]; a follow-up prompt only prefills the rest.
    reused = list(generate(model, follow_up, max_new_tokens=8, cached_tokens=len(PROMPT) + len(first) - 1))
    model.clear_kv_cache()
    assert reused == list(generate(model, follow_up, max_new_tokens=8))


def test_top_k_1_equals_greedy():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    sampled = sample_next(logits, temperature=1.3, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sampled, logits.argmax(-1))
    _, model = make_pair()
    sampled_tokens = list(generate(model, PROMPT, 10, temperature=0.8, top_k=1, generator=torch.Generator()))
    assert sampled_tokens == list(generate(model, PROMPT, 10))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = probs.log()
    kept = lambda p: set(torch.nonzero(top_p_filter(logits, p).isfinite()).flatten().tolist())  # noqa: E731
    assert kept(0.4) == {1}  # the top token alone reaches 0.4
    assert kept(0.5) == {1, 3}  # 0.4 + 0.3
    assert kept(0.7) == {1, 3}  # exactly 0.7 is enough
    assert kept(0.71) == {1, 3, 4}
    assert kept(1.0) == {0, 1, 2, 3, 4}
    # Sampling never picks a filtered-out token.
    draws = {int(sample_next(logits, 1.0, top_p=0.5, generator=torch.Generator().manual_seed(s))) for s in range(50)}
    assert draws == {1, 3}


def test_top_k_keeps_the_k_most_likely():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0, -1.0])
    draws = {int(sample_next(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(s))) for s in range(50)}
    assert draws == {1, 3}


def test_same_seed_same_sample():
    _, model = make_pair()

    def sample(seed: int) -> list[int]:
        return list(
            generate(model, PROMPT, 16, temperature=1.5, top_p=0.95, generator=torch.Generator().manual_seed(seed))
        )

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_bad_sampling_arguments_are_named():
    logits = torch.zeros(10)
    with pytest.raises(ValueError, match="temperature must be >= 0, got -1"):
        sample_next(logits, temperature=-1)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.5"):
        sample_next(logits, temperature=1, top_p=1.5)


class _SentencePiece:
    """The decode() interface TextStreamer needs, over a raw SentencePiece model."""

    def __init__(self, path) -> None:
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))

    def decode(self, ids, skip_special_tokens=False) -> str:
        return self.sp.decode(list(ids))


def test_text_streamer_holds_back_incomplete_utf8():
    tok = _SentencePiece(shared_file("models/tokenizer_llama2.model"))
    text = "Grüße aus Köln — 東京 🦙 fin"
    ids = tok.sp.encode(text)
    # The emoji and CJK characters fall back to byte tokens, so some ids end mid-character.
    assert any(tok.sp.id_to_piece(i).startswith("<0x") for i in ids)
    streamer = TextStreamer(tok)
    pieces = [streamer.put(i) for i in ids] + [streamer.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_text_streamer_flushes_an_incomplete_tail():
    tok = _SentencePiece(shared_file("models/tokenizer_llama2.model"))
    ids = tok.sp.encode("ok 🦙")
    streamer = TextStreamer(tok)
    streamed = "".join(streamer.put(i) for i in ids[:-1])  # stops mid-emoji
    assert streamed.strip() == "ok"
    tail = streamer.flush()
    assert streamed + tail == tok.sp.decode(ids[:-1]) and tail.endswith("\ufffd")


@pytest.mark.slow
def test_default_model_knows_the_capital_of_france(default_checkpoint):
    from lorafit.generate import LLM

    llm = LLM.load(default_checkpoint)
    answer = llm.generate("What is the capital of France?", chat=True, max_new_tokens=32)
    assert "Paris" in answer
    assert llm.last_stats.new_tokens > 0


def test_batched_generation_equals_one_prompt_at_a_time():
    _, model = make_pair()
    prompts = [PROMPT, PROMPT[:3], [9, 1, 4, 4, 60, 2, 7, 7, 30, 11, 12], [42]]
    one_by_one = [list(generate(model, p, max_new_tokens=12, stop_ids={3})) for p in prompts]
    assert generate_batch(model, prompts, max_new_tokens=12, stop_ids={3}) == one_by_one
    assert model.kv_cache_length == 0  # the batch-sized cache is not left behind


def test_left_padding_is_invisible_to_the_real_tokens():
    _, model = make_pair()
    seq = torch.tensor([PROMPT])
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), seq], dim=1)
    key_mask = torch.cat([torch.zeros(1, 5, dtype=torch.bool), torch.ones(1, len(PROMPT), dtype=torch.bool)], dim=1)
    with torch.no_grad():
        expected, got = model(seq), model(padded, 0, key_mask)[:, 5:]
    assert (expected - got).abs().max().item() <= 1e-5
