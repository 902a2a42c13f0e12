"""An in-process simulation of NCCL point-to-point semantics, to prove the p2p protocol on CPU.

NCCL's rules enforced here (see ../shared/REFERENCES.md): each communicator has one FIFO stream per member rank;
only the operation at the head of a stream runs, so a posted receive holds up every later operation of that
rank on that communicator, sends included; a send matches the receive at the head of the other member's
stream (no any-source receive, no tags: order alone matches); the two must agree in element count and dtype.
Operations complete after random delays. Everything runs in one thread in virtual time (a discrete-event
simulation), so thousands of schedules take seconds and a deadlock shows up as an empty event queue while some
rank is not done.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from typing import Callable

from lightning_asyncpred.exchange.p2p_protocol import Op


class Deadlock(AssertionError):
    pass


class FakeNCCL:
    """Communicators keyed by the channel an operation names (a 2-rank communicator per key)."""

    def __init__(self, rng: random.Random, max_delay: float = 1.0) -> None:
        self.rng = rng
        self.max_delay = max_delay
        self.streams: dict[tuple[tuple[int, int], int], deque[Op]] = {}
        self.busy: set[tuple[int, int]] = set()  # communicators whose head pair is in transit
        self.ops_issued = 0

    def issue(self, rank: int, op: Op) -> None:
        comm = op.channel
        if rank not in comm:
            raise AssertionError(f"rank {rank} issued {op.kind} on communicator {comm} it is not a member of")
        other = comm[1] if comm[0] == rank else comm[0]
        if op.peer != other:
            raise AssertionError(f"rank {rank}: {op.kind} with peer {op.peer} on communicator {comm} (NCCL: no any-source)")
        self.streams.setdefault((comm, rank), deque()).append(op)
        self.ops_issued += 1

    def matches(self, comms) -> list[tuple[tuple[int, int], Op, int, Op, int]]:
        """Head pairs of ``comms`` that can run now: a send at one member's head and a receive at the other's."""
        out = []
        for comm in comms:
            if comm in self.busy:
                continue
            a, b = comm
            qa, qb = self.streams.get((comm, a)), self.streams.get((comm, b))
            if not qa or not qb:
                continue
            ha, hb = qa[0], qb[0]
            if {ha.kind, hb.kind} != {"send", "recv"}:
                continue  # two sends or two receives at the heads: blocked
            if ha.buffer.numel() != hb.buffer.numel() or ha.buffer.dtype != hb.buffer.dtype:
                raise AssertionError(
                    f"size mismatch on {comm}: {ha.kind} of {ha.buffer.numel()} {ha.buffer.dtype} vs "
                    f"{hb.kind} of {hb.buffer.numel()} {hb.buffer.dtype}"
                )
            out.append((comm, ha, a, hb, b))
        return out

    def complete(self, comm: tuple[int, int]) -> list[tuple[int, Op]]:
        a, b = comm
        ha, hb = self.streams[(comm, a)].popleft(), self.streams[(comm, b)].popleft()
        send, recv = (ha, hb) if ha.kind == "send" else (hb, ha)
        recv.buffer.copy_(send.buffer)
        self.busy.discard(comm)
        return [(a, ha), (b, hb)]

    def pending(self) -> dict:
        return {f"{comm} rank {r}": [op.kind for op in q] for (comm, r), q in self.streams.items() if q}


def simulate(
    engines: list,
    workers: list,
    rng: random.Random,
    max_delay: float = 1.0,
    on_event: Callable[[], None] = lambda: None,
) -> float:
    """Run ``engines`` (one per rank) and their ``workers`` (generators yielding ("compute", seconds) or
    ("wait", predicate)) to the end in virtual time. Returns the virtual time taken.

    Raises:
        Deadlock: no event left while some engine is not done (with the blocked streams).
    """
    net = FakeNCCL(rng, max_delay)
    counter = itertools.count()
    events: list = []
    now = 0.0
    waiting: dict[int, Callable[[], bool]] = {}

    def issue(rank: int, ops: list[Op], touched=()) -> None:
        for op in ops:
            net.issue(rank, op)
        for comm, *_ in net.matches({op.channel for op in ops} | set(touched)):
            net.busy.add(comm)
            heapq.heappush(events, (now + rng.uniform(0, max_delay), next(counter), "net", comm))

    def advance(rank: int) -> None:
        try:
            what, arg = next(workers[rank])
        except StopIteration:
            return
        if what == "compute":
            heapq.heappush(events, (now + arg, next(counter), "worker", rank))
        elif what == "ops":
            issue(rank, arg)
            advance(rank)
        else:  # "wait": resume once the predicate holds
            if arg():
                advance(rank)
            else:
                waiting[rank] = arg

    for r, engine in enumerate(engines):
        issue(r, engine.start())
    for r in range(len(engines)):
        advance(r)
    while events:
        now, _, kind, what = heapq.heappop(events)
        if kind == "worker":
            advance(what)
        else:
            completed = net.complete(what)
            rng.shuffle(completed)
            for rank, op in completed:
                issue(rank, engines[rank].on_complete(op))
            issue(0, [], touched=[what])  # the next operations on this communicator may match now
        for rank, pred in list(waiting.items()):
            if pred():
                del waiting[rank]
                advance(rank)
        on_event()
    if not all(e.done for e in engines):
        raise Deadlock(
            f"no event left at t={now:.3f} but ranks {[r for r, e in enumerate(engines) if not e.done]} are not done; "
            f"waiting workers {sorted(waiting)}; blocked streams {net.pending()}"
        )
    return now
