"""Batches without wasted compute: examples packed into rows, or grouped by length, and the collator.

Packing puts several tokenised examples end to end in one row of at most ``max_seq_len`` tokens. Each
example keeps its own position ids (0, 1, 2, … restarting at every example), and the row carries no
attention mask: transformers then reads the restarts as packed-sequence boundaries and builds a
block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``; flash-attention uses the
same ids for its variable-length kernels), so no example attends to another.

    >>> pack_lengths([5, 3, 4, 2], 8)
    [[0, 1], [2, 3]]

Imports torch only inside the collator.
"""
from __future__ import annotations

import bisect
import dataclasses
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from medtune.chat_format import IGNORE_INDEX

if TYPE_CHECKING:
    import numpy as np
    import torch


class Examples(Protocol):
    """A map-style dataset of ``{"input_ids", "labels"}`` arrays with their lengths (`SupervisedDataset`)."""

    lengths: list[int]

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> dict[str, "np.ndarray"]: ...


def pack_lengths(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: example indices grouped into rows of at most ``capacity`` tokens.

    Longest first, each into the fullest row it still fits, so rows come out nearly full. Deterministic
    (ties keep index order); the sampler shuffles the rows.
    """
    if any(n > capacity for n in lengths):
        raise ValueError(f"an example of {max(lengths)} tokens exceeds the row capacity {capacity}")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, row = free.pop(k)
        else:
            space, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, row))
    return rows


class PackedDataset:
    """Rows of packed examples: ``input_ids``, ``labels`` and ``position_ids`` restarting per example."""

    def __init__(self, examples: Examples, max_seq_len: int) -> None:
        self.examples = examples
        self.rows = pack_lengths(examples.lengths, max_seq_len)
        lengths = examples.lengths
        self.lengths = [sum(lengths[i] for i in row) for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, r: int) -> dict[str, "np.ndarray"]:
        import numpy as np

        parts = [self.examples[i] for i in self.rows[r]]
        labels = [p["labels"].copy() for p in parts]
        for lab in labels:
            # The shifted loss makes a row's token predict the next one: no example learns its neighbour's opening.
            lab[0] = IGNORE_INDEX
        return {"input_ids": np.concatenate([p["input_ids"] for p in parts]),
                "labels": np.concatenate(labels),
                "position_ids": np.concatenate([np.arange(len(p["input_ids"]), dtype=np.int32) for p in parts])}


@dataclasses.dataclass
class Collator:
    """Right-pads a batch to its longest row and counts the padding.

    Unpacked examples get an ``attention_mask``. Packed rows (with ``position_ids``) get none: their
    padding tail is one more short sequence (positions restarting at 0) that no real token attends to,
    and whose labels are `IGNORE_INDEX`.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    tokens: int = 0  # real tokens collated so far
    slots: int = 0  # token positions computed so far (real + padding)

    @property
    def padding_fraction(self) -> float:
        return 1 - self.tokens / self.slots if self.slots else 0.0

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, "torch.Tensor"]:
        import torch

        width = max(len(b["input_ids"]) for b in batch)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        packed = "position_ids" in batch[0]
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        extra = torch.arange(width).repeat(len(batch), 1) if packed else torch.zeros((len(batch), width), dtype=torch.long)
        for row, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[row, :n] = torch.as_tensor(b["input_ids"])
            labels[row, :n] = torch.as_tensor(b["labels"])
            if packed:
                extra[row, :n] = torch.as_tensor(b["position_ids"])
                extra[row, n:] -= n
            else:
                extra[row, :n] = 1
            self.tokens += n
        self.slots += ids.numel()
        return {"input_ids": ids, "labels": labels, ("position_ids" if packed else "attention_mask"): extra}


class LengthGroupedSampler:
    """Indices in batches of similar length, so that padding to the longest in a batch costs little.

    Each epoch: a permutation seeded by (seed, epoch) is cut into groups of ``group`` batches, each group
    is sorted by length and cut into batches, and the batches are shuffled (the longest batch first, so a
    run that will run out of memory does so at once). The same seed and epoch give the same order, which
    exact resume relies on (the `Trainer` calls ``set_epoch``).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, group: int = 64) -> None:
        self.lengths, self.batch_size, self.seed, self.group = list(lengths), batch_size, seed, group
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        import torch

        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        span = self.group * self.batch_size
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start:start + span], key=lambda i: -self.lengths[i])
            batches += [chunk[k:k + self.batch_size] for k in range(0, len(chunk), self.batch_size)]
        # A short batch stays last: anywhere else it would shift every later batch off its boundaries.
        tail = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        if shuffled:
            longest = max(range(len(shuffled)), key=lambda b: self.lengths[shuffled[b][0]])
            shuffled[0], shuffled[longest] = shuffled[longest], shuffled[0]
        return iter([i for batch in shuffled + tail for i in batch])


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of computed positions that are padding when ``batches`` (lists of indices) pad to their longest."""
    slots = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    return 1 - sum(lengths[i] for b in batches for i in b) / slots if slots else 0.0
