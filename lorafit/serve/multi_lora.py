"""Many LoRA adapters on one frozen base, mixed in one batch: each row of the batch picks its own adapter.

The base layer (an nn.Linear, or a quantised one) stays unmerged and shared; beside it sit every loaded
adapter's A and B stacked in slots, and one forward gathers them by row (the semantics of Punica's BGMV
kernel): y[i] = W x[i] + s[a_i] · (x[i] A[a_i]ᵀ) B[a_i]ᵀ. Ranks differ between adapters, so a slot is
zero-padded to the largest rank (zero rows of A meet zero columns of B: the padding adds exactly nothing).
The last slot is all zeros: rows without an adapter use it.

DoRA adapters scale each output feature by g = m / ||W + s B A|| (row norms). At inference W, A, B and m are
fixed, so g is computed once when the adapter is installed, and a row's output is g[a_i] ⊙ (W x[i] + s B A x[i]):
the same as the merged DoRA weight. Layers that some DoRA adapter adapts keep one g per slot (ones for plain
LoRA adapters and for the empty slot).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class BatchAdapters:
    """Which of `slots` adapter slots each row of the next forward uses, shared by every MultiLoRALinear.

    Slot `slots` is the empty one (all zeros): rows without an adapter use it. `single` is the slot when every row
    uses the same adapter (one finetune served to many clients): layers then take that slot's weights as views and
    gather nothing. `always` makes every forward take the gathered path, even for a batch of base rows: a compiled
    step then has one graph for every kind of batch.
    """

    def __init__(self, slots: int, device: torch.device | str = "cpu", always: bool = False) -> None:
        self.slots, self.device = slots, torch.device(device)
        self.rows = torch.empty(0, dtype=torch.long, device=self.device)
        self.always = always
        self.any = always
        self.single: int | None = None

    def set(self, slots: list[int]) -> None:
        """Set each row's adapter slot (-1: none) before a forward."""
        self.rows = torch.tensor([slot if slot >= 0 else self.slots for slot in slots], device=self.device)
        self.any = self.always or any(slot >= 0 for slot in slots)
        same = not self.always and all(slot == slots[0] for slot in slots)
        self.single = slots[0] if same and slots[0] >= 0 else None


class MultiLoRALinear(nn.Module):
    """A shared base linear layer plus stacked LoRA weights (and DoRA scales) for `slots` adapters, chosen per row."""

    def __init__(self, base: nn.Module, batch: BatchAdapters) -> None:
        super().__init__()
        if getattr(base, "bias", None) is not None:
            raise ValueError("multi-LoRA layers are for bias-free linear layers (as in Llama)")
        self.base, self.slots, self.batch = base, batch.slots, batch
        self.in_features, self.out_features = base.in_features, base.out_features
        self.dtype, self.device = base_dtype_and_device(base)
        # Allocated when an adapter first targets this layer: (slots + 1, r, in + out), each slot holding A (r, in)
        # beside its scaled (s B)ᵀ (r, out), so that one gather per layer fetches both; g (slots + 1, out) once a
        # DoRA adapter does.
        self.AB: torch.Tensor | None = None
        self.g: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        """The padded rank (the largest of the installed adapters'), 0 before any."""
        return 0 if self.AB is None else self.AB.size(1)

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
            if self.AB is not None:
                self.AB[slot].zero_()
            if self.g is not None:
                self.g[slot] = 1.0
            return
        r = A.size(0)
        if self.rank < r:
            # Grow the padded rank: existing slots keep their values, the new rows are zero.
            grown = torch.zeros(
                self.slots + 1, r, self.in_features + self.out_features, dtype=self.dtype, device=self.device
            )
            if self.AB is not None:
                grown[:, : self.rank] = self.AB
            self.AB = grown
        self.AB[slot].zero_()
        self.AB[slot, :r, : self.in_features] = A.to(self.AB)
        self.AB[slot, :r, self.in_features :] = (scaling * B.float()).t().to(self.AB)
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
        if self.AB is None or not self.batch.any:
            return y
        n = self.in_features
        if self.batch.single is not None:  # one adapter for every row: its weights are views, nothing is gathered
            AB = self.AB[self.batch.single]
            out = torch.addmm(y.reshape(-1, self.out_features), x.reshape(-1, n) @ AB[:, :n].t(), AB[:, n:])
            return (out if self.g is None else out * self.g[self.batch.single]).reshape(y.shape)
        rows = self.batch.rows
        AB = self.AB.index_select(0, rows)  # (B, r, in + out)
        h = x.reshape(rows.size(0), -1, n)  # (B, T, in), also for the LM head's (B, in)
        out = torch.baddbmm(
            y.reshape(h.size(0), h.size(1), -1), torch.bmm(h, AB[:, :, :n].transpose(1, 2)), AB[:, :, n:]
        )
        if self.g is not None:
            out = out * self.g.index_select(0, rows)[:, None, :]
        return out.reshape(y.shape)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, slots={self.slots}, padded_rank={self.rank}"


def base_dtype_and_device(base: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype a (possibly quantised) linear layer computes in, and its device."""
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.dtype, weight.device
    return base.dtype, base.device  # lorafit.quant.QuantizedLinear
