"""The protocol of the point-to-point transport: sharded owners and asynchronous requests (pure torch).

Roles. Rank ``r`` is a worker (it trains a full replica) and the owner of shard ``r`` (the master copy of those
parameters and the optimizer state for them; see ``sharding.py``). At step ``t`` a worker sends every owner
``k`` its gradient shard ``g_t[k]`` with ``v_read[k]``, the version of shard ``k`` its replica held when it
computed ``g_t``, and goes on. Owner ``k`` applies a request as soon as it arrives: ``staleness = version_k -
v_read``, one optimizer step on the master, ``version_k += 1``; then it replies with its master shard and
version. The worker installs replies between its steps (the newest version of each shard). Its own shard takes
the same path without messages.

Messages. One tensor of ``H + M`` elements of the parameters' dtype: a 32-byte header (four int64: kind, step,
version, and staleness or a count) and a payload of ``M`` elements, the largest shard's size (zero beyond the
shard). Kinds: ``REQUEST`` (a gradient shard), ``REPLY`` (a master shard), ``FIN`` (the sender's last request
is behind it; carries how many requests it sent). Every send therefore matches every receive in count and
dtype, as NCCL requires.

Channels. Every ordered pair ``(a, b)`` has a channel of its own (a 2-rank communicator) that carries only
messages from ``a`` to ``b``: ``a`` only sends on it and ``b`` only receives. Per channel, messages leave in FIFO
order with at most one send and one receive outstanding (Gloo misbehaves with several outstanding unbound
receives from one source and tag).

Why it cannot deadlock under NCCL's rules (a FIFO stream per communicator where a posted receive holds up every
later operation, no any-source receive, no tags, one thread issuing every operation):

1. A rank issues only sends on its outgoing channels and only receives on its incoming ones. A posted receive
   can hold up only later receives on its own channel: no receive ever holds up a send.
2. Every send is matched: ``b`` keeps a receive posted on channel ``(a, b)`` as long as ``a`` may still send on
   it, that is until ``a``'s ``FIN`` has arrived (before it, requests may come) and while ``b`` waits for
   replies from ``a`` (``a`` sends a reply only for a request of ``b``). ``a`` sends nothing else.
3. Every posted receive is matched: ``b`` posts one only in the cases of 2, when a message is owed to it:
   owners answer every request without waiting for anything, and every worker sends ``FIN`` after its last
   request once it has finished.
4. One thread drives each :class:`Engine` (the communication thread); main threads only hand it work.

So every operation completes and the protocol ends once every worker has finished: a rank is :attr:`done`
when it has sent ``FIN`` to every peer, received ``FIN`` from every peer, received every reply it is owed and
completed every send. ``tests/test_p2p_protocol.py`` drives this code through a fake backend that enforces
NCCL's rules over thousands of random schedules.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

REQUEST, REPLY, FIN = 1, 2, 3
HEADER_BYTES = 32  # four int64

# apply(gradient shard, source rank, step, staleness) -> the master shard after the update (flat)
ApplyFn = Callable[[Tensor, int, int, int], Tensor]


@dataclass
class Op:
    """One point-to-point operation for a backend to issue: ``send`` on channel ``(rank, peer)`` or ``recv`` on
    channel ``(peer, rank)``."""

    kind: str
    peer: int
    channel: tuple[int, int]
    buffer: Tensor


@dataclass
class Reply:
    """A master shard for the worker to install: ``shard`` at ``version``, answering the worker's ``step``."""

    shard: int
    step: int
    version: int
    staleness: int
    params: Tensor


@dataclass
class _Step:
    pending: set[int]
    staleness: list[int] = field(default_factory=list)


class Engine:
    """The protocol state machine of one rank (see the module docstring). Not thread-safe: one thread drives it.

    Args:
        rank, world_size: this rank and the number of ranks (= shards).
        shard_numels: elements of every shard (the same on every rank).
        dtype, device: of the messages (the parameters').
        apply: the owner's update of this rank's shard (see :data:`ApplyFn`).
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        shard_numels: Sequence[int],
        dtype: torch.dtype,
        device: torch.device,
        apply: ApplyFn,
    ) -> None:
        if len(shard_numels) != world_size:
            raise ValueError(f"{len(shard_numels)} shard sizes for a world of {world_size}")
        self.rank, self.world_size = rank, world_size
        self.shard_numels = [int(n) for n in shard_numels]
        self.dtype, self.device = dtype, torch.device(device)
        self.apply = apply
        self.header = max(1, HEADER_BYTES // torch.empty((), dtype=dtype).element_size())
        self.payload = max(self.shard_numels)
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
        # channels
        self._out: dict[int, deque[Tensor]] = {p: deque() for p in self.peers}
        self._sending = {p: False for p in self.peers}
        self._receiving = {p: False for p in self.peers}
        self._fin_sent = {p: False for p in self.peers}
        self._fin_received = {p: False for p in self.peers}

    # ------------------------------------------------------------------ messages
    def _message(self, kind: int, step: int, version: int, extra: int, payload: Optional[Tensor] = None) -> Tensor:
        buf = torch.zeros(self.header + self.payload, dtype=self.dtype, device=self.device)
        buf[: self.header].view(torch.int64)[:4] = torch.tensor([kind, step, version, extra], dtype=torch.int64, device=self.device)
        if payload is not None and payload.numel():
            buf[self.header : self.header + payload.numel()].copy_(payload.reshape(-1))
        return buf

    def _parse(self, buf: Tensor) -> tuple[int, int, int, int]:
        kind, step, version, extra = (int(x) for x in buf[: self.header].view(torch.int64)[:4].tolist())
        return kind, step, version, extra

    def _empty(self) -> Tensor:
        return torch.empty(self.header + self.payload, dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------ pumps
    def _pump(self, peer: int) -> list[Op]:
        ops = []
        if not self._sending[peer] and self._out[peer]:
            self._sending[peer] = True
            ops.append(Op("send", peer, (self.rank, peer), self._out[peer].popleft()))
        wants = not self._fin_received[peer] or self.replies_owed[peer] > 0
        if wants and not self._receiving[peer]:
            self._receiving[peer] = True
            ops.append(Op("recv", peer, (peer, self.rank), self._empty()))
        return ops

    def start(self) -> list[Op]:
        """The first operations: a receive on every incoming channel."""
        return [op for p in self.peers for op in self._pump(p)]

    # ------------------------------------------------------------------ worker
    def submit(self, step: int, grads: Sequence[Tensor], versions: Sequence[int]) -> list[Op]:
        """Send the gradient shards of ``step`` (``grads[k]`` for owner ``k``, computed at shard versions
        ``versions``); this rank's own shard is applied at once."""
        if self.finished:
            raise RuntimeError("Engine.submit() after finish()")
        if step in self.steps:
            raise ValueError(f"step {step} was already submitted")
        self.steps[step] = _Step(pending=set(range(self.world_size)))
        ops = []
        for k in self.peers:
            self.requests_sent[k] += 1
            self.replies_owed[k] += 1
            self._out[k].append(self._message(REQUEST, step, int(versions[k]), 0, grads[k]))
            ops += self._pump(k)
        staleness = self.version - int(versions[self.rank])
        master = self.apply(grads[self.rank], self.rank, step, staleness)
        self.version += 1
        self.requests_received[self.rank] += 1
        self._answered(Reply(self.rank, step, self.version, staleness, master.detach().clone()))
        return ops

    def finish(self) -> list[Op]:
        """No more steps from this worker: ``FIN`` to every peer, behind its requests."""
        if self.finished:
            return []
        self.finished = True
        ops = []
        for p in self.peers:
            self._out[p].append(self._message(FIN, 0, 0, self.requests_sent[p]))
            self._fin_sent[p] = True
            ops += self._pump(p)
        return ops

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

    # ------------------------------------------------------------------ completions
    def on_complete(self, op: Op) -> list[Op]:
        """Handle a completed operation; returns the operations to issue next."""
        peer = op.peer
        if op.kind == "send":
            self._sending[peer] = False
            return self._pump(peer)
        self._receiving[peer] = False
        kind, step, version, extra = self._parse(op.buffer)
        ops: list[Op] = []
        if kind == REQUEST:
            if self._fin_received[peer]:
                raise RuntimeError(f"rank {self.rank}: request from rank {peer} after its FIN")
            staleness = self.version - version
            numel = self.shard_numels[self.rank]
            master = self.apply(op.buffer[self.header : self.header + numel], peer, step, staleness)
            self.version += 1
            self.requests_received[peer] += 1
            self._out[peer].append(self._message(REPLY, step, self.version, staleness, master))
        elif kind == REPLY:
            if self.replies_owed[peer] <= 0:
                raise RuntimeError(f"rank {self.rank}: unexpected reply from rank {peer} for step {step}")
            self.replies_owed[peer] -= 1
            numel = self.shard_numels[peer]
            self._answered(Reply(peer, step, version, extra, op.buffer[self.header : self.header + numel]))
        elif kind == FIN:
            if extra != self.requests_received[peer]:
                raise RuntimeError(
                    f"rank {self.rank}: rank {peer} says it sent {extra} requests, {self.requests_received[peer]} arrived"
                )
            self._fin_received[peer] = True
        else:
            raise RuntimeError(f"rank {self.rank}: message of unknown kind {kind} from rank {peer}")
        return ops + self._pump(peer)

    # ------------------------------------------------------------------ state
    @property
    def done(self) -> bool:
        """Finished, every FIN sent and received, every reply received, every send completed."""
        return (
            self.finished
            and not self.steps
            and all(self._fin_received.values())
            and not any(self._sending.values())
            and not any(self._out.values())
        )

    def missing(self) -> list[int]:
        """Peers this rank still waits for (a reply or their FIN): named when a wait times out."""
        return [p for p in self.peers if self.replies_owed[p] > 0 or (self.finished and not self._fin_received[p])]
