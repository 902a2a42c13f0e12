"""The protocol of the point-to-point transport: sharded owners and asynchronous requests (pure torch).

Roles. Rank ``r`` is a worker (it trains a full replica) and the owner of shard ``r`` (the master copy of those
parameters and the optimizer state for them; see ``sharding.py``). At step ``t`` a worker sends every owner
``k`` its gradient shard ``g_t[k]`` with ``v_read[k]``, the version of shard ``k`` its replica held when it
computed ``g_t``, and goes on. Owner ``k`` applies a request as soon as it arrives: ``staleness = version_k -
v_read``, one optimizer step on the master, ``version_k += 1``; then it replies with its master shard and
version. The worker installs replies between its steps (the newest version of each shard). Its own shard takes
the same path without messages.

Messages (:class:`Message`). A header of four integers (kind, step, version, and staleness or a count) and a
payload of exactly the shard's size (none for ``FIN``). Kinds: ``REQUEST`` (a gradient shard), ``REPLY`` (a
master shard), ``FIN`` (the sender's last request is behind it; carries how many requests it sent), ``PING`` /
``PONG`` (the round trip every rank makes with every peer at setup, before any step). How a message travels
(header on the CPU, payload posted only once announced) is the data plane's business: ``p2p_dataplane.py``.
This engine only relies on its guarantee: the messages from one peer are delivered in the order that peer sent
them, each exactly once.

Device work. The engine never reads device memory on the host. The owner's update and the snapshot of the master
that a reply carries are handed to ``launch`` (on a GPU: run now, so their kernels queue on the communication
stream in issue order; see ``p2p_backends.py``), and the snapshot is taken right after the update it answers.

Why it ends: owners answer every request without waiting for anything; every worker sends ``FIN`` after its last
request once it has finished; so every rank eventually receives every reply it is owed and every ``FIN``. A rank
is :attr:`done` when it has finished and received every reply and every ``FIN`` (the data plane adds: and every
send of it has completed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from torch import Tensor

REQUEST, REPLY, FIN, PING, PONG = 1, 2, 3, 4, 5

# apply(gradient shard, source rank, step, staleness): one optimizer step of the owner on its master (in place)
ApplyFn = Callable[[Tensor, int, int, int], Any]


@dataclass
class Message:
    """One protocol message to or from ``peer``: the header ``(kind, step, version, extra)`` and a flat payload of
    exactly the size it needs (``None``: header only)."""

    peer: int
    kind: int
    step: int = 0
    version: int = 0
    extra: int = 0
    payload: Optional[Tensor] = None

    @property
    def numel(self) -> int:
        return 0 if self.payload is None else int(self.payload.numel())


@dataclass
class Reply:
    """A master shard for the worker to install: ``shard`` at ``version``, answering the worker's ``step``.
    ``ready`` is set by the transport: what the training stream must wait for before it reads ``params``."""

    shard: int
    step: int
    version: int
    staleness: int
    params: Tensor
    ready: Any = None


@dataclass
class _Step:
    pending: set[int]
    staleness: list[int] = field(default_factory=list)


def within_bound(in_flight: int, max_staleness: int) -> bool:
    """The worker's bound: after submitting a step it computes the next one only while at most ``max_staleness``
    of its steps are unanswered (``P2PExchange`` waits for this; the planner's model, ``planner/simulate.py``,
    applies the same rule)."""
    return in_flight <= max_staleness


def arrival_staleness(owner_version: int, read_version: int) -> int:
    """An arrival's staleness at its owner: the owner's updates between the version the worker read and the one
    the gradient is applied to (``version - v_read``)."""
    return owner_version - read_version


def _eager(fn: Callable[[], Any]) -> None:
    fn()


def _snapshot_eager(t: Tensor) -> Tensor:
    return t.detach().clone()


class Engine:
    """The protocol state machine of one rank (see the module docstring). Not thread-safe: one thread drives it.

    Args:
        rank, world_size: this rank and the number of ranks (= shards).
        shard_numels: elements of every shard (the same on every rank).
        apply: the owner's update of this rank's shard (see :data:`ApplyFn`).
        master: the owner's flat master (updated in place by ``apply``; replies carry snapshots of it).
        launch: runs device work in stream order (default: now).
        snapshot: a stream-ordered copy of a device tensor (default: ``clone``).
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        shard_numels: Sequence[int],
        apply: ApplyFn,
        master: Tensor,
        launch: Callable[[Callable[[], Any]], Any] = _eager,
        snapshot: Callable[[Tensor], Tensor] = _snapshot_eager,
    ) -> None:
        if len(shard_numels) != world_size:
            raise ValueError(f"{len(shard_numels)} shard sizes for a world of {world_size}")
        if master.numel() != int(shard_numels[rank]):
            raise ValueError(f"rank {rank}: master of {master.numel()} elements for a shard of {shard_numels[rank]}")
        self.rank, self.world_size = rank, world_size
        self.shard_numels = [int(n) for n in shard_numels]
        self.apply, self.master, self.launch, self.snapshot = apply, master, launch, snapshot
        self.peers = [p for p in range(world_size) if p != rank]
        # owner
        self.version = 0
        self.requests_received = [0] * world_size
        # worker
        self.steps: dict[int, _Step] = {}
        self.requests_sent = [0] * world_size
        self.replies_owed = [0] * world_size  # replies this rank still waits for, per owner
        self.inbox: list[Reply] = []
        self.finished = False
        self.completed_steps: list[tuple[int, list[int]]] = []  # (step, staleness per shard), in completion order
        self._fin_received = {p: False for p in self.peers}
        self.pongs: set[int] = set()

    # ------------------------------------------------------------------ setup
    def ping(self, payload: Callable[[], Tensor]) -> list[Message]:
        """A round trip with every peer (``payload()``: a small device tensor, so the payload path is exercised)."""
        return [Message(p, PING, payload=payload()) for p in self.peers]

    @property
    def handshake_done(self) -> bool:
        return len(self.pongs) == len(self.peers)

    # ------------------------------------------------------------------ worker
    def submit(self, step: int, grads: Sequence[Tensor], versions: Sequence[int]) -> list[Message]:
        """Send the gradient shards of ``step`` (``grads[k]`` for owner ``k``, computed at shard versions
        ``versions``); this rank's own shard is applied at once."""
        if self.finished:
            raise RuntimeError("Engine.submit() after finish()")
        if step in self.steps:
            raise ValueError(f"step {step} was already submitted")
        self.steps[step] = _Step(pending=set(range(self.world_size)))
        out = []
        for k in self.peers:
            self.requests_sent[k] += 1
            self.replies_owed[k] += 1
            out.append(Message(k, REQUEST, step, int(versions[k]), 0, grads[k] if grads[k].numel() else None))
        staleness = arrival_staleness(self.version, int(versions[self.rank]))
        snap = self._update(grads[self.rank], self.rank, step, staleness)
        self.requests_received[self.rank] += 1
        self._answered(Reply(self.rank, step, self.version, staleness, snap))
        return out

    def finish(self) -> list[Message]:
        """No more steps from this worker: ``FIN`` to every peer, behind its requests."""
        if self.finished:
            return []
        self.finished = True
        return [Message(p, FIN, extra=self.requests_sent[p]) for p in self.peers]

    def _update(self, grad: Tensor, source: int, step: int, staleness: int) -> Tensor:
        """The owner's step on ``grad`` and a snapshot of the master right after it (both in stream order)."""
        self.launch(lambda: self.apply(grad, source, step, staleness))
        self.version += 1
        return self.snapshot(self.master)

    def _answered(self, reply: Reply) -> None:
        self.inbox.append(reply)
        entry = self.steps[reply.step]
        entry.pending.discard(reply.shard)
        entry.staleness.append(reply.staleness)
        if not entry.pending:
            del self.steps[reply.step]
            self.completed_steps.append((reply.step, entry.staleness))

    def take_replies(self) -> list[Reply]:
        out, self.inbox = self.inbox, []
        return out

    @property
    def in_flight(self) -> int:
        """Steps of this worker with replies outstanding."""
        return len(self.steps)

    # ------------------------------------------------------------------ messages
    def on_message(self, msg: Message) -> list[Message]:
        """Handle a message from ``msg.peer``; returns the messages to send."""
        peer, kind = msg.peer, msg.kind
        if kind == REQUEST:
            if self._fin_received[peer]:
                raise RuntimeError(f"rank {self.rank}: request from rank {peer} after its FIN")
            numel = self.shard_numels[self.rank]
            if msg.numel != numel:
                raise RuntimeError(f"rank {self.rank}: request of {msg.numel} elements from rank {peer}, shard has {numel}")
            staleness = arrival_staleness(self.version, msg.version)
            snap = self._update(msg.payload if numel else self.master[:0], peer, msg.step, staleness)
            self.requests_received[peer] += 1
            return [Message(peer, REPLY, msg.step, self.version, staleness, snap if numel else None)]
        if kind == REPLY:
            if self.replies_owed[peer] <= 0:
                raise RuntimeError(f"rank {self.rank}: unexpected reply from rank {peer} for step {msg.step}")
            self.replies_owed[peer] -= 1
            params = msg.payload if msg.payload is not None else self.master[:0]
            self._answered(Reply(peer, msg.step, msg.version, msg.extra, params))
            return []
        if kind == FIN:
            if msg.extra != self.requests_received[peer]:
                raise RuntimeError(
                    f"rank {self.rank}: rank {peer} says it sent {msg.extra} requests, {self.requests_received[peer]} arrived"
                )
            self._fin_received[peer] = True
            return []
        if kind == PING:
            return [Message(peer, PONG, payload=msg.payload)]
        if kind == PONG:
            self.pongs.add(peer)
            return []
        raise RuntimeError(f"rank {self.rank}: message of unknown kind {kind} from rank {peer}")

    # ------------------------------------------------------------------ state
    @property
    def done(self) -> bool:
        """Finished, every FIN received, every reply received (the data plane adds: every send completed)."""
        return self.finished and not self.steps and all(self._fin_received.values())

    def missing(self) -> list[int]:
        """Peers this rank still waits for (a reply, their FIN or their PONG): named when a wait times out."""
        return [
            p for p in self.peers
            if self.replies_owed[p] > 0 or (self.finished and not self._fin_received[p]) or p not in self.pongs
        ]
