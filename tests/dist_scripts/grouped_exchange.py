"""Sync groups at the exchange level (launched by torchrun, no Lightning): ``GroupedExchange`` on real Gloo processes.

Every rank has a constant gradient of its own whose group mean is the same for every group (so the order of
arrivals cannot matter), the ranks of the last group
are slow (``--slow`` seconds per step), and each rank takes ``--steps`` steps: every group's arrival is the mean of
its members' gradients and every owner's round is one arrival per group, so after the drain the parameters must be
``ddp``'s after ``--steps`` steps of SGD with momentum and weight decay on the mean of all ranks' gradients.

Writes ``<out>/rank<k>.json``: ``params`` (the final parameters, flat), ``reference`` (ddp's, computed locally),
``checksums`` (the sum of the installed parameters after each step: equal within a group) and ``numels``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import timedelta

import torch

torch.set_num_threads(1)

import torch.distributed as dist  # noqa: E402

from lightning_asyncpred.exchange.buckets import GradientBuckets  # noqa: E402
from lightning_asyncpred.exchange.grouped import group_layout, make_grouped_exchange  # noqa: E402
from lightning_asyncpred.exchange.owner import ShardOwner  # noqa: E402
from lightning_asyncpred.exchange.sharding import flat_partition  # noqa: E402

SHAPES = [(3, 4), (5,), (2, 3)]


def make(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]
    return params, torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01)


def gradient(rank: int, group_size: int) -> list[torch.Tensor]:
    """``base + (j - (k - 1) / 2) * delta``, ``j`` the rank's index in its group: different on every member, the same
    mean ``base`` for every group (an arrival is a group's mean, and rounds may mix the groups' steps in any order:
    only equal group means make the result independent of that order). Without the group's averaging a column would
    carry member ``j``'s own gradient and the masters would move off ``ddp``'s."""
    gen = torch.Generator().manual_seed(100)
    base = [torch.randn(s, generator=gen) for s in SHAPES]
    delta = [torch.randn(s, generator=gen) for s in SHAPES]
    j = rank % group_size
    return [b + (j - (group_size - 1) / 2) * d for b, d in zip(base, delta)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--group-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--slow", type=float, default=0.05)
    args = p.parse_args()
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world, k = dist.get_rank(), dist.get_world_size(), args.group_size
    groups, _ = group_layout(world, k)
    mine = rank // k

    params, optimizer = make()
    pieces = flat_partition([q.numel() for q in params], world)
    buckets = GradientBuckets.from_pieces(params, pieces)
    owners = []

    def owner(arrivals_per_round: int) -> ShardOwner:
        owners.append(ShardOwner(optimizer, params, pieces[rank], world_size=arrivals_per_round))
        return owners[-1]

    # the transport's own construction (every group's process group, the column's data plane)
    ex = make_grouped_exchange(owner, buckets.numels, rank, k, timedelta(seconds=60), handshake_timeout=60)
    numels = buckets.numels

    grads = gradient(rank, k)
    checksums = []
    for t in range(args.steps):
        if mine == len(groups) - 1:
            time.sleep(args.slow)
        for q, g in zip(params, grads):
            q.grad = g.clone()
        ex.submit(t, buckets.flatten_grads())
        ex.ready()
        for m, flat in ex.take_parameters().items():
            buckets.load_params(m, flat)
        checksums.append(float(sum(q.detach().double().sum() for q in params)))
    ex.drain()
    for m, flat in ex.take_parameters().items():
        buckets.load_params(m, flat)
    ex.close()

    ref, ref_opt = make()
    mean = [sum(gradient(r, k)[i] for r in range(world)) / world for i in range(len(SHAPES))]
    for _ in range(args.steps):
        for q, g in zip(ref, mean):
            q.grad = g.clone()
        ref_opt.step()
    flat = lambda ts: torch.cat([q.detach().reshape(-1) for q in ts]).tolist()  # noqa: E731
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump({"params": flat(params), "reference": flat(ref), "checksums": checksums, "numels": numels,
                   "group": mine, "rounds": owners[0].rounds}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
