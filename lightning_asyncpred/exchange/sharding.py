"""Ownership of the parameters in the point-to-point transport: ``N`` shards, each a list of pieces.

A :class:`Piece` is a contiguous range of one parameter's elements, in its logical (row-major) order:
``params[index].reshape(-1)[start:stop]``. Shard ``k`` is owned by rank ``k``. Two layouts, both depending only on
the sizes and ``N``, so every rank computes the same shards without communication:

* :func:`flat_partition` (``sharding="flat"``, the default for element-wise optimizers): the concatenation of all
  parameters in model order (``P`` elements) cut into ``N`` contiguous pieces of ``floor(P / N)`` or
  ``ceil(P / N)`` elements, ``bounds[k] = floor(k P / N)``. A tensor may span owners, as in ZeRO and FSDP's flat
  parameters; at most ``N - 1`` tensors are cut. Every message of a step then carries ``P / N`` elements (to within
  one), so a rank sends ``2 (N - 1) P / N`` elements per step, ring all-reduce's volume, at any ``N`` for any model.
  Valid only for an optimizer whose step is the same function of each element (SGD, Adam, ...): a piece of a tensor
  is stepped as if it were a tensor of its own (see :func:`elementwise`).
* :func:`partition` (``sharding="whole"``): whole parameters, greedy largest-first as
  ``torch.distributed.optim.ZeroRedundancyOptimizer`` partitions (sizes sorted largest first, ties by index, each
  to the shard with the smallest running total, ties to the lowest shard; within a shard model order). Any optimizer;
  the largest shard is at least the largest tensor, so the busiest rank's bytes grow as ``2 (N - 1) M``.

:func:`merge_pieces` / :func:`slice_state` turn per-piece states (an owner's optimizer state, its round in progress)
into per-parameter ones (what a checkpoint holds, as ``ddp``'s optimizer would) and back.
"""

from __future__ import annotations

from typing import Any, Hashable, NamedTuple, Sequence

import torch
from torch import Tensor

from lightning_asyncpred.validation import check_int

SHARDINGS = ("auto", "flat", "whole")

# torch.optim classes whose step treats every element alike (state tensors of the parameter's shape, scalars);
# a subclass may change step, so only these exact classes count as element-wise
_ELEMENTWISE = ("SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "ASGD", "Rprop")


class Piece(NamedTuple):
    """Elements ``[start, stop)`` of parameter ``index`` (flattened in logical order)."""

    index: int
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


def elementwise(optimizer: Any) -> bool:
    """Whether ``optimizer`` (or the one a ``LightningOptimizer`` wraps) is one of torch's element-wise optimizers,
    whose step on a piece of a tensor equals the piece of its step on the tensor."""
    optimizer = getattr(optimizer, "_optimizer", optimizer)
    return any(type(optimizer) is getattr(torch.optim, name, None) for name in _ELEMENTWISE)


def check_sharding(sharding: str) -> str:
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {', '.join(map(repr, SHARDINGS))}, got {sharding!r}")
    return sharding


def resolve_sharding(sharding: str, optimizer: Any) -> str:
    """``"flat"`` or ``"whole"`` for ``optimizer``: ``"auto"`` is ``"flat"`` for torch's element-wise optimizers and
    ``"whole"`` otherwise (a step may depend on a tensor's shape or norm: LARS, LAMB, Adafactor, a user's own). An
    explicit ``"flat"`` with another of torch's optimizers is refused; with a user's own class it is the user's
    statement that its step is element-wise."""
    check_sharding(sharding)
    if sharding != "auto":
        inner = getattr(optimizer, "_optimizer", optimizer)
        name = type(inner).__name__
        if sharding == "flat" and type(inner).__module__.startswith("torch.optim") and not elementwise(inner):
            raise ValueError(
                f"sharding='flat' cuts tensors between owners, which changes the step of {name} (not element-wise: "
                f"its step depends on a whole tensor); use sharding='whole' or 'auto'. Element-wise: {', '.join(_ELEMENTWISE)}"
            )
        return sharding
    return "flat" if elementwise(optimizer) else "whole"


def shard_pieces(sizes: Sequence[int], num_shards: int, sharding: str) -> list[list[Piece]]:
    """The shards of ``sharding`` (``"flat"`` or ``"whole"``, see :func:`resolve_sharding`)."""
    if sharding == "flat":
        return flat_partition(sizes, num_shards)
    if sharding == "whole":
        return whole_pieces(sizes, num_shards)
    raise ValueError(f"sharding must be 'flat' or 'whole' here, got {sharding!r}")


def partition(sizes: Sequence[int], num_shards: int) -> list[list[int]]:
    """Indices of ``sizes`` per shard (greedy largest-first, whole parameters; see the module docstring)."""
    check_int("num_shards", num_shards, 1)
    totals = [0] * num_shards
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    for i in sorted(range(len(sizes)), key=lambda i: (-int(sizes[i]), i)):
        k = min(range(num_shards), key=lambda k: (totals[k], k))
        shards[k].append(i)
        totals[k] += int(sizes[i])
    return [sorted(s) for s in shards]


def whole_pieces(sizes: Sequence[int], num_shards: int) -> list[list[Piece]]:
    """:func:`partition` as pieces (each a whole parameter)."""
    return [[Piece(i, 0, int(sizes[i])) for i in shard] for shard in partition(sizes, num_shards)]


def flat_partition(sizes: Sequence[int], num_shards: int) -> list[list[Piece]]:
    """The flat parameter space cut into ``num_shards`` contiguous, equal pieces (see the module docstring)."""
    check_int("num_shards", num_shards, 1)
    total = sum(int(s) for s in sizes)
    bounds = [k * total // num_shards for k in range(num_shards + 1)]
    starts = [0]
    for s in sizes:
        starts.append(starts[-1] + int(s))
    shards: list[list[Piece]] = []
    for k in range(num_shards):
        lo, hi = bounds[k], bounds[k + 1]
        shards.append([Piece(i, max(lo, starts[i]) - starts[i], min(hi, starts[i + 1]) - starts[i])
                       for i in range(len(sizes)) if max(lo, starts[i]) < min(hi, starts[i + 1])])
    return shards


def piece_key(piece: Piece, size: int) -> Hashable:
    """How an owner keys a piece's state: the parameter index for a whole parameter, else ``(index, start, stop)``."""
    return piece.index if piece.start == 0 and piece.stop == size else tuple(piece)


def merge_pieces(states: dict[Hashable, dict[str, Any]], shapes: Sequence[torch.Size]) -> dict[int, dict[str, Any]]:
    """Per-piece states (keys from :func:`piece_key`) merged into per-parameter ones: a piece's tensors of its
    flat shape ``(stop - start,)`` are the parameter's elements (concatenated in order, reshaped to ``shapes[index]``);
    anything else (a step count, a scalar) is the same on every piece and taken from the first."""
    out: dict[int, dict[str, Any]] = {}
    parts: dict[int, list[tuple[int, int, dict[str, Any]]]] = {}
    for key, state in states.items():
        if isinstance(key, tuple):
            parts.setdefault(key[0], []).append((key[1], key[2], state))
        else:
            out[key] = state
    for index, pieces in parts.items():
        pieces.sort(key=lambda p: p[0])
        covered = [(a, b) for a, b, _ in pieces]
        numel = int(torch.Size(shapes[index]).numel())
        if covered[0][0] != 0 or covered[-1][1] != numel or any(b != a2 for (_, b), (a2, _) in zip(covered, covered[1:])):
            raise ValueError(f"the pieces of parameter {index} cover {covered}, not [0, {numel}) once")
        merged: dict[str, Any] = {}
        for name, value in pieces[0][2].items():
            if isinstance(value, Tensor) and value.dim() == 1 and value.numel() == pieces[0][1] - pieces[0][0]:
                merged[name] = torch.cat([s[name].reshape(-1) for _, _, s in pieces]).view(shapes[index])
            else:
                merged[name] = value
        out[index] = merged
    return out


def slice_state(state: dict[str, Any], piece: Piece, shape: torch.Size) -> dict[str, Any]:
    """A parameter's state (of ``shape``) cut to ``piece``: tensors of the parameter's shape to the piece's
    elements (flat), anything else as is (the inverse of :func:`merge_pieces`)."""
    numel = int(torch.Size(shape).numel())
    if piece.start == 0 and piece.stop == numel:
        return state
    return {k: (v.reshape(-1)[piece.start:piece.stop] if isinstance(v, Tensor) and v.dim() > 0 and v.numel() == numel
                else v) for k, v in state.items()}
