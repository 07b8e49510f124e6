"""Take a finetune out: a merged model as a llama.cpp GGUF, a LoRA run as a GGUF LoRA adapter, and an Ollama Modelfile.

The files follow what llama.cpp's own converters write (convert_hf_to_gguf.py for models, convert_lora_to_gguf.py
for adapters), through the `gguf` package's writer and quantisers: metadata keys under `llama.*` and
`tokenizer.ggml.*`, tensors under llama.cpp's names, and query/key rows in the interleaved RoPE layout llama.cpp
computes with (lorafit keeps Hugging Face's rotate-half layout; checkpoint.py undoes the same permutation on read).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorafit.checkpoint import GGUF_NAMES, GGUF_TOP, load_config, load_model
from lorafit.config import Config
from lorafit.gguf_vocab import LLAMA3_SPLIT, QWEN2_SPLIT
from lorafit.io import write_atomically, write_text
from lorafit.model import LLaMA, rope_inverse_frequencies
from lorafit.tokenizer import Tokenizer

FORMATS = ("gguf", "gguf-adapter")
OUTTYPES = ("f32", "f16", "bf16", "q8_0")

# lorafit name (without layers.N. and .weight) -> llama.cpp's, the inverse of what checkpoint.py reads.
_TO_GGUF = {ours: theirs for theirs, ours in GGUF_NAMES.items()}
_TOP_TO_GGUF = {ours: theirs for theirs, ours in GGUF_TOP.items()}
# GGUF token types (llama.cpp's, the same numbers as SentencePiece's piece types).
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


class ExportError(ValueError):
    """An export that cannot be done: wrong format, an unmergeable run, an adapter of another base."""


# ---------------------------------------------------------------------------------------------
# Public API


def merged_model(source: str | Path, checkpoint: str | Path | None = None) -> tuple[LLaMA, Path]:
    """The finetuned model with everything folded into plain Llama weights, and the checkpoint it came from.

    A run of any method is loaded and folded as its method says (lorafit.methods); a run whose trained
    tensors do not all fold (LLaMA-Adapter's live gates and biases) is refused; any checkpoint loads as is.
    """
    from lorafit.hub import resolve_checkpoint
    from lorafit.methods import method_of_run

    path = Path(source)
    try:
        method = method_of_run(path) if path.is_dir() else None
    except ValueError:  # a checkpoint directory rather than a run
        method = None
    if method is None:
        base = resolve_checkpoint(source)
        return load_model(base), base
    try:
        model, base = method.load_run(path, checkpoint)
    except ValueError as err:
        raise ExportError(f"the adapter {path} does not fit the base model {checkpoint or '(its own)'}: {err}") from err
    left = method.unfoldable(model)
    if left:
        raise ExportError(
            f"{path}: this {method.name} run has trained prompt gates, biases or a tied-head scale ({len(left)} "
            f"tensors, e.g. {left[0]}) that a llama.cpp model has no place for; use it in lorafit with --adapter "
            "(lorafit merge writes the rest beside the merged model)"
        )
    try:
        state = method.fold(model)
    except ValueError as err:
        raise ExportError(f"{path}: {err}; use it in lorafit with --adapter instead") from err
    with torch.device("meta"):
        plain = LLaMA(model.config)
    plain.load_state_dict(state, assign=True, strict=False)
    plain.tie_weights()
    return plain.eval(), base


def export(
    source: str | Path,
    out: str | Path,
    fmt: str = "gguf",
    outtype: str = "f32",
    checkpoint: str | Path | None = None,
    force: bool = False,
) -> tuple[Path, Path]:
    """Write `source` (a run or checkpoint) as a llama.cpp GGUF model or LoRA adapter; returns (file, Modelfile)."""
    out = Path(out)
    modelfile = out.with_suffix(".Modelfile")
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if outtype not in OUTTYPES:
        raise ExportError(f"unknown outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    for path in (out, modelfile):
        if path.exists() and not force:
            raise ExportError(f"{path} already exists; pass --force to overwrite it")
    if fmt == "gguf":
        model, base = merged_model(source, checkpoint)
        tokenizer = _export_tokenizer(base)
        name = Path(source).name if Path(source) != base else model.config.name  # a run is named after itself
        write_atomically(out, lambda tmp: write_gguf_model(model, tokenizer, tmp, outtype, name))
        text = ollama_modelfile(tokenizer, f"./{out.name}")
    else:
        base = write_gguf_adapter(source, out, outtype, checkpoint)
        tokenizer = _export_tokenizer(base)
        base_gguf = str(base.resolve()) if base.suffix == ".gguf" else None
        text = ollama_modelfile(tokenizer, base_gguf, adapter=f"./{out.name}")
    write_text(modelfile, text)
    return out, modelfile


def write_gguf_model(
    model: LLaMA, tokenizer: Tokenizer, path: str | Path, outtype: str = "f32", name: str | None = None
) -> None:
    """Write a llama.cpp GGUF of `model` with `tokenizer` in its metadata (called on a temporary path)."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or config.name)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_kv_head)
    writer.add_rope_dimension_count(config.head_dim)
    if config.head_dim != config.n_embd // config.n_head:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_file_type(outtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, config.vocab_size)

    state = {name: t.detach() for name, t in model.state_dict().items()}
    # Tied: llama.cpp uses token_embd for the head when there is no output tensor, as the reader assumes.
    if config.tie_embeddings and torch.equal(state["lm_head.weight"], state["embed_tokens.weight"]):
        del state["lm_head.weight"]
    if config.rope_scaling is not None:
        # llama.cpp takes Llama 3 scaling as per-frequency divisors, what checkpoint.py recovers the scaling from.
        plain = Config(**{**config.to_dict(), "rope_scaling": None})
        divisors = rope_inverse_frequencies(plain) / rope_inverse_frequencies(config)
        writer.add_tensor("rope_freqs.weight", divisors.float().numpy())
    for name, tensor in state.items():
        data = _llama_cpp_layout(name, tensor.float().cpu(), config)
        _add_tensor(writer, gguf_tensor_name(name), data.numpy(), outtype)
    _write(writer)


def write_gguf_adapter(
    source: str | Path, out: str | Path, outtype: str = "f32", checkpoint: str | Path | None = None
) -> Path:
    """Write a LoRA run as a llama.cpp LoRA adapter (as convert_lora_to_gguf.py does); returns the base checkpoint."""
    import gguf

    from lorafit.hub import resolve_checkpoint
    from lorafit.lora import adapter_base_model, load_peft_adapter, lora_modules
    from lorafit.methods import method_of_run
    from lorafit.methods.lora import LoRA

    path = Path(source)
    try:
        method = method_of_run(path)
    except (OSError, ValueError) as err:
        raise ExportError(f"{path}: not a LoRA run or PEFT adapter directory; --format gguf-adapter needs one") from err
    if not isinstance(method, LoRA):
        raise ExportError(
            f"{path}: a {method.name} run is not a LoRA adapter; llama.cpp adapters are LoRA only "
            "(export the merged model with --format gguf, or use the run in lorafit with --adapter)"
        )
    base = resolve_checkpoint(checkpoint or adapter_base_model(path))
    config = load_config(base)
    with torch.device("meta"):
        model = LLaMA(config)  # only the shapes are needed: the adapter's tensors are assigned, nothing is computed
    try:
        lora = load_peft_adapter(model, path)
    except ValueError as err:
        raise ExportError(f"the adapter {path} does not fit the base model {base}: {err}") from err
    if "lm_head" in lora.targets and config.tie_embeddings:
        raise ExportError(
            f"{path}: LoRA on a tied LM head cannot be a llama.cpp adapter (the base has no output tensor); "
            "export the merged model with --format gguf instead"
        )

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, "llama")
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_name(path.name)
        # llama.cpp scales by alpha / r (r from lora_a's shape); alpha = scaling * r also covers rsLoRA's alpha/sqrt(r).
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora.scaling * lora.r)
        writer.add_file_type(_file_type(outtype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, module in lora_modules(model):
            target = gguf_tensor_name(f"{name}.weight")
            a = module.lora_A.weight.detach().float()
            # W + B A with W's rows permuted is W' + (P B) A: only B's rows move.
            b = _llama_cpp_layout(f"{name}.weight", module.lora_B.weight.detach().float(), config)
            _add_tensor(writer, f"{target}.lora_a", a.numpy(), outtype)
            _add_tensor(writer, f"{target}.lora_b", b.numpy(), outtype)
        _write(writer)

    write_atomically(out, write)
    return base


def gguf_tensor_name(name: str) -> str:
    """llama.cpp's name for one of lorafit's tensors (layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight)."""
    base, _, suffix = name.rpartition(".")
    if base in _TOP_TO_GGUF:
        return f"{_TOP_TO_GGUF[base]}.{suffix}"
    _, layer, module = base.split(".", 2)
    return f"blk.{layer}.{_TO_GGUF[module]}.{suffix}"


def ollama_modelfile(tokenizer: Tokenizer, model: str | None, adapter: str | None = None) -> str:
    """An Ollama Modelfile: FROM the model (or base), ADAPTER, the chat template in Go syntax and the stop tokens."""
    lines = ["# Ollama: ollama create NAME -f THIS_FILE (paths are relative to this file)"]
    if model is None:
        lines.append("# FROM needs the base model as a GGUF: lorafit export BASE --format gguf --out base.gguf")
        model = "./base.gguf"
    lines.append(f"FROM {model}")
    if adapter is not None:
        lines.append(f"ADAPTER {adapter}")
    template, system = _go_template(tokenizer)
    if template is None:
        lines.append("# The chat template is not one lorafit converts (ChatML, Llama 3); a plain prompt instead.")
        template = "{{ .Prompt }}"
    lines.append(f'TEMPLATE """{template}"""')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    for token_id in sorted(tokenizer.stop_ids):
        lines.append(f"PARAMETER stop {json.dumps(tokenizer.decode([token_id]))}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Tensors


def half_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half query/key rows in the interleaved-pairs order of Meta's code and llama.cpp (the inverse of
    checkpoint.interleaved_to_half, which the GGUF reader applies)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _llama_cpp_layout(name: str, tensor: torch.Tensor, config: Config) -> torch.Tensor:
    """Query/key rows in llama.cpp's interleaved RoPE order (what convert_hf_to_gguf's permute does)."""
    if name.endswith("self_attn.q_proj.weight"):
        return half_to_interleaved(tensor, config.n_head)
    if name.endswith("self_attn.k_proj.weight"):
        return half_to_interleaved(tensor, config.n_kv_head)
    return tensor


def _file_type(outtype: str) -> int:
    import gguf

    types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    return types[outtype]


def _add_tensor(writer: Any, name: str, data: np.ndarray, outtype: str) -> None:
    """Add one tensor: vectors stay float32 (as llama.cpp's converter keeps norms); matrices take the outtype."""
    import gguf

    qtype = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[outtype]
    if data.ndim < 2:
        qtype = gguf.GGMLQuantizationType.F32
    try:
        packed = gguf.quants.quantize(data, qtype)
    except gguf.QuantError:
        # Rows that are not whole Q8_0 blocks (32 values); llama.cpp's converter also falls back to F16 there.
        qtype = gguf.GGMLQuantizationType.F16
        packed = gguf.quants.quantize(data, qtype)
    raw = qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    writer.add_tensor(name, packed, raw_dtype=qtype if raw else None)


def _write(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------------------------------------
# Tokenizer


def _export_tokenizer(base: Path) -> Tokenizer:
    """The base model's tokenizer; a SentencePiece tokenizer.model beats a tokenizer.json that is not byte-level."""
    tokenizer = Tokenizer.from_checkpoint(base)
    spm_file = base / "tokenizer.model" if base.is_dir() else None
    if spm_file is not None and spm_file.is_file() and _bpe_pre(tokenizer) is None:
        return Tokenizer.from_checkpoint(spm_file)
    return tokenizer


def _bpe_pre(tokenizer: Tokenizer) -> str | None:
    """llama.cpp's tokenizer.ggml.pre for a byte-level BPE tokenizer.json, None when it is not one we know."""
    tok = getattr(tokenizer._backend, "tok", None)
    if tok is None:
        return None
    pre = json.loads(tok.to_str()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # GPT-2's split after single digits (SmolLM, StarCoder)
    if kinds == ["Split", "ByteLevel"]:
        regex = steps[0].get("pattern", {}).get("Regex")
        return {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}.get(regex)
    return None


def _add_tokenizer(writer: Any, tokenizer: Tokenizer, vocab_size: int) -> None:
    """tokenizer.ggml.*: vocabulary, merges or scores, token types, special ids, the chat template."""
    backend = tokenizer._backend
    if hasattr(backend, "sp"):
        tokens, scores, types, add_space_prefix = _sentencepiece_vocab(backend.sp)
        writer.add_tokenizer_model("llama")
        writer.add_add_space_prefix(add_space_prefix)
    else:
        pre = _bpe_pre(tokenizer)
        if pre is None:
            raise ExportError(
                "the tokenizer is neither byte-level BPE of a kind llama.cpp names (gpt2, smollm, llama-bpe, qwen2) "
                "nor a SentencePiece tokenizer.model; llama.cpp could not split text as it does"
            )
        tokens, merges, types = _bpe_vocab(backend.tok)
        scores = None
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_merges(merges)
    if len(tokens) > vocab_size:
        raise ExportError(f"the tokenizer has {len(tokens)} tokens, more than the model's vocab_size {vocab_size}")
    # The embedding may be padded beyond the tokenizer; llama.cpp wants one entry per row.
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(_UNUSED)
        if scores is not None:
            scores.append(-1000.0)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
    special = tokenizer._special
    for name, add in (
        ("bos_token", writer.add_bos_token_id),
        ("eos_token", writer.add_eos_token_id),
        ("unk_token", writer.add_unk_token_id),
        ("pad_token", writer.add_pad_token_id),
    ):
        token_id = tokenizer.token_to_id(special[name]) if name in special else None
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(tokenizer.add_bos)
    writer.add_add_eos_token(tokenizer.add_eos)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _bpe_vocab(tok: Any) -> tuple[list[str], list[str], list[int]]:
    """Tokens (in the byte alphabet, as tokenizer.json spells them), merges "a b" and types, by id."""
    data = json.loads(tok.to_str())
    model = data["model"]
    by_id = {i: token for token, i in model["vocab"].items()}
    types = {}
    for added in data.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = _CONTROL if added.get("special") else _USER_DEFINED
    size = max(by_id) + 1
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    kinds = [types.get(i, _NORMAL if i in by_id else _UNUSED) for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, merges, kinds


def _sentencepiece_vocab(sp: Any) -> tuple[list[str], list[float], list[int], bool]:
    """Pieces, scores and types (SentencePiece's numbering is GGUF's) and whether a space is prefixed."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    tokens = [p.piece for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]
    return tokens, scores, types, bool(proto.normalizer_spec.add_dummy_prefix)


# ---------------------------------------------------------------------------------------------
# Ollama's chat template (Go text/template)

_PROBE = [
    {"role": "system", "content": "S1"},
    {"role": "user", "content": "U1"},
    {"role": "assistant", "content": "A1"},
    {"role": "user", "content": "U2"},
]
# Each style: how it renders one turn, the generation prompt, and the same in Ollama's Go template syntax.
_STYLES = {
    "chatml": (
        "<|im_start|>{role}\n{content}<|im_end|>\n",
        "<|im_start|>assistant\n",
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
    ),
    "llama3": (
        "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
}


def _go_template(tokenizer: Tokenizer) -> tuple[str | None, str | None]:
    """(Go template, default system prompt) when the Jinja template renders exactly like a known style."""
    if not tokenizer.chat_template:
        return None, None
    try:
        rendered = tokenizer.apply_chat_template(_PROBE)
        alone = tokenizer.apply_chat_template(_PROBE[1:2])
    except Exception:  # a template that needs other variables is simply not one of the known styles
        return None, None
    # llama.cpp and Ollama add BOS themselves; a template that writes it too is still the same style.
    bos = tokenizer._special.get("bos_token") or ""
    for turn, prompt, go in _STYLES.values():
        expected = "".join(turn.format(**m) for m in _PROBE) + prompt
        if rendered not in (expected, bos + expected):
            continue
        alone = alone.removeprefix(bos) if rendered != expected else alone
        user_only = turn.format(**_PROBE[1]) + prompt
        if alone == user_only:
            return go, None
        # A template that adds a system message when none is given: Ollama's SYSTEM does the same.
        before, _, after = turn.format(role="system", content="\x00").partition("\x00")
        head = alone.removesuffix(user_only)
        if alone.endswith(user_only) and head.startswith(before) and head.endswith(after):
            return go, head[len(before) : len(head) - len(after)]
        return None, None
    return None, None


# ---------------------------------------------------------------------------------------------
# CLI
