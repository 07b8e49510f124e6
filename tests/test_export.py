"""lorafit export: GGUF models and LoRA adapters that lorafit, transformers and llama.cpp's layout agree on."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lorafit.adapter import AdapterConfig, AdapterV2Linear
from lorafit.checkpoint import load_model, read_gguf, save_hf_model
from lorafit.cli import main
from lorafit.config import Config, RopeScaling
from lorafit.export import ExportError, export, gguf_tensor_name, half_to_interleaved, merged_model, ollama_modelfile
from lorafit.lora import LoRAConfig, apply_lora, lora_modules, save_peft_adapter
from lorafit.methods import get_method
from lorafit.model import LLaMA
from lorafit.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")

# Largest logit difference relative to the largest logit, export read back vs the merged model, measured on the
# default model (SmolLM2-135M-Instruct, 59 tokens of a chat prompt): f16 1.1e-3, bf16 7.2e-3, q8_0 3.5e-2
# (greedy argmax: the same at 59/59, 59/59 and 57/59 positions). The tiny random model amplifies rounding far
# more (its residual stream is near zero), so there the weights are checked against each format's rounding bound.
LOGIT_TOLERANCE = {"f32": 1e-5, "f16": 3e-3, "bf16": 2e-2, "q8_0": 6e-2}
# Worst |stored - exact| / max|exact| of a matrix: half an ulp of f16 (2^-11) and bf16 (2^-8); Q8_0 rounds to
# max|block| / 127, half a step is 1/254 of the block's (so the tensor's) largest value, plus its f16 scale.
WEIGHT_BOUND = {"f32": 0.0, "f16": 2**-11, "bf16": 2**-8, "q8_0": 1 / 254 + 2**-11}
TEXT = "Once upon a time, there was a little girl named Lily. She liked 123 cats!\nThe end."


@pytest.fixture(scope="module")
def lora_run(tiny_checkpoint: Path, tmp_path_factory) -> Path:
    """A LoRA adapter on every linear layer of the tiny model, with random (non-zero) A and B."""
    model = load_model(tiny_checkpoint)
    config = LoRAConfig(r=4, alpha=8, targets="all")
    apply_lora(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, module in lora_modules(model):
            module.lora_A.weight.normal_(0, 0.3)
            module.lora_B.weight.normal_(0, 0.3)
    out = tmp_path_factory.mktemp("runs") / "lora"
    save_peft_adapter(model, config, out, str(tiny_checkpoint))
    return out


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


def _relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / ours.abs().max()).item()


def _ids() -> torch.Tensor:
    return torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_lorafit_reads_its_export_back(lora_run: Path, tmp_path: Path, outtype: str) -> None:
    merged, _ = merged_model(lora_run)
    out, modelfile = export(lora_run, tmp_path / "model.gguf", outtype=outtype)
    exact = merged.state_dict()
    _, stored = read_gguf(out)
    errors = {name: _relative_error(exact[name], tensor) for name, tensor in stored.items()}
    assert set(errors) == set(exact)
    assert max(errors.values()) <= WEIGHT_BOUND[outtype]
    if outtype == "f32":
        assert _relative_error(_logits(merged, _ids()), _logits(load_model(out), _ids())) <= LOGIT_TOLERANCE["f32"]
    else:  # the matrices really were stored narrower; norms are kept exact
        assert errors["layers.0.mlp.up_proj.weight"] > 0 and errors["norm.weight"] == 0
    assert modelfile.read_text().splitlines()[1] == "FROM ./model.gguf"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.Modelfile", "model.gguf"]


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_transformers_gguf_loader_agrees(lora_run: Path, tmp_path: Path, outtype: str) -> None:
    transformers = pytest.importorskip("transformers")
    merged, _ = merged_model(lora_run)
    export(lora_run, tmp_path / "model.gguf", outtype=outtype)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    reread = load_model(tmp_path / "model.gguf")  # the same file read by lorafit: the two readers must agree
    assert _relative_error(_logits(reread, _ids()), _logits(theirs, _ids())) <= 1e-5
    if outtype == "f32":
        assert _relative_error(_logits(merged, _ids()), _logits(theirs, _ids())) <= LOGIT_TOLERANCE["f32"]


def test_metadata_and_tensor_layout(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out, _ = export(tiny_checkpoint, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(out)
    field = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert field["general.architecture"] == "llama"
    assert field["general.type"] == "model"
    assert field["general.name"] == "base"  # the checkpoint's name; a run's export is named after the run
    assert (field["llama.block_count"], field["llama.embedding_length"], field["llama.feed_forward_length"]) == (
        2,
        32,
        64,
    )
    assert (field["llama.attention.head_count"], field["llama.attention.head_count_kv"]) == (4, 2)
    assert field["llama.context_length"] == 256
    assert field["llama.vocab_size"] == 512
    assert field["llama.rope.dimension_count"] == 8
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" in tensors  # the tiny model does not tie its head
    state = load_model(tiny_checkpoint).state_dict()
    # Queries and keys are stored in llama.cpp's interleaved order (q: 4 heads, k: 2), everything else as is.
    q = torch.from_numpy(np.array(tensors["blk.1.attn_q.weight"].data))
    k = torch.from_numpy(np.array(tensors["blk.1.attn_k.weight"].data))
    v = torch.from_numpy(np.array(tensors["blk.1.attn_v.weight"].data))
    assert torch.equal(q, half_to_interleaved(state["layers.1.self_attn.q_proj.weight"], 4))
    assert torch.equal(k, half_to_interleaved(state["layers.1.self_attn.k_proj.weight"], 2))
    assert torch.equal(v, state["layers.1.self_attn.v_proj.weight"])
    assert not torch.equal(q, state["layers.1.self_attn.q_proj.weight"])
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_norms_stay_f32_and_matrices_take_the_outtype(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out, _ = export(tiny_checkpoint, tmp_path / "m.gguf", outtype="q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0


def test_full_run_gguf_and_rope_scaling_export_as_is(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # A full finetuning run keeps its model in run/model; an exported .gguf is a checkpoint like any other.
    shutil.copytree(tiny_checkpoint, tmp_path / "run" / "model")
    first, _ = export(tmp_path / "run", tmp_path / "first.gguf")
    again, _ = export(first, tmp_path / "again.gguf")
    _, a = read_gguf(first)
    _, b = read_gguf(again)
    assert all(torch.equal(a[name], b[name]) for name in a) and a.keys() == b.keys()
    assert Tokenizer.from_gguf(again).encode(TEXT) == Tokenizer.from_checkpoint(tiny_checkpoint).encode(TEXT)

    # Llama 3 RoPE scaling travels as llama.cpp's rope_freqs tensor (per-frequency divisors: with theta 5e5 and
    # head_dim 8 one frequency is scaled fully, one partly); a tied head as no output tensor.
    scaling = RopeScaling(factor=8.0)
    config = Config(
        vocab_size=512, n_layer=1, n_embd=32, n_head=4, n_kv_head=2, intermediate_size=64, block_size=256,
        rope_theta=500000.0, rope_scaling=scaling, tie_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(3)
    model = LLaMA(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, 0, 0.5)
    save_hf_model(model.state_dict(), config, tmp_path / "llama3")
    Tokenizer.from_checkpoint(tiny_checkpoint).save(tmp_path / "llama3")
    out, _ = export(tmp_path / "llama3", tmp_path / "llama3.gguf")
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert "rope_freqs.weight" in names and "output.weight" not in names
    back = load_model(out)
    assert back.config.rope_scaling == scaling and back.config.tie_embeddings
    assert _relative_error(_logits(model.eval(), _ids()), _logits(back, _ids())) <= LOGIT_TOLERANCE["f32"]


def test_tokenizer_round_trips(tiny_checkpoint: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    out, _ = export(tiny_checkpoint, tmp_path / "m.gguf")
    original = Tokenizer.from_checkpoint(tiny_checkpoint)
    back = Tokenizer.from_gguf(out)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert back.encode(TEXT) == original.encode(TEXT)
    assert (back.bos_id, back.eos_id, back.add_bos) == (original.bos_id, original.eos_id, original.add_bos)
    # A SentencePiece model's remove_extra_whitespaces has no GGUF key (llama.cpp never collapses spaces), so
    # "a  b" is only compared between the two GGUF readers.
    for text in (TEXT, "two  spaces and\ttabs 2024-01-05"):
        assert theirs(text)["input_ids"] == back.encode(text)
    meta = gguf.GGUFReader(out).fields
    assert meta["tokenizer.ggml.model"].contents() == "llama"
    assert len(meta["tokenizer.ggml.scores"].contents()) == 512


def test_adapter_file_reproduces_the_merged_weights(lora_run: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    base_file, _ = export(tiny_checkpoint, tmp_path / "base.gguf")
    adapter_file, modelfile = export(lora_run, tmp_path / "adapter.gguf", fmt="gguf-adapter")
    reader = gguf.GGUFReader(adapter_file)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.type"] == "adapter"
    assert fields["general.architecture"] == "llama"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 8.0
    lora = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    expected = {
        f"blk.{i}.{name}.weight.lora_{ab}"
        for i in range(2)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
        for ab in "ab"
    }
    assert set(lora) == expected
    assert lora["blk.0.attn_q.weight.lora_a"].shape == (4, 32)
    assert lora["blk.0.attn_k.weight.lora_b"].shape == (16, 4)
    assert lora["blk.0.ffn_down.weight.lora_a"].shape == (4, 64)
    # llama.cpp's merge: W + alpha / r * B A, on the base as stored in the GGUF; it must be the merged model's weight.
    base = {t.name: torch.from_numpy(np.array(t.data)) for t in gguf.GGUFReader(base_file).tensors}
    merged, _ = merged_model(lora_run)
    for name, weight in merged.state_dict().items():
        if ".layers." in f".{name}" and name.endswith("proj.weight"):
            target = gguf_tensor_name(name)
            in_gguf = base[target] + 8.0 / 4 * lora[f"{target}.lora_b"] @ lora[f"{target}.lora_a"]
            heads = {"q_proj": 4, "k_proj": 2}.get(name.split(".")[-2])
            want = half_to_interleaved(weight, heads) if heads else weight
            torch.testing.assert_close(in_gguf, want, rtol=0, atol=1e-5)
    text = modelfile.read_text()
    assert "ADAPTER ./adapter.gguf" in text and "FROM ./base.gguf" in text

    # Over a GGUF base (the one just exported), Ollama's FROM can name it.
    _, modelfile = export(lora_run, tmp_path / "on-gguf.gguf", fmt="gguf-adapter", checkpoint=base_file)
    assert f"FROM {base_file.resolve()}\nADAPTER ./on-gguf.gguf\n" in modelfile.read_text()

    # q8_0: lora_a's rows (the input width) quantise; lora_b's rows of r=4 values are not whole blocks, so f16.
    quantised, _ = export(lora_run, tmp_path / "adapter-q8.gguf", fmt="gguf-adapter", outtype="q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(quantised).tensors}
    assert types["blk.0.attn_q.weight.lora_a"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_q.weight.lora_b"] == gguf.GGMLQuantizationType.F16


def test_adapter_v2_folds_when_it_fits_and_is_refused_when_not(tiny_checkpoint: Path, tmp_path: Path) -> None:
    model = load_model(tiny_checkpoint)
    get_method("adapter-v2").apply(model, AdapterConfig(prompt_length=2, start_layer=1))
    torch.manual_seed(2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, AdapterV2Linear):
                module.adapter_scale.uniform_(0.5, 1.5)
        model.norm.weight.mul_(1.1)
    run = tmp_path / "v2"
    save_adapter(model, "adapter-v2", run, tiny_checkpoint)
    out, _ = export(run, tmp_path / "v2.gguf")
    assert _relative_error(_logits(model, _ids()), _logits(load_model(out), _ids())) <= LOGIT_TOLERANCE["f32"]

    with torch.no_grad():
        model.layers[1].self_attn.adapter.gate.fill_(0.5)
    save_adapter(model, "adapter-v2", run, tiny_checkpoint)
    with pytest.raises(ExportError, match="prompt gates, biases .* no place"):
        export(run, tmp_path / "v2b.gguf")
    assert not (tmp_path / "v2b.gguf").exists()
    with pytest.raises(ExportError, match="not a LoRA adapter"):
        export(run, tmp_path / "v2.adapter.gguf", fmt="gguf-adapter")


def test_adapter_v1_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    model = load_model(tiny_checkpoint)
    get_method("adapter").apply(model, AdapterConfig(prompt_length=2, start_layer=1))
    save_adapter(model, "adapter", tmp_path / "v1", Path("base"))
    with pytest.raises(ExportError, match=r"LLaMA-Adapter \(v1\) run has nothing to merge.*--adapter"):
        export(tmp_path / "v1", tmp_path / "v1.gguf", checkpoint=tiny_checkpoint)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"]


def test_bad_inputs(lora_run: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="unknown export format 'ggml'"):
        export(tiny_checkpoint, tmp_path / "m.gguf", fmt="ggml")
    with pytest.raises(ExportError, match="unknown outtype 'q4_0'"):
        export(tiny_checkpoint, tmp_path / "m.gguf", outtype="q4_0")
    (tmp_path / "m.gguf").write_text("keep me")
    with pytest.raises(ExportError, match="m.gguf already exists; pass --force"):
        export(tiny_checkpoint, tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_text() == "keep me"
    with pytest.raises(ExportError, match="not a LoRA run or PEFT adapter directory"):
        export(tiny_checkpoint, tmp_path / "a.gguf", fmt="gguf-adapter")

    # An adapter of another base: a wider model with the same tokenizer.
    import transformers

    other = tmp_path / "other"
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    transformers.LlamaForCausalLM(config).save_pretrained(other)
    Tokenizer.from_checkpoint(tiny_checkpoint).save(other)
    for fmt in ("gguf", "gguf-adapter"):
        with pytest.raises(ExportError, match=f"the adapter {lora_run} does not fit the base model {other}: .*shape"):
            export(lora_run, tmp_path / f"{fmt}.gguf", fmt=fmt, checkpoint=other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "other"]

    export(tiny_checkpoint, tmp_path / "m.gguf", force=True)
    assert load_model(tmp_path / "m.gguf").config.n_layer == 2


CHATML = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_modelfile_converts_chatml_and_falls_back_plainly(tiny_checkpoint: Path) -> None:
    tokenizer = Tokenizer.from_checkpoint(tiny_checkpoint)
    tokenizer.chat_template = CHATML
    text = ollama_modelfile(tokenizer, "./m.gguf")
    assert (
        'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
        '<|im_start|>assistant\n"""'
    ) in text
    assert 'SYSTEM """You are helpful."""' in text
    assert 'PARAMETER stop "</s>"' in text

    # Llama 3 style, writing BOS itself (llama.cpp adds it, so the Go template must not).
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    text = ollama_modelfile(tokenizer, "./m.gguf")
    assert 'TEMPLATE """{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n' in text
    assert "<s>" not in text and "SYSTEM" not in text

    tokenizer.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    text = ollama_modelfile(tokenizer, "./m.gguf")
    assert 'TEMPLATE """{{ .Prompt }}"""' in text and "# The chat template is not one lorafit converts" in text
    assert "SYSTEM" not in text


def save_adapter(model: LLaMA, method: str, run: Path, base: Path) -> None:
    get_method(method).save(model, AdapterConfig(prompt_length=2, start_layer=1), run, base, base_reference=str(base))


def test_cli(lora_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "m.gguf"
    main(["export", str(lora_run), "--out", str(out), "--outtype", "f16"])
    printed = capsys.readouterr().out
    assert f"wrote {out} (llama.cpp GGUF model, f16" in printed
    assert f"next: ollama create NAME -f {tmp_path / 'm.Modelfile'}" in printed
    with pytest.raises(SystemExit) as exit:
        main(["export", str(lora_run), "--out", str(out)])
    assert exit.value.code == 2
    assert re.search(r"lorafit export: error: .*m.gguf already exists; pass --force", capsys.readouterr().err)


@pytest.mark.slow
def test_default_model(default_checkpoint: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model = load_model(default_checkpoint)
    ids = torch.tensor([Tokenizer.from_checkpoint(default_checkpoint).encode(TEXT)])
    # f16 and bf16 are checked on the tiny model; here the exact type and the quantised one.
    for outtype in ("f32", "q8_0"):
        out, modelfile = export(default_checkpoint, tmp_path / f"{outtype}.gguf", outtype=outtype)
        assert _relative_error(_logits(model, ids), _logits(load_model(out), ids)) <= LOGIT_TOLERANCE[outtype]
        if outtype != "f32":
            out.unlink()  # 135M parameters: keep the disk use down
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="f32.gguf", dtype=torch.float32)
    assert _relative_error(_logits(model, ids), _logits(theirs, ids)) <= LOGIT_TOLERANCE["f32"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="f32.gguf")
    back = Tokenizer.from_gguf(tmp_path / "f32.gguf")
    original = Tokenizer.from_checkpoint(default_checkpoint)
    chat = original.apply_chat_template([{"role": "user", "content": TEXT}])
    for text in (TEXT, "two  spaces, 2024-01-05 <|im_end|>", chat):
        assert back.encode(text) == original.encode(text) == hf_tok(text)["input_ids"]
    assert back.chat_template == original.chat_template
    text = modelfile.read_text()
    assert "<|im_start|>{{ .Role }}" in text and 'SYSTEM """You are a helpful AI assistant' in text
    assert 'PARAMETER stop "<|im_end|>"' in text


@pytest.mark.slow
def test_default_export_has_the_metadata_llama_cpps_converter_wrote(
    default_gguf: Path, default_checkpoint: Path, tmp_path: Path
) -> None:
    # The default model's GGUF was written by llama.cpp's convert_hf_to_gguf.py; lorafit's export of it (through
    # the float checkpoint lorafit made from it) must give llama.cpp the same model and tokenizer keys and
    # tensors, since benchmarks/llamacpp_check.py found llama.cpp's tokens and greedy answers equal to lorafit's.
    out, _ = export(default_checkpoint, tmp_path / "m.gguf", outtype="q8_0")
    theirs, ours = gguf.GGUFReader(default_gguf), gguf.GGUFReader(out)

    def fields(reader) -> dict:
        return {k: f.contents() for k, f in reader.fields.items() if k.startswith(("llama.", "tokenizer."))}

    want, got = fields(theirs), fields(ours)
    # gpt2 vocabularies default to no space prefix in llama.cpp; add_eos_token False is its default too.
    assert want.pop("tokenizer.ggml.add_space_prefix") is False and got.pop("tokenizer.ggml.add_eos_token") is False
    assert want.keys() == got.keys()
    assert [k for k in want if want[k] != got[k]] == []
    assert {t.name: t.shape.tolist() for t in theirs.tensors} == {t.name: t.shape.tolist() for t in ours.tensors}
