"""Resumable, deterministic per-rank sampling with a data cursor.

Epoch e is a global permutation of the dataset seeded by (seed, e); rank r takes the strided
slice `perm[r::world]`, cut to the same length on every rank (`n // world`) so ranks never wait
on each other. The stream runs across epochs forever; a `DataCursor(epoch, position)` says where
in it a rank is (`position` samples of epoch `epoch` consumed). Saving the cursor with a
checkpoint and starting a new sampler from it gives exactly the samples an uninterrupted run
would have seen next.

Items are `(epoch, index)` so the dataset can seed each sample's augmentation from
(seed, epoch, index): the crops then depend neither on the number of workers nor on where the
run was resumed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class DataCursor:
    epoch: int = 0
    position: int = 0  # samples of `epoch` this rank has consumed

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DataCursor":
        return cls(int(data["epoch"]), int(data["position"]))


def samples_per_rank(num_samples: int, world_size: int) -> int:
    """Per-rank epoch length: the tail `num_samples % world_size` is dropped each epoch."""
    n = num_samples // world_size
    if n < 1:
        raise ValueError(f"dataset of {num_samples} samples is too small for {world_size} ranks")
    return n


def advance(cursor: DataCursor, n: int, per_rank: int) -> DataCursor:
    """The cursor after consuming `n` more samples (crossing epochs as needed)."""
    total = cursor.position + n
    return DataCursor(cursor.epoch + total // per_rank, total % per_rank)


def epoch_indices(num_samples: int, epoch: int, seed: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's dataset indices for `epoch`, in order: [samples_per_rank] int64."""
    g = torch.Generator().manual_seed(_mix(seed, epoch))
    perm = torch.randperm(num_samples, generator=g)
    return perm[rank::world_size][: samples_per_rank(num_samples, world_size)]


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (order-sensitive, no collisions for small values)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class ResumableSampler(torch.utils.data.Sampler):
    """Infinite stream of `(epoch, index)` for one rank, starting at `cursor`."""

    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int,
                 cursor: DataCursor = DataCursor()):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.num_samples, self.rank, self.world_size, self.seed = num_samples, rank, world_size, seed
        self.per_rank = samples_per_rank(num_samples, world_size)
        if not 0 <= cursor.position < self.per_rank:
            raise ValueError(f"data cursor position {cursor.position} outside epoch of {self.per_rank}")
        self.cursor = cursor

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, start = self.cursor.epoch, self.cursor.position
        while True:
            indices = epoch_indices(self.num_samples, epoch, self.seed, self.rank, self.world_size)
            for i in indices[start:].tolist():
                yield epoch, i
            epoch, start = epoch + 1, 0


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample visit."""
    return _mix(seed, epoch, index, 0xA06)
