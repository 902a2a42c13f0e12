"""The p2p transport (``P2PExchange`` with its ``NCCLBackend``, unchanged) on emulated GPUs (``tests/nccl_emulator.py``).

Random schedules (2-8 workers of unequal speed, 0-3 steps in flight) and 32 / 64 ranks with few steps: each ends,
every owner applies every gradient shard exactly once, every master equals a serial replay of its updates, every
parameter a worker installs is the owner's master at the version it was told, no worker has more steps in flight
than its bound, no data-plane operation runs on the training stream, at most ``send_slots + recv_slots`` kernels of
the data plane are resident per GPU (the emulated GPUs have ``slots = send_slots + recv_slots + 1``), and every group
the data plane created is destroyed at the end.

Then designs known to be wrong, each caught: completion taken from ``get_future()`` (done at enqueue), payloads
posted when announced without clear-to-send (the first design's receives posted ahead: a pair deadlocks), the
communication thread left on the default stream, a gradient read without waiting for the training stream's event.
The first design itself (commit b121b6b) hangs on this emulator at step 0:
``python -m tests.first_design_on_emulator``.
"""

from __future__ import annotations

import random
import threading
import time
from datetime import timedelta

import pytest
import torch

from lightning_asyncpred.exchange import PeerLostError
from lightning_asyncpred.exchange import p2p
from lightning_asyncpred.exchange.p2p import ExchangeThreadError, HandshakeError, P2PExchange
from lightning_asyncpred.exchange.p2p_backends import NCCLBackend
from lightning_asyncpred.exchange.p2p_dataplane import DataPlane
from lightning_asyncpred.exchange.sharding import shard_pieces
from tests.fake_nccl import PostOnArrival
from tests.nccl_emulator import EmulatorError, World, device_tensor
from tests import test_p2p_protocol as protocol
from tests.test_p2p_protocol import LR, MOMENTUM, _gradient

SEND_SLOTS = RECV_SLOTS = 2


def plain(t: torch.Tensor) -> torch.Tensor:
    with torch._C.DisableTorchFunctionSubclass():
        return t.detach().clone().as_subclass(torch.Tensor)


class Owner(protocol.Owner):
    """The owner of a shard on an emulated GPU: SGD with momentum on a flat master (its update runs as a kernel),
    with a log of every update for the serial replay (``torch.optim.SGD``, inherited)."""

    def __init__(self, initial: torch.Tensor, rank: int) -> None:
        self.initial = initial.clone()
        self.flat = device_tensor(initial, rank)
        self.reply = self.flat  # what replies carry (ShardOwner.reply): the master itself, no look-ahead
        self.momentum = device_tensor(torch.zeros_like(initial), rank)
        self.log: list[tuple[int, int, int, torch.Tensor]] = []  # (source, step, staleness, gradient)

    def apply(self, grad, source, step, staleness):
        self.log.append((source, step, staleness, plain(grad)))
        self.momentum.mul_(MOMENTUM).add_(grad)
        self.flat.add_(self.momentum, alpha=-LR)
        return self.flat

    def state_dict(self):
        return {}


class Run:
    """One schedule on emulated GPUs: a worker thread per rank builds its ``P2PExchange`` (the handshake needs them
    all), trains ``steps[r]`` steps of ``speeds[r]`` seconds (a kernel on the training stream), installs what
    comes back (a kernel on the training stream that records it), finishes and closes."""

    def __init__(self, seed, world, steps, bound, speeds, sizes, backend_cls=NCCLBackend, plane_cls=DataPlane,
                 slots=SEND_SLOTS + RECV_SLOTS + 1, timeout=30.0, handshake=30.0, lose=None, columns=None):
        self.seed, self.n, self.steps, self.bound, self.speeds = seed, world, steps, bound, speeds
        self.rng = random.Random(seed)
        # exchanges among subsets of the ranks at once (sync groups' columns), or one among all
        self.columns = [list(range(world))] if columns is None else columns
        self.column = {r: c for c in self.columns for r in c}
        width = len(self.columns[0])
        shards = shard_pieces(sizes, width, "flat" if seed % 2 else "whole")  # both layouts: the shard sizes differ
        self.numels = [sum(p.numel for p in s) for s in shards]  # per index within a column
        init = torch.Generator().manual_seed(seed)
        self.world = World(world, slots=slots, seed=seed, nccl_delay=self.rng.choice([0.0002, 0.002, 0.01]))
        self.owners = [Owner(torch.randn(self.numels[self._local(r)], generator=init, dtype=torch.float64), r)
                       for r in range(world)]
        self.backend_cls, self.plane_cls = backend_cls, plane_cls
        self.timeout, self.handshake, self.lose = timeout, handshake, lose
        self.exchanges: list = [None] * world
        self.errors: dict[int, BaseException] = {}
        self.installed: list[list] = [[] for _ in range(world)]
        self.max_in_flight = [0] * world
        self.submitted = [0] * world
        self.applied = [0] * world

    def _local(self, r: int) -> int:
        return self.column[r].index(r)

    def _worker(self, r: int) -> None:
        api = self.world.api(r)
        owner = self.owners[r]
        col, me = self.column[r], self._local(r)
        backend = self.backend_cls(api, me, len(col), owner.flat, None, timedelta(seconds=self.timeout),
                                   members=col, member_sets=self.columns)
        rng = random.Random(self.seed * 31 + r)
        ex = None
        try:
            ex = P2PExchange(self.bound, owner, self.numels, me, len(col), backend=backend, timeout=self.timeout,
                             handshake_timeout=self.handshake)
            self.exchanges[r] = ex
            for t in range(self.steps[r]):
                if self.lose is not None and self.lose[0] == r and t == self.lose[1]:
                    self.world.kill(r)
                    ex.close()
                    return
                grads = [device_tensor(torch.zeros(n, dtype=torch.float64), r) for n in self.numels]
                values = [_gradient(self.seed, r, t, n) for n in self.numels]

                def compute(grads=grads, values=values):
                    for g, v in zip(grads, values):
                        g.copy_(v)

                api.launch(compute, duration=self.speeds[r] * rng.uniform(0.5, 1.5))
                ex.submit(t, grads)
                self.max_in_flight[r] = max(self.max_in_flight[r], ex.in_flight_steps)
                self._install(r, api, ex, ex.ready())
            ex.finish()
            self._install(r, api, ex, ex.ready())
            api.current_stream().synchronize()
            self.submitted[r], self.applied[r] = ex.submitted, ex.applied
        except BaseException as exc:  # noqa: BLE001 - checked by the test
            self.errors[r] = exc
        finally:
            if ex is not None:
                ex.close()

    def _install(self, r: int, api, ex, ready) -> None:
        params = ex.take_parameters()
        for k, p in params.items():
            version = ex.versions[k]
            api.launch(lambda k=k, p=p, v=version: self.installed[r].append((k, v, plain(p))))

    def go(self, join: float = 120.0) -> "Run":
        threads = [threading.Thread(target=self._worker, args=(r,), daemon=True) for r in range(self.n)]
        p2p.DataPlane = self.plane_cls
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(join)
        finally:
            p2p.DataPlane = DataPlane
        self.hung = [r for r, t in enumerate(threads) if t.is_alive()]
        self.state = self.world.describe()
        self.world.close()
        return self

    def check(self) -> None:
        assert not self.hung, f"ranks {self.hung} did not end\n{self.state}"
        assert not self.errors, f"{self.errors}\n{self.state}"
        assert not self.world.failures, self.world.failures
        for col in self.columns:  # each exchange on its own: its owners saw its workers' steps only
            owners, steps = [self.owners[r] for r in col], [self.steps[r] for r in col]
            replays = protocol.check_owners(owners, [plain(o.flat) for o in owners], steps)
            for w in col:
                assert self.max_in_flight[w] <= self.bound
                assert self.submitted[w] == self.applied[w] == self.steps[w]
                for shard, version, params in self.installed[w]:  # what the training stream read: the master then
                    assert torch.equal(params, replays[shard][version]), (w, shard, version)
                if self.steps[w]:  # the last refresh holds every shard just after this worker's last step
                    assert {s for s, _, _ in self.installed[w]} == set(range(len(col)))
        assert self.world.nccl_ops > 0
        assert self.world.nccl_ops_from_default_stream == 0, "data-plane operations issued on the default (training) stream"
        assert max(self.world.max_resident) <= SEND_SLOTS + RECV_SLOTS + 1  # + the training kernel
        assert all(not groups for groups in self.world.live_groups.values()), self.world.live_groups


def _random_schedule(seed: int, **kwargs) -> Run:
    rng = random.Random(seed)
    world = rng.randint(2, 8)
    return Run(
        seed, world,
        steps=[rng.randint(0, 4) for _ in range(world)],
        bound=rng.randint(0, 3),
        speeds=[rng.choice([0.0005, 0.003, 0.01]) for _ in range(world)],
        sizes=[rng.randint(1, 40) for _ in range(rng.randint(world, 2 * world + 3))],
        **kwargs,
    )


@pytest.mark.parametrize("block", range(4))
def test_random_schedules_on_emulated_gpus(block):
    for seed in range(block * 8, block * 8 + 8):
        _random_schedule(seed).go().check()


@pytest.mark.parametrize("seed", range(4))
def test_exchanges_among_columns_of_sync_groups_run_at_once(seed):
    """Sync groups' data plane: one p2p exchange per column (the ranks with the same index in every group), all
    running at once on the same emulated GPUs; every process creates every column's groups in one order, peers are
    indices into the column (the header group reports a source by its rank in the group)."""
    rng = random.Random(seed)
    world, k = rng.choice([(4, 2), (6, 2), (6, 3), (8, 2)])
    columns = [[g * k + j for g in range(world // k)] for j in range(k)]
    Run(seed, world, steps=[rng.randint(1, 4) for _ in range(world)], bound=rng.randint(0, 2),
        speeds=[rng.choice([0.0005, 0.003, 0.01]) for _ in range(world)],
        sizes=[rng.randint(1, 40) for _ in range(world + 3)], columns=columns).go().check()


@pytest.mark.slow
@pytest.mark.parametrize("world", [32, 64])
def test_many_ranks_with_few_steps(world):
    rng = random.Random(world)
    Run(world, world, steps=[2] * world, bound=1, speeds=[rng.choice([0.001, 0.004]) for _ in range(world)],
        sizes=[rng.randint(1, 30) for _ in range(world + 5)], timeout=120, handshake=120).go(join=300).check()


# ---------------------------------------------------------------------------------------------- known-wrong designs
class FutureCompletion(NCCLBackend):
    """Known wrong (the first design): a transfer counts as complete when its Work's future is done."""

    def poll(self):
        done = [t for work, t in self._posted if work.get_future().done()]
        self._posted = [(w, t) for w, t in self._posted if t not in done]
        return done


class DefaultStream(NCCLBackend):
    """Known wrong: the communication thread stays on the default stream, the one training runs on."""

    def start(self):
        self.stream = self.api.current_stream()


class NoGradientEvent(NCCLBackend):
    """Known wrong: the communication stream reads a submitted gradient without waiting for the training stream."""

    def adopt(self, event, tensors):
        pass


def _wrong(**kwargs) -> Run:
    return Run(3, 2, steps=[3, 3], bound=1, speeds=[0.01, 0.01], sizes=[6, 5, 4], timeout=4, handshake=10, **kwargs).go(join=30)


def test_completion_by_future_is_caught():
    run = _wrong(backend_cls=FutureCompletion)
    with pytest.raises(AssertionError):
        run.check()
    # the payload is used before it arrived: a kernel read a receive buffer NCCL had not written yet
    assert any("NCCL receive has not written yet" in str(e) for e in run.world.failures), run.world.failures


def test_payloads_posted_without_clear_to_send_deadlock_a_pair():
    run = _wrong(plane_cls=PostOnArrival)
    with pytest.raises(AssertionError, match="HandshakeError"):
        run.check()
    # already the setup round trip: both ranks sent first on their shared communicator, two sends at the heads
    assert isinstance(run.errors[0], HandshakeError) and run.errors[0].lost_ranks == [1]
    assert run.state.count("nccl send to rank") == 2 and "resident" in run.state, run.state


def test_communication_on_the_default_stream_is_caught():
    run = _wrong(backend_cls=DefaultStream)
    with pytest.raises(AssertionError, match="default"):
        run.check()


def test_gradient_read_before_the_training_stream_produced_it_is_caught():
    run = _wrong(backend_cls=NoGradientEvent)
    with pytest.raises(AssertionError, match="replay|owner"):
        run.check()


# ---------------------------------------------------------------------------------------------- failures
def test_a_lost_peer_ends_every_survivor_with_its_name_within_the_timeout():
    t0 = time.monotonic()
    run = Run(5, 3, steps=[8, 8, 8], bound=1, speeds=[0.005] * 3, sizes=[5, 5, 5, 5], timeout=3, lose=(2, 2)).go(join=40)
    assert not run.hung, run.state
    for r in (0, 1):
        err = run.errors[r]
        assert isinstance(err, PeerLostError) and 2 in err.lost_ranks, err
        assert "rank 2" in str(err)
    assert time.monotonic() - t0 < 20


def test_a_local_failure_of_the_communication_thread_is_reported_as_local_with_its_cause(monkeypatch):
    """A failure on rank 1's communication thread that is not a communication operation's (here a protocol error
    while it handles its third message; out of memory in the owner's step takes the same path on a real GPU, where
    the step is enqueued from that thread): rank 1 ends with an error saying the failure is its own, the original
    exception chained, not a PeerLostError blaming a peer; the others then lose rank 1 and name it."""
    handled = {"n": 0}
    on_message = p2p.Engine.on_message

    def failing(self, msg):
        if self.rank == 1:
            handled["n"] += 1
            if handled["n"] == 3:
                raise AssertionError("reply for a step this rank never sent (injected)")
        return on_message(self, msg)

    monkeypatch.setattr(p2p.Engine, "on_message", failing)
    run = Run(3, 3, steps=[6, 6, 6], bound=1, speeds=[0.003] * 3, sizes=[5, 5, 5, 5], timeout=3).go(join=40)
    assert not run.hung, run.state
    err = run.errors[1]
    assert isinstance(err, ExchangeThreadError) and not isinstance(err, PeerLostError), repr(err)
    assert isinstance(err.__cause__, AssertionError)
    assert "failed on this rank (not a peer)" in str(err) and "AssertionError: reply for a step" in str(err)
    for r in (0, 2):
        assert isinstance(run.errors[r], PeerLostError) and "rank 1" in str(run.errors[r]), run.errors[r]


def test_a_peer_that_never_answers_the_handshake_fails_setup_naming_it_and_the_fallback():
    world = World(2, slots=5)
    err = {}

    def rank0():
        api = world.api(0)
        owner = Owner(torch.zeros(3, dtype=torch.float64), 0)
        try:
            P2PExchange(1, owner, [3, 3], 0, 2, backend=NCCLBackend(api, 0, 2, owner.flat, None, timedelta(seconds=30)),
                        timeout=30, handshake_timeout=1.5)
        except BaseException as exc:  # noqa: BLE001
            err["e"] = exc

    t0 = time.monotonic()
    th = threading.Thread(target=rank0, daemon=True)
    th.start()
    th.join(20)
    world.close()
    e = err["e"]
    assert isinstance(e, HandshakeError) and e.lost_ranks == [1]
    assert "round trip with rank(s) 1 within 1.5s" in str(e) and "transport='allreduce'" in str(e) and "NCCL" in str(e)
    assert time.monotonic() - t0 < 10


def test_the_emulator_blocks_a_host_read_until_the_stream_reaches_it():
    """The rule the first design broke: reading a received header on the host waits for the receive."""
    world = World(2, slots=5, host_timeout=1.0)
    try:
        api0 = world.api(0)
        group = world.new_group(0, [0, 1], "nccl")
        world.new_group(1, [0, 1], "nccl")
        buf = device_tensor(torch.zeros(4, dtype=torch.int64), 0)
        work = api0.irecv(buf, 1, group)
        assert work.get_future().done()  # "done" at enqueue
        assert not work.is_completed()
        work.wait()  # the current (default) stream now waits for the receive
        with pytest.raises(EmulatorError, match=r"host read \(tolist\)"):
            buf.tolist()
        with pytest.raises(EmulatorError, match="outside any stream"):
            buf.add_(1)
        api1 = world.api(1)
        api1.isend(device_tensor(torch.arange(4), 1), 0, group)
        deadline = time.monotonic() + 5
        while not work.is_completed() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert buf.tolist() == [0, 1, 2, 3]
    finally:
        world.close()
