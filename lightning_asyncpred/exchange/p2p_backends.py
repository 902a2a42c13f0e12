"""The p2p transport's device adapters: every interaction with torch.distributed and CUDA lives here (pure torch).

The protocol (``p2p_protocol.py``) and the data plane (``p2p_dataplane.py``) are the same for Gloo and NCCL; a
backend does what they ask, through :class:`TorchAPI` (one torch call per method; ``tests/nccl_emulator.py``
provides the same methods over an emulated GPU, so the code below runs there unchanged):

- **Groups.** One Gloo group for the headers (any-source receive; created with a long timeout: an idle phase is
  not a failure, liveness is the heartbeat monitor's business) and one 2-rank group per pair for the payloads
  (NCCL on CUDA, Gloo on CPU; every rank makes every ``new_group`` call in one global order, as torch requires, and
  a pair's creation only waits for its two members): ``N`` groups per rank, ``N - 1`` NCCL communicators. All are created when the communication thread
  starts, warmed up pair by pair in that same global order (an NCCL communicator's creation is a blocking
  handshake), and destroyed by :meth:`Backend.close` after a clean end.
- **Completion.** Gloo: ``Work.is_completed()`` stays false until ``wait()``, so a waiter thread per channel
  blocks in ``wait()`` and reports to the communication thread's queue. NCCL: a payload operation's completion
  is ``Work.is_completed()``, a CUDA event query, polled by the communication thread while operations are
  posted (never ``get_future()``: for GPU work it completes when the operation is *enqueued*).
- **Streams (NCCL).** The communication thread runs on its own stream (a new thread's current stream would be the
  default one, the training stream), so ProcessGroupNCCL's operations wait on it and not on training. Events in
  both directions: a submitted gradient is read there only after an event recorded on the training stream
  (:meth:`NCCLBackend.adopt`), and the training stream waits on an event of the communication stream before it
  reads parameters that arrived (:meth:`NCCLBackend.hand_over`). Tensors that cross are ``record_stream``-ed so
  the caching allocator does not reuse them early. No host ever reads device memory: headers are CPU tensors.
"""

from __future__ import annotations

import queue
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_asyncpred.exchange.p2p_dataplane import HEADER_WORDS, Action, Transfer

_STOP = object()
HEADER_TIMEOUT = timedelta(days=7)  # the header receive is always posted; heartbeats decide liveness


class TorchAPI:
    """The primitives the backends use, each one torch call (the emulator in tests/ implements the same)."""

    def __init__(self, device: Any) -> None:
        self.device = torch.device(device)

    # torch.distributed
    def new_group(self, ranks: list[int], backend: str, timeout: timedelta) -> Any:
        """Every rank calls it for every group, in the same order (a non-member gets a placeholder)."""
        return dist.new_group(ranks=ranks, backend=backend, timeout=timeout)

    def destroy_group(self, group: Any) -> None:
        dist.destroy_process_group(group)

    def isend(self, tensor: Tensor, dst: int, group: Any) -> Any:
        return dist.isend(tensor, dst=dst, group=group)

    def irecv(self, tensor: Tensor, src: Optional[int], group: Any) -> Any:
        return dist.irecv(tensor, src=src, group=group)

    # torch.cuda
    def new_stream(self) -> Any:
        return torch.cuda.Stream(self.device)

    def current_stream(self) -> Any:
        return torch.cuda.current_stream(self.device)

    def set_stream(self, stream: Any) -> None:
        torch.cuda.set_stream(stream)

    def new_event(self) -> Any:
        return torch.cuda.Event()

    def launch(self, fn: Callable[[], Any]) -> None:
        """Device work in stream order: on a GPU, torch queues ``fn``'s kernels on the current stream as it runs."""
        fn()

    def record_stream(self, tensor: Tensor, stream: Any) -> None:
        tensor.record_stream(stream)


class _Waiters:
    """Gloo: one thread per key blocks in ``wait()`` on each Work in turn and reports it (it does nothing else)."""

    def __init__(self, report: Callable[..., None]) -> None:
        self.report = report
        self.queues: dict[Any, queue.Queue] = {}
        self.threads: list[threading.Thread] = []

    def watch(self, key: Any, work: Any, timeout: Optional[timedelta], on_done: Optional[tuple]) -> None:
        if key not in self.queues:
            self.queues[key] = q = queue.Queue()
            t = threading.Thread(target=self._loop, args=(q,), name=f"asyncpred-p2p-wait-{key}", daemon=True)
            t.start()
            self.threads.append(t)
        self.queues[key].put((work, timeout, on_done))

    def _loop(self, q: queue.Queue) -> None:
        while True:
            item = q.get()
            if item is _STOP:
                return
            work, timeout, on_done = item
            try:
                work.wait() if timeout is None else work.wait(timeout)
            except BaseException as exc:  # noqa: BLE001 - reported to the communication thread
                self.report("failed", exc)
                return
            if on_done is not None:
                self.report(*on_done(work))

    def close(self, join_timeout: float) -> None:
        for q in self.queues.values():
            q.put(_STOP)
        for t in self.threads:
            t.join(join_timeout)


class Backend:
    """Gloo (CPU): headers and payloads over Gloo, completions from waiter threads.

    Args:
        api: :class:`TorchAPI` (or the emulator's).
        rank, world_size: this rank and the number of ranks of the exchange (its index among ``members``).
        like: a tensor on the payloads' device and dtype (buffers are ``like.new_empty(n)``).
        report: ``report(kind, *args)`` puts an event on the communication thread's queue (``P2PExchange`` sets it).
        timeout: of the payload groups and of every wait on a payload or a header send.
        members: the global ranks of the exchange's ranks, ascending (default: ``0 .. world_size - 1``, every rank):
            an exchange among a subset of the processes (sync groups: the ranks with the same index in every group).
        member_sets: every exchange's ``members`` running at once, in one order shared by all processes (each
            creates every set's groups, as ``new_group`` requires; default: ``[members]``).
    """

    name = "gloo"
    payload_backend = "gloo"

    def __init__(self, api: Any, rank: int, world_size: int, like: Tensor, report: Callable[..., None], timeout: timedelta,
                 members: Optional[list[int]] = None, member_sets: Optional[list[list[int]]] = None) -> None:
        self.api, self.rank, self.world_size = api, rank, world_size
        self.like, self.report, self.timeout = like, report, timeout
        self.members = list(range(world_size)) if members is None else [int(m) for m in members]
        if len(self.members) != world_size or self.members != sorted(set(self.members)):
            raise ValueError(f"members must be {world_size} ascending distinct ranks, got {members!r}")
        self.member_sets = [self.members] if member_sets is None else [list(m) for m in member_sets]
        if self.members not in self.member_sets:
            raise ValueError(f"members {self.members} are not among member_sets {self.member_sets}")
        self.header_group: Any = None
        self.pairs: dict[int, Any] = {}
        self._waiters = _Waiters(lambda *event: self.report(*event))

    # ------------------------------------------------------------------ setup (communication thread)
    def start(self) -> None:
        """First call on the communication thread."""

    def connect(self) -> None:
        """For every member set in turn: its header group, then one payload group per pair (every process creates
        every group, in one global order, as ``new_group`` requires); then each of this rank's pairs warmed up in
        that order. Peers are indices into ``members``; torch gets their global ranks."""
        local = list(range(self.world_size))
        order = [(lo, hi) for lo in local for hi in local if lo < hi]
        for members in self.member_sets:
            mine = members == self.members
            header = self.api.new_group(members, "gloo", HEADER_TIMEOUT)
            if mine:
                self.header_group = header
            for lo, hi in ((a, b) for a in range(len(members)) for b in range(len(members)) if a < b):
                group = self.api.new_group([members[lo], members[hi]], self.payload_backend, self.timeout)
                if mine and self.rank in (lo, hi):
                    self.pairs[hi if self.rank == lo else lo] = group
        for lo, hi in (pair for pair in order if self.rank in pair):
            buf = self.alloc(1)
            if self.rank == lo:
                work = self.api.isend(buf, self.members[hi], self.pairs[hi])
            else:
                work = self.api.irecv(buf, self.members[lo], self.pairs[lo])
            self._complete(work)

    def _complete(self, work: Any) -> None:
        work.wait(self.timeout)

    def alloc(self, numel: int) -> Tensor:
        return self.like.new_empty(int(numel))

    # ------------------------------------------------------------------ headers
    def post_header_recv(self) -> None:
        buf = torch.zeros(HEADER_WORDS, dtype=torch.int64)
        work = self.api.irecv(buf, None, self.header_group)
        # the source's rank in the header group, whose ranks are the members in order: the peer's index
        self._waiters.watch("header-recv", work, None, lambda w: ("header", int(w._source_rank()), buf.tolist()))

    def send_header(self, peer: int, words: list[int]) -> None:
        work = self.api.isend(torch.tensor(words, dtype=torch.int64), self.members[peer], self.header_group)
        self._waiters.watch("header-send", work, self.timeout, None)

    # ------------------------------------------------------------------ payloads
    def post(self, action: Action) -> None:
        t = action.transfer
        assert t is not None
        group = self.pairs[action.peer]
        if action.kind == "send":
            work = self.api.isend(t.message.payload, self.members[action.peer], group)
        else:
            work = self.api.irecv(t.message.payload, self.members[action.peer], group)
        self._watch(work, t, action.kind)

    def _watch(self, work: Any, t: Transfer, kind: str) -> None:
        self._waiters.watch((kind, t.peer), work, self.timeout, lambda w: ("complete", t))

    def poll(self) -> list[Transfer]:
        """Transfers completed since the last call that no waiter reports (NCCL)."""
        return []

    def poll_interval(self) -> Optional[float]:
        """How long the communication thread may sleep on its queue (``None``: until an event arrives)."""
        return None

    # ------------------------------------------------------------------ streams (no-ops on the CPU)
    def launch(self, fn: Callable[[], Any]) -> None:
        """Device work in stream order (on the CPU: now)."""
        self.api.launch(fn)

    def snapshot(self, t: Tensor) -> Tensor:
        """A copy of ``t`` taken in stream order (after the work issued so far)."""
        out = t.new_empty(t.shape)
        self.launch(lambda: out.copy_(t))
        return out

    def produced(self) -> Any:
        """Main thread, after launching work whose results the communication thread reads: the event to wait on."""
        return None

    def adopt(self, event: Any, tensors: list[Tensor]) -> None:
        """Communication thread, before reading ``tensors`` that the main thread produced (``event``)."""

    def mark(self) -> Any:
        """Communication thread: an event after everything it issued so far."""
        return None

    def hand_over(self, event: Any, tensors: list[Tensor]) -> None:
        """Main thread, before reading ``tensors`` that the communication thread produced up to ``event``."""

    def synchronize(self) -> None:
        """Main thread: wait until the communication thread's device work is done (before reading owner state)."""

    # ------------------------------------------------------------------ teardown
    def close(self, clean: bool, join_timeout: float) -> None:
        """Stop the waiters; after a clean end (nothing posted, the header receiver ended) destroy the groups."""
        self._waiters.close(join_timeout)
        if clean:
            for group in [*self.pairs.values(), self.header_group]:
                if group is not None:
                    self.api.destroy_group(group)
            self.pairs, self.header_group = {}, None


class NCCLBackend(Backend):
    """NCCL (CUDA): payloads over NCCL on the communication stream, completions by event query, events both ways."""

    name = "nccl"
    payload_backend = "nccl"
    min_poll, max_poll = 50e-6, 2e-3  # seconds between event queries while operations are posted (backs off)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stream: Any = None
        self._posted: list[tuple[Any, Transfer]] = []
        self._interval = self.min_poll

    def start(self) -> None:
        self.stream = self.api.new_stream()
        self.api.set_stream(self.stream)  # this thread's operations wait on this stream, never on training

    def _complete(self, work: Any) -> None:
        deadline = time.monotonic() + self.timeout.total_seconds()
        delay = self.min_poll
        while not work.is_completed():
            if time.monotonic() > deadline:
                raise TimeoutError(f"an NCCL operation of the warm-up did not complete in {self.timeout.total_seconds():g}s")
            time.sleep(delay)
            delay = min(2 * delay, self.max_poll)

    def _watch(self, work: Any, t: Transfer, kind: str) -> None:
        self._posted.append((work, t))
        self._interval = self.min_poll

    def poll(self) -> list[Transfer]:
        done = [t for work, t in self._posted if work.is_completed()]
        if done:
            self._posted = [(w, t) for w, t in self._posted if t not in done]
            self._interval = self.min_poll
        else:
            self._interval = min(2 * self._interval, self.max_poll)
        return done

    def poll_interval(self) -> Optional[float]:
        return self._interval if self._posted else None

    def produced(self) -> Any:
        event = self.api.new_event()
        event.record(self.api.current_stream())
        return event

    def adopt(self, event: Any, tensors: list[Tensor]) -> None:
        self.stream.wait_event(event)
        for t in tensors:
            self.api.record_stream(t, self.stream)

    def mark(self) -> Any:
        event = self.api.new_event()
        event.record(self.stream)
        return event

    def hand_over(self, event: Any, tensors: list[Tensor]) -> None:
        current = self.api.current_stream()
        if event is not None:  # None: made on this thread (the final gather)
            current.wait_event(event)
        for t in tensors:
            self.api.record_stream(t, current)

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()


def check_backend(device: torch.device, backend: Any) -> None:
    """Refuse a ``process_group_backend`` the data plane cannot use on ``device``: it is NCCL on CUDA (Gloo's
    point-to-point on CUDA tensors has no usable completion) and Gloo on the CPU."""
    kind = torch.device(device).type
    name = str(backend).lower() if backend is not None else None
    if kind == "cuda" and name != "nccl":
        raise ValueError(
            f"process_group_backend={backend!r} with the p2p transport on CUDA: its data plane needs NCCL on GPUs "
            "(Gloo's point-to-point on CUDA tensors cannot be completed without blocking); use "
            "process_group_backend='nccl' (the default on CUDA) or transport='allreduce'"
        )
    if kind != "cuda" and name not in (None, "gloo"):
        raise ValueError(
            f"process_group_backend={backend!r} with the p2p transport on {kind}: its data plane uses Gloo off GPUs; "
            "use process_group_backend='gloo' (the default on CPU) or None"
        )


def make_backend(device: torch.device, *args: Any, **kwargs: Any) -> Backend:
    """NCCL on CUDA, Gloo otherwise (:func:`check_backend` refuses other combinations)."""
    cls = NCCLBackend if torch.device(device).type == "cuda" else Backend
    return cls(TorchAPI(device), *args, **kwargs)
