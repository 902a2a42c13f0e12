"""Ownership of the parameters in the point-to-point transport: N shards, balanced by size (pure Python).

Greedy largest-first, as ``torch.distributed.optim.ZeroRedundancyOptimizer`` partitions: parameters sorted by
size (largest first, ties by index), each assigned to the shard with the smallest running total (ties: the
lowest shard). The result depends only on the sizes and ``N``, so every rank computes the same shards
without communication. Shard ``k`` is owned by rank ``k``. Within a shard, parameters keep their model order.
With more ranks than parameters some shards are empty (their owners own nothing).
"""

from __future__ import annotations

from typing import Sequence

from lightning_asyncpred.validation import check_int


def partition(sizes: Sequence[int], num_shards: int) -> list[list[int]]:
    """Indices of ``sizes`` per shard (greedy largest-first; see the module docstring)."""
    check_int("num_shards", num_shards, 1)
    totals = [0] * num_shards
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    for i in sorted(range(len(sizes)), key=lambda i: (-int(sizes[i]), i)):
        k = min(range(num_shards), key=lambda k: (totals[k], k))
        shards[k].append(i)
        totals[k] += int(sizes[i])
    return [sorted(s) for s in shards]
