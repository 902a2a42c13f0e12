"""How the p2p transport's messages travel: announced headers on the CPU, payloads posted only when matched (pure).

The rules it is built for (NCCL on CUDA; ``../shared/REFERENCES.md``, NCCL section): an NCCL operation runs on its
communicator's stream in issue order, so a posted receive that is not matched holds up every later operation of
that communicator; a posted, unmatched operation is a kernel that stays resident on the GPU; there is no
any-source receive and no tag, so both ends must issue the operations of a communicator in the same order; and a
host read of device memory blocks the CPU. So:

- **Headers on the CPU.** Every message is first announced by a small integer header sent over a CPU transport
  (Gloo, one process group for the whole data plane, any-source receive). Headers never live in device memory.
- **A payload is posted only once it is announced and both ends have a slot for it.** A rank holds at most
  ``send_slots`` outgoing and ``recv_slots`` incoming payload transfers at once (posted or about to be), so at
  most ``send_slots + recv_slots`` data-plane kernels are ever resident on its GPU, whatever the number of ranks.
  The sender takes a send slot when it announces (``MSG``); the receiver takes a receive slot when it answers
  "clear to send" (``CTS``). Only then are the two operations posted.
- **One communicator per pair, one order.** Payloads between ``a`` and ``b`` (both directions) go over one
  2-rank communicator: each rank is on ``N - 1``. Its lower rank ``lo`` orders the pair: ``lo`` posts its side
  of a transfer exactly when it sends the header that lets ``hi`` post its side (``CTS`` for ``hi -> lo``, ``GO``
  for ``lo -> hi``), and ``hi`` posts on receiving it. Headers from ``lo`` to ``hi`` arrive in order, so both ends
  issue the pair's operations in the same order.

Message order, ``hi -> lo``: ``MSG`` (hi reserves a send slot) -> ``CTS`` (lo reserves a receive slot, sends it,
posts the receive) -> hi posts the send. ``lo -> hi``: ``MSG`` (lo reserves) -> ``CTS`` (hi reserves) -> ``GO``
(lo sends it, posts the send) -> hi posts the receive. A message without payload (``FIN``) is its header alone.
Per direction one transfer at a time: a sender announces the next message to a peer only after the previous
one's send completed, and a receiver delivers the messages of a peer in the order announced.

Why it cannot deadlock (any number of ranks, any slot counts >= 1, a GPU with room for ``send_slots +
recv_slots`` resident kernels beside the training kernels):
1. Headers never wait: they are CPU messages to a peer that always has a receive posted (the header plane).
2. A posted receive is matched: it was posted for an announced transfer whose sender holds a send slot for it
   and posts the send on ``CTS``/``GO`` without waiting for anything else.
3. A posted send is matched: it is posted only after the receiver reserved a slot (``CTS``), and the receiver
   posts (``lo``: already did; ``hi``: on ``GO``) without waiting for anything else.
4. Both ends issue a pair's operations in the same order, so the operation at the head of a communicator's
   stream on one end is the one at the head on the other; by 2 and 3 both get posted, so it completes, and so
   does the next. So every transfer completes and frees its slots, so every announced transfer gets a receive
   slot (first come, first served), and every queued message gets a send slot.
5. One thread issues every operation (the communication thread); nothing here blocks it.

``tests/test_p2p_protocol.py`` checks this state machine on a discrete-event model of these rules over
thousands of random schedules; ``tests/test_p2p_nccl_emulator.py`` runs the whole transport on an emulator of
CUDA streams and NCCL and shows the first design (receives posted in advance, completion by future) hang there.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

from lightning_asyncpred.exchange.p2p_protocol import Message
from lightning_asyncpred.validation import check_int

# header words: [type, kind, step, version, extra, numel, 0, 0]
HEADER_WORDS = 8
MSG, CTS, GO, BYE = 1, 2, 3, 4


@dataclass(eq=False)
class Transfer:
    """One payload transfer: ``outgoing`` to ``peer`` or incoming from it."""

    message: Message
    outgoing: bool
    complete: bool = False

    @property
    def peer(self) -> int:
        return self.message.peer


@dataclass
class Action:
    """What the data plane asks its backend to do: ``header`` (send ``words`` to ``peer`` on the CPU), ``send`` or
    ``recv`` (post the payload of ``transfer`` on the pair's communicator)."""

    kind: str
    peer: int
    words: Optional[list[int]] = None
    transfer: Optional[Transfer] = None


class DataPlane:
    """The data plane of one rank (see the module docstring). Not thread-safe: the communication thread drives it.

    Args:
        rank, world_size: this rank and the number of ranks.
        alloc: ``alloc(numel)`` -> a device buffer to receive a payload into.
        send_slots, recv_slots: the most outgoing / incoming payload transfers at once (>= 1).
    """

    def __init__(self, rank: int, world_size: int, alloc: Callable[[int], Any], send_slots: int = 2, recv_slots: int = 2) -> None:
        self.rank, self.world_size, self.alloc = rank, world_size, alloc
        self.send_slots, self.recv_slots = check_int("send_slots", send_slots, 1), check_int("recv_slots", recv_slots, 1)
        self.peers = [p for p in range(world_size) if p != rank]
        self._out: dict[int, deque[Message]] = {p: deque() for p in self.peers}  # not yet announced
        self._active: dict[int, Optional[Transfer]] = {p: None for p in self.peers}  # announced, send not complete
        self._wants_send: deque[int] = deque()  # peers whose next message waits for a send slot
        self._wants_recv: deque[Transfer] = deque()  # announced to this rank, waiting for a receive slot
        self._awaiting_go: dict[int, Transfer] = {}  # this rank is hi: reserved, posts on lo's GO
        self._inbound: dict[int, deque[Transfer]] = {p: deque() for p in self.peers}  # delivery order per peer
        self.sends_used = self.recvs_used = 0
        self.byes_received: set[int] = set()
        self.delivered: deque[Message] = deque()

    # ------------------------------------------------------------------ outgoing
    def send(self, messages: list[Message]) -> list[Action]:
        """Queue ``messages`` (each to its ``peer``, in order) and announce what can be announced now."""
        actions: list[Action] = []
        for m in messages:
            if m.peer == self.rank or m.peer not in self._out:
                raise ValueError(f"rank {self.rank}: message to rank {m.peer}, peers are {self.peers}")
            self._out[m.peer].append(m)
        for p in dict.fromkeys(m.peer for m in messages):
            actions += self._announce(p)
        return actions

    def _announce(self, peer: int) -> list[Action]:
        actions = []
        while self._active[peer] is None and self._out[peer]:
            m = self._out[peer][0]
            if m.numel and self.sends_used >= self.send_slots:
                if peer not in self._wants_send:
                    self._wants_send.append(peer)
                break
            self._out[peer].popleft()
            actions.append(self._header(peer, MSG, m.kind, m.step, m.version, m.extra, m.numel))
            if m.numel:
                self.sends_used += 1
                self._active[peer] = Transfer(m, outgoing=True)
        return actions

    def _header(self, peer: int, typ: int, *words: int) -> Action:
        w = [typ, *words]
        return Action("header", peer, w + [0] * (HEADER_WORDS - len(w)))

    # ------------------------------------------------------------------ incoming
    def on_header(self, peer: int, words: list[int]) -> list[Action]:
        """A header from ``peer`` arrived."""
        typ = int(words[0])
        if typ == MSG:
            _, kind, step, version, extra, numel = (int(w) for w in words[:6])
            t = Transfer(Message(peer, kind, step, version, extra), outgoing=False, complete=numel == 0)
            self._inbound[peer].append(t)
            if numel:
                t.message.payload = numel  # the size until a buffer is allocated
                self._wants_recv.append(t)
                return self._reserve_receives()
            self._deliver(peer)
            return []
        if typ == CTS:
            t = self._active[peer]
            if t is None or t.complete:
                raise RuntimeError(f"rank {self.rank}: clear-to-send from rank {peer} with nothing announced to it")
            if self.rank < peer:  # lo orders the pair: GO, then post
                return [self._header(peer, GO), self._post("send", t)]
            return [self._post("send", t)]  # hi: lo has posted its receive already
        if typ == GO:
            t = self._awaiting_go.pop(peer, None)
            if t is None:
                raise RuntimeError(f"rank {self.rank}: GO from rank {peer} for no reserved transfer")
            return [self._post("recv", t)]
        if typ == BYE:
            self.byes_received.add(peer)
            return []
        raise RuntimeError(f"rank {self.rank}: header of unknown type {typ} from rank {peer}: {words}")

    def _reserve_receives(self) -> list[Action]:
        actions: list[Action] = []
        while self._wants_recv and self.recvs_used < self.recv_slots:
            t = self._wants_recv.popleft()
            self.recvs_used += 1
            t.message.payload = self.alloc(int(t.message.payload))
            if self.rank < t.peer:  # lo: CTS, then post the receive (hi posts its send on the CTS)
                actions += [self._header(t.peer, CTS), self._post("recv", t)]
            else:  # hi: CTS, post on lo's GO
                self._awaiting_go[t.peer] = t
                actions.append(self._header(t.peer, CTS))
        return actions

    def _post(self, kind: str, t: Transfer) -> Action:
        return Action(kind, t.peer, transfer=t)

    def _deliver(self, peer: int) -> None:
        q = self._inbound[peer]
        while q and q[0].complete:
            self.delivered.append(q.popleft().message)

    # ------------------------------------------------------------------ completions
    def on_complete(self, t: Transfer) -> list[Action]:
        """The payload operation of ``t`` completed on this rank."""
        if t.complete:
            raise RuntimeError(f"rank {self.rank}: transfer with rank {t.peer} completed twice")
        t.complete = True
        if t.outgoing:
            self.sends_used -= 1
            self._active[t.peer] = None
            actions = self._announce(t.peer)
            waiting, self._wants_send = self._wants_send, deque()
            for p in waiting:
                actions += self._announce(p)
            return actions
        self.recvs_used -= 1
        self._deliver(t.peer)
        return self._reserve_receives()

    def take_delivered(self) -> list[Message]:
        out = list(self.delivered)
        self.delivered.clear()
        return out

    # ------------------------------------------------------------------ state
    @property
    def idle(self) -> bool:
        """Nothing queued, announced or in transfer, in either direction."""
        return (
            not any(self._out.values())
            and all(t is None for t in self._active.values())
            and not self._wants_recv
            and not self._awaiting_go
            and not any(self._inbound.values())
            and self.sends_used == 0
            and self.recvs_used == 0
        )

    def bye(self) -> list[Action]:
        """The last header to every peer: this rank sends nothing more (its header receiver ends after every peer's)."""
        return [self._header(p, BYE) for p in self.peers]

    @property
    def all_byes(self) -> bool:
        return len(self.byes_received) == len(self.peers)
