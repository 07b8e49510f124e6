"""lorafit serve: per-row decoding, batched multi-LoRA, and a live server checked with the openai client and httpx."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from lorafit.checkpoint import load_model
from lorafit.generate import LLM, generate
from lorafit.lora import LoRAConfig, apply_lora, lora_modules, save_peft_adapter

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# (rank, targets) of the three test adapters: different ranks and layers, so slots are padded and partly empty.
ADAPTERS = {"alpha": (4, "q,v"), "beta": (8, "all"), "gamma": (2, "o,down")}


def make_adapter(base: Path, out: Path, r: int, targets: str, seed: int) -> Path:
    """A LoRA adapter with random non-zero B (a fresh one is zero), saved in PEFT's format."""
    model = load_model(base)
    config = LoRAConfig(r=r, alpha=2 * r, targets=targets, dropout=0.0)
    apply_lora(model, config)
    generator = torch.Generator().manual_seed(seed)
    for _, module in lora_modules(model):
        module.lora_B.weight.data = torch.randn(module.lora_B.weight.shape, generator=generator)
    save_peft_adapter(model, config, out, str(base))
    return out


@pytest.fixture(scope="module")
def served(tiny_checkpoint: Path, tmp_path_factory) -> dict[str, Path]:
    """The tiny checkpoint with a chat template and, under an --adapter-dir, the three adapters."""
    root = tmp_path_factory.mktemp("serve")
    base = root / "base"
    shutil.copytree(tiny_checkpoint, base)
    config_path = base / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHATML
    config_path.write_text(json.dumps(config))
    adapters = root / "adapters"
    for seed, (name, (r, targets)) in enumerate(ADAPTERS.items()):
        make_adapter(base, adapters / name, r, targets, seed)
    return {"base": base, "adapters": adapters, "root": root}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving an app on 127.0.0.1 in a thread of the test process."""

    def __init__(self, app) -> None:
        import uvicorn

        self.app, self.port = app, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def server(served) -> Iterator[LiveServer]:
    from lorafit.serve import build_app

    app = build_app(
        served["base"],
        [(name, served["adapters"] / name) for name in ADAPTERS],
        adapter_dir=served["root"],
        api_key="sekret",
        max_batch=8,
        max_loaded_adapters=6,
        max_model_len=128,
        max_body_bytes=4096,
        served_model_name="tiny",
    )
    live = LiveServer(app)
    yield live
    live.stop()


def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="sekret", max_retries=0)


def auth() -> dict[str, str]:
    return {"Authorization": "Bearer sekret"}


def reference_ids(base: Path, adapter: Path | None, prompt: str | list[dict[str, str]], n: int) -> list[int]:
    """lorafit's own greedy generation with the adapter merged (LLM.load), as token ids."""
    llm = LLM.load(base, adapter=adapter)
    return list(generate(llm.model, llm.prompt_ids(prompt), n, stop_ids=llm.tokenizer.stop_ids))


# ---------------------------------------------------------------------------- model and multi-LoRA units


def test_per_row_positions_decode_each_row_as_alone(tiny_checkpoint: Path) -> None:
    model = load_model(tiny_checkpoint)
    prompts = [[1, 5, 9, 33, 7], [1, 42], [1, 8, 8, 300]]
    with torch.inference_mode():
        alone = []
        for prompt in prompts:
            model.setup_kv_cache(1, 16)
            model(torch.tensor([prompt]))
            alone.append(model(torch.tensor([[11]]), len(prompt))[0, -1])
        # Each prompt prefilled into its own row of one cache, then one step for all rows at their own positions.
        model.setup_kv_cache(3, 16)
        caches = [b.self_attn.kv_cache for b in model.layers]
        for row, prompt in enumerate(prompts):
            for block, cache in zip(model.layers, caches, strict=True):
                block.self_attn.kv_cache = cache.rows(row, row + 1)
            model(torch.tensor([prompt]))
        for block, cache in zip(model.layers, caches, strict=True):
            block.self_attn.kv_cache = cache
        positions = torch.tensor([len(p) for p in prompts])
        together = model(torch.tensor([[11]] * 3), positions)[:, -1]
    torch.testing.assert_close(together, torch.stack(alone), rtol=1e-5, atol=1e-5)


def test_llama_adapter_runs_are_refused_with_a_clear_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from lorafit.adapter import AdapterConfig
    from lorafit.methods import get_method
    from lorafit.serve.adapters import AdapterError, read_lora_adapter

    model = load_model(tiny_checkpoint)
    config = AdapterConfig(prompt_length=2, start_layer=1)
    get_method("adapter-v2").apply(model, config)
    get_method("adapter-v2").save(model, config, tmp_path / "run", tiny_checkpoint, str(tiny_checkpoint))
    with pytest.raises(AdapterError, match=r"run: a adapter-v2 run; the server serves LoRA only"):
        read_lora_adapter(tmp_path / "run", model)


def test_stopping_the_engine_ends_running_and_queued_requests_with_an_error(tiny_checkpoint: Path) -> None:
    from lorafit.serve.adapters import AdapterStore
    from lorafit.serve.scheduler import Engine, Request, Sampling

    model = load_model(tiny_checkpoint)
    engine = Engine(model, AdapterStore(model, 1), max_batch=1, max_length=256)
    events: list[list[tuple[int | None, str | None]]] = [[], []]
    first_token = threading.Event()

    def recorder(i: int):
        def emit(token: int | None, reason: str | None) -> None:
            events[i].append((token, reason))
            first_token.set()
            time.sleep(0.01)  # keep the request running until stop() arrives

        return emit

    # Greedy with no stop ids: the first request runs to 250 tokens unless stopped; the second waits for its slot.
    for i in range(2):
        engine.submit(Request([1, 5, 6], 250, Sampling(temperature=0.0), frozenset(), recorder(i)))
    engine.start()
    assert first_token.wait(60)
    engine.stop()
    assert not engine.thread.is_alive()
    assert events[0][-1] == (None, "error: the server is shutting down") and len(events[0]) < 251
    assert events[1] == [(None, "error: the server is shutting down")]
    with pytest.raises(RuntimeError, match="shutting down"):
        engine.submit(Request([1], 1, Sampling(), frozenset(), recorder(0)))


def test_the_decode_thread_computes_on_the_engines_threads_whatever_other_threads_set(tiny_checkpoint: Path) -> None:
    """build_app leaves every other thread of a server on one core; the decode thread sets its own count."""
    from lorafit.serve.adapters import AdapterStore
    from lorafit.serve.scheduler import Engine, Request, Sampling

    model = load_model(tiny_checkpoint)
    engine = Engine(model, AdapterStore(model, 1), max_batch=1, max_length=64, threads=2)
    seen: list[int] = []
    done = threading.Event()

    def emit(token: int | None, reason: str | None) -> None:  # called in the decode thread
        seen.append(torch.get_num_threads())
        if reason is not None:
            done.set()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the loading thread leaves it (runtime.one_thread)... and new threads start so
    try:
        engine.start()
        engine.submit(Request([1, 5, 6], 3, Sampling(), frozenset(), emit))
        assert done.wait(60)
    finally:
        engine.stop()
        torch.set_num_threads(threads)
    assert seen and set(seen) == {2}


# ---------------------------------------------------------------------------- a live server


def test_greedy_answers_equal_merged_generation_while_sharing_a_batch(server: LiveServer, served) -> None:
    api = client(server)
    prompts = ["Once upon a time", "The cat sat", "Lily"]
    jobs = [(model, prompt, 20 + 3 * i) for model in ["tiny", *ADAPTERS] for i, prompt in enumerate(prompts)]

    def ask(job):
        model, prompt, n = job
        answer = api.completions.create(
            model=model, prompt=prompt, max_tokens=n, temperature=0, extra_body={"return_token_ids": True}
        )
        return answer.choices[0].token_ids, answer.usage.completion_tokens, answer.choices[0].finish_reason

    server.app.state.engine.peak_occupancy = 0
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    assert server.app.state.engine.peak_occupancy >= 4  # base and adapters really were decoded together
    outputs = {}
    for (model, prompt, n), (ids, used, reason) in zip(jobs, answers, strict=True):
        adapter = None if model == "tiny" else served["adapters"] / model
        expected = reference_ids(served["base"], adapter, prompt, n)
        assert ids == expected, (model, prompt)
        assert used == len(expected)
        assert reason == ("length" if len(expected) == n else "stop")
        outputs[model, prompt] = ids
    for name in ADAPTERS:  # each adapter answers differently from the base, so the check above can fail
        assert outputs[name, prompts[0]] != outputs["tiny", prompts[0]]


def test_chat_streams_the_same_text_as_without_streaming(server: LiveServer, served) -> None:
    api = client(server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story"}]
    whole = api.chat.completions.create(
        model="beta", messages=messages, max_tokens=24, temperature=0, extra_body={"return_token_ids": True}
    )
    assert whole.choices[0].token_ids == reference_ids(served["base"], served["adapters"] / "beta", messages, 24)
    chunks = list(
        api.chat.completions.create(
            model="beta",
            messages=messages,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens > 0


def test_completion_stream_and_stop_strings(server: LiveServer) -> None:
    api = client(server)
    # The base's greedy text (its bytes decode into many replacement characters), then a stop string inside it.
    full = api.completions.create(model="alpha", prompt="The cat", max_tokens=30, temperature=0).choices[0].text
    streamed = api.completions.create(model="alpha", prompt="The cat", max_tokens=30, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full
    stop = full[6:9]
    cut = api.completions.create(model="alpha", prompt="The cat", max_tokens=30, temperature=0, stop=[stop, "zzz"])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    pieces = api.completions.create(
        model="alpha", prompt="The cat", max_tokens=30, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in pieces) == full[: full.index(stop)]


def test_seeded_sampling_repeats_and_differs_by_seed(server: LiveServer) -> None:
    api = client(server)

    def sample(seed: int) -> str:
        answer = api.completions.create(
            model="gamma", prompt="Lily", max_tokens=16, temperature=1.0, top_p=0.9, seed=seed,
            extra_body={"top_k": 50, "return_token_ids": True},
        )  # fmt: skip
        return answer.choices[0].token_ids

    with ThreadPoolExecutor(3) as pool:
        first, again, other = pool.map(sample, [7, 7, 8])
    assert first == again
    assert first != other


def test_models_lists_base_and_adapters_with_parent(server: LiveServer) -> None:
    models = {m.id: m for m in client(server).models.list().data}
    assert {"tiny", *ADAPTERS} <= set(models)
    assert models["tiny"].parent is None
    assert all(models[name].parent == "tiny" for name in ADAPTERS)


def test_errors_come_in_openai_shape_and_the_server_survives(server: LiveServer) -> None:
    url = server.url
    cases = [
        ({"model": "nope", "prompt": "x"}, 404, "model"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 1000}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "word " * 200}, 400, "prompt"),
        ({"model": "tiny", "prompt": "x", "n": 2}, 400, "n"),
        ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"model": "tiny", "prompt": "x", "stop": [1, 2]}, 400, "stop"),
        ({"model": "tiny", "prompt": ""}, 400, "prompt"),
        ({"model": 3, "prompt": "x"}, 400, "model"),
    ]
    for body, status, param in cases:
        response = httpx.post(url + "/v1/completions", json=body, headers=auth())
        assert response.status_code == status, body
        assert response.json()["error"]["param"] == param
        assert response.json()["error"]["message"]
    chat = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": "hi"}, headers=auth())
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
    garbage = httpx.post(url + "/v1/completions", content=b"{not json", headers=auth())
    assert garbage.status_code == 400 and "not valid JSON" in garbage.json()["error"]["message"]
    array = httpx.post(url + "/v1/completions", json=[1, 2], headers=auth())
    assert array.status_code == 400
    big = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x" * 5000}, headers=auth())
    assert big.status_code == 413 and "4096 bytes" in big.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client(server).completions.create(model="nope", prompt="x")
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x"}, headers=auth()).status_code == 200


def test_api_key_guards_every_route_but_health(server: LiveServer) -> None:
    url = server.url
    assert httpx.get(url + "/health").status_code == 200
    for path in ("/v1/models", "/metrics"):
        assert httpx.get(url + path).status_code == 401
        assert httpx.get(url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(url + path, headers=auth()).status_code == 200
    denied = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_metrics_count_requests_and_tokens(server: LiveServer) -> None:
    client(server).completions.create(model="alpha", prompt="Lily", max_tokens=3, temperature=0)
    text = httpx.get(server.url + "/metrics", headers=auth()).text
    for name in (
        "lorafit_requests_total",
        "lorafit_generation_tokens_total",
        "lorafit_prompt_tokens_total",
        "lorafit_batch_occupancy",
        "lorafit_time_to_first_token_seconds_count",
    ):
        assert name in text
    generated = [line for line in text.splitlines() if line.startswith("lorafit_generation_tokens_total ")]
    assert float(generated[0].split()[1]) >= 3


def test_a_client_that_disconnects_frees_its_slot(server: LiveServer) -> None:
    engine = server.app.state.engine
    store = engine.adapters
    body = {"model": "beta", "prompt": "Once", "max_tokens": 100, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=auth()) as response:
        next(response.iter_lines())
        assert engine.occupancy == 1
    deadline = time.monotonic() + 30
    while engine.occupancy or any(store.slot_users):
        assert time.monotonic() < deadline, "the disconnected request kept its slot"
        time.sleep(0.05)


def test_adapter_dir_lru_and_load_unload_endpoints(server: LiveServer, served) -> None:
    url, root = server.url, served["root"]
    store = server.app.state.engine.adapters
    # --adapter-dir is served["root"]: its subdirectory "adapters/..." is not an adapter, the copies below are.
    for i in range(4):
        make_adapter(served["base"], root / f"lazy{i}", 2, "q", 100 + i)
    api = client(server)
    for i in range(4):  # three slots are pinned by the start-up adapters, three are an LRU for these four
        api.completions.create(model=f"lazy{i}", prompt="x", max_tokens=2, temperature=0)
    assert "lazy0" not in store.names() and {"lazy1", "lazy2", "lazy3"} <= set(store.names())
    assert "lazy0" in {m.id for m in api.models.list().data}  # still offered: it loads again on use
    answer = api.completions.create(
        model="lazy0", prompt="Lily", max_tokens=8, temperature=0, extra_body={"return_token_ids": True}
    )
    ids = answer.choices[0].token_ids
    assert ids == reference_ids(served["base"], root / "lazy0", "Lily", 8)

    outside = served["root"].parent / "elsewhere"
    make_adapter(served["base"], outside, 2, "v", 7)
    refused = httpx.post(
        url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(outside)}, headers=auth()
    )
    assert refused.status_code == 403 and "--allow-any-adapter-path" in refused.json()["error"]["message"]
    inside = httpx.post(
        url + "/v1/load_lora_adapter",
        json={"lora_name": "named", "lora_path": str(root / "adapters" / "alpha")},
        headers=auth(),
    )
    assert inside.status_code == 200
    assert "named" in {m.id for m in api.models.list().data}
    again = httpx.post(
        url + "/v1/load_lora_adapter",
        json={"lora_name": "named", "lora_path": str(root / "adapters" / "alpha")},
        headers=auth(),
    )
    assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]
    gone = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "named"}, headers=auth())
    assert gone.status_code == 200
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="named", prompt="x", max_tokens=2)


def test_an_adapter_for_another_base_is_refused_and_the_rest_keeps_serving(server: LiveServer, served) -> None:
    transformers = pytest.importorskip("transformers")
    other = served["root"] / "wider-base"
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(other)
    make_adapter(other, served["root"] / "foreign", 2, "q,v", 3)
    refused = httpx.post(
        server.url + "/v1/completions", json={"model": "foreign", "prompt": "x", "max_tokens": 2}, headers=auth()
    )
    assert refused.status_code == 400
    message = refused.json()["error"]["message"]
    assert "q_proj.lora_A.weight has shape (2, 48), the model expects (2, 32)" in message
    assert "different base model" in message
    broken = served["root"] / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{}")
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    failed = httpx.post(
        server.url + "/v1/completions", json={"model": "broken", "prompt": "x", "max_tokens": 2}, headers=auth()
    )
    assert failed.status_code == 400 and "broken" in failed.json()["error"]["message"]
    ok = client(server).completions.create(model="gamma", prompt="x", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens == 2


def test_sigterm_lets_the_running_request_finish(served, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", "from lorafit.cli import main; main()", "serve", "--port", str(port)]
    command += [
        "--checkpoint",
        str(served["base"]),
        "--adapter",
        f"alpha={served['adapters'] / 'alpha'}",
        "--log-level",
        "warning",
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"model": "alpha", "prompt": "Once", "max_tokens": 60, "temperature": 0, "stream": True}
        events = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if not events:
                    process.send_signal(signal.SIGTERM)
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last["choices"][0]["finish_reason"] in ("length", "stop")
        # uvicorn re-raises the signal it caught once it has shut down, so the exit status says SIGTERM.
        assert process.wait(60) in (0, -signal.SIGTERM)
        assert "Traceback" not in process.stdout.read().decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_curl_streams_a_chat_completion(server: LiveServer) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    body = {"model": "alpha", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True}
    command = [curl, "-sN", server.url + "/v1/chat/completions", "-H", "Authorization: Bearer sekret"]
    command += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
    lines = [x for x in subprocess.run(command, capture_output=True, text=True, timeout=60).stdout.splitlines() if x]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(x.removeprefix("data: ")) for x in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "alpha" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_serve_cli_parses_and_rejects_bad_adapter_spec() -> None:
    from lorafit.cli import parse_args
    from lorafit.serve import parse_adapter_spec

    args = parse_args(["serve", "--adapter", "a=/x", "--adapter", "b=/y", "--api-key", "k", "--max-batch", "4"])
    assert args.adapter == ["a=/x", "b=/y"] and args.host == "127.0.0.1" and args.max_batch == 4
    assert not args.compile and args.quantize is None and args.max_prefill_tokens == 512
    args = parse_args(["serve", "--compile", "--quantize", "nf4-dq", "--max-prefill-tokens", "64"])
    assert args.compile and args.quantize == "nf4-dq" and args.max_prefill_tokens == 64
    assert parse_adapter_spec("a=/x") == ("a", Path("/x"))
    with pytest.raises(ValueError, match="expected NAME=RUN_DIR"):
        parse_adapter_spec("/x")


# ---------------------------------------------------------------------------- the default model


@pytest.mark.slow
def test_default_model_greedy_parity_with_three_adapters(default_checkpoint: Path, tmp_path: Path) -> None:
    from lorafit.serve import build_app

    adapters = {}
    for seed, (name, (r, targets)) in enumerate(ADAPTERS.items()):
        model = load_model(default_checkpoint)
        config = LoRAConfig(r=r, alpha=2 * r, targets=targets, dropout=0.0)
        apply_lora(model, config)
        generator = torch.Generator().manual_seed(seed)
        for _, module in lora_modules(model):
            module.lora_B.weight.data = torch.randn(module.lora_B.weight.shape, generator=generator) * 0.2
        save_peft_adapter(model, config, tmp_path / name, str(default_checkpoint))
        adapters[name] = tmp_path / name
    live = LiveServer(build_app(default_checkpoint, list(adapters.items()), served_model_name="base"))
    try:
        api = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        jobs = [(m, p) for m in ["base", *adapters] for p in ("What is the capital of France?", "Name a colour.")]

        def ask(job):
            model, prompt = job
            messages = [{"role": "user", "content": prompt}]
            answer = api.chat.completions.create(
                model=model, messages=messages, max_tokens=24, temperature=0, extra_body={"return_token_ids": True}
            )
            return answer.choices[0].token_ids

        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(ask, jobs))
        assert live.app.state.engine.peak_occupancy >= 4
        for (model, prompt), ids in zip(jobs, answers, strict=True):
            messages = [{"role": "user", "content": prompt}]
            assert ids == reference_ids(default_checkpoint, adapters.get(model), messages, 24), (model, prompt)
        by_job = dict(zip(jobs, answers, strict=True))
        for name in adapters:  # the adapters change the answers, so the parity above means something
            assert any(by_job[name, p] != by_job["base", p] for _, p in jobs[:2])
    finally:
        live.stop()


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="counts threads in /proc/self/task")
def test_loading_leaves_no_openmp_team_behind_for_the_decode_thread_to_share_cores_with(
    default_checkpoint: Path,
) -> None:
    """A fresh process: build_app loads the default model (large copies, parallel regions on any other thread
    count) and leaves no worker thread behind, while the same process's next parallel product starts one."""
    script = f"""
import os, torch
from lorafit.serve import build_app
count = lambda: len(os.listdir("/proc/self/task"))
before = count()
app = build_app({str(default_checkpoint)!r})
after_loading = count()
torch.randn(2048, 2048) @ torch.randn(2048, 2048)
print(before, after_loading, count(), torch.get_num_threads())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    before, after_loading, after_product, threads = map(int, done.stdout.split())
    assert after_loading == before
    if threads > 1:  # the thread count is back, and a parallel region now does start a team
        assert after_product > after_loading
