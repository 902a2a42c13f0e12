"""The p2p protocol (``exchange/p2p_protocol.py``) and data plane (``exchange/p2p_dataplane.py``) on a discrete-event
model of NCCL's rules (``tests/fake_nccl.py``): pair communicators with FIFO streams, kernel slots, CPU headers.

Thousands of random schedules: 2 to 8 workers of unequal speed, random message delays, 0 to 3 steps in flight, 1 to 3
send and receive slots. Each must end (no deadlock), apply every gradient shard exactly once, keep every worker
within its bound and every rank within its slots, and leave every owner's master equal to a serial replay of the
updates in the order that owner applied them. The transport's threads and streams run on the emulator instead:
``tests/test_p2p_nccl_emulator.py``.
"""

from __future__ import annotations

import random

import pytest
import torch

from lightning_asyncpred.exchange.p2p_dataplane import CTS, GO, MSG, DataPlane
from lightning_asyncpred.exchange.p2p_protocol import REQUEST, Engine, Message
from lightning_asyncpred.exchange.sharding import partition
from tests.fake_nccl import Deadlock, PostOnArrival, simulate

LR, MOMENTUM = 0.1, 0.9

class Owner:
    """The owner side of a rank: a master shard and a real SGD-with-momentum optimizer, with a log."""

    def __init__(self, initial: torch.Tensor) -> None:
        self.initial = initial.clone()
        self.master = torch.nn.Parameter(initial.clone())
        self.optimizer = torch.optim.SGD([self.master], lr=LR, momentum=MOMENTUM)
        self.log: list[tuple[int, int, int, torch.Tensor]] = []  # (source, step, staleness, gradient)

    def apply(self, grad: torch.Tensor, source: int, step: int, staleness: int) -> torch.Tensor:
        self.log.append((source, step, staleness, grad.clone()))
        self.master.grad = grad.clone()
        self.optimizer.step()
        return self.master.detach()

    def replay(self) -> list[torch.Tensor]:
        """The master after each logged update, applied serially on a fresh optimizer (version v: index v)."""
        master = torch.nn.Parameter(self.initial.clone())
        optimizer = torch.optim.SGD([master], lr=LR, momentum=MOMENTUM)
        versions = [master.detach().clone()]
        for *_, grad in self.log:
            master.grad = grad.clone()
            optimizer.step()
            versions.append(master.detach().clone())
        return versions


def _gradient(seed: int, rank: int, step: int, numel: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + rank * 1009 + step)
    return torch.randn(numel, generator=g, dtype=torch.float64)


def run_schedule(seed, world, steps, bound, speeds, sizes, send_slots=2, recv_slots=2, plane_cls=DataPlane):
    """One schedule; returns (engines, owners, workers' max in-flight at compute time, replies, stats)."""
    rng = random.Random(seed)
    shards = partition(sizes, world)
    numels = [sum(sizes[i] for i in s) for s in shards]
    init = torch.Generator().manual_seed(seed)
    owners = [Owner(torch.randn(n, generator=init, dtype=torch.float64)) for n in numels]
    engines = [Engine(r, world, numels, owners[r].apply, owners[r].master.detach()) for r in range(world)]
    alloc = lambda n: torch.empty(n, dtype=torch.float64)  # noqa: E731
    planes = [plane_cls(r, world, alloc, send_slots, recv_slots) for r in range(world)]
    max_in_flight = [0] * world
    installed = [[0] * world for _ in range(world)]  # versions of each shard in each worker's replica
    replies: list[list] = [[] for _ in range(world)]

    def install(r: int) -> None:
        for reply in engines[r].take_replies():
            replies[r].append((reply.shard, reply.version, reply.params.clone()))
            installed[r][reply.shard] = max(installed[r][reply.shard], reply.version)

    def worker(r: int):
        e, pl = engines[r], planes[r]
        yield ("messages", e.ping(lambda: torch.zeros(1, dtype=torch.float64)))
        yield ("wait", lambda: e.handshake_done)
        for t in range(steps[r]):
            max_in_flight[r] = max(max_in_flight[r], e.in_flight)
            yield ("compute", speeds[r] * rng.uniform(0.5, 1.5))
            install(r)
            grads = [_gradient(seed, r, t, n) for n in numels]
            yield ("messages", e.submit(t, grads, list(installed[r])))
            yield ("wait", lambda: e.in_flight <= bound)
        yield ("messages", e.finish())
        yield ("wait", lambda: e.done and pl.idle)
        install(r)

    stats = simulate(engines, planes, [worker(r) for r in range(world)], rng, slots=send_slots + recv_slots,
                     max_delay=rng.choice([0.01, 0.3, 2.0]))
    return engines, owners, max_in_flight, replies, stats


def check_owners(owners, masters, steps) -> list[list[torch.Tensor]]:
    """Every owner applied every worker's every step exactly once, with staleness >= 0, and its final master
    (``masters[k]``) is the serial replay of its log; returns the replays (version v of shard k: ``[k][v]``)."""
    world = len(owners)
    replays = [owner.replay() for owner in owners]
    for k, owner in enumerate(owners):
        applied = sorted((src, step) for src, step, _, _ in owner.log)
        assert applied == sorted((w, t) for w in range(world) for t in range(steps[w])), f"owner {k}"  # exactly once
        assert torch.equal(masters[k], replays[k][-1]), f"owner {k} differs from the serial replay"
        assert all(staleness >= 0 for _, _, staleness, _ in owner.log)
    return replays


def _check(engines, owners, max_in_flight, replies, stats, steps, bound, slots=4):
    world = len(engines)
    replays = check_owners(owners, [o.master.detach() for o in owners], steps)
    assert all(e.version == sum(steps) for e in engines)
    for w, e in enumerate(engines):
        assert e.done and e.in_flight == 0 and not e.steps
        assert max_in_flight[w] <= bound  # never more than `bound` steps in flight when computing the next one
        assert [t for t, _ in sorted(e.completed_steps)] == list(range(steps[w]))
        assert all(len(st) == world for _, st in e.completed_steps)
        # every reply is the owner's master right after the update it answers: the serial replay up to its version
        for shard, version, params in replies[w]:
            assert torch.equal(params, replays[shard][version]), (w, shard, version)
        assert sorted(shard for shard, _, _ in replies[w]) == sorted(list(range(world)) * steps[w])
    assert max(stats["max_resident"]) <= slots  # never more data-plane operations posted than the slots


def test_random_schedules_under_nccls_rules():
    rng = random.Random(2026)
    for seed in range(1500):
        world = rng.randint(2, 8)
        steps = [rng.randint(0, 5) for _ in range(world)]
        bound = rng.randint(0, 3)
        speeds = [rng.choice([0.1, 1.0, 3.0]) for _ in range(world)]
        sizes = [rng.randint(1, 40) for _ in range(rng.randint(world, 2 * world + 3))]
        send_slots, recv_slots = rng.randint(1, 3), rng.randint(1, 3)
        result = run_schedule(seed, world, steps, bound, speeds, sizes, send_slots, recv_slots)
        _check(*result, steps, bound, send_slots + recv_slots)


def test_more_ranks_than_parameters_leaves_empty_shards_that_still_work():
    result = run_schedule(7, world=5, steps=[3, 1, 4, 2, 0], bound=1, speeds=[1, 2, 1, 3, 1], sizes=[10, 3])
    assert [o.master.numel() for o in result[1]].count(0) == 3
    _check(*result, [3, 1, 4, 2, 0], 1)


def test_the_model_catches_payloads_posted_without_clear_to_send():
    """Proof that the model enforces NCCL's order rule: posting on arrival (like receives posted ahead) deadlocks."""
    with pytest.raises(Deadlock, match="not done"):
        run_schedule(1, world=2, steps=[2, 2], bound=1, speeds=[1, 1], sizes=[4, 4], plane_cls=PostOnArrival)


def test_pair_order_lo_posts_with_its_header_hi_on_receipt():
    """The message order of both directions of a pair (the module docstring of p2p_dataplane.py)."""
    alloc = lambda n: torch.zeros(n)  # noqa: E731
    lo, hi = DataPlane(0, 2, alloc), DataPlane(1, 2, alloc)
    # hi -> lo: MSG, then lo's CTS with its receive posted at once, then hi's send
    (msg,) = hi.send([Message(0, REQUEST, 3, 1, 0, torch.ones(4))])
    assert msg.kind == "header" and msg.words[:6] == [MSG, REQUEST, 3, 1, 0, 4] and hi.sends_used == 1
    cts, recv = lo.on_header(1, msg.words)
    assert (cts.kind, cts.words[0], recv.kind) == ("header", CTS, "recv") and lo.recvs_used == 1
    (send,) = hi.on_header(0, cts.words)
    assert send.kind == "send"
    # lo -> hi: MSG, hi's CTS (reserved, nothing posted), lo's GO with its send, hi posts the receive on GO
    (msg2,) = lo.send([Message(1, REQUEST, 0, 0, 0, torch.ones(2))])
    (cts2,) = hi.on_header(0, msg2.words)
    assert cts2.words[0] == CTS and hi.recvs_used == 1
    go, send2 = lo.on_header(1, cts2.words)
    assert (go.words[0], send2.kind) == (GO, "send")
    (recv2,) = hi.on_header(0, go.words)
    assert recv2.kind == "recv" and recv2.transfer.message.payload.numel() == 2
    # completions free the slots and deliver in announcement order
    recv.transfer.message.payload.copy_(torch.ones(4))
    lo.on_complete(recv.transfer)
    assert [m.kind for m in lo.take_delivered()] == [REQUEST] and lo.recvs_used == 0


def test_data_plane_rejects_bad_arguments_and_stray_headers():
    with pytest.raises(ValueError, match="send_slots must be an integer >= 1, got 0"):
        DataPlane(0, 2, torch.zeros, send_slots=0)
    pl = DataPlane(0, 2, torch.zeros)
    with pytest.raises(RuntimeError, match="clear-to-send from rank 1 with nothing announced"):
        pl.on_header(1, [CTS, 0, 0, 0, 0, 0, 0, 0])
    with pytest.raises(RuntimeError, match="header of unknown type 9"):
        pl.on_header(1, [9, 0, 0, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="message to rank 0"):
        pl.send([Message(0, REQUEST)])


def test_partition_is_greedy_largest_first_and_balanced():
    assert partition([5, 1, 8, 3, 3], 2) == [[2, 4], [0, 1, 3]]  # 8, 5, 3 (shard 1), 3 (tie: shard 0), 1
    assert partition([4, 4, 4, 4], 3) == [[0, 3], [1], [2]]
    assert partition([], 2) == [[], []]
    sizes = [random.Random(0).randint(1, 1000) for _ in range(200)]
    totals = [sum(sizes[i] for i in s) for s in partition(sizes, 8)]
    assert max(totals) - min(totals) <= max(sizes)
    with pytest.raises(ValueError, match="num_shards must be an integer >= 1, got 0"):
        partition([1], 0)


def test_engine_rejects_misuse():
    e = Engine(0, 2, [3, 3], lambda g, s, t, st: None, torch.zeros(3))
    e.submit(0, [torch.zeros(3), torch.zeros(3)], [0, 0])
    with pytest.raises(ValueError, match="step 0 was already submitted"):
        e.submit(0, [torch.zeros(3), torch.zeros(3)], [0, 0])
    e.finish()
    with pytest.raises(RuntimeError, match=r"submit\(\) after finish\(\)"):
        e.submit(1, [torch.zeros(3), torch.zeros(3)], [0, 0])
    assert e.missing() == [1]  # waits for rank 1's PONG, reply and FIN
    with pytest.raises(ValueError, match="master of 2 elements for a shard of 3"):
        Engine(0, 2, [3, 3], lambda g, s, t, st: None, torch.zeros(2))
