"""The LLaMA-family decoder, readable top to bottom.

Module names match Hugging Face's LlamaForCausalLM (q_proj, gate_proj, input_layernorm, ...), so
weights and PEFT adapters map by name alone, and rotary embeddings use HF's rotate-half layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorafit.config import Config
from lorafit.ops import project, rms_norm, swiglu


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich, 2019), computed in float32 as Llama does."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_inverse_frequencies(config: Config) -> torch.Tensor:
    """RoPE's per-pair rotation speeds, with Llama 3's long-context rescaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    # Llama 3: slow (long-wavelength) frequencies are divided by `factor`, fast ones kept, and the
    # band in between interpolated smoothly.
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def build_rope_cache(config: Config, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (length, head_dim) for positions 0..length-1; sin's first half negated (apply_rope)."""
    inv_freq = rope_inverse_frequencies(config).to(device)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, head_dim) queries or keys; HF layout: pairs are (i, i + head_dim/2).

    HF's x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1): here the halves are swapped by one roll
    and the minus sign is in the table. The same values bit for bit, in four operations instead of six (a third
    less time for a decoded token's queries, and in training).
    """
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * signed_sin


class KVCache(nn.Module):
    """Preallocated keys and values, so decoding allocates nothing per step."""

    def __init__(
        self, batch_size: int, n_kv_head: int, max_length: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        shape = (batch_size, n_kv_head, max_length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store keys/values for positions start.. and return all keys/values up to them.

        start may be a (B,) tensor of per-row positions for one new token per row (continuous batching,
        where every row is a different request); then every position the cache holds comes back (the attention
        mask hides each row's later ones): no size depends on the positions' values, so nothing reads them back
        from the device and a compiled step stays one graph. A caller sizes the cache to the rows' furthest position.
        """
        if isinstance(start, torch.Tensor):
            rows = torch.arange(k.size(0), device=k.device)
            self.k[rows, :, start] = k[:, :, 0]
            self.v[rows, :, start] = v[:, :, 0]
            return self.k, self.v
        end = start + k.size(2)
        if end > self.k.size(2):
            raise ValueError(f"KV cache holds {self.k.size(2)} positions; asked for {end}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def rows(self, first: int, last: int) -> KVCache:
        """A cache over batch rows first..last-1 that shares this one's storage (a server's request slots)."""
        view = KVCache(0, 0, 0, 0, self.k.dtype, self.k.device)
        view.k, view.v = self.k[first:last], self.v[first:last]
        return view


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=False)
        self.kv_cache: KVCache | None = None
        # LLaMA-Adapter's learned prompt (lorafit/adapter.py), set by apply_adapter; None in the plain model.
        self.adapter: nn.Module | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        start: int | torch.Tensor,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(start, k, v)
        y = self.attend(q, k, v, start, key_mask)
        if self.adapter is not None:
            # LLaMA-Adapter: a zero-gated attention over learned prompt tokens, added to the sequence's.
            y = y + self.adapter(q, self.k_proj, self.v_proj)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        start: int | torch.Tensor,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal attention of T new queries (at positions start..) over all keys so far.

        key_mask (B, S), False at left padding, lets prompts of different lengths share a batch.
        start as a (B,) tensor: one query per row at its own position, seeing only its own keys.
        """
        T, S = q.size(2), k.size(2)
        mask, is_causal = None, False
        if isinstance(start, torch.Tensor):
            mask = (torch.arange(S, device=q.device)[None, :] <= start[:, None])[:, None, None, :]
        elif key_mask is not None:
            q_pos = torch.arange(start, start + T, device=q.device)[:, None]
            k_pos = torch.arange(S, device=q.device)[None, :]
            # A padding query may see itself: a row with every key masked would give NaN.
            mask = ((k_pos <= q_pos) & key_mask[:, None, None, :S]) | (k_pos == q_pos)
        elif T > 1 and start == 0:
            is_causal = True
        elif T > 1:
            # A prefill that continues a cached sequence: query i sees keys 0..start+i.
            q_pos = torch.arange(start, start + T, device=q.device)
            mask = torch.arange(S, device=q.device)[None, :] <= q_pos[:, None]
        # A single new query attends to every cached key, so it needs no mask.
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.n_kv_head != self.n_head
        )


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer, 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, (self.gate_proj, self.up_proj))
        return self.down_proj(swiglu(gate, up))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = CausalSelfAttention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        start: int | torch.Tensor,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start, key_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLaMA(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        self.activation_checkpointing = False
        # cos/sin tables, built on first use on the model's device and grown on demand.
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the config says so (re-run after loading)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def rope(self, start: int | torch.Tensor, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows for positions start..start+length-1; for per-row positions (B,), shaped (B, 1, 1, head_dim).

        Per-row positions lie inside the KV cache, so its length sizes the tables (their values are not read back).
        """
        end = self.kv_cache_length if isinstance(start, torch.Tensor) else start + length
        if self._rope is None or self._rope[0].size(0) < end or self._rope[0].device != device:
            size = max(end, 2048)
            # Built as normal tensors even under inference_mode (generation), so training can use them later.
            with torch.inference_mode(False):
                self._rope = build_rope_cache(self.config, size, device)
        cos, sin = self._rope
        if isinstance(start, torch.Tensor):
            return cos[start][:, None, None], sin[start][:, None, None]
        return cos[start : start + length], sin[start : start + length]

    def hidden_states(
        self, idx: torch.Tensor, start: int | torch.Tensor = 0, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final-normed hidden states (B, T, n_embd) for tokens idx at positions start..

        key_mask (B, start + T), False at padding, hides left-padded positions from attention.
        start may be a (B,) tensor of per-row positions when T is 1 (rows at different points of their sequences).
        """
        x = self.embed_tokens(idx)
        cos, sin = self.rope(start, idx.size(1), idx.device)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for block in self.layers:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, start, key_mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, start, key_mask)
        return self.norm(x)

    def forward(
        self, idx: torch.Tensor, start: int | torch.Tensor = 0, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids idx (B, T) at positions start.. (start > 0 needs a KV cache)."""
        return self.lm_head(self.hidden_states(idx, start, key_mask))

    def setup_kv_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None) -> None:
        """Give every layer a preallocated KV cache for max_length positions."""
        param = self.embed_tokens.weight
        for block in self.layers:
            attn = block.self_attn
            attn.kv_cache = KVCache(
                batch_size, attn.n_kv_head, max_length, attn.head_dim, dtype or param.dtype, param.device
            )

    def clear_kv_cache(self) -> None:
        for block in self.layers:
            block.self_attn.kv_cache = None

    @property
    def kv_cache_length(self) -> int:
        """Positions the KV cache holds (0 when there is none)."""
        cache = self.layers[0].self_attn.kv_cache
        return 0 if cache is None else cache.k.size(2)
