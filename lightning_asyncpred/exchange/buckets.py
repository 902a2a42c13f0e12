"""Flatten gradients into a few large contiguous buckets and back (pure torch).

A bucket is a list of pieces (``sharding.py``): ranges of parameters' elements in logical order, usually whole
parameters; the p2p transport's flat shards cut a tensor between two buckets.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from lightning_asyncpred.exchange.sharding import Piece
from lightning_asyncpred.validation import check_positive_number


class GradientBuckets:
    """A fixed assignment of parameters to flat buckets of at most ``bucket_cap_mb`` MiB each.

    Parameters are grouped in order by dtype and device; a single parameter larger than the cap gets a
    bucket of its own. Every rank that builds it from the same model gets the same layout.
    """

    def __init__(self, params: Sequence[Tensor], bucket_cap_mb: float = 25.0) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("GradientBuckets needs at least one parameter")
        cap = check_positive_number("bucket_cap_mb", bucket_cap_mb) * 2**20
        self.groups: list[list[int]] = []
        size = 0.0
        for i, p in enumerate(self.params):
            nbytes = p.numel() * p.element_size()
            last = self.params[self.groups[-1][-1]] if self.groups else None
            compatible = last is not None and last.dtype == p.dtype and last.device == p.device
            if not compatible or size + nbytes > cap:
                self.groups.append([])
                size = 0.0
            self.groups[-1].append(i)
            size += nbytes
        self._set_pieces([[Piece(i, 0, self.params[i].numel()) for i in g] for g in self.groups])

    @classmethod
    def from_groups(cls, params: Sequence[Tensor], groups: Sequence[Sequence[int]]) -> "GradientBuckets":
        """Buckets with an explicit assignment: bucket ``k`` holds ``params[i]`` for ``i`` in ``groups[k]``, in
        that order (e.g. the shards of the point-to-point transport). Empty groups give empty buckets."""
        params = list(params)
        flat = sorted(i for g in groups for i in g)
        if flat != list(range(len(params))):
            raise ValueError(f"groups must assign every one of the {len(params)} parameters exactly once, got {groups!r}")
        return cls.from_pieces(params, [[Piece(i, 0, params[i].numel()) for i in g] for g in groups])

    @classmethod
    def from_pieces(cls, params: Sequence[Tensor], pieces: Sequence[Sequence[Piece]]) -> "GradientBuckets":
        """Buckets of pieces (``sharding.py``): bucket ``k`` is the concatenation of ``pieces[k]``, in order; every
        element of every parameter in exactly one piece."""
        self = cls.__new__(cls)
        self.params = list(params)
        covered: dict[int, list[tuple[int, int]]] = {}
        for piece in (p for g in pieces for p in g):
            if not 0 <= piece.index < len(self.params):
                raise ValueError(f"piece {piece} names no parameter (there are {len(self.params)})")
            covered.setdefault(piece.index, []).append((piece.start, piece.stop))
        for i, p in enumerate(self.params):
            ranges = sorted(covered.get(i, []))
            ends = [0] + [b for _, b in ranges]
            if not ranges or any(a != e or b <= a for (a, b), e in zip(ranges, ends)) or ranges[-1][1] != p.numel():
                raise ValueError(f"the pieces must cover each of the {len(self.params)} parameters exactly once: "
                                 f"parameter {i} ({p.numel()} elements) gets {ranges}")
        self.groups = [list(dict.fromkeys(p.index for p in g)) for g in pieces]
        for g in self.groups:
            if len({(self.params[i].dtype, self.params[i].device) for i in g}) > 1:
                raise ValueError(f"the parameters of one bucket must share dtype and device, got group {g}")
        self._set_pieces([list(g) for g in pieces])
        return self

    def _set_pieces(self, pieces: list[list[Piece]]) -> None:
        self.pieces = pieces
        self.numels = [sum(p.numel for p in g) for g in pieces]

    def __len__(self) -> int:
        return len(self.groups)

    def _whole(self, piece: Piece) -> bool:
        return piece.start == 0 and piece.stop == self.params[piece.index].numel()

    def _part(self, t: Tensor, piece: Piece) -> Tensor:
        """``piece`` of ``t`` (the parameter or its gradient) as a flat tensor (a view where possible)."""
        return t.reshape(-1) if self._whole(piece) else t.reshape(-1)[piece.start : piece.stop]

    @torch.no_grad()
    def _write(self, target: Tensor, piece: Piece, values: Tensor) -> None:
        """``target``'s elements of ``piece`` (logical order) = ``values`` (flat), whatever ``target``'s layout."""
        if self._whole(piece):
            target.copy_(values.view_as(target))
        elif target.is_contiguous():
            target.view(-1)[piece.start : piece.stop].copy_(values)
        else:  # e.g. channels_last: no flat view in logical order
            full = target.reshape(-1).clone()
            full[piece.start : piece.stop] = values
            target.copy_(full.view_as(target))

    @torch.no_grad()
    def flatten_params(self) -> list[Tensor]:
        """New flat buffers holding the parameters' values (bucket by bucket)."""
        return [self._flat([self._part(self.params[p.index].detach(), p) for p in g]) for g in self.pieces]

    def bucket_params(self, k: int) -> list[Tensor]:
        """The parameters (some in part) of bucket ``k``, in its order."""
        return [self.params[i] for i in self.groups[k]]

    @torch.no_grad()
    def load_params(self, k: int, flat: Tensor) -> None:
        """Copy ``flat`` into the parameters (or their pieces) of bucket ``k``."""
        if flat.numel() != self.numels[k]:
            raise ValueError(f"bucket {k} has {self.numels[k]} elements, got {flat.numel()}")
        for piece, view in zip(self.pieces[k], _piece_views(flat, self.pieces[k])):
            self._write(self.params[piece.index].detach(), piece, view)

    @torch.no_grad()
    def assemble(self, flats: Sequence[Tensor]) -> list[Tensor]:
        """Whole parameters (new tensors, each of its parameter's shape, on ``flats``' device) from one flat tensor
        per bucket, e.g. the owners' masters gathered for a checkpoint."""
        if len(flats) != len(self.pieces):
            raise ValueError(f"expected {len(self.pieces)} buckets, got {len(flats)}")
        out = [torch.empty(p.numel(), dtype=flats[0].dtype, device=flats[0].device) for p in self.params]
        for pieces, flat in zip(self.pieces, flats):
            for piece, view in zip(pieces, _piece_views(flat, pieces)):
                out[piece.index][piece.start : piece.stop] = view
        return [t.view(p.shape) for t, p in zip(out, self.params)]

    def _flat(self, tensors: list[Tensor]) -> Tensor:
        if not tensors:
            ref = self.params[0]
            return torch.zeros(0, dtype=ref.dtype, device=ref.device)
        return torch.cat([t.reshape(-1) for t in tensors])

    @torch.no_grad()
    def flatten_grads(self, scale: float = 1.0) -> list[Tensor]:
        """New flat buffers holding ``scale * p.grad`` (zeros for parameters without a gradient)."""
        out = []
        for g in self.pieces:
            parts = []
            for piece in g:
                p = self.params[piece.index]
                parts.append(self._part(p.grad, piece) if p.grad is not None
                             else torch.zeros(piece.numel, dtype=p.dtype, device=p.device))
            flat = self._flat(parts)
            if scale != 1.0:
                flat.mul_(scale)
            out.append(flat)
        return out

    def place(self, buckets: Sequence[Tensor]) -> list[Tensor]:
        """Saved buckets (e.g. from a checkpoint) checked against this layout and moved to its devices and dtypes.

        Raises:
            ValueError: naming the bucket whose count or size does not match (a different model or ``bucket_cap_mb``).
        """
        if len(buckets) != len(self.groups):
            raise ValueError(
                f"the saved gradient has {len(buckets)} buckets, this model's layout has {len(self.groups)}: "
                "resume with the same model and bucket_cap_mb"
            )
        out = []
        for k, (flat, g, numel) in enumerate(zip(buckets, self.groups, self.numels)):
            if flat.numel() != numel:
                raise ValueError(
                    f"saved gradient bucket {k} has {flat.numel()} elements, this model's layout has {numel}: "
                    "resume with the same model and bucket_cap_mb"
                )
            first = self.params[g[0]] if g else self.params[0]
            out.append(flat.to(device=first.device, dtype=first.dtype))
        return out

    @torch.no_grad()
    def load_grads(self, buckets: Sequence[Tensor], scale: float = 1.0) -> None:
        """Write ``scale * bucket`` into each parameter's ``.grad`` (allocating it if needed)."""
        if len(buckets) != len(self.groups):
            raise ValueError(f"expected {len(self.groups)} buckets, got {len(buckets)}")
        for k, (flat, numel) in enumerate(zip(buckets, self.numels)):
            if flat.numel() != numel:
                raise ValueError(f"bucket has {flat.numel()} elements, expected {numel}")
            for piece, view in zip(self.pieces[k], _piece_views(flat, self.pieces[k])):
                p = self.params[piece.index]
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self._write(p.grad, piece, view if scale == 1.0 else view * scale)


def flat_views(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Views of the consecutive pieces of ``flat``, one per tensor of ``like``, each of that tensor's shape."""
    out, offset = [], 0
    for t in like:
        out.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def _piece_views(flat: Tensor, pieces: Sequence[Piece]) -> tuple[Tensor, ...]:
    """Views of the consecutive pieces of ``flat``, one per piece (flat)."""
    return flat.split([p.numel for p in pieces])


def sum_buckets(results: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """Elementwise sum of several bucket lists of the same layout."""
    total = [b.clone() for b in results[0]]
    for other in results[1:]:
        torch._foreach_add_(total, list(other))
    return total
