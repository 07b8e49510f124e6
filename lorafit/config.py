"""Model configuration: one dataclass, and the model zoo as plain data."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class RopeScaling:
    """Llama 3's frequency-dependent RoPE scaling (rope_type "llama3" in Hugging Face configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class Config:
    """Shape of a LLaMA-family decoder.

    n_layer, n_embd, n_head and block_size are nanoGPT's names (litgpt keeps them too) and n_kv_head follows
    them; vocab_size, intermediate_size, head_dim and rope_theta keep Hugging Face's names, and norm_eps and
    tie_embeddings shorten HF's rms_norm_eps and tie_word_embeddings. `from_hf` maps one set to the other.
    """

    name: str = "custom"
    hf_repo: str | None = None
    """Hugging Face repo id the weights come from, if any."""
    vocab_size: int = 32000
    n_layer: int = 32
    n_embd: int = 4096
    n_head: int = 32
    n_kv_head: int = 32
    """Key/value heads; fewer than n_head means grouped-query attention."""
    intermediate_size: int = 11008
    """Hidden width of the SwiGLU MLP."""
    head_dim: int | None = None
    """Per-head width; None means n_embd // n_head."""
    block_size: int = 4096
    """Longest sequence the model was trained for (max_position_embeddings)."""
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    """Whether the LM head shares the token embedding's weight."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Architecture fields we keep for export but do not use (e.g. Mistral's sliding_window)."""

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.head_dim is None:
            self.head_dim = self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Config:
        """A named config from the zoo below (case-insensitive; the HF repo id works too)."""
        key = name.lower()
        for entry in CONFIGS:
            if key in (entry["name"].lower(), (entry.get("hf_repo") or "").lower()):
                return cls(**{**entry, **overrides})
        known = ", ".join(c["name"] for c in CONFIGS)
        raise ValueError(f"unknown model name {name!r}; known: {known}")

    @classmethod
    def from_hf(cls, path: str | Path | dict, name: str | None = None) -> Config:
        """Read a Hugging Face config.json (LlamaForCausalLM / MistralForCausalLM)."""
        if isinstance(path, dict):
            hf, where = path, "config"
        else:
            where = str(path)
            hf = json.loads(Path(path).read_text())
        archs = hf.get("architectures") or []
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES and not set(archs) & SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{where}: unsupported architecture {archs or model_type!r}; "
                f"lorafit reads {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ValueError(f"{where}: {flag}=true is not supported")
        scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
        rope_theta = hf.get("rope_theta") or (scaling or {}).get("rope_theta", 10000.0)
        rope_scaling = None
        if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
            rope_scaling = RopeScaling(
                factor=scaling["factor"],
                low_freq_factor=scaling["low_freq_factor"],
                high_freq_factor=scaling["high_freq_factor"],
                original_max_position_embeddings=scaling["original_max_position_embeddings"],
            )
        elif scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise ValueError(f"{where}: unsupported rope_scaling {scaling!r}")
        extra = {k: hf[k] for k in ("sliding_window", "bos_token_id", "eos_token_id") if k in hf}
        if archs:
            extra["architectures"] = archs
        n_head = hf["num_attention_heads"]
        return cls(
            name=name or hf.get("_name_or_path") or "custom",
            vocab_size=hf["vocab_size"],
            n_layer=hf["num_hidden_layers"],
            n_embd=hf["hidden_size"],
            n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head,
            intermediate_size=hf["intermediate_size"],
            head_dim=hf.get("head_dim"),
            block_size=hf.get("max_position_embeddings", 4096),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            norm_eps=hf.get("rms_norm_eps", 1e-5),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            extra=extra,
        )

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face config.json for this shape, loadable by transformers."""
        is_mistral = "MistralForCausalLM" in self.extra.get("architectures", [])
        hf: dict[str, Any] = {
            "architectures": ["MistralForCausalLM" if is_mistral else "LlamaForCausalLM"],
            "model_type": "mistral" if is_mistral else "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.n_embd,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_kv_head,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.block_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
        }
        if self.rope_scaling is not None:
            hf["rope_scaling"] = {"rope_type": "llama3", **asdict(self.rope_scaling)}
        for key in ("sliding_window", "bos_token_id", "eos_token_id"):
            if key in self.extra:
                hf[key] = self.extra[key]
        return hf

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM"}
SUPPORTED_MODEL_TYPES = {"llama", "mistral"}

_LLAMA3_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
_LLAMA32_SCALING = {**_LLAMA3_SCALING, "factor": 32.0}

# The model zoo: plain data, one dict per model. Values from each model's published config.json.
# fmt: off
CONFIGS: list[dict[str, Any]] = [
    # SmolLM2 (HuggingFaceTB): the embedded default is SmolLM2-135M-Instruct.
    *(
        dict(name=f"SmolLM2-{size}{suffix}", hf_repo=f"HuggingFaceTB/SmolLM2-{size}{suffix}", vocab_size=49152,
             n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_kv_head=n_kv_head, intermediate_size=inter,
             block_size=8192, rope_theta=theta, tie_embeddings=True)
        for size, n_layer, n_embd, n_head, n_kv_head, inter, theta in (
            ("135M", 30, 576, 9, 3, 1536, 100000.0),
            ("360M", 32, 960, 15, 5, 2560, 100000.0),
            ("1.7B", 24, 2048, 32, 32, 8192, 130000.0),
        )
        for suffix in ("", "-Instruct")
    ),
    dict(name="TinyLlama-1.1B", hf_repo="TinyLlama/TinyLlama-1.1B-Chat-v1.0", vocab_size=32000, n_layer=22,
         n_embd=2048, n_head=32, n_kv_head=4, intermediate_size=5632, block_size=2048),
    dict(name="Llama-2-7B", hf_repo="meta-llama/Llama-2-7b-hf", vocab_size=32000, n_layer=32, n_embd=4096,
         n_head=32, n_kv_head=32, intermediate_size=11008, block_size=4096),
    dict(name="Llama-2-13B", hf_repo="meta-llama/Llama-2-13b-hf", vocab_size=32000, n_layer=40, n_embd=5120,
         n_head=40, n_kv_head=40, intermediate_size=13824, block_size=4096),
    dict(name="Llama-2-70B", hf_repo="meta-llama/Llama-2-70b-hf", vocab_size=32000, n_layer=80, n_embd=8192,
         n_head=64, n_kv_head=8, intermediate_size=28672, block_size=4096),
    dict(name="Llama-3.1-8B", hf_repo="meta-llama/Llama-3.1-8B", vocab_size=128256, n_layer=32, n_embd=4096,
         n_head=32, n_kv_head=8, intermediate_size=14336, block_size=131072, rope_theta=500000.0,
         rope_scaling=_LLAMA3_SCALING),
    dict(name="Llama-3.1-70B", hf_repo="meta-llama/Llama-3.1-70B", vocab_size=128256, n_layer=80, n_embd=8192,
         n_head=64, n_kv_head=8, intermediate_size=28672, block_size=131072, rope_theta=500000.0,
         rope_scaling=_LLAMA3_SCALING),
    dict(name="Llama-3.2-1B", hf_repo="meta-llama/Llama-3.2-1B", vocab_size=128256, n_layer=16, n_embd=2048,
         n_head=32, n_kv_head=8, intermediate_size=8192, block_size=131072, rope_theta=500000.0,
         rope_scaling=_LLAMA32_SCALING, tie_embeddings=True),
    dict(name="Llama-3.2-3B", hf_repo="meta-llama/Llama-3.2-3B", vocab_size=128256, n_layer=28, n_embd=3072,
         n_head=24, n_kv_head=8, intermediate_size=8192, block_size=131072, rope_theta=500000.0,
         rope_scaling=_LLAMA32_SCALING, tie_embeddings=True),
    dict(name="Mistral-7B-v0.1", hf_repo="mistralai/Mistral-7B-v0.1", vocab_size=32000, n_layer=32, n_embd=4096,
         n_head=32, n_kv_head=8, intermediate_size=14336, block_size=32768,
         extra={"sliding_window": 4096, "architectures": ["MistralForCausalLM"]}),
]
# fmt: on
