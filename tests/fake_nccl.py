"""A discrete-event model of the p2p data plane's rules, to check the protocol over thousands of schedules fast.

The pure state machines (``Engine`` and ``DataPlane``) of every rank run in one thread in virtual time. The model
(the same rules as ``tests/nccl_emulator.py``, which runs the real transport with threads, but fewer schedules):

- headers are CPU messages delivered after a random delay, in order per (sender, receiver);
- payload operations go on the 2-rank communicator of their pair, one FIFO stream per member: only the head of a
  stream can run, so a posted operation holds up every later one of that member on that communicator (sends
  included); the heads of the two members match when one is a send and the other a receive of the same size and
  dtype (no tags, no any-source), and complete together after a random delay;
- a rank has ``slots`` kernel slots: an operation at the head of its stream becomes resident only with a free slot,
  and holds it until it completes (an unmatched receive holds one forever).

A deadlock shows up as an empty event queue while some rank is not done.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from typing import Callable

from lightning_asyncpred.exchange.p2p_dataplane import Action, DataPlane


class Deadlock(AssertionError):
    pass


class _Op:
    def __init__(self, rank: int, action: Action) -> None:
        self.rank, self.action = rank, action
        self.resident = False


def simulate(
    engines: list,
    planes: list,
    workers: list,
    rng: random.Random,
    slots: int,
    max_delay: float = 1.0,
    on_event: Callable[[], None] = lambda: None,
) -> dict:
    """Run ``engines`` and ``planes`` (one per rank) and their ``workers`` (generators yielding ("compute", seconds),
    ("messages", list) or ("wait", predicate)) to the end in virtual time. Returns statistics.

    Raises:
        Deadlock: no event left while some rank is not done (with the blocked streams).
    """
    n = len(engines)
    counter = itertools.count()
    events: list = []
    now = 0.0
    waiting: dict[int, Callable[[], bool]] = {}
    last_header: dict[tuple[int, int], float] = {}
    streams: dict[tuple[tuple[int, int], int], deque[_Op]] = {}
    free = [slots] * n
    busy: set[tuple[int, int]] = set()
    stats = {"max_resident": [0] * n, "payloads": 0}

    def pair(a: int, b: int) -> tuple[int, int]:
        return (min(a, b), max(a, b))

    def run_actions(rank: int, actions: list[Action]) -> None:
        for a in actions:
            if a.kind == "header":
                t = max(now + rng.uniform(0, max_delay), last_header.get((rank, a.peer), 0.0))
                last_header[(rank, a.peer)] = t
                heapq.heappush(events, (t, next(counter), "header", (rank, a.peer, list(a.words))))
            else:
                streams.setdefault((pair(rank, a.peer), rank), deque()).append(_Op(rank, a))
        deliver(rank)
        schedule()

    def deliver(rank: int) -> None:
        msgs = planes[rank].take_delivered()
        out = []
        for m in msgs:
            out += engines[rank].on_message(m)
        if out:
            run_actions(rank, planes[rank].send(out))

    def schedule() -> None:
        """Make heads resident where a slot is free, then start every matched pair of heads."""
        for (_pair, r), q in streams.items():
            if q and not q[0].resident and free[r] > 0:
                q[0].resident = True
                free[r] -= 1
                stats["max_resident"][r] = max(stats["max_resident"][r], slots - free[r])
        for p in {p for (p, _r) in streams}:
            if p in busy:
                continue
            qa, qb = streams.get((p, p[0])), streams.get((p, p[1]))
            if not qa or not qb or not (qa[0].resident and qb[0].resident):
                continue
            ha, hb = qa[0].action, qb[0].action
            if {ha.kind, hb.kind} != {"send", "recv"}:
                continue  # two sends (or two receives) at the heads: blocked
            sa, sb = ha.transfer.message.payload, hb.transfer.message.payload
            if sa.numel() != sb.numel() or sa.dtype != sb.dtype:
                raise AssertionError(f"size mismatch on {p}: {ha.kind} of {sa.numel()} vs {hb.kind} of {sb.numel()}")
            busy.add(p)
            heapq.heappush(events, (now + rng.uniform(0, max_delay), next(counter), "payload", p))

    def complete(p: tuple[int, int]) -> None:
        busy.discard(p)
        ops = [streams[(p, p[0])].popleft(), streams[(p, p[1])].popleft()]
        send, recv = ops if ops[0].action.kind == "send" else ops[::-1]
        recv.action.transfer.message.payload.copy_(send.action.transfer.message.payload)
        stats["payloads"] += 1
        rng.shuffle(ops)
        for op in ops:
            free[op.rank] += 1
            run_actions(op.rank, planes[op.rank].on_complete(op.action.transfer))

    def advance(rank: int) -> None:
        while True:
            try:
                what, arg = next(workers[rank])
            except StopIteration:
                return
            if what == "compute":
                heapq.heappush(events, (now + arg, next(counter), "worker", rank))
                return
            if what == "messages":
                run_actions(rank, planes[rank].send(arg))
            elif arg():  # "wait"
                continue
            else:
                waiting[rank] = arg
                return

    for r in range(n):
        advance(r)
    while events:
        now, _, kind, what = heapq.heappop(events)
        if kind == "worker":
            advance(what)
        elif kind == "header":
            src, dst, words = what
            run_actions(dst, planes[dst].on_header(src, words))
        else:
            complete(what)
        schedule()
        for rank, pred in list(waiting.items()):
            if pred():
                del waiting[rank]
                advance(rank)
        on_event()
    if waiting or not all(e.done and pl.idle for e, pl in zip(engines, planes)):
        blocked = {f"{p} rank {r}": [f"{o.action.kind}{'*' if o.resident else ''}" for o in q] for (p, r), q in streams.items() if q}
        raise Deadlock(
            f"no event left at t={now:.3f} but ranks {[r for r, e in enumerate(engines) if not e.done]} are not done; "
            f"waiting workers {sorted(waiting)}; blocked streams (* resident) {blocked}"
        )
    return stats


class PostOnArrival(DataPlane):
    """Known wrong: no clear-to-send. The sender posts its send with the header and the receiver posts a receive as
    soon as a header arrives (as receives posted ahead would be): the two ends of a pair issue in different orders."""

    def _announce(self, peer):
        actions = super()._announce(peer)
        t = self._active[peer]
        if t is not None and not getattr(t, "posted", False):
            t.posted = True
            actions.append(self._post("send", t))
        return actions

    def _reserve_receives(self):
        actions = []
        while self._wants_recv:
            t = self._wants_recv.popleft()
            self.recvs_used += 1
            t.message.payload = self.alloc(int(t.message.payload))
            actions.append(self._post("recv", t))
        return actions
