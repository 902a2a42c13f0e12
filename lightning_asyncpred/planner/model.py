"""A discrete-event model of the transports as implemented, driven by a profile's step times (pure Python).

**Steps.** Every rank runs steps drawn from the profile (:meth:`Profile.step_parts`: one measured ``(compute,
data)`` pair of one measured rank, uniformly; a ``ddp`` profile's steps already waited for the slowest rank, so
there a model step is one measured step of every rank at once). A step is ``busy`` (the compute) then ``idle``
(the loader's wait, sleeps): ``busy = compute * f`` and ``idle = (data + base_delay) * f + Exp(delay)``, ``f`` the
speed model's factor (``exchange/virtual.py``'s :func:`~lightning_asyncpred.exchange.virtual.parse_speeds`:
``equal``, ``jitter:S``, ``straggler:K``: the last rank ``K`` times as long), the last rank's
``straggler_delay`` added to its idle part. The benchmarks' perturbations: ``benchmarks/straggler.py``'s
``jitter`` is ``delay = b + c``, its ``straggler`` is ``straggler_delay = b + c`` (it sleeps ``2 b + c``);
``benchmarks/throughput.py``'s jitter is ``delay = c``. The link costs ``latency + bytes / bandwidth`` per message
(``profile.Link``); a gradient is ``B = gradient_bytes``.

**Transports** (each rule is the transport's own, called here, not restated):

* ``ddp``: every step waits for the slowest rank, then a ring all-reduce of ``B``
  (``2 (N - 1) (latency + B / (N bandwidth))``; in a ``ddp`` profile's steps already); no staleness.
* ``allreduce`` (``fixed``/``eager``, ``s``): rank ``r`` computes step ``t`` until ``C[r][t]``; the reduction of
  step ``t`` starts once every rank submitted it and the reduction before it ended (collectives run in order) and
  takes ``reduction_seconds`` (fitted to an allreduce profile's rate, else the link's ring all-reduce). Which
  reductions a rank must have before it goes on is the transport's
  :class:`~lightning_asyncpred.staleness.BoundedStalenessQueue` (``submit`` with delay ``s``; in ``eager`` mode
  also ``release_while`` the reduction has ended): the rank waits for the end of every reduction the queue
  releases, and the queue's staleness is the staleness. On a CPU host a reduction's time is also CPU time of every
  rank's next step, less what the step's idle part (sleeps, the loader's wait) absorbs.
* ``p2p`` (``s``): at its submission a worker's own shard is applied at once (``Engine.submit``) and its
  communication thread sends the ``N - 1`` other request shards (``B / N`` each: ``(N - 1) m`` of the thread, then
  the link); the other owners apply it when it arrives (one arrival time: the network is symmetric). Every owner
  counts its own updates, and a worker installs, before each step, the newest version of each owner it has been
  answered; an arrival's staleness at owner ``k`` is
  :func:`~lightning_asyncpred.exchange.p2p_protocol.arrival_staleness` of owner ``k``'s version and the one the
  worker read, and a step's staleness is the largest over its owners (what ``P2PExchange`` reports). Each arrival
  costs every other owner's thread ``2 m`` plus its update (``owner_ns_per_element`` per element of its shard) and
  the reply's transfer; the step is answered once the worker's link received the ``N - 1`` replies and its thread
  took them (``(N - 1) m``). A worker goes on after a submission only while
  :func:`~lightning_asyncpred.exchange.p2p_protocol.within_bound` holds. ``m`` is fitted to a p2p
  ``max_staleness=0`` profile's waits (:func:`calibrate_messages`). On a CPU host (``shared_cpu``) the thread
  shares the core with the compute: outside a compute it runs at full speed, beside one at the profile's
  ``thread_share`` of the core (:func:`calibrate_thread_share`; ``THREAD_SHARE``, a half, where none is fitted), and
  the compute ends later by the work done beside it (:func:`share_core`); work still queued when a compute begins
  goes first. With the shared batch pool (``pool=True``, the default) the ranks take steps while the pool lasts;
  with static shards every rank takes the same number.
* ``p2p`` in sync groups of ``k`` (``s = 0``, ``exchange/grouped.py``'s layout): a group's step is its slowest
  member's plus the group's all-reduce of ``B`` and all-gather of its columns (a profile of groups of ``k`` already
  holds those: there a group's step is one measured step of one measured group); the ``G = N / k`` groups then run
  the p2p model above with ``B / k`` per member (each member exchanges its piece with its column).

**Outputs** (:class:`Prediction`): samples/s over all ranks, the sum-of-rates limit (``sum_r batch / E[step_r]``,
what no transport can beat), efficiency (their ratio), the staleness histogram in the transport's unit (owner
updates for p2p, as ``StalenessMonitor`` and ``LinearPrediction`` see it; steps for allreduce) and in rounds
(``tau / G`` for p2p, ``G`` arrivals per round), the wait per step and the time per epoch. Left out: contention
between a rank's requests and the replies it serves on one link (each direction has the link to itself), NCCL's
and Gloo's internal pipelining, the order in which a worker's requests leave (all arrive at once), and, where
more ranks than cores share a host, one rank's threads taking CPU from another rank's compute (a profile measured
at the rank count it predicts carries that in its step times and fitted costs).
"""

from __future__ import annotations

import copy
import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from lightning_asyncpred.exchange.grouped import group_layout
from lightning_asyncpred.exchange.p2p_protocol import arrival_staleness, within_bound
from lightning_asyncpred.exchange.virtual import parse_speeds
from lightning_asyncpred.planner.profile import Link, Profile
from lightning_asyncpred.staleness import BoundedStalenessQueue, StalenessStats

TRANSPORTS = ("ddp", "allreduce", "p2p")
# the CPU share a rank's communication thread gets while its compute runs on the same core (two runnable threads)
THREAD_SHARE = 0.5


@dataclass(frozen=True)
class Config:
    """One configuration to predict: ``transport`` (``ddp``, ``allreduce``, ``p2p``), ``max_staleness``, the
    allreduce ``mode`` and the p2p ``group_size`` and ``pool``."""

    transport: str
    max_staleness: int = 0
    mode: str = "fixed"
    group_size: int = 1
    pool: bool = True

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport {self.transport!r}; allowed: {', '.join(TRANSPORTS)}")
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness={self.max_staleness}; it must be >= 0")
        if self.mode not in ("fixed", "eager"):
            raise ValueError(f"mode {self.mode!r}; allowed: fixed, eager")
        if self.group_size < 1 or (self.group_size > 1 and (self.transport != "p2p" or self.max_staleness != 0)):
            raise ValueError(f"group_size={self.group_size}: sync groups are p2p with max_staleness=0 "
                             "(exchange/grouped.py), group_size >= 1")

    @property
    def name(self) -> str:
        if self.transport == "ddp":
            return "ddp"
        if self.transport == "allreduce":
            return f"allreduce s={self.max_staleness}" + (" eager" if self.mode == "eager" else "")
        groups = f" groups of {self.group_size}" if self.group_size > 1 else ""
        return f"p2p s={self.max_staleness}{groups}" + ("" if self.pool else " static")


@dataclass(frozen=True)
class Perturbation:
    """The user's perturbation model on top of the profile: ``speeds`` (``equal``, ``jitter:S``,
    ``straggler:K``: the last rank takes ``K`` times as long), ``delay``: the mean of an exponential sleep added to
    every step (seconds), ``base_delay``: a fixed sleep added to every step (seconds), ``straggler_delay``: a fixed
    sleep added to every step of the last rank only (seconds: a rank slower by a known time, e.g. its loader)."""

    speeds: str = "equal"
    delay: float = 0.0
    base_delay: float = 0.0
    straggler_delay: float = 0.0

    def __post_init__(self) -> None:
        parse_speeds(self.speeds)
        if not (self.delay >= 0 and self.base_delay >= 0 and self.straggler_delay >= 0):
            raise ValueError(f"delay={self.delay}, base_delay={self.base_delay}, "
                             f"straggler_delay={self.straggler_delay}: seconds >= 0")


@dataclass
class Prediction:
    config: Config
    ranks: int
    samples_per_s: float
    limit: float  # samples/s of the sum-of-rates limit
    staleness: StalenessStats = field(default_factory=StalenessStats)
    arrivals_per_round: int = 1  # the staleness unit's round: G arrivals for p2p, 1 step for allreduce
    samples_per_epoch: Optional[int] = None
    steps: int = 0
    wait_per_step: float = 0.0  # seconds a rank is blocked on peers per step (p2p: waiting for its bound)

    @property
    def efficiency(self) -> float:
        return self.samples_per_s / self.limit

    @property
    def staleness_mean(self) -> float:
        return self.staleness.mean

    @property
    def staleness_rounds(self) -> float:
        return self.staleness.mean / self.arrivals_per_round

    @property
    def epoch_seconds(self) -> Optional[float]:
        return None if not self.samples_per_epoch else self.samples_per_epoch / self.samples_per_s


class StepTimes:
    """Draws step times of ``ranks`` simulated ranks (see the module docstring) as ``(busy, idle)``: the step's
    compute (on the rank's CPU or device) and its idle part (the loader's wait, sleeps), each times the speed
    model's factor, the exponential ``delay`` idle; seeded, so every configuration of one plan sees the same
    draws."""

    def __init__(self, profile: Profile, perturbation: Perturbation, ranks: int, seed: int = 0) -> None:
        self.samples = [row for row in profile.step_parts() if row]
        self.speeds = parse_speeds(perturbation.speeds)
        self.perturbation, self.ranks = perturbation, ranks
        self.random = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.synchronized = self.synchronized_step if profile.transport == "ddp" else None
        # a sync-group profile's steps already waited for the member's group (its all-reduce is inside the step)
        self.group_size = profile.sync_group_size if profile.transport == "p2p" else 1

    def __call__(self, rank: int) -> tuple[float, float]:
        row = self.samples[self.random.randrange(len(self.samples))]
        return self._perturbed(rank, *row[self.random.randrange(len(row))])

    def _perturbed(self, rank: int, busy: float, idle: float) -> tuple[float, float]:
        """A measured ``(busy, idle)`` under the perturbation: the speed factor, the base and exponential sleeps."""
        factor = self.speeds.sample(rank, self.ranks, self.generator)
        idle = (idle + self.perturbation.base_delay) * factor
        if rank == self.ranks - 1:
            idle += self.perturbation.straggler_delay
        if self.perturbation.delay > 0:
            idle += self.random.expovariate(1.0 / self.perturbation.delay)
        return busy * factor, idle

    def synchronized_step(self, ranks: int) -> list[tuple[float, float]]:
        """One measured step of a synchronous (``ddp``) profile: every rank's ``(busy, idle)`` at one step index
        (rank ``r`` takes measured rank ``r mod R``'s), with the perturbation drawn per rank."""
        t = self.random.randrange(min(len(row) for row in self.samples))
        return [self._perturbed(r, *self.samples[r % len(self.samples)][t]) for r in range(ranks)]

    def synchronized_group(self, members: list[int]) -> list[tuple[float, float]]:
        """One measured step of one measured sync group of a group profile: member ``i`` of ``members`` takes the
        ``i``-th member's ``(busy, idle)`` of a random measured group at one step index, perturbed as its own."""
        k = self.group_size
        first = k * self.random.randrange(len(self.samples) // k)
        rows = self.samples[first:first + k]
        t = self.random.randrange(min(len(row) for row in rows))
        return [self._perturbed(r, *rows[i % k][t]) for i, r in enumerate(members)]

    def mean(self, rank: int, draws: int = 400) -> float:
        """``E[step_rank]``, estimated from ``draws`` draws of a separate seed."""
        other = copy.copy(self)
        other.random, other.generator = random.Random(12345 + rank), torch.Generator().manual_seed(12345 + rank)
        return sum(sum(other(rank)) for _ in range(draws)) / draws


def simulate(profile: Profile, config: Config, ranks: int, perturbation: Perturbation = Perturbation(),
             steps: Optional[int] = None, seed: int = 0) -> Prediction:
    """Predict ``config`` at ``ranks`` ranks: ``steps`` steps per rank (the pool's budget is ``steps * ranks``;
    default: enough for the staleness to settle, at least 40 per rank and 4000 over all ranks)."""
    if ranks < 1:
        raise ValueError(f"ranks={ranks}; it must be >= 1")
    steps = steps if steps is not None else max(40, math.ceil(4000 / ranks))
    times = StepTimes(profile, perturbation, ranks, seed)
    # the perturbations treat every rank but the last alike (parse_speeds' models, straggler_delay)
    limit = profile.batch_size * ((ranks - 1) / times.mean(0) + 1 / times.mean(ranks - 1))
    pred = Prediction(config, ranks, 0.0, limit, samples_per_epoch=profile.samples_per_epoch)
    makespan, pred.steps, pred.arrivals_per_round, waited = run(
        times, ranks, steps, config, profile.link, profile.gradient_bytes, profile.owner_ns_per_element,
        pred.staleness, profile.message_seconds or 0.0, profile.shared_cpu, profile.reduction_seconds,
        profile.thread_share or THREAD_SHARE)
    pred.wait_per_step = waited / max(1, pred.steps)
    pred.samples_per_s = pred.steps * profile.batch_size / makespan if makespan > 0 else math.inf
    return pred


class Replay:
    """Step times from a matrix ``work[r][t]`` (a measured run's), in order per rank, all busy: :func:`run` on a
    replay is the ideal schedule of that run (``benchmarks/throughput.py``'s limits)."""

    def __init__(self, work: list[list[float]]) -> None:
        self.work, self.next = work, [0] * len(work)

    def __call__(self, rank: int) -> tuple[float, float]:
        t = self.work[rank][self.next[rank]]
        self.next[rank] += 1
        return t, 0.0


StepSource = Callable[[int], "tuple[float, float]"]


def run(step_time: StepSource, ranks: int, steps: int, config: Config, link: Optional[Link] = None,
        nbytes: float = 0.0, owner_ns_per_element: float = 0.0, staleness: Optional[StalenessStats] = None,
        message_seconds: float = 0.0, shared_cpu: bool = False, reduction_seconds: Optional[float] = None,
        thread_share: float = THREAD_SHARE) -> tuple[float, int, int, float]:
    """The model of ``config`` (see the module docstring) on step times ``step_time(rank) = (busy, idle)``: returns
    the makespan (the last rank's end), the steps taken over all ranks, the arrivals per round of the staleness unit
    and the seconds all ranks spent blocked (p2p); ``staleness`` (if given) receives every applied gradient's
    staleness. ``shared_cpu``: communication work takes the CPU the compute runs on (a CPU host), else it runs
    beside it (a GPU's compute); ``thread_share``: the core's share a p2p communication thread gets beside its
    compute (:func:`share_core`). ``reduction_seconds``: a background all-reduce's measured time (default: the
    link's ring all-reduce)."""
    stats = staleness if staleness is not None else StalenessStats()
    link = link if link is not None else Link()
    if config.transport == "ddp":
        return _ddp(step_time, ranks, steps, link.allreduce_seconds(nbytes, ranks)) + (1, 0.0)
    if config.transport == "allreduce":
        reduce = link.allreduce_seconds(nbytes, ranks) if reduction_seconds is None else reduction_seconds
        makespan, done, waited = _allreduce(step_time, ranks, steps, config, reduce, stats, shared_cpu)
        return makespan, done, 1, waited
    k = config.group_size
    groups, _ = group_layout(ranks, k)
    step: StepSource = step_time
    if k > 1 and getattr(step_time, "group_size", 1) == k:  # a profile of groups of k: measured group steps

        def step(g: int) -> tuple[float, float]:
            return max(b + i for b, i in step_time.synchronized_group(groups[g])), 0.0

    elif k > 1:
        sync = link.allreduce_seconds(nbytes, k) + (k - 1) * link.seconds(nbytes / k)  # all-reduce + all-gather

        def step(g: int) -> tuple[float, float]:
            return max(sum(step_time(r)) for r in groups[g]) + sync, 0.0

    # an owner's update of one arrival: its shard of the member's piece, 4 bytes per element
    owner_seconds = owner_ns_per_element * 1e-9 * nbytes / 4 / ranks
    makespan, done, waited = _p2p(step, len(groups), steps, config, link, owner_seconds, nbytes / k, stats,
                                  message_seconds, shared_cpu, thread_share)
    return makespan, done * k, len(groups), waited * k


def _ddp(times: StepSource, ranks: int, steps: int, allreduce: float) -> tuple[float, int]:
    """A ``ddp`` profile's steps already waited for the slowest rank (its all-reduce runs inside the backward):
    a step of the model is then one measured step, every measured rank's time of it (``StepTimes.synchronized``),
    not the maximum of independent draws; and the all-reduce is in it."""
    t = 0.0
    synchronized = getattr(times, "synchronized", None)
    for _ in range(steps):
        if synchronized is not None:
            t += max(b + i for b, i in synchronized(ranks))
        else:
            t += max(sum(times(r)) for r in range(ranks)) + allreduce
    return t, steps * ranks


def _allreduce(times: StepSource, ranks: int, steps: int, config: Config, allreduce: float,
               stats: StalenessStats, shared_cpu: bool = False) -> tuple[float, int, float]:
    s, eager = config.max_staleness, config.mode == "eager"
    queues = [BoundedStalenessQueue(s) for _ in range(ranks)]
    finish, ended, last_end, waited = [0.0] * ranks, {}, 0.0, 0.0
    # a reduction running in the background takes CPU time as long as it runs, where the compute shares the CPU
    extra = allreduce if shared_cpu else 0.0
    for t in range(steps):
        computed = []
        for r in range(ranks):
            busy, idle = times(r)
            computed.append(finish[r] + idle + busy + max(0.0, extra - idle))
        last_end = ended[t] = max(max(computed), last_end) + allreduce  # in order, once every rank submitted
        for r in range(ranks):
            queues[r].submit(t, s)  # as AllReduceExchange._submit and _ready do
            released = queues[r].ready()
            if eager:
                released += queues[r].release_while(lambda step, now=computed[r]: ended[step] <= now)
            stats.update(x.staleness for x in released)
            finish[r] = max([computed[r]] + [ended[x.item] for x in released])
            waited += finish[r] - computed[r]
    for r in range(ranks):  # the fit's end applies what is still in flight
        released = queues[r].drain()
        finish[r] = max([finish[r]] + [ended[x.item] for x in released])
    return max(finish), steps * ranks, waited


def share_core(begin: np.ndarray, seconds: float, compute_start: np.ndarray, compute_end: np.ndarray,
               computing: np.ndarray, share: float = THREAD_SHARE) -> tuple[np.ndarray, np.ndarray]:
    """``seconds`` of a communication thread's work from ``begin`` on a core it shares with a compute
    ``[compute_start, compute_end)`` (where ``computing``), per element: full speed outside the compute, a ``share``
    of the core beside it, the compute at ``1 - share`` (work-conserving: the compute ends later by the work done
    beside it). Returns ``(end of the work, end of the compute)``.

    With ``b`` the start of the shared part and ``r = compute_end - b`` the compute left there: if the work left,
    ``W``, ends first (``W / share <= r / (1 - share)``) it ends at ``b + W / share`` and the compute at
    ``compute_end + W``; else the compute ends at ``b + r / (1 - share)`` and the rest of the work runs alone."""
    if not 0 < share < 1:
        raise ValueError(f"share={share}; it must be in (0, 1)")
    overlap = computing & (begin < compute_end)
    before = np.where(overlap, np.clip(compute_start - begin, 0.0, seconds), seconds)  # alone before the compute
    left = seconds - before
    start = np.maximum(begin, compute_start)
    rest = compute_end - start  # the compute still to run when the shared part begins
    beside = left / share  # how long the shared part takes if the work ends while the compute runs
    fits = beside * (1 - share) <= rest
    alongside = np.where(fits, beside, rest / (1 - share))
    done_beside = np.where(fits, left, alongside * share)
    shared = overlap & (left > 0)
    end = np.where(shared, start + alongside + (left - done_beside), begin + seconds)
    return end, np.where(shared, compute_end + done_beside, compute_end)


# event kinds, in the order they are handled at one instant
_ANSWERED, _REPLIES, _ARRIVE, _COMPUTED, _START = range(5)


def _p2p(step_time: StepSource, workers: int, steps: int, config: Config, link: Link, owner_seconds: float,
         nbytes: float, stats: StalenessStats, message_seconds: float = 0.0,
         shared_cpu: bool = False, share: float = THREAD_SHARE) -> tuple[float, int, float]:
    """The p2p model among ``workers`` workers exchanging ``nbytes`` per step (see the module docstring).

    Every rank has one communication thread (``comm[r]``: when it is next free): a worker's step costs it
    ``(N - 1) m`` to send its requests and ``(N - 1) m`` to take the replies, and every arrival costs each owner
    ``2 m`` (take the request, send the reply) plus its update. With ``shared_cpu`` the thread shares the CPU with
    the compute (:func:`share_core`: work-conserving, the compute ends later by the work done beside it)."""
    s, m = config.max_staleness, message_seconds
    piece = nbytes / workers
    reply = link.transfer_seconds(piece)
    transfer = (workers - 1) * reply
    versions = np.zeros(workers, dtype=np.int64)  # owner k's updates (arrivals applied) so far
    received = np.zeros((workers, workers), dtype=np.int64)  # per worker: the newest answered version of each owner
    reads: dict[tuple[int, int], np.ndarray] = {}  # (worker, step): the versions it computed at
    answers: dict[tuple[int, int], np.ndarray] = {}  # (worker, step): each owner's version after applying it
    own_version: dict[tuple[int, int], int] = {}  # (worker, step): its own owner's version when it applied it
    comm = np.zeros(workers)
    computing = np.zeros(workers, dtype=bool)
    compute_start = np.zeros(workers)
    compute_end = np.zeros(workers)
    link_free = [0.0] * workers
    unanswered: list[deque[int]] = [deque() for _ in range(workers)]
    waiting = [False] * workers
    blocked_at = [0.0] * workers
    waited = 0.0
    taken = [0] * workers
    budget = steps * workers
    finish = [0.0] * workers
    events: list[tuple[float, int, int, int, int]] = []  # (time, kind, seq, worker, step)
    seq = 0

    def push(time: float, kind: int, worker: int, step: int = 0) -> None:
        nonlocal seq
        heapq.heappush(events, (time, kind, seq, worker, step))
        seq += 1

    def work(k: int, at: float, seconds: float) -> float:
        """``seconds`` of rank ``k``'s communication thread from ``at``; returns when it is done."""
        begin = max(at, float(comm[k]))
        if shared_cpu and computing[k] and begin < compute_end[k]:
            comm[k] = _thread_work(np.array([k]), np.array([begin]), seconds)[0]
        else:  # the thread has the core to itself
            comm[k] = begin + seconds
        return float(comm[k])

    def _thread_work(ranks: np.ndarray, begin: np.ndarray, seconds: float) -> np.ndarray:
        end, compute_end[ranks] = share_core(begin, seconds, compute_start[ranks], compute_end[ranks],
                                             computing[ranks], share)
        return end

    for w in range(workers):
        push(0.0, _START, w)
    while events:
        now, kind, _, w, step = heapq.heappop(events)
        if kind == _START:
            more = budget > 0 if config.pool else taken[w] < steps
            if not more:
                finish[w] = now
                continue
            budget -= 1
            busy, idle = step_time(w)
            begin = now + idle
            # a backlog of the thread beyond the idle part shares the CPU with the compute
            backlog = max(0.0, float(comm[w]) - begin) if shared_cpu else 0.0
            computing[w], compute_start[w], compute_end[w] = True, begin, begin + busy + backlog
            reads[w, taken[w]] = received[w].copy()  # the replies so far are installed first
            push(float(compute_end[w]), _COMPUTED, w, taken[w])
        elif kind == _COMPUTED:
            if compute_end[w] > now:  # the thread's work made the compute longer
                push(float(compute_end[w]), _COMPUTED, w, step)
                continue
            computing[w] = False
            # the submission applies the worker's own shard at once (Engine.submit) and sends the other requests
            own_version[w, step] = int(versions[w])
            versions[w] += 1
            answers[w, step] = np.zeros(workers, dtype=np.int64)
            answers[w, step][w] = versions[w]
            sent = max(work(w, now, (workers - 1) * m), link_free[w]) + transfer
            link_free[w] = sent
            unanswered[w].append(step)
            push(sent + link.latency, _ARRIVE, w, step)
            taken[w] += 1
            if within_bound(len(unanswered[w]), s):
                push(now, _START, w)
            else:
                waiting[w], blocked_at[w] = True, now
        elif kind == _ARRIVE:  # every other owner applies the step's shard: staleness at each, the step's is the largest
            at_owners = versions.copy()
            at_owners[w] = own_version.pop((w, step))
            stats.update([int(arrival_staleness(at_owners, reads.pop((w, step))).max())])
            ranks = np.flatnonzero(np.arange(workers) != w)
            versions[ranks] += 1
            answers[w, step][ranks] = versions[ranks]
            if workers > 1:
                begin = np.maximum(comm[ranks], now)
                cost = 2 * m + owner_seconds
                comm[ranks] = _thread_work(ranks, begin, cost) if shared_cpu else begin + cost
                replied = float(comm[ranks].max())
            else:
                replied = now
            # the worker's link takes the N - 1 replies
            push(max(replied + reply, now + transfer) + link.latency, _REPLIES, w, step)
        elif kind == _REPLIES:  # the worker's thread takes them
            push(work(w, now, (workers - 1) * m), _ANSWERED, w, step)
        else:  # _ANSWERED: a worker's steps are answered in order (every owner answers in arrival order)
            unanswered[w].popleft()
            np.maximum(received[w], answers.pop((w, step)), out=received[w])
            if waiting[w] and within_bound(len(unanswered[w]), s):
                waiting[w] = False
                waited += now - blocked_at[w]
                push(now, _START, w)
    return max(finish), sum(taken), waited


def _fit(profile: Profile, attr: str, config: Config, target: float, metric: Callable[[Prediction], float],
         tolerance: float = 0.02) -> Optional[float]:
    """The value of ``profile.<attr>`` for which ``metric`` of the model's prediction of ``config`` at the profile's
    ranks is ``target`` (bisection: the metric grows with it); ``None`` if no value reaches it."""
    saved = getattr(profile, attr)

    def value(x: float) -> float:
        setattr(profile, attr, x)
        return metric(simulate(profile, config, profile.ranks))

    try:
        lo, hi = 0.0, max(profile.mean_step(), 1e-3)
        if value(lo) >= target:
            return 0.0
        while value(hi) < target:
            if hi > 10 * profile.mean_step() + 1.0:
                return None  # the model does not reach the measured value by this cost alone
            hi *= 2
        while hi - lo > tolerance * hi:
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if value(mid) < target else (lo, mid)
        return (lo + hi) / 2
    finally:
        setattr(profile, attr, saved)


def _measured_wait(profile: Profile) -> Optional[float]:
    measured = [x for row in profile.wait for x in row]
    return sum(measured) / len(measured) if measured else None


def calibrate_messages(profile: Profile) -> Optional[float]:
    """The per-message cost ``m`` of a p2p communication thread (what a message costs beyond the link on the real
    machine: Python, the data plane, shared cores), fitted to the wait per step a p2p ``max_staleness=0`` profile
    measured (its worker waits for every round trip). ``None`` for another profile: with a higher bound the wait is
    mostly the hand-off of each step to the communication thread, not a round trip (fitting ``m`` to such a
    profile's staleness instead was tried: on a CPU host it then overstates what the thread takes from the compute,
    see the README's validation); with one sync group there is no message between groups."""
    target = _measured_wait(profile)
    if (profile.transport != "p2p" or profile.max_staleness != 0 or target is None
            or profile.ranks // max(1, profile.sync_group_size) < 2):
        return None
    return _fit(profile, "message_seconds", Config("p2p", 0, group_size=profile.sync_group_size), target,
                lambda p: p.wait_per_step)


def calibrate_reduction(profile: Profile) -> Optional[float]:
    """The time one background all-reduce takes on the real machine (``reduction_seconds``), fitted so that the model
    runs an ``allreduce`` profile's own configuration at the rate it measured (``sum_r 1 / mean_t(compute + data +
    wait)`` steps per second: where compute and reductions share the CPU a reduction slows the compute rather than
    keep a rank waiting, so its waits alone do not show its cost); ``None`` for another profile."""
    if profile.transport != "allreduce" or not profile.wait or profile.ranks < 2:
        return None
    rate = _measured_rate(profile)
    # the model's step time over the measured one: 1 at the fitted value, growing with it
    return _fit(profile, "reduction_seconds", Config("allreduce", profile.max_staleness), 1.0,
                lambda p: rate / p.samples_per_s)


def _measured_rate(profile: Profile) -> float:
    """Samples/s the profile measured: ``batch * sum_r 1 / mean_t(compute + data + wait)``."""
    rate = 0.0
    for parts, wait in zip(profile.step_parts(), profile.wait):
        steps = [b + i + (wait[t] if t < len(wait) else 0.0) for t, (b, i) in enumerate(parts)]
        rate += len(steps) / sum(steps)
    return rate * profile.batch_size


SHARES = (0.1, 0.2, 0.3, 0.4, 0.5)


def calibrate_thread_share(source: Profile, deep: Profile) -> Optional[tuple[float, float]]:
    """``(thread_share, message_seconds)`` on a CPU host, from two p2p profiles of one exchange layout: ``source``
    with ``max_staleness=0`` (``m`` is fitted to its waits, :func:`calibrate_messages`, at each share) and ``deep``
    with a higher bound, where the thread works beside the compute and its share shows: the share of
    :data:`SHARES` whose model of ``deep`` is nearest to its measured rate and mean staleness (the sum of both
    squared relative errors; the largest share on a tie). ``None`` where it does not apply."""
    counted = sum(deep.staleness_histogram)
    mean = sum(t * n for t, n in enumerate(deep.staleness_histogram)) / counted if counted else 0.0
    if not (source.shared_cpu and deep.shared_cpu and deep.wait and mean and deep.max_staleness > 0
            and source.transport == deep.transport == "p2p" and source.sync_group_size == deep.sync_group_size):
        return None
    rate, saved = _measured_rate(deep), (source.thread_share, deep.thread_share, deep.message_seconds)
    best = None
    try:
        for share in sorted(SHARES, reverse=True):
            source.thread_share = deep.thread_share = share
            m = calibrate_messages(source)
            if m is None:
                return None
            deep.message_seconds = m
            pred = simulate(deep, Config("p2p", deep.max_staleness, group_size=deep.sync_group_size), deep.ranks)
            error = (pred.samples_per_s / rate - 1) ** 2 + (pred.staleness_mean / mean - 1) ** 2
            if best is None or error < best[0] - 1e-9:
                best = (error, share, m)
    finally:
        source.thread_share, deep.thread_share, deep.message_seconds = saved
    return best[1], best[2]


def calibrate_all(profiles: "list[Profile]") -> None:
    """Set ``message_seconds`` where unset: fitted to each p2p ``max_staleness=0`` profile's waits
    (:func:`calibrate_messages`); the other p2p profiles take the fitted value of the nearest exchange layout (group
    size), the rest none; on a CPU host with a p2p profile of a higher bound beside one of ``max_staleness=0`` and
    the same layout, ``thread_share`` and ``message_seconds`` of that layout's profiles from both
    (:func:`calibrate_thread_share`); and ``reduction_seconds`` of the allreduce profiles (:func:`calibrate_reduction`)."""
    for deep in [p for p in profiles if p.transport == "p2p" and p.max_staleness > 0 and p.thread_share is None]:
        source = next((p for p in profiles if p.transport == "p2p" and p.max_staleness == 0
                       and p.sync_group_size == deep.sync_group_size and p.message_seconds is None), None)
        fitted_share = calibrate_thread_share(source, deep) if source is not None else None
        if fitted_share is not None:
            for p in profiles:
                if p.transport == "p2p" and p.sync_group_size == deep.sync_group_size:
                    p.thread_share, p.message_seconds = fitted_share
    fitted = {id(p): calibrate_messages(p) for p in profiles if p.message_seconds is None}
    sources = [p for p in profiles if fitted.get(id(p)) is not None]
    for p in profiles:
        if p.message_seconds is None:
            own = fitted.get(id(p))
            if own is None and p.transport == "p2p" and sources:
                # the fit of the same exchange layout (group size), a group's messages are not a rank's
                own = fitted[id(min(sources, key=lambda q: abs(q.sync_group_size - p.sync_group_size)))]
            p.message_seconds = own
        if p.reduction_seconds is None:
            p.reduction_seconds = calibrate_reduction(p)


def pick_profile(profiles: "list[Profile]", config: Config) -> Profile:
    """The profile to drive ``config`` with, among several (one per transport the user profiled): the same transport
    (Lightning's ``ddp`` counts as ``ddp``); for p2p then the same regime, :func:`overlaps` (whether the workers
    compute while their gradients are in flight); then the nearest ``max_staleness`` and group size; else the first.
    Where compute and communication share CPU cores (Gloo on a CPU host), a transport's communication slows the
    compute of the same process, which only a profile of that transport, and for p2p of that regime, carries."""
    same = [p for p in profiles if p.transport == config.transport]
    if not same:
        return profiles[0]
    regime = overlaps(config.transport, config.max_staleness)
    return min(same, key=lambda p: (overlaps(p.transport, p.max_staleness) != regime,
                                    abs(p.max_staleness - config.max_staleness),
                                    abs(p.sync_group_size - config.group_size)))


def overlaps(transport: str, max_staleness: int) -> bool:
    """Whether a p2p worker computes while its gradients are in flight: with ``max_staleness >= 1`` its thread sends
    and takes the messages beside the compute (on a CPU host, slowing it), with ``0`` mostly while the worker waits
    for its answer (:func:`~lightning_asyncpred.exchange.p2p_protocol.within_bound`); a profile's step times carry
    the regime it ran in."""
    return transport == "p2p" and within_bound(1, max_staleness)
