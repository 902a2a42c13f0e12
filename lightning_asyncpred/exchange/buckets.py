"""Flatten gradients into a few large contiguous buckets and back (pure torch)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

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
        self.numels = [sum(self.params[i].numel() for i in g) for g in self.groups]

    @classmethod
    def from_groups(cls, params: Sequence[Tensor], groups: Sequence[Sequence[int]]) -> "GradientBuckets":
        """Buckets with an explicit assignment: bucket ``k`` holds ``params[i]`` for ``i`` in ``groups[k]``, in
        that order (e.g. the shards of the point-to-point transport). Empty groups give empty buckets."""
        self = cls.__new__(cls)
        self.params = list(params)
        self.groups = [list(g) for g in groups]
        flat = sorted(i for g in self.groups for i in g)
        if flat != list(range(len(self.params))):
            raise ValueError(f"groups must assign every one of the {len(self.params)} parameters exactly once, got {groups!r}")
        for g in self.groups:
            if len({(self.params[i].dtype, self.params[i].device) for i in g}) > 1:
                raise ValueError(f"the parameters of one bucket must share dtype and device, got group {g}")
        self.numels = [sum(self.params[i].numel() for i in g) for g in self.groups]
        return self

    def __len__(self) -> int:
        return len(self.groups)

    @torch.no_grad()
    def flatten_params(self) -> list[Tensor]:
        """New flat buffers holding the parameters' values (bucket by bucket)."""
        return [self._flat([self.params[i].detach() for i in g], g) for g in self.groups]

    def bucket_params(self, k: int) -> list[Tensor]:
        """The parameters of bucket ``k``, in its order."""
        return [self.params[i] for i in self.groups[k]]

    @torch.no_grad()
    def load_params(self, k: int, flat: Tensor) -> None:
        """Copy ``flat`` into the parameters of bucket ``k``."""
        if flat.numel() != self.numels[k]:
            raise ValueError(f"bucket {k} has {self.numels[k]} elements, got {flat.numel()}")
        params = self.bucket_params(k)
        for p, view in zip(params, flat_views(flat, params)):
            p.detach().copy_(view)

    def _flat(self, tensors: list[Tensor], group: Sequence[int]) -> Tensor:
        if not tensors:
            ref = self.params[0]
            return torch.zeros(0, dtype=ref.dtype, device=ref.device)
        return torch.cat([t.reshape(-1) for t in tensors])

    @torch.no_grad()
    def flatten_grads(self, scale: float = 1.0) -> list[Tensor]:
        """New flat buffers holding ``scale * p.grad`` (zeros for parameters without a gradient)."""
        out = []
        for g in self.groups:
            parts = []
            for i in g:
                p = self.params[i]
                parts.append(p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype, device=p.device))
            flat = self._flat(parts, g)
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
            first = self.params[g[0]]
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
            params = self.bucket_params(k)
            for p, view in zip(params, flat_views(flat, params)):
                if p.grad is None:
                    p.grad = torch.empty_like(p)
                p.grad.copy_(view)
                if scale != 1.0:
                    p.grad.mul_(scale)


def flat_views(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Views of the consecutive pieces of ``flat``, one per tensor of ``like``, each of that tensor's shape."""
    out, offset = [], 0
    for t in like:
        out.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def sum_buckets(results: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """Elementwise sum of several bucket lists of the same layout."""
    total = [b.clone() for b in results[0]]
    for other in results[1:]:
        torch._foreach_add_(total, list(other))
    return total
