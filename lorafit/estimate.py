"""How much memory a finetuning run needs, before running it.

Weights, gradients and AdamW state follow from the parameter counts and dtypes. Activations are
the tensors autograd saves for backward, counted tensor by tensor from what lorafit's model.py and
train.py actually do (checked against measured runs in tests/test_estimate.py); a tensor saved by
several ops is counted once. What is modelled:

- Attention through a fused SDPA kernel (flash / memory-efficient on CUDA, the flash kernel on CPU):
  it saves q, k, v (k and v at the key/value heads), its output and a float32 logsumexp, never the
  T x T probabilities. The unfused math path would add B * heads * T * T per layer; we do not model it.
- lorafit's own autograd functions (lorafit/ops.py, LoRALinear) save less than plain autograd: SwiGLU
  keeps gate and up, RMSNorm (when its weight trains) its input and 1/rms, LoRA the shared norm output
  and a bool dropout mask.
- The LM head and cross-entropy run in chunks whose gradients are formed in the forward pass (or, for a
  head with trainable parts of its own, recomputed in backward): one chunk's logits are the workspace.
- The device changes one thing: AdamW is fused on CUDA (no scratch) but steps one tensor at a time on the CPU.
- The peak is the larger of two moments of a steady-state step (optimizer state already exists):
  the start of backward, when every saved activation is alive plus the loss head's gradient
  buffers, and the end of backward / optimizer step, when every gradient is alive. Between the two,
  saved activations are freed about as fast as gradients appear, so live memory peaks at an end.
Not modelled: the CUDA context, the caching allocator's fragmentation and rounding, cuBLAS
workspaces, the data loader; a GPU run's reported reserved memory is that much higher.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorafit.config import Config
from lorafit.lora import LoRAConfig
from lorafit.train import LOSS_CHUNK

METHODS = ("lora", "adapter", "adapter-v2", "full")
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")
GIB = 1024**3

# LLaMA-Adapter (Zhang et al., 2023), as lit-llama defines it: learned prompt tokens in the layers
# from ADAPTER_START_LAYER on, projected through the frozen k/v weights, with a zero-init gate per head.
ADAPTER_PROMPT_LENGTH = 10
ADAPTER_START_LAYER = 2
# The rotary cos/sin tables are built for at least this many positions (see LLaMA.rope).
ROPE_CACHE_MIN_LENGTH = 2048


@dataclass
class MemoryEstimate:
    """Estimated peak memory of one training step, in bytes, by what holds it."""

    method: str
    precision: str
    micro_batch_size: int
    max_seq_length: int
    trainable_params: int
    total_params: int
    weights: int
    """All parameters in their storage dtype, plus the rotary tables."""
    gradients: int
    optimizer: int
    """AdamW's exp_avg and exp_avg_sq, in the parameters' dtype (PyTorch's zeros_like(param))."""
    activations: int
    """Tensors saved for backward at the end of the forward pass (bf16-mixed: with autocast's weight copies)."""
    workspace: int
    """Short-lived buffers on top of the activations at their peak: the loss head's gradients, one layer's backward."""
    total: int
    """Peak: weights + optimizer + max(activations + workspace, gradients + optimizer-step scratch)."""
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        """The estimate as a Markdown table in GiB."""
        rows = [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer state (AdamW)", self.optimizer),
            ("activations", self.activations),
            ("workspace", self.workspace),
            ("**peak total**", self.total),
        ]
        lines = ["| memory | GiB |", "|---|---:|"]
        lines += [f"| {name} | {nbytes / GIB:.2f} |" for name, nbytes in rows]
        return "\n".join(lines)


def _dtype_bytes(precision: str) -> tuple[int, int, int]:
    """(parameter, linear-output, residual-stream) bytes per element for a precision."""
    if precision == "32-true":
        return 4, 4, 4
    if precision == "bf16-mixed":
        # Weights stay float32; autocast runs linears and attention in bf16; the residual stream is
        # promoted back to float32 by `x + bf16_output` and RMSNorm's float32 weight.
        return 4, 2, 4
    if precision == "bf16-true":
        return 2, 2, 2
    raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")


def linear_shapes(config: Config) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer in a block, by lorafit.lora target name."""
    d, inter = config.n_embd, config.intermediate_size
    q_dim, kv_dim = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    return {
        "q": (d, q_dim),
        "k": (d, kv_dim),
        "v": (d, kv_dim),
        "o": (q_dim, d),
        "gate": (d, inter),
        "up": (d, inter),
        "down": (inter, d),
    }


def count_parameters(config: Config, method: str, lora: LoRAConfig | None = None) -> tuple[int, int, int]:
    """(trainable, total, largest trainable tensor) parameter counts for a method, computed exactly."""
    if method in ("lora", "full"):
        return _count_on_meta(config, method, lora)
    if method not in METHODS:
        raise ValueError(f"unknown finetuning method {method!r}; choose one of {', '.join(METHODS)}")
    _, base, _ = _count_on_meta(config, "full", None)
    adapter_layers = max(0, config.n_layer - ADAPTER_START_LAYER)
    prompt = ADAPTER_PROMPT_LENGTH * adapter_layers * config.n_embd
    gates = adapter_layers * config.n_head
    trainable, largest = prompt + gates, prompt
    if method == "adapter-v2":
        # A bias and a scale on every linear layer's output (the LM head too), and every RMSNorm trains.
        outs = sum(out for _, out in linear_shapes(config).values()) * config.n_layer + config.vocab_size
        norms = (2 * config.n_layer + 1) * config.n_embd
        trainable += 2 * outs + norms
    return trainable, base + trainable, largest


def _count_on_meta(config: Config, method: str, lora: LoRAConfig | None) -> tuple[int, int, int]:
    """Build the model on the meta device (no memory), set the method up, count."""
    from lorafit.methods import get_method
    from lorafit.model import LLaMA

    with torch.device("meta"):
        model = LLaMA(config)
    get_method(method).apply(model, lora)
    params = list(model.parameters())  # tied weights appear once
    trainable = [p.numel() for p in params if p.requires_grad]
    return sum(trainable), sum(p.numel() for p in params), max(trainable)


class _Saved:
    """Tensors saved for backward, by name, so a tensor several ops save is counted once."""

    def __init__(self) -> None:
        self.tensors: dict[str, int] = {}

    def add(self, name: str, nbytes: int) -> None:
        self.tensors[name] = nbytes

    @property
    def total(self) -> int:
        return sum(self.tensors.values())


@dataclass
class _Step:
    """The shapes and dtypes one micro-batch runs with."""

    config: Config
    method: str
    lora: LoRAConfig
    batch: int
    seq: int
    precision: str
    device: str
    supervised_fraction: float

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def linear_trains(self, name: str) -> bool:
        return self.method == "full" or (self.method == "lora" and name in self.lora.targets)


def _linear(saved: _Saved, step: _Step, layer: str, name: str, x: str, x_bytes: int, x_grad: bool) -> bool:
    """Record what one linear layer saves; return whether its output requires grad."""
    _, lin, _ = _dtype_bytes(step.precision)
    n_in, n_out = linear_shapes(step.config)[name]
    tokens = step.tokens
    key = f"{layer}.{name}"
    mixed = step.precision == "bf16-mixed"
    if mixed and x_grad:
        # autocast's bf16 copy of the weight is what the input's gradient is computed from.
        saved.add(f"{key}.weight_bf16", n_in * n_out * 2)
    if step.method == "full":
        # The weight's gradient needs the input; under autocast each linear saves its own bf16 cast of it.
        saved.add(f"{key}.x_bf16" if mixed and x_bytes == 4 else x, tokens * n_in * (2 if mixed else x_bytes))
    if step.method == "lora" and name in step.lora.targets:
        # The layer's input (shared by the projections that read it) and a bool dropout mask; see LoRALinear.
        saved.add(x, tokens * n_in * x_bytes)
        if step.lora.dropout > 0:
            saved.add(f"{key}.dropout_mask", tokens * n_in)
        saved.add(f"{key}.lora_a_out", tokens * step.lora.r * lin)
    if step.method == "adapter-v2":
        # scale * (W x + bias): the scale's gradient needs the biased output.
        saved.add(f"{key}.biased_out", tokens * n_out * lin)
    trains = step.linear_trains(name) or step.method == "adapter-v2"
    return x_grad or trains


def _rms_norm(saved: _Saved, step: _Step, key: str, x_grad: bool) -> bool:
    """Record what an RMSNorm saves: its input (the residual stream) and a float32 1/rms, if anything needs grad."""
    _, _, res = _dtype_bytes(step.precision)
    d, tokens = step.config.n_embd, step.tokens
    weight_trains = step.method in ("full", "adapter-v2")
    if weight_trains:
        saved.add(f"{key}.input", tokens * d * res)  # lorafit/ops.py's function keeps x in its own dtype
    elif x_grad:
        # F.rms_norm keeps its float32 input: the residual itself in float32, a float32 copy under bf16-true.
        saved.add(f"{key}.input_f32", tokens * d * 4)
    if x_grad or weight_trains:
        saved.add(f"{key}.rstd", tokens * 4)
    return x_grad or weight_trains


def _block(saved: _Saved, step: _Step, i: int, x_grad: bool) -> bool:
    """Record one transformer block's saved tensors; return whether its output requires grad."""
    config = step.config
    _, lin, res = _dtype_bytes(step.precision)
    layer, tokens = f"layers.{i}", step.tokens
    q_dim, kv_dim = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    h = f"{layer}.attn_norm_out"
    h_grad = _rms_norm(saved, step, f"{layer}.input_layernorm", x_grad)
    qkv_grad = [_linear(saved, step, layer, name, h, res, h_grad) for name in ("q", "k", "v")]
    # RoPE saves only the cos/sin tables (counted once, below). The fused SDPA kernel saves q, k, v,
    # its output and a float32 logsumexp whenever any of q, k, v requires grad.
    attn_grad = any(qkv_grad)
    if attn_grad:
        saved.add(f"{layer}.sdpa_q", tokens * q_dim * lin)
        saved.add(f"{layer}.sdpa_k", tokens * kv_dim * lin)
        saved.add(f"{layer}.sdpa_v", tokens * kv_dim * lin)
        saved.add(f"{layer}.sdpa_out", tokens * q_dim * lin)
        saved.add(f"{layer}.sdpa_lse", step.batch * config.n_head * step.seq * 4)
    if step.method in ("adapter", "adapter-v2") and i >= ADAPTER_START_LAYER:
        # The queries also attend over the layer's prompt (k/v of ADAPTER_PROMPT_LENGTH tokens, per batch row):
        # that kernel saves q, the prompt's k and v, its output (also kept for the gate's gradient) and a logsumexp.
        saved.add(f"{layer}.sdpa_q", tokens * q_dim * lin)
        saved.add(f"{layer}.prompt_kv", 2 * step.batch * ADAPTER_PROMPT_LENGTH * kv_dim * lin)
        saved.add(f"{layer}.prompt_out", tokens * q_dim * lin)
        saved.add(f"{layer}.prompt_lse", step.batch * config.n_head * step.seq * 4)
        # gate * prompt_out is added to the attention output: a new tensor, which o_proj then sees.
        saved.add(f"{layer}.sdpa_out", tokens * q_dim * lin)
        attn_grad = True
    o_grad = _linear(saved, step, layer, "o", f"{layer}.sdpa_out", lin, attn_grad)
    x_grad = x_grad or o_grad
    h2 = f"{layer}.mlp_norm_out"
    h2_grad = _rms_norm(saved, step, f"{layer}.post_attention_layernorm", x_grad)
    gate_grad = _linear(saved, step, layer, "gate", h2, res, h2_grad)
    up_grad = _linear(saved, step, layer, "up", h2, res, h2_grad)
    # swiglu (lorafit/ops.py) keeps gate and up and recomputes silu(gate) in backward.
    if gate_grad or up_grad:
        saved.add(f"{layer}.gate_out", tokens * config.intermediate_size * lin)
        saved.add(f"{layer}.up_out", tokens * config.intermediate_size * lin)
    down_grad = _linear(saved, step, layer, "down", f"{layer}.mlp_product", lin, gate_grad or up_grad)
    return x_grad or down_grad


def _loss_head(saved: _Saved, step: _Step, hidden_grad: bool) -> tuple[int, bool]:
    """Record the LM head and cross-entropy at the supervised positions; return the rows and whether it is fused."""
    config = step.config
    param_bytes, _, res = _dtype_bytes(step.precision)
    # Next-token targets exist for T - 1 positions per row; only the supervised ones reach the head.
    rows = round(step.supervised_fraction * step.batch * (step.seq - 1))
    v, d = config.vocab_size, config.n_embd
    lora_head = step.method == "lora" and "lm_head" in step.lora.targets
    head_trains = step.method in ("full", "adapter-v2") or lora_head
    if hidden_grad or head_trains:
        saved.add("head.keep_mask", step.batch * (step.seq - 1))
        saved.add("head.keep_index", rows * 8)
    fused = step.method != "adapter-v2" and not lora_head
    if fused:
        # A plain head (ops.linear_cross_entropy_sum) forms its gradients during the forward pass and keeps
        # them: the hidden rows' and, when the head trains, the weight's.
        if hidden_grad:
            saved.add("head.grad_hidden", rows * d * res)
        if step.method == "full":
            saved.add("head.grad_weight", v * d * param_bytes)
    else:
        # A head with trainable parts of its own is recomputed in backward, chunk by chunk, from these.
        saved.add("head.hidden_rows", rows * d * res)
        saved.add("head.targets", rows * 8)
    return rows, fused


def estimate_memory(
    config: Config,
    method: str,
    micro_batch_size: int,
    max_seq_length: int,
    precision: str,
    lora: LoRAConfig | None = None,
    activation_checkpointing: bool = False,
    supervised_fraction: float = 1.0,
    device: str = "cuda",
) -> MemoryEstimate:
    """Estimated peak memory of a steady-state training step of lorafit's loop (train.py) on `device`."""
    if method not in METHODS:
        raise ValueError(f"unknown finetuning method {method!r}; choose one of {', '.join(METHODS)}")
    if not 0.0 <= supervised_fraction <= 1.0:
        raise ValueError(f"supervised_fraction must be between 0 and 1; got {supervised_fraction}")
    if micro_batch_size < 1 or max_seq_length < 2:
        raise ValueError(
            f"micro_batch_size must be >= 1 and max_seq_length >= 2; got {micro_batch_size}, {max_seq_length}"
        )
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu'; got {device!r}")
    param_bytes, lin, res = _dtype_bytes(precision)
    lora = lora or LoRAConfig()
    trainable, total_params, largest = count_parameters(config, method, lora)
    step = _Step(config, method, lora, micro_batch_size, max_seq_length, precision, device, supervised_fraction)

    rope_len = max(max_seq_length, ROPE_CACHE_MIN_LENGTH)
    weights = total_params * param_bytes + 2 * rope_len * config.head_dim * 4  # + float32 cos/sin tables
    gradients = trainable * param_bytes
    optimizer = 2 * trainable * param_bytes

    saved = _Saved()
    tokens, d = step.tokens, config.n_embd
    saved.add("batch", 2 * tokens * 8)  # input ids and labels (int64); the embedding's backward reuses the ids
    if precision == "bf16-true":
        saved.add("rope_cos_sin", 2 * max_seq_length * config.head_dim * 2)  # the float32 tables cast per forward
    x_grad = method == "full"  # only full finetuning trains the embedding; otherwise layer 0's input needs no grad
    per_layer = []
    for i in range(config.n_layer):
        before = saved.total
        block_in_grad = x_grad
        x_grad = _block(saved, step, i, x_grad)
        per_layer.append(saved.total - before)
        if activation_checkpointing:
            # Only the block's input survives the forward pass; backward recomputes the rest one block at a time.
            for name in [n for n in saved.tensors if n.startswith(f"layers.{i}.")]:
                del saved.tensors[name]
            if block_in_grad or x_grad:
                saved.add(f"layers.{i}.checkpoint_input", tokens * d * res)
    _rms_norm(saved, step, "norm", x_grad)
    rows, fused_head = _loss_head(saved, step, x_grad)

    # Workspace on top of the saved tensors: one chunk's logits (in the linear dtype and float32) and their
    # gradient, or for a recomputed chunk its logits, log-probabilities and their two float32 gradients;
    # then the LM head's weight gradient if it trains; and the top block's backward (three
    # intermediate-sized gradients plus the residual's).
    head_grad = config.vocab_size * d * param_bytes if method == "full" else 0
    loss_phase = (8 + 2 * lin if fused_head else 16) * min(rows, LOSS_CHUNK) * config.vocab_size
    head_phase = head_grad + rows * d * lin
    layer_phase = head_grad + 3 * tokens * config.intermediate_size * lin + tokens * d * 4
    if activation_checkpointing:
        layer_phase += max(per_layer)  # one block's activations, recomputed
    workspace = max(loss_phase, head_phase, layer_phase)
    # AdamW on the CPU steps tensor by tensor; sqrt(v) / bias_correction makes two temporaries of the largest.
    step_scratch = 0 if device == "cuda" else 2 * largest * param_bytes
    activations = saved.total
    total = weights + optimizer + max(activations + workspace, gradients + step_scratch)
    notes = [
        "attention via a fused SDPA kernel (no T x T matrix saved)",
        f"AdamW {'fused (CUDA)' if device == 'cuda' else 'single-tensor (CPU)'}; state in the parameters' dtype",
        "excludes the CUDA context (~0.5 GiB) and the caching allocator's fragmentation",
    ]
    return MemoryEstimate(
        method=method,
        precision=precision,
        micro_batch_size=micro_batch_size,
        max_seq_length=max_seq_length,
        trainable_params=trainable,
        total_params=total_params,
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations,
        workspace=workspace,
        total=total,
        notes=notes,
    )


def format_estimate(
    config: Config,
    method: str,
    micro_batch_size: int,
    max_seq_length: int,
    precision: str,
    lora: LoRAConfig | None = None,
    activation_checkpointing: bool = False,
    supervised_fraction: float = 1.0,
    device: str = "cuda",
) -> str:
    """A printable report: what was estimated, the table, and what the estimate leaves out."""
    est = estimate_memory(
        config,
        method,
        micro_batch_size,
        max_seq_length,
        precision,
        lora,
        activation_checkpointing,
        supervised_fraction,
        device,
    )
    what = f"{config.name}, {method}"
    if method == "lora":
        lora = lora or LoRAConfig()
        what += f" r={lora.r} on {','.join(lora.targets)}"
    header = (
        f"Memory estimate: {what}; micro-batch {micro_batch_size} x {max_seq_length} tokens, {precision}"
        + (", activation checkpointing" if activation_checkpointing else "")
        + f" ({device})\n"
        f"trainable parameters: {est.trainable_params:,} of {est.total_params:,} "
        f"({100 * est.trainable_params / est.total_params:.3f}%)\n"
    )
    return header + est.table() + "\n" + "".join(f"- {note}\n" for note in est.notes)
