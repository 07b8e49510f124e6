"""LLaMA-Adapter v1/v2: zero-init start, trainable sets and counts, GQA, cached prompt, training, save/load, runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lorafit.adapter import AdapterConfig, AdapterV2Linear, PromptAdapter, adapter_parameters, fold_scales
from lorafit.config import Config
from lorafit.methods import get_method, merge_run, method_of_run
from lorafit.methods.llama_adapter import CONFIG_FILE, LEGACY_CONFIG_FILE, WEIGHTS_FILE
from lorafit.model import LLaMA
from lorafit.train import train
from tests import conftest
from tests.conftest import PAD, read_metrics, repetitive_dataset, small_config, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ("adapter", "adapter-v2")
TINY = tiny_config(n_layer=3)
SMALL_ADAPTER = AdapterConfig(prompt_length=5, start_layer=1)
IDS = torch.tensor([[1, 5, 17, 33, 9, 40, 8, 22], [1, 7, 7, 3, 60, 2, 11, 50]])


def tiny_model(seed: int = 0, tie: bool = False) -> LLaMA:
    return conftest.tiny_model(seed=seed, tie=tie, n_layer=3).eval()


def apply_adapter(model: LLaMA, method: str, config: AdapterConfig) -> int:
    return get_method(method).apply(model, config)


def save_adapter(model: LLaMA, method: str, config: AdapterConfig, out: Path, base: str) -> None:
    get_method(method).save(model, config, out, Path(base), base_reference=base)


def perturb(model: LLaMA, seed: int = 1) -> None:
    """Give every adapter tensor a random non-initial value, as training would (gates open, scales move)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter_parameters(model).items():
            noise = torch.randn(p.shape, generator=generator)
            p.add_(noise * (0.5 if name.endswith("gate") else 0.1))


def logits(model: LLaMA, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("tie", [False, True])
def test_at_initialisation_the_model_is_exactly_the_base_model(method, tie):
    model = tiny_model(tie=tie)
    before = logits(model)
    apply_adapter(model, method, SMALL_ADAPTER)
    assert torch.equal(logits(model), before)
    model.train()
    with torch.no_grad():
        assert torch.equal(model(IDS), before)


@pytest.mark.parametrize("method", METHODS)
def test_only_the_adapter_parameters_require_grad(method):
    model = tiny_model()
    apply_adapter(model, method, SMALL_ADAPTER)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    prompts = {f"layers.{i}.self_attn.adapter.{t}" for i in (1, 2) for t in ("prompt.weight", "gate")}
    if method == "adapter":
        assert trainable == prompts
        return
    linears = [f"layers.{i}.self_attn.{m}_proj" for i in range(3) for m in "qkvo"]
    linears += [f"layers.{i}.mlp.{m}_proj" for i in range(3) for m in ("gate", "up", "down")] + ["lm_head"]
    norms = [f"layers.{i}.{n}.weight" for i in range(3) for n in ("input_layernorm", "post_attention_layernorm")]
    expected = prompts | {f"{m}.adapter_{t}" for m in linears for t in ("bias", "scale")} | {*norms, "norm.weight"}
    assert trainable == expected


@pytest.mark.parametrize(("method", "count"), [("adapter", 1_229_760), ("adapter-v2", 4_279_744)])
def test_llama2_7b_trainable_counts(method, count):
    from lorafit.estimate import count_parameters

    config = Config.from_name("Llama-2-7B")
    with torch.device("meta"):
        model = LLaMA(config)
    # v1: 30 adapted layers x (10 prompt vectors x 4096 + 32 gates). v2 adds a bias and a scale on every linear
    # layer's output (7 per block and the LM head: 2 x (32 x 44_032 + 32_000)) and every RMSNorm (65 x 4096).
    assert get_method(method).apply(model, AdapterConfig()) == count
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count
    assert count_parameters(config, method)[0] == count


def test_grouped_query_prompt_attention_matches_a_by_hand_reference():
    model = tiny_model()
    apply_adapter(model, "adapter", SMALL_ADAPTER)
    perturb(model)
    attn = model.layers[1].self_attn
    adapter: PromptAdapter = attn.adapter
    q = torch.randn(2, TINY.n_head, 6, TINY.head_dim)
    with torch.no_grad():
        out = adapter(q, attn.k_proj, attn.v_proj)
        prompt = adapter.prompt.weight
        # No RoPE on the prompt's keys; each key/value head serves n_head / n_kv_head query heads.
        k = attn.k_proj(prompt).view(-1, TINY.n_kv_head, TINY.head_dim).transpose(0, 1).repeat_interleave(2, dim=0)
        v = attn.v_proj(prompt).view(-1, TINY.n_kv_head, TINY.head_dim).transpose(0, 1).repeat_interleave(2, dim=0)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(TINY.head_dim), dim=-1)
        expected = (weights @ v) * adapter.gate.view(1, -1, 1, 1)
    assert out.shape == (2, TINY.n_head, 6, TINY.head_dim)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_kv_cache_decoding_equals_full_recomputation(method, monkeypatch):
    from lorafit.generate import generate

    model = tiny_model()
    apply_adapter(model, method, SMALL_ADAPTER)
    perturb(model)
    projections = []
    original = PromptAdapter._project
    monkeypatch.setattr(PromptAdapter, "_project", lambda self, *a: projections.append(self) or original(self, *a))

    prompt = [1, 5, 17, 33, 9]
    tokens = list(generate(model, prompt, max_new_tokens=10))
    # The prompt's keys/values were computed once per adapted layer, not once per decoded token.
    assert len(projections) == 2
    model.setup_kv_cache(1, 64)
    seq = prompt + tokens
    with torch.no_grad():
        cached = [model(torch.tensor([seq[:5]]))[0]]
        cached += [model(torch.tensor([[seq[t]]]), start=t)[0] for t in range(5, len(seq))]
        model.clear_kv_cache()
        full = model(torch.tensor([seq]))[0]
    torch.testing.assert_close(torch.cat(cached), full, atol=1e-5, rtol=1e-5)
    assert [int(t) for t in full[4:-1].argmax(-1)] == tokens


def test_the_cached_prompt_follows_weight_changes():
    model = tiny_model()
    apply_adapter(model, "adapter", SMALL_ADAPTER)
    perturb(model)
    first = logits(model)
    with torch.no_grad():
        model.layers[2].self_attn.adapter.prompt.weight.mul_(2.0)
    changed = logits(model)
    assert not torch.equal(changed, first)
    model.train()  # a mode change drops the cache; the same weights give the same answer
    assert torch.equal(logits(model), changed)


def test_training_through_the_one_loop_lowers_the_loss(tmp_path):
    model = tiny_model()
    apply_adapter(model, "adapter-v2", SMALL_ADAPTER)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    cfg = small_config(max_steps=40, micro_batch_size=8, global_batch_size=8, learning_rate=2e-2, warmup_steps=4)
    train(model, repetitive_dataset(32), None, cfg, tmp_path, PAD, progress=False, fused_head=False)
    losses = [r["train_loss"] for r in read_metrics(tmp_path)]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert model.layers[1].self_attn.adapter.gate.abs().sum() > 0


@pytest.mark.parametrize("method", METHODS)
def test_save_and_load_round_trip_gives_identical_logits(tmp_path, method):
    model = tiny_model()
    apply_adapter(model, method, SMALL_ADAPTER)
    perturb(model)
    save_adapter(model, method, SMALL_ADAPTER, tmp_path, "some/base")
    assert json.loads((tmp_path / CONFIG_FILE).read_text()) == {
        "method": method,
        "prompt_length": 5,
        "start_layer": 1,
        "base_model_name_or_path": "some/base",
    }
    assert method_of_run(tmp_path).name == method
    loaded = tiny_model()
    assert get_method(method).load(loaded, tmp_path) == SMALL_ADAPTER
    assert torch.equal(logits(loaded), logits(model))


def test_runs_of_older_lorafit_with_an_adapter_config_json_still_load(tmp_path):
    """Before 0.2 the config file had PEFT's name; such runs are still recognised and loaded, never taken for LoRA."""
    model = tiny_model()
    apply_adapter(model, "adapter-v2", SMALL_ADAPTER)
    perturb(model)
    save_adapter(model, "adapter-v2", SMALL_ADAPTER, tmp_path, "b")
    (tmp_path / CONFIG_FILE).rename(tmp_path / LEGACY_CONFIG_FILE)
    assert method_of_run(tmp_path).name == "adapter-v2"
    loaded = tiny_model()
    get_method("adapter-v2").load(loaded, tmp_path)
    assert torch.equal(logits(loaded), logits(model))


def test_load_names_a_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model()
    apply_adapter(model, "adapter", SMALL_ADAPTER)
    save_adapter(model, "adapter", SMALL_ADAPTER, tmp_path, "b")
    tensors = load_file(tmp_path / WEIGHTS_FILE)
    del tensors["layers.2.self_attn.adapter.gate"]
    save_file(tensors, tmp_path / WEIGHTS_FILE)
    with pytest.raises(ValueError, match=r"adapter\.safetensors: missing tensor\(s\) layers\.2\.self_attn\.adapter"):
        get_method("adapter").load(tiny_model(), tmp_path)


def test_start_layer_beyond_the_model_is_refused():
    with pytest.raises(ValueError, match="adapter start_layer 3 leaves no layer to adapt"):
        apply_adapter(tiny_model(), "adapter", AdapterConfig(start_layer=3))


@pytest.mark.parametrize("tie", [False, True])
def test_folding_v2_scales_keeps_the_logits(tie):
    model = tiny_model(tie=tie)
    apply_adapter(model, "adapter-v2", SMALL_ADAPTER)
    perturb(model)
    before = logits(model)
    skipped = fold_scales(model)
    # A tied LM head shares the embedding, so its scale stays in the adapter.
    assert skipped == (["lm_head"] if tie else [])
    for name, module in model.named_modules():
        if isinstance(module, AdapterV2Linear) and name not in skipped:
            assert torch.equal(module.adapter_scale, torch.ones_like(module.adapter_scale))
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)


# ---- finetune() end to end on a tiny checkpoint ---------------------------------------------------


def numbers_data(tmp_path: Path) -> Path:
    records = [{"instruction": f"Say the number {i}.", "input": "", "output": f"{i} {i} {i}"} for i in range(16)]
    path = tmp_path / "numbers.json"
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("method", METHODS)
def test_finetune_end_to_end_and_generate_from_the_run(
    tmp_path,
    tiny_checkpoint,
    method,
    capsys,
    monkeypatch,
):
    from lorafit.finetune import DataOptions, finetune
    from lorafit.generate import LLM, generate
    from lorafit.rundir import read_run_file

    run_dir = tmp_path / "run"
    cfg = small_config(max_steps=3, max_seq_length=96, learning_rate=5e-2)
    config = AdapterConfig(prompt_length=4, start_layer=1)
    trained = {}
    method_object = get_method(method)
    save = method_object.save

    def save_and_keep(model, *args, **kwargs):
        trained["model"] = model
        return save(model, *args, **kwargs)

    monkeypatch.setattr(method_object, "save", save_and_keep)
    result = finetune(
        method,
        numbers_data(tmp_path),
        run_dir,
        checkpoint=tiny_checkpoint,
        train_config=cfg,
        data_options=DataOptions(val_size=2),
        progress=False,
        device="cpu",
        method_config=config,
    )
    assert result.steps == 3
    assert f"{method} (4 prompt tokens from layer 1): " in capsys.readouterr().out
    for name in (WEIGHTS_FILE, CONFIG_FILE, "lorafit_run.json", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / LEGACY_CONFIG_FILE).exists()  # PEFT's file name is not reused for another format
    run = read_run_file(run_dir)
    assert (run["method"], run[method]) == (method, {"prompt_length": 4, "start_layer": 1})
    assert get_method(method).base_reference(run_dir) == str(tiny_checkpoint.absolute())

    model = trained["model"].eval()
    prompt = [1, 20, 31, 44, 7]
    expected = list(generate(model, prompt, max_new_tokens=12))
    llm = LLM.load(adapter=run_dir, device="cpu", dtype="float32")
    assert list(generate(llm.model, prompt, max_new_tokens=12)) == expected


def test_merge_v2_folds_what_a_llama_checkpoint_holds_and_keeps_the_rest(tmp_path, tiny_checkpoint):
    from lorafit.checkpoint import load_model

    model = load_model(tiny_checkpoint)
    apply_adapter(model, "adapter-v2", SMALL_ADAPTER)
    perturb(model)
    run = tmp_path / "run"
    save_adapter(model, "adapter-v2", SMALL_ADAPTER, run, str(tiny_checkpoint))
    expected = logits(model)

    out = merge_run(run, tmp_path / "merged")
    merged = load_model(out)  # a plain Llama checkpoint with the scales and norms folded in
    assert not torch.equal(merged.norm.weight, load_model(tiny_checkpoint).norm.weight)
    assert method_of_run(out / "adapter").name == "adapter-v2"
    get_method("adapter-v2").load(
        merged, out / "adapter"
    )  # prompts, gates and biases stay an adapter, over the merged model
    assert all(
        torch.equal(m.adapter_scale, torch.ones_like(m.adapter_scale))
        for m in merged.modules()
        if isinstance(m, AdapterV2Linear)
    )
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=1e-5)
    # transformers reads the merged directory as a plain Llama (the adapter's subdirectory does not confuse it).
    import transformers

    hf = transformers.LlamaForCausalLM.from_pretrained(out)
    torch.testing.assert_close(hf.model.norm.weight, merged.norm.weight)


def test_merge_refuses_a_v1_run(tmp_path):
    model = tiny_model()
    apply_adapter(model, "adapter", SMALL_ADAPTER)
    save_adapter(model, "adapter", SMALL_ADAPTER, tmp_path, "b")
    with pytest.raises(ValueError, match="LLaMA-Adapter \\(v1\\) run has nothing to merge"):
        merge_run(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_finetune_takes_the_adapter_flags():
    from lorafit.cli import parse_args

    args = parse_args(["finetune", "adapter-v2", "--data", "d.json", "--out", "o"])
    assert (args.method, args.adapter_prompt_length, args.adapter_start_layer) == ("adapter-v2", 10, 2)
    args = parse_args(["finetune", "adapter", "--data", "d", "--out", "o", "--adapter-prompt-length", "4"])
    assert args.adapter_prompt_length == 4
