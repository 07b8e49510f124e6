"""A quantised frozen base for QLoRA (Dettmers et al., 2023) and for inference.

Schemes:
- `nf4`: 4-bit NormalFloat codes in blocks of 64 weights, one float32 absmax constant per block.
- `nf4-dq`: the same, with the absmax constants quantised again to 8 bits in blocks of 256 (double quantisation).
- `int8`: weight-only int8 with one float scale per output channel (absmax / 127), for inference.

NF4 uses bitsandbytes (`pip install "lorafit[quant]"`), the QLoRA authors' library and the one PEFT and
transformers quantise with: its quantiser and kernels run on x86-64 CPUs (since 0.47) and CUDA, handle every
layer shape (torchao's NF4Tensor needs a multiple of 64 x 256 weights, which 576 x 576 is not), and were faster
here (benchmarks/quant_choice.py). int8 is plain PyTorch.

As in the QLoRA paper and PEFT/transformers (which keep `lm_head` and every nn.Embedding in full precision),
only the linear layers inside the blocks are quantised: the token embedding, the LM head (tied or not) and the
norms stay in the model's dtype. For int8 inference (`LLM.load(quantize="int8")`) the LM head gets an int8 copy
too (`quantize_lm_head`), the largest matrix a decoded token reads.

Decoding int8: eager on the CPU through PyTorch's fused kernel `_weight_int8pack_mm`, compiled through inductor
as one reduction per layer reading the int8 codes (`int8_linear`); see benchmarks/generate.py for what each
reaches. Either way the codes are packed in reading order on huge pages (runtime.pack_decode_weights), and in
eager decoding a block's q-k-v and gate-up layers are each one product (ops.project), as for float weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorafit.ops import JoinedWeights, is_plain_linear
from lorafit.runtime import drop_pages, trim_heap

if TYPE_CHECKING:
    from bitsandbytes.functional import QuantState

SCHEMES = ("nf4", "nf4-dq", "int8")
BLOCK_SIZE = 64
"""Weights per NF4 absmax constant (the QLoRA paper's and bitsandbytes' default)."""
SCALE_BLOCK_SIZE = 256
"""Absmax constants per 8-bit block with double quantisation (bitsandbytes' compress_statistics)."""
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linear layers that get quantised: all those inside the transformer blocks."""
INSTALL_HINT = 'pip install "lorafit[quant]"'


class QuantizationError(ValueError):
    """A quantisation request that cannot be served: unknown scheme, missing library, unsuitable base or method."""


def check_scheme(scheme: str) -> str:
    """The scheme, validated; for NF4 schemes also check that bitsandbytes can be imported."""
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantisation scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    if scheme.startswith("nf4"):
        _bitsandbytes()
    return scheme


def _bitsandbytes() -> ModuleType:
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401 (loads the quantisers)
    except ImportError as err:
        raise QuantizationError(
            f"NF4 quantisation needs bitsandbytes>=0.47, which is not installed: {INSTALL_HINT}"
        ) from err
    return bitsandbytes


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight is stored quantised; forward dequantises it (on the fly) in `dtype`.

    Buffers (so .to(device) moves them): nf4 holds `qweight` (two 4-bit codes per byte), `absmax` (float32 per
    block of 64, or uint8 with double quantisation plus `absmax2` per 256 and `offset`) and bitsandbytes' code
    tables; int8 holds `qweight` (int8, out x in) and `scale` (float32 per output row).
    """

    def __init__(self, in_features: int, out_features: int, scheme: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scheme, self.dtype = in_features, out_features, scheme, dtype
        self.bias: nn.Parameter | None = None

    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight: torch.Tensor, scheme: str, bias: torch.Tensor | None = None) -> QuantizedLinear:
        """Quantise an (out, in) float weight; the layer computes in the weight's dtype, on its device."""
        check_scheme(scheme)
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, scheme, weight.dtype)
        if scheme == "int8":
            scale = bf16_ceil(weight.float().abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127)
            layer.register_buffer("qweight", torch.round(weight.float() / scale[:, None]).to(torch.int8))
            layer.register_buffer("scale", scale)
            layer.register_buffer("scale_bf16", scale.to(torch.bfloat16), persistent=False)
        else:
            functional = _bitsandbytes().functional
            q, state = functional.quantize_4bit(
                weight.contiguous(), blocksize=BLOCK_SIZE, quant_type="nf4", compress_statistics=scheme == "nf4-dq"
            )
            layer.register_buffer("qweight", q)
            layer.register_buffer("absmax", state.absmax)
            layer.register_buffer("code", state.code)
            if state.nested:
                layer.register_buffer("absmax2", state.state2.absmax)
                layer.register_buffer("code2", state.state2.code)
                layer.register_buffer("offset", state.offset.reshape(()))
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(weight.dtype), requires_grad=False)
        return layer

    joined: JoinedWeights | None = None
    """Set by ops.join_linears on the first of several int8 layers that read one input (decoding's q-k-v)."""

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def decode_weight(self) -> torch.Tensor | None:
        """The int8 codes, which a decode step streams (runtime.pack_decode_weights moves them); None for nf4."""
        return self.qweight if self.scheme == "int8" else None

    def place_decode_weight(self, codes: torch.Tensor) -> None:
        """Read the int8 codes from `codes` (the same values, elsewhere in memory) from now on."""
        self.qweight = codes

    @staticmethod
    def joined_product(layers: Sequence[QuantizedLinear], codes: torch.Tensor) -> Callable[..., torch.Tensor]:
        """x times the int8 layers whose codes ops.join_linears joined into `codes`, as one int8_linear."""
        scale = torch.cat([layer.scale for layer in layers])
        scale_bf16 = torch.cat([layer.scale_bf16 for layer in layers])
        return partial(int8_linear, qweight=codes, scale=scale, scale_bf16=scale_bf16)

    @property
    def is_meta(self) -> bool:
        return self.qweight.is_meta

    @property
    def nbytes(self) -> int:
        """Bytes the quantised weight holds (codes, constants and code tables; not the bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def quant_state(self, dtype: torch.dtype) -> QuantState:
        """bitsandbytes' QuantState for the nf4 schemes, dequantising to `dtype`."""
        functional = _bitsandbytes().functional
        state2 = None
        if self.scheme == "nf4-dq":
            state2 = functional.QuantState(
                absmax=self.absmax2, code=self.code2, blocksize=SCALE_BLOCK_SIZE, dtype=torch.float32
            )
        return functional.QuantState(
            absmax=self.absmax,
            # Flat: bitsandbytes 0.50's CPU kernel dequantises an (out, in) shape wrongly when `in` is not a
            # multiple of the block size (e.g. 48 x 32: errors of 1.9 on unit-variance weights); flat is right.
            shape=torch.Size((self.out_features * self.in_features,)),
            code=self.code,
            blocksize=BLOCK_SIZE,
            quant_type="nf4",
            dtype=dtype,
            offset=self.offset if state2 is not None else None,
            state2=state2,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full (out, in) weight the codes stand for, in `dtype` (default: the layer's)."""
        dtype = dtype or self.dtype
        if self.scheme == "int8":
            return (self.qweight.float() * self.scale[:, None]).to(dtype)
        if torch.compiler.is_compiling():
            return self.nf4_weight().to(dtype)
        flat = _bitsandbytes().functional.dequantize_4bit(self.qweight, self.quant_state(dtype))
        return flat.reshape(self.out_features, self.in_features)

    def nf4_weight(self) -> torch.Tensor:
        """The float32 (out, in) weight of the nf4 codes, written in plain PyTorch operations.

        For torch.compile, which cannot trace bitsandbytes' CPU operator (its shape function fails), and which
        fuses these index computations into the product that reads the weight. Element j is NF4 level
        code[c_j] times its block's absmax, c_j being the high 4 bits of byte j // 2 for even j, the low 4 for
        odd j (bitsandbytes' packing); with double quantisation the absmax is itself code2[a] * absmax2 + offset.
        The values equal bitsandbytes' dequantize_4bit bit for bit (tests/test_quant.py).
        """
        j = torch.arange(self.out_features * self.in_features, device=self.qweight.device)
        packed = self.qweight.reshape(-1)[j // 2].to(torch.int32)
        levels = self.code[(packed >> (4 * (1 - j % 2))) & 15]
        block = j // BLOCK_SIZE
        if self.scheme == "nf4-dq":
            absmax = self.code2[self.absmax[block].long()] * self.absmax2[block // SCALE_BLOCK_SIZE] + self.offset
        else:
            absmax = self.absmax[block]
        return (levels * absmax).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme == "int8" and not (torch.is_grad_enabled() and x.requires_grad):
            out = int8_linear(x, self.qweight, self.scale, self.scale_bf16)
        elif torch.compiler.is_compiling() and not (torch.is_grad_enabled() and x.requires_grad):
            # Decoding one row: the product as a multiply-and-sum over the weight, which inductor emits as one
            # loop reading the 4-bit codes (a plain F.linear would first store the whole float weight).
            weight = self.dequantize(x.dtype)
            single = x.shape[:-1].numel() == 1
            out = (x.unsqueeze(-2) * weight).sum(-1) if single else F.linear(x, weight)
        else:
            out = _DequantizedLinear.apply(x, self)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        features = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{features}, scheme={self.scheme}, dtype={self.dtype}"


class _DequantizedLinear(torch.autograd.Function):
    """x W^T with W dequantised in forward and again in backward, so no full-precision weight outlives a call.

    This is what bitsandbytes' matmul_4bit does on the CPU too (and torchao's linear_nf4); autograd would keep
    the dequantised weight from forward to backward, a full-precision copy of every layer of the model.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.layer.dequantize(grad.dtype), None


def bf16_ceil(x: torch.Tensor) -> torch.Tensor:
    """Each positive float32 rounded up to the nearest bfloat16 value (kept in float32, so exact in both)."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0xFFFF) & ~0xFFFF).view(torch.float32)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, scale_bf16: torch.Tensor) -> torch.Tensor:
    """x @ (qweight * scale[:, None]).T without materialising the float weight where that is possible.

    Under torch.compile, for one row (generate.compiled_decode_step): the conversion, product and sum written
    as one reduction, which inductor emits as one loop over the int8 codes, so a step reads one byte per weight
    (more rows, as a compiled batch would have, take the kernel below). Eager on the CPU: PyTorch's fused
    kernel `_weight_int8pack_mm`, vectorised for bf16 inputs only (float32 ones take a scalar loop, 0.4 GB/s
    here), so float32 activations are rounded to bf16 for it and the (bf16) result widened again: a relative
    error of ~2^-9 beside int8's own ~1%. The scales are bf16 values (bf16_ceil), so the bf16 copy the kernel
    takes is exact. Elsewhere (CUDA, float16), the weight is dequantised for the call.
    """
    if torch.compiler.is_compiling() and x.shape[:-1].numel() == 1:
        # The reduction itself: written as F.linear(x, qweight.to(x.dtype)), inductor's decompose_mm pass first
        # stores the whole float weight and then reduces over it (seen in its generated code).
        return (x.unsqueeze(-2) * qweight.to(x.dtype)).sum(-1) * scale.to(x.dtype)
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
        flat = x.reshape(-1, x.size(-1)).to(torch.bfloat16)
        out = torch.ops.aten._weight_int8pack_mm(flat, qweight, scale_bf16)
        return out.to(x.dtype).reshape(*x.shape[:-1], qweight.size(0))
    return F.linear(x, (qweight.to(x.dtype) * scale.to(x.dtype)[:, None]))


def is_block_linear(name: str) -> bool:
    """Whether a module (or its `.weight`) name is one of the linear layers inside a block."""
    parts = name.removesuffix(".weight").split(".")
    return parts[0] == "layers" and parts[-1] in BLOCK_LINEARS


def quantize_model(model: nn.Module, scheme: str) -> int:
    """Replace the nn.Linear layers inside the blocks by quantised ones, in place; return how many.

    The embedding, LM head and norms are left as they are. Call it before apply_lora.
    """
    check_scheme(scheme)
    chosen = [(n, m) for n, m in model.named_modules() if is_plain_linear(m) and is_block_linear(n)]
    for name, linear in chosen:
        if linear.weight.is_meta:
            raise QuantizationError(f"{name}: the weight is still on the meta device; load it before quantising")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, QuantizedLinear.from_weight(linear.weight, scheme, linear.bias))
    return len(chosen)


def quantize_lm_head(model: nn.Module) -> None:
    """For int8 inference: give the model an int8 LM head of its own, in place.

    At 49152 x 576 SmolLM2-135M's head is a fifth of the float32 bytes a token reads, the largest single one;
    in int8 a token reads a quarter of them. A tied embedding stays as it is (a lookup reads one row of it),
    so the int8 copy adds a quarter of the head's bytes to memory. Not for training: QLoRA's head stays float.
    """
    head = model.lm_head
    if not is_plain_linear(head) or head.weight.is_meta:
        raise QuantizationError("the LM head is not a loaded nn.Linear; load the model before quantising its head")
    model.lm_head = QuantizedLinear.from_weight(head.weight, "int8", head.bias)


@torch.no_grad()
def dequantize_model(model: nn.Module) -> int:
    """Replace every quantised linear layer by an nn.Linear holding its dequantised weight; return how many.

    After merging a QLoRA run (lorafit.lora.merge_lora folds each update into its dequantised base), this gives
    a plain model whose state dict any Llama reader takes: what merge must save for a quantised run.
    """
    from lorafit.lora import LoRALinear

    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise QuantizationError("the model still has LoRA layers; merge them (lorafit.lora.merge_lora) first")
    chosen = quantized_linears(model)
    for name, layer in chosen:
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = nn.Parameter(layer.dequantize(), requires_grad=False)
        linear.bias = layer.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    return len(chosen)


def stored_bytes(numel: int, scheme: str) -> int:
    """Bytes a quantised weight of `numel` elements takes (codes and constants), as QuantizedLinear stores it."""
    blocks = -(-numel // BLOCK_SIZE)
    codes = -(-numel // 2) + 4 * 16  # two 4-bit codes per byte, and the 16 NF4 levels
    if scheme == "nf4":
        return codes + 4 * blocks  # a float32 absmax per block
    if scheme == "nf4-dq":  # 8-bit absmax per block, a float32 absmax per 256 of them, their code table and offset
        return codes + blocks + 4 * -(-blocks // SCALE_BLOCK_SIZE) + 4 * 256 + 4
    raise QuantizationError(f"unknown quantisation scheme {scheme!r}; known: {', '.join(SCHEMES)}")


def quantized_linears(model: nn.Module) -> list[tuple[str, QuantizedLinear]]:
    """(name, module) for every quantised linear layer, including those wrapped by LoRA as base_layer."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]


# GGUF tensor types that hold plain floats (F32, F16, BF16); every other type is already quantised.
_GGUF_FLOAT_TYPES = (0, 1, 30)


def check_not_quantized_gguf(path: str | Path) -> None:
    """Refuse a GGUF base whose block weights are already quantised (Q4_K, Q8_0, ...).

    lorafit's GGUF reader dequantises to float32, so the whole model would exist in full precision while loading,
    and quantising the dequantised weights again to NF4 compounds two rounding errors.
    """
    path = Path(path)
    if path.suffix != ".gguf":
        return
    from gguf import GGUFReader

    for tensor in GGUFReader(path).tensors:
        if tensor.name.startswith("blk.") and int(tensor.tensor_type) not in _GGUF_FLOAT_TYPES:
            raise QuantizationError(
                f"{path}: tensor {tensor.name} is already quantised ({tensor.tensor_type.name}); --quantize needs a "
                "float base (a Hugging Face checkpoint, or an F16/F32 GGUF): quantising it again compounds the errors"
            )


def load_quantized(
    path: str | Path, scheme: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> nn.Module:
    """Load a checkpoint with its block linears quantised while loading, one layer at a time.

    The model is built on the meta device and each tensor is taken from the memory-mapped checkpoint, cast to
    `dtype` on `device` and, for a block linear, quantised at once: at most one layer exists in full precision.
    """
    from lorafit.checkpoint import load_model

    check_scheme(scheme)
    check_not_quantized_gguf(path)

    def quantize(name: str, source: torch.Tensor) -> nn.Module | None:
        if not is_block_linear(name):
            return None
        layer = QuantizedLinear.from_weight(source.to(device=device, dtype=dtype), scheme)
        # The checkpoint's pages read while quantising stay mapped and in RSS until the file's last tensor is freed:
        # without this, loading SmolLM2-135M with nf4-dq peaked at 1067 MiB RSS, all of the float32 file plus the model.
        drop_pages(source)
        trim_heap()  # the quantiser's freed temporaries, which would otherwise stay resident between the layers kept
        return layer

    model = load_model(path, dtype=dtype, device=device, make_linear=quantize)
    if torch.device(device).type == "cpu":
        # What was not quantised may still be a view of the memory-mapped checkpoint, which keeps every page read
        # while quantising mapped (and counted in RSS); owning copies of those few tensors lets the file go.
        with torch.no_grad():
            for param in model.parameters():
                mapped, param.data = param.data, param.data.clone()
                drop_pages(mapped)
        trim_heap()
    return model
