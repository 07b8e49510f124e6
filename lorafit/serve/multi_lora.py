"""Many LoRA adapters on one frozen base, mixed in one batch: each row of the batch picks its own adapter.

The base nn.Linear stays unmerged and shared; beside it sit every loaded adapter's A and B stacked in
slots, and one forward gathers them by row (the semantics of Punica's BGMV kernel):
y[i] = W x[i] + s[a_i] · (x[i] A[a_i]ᵀ) B[a_i]ᵀ. Ranks differ between adapters, so a slot is zero-padded
to the largest rank (zero rows of A meet zero columns of B: the padding adds exactly nothing). The last
slot is all zeros, so a row without an adapter uses index -1.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class BatchAdapters:
    """Which adapter slot each row of the next forward uses (-1: none), shared by every MultiLoRALinear."""

    def __init__(self) -> None:
        self.rows = torch.empty(0, dtype=torch.long)
        self.any = False

    def set(self, rows: torch.Tensor) -> None:
        """Set the (B,) slot index per row before a forward."""
        self.rows = rows
        self.any = bool((rows >= 0).any())


class MultiLoRALinear(nn.Module):
    """A shared base nn.Linear plus stacked LoRA weights for `slots` adapters, chosen per batch row."""

    def __init__(self, base: nn.Linear, slots: int, batch: BatchAdapters) -> None:
        super().__init__()
        self.base, self.slots, self.batch = base, slots, batch
        self.in_features, self.out_features = base.in_features, base.out_features
        # Allocated when an adapter first targets this layer; (slots + 1, r, in), (slots + 1, out, r), (slots + 1,).
        self.A: torch.Tensor | None = None
        self.B: torch.Tensor | None = None
        self.scaling = torch.zeros(slots + 1, device=base.weight.device)

    @torch.no_grad()
    def set_slot(self, slot: int, A: torch.Tensor | None, B: torch.Tensor | None, scaling: float) -> None:
        """Put one adapter's A (r, in) and B (out, r) in a slot (None: the adapter leaves this layer alone)."""
        weight = self.base.weight
        if A is None or B is None:
            if self.A is not None:
                self.A[slot].zero_()
                self.B[slot].zero_()
            self.scaling[slot] = 0.0
            return
        r = A.size(0)
        if self.A is None or self.A.size(1) < r:
            # Grow the padded rank: existing slots keep their values, the new rows/columns are zero.
            old_r = 0 if self.A is None else self.A.size(1)
            grown_A = torch.zeros(self.slots + 1, r, self.in_features, dtype=weight.dtype, device=weight.device)
            grown_B = torch.zeros(self.slots + 1, self.out_features, r, dtype=weight.dtype, device=weight.device)
            if self.A is not None:
                grown_A[:, :old_r] = self.A
                grown_B[:, :, :old_r] = self.B
            self.A, self.B = grown_A, grown_B
        self.A[slot].zero_()
        self.B[slot].zero_()
        self.A[slot, :r] = A.to(self.A)
        self.B[slot, :, :r] = B.to(self.B)
        self.scaling[slot] = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.A is None or not self.batch.any:
            return y
        rows = self.batch.rows
        h = x.reshape(rows.size(0), -1, self.in_features)  # (B, T, in), also for the LM head's (B, in)
        a = torch.bmm(h, self.A[rows].transpose(1, 2))  # (B, T, r)
        delta = torch.bmm(a, self.B[rows].transpose(1, 2)) * self.scaling[rows].to(a.dtype)[:, None, None]
        return y + delta.reshape(y.shape)

    def extra_repr(self) -> str:
        rank = 0 if self.A is None else self.A.size(1)
        return f"in={self.in_features}, out={self.out_features}, slots={self.slots}, padded_rank={rank}"
