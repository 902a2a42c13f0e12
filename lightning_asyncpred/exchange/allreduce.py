"""Stale-synchronous transport: one ``all_reduce(async_op=True)`` per gradient bucket (pure torch, no Lightning).

Every rank submits its local gradient ``g_t^{(r)}`` at every step ``t``; the exchange issues
``all_reduce(g_t^{(r)} / N)`` on each flat bucket without waiting, so the reduction of step ``t`` runs
in the background while the ranks compute steps ``t + 1, t + 2, ...``. Collectives are issued in program
order on every rank, so they are safe beside Lightning's own collectives on the same process group.

Modes:

- ``fixed``: the mean gradient ``(1/N) sum_r g_t^{(r)}`` submitted at step ``t`` is handed out at step
  ``t + s`` (``s = max_staleness``), i.e. step ``t`` applies the reduction of step ``t - s`` and the first
  ``s`` steps apply nothing. Every result has staleness exactly ``s``, every rank applies the same
  reductions at the same steps, so replicas stay bit-identical. ``s = 0`` is synchronous SGD.
- ``eager``: a reduction is handed out as soon as it has completed (polled with ``Work.is_completed()``),
  and at the latest ``s`` steps after its submission (the bound). Only where completion can be polled
  (NCCL): Gloo's ``Work.is_completed()`` stays ``False`` until ``wait()``, so Gloo only runs ``fixed``.
  Replicas may differ slightly in eager mode (ranks may apply a reduction at different steps).

Every wait on a peer is bounded. Gloo: ``Work.wait(timeout)`` blocks the CPU; when it fails or times out,
:class:`PeerMonitor` (one heartbeat counter per rank in the c10d store, bumped by a daemon thread) finds
which ranks stopped beating, and a :class:`PeerLostError` naming them is raised. NCCL: ``Work.wait()``
without a timeout only makes the current CUDA stream wait (with a timeout it would block the CPU until the
reduction finished, so the CPU could no longer run ahead of the GPU); the wait is then bounded by the
process group's timeout, whose NCCL watchdog ends the process ("Watchdog caught collective operation
timeout ... taking the entire process down"), and, sooner, by :meth:`PeerMonitor.watch`, which ends the
process with a :class:`PeerLostError` naming the rank whose heartbeat stopped (see ``AsyncPredStrategy``).
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Optional, Sequence, Union

import torch.distributed as dist
from torch import Tensor

from lightning_asyncpred.exchange.base import Exchange, ReadyGradient, saved_gradient
from lightning_asyncpred.staleness import BoundedStalenessQueue, Released

log = logging.getLogger(__name__)

MODES = ("fixed", "eager")
TimeoutSpec = Union[timedelta, int, float]


def check_mode(mode: Any, backend: Optional[str] = None) -> str:
    """Validate an allreduce ``mode`` (and, when known, that ``backend`` supports it). Returns the mode."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"unknown allreduce mode {mode!r}; allowed: {', '.join(repr(m) for m in MODES)}")
    # pollable: NCCL's Work.is_completed() and Horovod's hvd.poll (also with its Gloo CPU operations)
    if mode == "eager" and backend is not None and not any(b in str(backend).lower() for b in ("nccl", "horovod")):
        raise ValueError(
            f"mode='eager' needs a backend whose Work completion can be polled (NCCL), but the process group "
            f"backend is {backend!r}: Gloo reports completion only after wait(). Use mode='fixed' with {backend!r}"
        )
    return mode


def to_timedelta(timeout: TimeoutSpec, what: str = "timeout") -> timedelta:
    """``timeout`` as a positive ``timedelta`` (numbers are seconds)."""
    if isinstance(timeout, timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise ValueError(f"{what} must be a number of seconds > 0 or a datetime.timedelta, got {timeout!r}")
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError(f"{what} must be a number of seconds > 0 or a datetime.timedelta, got {timeout!r}")
    return timedelta(seconds=seconds)


class PeerLostError(RuntimeError):
    """A peer rank stopped responding (killed, crashed or hung). ``lost_ranks`` names it/them."""

    def __init__(self, message: str, lost_ranks: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.lost_ranks = list(lost_ranks)


class PeerMonitor:
    """Liveness of the ranks through heartbeat counters in the c10d store.

    A daemon thread adds 1 to the key ``<prefix><rank>`` every ``interval`` seconds (``store.add`` never
    blocks on a missing key). :meth:`lost_ranks` reads every counter twice, ``probe`` seconds apart: a rank
    whose counter did not move is lost. If the store itself is unreachable, the rank that hosts it is
    reported (rank 0 with Lightning's launchers; torchrun's agent hosts it outside the workers).
    """

    def __init__(
        self,
        store: Any,
        rank: int,
        world_size: int,
        interval: float = 1.0,
        prefix: str = "asyncpred/heartbeat/",
        store_host_rank: Optional[int] = 0,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"heartbeat interval must be > 0 seconds, got {interval!r}")
        self.store = store
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.interval = float(interval)
        self.prefix = prefix
        self.store_host_rank = store_host_rank
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._watchdog: Optional[threading.Thread] = None

    def _key(self, rank: int) -> str:
        return f"{self.prefix}{rank}"

    def start(self) -> None:
        if self._thread is not None:
            return
        self.store.add(self._key(self.rank), 1)
        self._thread = threading.Thread(target=self._beat, name=f"asyncpred-heartbeat-{self.rank}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.store.add(self._key(self.rank), 1)
            except Exception:  # the store host is gone: nothing left to report to
                return

    def stop(self) -> None:
        self._stop.set()
        for thread in (self._thread, self._watchdog):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=2 * self.interval + 1)
        self._thread = self._watchdog = None

    def read(self) -> list[int]:
        return [int(self.store.add(self._key(r), 0)) for r in range(self.world_size)]

    def watch(self, on_lost: Callable[[list[int], float], None], lost_after: float) -> None:
        """Call ``on_lost(ranks, seconds)`` once, from a daemon thread, when the heartbeats of ``ranks`` have not
        moved for ``lost_after`` seconds (the store's host when the store stops answering). For backends whose
        waits do not block the CPU (NCCL), where no wait on the main thread can notice a lost peer."""
        if not lost_after > 0:
            raise ValueError(f"lost_after must be > 0 seconds, got {lost_after!r}")

        def run() -> None:
            now = time.monotonic()
            seen: dict[int, tuple[int, float]] = {}
            store_ok = now
            while not self._stop.wait(self.interval):
                now = time.monotonic()
                try:
                    counts = self.read()
                    store_ok = now
                except Exception:
                    if now - store_ok >= lost_after and self.store_host_rank not in (None, self.rank):
                        on_lost([self.store_host_rank], now - store_ok)
                        return
                    continue
                for r, c in enumerate(counts):
                    if r != self.rank and seen.get(r, (None, 0.0))[0] != c:
                        seen[r] = (c, now)
                stalled = [r for r, (_, since) in sorted(seen.items()) if now - since >= lost_after]
                if stalled:
                    on_lost(stalled, max(now - seen[r][1] for r in stalled))
                    return

        self._watchdog = threading.Thread(target=run, name=f"asyncpred-watchdog-{self.rank}", daemon=True)
        self._watchdog.start()

    def lost_ranks(self, probe: Optional[float] = None) -> list[int]:
        """Ranks whose heartbeat did not advance during ``probe`` seconds (default ``2.5 * interval``)."""
        probe = 2.5 * self.interval if probe is None else probe
        try:
            before = self.read()
            time.sleep(probe)
            after = self.read()
        except Exception:
            host = self.store_host_rank
            return [host] if host is not None and host != self.rank else []
        return [r for r in range(self.world_size) if r != self.rank and after[r] == before[r]]


def describe_peer_failure(
    cause: BaseException, monitor: Optional[PeerMonitor], rank: int, what: str, timeout: timedelta
) -> PeerLostError:
    """A :class:`PeerLostError` for ``cause`` naming the ranks ``monitor`` finds lost."""
    lost = monitor.lost_ranks() if monitor is not None else []
    who = (
        f"lost rank {', '.join(str(r) for r in lost)}"
        if lost
        else "a peer did not respond (no rank stopped its heartbeat: a peer may be hung or slow)"
    )
    return PeerLostError(
        f"rank {rank}: {who} during {what} (timeout {timeout.total_seconds():g}s): {type(cause).__name__}: {cause}",
        lost,
    )


_Item = tuple[int, list[Tensor], list[Any]]  # (step, reduced buckets, works)


class AllReduceExchange(Exchange):
    """Stale-synchronous exchange over ``all_reduce(async_op=True)`` (see the module docstring).

    Args:
        max_staleness: ``s >= 0``: in ``fixed`` mode the exact staleness, in ``eager`` mode the bound.
        mode: ``"fixed"`` or ``"eager"`` (NCCL only).
        group: the process group (default: the default group).
        timeout: how long a wait on a reduction may block before the peers are declared lost.
        monitor: a started :class:`PeerMonitor` used to name lost ranks (optional).
    """

    name = "allreduce"

    def __init__(
        self,
        max_staleness: int,
        mode: str = "fixed",
        group: Optional[Any] = None,
        timeout: TimeoutSpec = timedelta(minutes=30),
        monitor: Optional[PeerMonitor] = None,
    ) -> None:
        super().__init__(max_staleness)
        self.timeout = to_timedelta(timeout)
        self.monitor = monitor
        self._connect(group, mode)
        self.queue: BoundedStalenessQueue = BoundedStalenessQueue(self.max_staleness)
        self.abandoned = 0
        self.wait_seconds = 0.0  # CPU time spent blocked on peers (NCCL: ~0, the stream waits instead)

    # ------------------------------------------------------- backend adapter (torch.distributed)
    def _connect(self, group: Optional[Any], mode: str) -> None:
        """Set ``rank``, ``world_size``, ``backend``, ``mode`` and ``blocks_cpu_on_wait`` for this backend."""
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("AllReduceExchange needs an initialized torch.distributed process group")
        self.group = group
        self.backend = str(dist.get_backend(group))
        self.mode = check_mode(mode, self.backend)
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        # NCCL: wait() lets the stream wait; wait(timeout) would block the CPU (see the module docstring)
        self.blocks_cpu_on_wait = "nccl" not in self.backend.lower()

    def _start(self, flat: Tensor, step: int, bucket: int) -> Any:
        """Start the in-place sum of ``flat`` over the ranks; returns a handle."""
        return dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)

    def _wait_handle(self, work: Any) -> None:
        if self.blocks_cpu_on_wait:
            work.wait(timeout=self.timeout)
        else:
            work.wait()

    def _is_done(self, work: Any) -> bool:
        return work.is_completed()

    # ----------------------------------------------------------------------- protocol
    @property
    def expected_staleness(self) -> float:
        if self.mode == "fixed":
            return float(self.max_staleness)
        return super().expected_staleness

    def _submit(self, step: int, buckets: list[Tensor]) -> None:
        reduced, works = [], []
        for k, b in enumerate(buckets):
            # a new buffer holding g / N: the caller's tensor is never reduced in place; the sum is the mean
            flat = b.detach().contiguous().div(self.world_size)
            if self.world_size > 1:
                works.append(self._start(flat, step, k))
            reduced.append(flat)
        # fixed: released exactly s submissions later; eager: at the latest then (earlier once completed)
        self.queue.submit((step, reduced, works), self.max_staleness)

    def _wait(self, item: _Item) -> None:
        t0 = time.perf_counter()
        for work in item[2]:
            try:
                self._wait_handle(work)
            except Exception as exc:  # timed out or a peer's connection broke
                raise describe_peer_failure(exc, self.monitor, self.rank, f"the all_reduce of step {item[0]}", self.timeout) from exc
        self.wait_seconds += time.perf_counter() - t0

    def _convert(self, released: list[Released]) -> list[ReadyGradient]:
        out = []
        for r in released:
            self._wait(r.item)
            out.append(ReadyGradient(r.item[0], r.staleness, self.world_size, r.item[1]))
        return out

    def _completed(self, item: _Item) -> bool:
        return all(self._is_done(w) for w in item[2])

    def _ready(self) -> list[ReadyGradient]:
        released = self.queue.ready()
        if self.mode == "eager":
            released += self.queue.release_while(self._completed)
        return self._convert(released)

    def _drain(self) -> list[ReadyGradient]:
        return self._convert(self.queue.drain())

    def _state_dict(self) -> dict:
        def complete(item: _Item) -> dict:
            self._wait(item)  # the reduction finishes; the result stays queued for its due step
            return saved_gradient(item[0], item[1])

        return {"queue": self.queue.state_dict(complete)}

    def _load_state_dict(self, state: dict, place) -> int:
        # restored reductions are complete: no Work to wait for (eager mode releases them at the next step)
        self.queue.load_state_dict(state["queue"], lambda e: (int(e["step"]), place(e["buckets"]), []))
        return self.queue.in_flight

    def _close(self) -> None:
        """Abandon what is in flight without waiting on peers (they may be gone)."""
        pending = self.queue.drain()
        self.abandoned += len(pending)
