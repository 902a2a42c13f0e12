"""A discrete-event model of the transports as implemented, driven by a profile's step times (pure Python).

Every rank runs steps whose times are drawn from the profile (:meth:`Profile.step_samples`: one measured
``compute + data`` pair, uniformly) plus a fixed ``base_delay``, times the speed model's factor
(``exchange/virtual.py``'s :func:`~lightning_asyncpred.exchange.virtual.parse_speeds`: ``equal``, ``jitter:S``,
``straggler:K``: the whole step of the last rank ``K`` times as long), plus an optional exponential sleep of mean
``delay`` (the benchmarks' perturbations: ``benchmarks/straggler.py``'s ``none`` is ``base_delay``, its ``jitter``
adds ``delay``, its ``straggler`` is ``straggler:2``; ``benchmarks/throughput.py``'s jitter is ``delay``). The link
costs ``latency + bytes / bandwidth`` per message (``profile.Link``); a gradient is ``B = gradient_bytes``.

Transports (each rule is the transport's own, called here, not restated):

* ``ddp``: every step waits for the slowest rank, then a ring all-reduce of ``B``
  (``2 (N - 1) (latency + B / (N bandwidth))``); no staleness.
* ``allreduce`` (``fixed``/``eager``, ``s``): rank ``r`` computes step ``t`` until ``C[r][t]``; the reduction of
  step ``t`` starts once every rank submitted it and the reduction before it ended (collectives run in order) and
  takes one ring all-reduce. Which reductions a rank must have before it goes on is the transport's
  :class:`~lightning_asyncpred.staleness.BoundedStalenessQueue` (``submit`` with delay ``s`` in ``fixed`` mode; in
  ``eager`` mode also ``release_while`` the reduction has ended): the rank waits for the end of every reduction
  the queue releases, and the queue's staleness is the staleness.
* ``p2p`` (``s``): a worker sends its ``N - 1`` request shards (``B / N`` each) through its link after computing
  (they arrive ``latency`` after the last leaves); every owner sees the same arrivals in the same order (a
  symmetric network), so one owner stands for all: it answers each arrival in arrival order after
  ``owner_ns_per_element`` per element of its shard and its reply's transfer, and the step is answered once the worker's link received the ``N -
  1`` replies. The worker installs, before each step, the newest answered step's version; an arrival's staleness
  is :func:`~lightning_asyncpred.exchange.p2p_protocol.arrival_staleness` (owner updates) and a worker goes on
  after a submission only while :func:`~lightning_asyncpred.exchange.p2p_protocol.within_bound` holds, the
  transport's two rules. With the shared batch pool (``pool=True``, the default) the ranks take steps while the
  pool lasts; with static shards every rank takes the same number.
* ``p2p`` in sync groups of ``k`` (``s = 0``, ``exchange/grouped.py``'s layout): a group's step is its slowest
  member's plus the group's all-reduce of ``B`` and all-gather of its columns; the ``G = N / k`` groups then run
  the p2p model above with ``B / k`` per member (each member exchanges its piece with its column).

Outputs (:class:`Prediction`): samples/s over all ranks, the sum-of-rates limit (``sum_r batch / E[step_r]``,
what no transport can beat), efficiency (their ratio), the staleness histogram in the transport's unit (owner
updates for p2p, as ``StalenessMonitor`` and ``LinearPrediction`` see it; steps for allreduce) and in rounds
(``tau / G`` for p2p, ``G`` arrivals per round), and the time per epoch. What it leaves out: contention between a
rank's requests and the replies it serves on one link (each has the link to itself), NCCL's and Gloo's internal
pipelining, the owners' round barrier (an owner steps once per ``G`` arrivals; versions count arrivals).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from lightning_asyncpred.exchange.grouped import group_layout
from lightning_asyncpred.exchange.p2p_protocol import arrival_staleness, within_bound
from lightning_asyncpred.exchange.virtual import parse_speeds
from lightning_asyncpred.planner.profile import Link, Profile
from lightning_asyncpred.staleness import BoundedStalenessQueue, StalenessStats

TRANSPORTS = ("ddp", "allreduce", "p2p")


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
    every step (seconds), ``base_delay``: a fixed sleep added to every step (seconds)."""

    speeds: str = "equal"
    delay: float = 0.0
    base_delay: float = 0.0

    def __post_init__(self) -> None:
        parse_speeds(self.speeds)
        if not (self.delay >= 0 and self.base_delay >= 0):
            raise ValueError(f"delay={self.delay}, base_delay={self.base_delay}: seconds >= 0")


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
    """Draws step times of ``ranks`` simulated ranks (see the module docstring); seeded, so every configuration
    of one plan sees the same draws."""

    def __init__(self, profile: Profile, perturbation: Perturbation, ranks: int, seed: int = 0) -> None:
        self.samples = [row for row in profile.step_samples() if row]
        self.speeds = parse_speeds(perturbation.speeds)
        self.perturbation, self.ranks = perturbation, ranks
        self.random = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, rank: int) -> float:
        row = self.samples[self.random.randrange(len(self.samples))]
        t = row[self.random.randrange(len(row))] + self.perturbation.base_delay
        t *= self.speeds.sample(rank, self.ranks, self.generator)
        if self.perturbation.delay > 0:
            t += self.random.expovariate(1.0 / self.perturbation.delay)
        return t

    def mean(self, rank: int, draws: int = 400) -> float:
        """``E[step_rank]``, estimated from ``draws`` draws of a separate seed."""
        other = StepTimes.__new__(StepTimes)
        other.__dict__.update(self.__dict__)
        other.random, other.generator = random.Random(12345 + rank), torch.Generator().manual_seed(12345 + rank)
        return sum(other(rank) for _ in range(draws)) / draws


def simulate(profile: Profile, config: Config, ranks: int, perturbation: Perturbation = Perturbation(),
             steps: Optional[int] = None, seed: int = 0) -> Prediction:
    """Predict ``config`` at ``ranks`` ranks: ``steps`` steps per rank (the pool's budget is ``steps * ranks``;
    default: enough for the staleness to settle, at least 40 per rank and 4000 over all ranks)."""
    if ranks < 1:
        raise ValueError(f"ranks={ranks}; it must be >= 1")
    steps = steps if steps is not None else max(40, math.ceil(4000 / ranks))
    times = StepTimes(profile, perturbation, ranks, seed)
    limit = sum(profile.batch_size / times.mean(r) for r in range(ranks))
    pred = Prediction(config, ranks, 0.0, limit, samples_per_epoch=profile.samples_per_epoch)
    makespan, pred.steps, pred.arrivals_per_round = run(times, ranks, steps, config, profile.link,
                                                        profile.gradient_bytes, profile.owner_ns_per_element, pred.staleness)
    pred.samples_per_s = pred.steps * profile.batch_size / makespan if makespan > 0 else math.inf
    return pred


class Replay:
    """Step times from a matrix ``work[r][t]`` (a measured run's), in order per rank: :func:`run` on a replay is
    the ideal schedule of that run (``benchmarks/throughput.py``'s limits)."""

    def __init__(self, work: list[list[float]]) -> None:
        self.work, self.next = work, [0] * len(work)

    def __call__(self, rank: int) -> float:
        t = self.work[rank][self.next[rank]]
        self.next[rank] += 1
        return t


def run(step_time: Callable[[int], float], ranks: int, steps: int, config: Config, link: Optional[Link] = None,
        nbytes: float = 0.0, owner_ns_per_element: float = 0.0,
        staleness: Optional[StalenessStats] = None) -> tuple[float, int, int]:
    """The model of ``config`` (see the module docstring) on step times ``step_time(rank)``: returns the makespan
    (the last rank's end), the steps taken over all ranks and the arrivals per round of the staleness unit;
    ``staleness`` (if given) receives every applied gradient's staleness."""
    stats = staleness if staleness is not None else StalenessStats()
    link = link if link is not None else Link()
    if config.transport == "ddp":
        return _ddp(step_time, ranks, steps, link.allreduce_seconds(nbytes, ranks)) + (1,)
    if config.transport == "allreduce":
        return _allreduce(step_time, ranks, steps, config, link.allreduce_seconds(nbytes, ranks), stats) + (1,)
    k = config.group_size
    groups, _ = group_layout(ranks, k)
    step: Callable[[int], float] = step_time
    if k > 1:
        sync = link.allreduce_seconds(nbytes, k) + (k - 1) * link.seconds(nbytes / k)  # all-reduce + all-gather

        def step(g: int) -> float:
            return max(step_time(r) for r in groups[g]) + sync

    # an owner's update of one arrival: its shard of the member's piece, 4 bytes per element
    owner_seconds = owner_ns_per_element * 1e-9 * nbytes / 4 / ranks
    makespan, done = _p2p(step, len(groups), steps, config, link, owner_seconds, nbytes / k, stats)
    return makespan, done * k, len(groups)


def _ddp(times: Callable[[int], float], ranks: int, steps: int, allreduce: float) -> tuple[float, int]:
    t = 0.0
    for _ in range(steps):
        t += max(times(r) for r in range(ranks)) + allreduce
    return t, steps * ranks


def _allreduce(times: Callable[[int], float], ranks: int, steps: int, config: Config, allreduce: float,
               stats: StalenessStats) -> tuple[float, int]:
    s, eager = config.max_staleness, config.mode == "eager"
    queues = [BoundedStalenessQueue(s) for _ in range(ranks)]
    finish, ended, last_end = [0.0] * ranks, {}, 0.0
    for t in range(steps):
        computed = [finish[r] + times(r) for r in range(ranks)]
        last_end = ended[t] = max(max(computed), last_end) + allreduce  # in order, once every rank submitted
        for r in range(ranks):
            queues[r].submit(t, s)  # as AllReduceExchange._submit and _ready do
            released = queues[r].ready()
            if eager:
                released += queues[r].release_while(lambda step, now=computed[r]: ended[step] <= now)
            stats.update(x.staleness for x in released)
            finish[r] = max([computed[r]] + [ended[x.item] for x in released])
    for r in range(ranks):  # the fit's end applies what is still in flight
        released = queues[r].drain()
        finish[r] = max([finish[r]] + [ended[x.item] for x in released])
    return max(finish), steps * ranks


# event kinds, in the order they are handled at one instant
_ANSWERED, _ARRIVE, _COMPUTED, _START = range(4)


def _p2p(step_time: Callable[[int], float], workers: int, steps: int, config: Config, link: Link,
         owner_seconds: float, nbytes: float, stats: StalenessStats) -> tuple[float, int]:
    """The p2p model among ``workers`` workers exchanging ``nbytes`` per step (see the module docstring)."""
    s = config.max_staleness
    piece = nbytes / workers
    transfer = (workers - 1) * (piece / link.bandwidth if math.isfinite(link.bandwidth) else 0.0)
    reply = piece / link.bandwidth if math.isfinite(link.bandwidth) else 0.0
    owner_version, owner_free = 0, 0.0
    link_free = [0.0] * workers
    unanswered: list[deque[int]] = [deque() for _ in range(workers)]
    newest = [0] * workers  # the newest answered version each worker has received (installed at its next step)
    waiting = [False] * workers
    taken = [0] * workers
    budget = steps * workers
    finish = [0.0] * workers
    events: list[tuple[float, int, int, int, int, int]] = []  # (time, kind, seq, worker, step, version)
    seq = 0

    def push(time: float, kind: int, worker: int, step: int = 0, version: int = 0) -> None:
        nonlocal seq
        heapq.heappush(events, (time, kind, seq, worker, step, version))
        seq += 1

    for w in range(workers):
        push(0.0, _START, w)
    while events:
        now, kind, _, w, step, version = heapq.heappop(events)
        if kind == _START:
            more = budget > 0 if config.pool else taken[w] < steps
            if not more:
                finish[w] = now
                continue
            budget -= 1
            read = newest[w]  # the replies answered so far are installed before the step
            computed = now + step_time(w)
            sent = max(computed, link_free[w]) + transfer
            link_free[w] = sent
            unanswered[w].append(taken[w])
            push(sent + link.latency, _ARRIVE, w, taken[w], read)
            push(computed, _COMPUTED, w)
            taken[w] += 1
        elif kind == _COMPUTED:
            if within_bound(len(unanswered[w]), s):
                push(now, _START, w)
            else:
                waiting[w] = True
        elif kind == _ARRIVE:
            stats.update(arrival_staleness(owner_version, version))
            owner_version += 1
            owner_free = max(now, owner_free) + owner_seconds + reply
            answered = max(owner_free, now + transfer) + link.latency  # the worker's link takes N - 1 replies
            push(answered, _ANSWERED, w, step, owner_version)
        else:  # _ANSWERED: a worker's steps are answered in order (every owner answers in arrival order)
            unanswered[w].popleft()
            newest[w] = max(newest[w], version)
            if waiting[w] and within_bound(len(unanswered[w]), s):
                waiting[w] = False
                push(now, _START, w)
    return max(finish), sum(taken)
