"""Length-grouped micro-batches with exact, resumable positions, and right-padding collation.

Per epoch the plan shuffles all sample indices (seed + epoch), cuts them into mega-batches of
``mega_batch_factor * micro_batch_size``, sorts each mega-batch by length, cuts it into micro-batches,
and shuffles the order of those micro-batches, the largest first. Every sample appears exactly once per epoch (no
sampling with replacement, nothing dropped; a mega-batch's last micro-batch may be smaller), so
micro-step ``s`` of a run is batch ``s % len(plan)`` of epoch ``s // len(plan)``, and a resumed run
that knows its step gets exactly the batches it would have had.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from lorafit.data.prepare import IGNORE_INDEX

MEGA_BATCH_FACTOR = 50
"""Micro-batches per length-sorted mega-batch; 1 gives random micro-batches (no grouping by length)."""


class BatchPlan:
    """Deterministic length-grouped batches of sample indices for each epoch."""

    def __init__(
        self,
        lengths: Sequence[int],
        micro_batch_size: int,
        seed: int = 42,
        mega_batch_factor: int = MEGA_BATCH_FACTOR,
    ) -> None:
        if micro_batch_size < 1 or mega_batch_factor < 1:
            raise ValueError("micro_batch_size and mega_batch_factor must be at least 1")
        if not lengths:
            raise ValueError("cannot plan batches over an empty dataset")
        self.lengths = list(lengths)
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.mega_batch_size = mega_batch_factor * micro_batch_size
        # The batch count per epoch depends only on the sizes, not on the shuffle.
        n, mega = len(self.lengths), self.mega_batch_size
        self.batches_per_epoch = sum(-(-min(mega, n - start) // micro_batch_size) for start in range(0, n, mega))

    def __len__(self) -> int:
        return self.batches_per_epoch

    def batches(self, epoch: int) -> list[list[int]]:
        """All micro-batches of one epoch, as lists of sample indices, the largest first."""
        batches = self.shuffled_batches(epoch)
        # The largest batch goes first (as Hugging Face's length-grouped sampler does): a run that does not
        # fit in memory fails in its first step, not hours in.
        largest = max(range(len(batches)), key=lambda b: self.token_counts(batches[b])[1])
        batches.insert(0, batches.pop(largest))
        return batches

    def shuffled_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's length-grouped micro-batches in shuffled order."""
        rng = random.Random(self.seed + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        batches = []
        for start in range(0, len(order), self.mega_batch_size):
            mega = sorted(order[start : start + self.mega_batch_size], key=self.lengths.__getitem__)
            batches += [mega[i : i + self.micro_batch_size] for i in range(0, len(mega), self.micro_batch_size)]
        rng.shuffle(batches)
        return batches

    def token_counts(self, batch: Sequence[int]) -> tuple[int, int]:
        """(real tokens, tokens after padding to the batch's longest sample) for throughput and padding waste."""
        batch_lengths = [self.lengths[i] for i in batch]
        return sum(batch_lengths), max(batch_lengths) * len(batch_lengths)


def collate(samples: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (input_ids, labels) samples to the longest: inputs with pad_id, labels with -100."""
    longest = max(len(ids) for ids, _ in samples)
    input_ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, lab) in enumerate(samples):
        input_ids[row, : len(ids)] = ids
        labels[row, : len(lab)] = lab
    return input_ids, labels
