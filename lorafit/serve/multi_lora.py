"""Many LoRA adapters on one frozen base, mixed in one batch: each row of the batch picks its own adapter.

The base layer (an nn.Linear, or a quantised one) stays unmerged and shared; beside it sit every loaded
adapter's A and B stacked in slots, and one forward gathers them by row (the semantics of Punica's BGMV
kernel): y[i] = W x[i] + s[a_i] · (x[i] A[a_i]ᵀ) B[a_i]ᵀ. Ranks differ between adapters, so a slot is
zero-padded to the largest rank (zero rows of A meet zero columns of B: the padding adds exactly nothing).
The last slot is all zeros, so a row without an adapter uses index -1.

DoRA adapters scale each output feature by g = m / ||W + s B A|| (row norms). At inference W, A, B and m are
fixed, so g is computed once when the adapter is installed, and a row's output is g[a_i] ⊙ (W x[i] + s B A x[i]):
the same as the merged DoRA weight. Layers that some DoRA adapter adapts keep one g per slot (ones for plain
LoRA adapters and for the empty slot).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class BatchAdapters:
    """Which adapter slot each row of the next forward uses (-1: none), shared by every MultiLoRALinear.

    `always` makes every forward take the adapter path, even for a batch of base rows (the empty slot adds
    zero): a compiled step then has one graph for both kinds of batch.
    """

    def __init__(self, always: bool = False) -> None:
        self.rows = torch.empty(0, dtype=torch.long)
        self.always = always
        self.any = always

    def set(self, rows: torch.Tensor, any_adapter: bool | None = None) -> None:
        """Set the (B,) slot index per row before a forward; any_adapter (whether some row has one) saves a look."""
        self.rows = rows
        self.any = self.always or (bool((rows >= 0).any()) if any_adapter is None else any_adapter)


class MultiLoRALinear(nn.Module):
    """A shared base linear layer plus stacked LoRA weights (and DoRA scales) for `slots` adapters, chosen per row."""

    def __init__(self, base: nn.Module, slots: int, batch: BatchAdapters) -> None:
        super().__init__()
        if getattr(base, "bias", None) is not None:
            raise ValueError("multi-LoRA layers are for bias-free linear layers (as in Llama)")
        self.base, self.slots, self.batch = base, slots, batch
        self.in_features, self.out_features = base.in_features, base.out_features
        self.dtype, self.device = base_dtype_and_device(base)
        # Allocated when an adapter first targets this layer: (slots + 1, r, in), (slots + 1, out, r), (slots + 1,);
        # g (slots + 1, out) once a DoRA adapter does.
        self.A: torch.Tensor | None = None
        self.B: torch.Tensor | None = None
        self.g: torch.Tensor | None = None
        self.scaling = torch.zeros(slots + 1, device=self.device)

    def base_weight(self) -> torch.Tensor:
        """The base's (out, in) weight in its dtype (dequantised for a quantised base)."""
        return self.base.dequantize() if hasattr(self.base, "dequantize") else self.base.weight

    @torch.no_grad()
    def set_slot(
        self,
        slot: int,
        A: torch.Tensor | None,
        B: torch.Tensor | None,
        scaling: float,
        magnitude: torch.Tensor | None = None,
    ) -> None:
        """Put one adapter's A (r, in), B (out, r) and DoRA magnitude (out,) in a slot (None: layer left alone)."""
        if A is None or B is None:
            if self.A is not None:
                self.A[slot].zero_()
                self.B[slot].zero_()
            if self.g is not None:
                self.g[slot] = 1.0
            self.scaling[slot] = 0.0
            return
        r = A.size(0)
        if self.A is None or self.A.size(1) < r:
            # Grow the padded rank: existing slots keep their values, the new rows/columns are zero.
            old_r = 0 if self.A is None else self.A.size(1)
            grown_A = torch.zeros(self.slots + 1, r, self.in_features, dtype=self.dtype, device=self.device)
            grown_B = torch.zeros(self.slots + 1, self.out_features, r, dtype=self.dtype, device=self.device)
            if self.A is not None:
                grown_A[:, :old_r] = self.A
                grown_B[:, :, :old_r] = self.B
            self.A, self.B = grown_A, grown_B
        self.A[slot].zero_()
        self.B[slot].zero_()
        self.A[slot, :r] = A.to(self.A)
        self.B[slot, :, :r] = B.to(self.B)
        self.scaling[slot] = scaling
        if magnitude is not None:
            if self.g is None:
                self.g = torch.ones(self.slots + 1, self.out_features, dtype=self.dtype, device=self.device)
            # g = m / ||W + s B A|| per output feature, in float32 as lorafit's DoRA merge computes it.
            weight = self.base_weight().float() + scaling * (B.float().to(self.device) @ A.float().to(self.device))
            self.g[slot] = (magnitude.float().to(self.device) / torch.linalg.norm(weight, dim=1)).to(self.g)
        elif self.g is not None:
            self.g[slot] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.A is None or not self.batch.any:
            return y
        rows = self.batch.rows
        h = x.reshape(rows.size(0), -1, self.in_features)  # (B, T, in), also for the LM head's (B, in)
        a = torch.bmm(h, self.A[rows].transpose(1, 2))  # (B, T, r)
        delta = torch.bmm(a, self.B[rows].transpose(1, 2)) * self.scaling[rows].to(a.dtype)[:, None, None]
        out = y.reshape(delta.shape) + delta.to(y.dtype)
        if self.g is not None:
            out = out * self.g[rows][:, None, :]
        return out.reshape(y.shape)

    def extra_repr(self) -> str:
        rank = 0 if self.A is None else self.A.size(1)
        return f"in={self.in_features}, out={self.out_features}, slots={self.slots}, padded_rank={rank}"


def base_dtype_and_device(base: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype a (possibly quantised) linear layer computes in, and its device."""
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.dtype, weight.device
    return base.dtype, base.device  # lorafit.quant.QuantizedLinear
