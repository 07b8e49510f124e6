"""lorafit serve's variants: batched prefill, DoRA and QLoRA adapters, a quantised base, the compiled decode step.

Each is checked the way tests/test_serve.py checks the plain server: greedy tokens equal lorafit's own generation
with the adapter loaded (LLM.load), also inside a mixed batch.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from lorafit.checkpoint import load_model
from lorafit.generate import LLM, generate
from lorafit.lora import LoRAConfig, LoRALinear, apply_lora, lora_modules, save_peft_adapter
from lorafit.methods import get_method
from lorafit.methods.base import base_fingerprint
from lorafit.serve.multi_lora import BatchAdapters, MultiLoRALinear
from tests import test_serve
from tests.test_serve import LiveServer, reference_ids

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

served = test_serve.served  # the tiny base with a chat template, and three LoRA adapters (a module fixture)
PROMPTS = ["Once upon a time there was", "The cat", "Lily and her mom went to the park to", "A"]


def make_dora_adapter(base: Path, out: Path, seed: int, quantize: str | None = None) -> Path:
    """A DoRA adapter (q, v, down) with random B and magnitudes away from the row norms; a QLoRA run with `quantize`."""
    if quantize:
        from lorafit.quant import load_quantized

        model = load_quantized(base, quantize)
    else:
        model = load_model(base)
    config = LoRAConfig(r=4, alpha=8, targets="q,v,down", dropout=0.0, dora=True)
    apply_lora(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in lora_modules(model):
            module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=generator))
            module.lora_magnitude_vector.mul_(1 + 0.5 * torch.rand(module.out_features, generator=generator))
    save_peft_adapter(model, config, out, str(base))
    if quantize:  # what finetune records for a QLoRA run: the method, its settings and the base's fingerprint
        from lorafit.methods.qlora import QLoRAConfig

        settings = asdict(QLoRAConfig(**asdict(config), quantize=quantize))
        run = {"method": "qlora", "qlora": settings, "base_fingerprint": base_fingerprint(model)}
        (out / "lorafit_run.json").write_text(json.dumps(run))
    return out


def quantized_reference(base: Path, scheme: str, adapter: Path | None, prompt: str, n: int) -> list[int]:
    """Greedy tokens of the base quantised as `lorafit generate --quantize` loads it, with a LoRA adapter unmerged
    beside it: what a server started with --quantize computes for a plain LoRA adapter."""
    from lorafit.generate import prepare_for_decoding
    from lorafit.quant import load_quantized
    from lorafit.tokenizer import Tokenizer

    model = load_quantized(base, scheme).eval()
    prepare_for_decoding(model, scheme, compile=False)  # as the server does (int8: the LM head too)
    if adapter is not None:
        get_method("lora").load(model, adapter)
    llm = LLM(model, Tokenizer.from_checkpoint(base))
    return list(generate(model, llm.prompt_ids(prompt), n, stop_ids=llm.tokenizer.stop_ids))


def ask_all(live: LiveServer, jobs: list[tuple[str, str, int]]) -> list[list[int]]:
    """Send every (model, prompt, max_tokens) at once, greedy; the answers' token ids."""
    api = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)

    def ask(job):
        model, prompt, n = job
        answer = api.completions.create(
            model=model, prompt=prompt, max_tokens=n, temperature=0, extra_body={"return_token_ids": True}
        )
        return answer.choices[0].token_ids

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(ask, jobs))


def serve_together(app, models: tuple[str, ...]) -> tuple[list[tuple[str, str, int]], list[list[int]], int]:
    """Start `app`, send two prompts for every model at once (16 tokens each), stop it: jobs, answers, and the
    largest batch the engine ran."""
    live = LiveServer(app)
    try:
        jobs = [(model, prompt, 16) for model in models for prompt in PROMPTS[:2]]
        return jobs, ask_all(live, jobs), live.app.state.engine.peak_occupancy
    finally:
        live.stop()


# ---------------------------------------------------------------------------- DoRA in the batched layer


@pytest.mark.parametrize("first_dora", [False, True], ids=["lora", "dora"])
def test_multi_lora_rows_equal_each_adapter_merged(first_dora: bool) -> None:
    """Rows of a batch with different adapters (ranks 2 and 5, LoRA or DoRA) or none equal each adapter merged."""
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12, bias=False)
    batch = BatchAdapters(slots=3)
    multi = MultiLoRALinear(base, batch)
    merged = []
    for slot, (r, dora) in enumerate([(2, first_dora), (5, False)]):
        lora = LoRALinear.from_linear(torch.nn.Linear(16, 12, bias=False), r, scaling=1.5, dora=dora)
        lora.weight.data = base.weight.data.clone()
        lora.reset_lora_parameters()  # the magnitude starts at the row norms of this base
        torch.nn.init.normal_(lora.lora_B.weight)
        magnitude = None
        if dora:
            lora.lora_magnitude_vector.data *= 1 + torch.rand(12)
            magnitude = lora.lora_magnitude_vector.data
        multi.set_slot(slot, lora.lora_A.weight, lora.lora_B.weight, 1.5, magnitude)
        lora.merge()
        merged.append(lora)
    x = torch.randn(4, 3, 16)
    batch.set([0, -1, 1, 0])
    expected = torch.stack([merged[0](x[0]), base(x[1]), merged[1](x[2]), merged[0](x[3])])
    torch.testing.assert_close(multi(x), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected[0], base(x[0]))  # the adapters do change the output
    for slot in (0, 1):  # one adapter for every row: no gather, same numbers
        batch.set([slot] * 4)
        assert batch.single == slot
        torch.testing.assert_close(multi(x), merged[slot](x), rtol=1e-5, atol=1e-5)
    batch.set([0, -1, 1, 0])
    # A plain LoRA adapter in the first adapter's slot puts its DoRA scale back to one.
    multi.set_slot(0, merged[1].lora_A.weight, merged[1].lora_B.weight, 1.5)
    torch.testing.assert_close(multi(x)[0], merged[1](x[0]), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- batched prefill


def run_engine(base: Path, adapters: dict[str, Path], jobs: list[tuple[str, str, int]], budget: int):
    """Greedy tokens of each job through an Engine whose requests all arrive before its first step, and the engine."""
    from lorafit.serve.adapters import AdapterStore
    from lorafit.serve.scheduler import Engine, Request, Sampling
    from lorafit.tokenizer import Tokenizer

    model = load_model(base).eval()
    tokenizer = Tokenizer.from_checkpoint(base)
    store = AdapterStore(model, 4)
    for name, path in adapters.items():
        store.load(name, path)
    engine = Engine(model, store, max_batch=8, max_length=128, max_prefill_tokens=budget)
    answers: list[list[int]] = [[] for _ in jobs]
    done = threading.Semaphore(0)

    def recorder(i: int):
        def emit(token: int | None, reason: str | None) -> None:
            if token is not None:
                answers[i].append(token)
            else:
                assert not reason.startswith("error"), reason
                done.release()

        return emit

    for i, (model_name, prompt, n) in enumerate(jobs):
        slot = -1 if model_name == "base" else store.acquire(model_name)
        stops = frozenset(tokenizer.stop_ids)
        engine.submit(Request(tokenizer.encode(prompt), n, Sampling(temperature=0.0), stops, recorder(i), slot=slot))
    engine.start()
    for _ in jobs:
        assert done.acquire(timeout=120)
    engine.stop()
    return answers, engine


def test_requests_arriving_together_are_prefilled_together_with_the_same_tokens(served) -> None:
    adapters = {name: served["adapters"] / name for name in ("alpha", "beta")}
    jobs = [(model, prompt, 12) for model in ("base", "alpha", "beta") for prompt in PROMPTS]  # 12 > max_batch 8
    batched, engine = run_engine(served["base"], adapters, jobs, budget=512)
    sequential, one_by_one = run_engine(served["base"], adapters, jobs, budget=1)
    assert one_by_one.prefill_forwards == len(jobs)  # the budget of one token admits one request per forward
    # All 8 free rows were prefilled in one forward; the other 4 requests as rows freed up.
    assert engine.prefilled_requests == len(jobs) and engine.prefill_forwards < len(jobs) // 2
    assert batched == sequential
    for (model, prompt, n), ids in zip(jobs, batched, strict=True):
        assert ids == reference_ids(served["base"], adapters.get(model), prompt, n), (model, prompt)


def test_the_prefill_budget_counts_padded_tokens(served) -> None:
    from lorafit.serve.adapters import AdapterStore
    from lorafit.serve.scheduler import Engine, Request, Sampling

    model = load_model(served["base"])
    engine = Engine(model, AdapterStore(model, 1), max_batch=8, max_length=64, max_prefill_tokens=12)
    for length in (3, 4, 2, 5, 1):
        engine.submit(Request([1] * length, 1, Sampling(), frozenset(), lambda token, reason: None))
    # 3, then 2 x 4 = 8, then 3 x 4 = 12 (the 2 fits under the longest), then 4 x 5 = 20 > 12: three taken.
    assert [len(r.prompt) for r in engine._admit()] == [3, 4, 2]
    assert [len(r.prompt) for r in engine._admit()] == [5, 1]
    engine.stop()


def test_a_prefill_budget_below_one_token_is_refused(served) -> None:
    from lorafit.serve.adapters import AdapterStore
    from lorafit.serve.scheduler import Engine

    model = load_model(served["base"])
    with pytest.raises(ValueError, match=r"^--max-prefill-tokens must be at least 1, got 0$"):
        Engine(model, AdapterStore(model, 1), max_batch=8, max_length=64, max_prefill_tokens=0)


# ---------------------------------------------------------------------------- DoRA and QLoRA over a live server


@pytest.fixture(scope="module")
def dora_runs(served) -> dict[str, Path]:
    root = served["root"] / "dora"
    return {
        "dora": make_dora_adapter(served["base"], root / "dora", seed=11),
        "qlora": make_dora_adapter(served["base"], root / "qlora", seed=12, quantize="nf4"),
    }


def test_a_dora_adapter_shares_a_batch_with_lora_adapters_and_the_base(served, dora_runs) -> None:
    from lorafit.serve import build_app

    adapters = {"dora": dora_runs["dora"], "alpha": served["adapters"] / "alpha", "gamma": served["adapters"] / "gamma"}
    app = build_app(served["base"], list(adapters.items()), served_model_name="base", max_model_len=128)
    jobs, answers, peak_occupancy = serve_together(app, ("base", *adapters))
    assert peak_occupancy >= 4
    for (model, prompt, n), ids in zip(jobs, answers, strict=True):
        assert ids == reference_ids(served["base"], adapters.get(model), prompt, n), (model, prompt)
    assert answers[jobs.index(("dora", PROMPTS[0], 16))] != answers[jobs.index(("base", PROMPTS[0], 16))]


def test_a_qlora_run_is_served_over_the_matching_quantised_base_only(served, dora_runs) -> None:
    pytest.importorskip("bitsandbytes")
    from lorafit.serve import build_app
    from lorafit.serve.adapters import AdapterError, read_lora_adapter

    qlora, alpha = dora_runs["qlora"], served["adapters"] / "alpha"
    adapters = {"qlora": qlora, "alpha": alpha, "dora": dora_runs["dora"]}
    app = build_app(served["base"], list(adapters.items()), served_model_name="base", quantize="nf4")
    jobs, answers, peak_occupancy = serve_together(app, ("base", *adapters))
    assert peak_occupancy >= 4
    for (model, prompt, n), ids in zip(jobs, answers, strict=True):
        if model == "qlora":  # the run's own base, rebuilt by LLM.load: quantised to nf4, the adapter beside it
            llm = LLM.load(served["base"], adapter=qlora, quantize="nf4")
            expected = list(generate(llm.model, llm.prompt_ids(prompt), n, stop_ids=llm.tokenizer.stop_ids))
        else:
            expected = quantized_reference(served["base"], "nf4", adapters.get(model), prompt, n)
        assert ids == expected, (model, prompt)

    model = load_model(served["base"])
    with pytest.raises(AdapterError, match=r"qlora: a QLoRA run trained over a nf4 base, and this server's base is "
                       r"not quantised; start the server with --quantize nf4 to serve it"):  # fmt: skip
        read_lora_adapter(qlora, model)
    from lorafit.quant import quantize_model

    quantize_model(model, "int8")
    with pytest.raises(AdapterError, match="base is quantised to int8; start the server with --quantize nf4"):
        read_lora_adapter(qlora, model)


def test_int8_base_serves_lora_adapters_batched(served) -> None:
    from lorafit.serve import build_app

    adapters = {name: served["adapters"] / name for name in ("alpha", "beta")}
    app = build_app(served["base"], list(adapters.items()), served_model_name="base", quantize="int8")
    jobs, answers, _ = serve_together(app, ("base", *adapters))
    for (model, prompt, n), ids in zip(jobs, answers, strict=True):
        assert ids == quantized_reference(served["base"], "int8", adapters.get(model), prompt, n), (model, prompt)
    # The base alone is exactly `lorafit generate --quantize int8`.
    llm = LLM.load(served["base"], quantize="int8")
    expected = list(generate(llm.model, llm.prompt_ids(PROMPTS[0]), 16, stop_ids=llm.tokenizer.stop_ids))
    assert answers[0] == expected


# ---------------------------------------------------------------------------- --compile


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")), reason="torch.compile needs a C++ compiler")
def test_compiled_server_answers_equal_eager_generation(served) -> None:
    from torch._dynamo.utils import counters

    from lorafit.serve import build_app

    adapters = {name: served["adapters"] / name for name in ("alpha", "gamma")}
    counters.clear()
    app = build_app(served["base"], list(adapters.items()), served_model_name="base", max_batch=4, compile=True)
    # Compiled afresh (not taken from inductor's on-disk cache), so its passes run and count what they rewrite.
    no_cache = torch._inductor.config.patch(fx_graph_cache=False)
    no_cache.__enter__()
    live = LiveServer(app)
    try:
        health = httpx.get(live.url + "/health")
        if health.status_code == 503:  # compiling: requests would wait, /health says why
            assert health.json()["status"] == "warming up" and "--compile" in health.json()["detail"]
        deadline = time.monotonic() + 300
        while httpx.get(live.url + "/health").status_code != 200:
            assert time.monotonic() < deadline, "the decode step did not compile"
            time.sleep(0.2)
        graphs = counters["stats"]["unique_graphs"]
        jobs = [(model, prompt, 10 + i) for model in ("base", *adapters) for i, prompt in enumerate(PROMPTS[:2])]
        answers = ask_all(live, jobs)
        # The steps reused the graphs compiled at start (one row, several rows): nothing compiled while serving.
        assert counters["stats"]["unique_graphs"] == graphs
        assert counters["inductor"]["decompose_mm"] >= 8  # the one-row graph's products became reductions
    finally:
        live.stop()
        no_cache.__exit__(None, None, None)
    for (model, prompt, n), ids in zip(jobs, answers, strict=True):
        assert ids == reference_ids(served["base"], adapters.get(model), prompt, n), (model, prompt)
