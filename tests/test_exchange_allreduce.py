"""AllReduceExchange and PeerMonitor in one process (world of 1, Gloo) plus argument validation."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from lightning_asyncpred.exchange import (
    TRANSPORTS,
    AllReduceExchange,
    PeerLostError,
    PeerMonitor,
    check_mode,
    create_exchange,
    describe_peer_failure,
    register_transport,
    to_timedelta,
)


@pytest.fixture
def world_of_one(tmp_path):
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _buckets(step: int) -> list[torch.Tensor]:
    return [torch.full((3,), float(step)), torch.full((2,), -float(step))]


@pytest.mark.parametrize("s", [0, 1, 3])
def test_fixed_mode_applies_step_t_minus_s(world_of_one, s):
    ex = AllReduceExchange(s, mode="fixed", timeout=5)
    seen = []
    for t in range(8):
        ex.submit(t, _buckets(t))
        ready = ex.ready()
        if t < s:
            assert ready == []
        else:
            assert [r.step for r in ready] == [t - s]
            assert ready[0].staleness == s and ready[0].count == 1
            assert torch.equal(ready[0].buckets[0], torch.full((3,), float(t - s)))
        seen += [r.step for r in ready]
        assert ex.submitted == ex.applied + ex.in_flight
        assert ex.in_flight == min(t + 1, s)
    assert ex.expected_staleness == float(s)
    drained = ex.drain()
    seen += [r.step for r in drained]
    assert seen == list(range(8))  # every submitted gradient handed out exactly once, in order
    assert ex.in_flight == 0 and ex.submitted == ex.applied == 8
    ex.close()
    ex.close()  # idempotent
    assert ex.drain() == []


def test_submit_does_not_alias_the_callers_buffers(world_of_one):
    ex = AllReduceExchange(1, timeout=5)
    b = [torch.ones(4)]
    ex.submit(0, b)
    b[0].fill_(7.0)
    ex.submit(1, [torch.zeros(4)])
    (r,) = ex.ready()
    assert torch.equal(r.buckets[0], torch.ones(4))


def test_close_abandons_in_flight_without_waiting(world_of_one):
    ex = AllReduceExchange(4, timeout=5)
    for t in range(3):
        ex.submit(t, _buckets(t))
    ex.close()
    assert ex.abandoned == 3
    with pytest.raises(RuntimeError, match="after close"):
        ex.submit(3, _buckets(3))


def test_eager_is_refused_on_gloo(world_of_one):
    with pytest.raises(ValueError, match="mode='eager' needs .*NCCL.*'gloo'"):
        AllReduceExchange(2, mode="eager")


def test_transport_registry(world_of_one):
    assert "allreduce" in TRANSPORTS
    ex = create_exchange("allreduce", max_staleness=1, mode="fixed", group=None, timeout=5, monitor=None)
    assert isinstance(ex, AllReduceExchange)
    with pytest.raises(ValueError, match="unknown transport 'p2q'; registered: allreduce"):
        create_exchange("p2q")
    with pytest.raises(ValueError, match="already registered"):
        register_transport("allreduce", lambda **kw: None)


def test_needs_a_process_group():
    with pytest.raises(RuntimeError, match="initialized torch.distributed process group"):
        AllReduceExchange(1)


@pytest.mark.parametrize("mode", ["Fixed", "async", None, 3])
def test_unknown_mode(mode):
    with pytest.raises(ValueError, match="unknown allreduce mode .*allowed: 'fixed', 'eager'"):
        check_mode(mode)


def test_check_mode_backends():
    assert check_mode("eager", "nccl") == "eager"
    assert check_mode("fixed", "gloo") == "fixed"
    with pytest.raises(ValueError, match="Gloo reports completion only after wait"):
        check_mode("eager", "gloo")


@pytest.mark.parametrize("bad", [0, -1, "10", float("nan"), True, timedelta(0)])
def test_bad_timeout(bad):
    with pytest.raises(ValueError, match="timeout must be a number of seconds > 0"):
        to_timedelta(bad)


def test_timeout_numbers_are_seconds():
    assert to_timedelta(2.5) == timedelta(seconds=2.5)
    assert to_timedelta(timedelta(minutes=1)) == timedelta(seconds=60)


def test_peer_monitor_names_the_rank_that_stopped_beating():
    store = dist.HashStore()
    monitors = [PeerMonitor(store, r, 3, interval=0.05) for r in range(3)]
    for m in monitors:
        m.start()
    time.sleep(0.2)
    monitors[2].stop()  # rank 2 "dies": its heartbeat stops
    try:
        assert monitors[0].lost_ranks() == [2]
        assert monitors[1].lost_ranks() == [2]
        err = describe_peer_failure(RuntimeError("Connection reset by peer"), monitors[0], 0, "the all_reduce of step 7", timedelta(seconds=3))
        assert isinstance(err, PeerLostError) and err.lost_ranks == [2]
        assert "rank 0: lost rank 2 during the all_reduce of step 7" in str(err)
        assert "Connection reset by peer" in str(err)
    finally:
        for m in monitors:
            m.stop()
    assert not [t for t in threading.enumerate() if t.name.startswith("asyncpred-heartbeat")]


def test_peer_monitor_unreachable_store_blames_its_host():
    class DeadStore:
        def add(self, key, value):
            raise RuntimeError("Connection refused")

    assert PeerMonitor(DeadStore(), 1, 2, interval=0.05).lost_ranks() == [0]
    assert PeerMonitor(DeadStore(), 0, 2, interval=0.05, store_host_rank=None).lost_ranks() == []


def test_peer_monitor_rejects_bad_interval():
    with pytest.raises(ValueError, match="heartbeat interval must be > 0"):
        PeerMonitor(dist.HashStore(), 0, 2, interval=0)


class _FakeWork:
    """A Work whose completion the test controls (what NCCL's is_completed() reports)."""

    def __init__(self) -> None:
        self.done = False
        self.waited = False

    def is_completed(self) -> bool:
        return self.done

    def wait(self, *args, **kwargs) -> bool:
        self.waited = True
        self.wait_args = (args, kwargs)
        self.done = True
        return True


def test_eager_mode_releases_completed_prefix_within_the_bound(world_of_one, monkeypatch):
    """Eager (the NCCL path, polled here with fake Works): a reduction is applied as soon as it and every
    earlier one completed, and at the latest ``max_staleness`` submissions later."""
    works: list[_FakeWork] = []

    def fake_all_reduce(tensor, op=None, group=None, async_op=False):
        works.append(_FakeWork())
        return works[-1]

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    ex = AllReduceExchange(3, mode="fixed", timeout=5)
    ex.mode, ex.world_size = "eager", 2  # as on NCCL with 2 ranks
    def complete(step):  # _buckets() has 2 buckets: one Work each
        for w in works[2 * step : 2 * step + 2]:
            w.done = True

    ex.submit(0, _buckets(0))
    assert ex.ready() == []  # not completed yet
    complete(0)
    ex.submit(1, _buckets(1))
    (r,) = ex.ready()
    assert (r.step, r.staleness, r.count) == (0, 1, 2)
    ex.submit(2, _buckets(2))
    complete(2)  # step 2 done but step 1 is not: results leave in order, so nothing yet
    assert ex.ready() == []
    ex.submit(3, _buckets(3))
    ex.submit(4, _buckets(4))  # step 1 is now 3 submissions old: released by the bound (waited), then 2
    out = ex.ready()
    assert [(x.step, x.staleness) for x in out] == [(1, 3), (2, 2)]
    assert all(w.waited for w in works[2:4])
    assert ex.expected_staleness == pytest.approx(2.0)  # measured mean in eager mode: (1 + 3 + 2) / 3
    assert [x.step for x in ex.drain()] == [3, 4]
    assert ex.submitted == ex.applied == 5 and ex.in_flight == 0


@pytest.mark.parametrize("s", [1, 3])
def test_state_dict_completes_in_flight_without_applying_and_restores_it(world_of_one, s):
    """Save after 5 steps, restore into a fresh exchange: it hands out what the original would have."""
    original = AllReduceExchange(s, timeout=5)
    for t in range(5):
        original.submit(t, _buckets(t))
        original.ready()
    state = original.state_dict()
    assert original.in_flight == s and state["submitted"] - state["applied"] == s  # nothing released by saving
    assert all(b.device.type == "cpu" for e in state["in_flight"]["queue"]["pending"] for b in e["item"]["buckets"])
    restored = AllReduceExchange(s, timeout=5)
    restored.load_state_dict(state)
    assert restored.in_flight == s and restored.stats.histogram == original.stats.histogram
    for t in range(5, 9):
        for ex in (original, restored):
            ex.submit(t, _buckets(t))
        a, b = original.ready(), restored.ready()
        assert [(r.step, r.staleness) for r in a] == [(r.step, r.staleness) for r in b] == [(t - s, s)]
        assert all(torch.equal(x, y) for x, y in zip(a[0].buckets, b[0].buckets))
    assert [r.step for r in restored.drain()] == [r.step for r in original.drain()]
    assert restored.submitted == restored.applied == 9


def test_state_dict_after_close_is_an_error(world_of_one):
    ex = AllReduceExchange(1, timeout=5)
    ex.close()
    with pytest.raises(RuntimeError, match="state_dict\\(\\) after close\\(\\)"):
        ex.state_dict()


@pytest.mark.parametrize("backend, blocks", [("gloo", True), ("nccl", False)])
def test_nccl_waits_let_the_stream_wait_gloo_waits_block_with_the_timeout(world_of_one, monkeypatch, backend, blocks):
    """NCCL's Work.wait(timeout) would block the CPU until the reduction finished (torch docs): on NCCL the
    exchange calls wait() without a timeout (the stream waits; the watchdogs bound it), on Gloo with it."""
    works: list[_FakeWork] = []

    def fake_all_reduce(tensor, op=None, group=None, async_op=False):
        works.append(_FakeWork())
        return works[-1]

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    ex = AllReduceExchange(1, mode="fixed", timeout=7)
    ex.world_size = 2  # issue the (fake) collectives as with 2 ranks
    assert ex.blocks_cpu_on_wait is blocks
    ex.submit(0, _buckets(0))
    ex.submit(1, _buckets(1))
    (r,) = ex.ready()
    assert r.step == 0 and all(w.waited for w in works[:2])
    expected = ((), {"timeout": timedelta(seconds=7)}) if blocks else ((), {})
    assert all(w.wait_args == expected for w in works[:2])


def test_peer_monitor_watchdog_names_the_rank_whose_heartbeat_stopped():
    store = dist.HashStore()
    beating = [PeerMonitor(store, r, 3, interval=0.05) for r in (0, 2)]
    for m in beating:
        m.start()
    store.add("asyncpred/heartbeat/1", 1)  # rank 1 beat once, then died
    lost = []
    event = threading.Event()
    beating[0].watch(lambda ranks, seconds: (lost.append((ranks, seconds)), event.set()), lost_after=0.5)
    try:
        assert event.wait(10), "the watchdog never fired"
        (ranks, seconds), = lost
        assert ranks == [1] and seconds >= 0.5
    finally:
        for m in beating:
            m.stop()
    with pytest.raises(ValueError, match="lost_after must be > 0 seconds, got 0"):
        beating[0].watch(lambda *a: None, lost_after=0)
