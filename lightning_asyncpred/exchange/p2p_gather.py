"""Collecting the owners' state on the rank that writes a checkpoint (pure ``torch.distributed``).

Only the writing rank needs every owner's master shard, optimizer state and round in progress. Everything moves
as raw bytes (any dtype, exact), point to point to that rank, in messages of at most ``chunk_bytes``, straight from
the owners' live tensors: a rank that does not write holds at most one chunk (a CPU copy of it when its state is
on a GPU) beyond its own state, and the writing rank the result plus nothing more. Small metadata (shapes, dtypes,
scalars) goes with ``gather_object``. The ranks send in rank order; the writing rank receives in the same order.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

CHUNK_BYTES = 16 * 2**20


def _bytes(t: Tensor) -> Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def _send(t: Tensor, dst: int, group: Any, chunk_bytes: int) -> None:
    data = _bytes(t.contiguous())
    for o in range(0, data.numel(), chunk_bytes):
        dist.send(data[o : o + chunk_bytes].cpu(), dst, group=group)


def _recv(t: Tensor, src: int, group: Any, chunk_bytes: int) -> None:
    data = _bytes(t)  # t is a new contiguous CPU tensor: receive into it in place
    for o in range(0, data.numel(), chunk_bytes):
        dist.recv(data[o : o + chunk_bytes], src, group=group)


def gather_flat(mine: Tensor, numels: Sequence[int], dst: int = 0, group: Any = None,
                chunk_bytes: int = CHUNK_BYTES) -> Optional[list[Tensor]]:
    """Every rank's flat tensor (rank ``k``'s has ``numels[k]`` elements, all of ``mine``'s dtype) on rank ``dst``,
    as CPU tensors in rank order; ``None`` on the other ranks."""
    rank, world = dist.get_rank(), dist.get_world_size(group)
    if rank != dst:
        _send(mine, dst, group, chunk_bytes)
        return None
    out = []
    for k in range(world):
        if k == dst:
            out.append(mine.detach().to("cpu", copy=True))
            continue
        t = torch.empty(numels[k], dtype=mine.dtype)
        _recv(t, k, group, chunk_bytes)
        out.append(t)
    return out


def gather_states(states: dict[int, dict[str, Any]], dst: int = 0, group: Any = None,
                  chunk_bytes: int = CHUNK_BYTES) -> Optional[dict[int, dict[str, Any]]]:
    """Every rank's ``{key: {name: tensor or value}}`` merged on rank ``dst`` (tensors on the CPU, copies);
    ``None`` on the other ranks. The ranks' indices are disjoint (each owner's parameters)."""
    rank, world = dist.get_rank(), dist.get_world_size(group)
    meta = [(i, key, (tuple(v.shape), v.dtype) if isinstance(v, Tensor) else None, None if isinstance(v, Tensor) else v)
            for i in states for key, v in states[i].items()]
    metas: Optional[list[Any]] = [None] * world if rank == dst else None
    dist.gather_object(meta, metas, dst=dst, group=group)
    if rank != dst:
        for i, key, spec, _ in meta:
            if spec is not None:
                _send(states[i][key], dst, group, chunk_bytes)
        return None
    assert metas is not None
    out: dict[int, dict[str, Any]] = {}
    for k in range(world):
        for i, key, spec, value in metas[k]:
            if spec is None:
                out.setdefault(i, {})[key] = value
            elif k == dst:
                out.setdefault(i, {})[key] = states[i][key].detach().to("cpu", copy=True)
            else:
                t = torch.empty(spec[0], dtype=spec[1])
                _recv(t, k, group, chunk_bytes)
                out.setdefault(i, {})[key] = t
    return out
