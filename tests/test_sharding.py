"""The p2p owners' shards (exchange/sharding.py): flat equal pieces, whole tensors, and what cuts a tensor between
owners must keep (buckets that write pieces back, optimizer and round states merged per parameter)."""

from __future__ import annotations

import random

import pytest
import torch

from lightning_asyncpred.exchange.buckets import GradientBuckets
from lightning_asyncpred.exchange.owner import ShardOwner
from lightning_asyncpred.exchange.sharding import (Piece, flat_partition, merge_pieces, partition, resolve_sharding,
                                                   shard_pieces, slice_state)
from tests.test_owner_rounds import _masters, _shard

SHAPES = [(5, 3), (7,), (3, 3), (2,), (4, 2)]


def test_flat_partition_cuts_the_flat_space_into_equal_contiguous_pieces():
    # 5 + 1 + 8 + 3 + 3 = 20 elements, 2 shards of 10: parameter 2 is cut at its 4th element
    assert flat_partition([5, 1, 8, 3, 3], 2) == [
        [Piece(0, 0, 5), Piece(1, 0, 1), Piece(2, 0, 4)],
        [Piece(2, 4, 8), Piece(3, 0, 3), Piece(4, 0, 3)],
    ]
    assert flat_partition([10], 3) == [[Piece(0, 0, 3)], [Piece(0, 3, 6)], [Piece(0, 6, 10)]]
    assert flat_partition([2], 4) == [[], [Piece(0, 0, 1)], [], [Piece(0, 1, 2)]]  # more shards than elements
    with pytest.raises(ValueError, match="num_shards"):
        flat_partition([1], 0)


@pytest.mark.parametrize("seed", range(20))
def test_flat_shards_differ_by_at_most_one_element_and_cover_every_element_once(seed):
    rng = random.Random(seed)
    sizes = [rng.choice([1, 3, 64, 1000, 2**16]) for _ in range(rng.randint(1, 40))]
    n = rng.choice([2, 3, 7, 16, 64, 256])
    shards = flat_partition(sizes, n)
    numels = [sum(p.numel for p in s) for s in shards]
    assert max(numels) - min(numels) <= 1 and sum(numels) == sum(sizes)
    order = [p for s in shards for p in s]  # contiguous: the pieces in shard order walk the flat space
    flat = [(p.index, e) for p in order for e in range(p.start, p.stop)] if sum(sizes) < 10**5 else None
    if flat is not None:
        assert flat == [(i, e) for i, size in enumerate(sizes) for e in range(size)]
    cut = {p.index for p in order if p.numel < sizes[p.index]}
    assert len(cut) <= n - 1


def test_whole_pieces_are_the_greedy_partition():
    sizes = [5, 1, 8, 3, 3]
    assert [[p.index for p in s] for s in shard_pieces(sizes, 2, "whole")] == partition(sizes, 2)
    assert all(p.start == 0 and p.stop == sizes[p.index] for s in shard_pieces(sizes, 2, "whole") for p in s)


def _params(channels_last=False):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    if channels_last:  # a 4-d tensor whose memory order is not its logical order
        params.append(torch.randn(2, 3, 2, 2, generator=gen).to(memory_format=torch.channels_last))
    return [p.requires_grad_() for p in params]


@pytest.mark.parametrize("n", [2, 3, 5])
def test_buckets_of_pieces_flatten_and_write_back_every_element(n):
    params = _params(channels_last=True)
    assert not params[-1].is_contiguous()
    buckets = GradientBuckets.from_pieces(params, flat_partition([p.numel() for p in params], n))
    for p in params:
        p.grad = torch.randn_like(p)
    flat = torch.cat([t.reshape(-1) for t in buckets.flatten_grads()])
    assert torch.equal(flat, torch.cat([p.grad.reshape(-1) for p in params]))
    assert [t.numel() for t in buckets.flatten_grads()] == buckets.numels
    values = [torch.arange(k, k + m, dtype=torch.float32) * 0.5 for k, m in zip(range(0, 1000, 100), buckets.numels)]
    for k, v in enumerate(values):
        buckets.load_params(k, v)
    assembled = buckets.assemble(values)
    for p, a in zip(params, assembled):
        assert a.shape == p.shape and torch.equal(a, p.detach())
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in params]), torch.cat(values))
    for p in params:
        p.grad = None
    buckets.load_grads(values, scale=2.0)
    assert torch.equal(torch.cat([p.grad.reshape(-1) for p in params]), 2.0 * torch.cat(values))


def test_buckets_refuse_pieces_that_do_not_cover_each_parameter_once():
    params = _params()
    with pytest.raises(ValueError, match=r"parameter 2 \(9 elements\) gets \[\(0, 4\), \(5, 9\)\]"):
        GradientBuckets.from_pieces(params, [[Piece(0, 0, 15), Piece(1, 0, 7), Piece(2, 0, 4)],
                                             [Piece(2, 5, 9), Piece(3, 0, 2), Piece(4, 0, 8)]])
    with pytest.raises(ValueError, match=r"parameter 0 \(15 elements\) gets \[\(0, 15\), \(0, 15\)\]"):
        GradientBuckets.from_pieces(params, [[Piece(0, 0, 15)], [Piece(0, 0, 15), Piece(1, 0, 7), Piece(2, 0, 9),
                                                                 Piece(3, 0, 2), Piece(4, 0, 8)]])


def test_merge_pieces_and_slice_state_are_inverse():
    shape = torch.Size([3, 4])
    full = {"exp_avg": torch.arange(12.0).view(shape), "step": torch.tensor(5.0), "lag": [1.0, 2.0]}
    pieces = [Piece(0, 0, 5), Piece(0, 5, 12)]
    parts = {tuple(p): slice_state(full, p, shape) for p in pieces}
    assert torch.equal(parts[(0, 0, 5)]["exp_avg"], torch.arange(5.0)) and parts[(0, 0, 5)]["lag"] == [1.0, 2.0]
    merged = merge_pieces(parts, [shape])
    assert torch.equal(merged[0]["exp_avg"], full["exp_avg"]) and torch.equal(merged[0]["step"], full["step"])
    with pytest.raises(ValueError, match=r"the pieces of parameter 0 cover \[\(0, 5\)\], not \[0, 12\) once"):
        merge_pieces({(0, 0, 5): parts[(0, 0, 5)]}, [shape])


def _run(owners, targets, rounds):
    """Lockstep rounds; the gradient at each owner's piece of the whole masters."""
    for _ in range(rounds):
        whole = _whole(owners)
        for o in owners:
            for w, t in enumerate(targets):
                g = [(m - tt) * (1 + m.abs()) for m, tt in zip(whole, t)]
                o.apply(_shard(o, g), source=w, staleness=w)


def _whole(owners):
    return _masters(owners, len(owners[0].params))


def test_flat_owners_state_merges_into_the_whole_owners_state_and_loads_into_another_layout():
    """Adam with the look-ahead on 3 flat owners: their optimizer states and round in progress, merged per parameter,
    equal those of owners of whole tensors after the same arrivals; loaded into 2 flat owners (a resume on another
    number of ranks) they continue exactly as the originals do."""
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    targets = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(3)]

    def owners(sharding, n, world=3):
        params = [p.clone().requires_grad_() for p in init]
        user = torch.optim.Adam(params, lr=0.01)
        out = [ShardOwner(user, params, s, world_size=world) for s in shard_pieces([p.numel() for p in params], n, sharding)]
        for o in out:
            o.set_lookahead("linear")
        return out

    flat, whole = owners("flat", 3), owners("whole", 3)
    assert any(isinstance(k, tuple) for o in flat for k in o._keys)
    for group in (flat, whole):
        _run(group, targets, 2)
        w = _whole(group)
        for o in group:  # a round in progress: one arrival more on each owner
            g = [(m - t) * 2 for m, t in zip(w, targets[0])]
            o.apply(_shard(o, g), staleness=1)

    def merged(group, what):
        states = {}
        for o in group:
            states.update(o.state_dict() if what == "optimizer" else o.round_state()["params"])
        return merge_pieces(states, [p.shape for p in group[0].params])

    for what in ("optimizer", "round"):
        a, b = merged(flat, what), merged(whole, what)
        assert sorted(a) == sorted(b) == list(range(len(SHAPES)))
        for i in a:
            for key in b[i]:
                if isinstance(b[i][key], torch.Tensor):
                    assert torch.allclose(a[i][key], b[i][key], atol=1e-7), (what, i, key)

    # resume on 2 owners (same 3 workers per round) from the merged state, continue both for 2 rounds
    resumed = owners("flat", 2)
    model, opt_state, round_state = _whole(flat), merged(flat, "optimizer"), merged(flat, "round")
    for o in resumed:
        with torch.no_grad():
            for piece, m in zip(o.pieces, o.masters):
                m.copy_(model[piece.index].reshape(-1)[piece.start:piece.stop].view_as(m))
            o.flat.copy_(o.base)
        o.load_round_state({"rounds": flat[0].rounds, "count": flat[0].count, "params": round_state})
        o.load_state(opt_state)
    assert all(o.count == 1 for o in resumed)
    for group in (flat, resumed):
        at = _whole(group)
        for o in group:  # complete the round in progress (two more arrivals), then two full rounds
            for w in (1, 2):
                g = [(m - t) for m, t in zip(at, targets[w])]
                o.apply(_shard(o, g), staleness=w)
        _run(group, targets, 2)
    for a, b in zip(_whole(flat), _whole(resumed)):
        assert torch.allclose(a, b, atol=1e-6)


def test_resolve_sharding_flat_only_for_element_wise_optimizers():
    w = [torch.zeros(3, requires_grad=True)]
    assert resolve_sharding("auto", torch.optim.SGD(w, lr=0.1)) == "flat"
    assert resolve_sharding("auto", torch.optim.AdamW(w)) == "flat"

    class Lars(torch.optim.SGD):  # a subclass may change step (a per-tensor trust ratio): whole tensors
        pass

    assert resolve_sharding("auto", Lars(w, lr=0.1)) == "whole"
    assert resolve_sharding("flat", Lars(w, lr=0.1)) == "flat"  # the user's own class: the user says so
    assert resolve_sharding("whole", torch.optim.SGD(w, lr=0.1)) == "whole"
    if hasattr(torch.optim, "Adafactor"):  # factored second moments: a step that depends on the tensor's shape
        assert resolve_sharding("auto", torch.optim.Adafactor(w)) == "whole"
        with pytest.raises(ValueError, match="sharding='flat' cuts tensors between owners, which changes the step of "
                                             "Adafactor"):
            resolve_sharding("flat", torch.optim.Adafactor(w))
    with pytest.raises(ValueError, match="sharding must be one of 'auto', 'flat', 'whole', got 'ring'"):
        resolve_sharding("ring", torch.optim.SGD(w, lr=0.1))


def test_sharding_is_the_p2p_transports_setting():
    from lightning_asyncpred import AsyncPredStrategy

    with pytest.raises(ValueError, match="sharding='flat' cuts the p2p owners' shards"):
        AsyncPredStrategy(transport="allreduce", sharding="flat")
    with pytest.raises(ValueError, match="sharding must be one of"):
        AsyncPredStrategy(sharding="even")
    assert AsyncPredStrategy(sharding="whole").sharding == "whole"


class TrustRatioSGD(torch.optim.SGD):
    """LARS-like: each tensor's step scaled by ``||w|| / ||g||`` (a norm over the whole tensor: not element-wise)."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(p.norm() / (p.grad.norm() + 1e-12))
        return super().step(closure)


@pytest.mark.parametrize("sharding", ["whole", "flat"])
def test_a_per_tensor_optimizer_is_ddp_only_on_whole_tensors(sharding):
    """Why ``"auto"`` keeps whole tensors for an optimizer it does not know: the same lockstep rounds are ddp's steps
    with whole tensors, and not with a tensor cut between owners (its norm is then a piece's)."""
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    targets = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(2)]
    ref = [p.clone().requires_grad_() for p in init]
    ref_opt = TrustRatioSGD(ref, lr=0.1)
    params = [p.clone().requires_grad_() for p in init]
    user = TrustRatioSGD(params, lr=0.1)
    assert resolve_sharding("auto", user) == "whole"
    owners = [ShardOwner(user, params, s, world_size=2) for s in shard_pieces([p.numel() for p in params], 2, sharding)]
    for _ in range(3):
        grads = [[(w - t) * (1 + w.abs()) for w, t in zip([p.detach() for p in ref], tt)] for tt in targets]
        for i, p in enumerate(ref):
            p.grad = (grads[0][i] + grads[1][i]) / 2
        ref_opt.step()
        _run(owners, targets, 1)
    same = all(torch.allclose(a, b.detach(), atol=1e-6) for a, b in zip(_whole(owners), ref))
    assert same == (sharding == "whole")
