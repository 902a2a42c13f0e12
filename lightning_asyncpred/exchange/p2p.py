"""The point-to-point transport: the protocol of ``p2p_protocol.py`` over torch.distributed (pure torch).

Threads. One communication thread per rank drives the :class:`~.p2p_protocol.Engine`: it issues every
data-plane operation (NCCL must not be driven from two threads) and runs the owner's optimizer steps. The main
thread only hands it work (submit, finish) and reads its results under a lock; it waits only when this worker
has more than ``max_staleness`` steps in flight, at the end of fit and for checkpoints, always with the
timeout. Lightning's control collectives run on the default process group, which this transport never uses.

Channels. One 2-rank process group per ordered pair of ranks (``dist.new_group`` called by every rank in the
same order), warmed up at setup (a communicator's creation is a blocking handshake). NCCL on CUDA, Gloo on CPU.

Backend adapters, the only difference between NCCL and Gloo: how the completion of an operation is noticed.
Gloo's ``Work.is_completed()`` stays false until ``wait()``, so a waiter thread per channel blocks in ``wait()``
(it does nothing else) and reports the completion; NCCL's Work future calls back when the operation is done.
The communication thread sleeps on a queue: no core is spent spinning.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_asyncpred.exchange.allreduce import PeerLostError, PeerMonitor, describe_peer_failure, to_timedelta
from lightning_asyncpred.exchange.base import Exchange, ReadyGradient
from lightning_asyncpred.exchange.owner import ShardOwner
from lightning_asyncpred.exchange.p2p_protocol import Engine, Op

log = logging.getLogger(__name__)

_STOP = object()


# ---------------------------------------------------------------------------------------------- channels
def build_channels(world_size: int, backend: str, timeout: timedelta) -> dict[tuple[int, int], Any]:
    """One process group per ordered pair ``(src, dst)``; every rank must call this, in the same order."""
    channels = {}
    for src in range(world_size):
        for dst in range(world_size):
            if src != dst:
                channels[(src, dst)] = dist.new_group(ranks=[src, dst], backend=backend, timeout=timeout)
    return channels


def warm_up(channels: dict[tuple[int, int], Any], rank: int, device: torch.device, timeout: timedelta) -> None:
    """One message over every channel this rank is on (creates NCCL communicators now, not mid-training)."""
    works = []
    for (src, dst), group in channels.items():
        if rank == src:
            works.append(dist.isend(torch.ones(1, device=device), dst=dst, group=group))
        elif rank == dst:
            works.append(dist.irecv(torch.zeros(1, device=device), src=src, group=group))
    for work in works:
        work.wait(timeout) if device.type == "cpu" else work.wait()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _GlooCompletions:
    """Gloo: a waiter thread per channel blocks in ``wait()`` and reports each completion."""

    def __init__(self, notify: Callable[[Op, Optional[BaseException]], None], timeout: timedelta) -> None:
        self.notify, self.timeout = notify, timeout
        self.queues: dict[tuple[str, int], queue.Queue] = {}
        self.threads: list[threading.Thread] = []

    def watch(self, op: Op, work: Any) -> None:
        key = (op.kind, op.peer)
        if key not in self.queues:
            self.queues[key] = q = queue.Queue()
            t = threading.Thread(target=self._wait_loop, args=(q,), name=f"asyncpred-p2p-{op.kind}-{op.peer}", daemon=True)
            t.start()
            self.threads.append(t)
        self.queues[key].put((op, work))

    def _wait_loop(self, q: queue.Queue) -> None:
        while True:
            item = q.get()
            if item is _STOP:
                return
            op, work = item
            try:
                work.wait(self.timeout)
                self.notify(op, None)
            except BaseException as exc:  # noqa: BLE001 - reported to the communication thread
                self.notify(op, exc)
                return

    def finalize(self, op: Op) -> None:
        """Called on the communication thread before the engine reads ``op.buffer`` (Gloo: nothing to do)."""

    def close(self, join_timeout: float) -> None:
        for q in self.queues.values():
            q.put(_STOP)
        for t in self.threads:
            t.join(join_timeout)


class _NCCLCompletions:
    """NCCL: the Work's future calls back when the operation has completed on the GPU; before the engine reads
    a received buffer, the communication thread's stream waits on the operation (``Work.wait()``, no CPU block).
    Not run multi-rank here (one GPU per machine): see ``benchmarks/GPU_CHECKS.md``."""

    def __init__(self, notify: Callable[[Op, Optional[BaseException]], None], timeout: timedelta) -> None:
        self.notify = notify
        self.works: dict[int, Any] = {}

    def watch(self, op: Op, work: Any) -> None:
        self.works[id(op)] = work

        def done(fut: Any) -> None:
            try:
                fut.value()  # raises if the operation failed
                self.notify(op, None)
            except BaseException as exc:  # noqa: BLE001
                self.notify(op, exc)

        work.get_future().add_done_callback(done)

    def finalize(self, op: Op) -> None:
        work = self.works.pop(id(op), None)
        if work is not None:
            work.wait()  # the current stream waits for the operation; the CPU does not block

    def close(self, join_timeout: float) -> None:
        self.works.clear()


# ---------------------------------------------------------------------------------------------- the exchange
class P2PExchange(Exchange):
    """Asynchronous exchange with sharded owners (see the module docstring and ``p2p_protocol.py``).

    ``submit(step, shards)`` takes the local gradient as one flat tensor per shard (``GradientBuckets.from_groups``
    with the shards as groups). ``ready()`` returns one result per step of this worker whose every shard has been
    applied (its ``staleness``: the largest over the shards, in owner updates). The new parameters come from
    :meth:`take_parameters`: the masters that answered this worker's latest complete step (every shard just
    after applying that step's gradient), to install between steps.

    Args:
        max_staleness: the most steps of this worker in flight (submitted, not yet answered by every owner).
        owner: this rank's :class:`ShardOwner`.
        shard_numels: elements of every shard.
        channels: from :func:`build_channels` (``None`` with a world of one).
        control_group: process group for the final gather and checkpoints (the default group).
        timeout: the longest any wait on a peer may last.
        monitor: names lost ranks in errors.
    """

    name = "p2p"
    returns = "parameters"

    def __init__(
        self,
        max_staleness: int,
        owner: ShardOwner,
        shard_numels: Sequence[int],
        rank: int,
        world_size: int,
        channels: Optional[dict[tuple[int, int], Any]] = None,
        control_group: Optional[Any] = None,
        timeout: Any = timedelta(minutes=30),
        monitor: Optional[PeerMonitor] = None,
    ) -> None:
        super().__init__(max_staleness)
        self.owner = owner
        self.rank, self.world_size = int(rank), int(world_size)
        self.timeout = to_timedelta(timeout)
        self.monitor = monitor
        self.channels = channels or {}
        self.control_group = control_group
        self.shard_numels = list(shard_numels)
        self.engine = Engine(self.rank, self.world_size, self.shard_numels, owner.flat.dtype, owner.flat.device, owner.apply)
        self.device = owner.flat.device
        self.versions = [0] * self.world_size  # shard versions installed in this worker's replica
        # the replies of a step are installed together once the step is complete: every refresh of the replica is
        # coherent (each shard just after this worker's gradient), so its velocity is a steady per-step quantity
        self._step_replies: dict[int, dict[int, tuple[int, Tensor]]] = {}
        self._pending: dict[int, tuple[int, Tensor]] = {}  # shard -> (version, params) not yet taken
        self.refreshes = 0  # take_parameters() calls that returned something (the worker's parameter refreshes)
        self._refresh_at_submit: dict[int, int] = {}
        self._delays: list[int] = []
        self._cond = threading.Condition()
        self._events: queue.Queue = queue.Queue()
        self._failure: Optional[BaseException] = None
        self._processed = 0  # main-thread requests handled by the communication thread
        self._posted = 0
        self._quiesced_at = -1
        self.wait_seconds = 0.0
        completions = _NCCLCompletions if self.device.type == "cuda" else _GlooCompletions
        self._completions = completions(self._notify, self.timeout)
        self._thread = threading.Thread(target=self._run, name=f"asyncpred-p2p-{self.rank}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ communication thread
    def _notify(self, op: Op, exc: Optional[BaseException]) -> None:
        self._events.put(("failed", op, exc) if exc is not None else ("done", op, None))

    def _issue(self, ops: list[Op]) -> None:
        for op in ops:
            group = self.channels[op.channel]
            if op.kind == "send":
                work = dist.isend(op.buffer, dst=op.peer, group=group)
            else:
                work = dist.irecv(op.buffer, src=op.peer, group=group)
            self._completions.watch(op, work)

    def _run(self) -> None:
        try:
            with self._cond:
                ops = self.engine.start()
            self._issue(ops)
            while True:
                kind, arg, extra = self._events.get()
                if kind == "stop":
                    return
                with self._cond:
                    if kind == "done":
                        self._completions.finalize(arg)
                        ops = self.engine.on_complete(arg)
                    elif kind == "failed":
                        raise extra
                    elif kind == "submit":
                        ops = self.engine.submit(*arg)
                        self._processed += 1
                    elif kind == "finish":
                        ops = self.engine.finish()
                        self._processed += 1
                    self._cond.notify_all()
                self._issue(ops)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which names the peer
            with self._cond:
                self._failure = exc
                self._cond.notify_all()

    def _post(self, kind: str, arg: Any = None) -> int:
        self._posted += 1
        self._events.put((kind, arg, None))
        return self._posted

    def _wait_for(self, predicate: Callable[[], bool], what: str, seconds: Optional[float] = None) -> None:
        """Block until ``predicate()`` holds under the lock, at most ``seconds`` (default: the timeout); a failure or
        the deadline raises a :class:`PeerLostError` naming the peers waited for."""
        seconds = self.timeout.total_seconds() if seconds is None else seconds
        deadline = time.monotonic() + seconds
        t0 = time.perf_counter()
        with self._cond:
            while not predicate():
                if self._failure is not None:
                    raise self._peer_error(self._failure, what)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._peer_error(TimeoutError(f"no progress in {seconds:g}s"), what)
                self._cond.wait(left)
        self.wait_seconds += time.perf_counter() - t0

    def _peer_error(self, cause: BaseException, what: str) -> PeerLostError:
        err = describe_peer_failure(cause, self.monitor, self.rank, what, self.timeout)
        if not err.lost_ranks:
            missing = self.engine.missing()
            if missing:
                return PeerLostError(
                    f"rank {self.rank}: no answer from rank {', '.join(map(str, missing))} during {what} "
                    f"(timeout {self.timeout.total_seconds():g}s): {type(cause).__name__}: {cause}",
                    missing,
                )
        return err

    # ------------------------------------------------------------------ the contract
    @property
    def expected_staleness(self) -> float:
        """Expected delay, in this worker's parameter refreshes, between computing a gradient and installing the
        parameters that include it (the unit ``LinearPrediction`` observes); ``max_staleness`` before any."""
        recent = self._delays[-50:]
        return sum(recent) / len(recent) if recent else float(self.max_staleness)

    def _submit(self, step: int, buckets: list[Tensor]) -> None:
        if self._failure is not None:
            raise self._peer_error(self._failure, f"the submission of step {step}")
        # g / N, as the all-reduce transport applies the mean: N workers' gradients per round move the masters as
        # one ddp step would, so the learning rate means what it means under ddp
        grads = [b.detach().to(self.device, copy=True).div_(self.world_size) for b in buckets]
        self._refresh_at_submit[step] = self.refreshes
        seq = self._post("submit", (step, grads, list(self.versions)))
        self._wait_for(lambda: self._processed >= seq and self.engine.in_flight <= self.max_staleness,
                       f"step {step} ({self.max_staleness} steps in flight)")

    def _completed(self) -> list[ReadyGradient]:
        out = []
        with self._cond:
            replies = self.engine.take_replies()
            done, self.engine.completed_steps = self.engine.completed_steps, []
        for r in replies:
            self._step_replies.setdefault(r.step, {})[r.shard] = (r.version, r.params)
        for step, staleness in done:  # steps complete in order (each owner answers a worker's requests in order)
            for k, (version, params) in self._step_replies.pop(step).items():
                if version > self.versions[k] and version > self._pending.get(k, (-1, None))[0]:
                    self._pending[k] = (version, params)
            # the replies are installed at the next refresh (take_parameters), number refreshes + 1
            self._delays.append(self.refreshes + 1 - self._refresh_at_submit.pop(step, self.refreshes))
            out.append(ReadyGradient(step, max(staleness), len(staleness), []))
        return out

    def _ready(self) -> list[ReadyGradient]:
        return self._completed()

    def take_parameters(self) -> dict[int, Tensor]:
        """The newest master of every shard received since the last call (flat, per shard), to install now."""
        out = {k: params for k, (version, params) in self._pending.items()}
        for k, (version, _) in self._pending.items():
            self.versions[k] = version
        self._pending = {}
        if out:
            self.refreshes += 1
        return out

    def finish(self, seconds: Optional[float] = None) -> None:
        """This worker has finished its steps: tell every owner and serve until every rank has finished (at most
        ``seconds``, default the timeout)."""
        if not self.engine.finished:
            self._post("finish")
        self._wait_for(lambda: self.engine.done, "the end of training (waiting for every rank to finish)", seconds)

    def stop_gracefully(self, grace: float = 10.0) -> None:
        """SIGTERM: FIN to every owner and serve the peers for up to ``grace`` seconds while they stop too (no
        final gather: the run ends); then close."""
        if self.closed:
            return
        try:
            self.finish(min(grace, self.timeout.total_seconds()))
        except PeerLostError as err:
            log.warning("rank %d: stopping while ranks %s have not finished (%s)", self.rank, err.lost_ranks, err)
        self.close()

    def _drain(self) -> list[ReadyGradient]:
        self.finish()
        out = self._completed()
        self._stop_thread()
        self._gather_masters()
        return out

    def _gather_masters(self) -> None:
        """Every owner's final master into ``take_parameters()``."""
        for k, (version, params) in enumerate(self._gather()):
            self._pending[k] = (version, params)

    def _gather(self) -> list[tuple[int, Tensor]]:
        """``(version, flat master)`` of every owner, on every rank (a collective on the control group)."""
        if self.world_size == 1:
            return [(self.engine.version, self.owner.flat.detach().clone())]
        size = max(self.shard_numels)
        mine = torch.zeros(size + 1, dtype=torch.float64, device=self._control_device())
        mine[: self.owner.flat.numel()] = self.owner.flat.detach().to(mine)
        mine[-1] = self.engine.version
        gathered = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine, group=self.control_group)
        return [
            (int(t[-1].item()), t[: self.shard_numels[k]].to(self.owner.flat.dtype).to(self.device))
            for k, t in enumerate(gathered)
        ]

    # ------------------------------------------------------------------ checkpoints
    def quiesce(self) -> None:
        """For a consistent snapshot: wait until every gradient this worker submitted has been applied by its
        owner, then until every rank has done so (a barrier on the control group). Nothing is in flight anywhere
        afterwards as long as no rank submits: every rank is inside the same checkpoint."""
        if self._quiesced_at == self._posted:  # nothing submitted since the last quiesce (same checkpoint)
            return
        self._wait_for(lambda: self._processed >= self._posted and self.engine.in_flight == 0, "a checkpoint")
        if self.world_size > 1:
            dist.barrier(group=self.control_group)
        self._quiesced_at = self._posted

    def gather_masters(self) -> list[Tensor]:
        """Every owner's master shard (flat, per shard), on every rank (a collective on the control group)."""
        return [params for _, params in self._gather()]

    def gather_optimizer_states(self) -> dict[int, dict[str, Any]]:
        """Every owner's optimizer state, keyed by parameter index (a collective on the control group)."""
        mine = self.owner.state_dict()
        if self.world_size == 1:
            return mine
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, mine, group=self.control_group)
        return {i: state for part in gathered for i, state in part.items()}

    def state_dict(self) -> dict[str, Any]:
        """After :meth:`quiesce` nothing is in flight: counters and statistics only (every submitted step counts
        as applied: its owners have applied it)."""
        if self.closed:
            raise RuntimeError(f"{type(self).__name__}.state_dict() after close()")
        return {"transport": self.name, "submitted": self.submitted, "applied": self.submitted,
                "staleness": self.stats.state_dict(), "in_flight": {}}

    def _load_state_dict(self, state: Any, place: Any) -> int:
        return 0

    def _control_device(self) -> torch.device:
        backend = str(dist.get_backend(self.control_group)).lower()
        return self.device if "nccl" in backend else torch.device("cpu")

    def _stop_thread(self) -> None:
        if self._thread.is_alive():
            self._events.put(("stop", None, None))
            self._thread.join(self.timeout.total_seconds())
        self._completions.close(join_timeout=2.0)

    def _close(self) -> None:
        """Abandon what is in flight (peers may be gone); the threads are daemons and never block the exit."""
        self._events.put(("stop", None, None))
        self._thread.join(2.0)
        self._completions.close(join_timeout=0.1)

    @property
    def in_flight_steps(self) -> int:
        with self._cond:
            return self.engine.in_flight
