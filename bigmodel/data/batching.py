"""Length-bucketed batching: few pad tokens per batch, random order of batches, one shard per rank."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

__all__ = ["BucketBatchSampler", "TextDataset", "pad_batch"]


class TextDataset(Dataset):
    """Encoded texts and their labels; item ``i`` is ``(ids (T_i,) int64, label int)``."""

    def __init__(self, ids: Sequence[Tensor], labels: Sequence[int]) -> None:
        if len(ids) != len(labels):
            raise ValueError(f"TextDataset: {len(ids)} texts but {len(labels)} labels")
        self.ids = list(ids)
        self.labels = list(labels)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.ids[i], self.labels[i]

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.ids]


def pad_batch(items: Sequence[tuple[Tensor, int]], pad_id: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Collates ``(ids, label)`` items into ``ids (B, T)`` padded with ``pad_id`` (``T`` = longest),
    ``lengths (B,)`` int64 and ``labels (B,)`` int64."""
    seqs = [ids for ids, _ in items]
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    padded = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=pad_id)
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    return padded, lengths, labels


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of indices of similar length.

    With ``shuffle`` (training), each epoch shuffles the indices, cuts them into pools of
    ``batch_size * pool_batches``, sorts each pool by length, cuts it into batches, and shuffles the
    order of all batches; the randomness comes from ``seed + epoch`` alone (call ``set_epoch``), so
    every rank of a distributed run sees the same global batches. Without ``shuffle`` (evaluation),
    batches are cut from the indices sorted by length.

    Distributed: rank ``r`` of ``num_replicas`` takes global batches ``r, r + num_replicas, ...``.
    With ``even`` (needed for DistributedDataParallel, where every rank must run the same number of
    steps), the batch list is first extended by repeating its first batches up to a multiple of
    ``num_replicas``; without it (evaluation) every batch is seen exactly once.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        pool_batches: int = 50,
        num_replicas: int = 1,
        rank: int = 0,
        even: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"BucketBatchSampler: batch_size must be >= 1, got {batch_size}")
        if pool_batches < 1:
            raise ValueError(f"BucketBatchSampler: pool_batches must be >= 1, got {pool_batches}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"BucketBatchSampler: rank must be in [0, {num_replicas}), got {rank}")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.pool_batches = pool_batches
        self.num_replicas = num_replicas
        self.rank = rank
        self.even = even
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batches(self) -> list[list[int]]:
        n = len(self.lengths)
        if not self.shuffle:
            order = torch.sort(self.lengths, stable=True).indices
            return [order[i : i + self.batch_size].tolist() for i in range(0, n, self.batch_size)]
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(n, generator=g)
        pool = self.batch_size * self.pool_batches
        batches = []
        for start in range(0, n, pool):
            chunk = perm[start : start + pool]
            chunk = chunk[torch.sort(self.lengths[chunk], stable=True).indices]
            batches.extend(
                chunk[i : i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)
            )
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._global_batches()
        if self.even and batches:
            total = math.ceil(len(batches) / self.num_replicas) * self.num_replicas
            batches += [batches[i % len(batches)] for i in range(total - len(batches))]
        return iter(batches[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        n_batches = math.ceil(len(self.lengths) / self.batch_size)
        if self.shuffle:
            pool = self.batch_size * self.pool_batches
            full, rest = divmod(len(self.lengths), pool)
            n_batches = full * self.pool_batches + math.ceil(rest / self.batch_size)
        if self.even:
            return math.ceil(n_batches / self.num_replicas)
        return len(range(self.rank, n_batches, self.num_replicas))
