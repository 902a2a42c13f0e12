"""``N`` asynchronous workers in one process around the p2p owner (pure torch, no Lightning).

The one-process model of what the p2p transport does with ``N`` ranks: the owner is the transport's own
:class:`~lightning_asyncpred.exchange.owner.ShardOwner` (one shard holding every parameter: every p2p owner sees the
same stream of arrivals, so one owner makes the same rounds), and ``N`` virtual workers feed it on a simulated
clock. The compute itself is sequential (whoever calls :meth:`VirtualWorkers.start` computes the gradient), so the
same total compute runs at any ``N`` on any machine.

Timing model. Worker ``i``'s step ``s`` (0, 1, ...) takes ``d_{i,s}`` time units, drawn from a speed model
(:func:`parse_speeds`); steps of one worker follow each other without a gap. The gradient of a step *arrives* at the
owner when the step ends; arrivals are applied in time order (ties: the lower worker first), and the owner's reply
to it is a snapshot of :attr:`ShardOwner.reply` right after it. With pipeline ``depth`` ``d >= 1`` step ``s``
computes at the reply to the worker's own step ``s - d`` (the initial parameters while ``s < d``): ``d = 1`` is a
worker that waits for the answer to its last gradient (p2p's default, ``max_staleness=0``); ``d = 2`` is p2p with
``max_staleness >= 1`` (the next step starts as soon as a gradient is sent, so the step after it reads the answer to
the one before, as long as a round trip is shorter than a step). The staleness of an arrival is ``tau`` = the
arrivals between the version read and it: about ``d N - 1`` with equal speeds, ``d`` rounds. The clock has no
round-trip time: it decides the order of arrivals (what accuracy depends on), not the throughput a depth costs.

Speed models: ``"equal"`` (every step 1), ``"jitter:S"`` (``exp(S z)``, ``z`` standard normal, per step),
``"straggler:K"`` (worker ``N - 1`` takes ``K`` per step, the others 1), or a sequence of measured step times (each
step draws one of them, uniformly).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from lightning_asyncpred.exchange.base import Exchange, ReadyGradient
from lightning_asyncpred.exchange.owner import ShardOwner
from lightning_asyncpred.staleness import StalenessStats
from lightning_asyncpred.validation import check_int

SpeedSpec = Union[str, Sequence[float]]


@dataclass(frozen=True)
class SpeedModel:
    """Step times of ``workers`` virtual workers (see the module docstring)."""

    kind: str
    value: float = 0.0
    samples: tuple[float, ...] = ()

    def sample(self, worker: int, workers: int, generator: torch.Generator) -> float:
        if self.kind == "equal":
            return 1.0
        if self.kind == "straggler":
            return self.value if worker == workers - 1 else 1.0
        if self.kind == "jitter":
            return math.exp(self.value * float(torch.randn((), generator=generator)))
        return self.samples[int(torch.randint(len(self.samples), (1,), generator=generator))]


def parse_speeds(spec: SpeedSpec) -> SpeedModel:
    """``"equal"``, ``"jitter:S"`` (``S >= 0``), ``"straggler:K"`` (``K > 0``) or a non-empty sequence of step
    times ``> 0``; ``ValueError`` naming the bad value otherwise."""
    allowed = "'equal', 'jitter:S' (S >= 0), 'straggler:K' (K > 0) or a list of measured step times > 0"
    if isinstance(spec, str):
        name, _, arg = spec.partition(":")
        name = name.strip().lower()
        if name == "equal" and not arg:
            return SpeedModel("equal")
        if name in ("jitter", "straggler"):
            try:
                value = float(arg)
            except ValueError:
                value = math.nan
            if math.isfinite(value) and (value >= 0 if name == "jitter" else value > 0):
                return SpeedModel(name, value)
            raise ValueError(f"speed model {spec!r}: {name} needs a number {'>= 0' if name == 'jitter' else '> 0'}, "
                             f"e.g. '{name}:{'0.3' if name == 'jitter' else '2'}'")
        raise ValueError(f"unknown speed model {spec!r}; allowed: {allowed}")
    try:
        samples = tuple(float(x) for x in spec)
    except (TypeError, ValueError):
        raise ValueError(f"speed model must be {allowed}, got {spec!r}") from None
    if not samples or not all(math.isfinite(x) and x > 0 for x in samples):
        raise ValueError(f"measured step times must be a non-empty list of numbers > 0, got {list(samples)!r}")
    return SpeedModel("samples", samples=samples)


@dataclass(order=True)
class _Arrival:
    time: float
    worker: int
    step: int = field(compare=False)
    version: int = field(compare=False)  # the owner's arrival count when the gradient's parameters were published
    grad: Tensor = field(compare=False)


class VirtualWorkers:
    """``workers`` virtual workers feeding ``owner`` (see the module docstring).

    Use: ``worker, params = start()``; compute the gradient of the worker's next batch at ``params`` (a flat tensor
    in the owner's layout; do not modify it); ``finish(grad)``; repeat; at the end :meth:`drain` applies what is still
    in flight. :attr:`stats` holds the staleness of every applied arrival (in arrivals), :attr:`time` the simulated
    clock.
    """

    def __init__(self, owner: ShardOwner, workers: int, depth: int = 1, speeds: SpeedSpec = "equal", seed: int = 0) -> None:
        self.workers = check_int("workers", workers, 1)
        self.depth = check_int("depth", depth, 1)
        if owner.world_size != self.workers:
            raise ValueError(f"the owner makes rounds of {owner.world_size} arrivals, but there are {workers} workers: "
                             "build it with world_size=workers")
        self.owner = owner
        self.speeds = parse_speeds(speeds)
        self.generator = torch.Generator().manual_seed(int(seed))
        self._looks_ahead = owner.reply is not owner.flat
        initial = (0, owner.reply.detach().clone(), owner.flat.detach().clone() if self._looks_ahead else None)
        # per worker: the replies it may still read, by its step (-1: the initial parameters): (version, reply, the
        # master it looked ahead from, or None without look-ahead)
        self._replies: list[dict[int, tuple[int, Tensor, Optional[Tensor]]]] = [{-1: initial} for _ in range(self.workers)]
        self.read_real: Optional[Tensor] = None  # the master behind the last parameters start() returned
        self._free = [0.0] * self.workers  # when each worker's last started step ends
        self._steps = [0] * self.workers  # steps started per worker
        self._arrivals: list[_Arrival] = []  # heap, in flight
        self._current: Optional[tuple[int, int, int]] = None  # (worker, step, version read) between start and finish
        # called as before_apply(worker, step) before each arrival is applied (e.g. to measure where it lands)
        self.before_apply: Optional[Callable[[int, int], None]] = None
        self.time = 0.0
        self.stats = StalenessStats()
        self.arrived: list[tuple[int, int, int]] = []  # (worker, step, staleness) of every applied arrival (consumers clear it)

    @property
    def in_flight(self) -> int:
        return len(self._arrivals)

    def steps(self, worker: int) -> int:
        """Steps worker ``worker`` has started."""
        return self._steps[worker]

    def start(self) -> tuple[int, Tensor]:
        """The next step to compute: the worker that starts next on the simulated clock and the parameters it reads.
        Arrivals due before that moment are applied first."""
        if self._current is not None:
            raise RuntimeError("start() called twice without finish()")
        worker = min(range(self.workers), key=lambda i: (self._free[i], i))
        now = self._free[worker]
        while self._arrivals and self._arrivals[0].time <= now:
            self._apply(heapq.heappop(self._arrivals))
        self.time = now
        step = self._steps[worker]
        read = self._read_key(step)
        version, params, real = self._replies[worker][read]
        self.read_real = params if real is None else real
        for old in [k for k in self._replies[worker] if k < read]:
            del self._replies[worker][old]
        self._current = (worker, step, version)
        return worker, params

    def finish(self, grad: Tensor) -> None:
        """The gradient of the step :meth:`start` returned (flat, the owner's layout); it arrives when the step
        ends."""
        if self._current is None:
            raise RuntimeError("finish() without start()")
        worker, step, version = self._current
        self._current = None
        end = self._free[worker] + self.speeds.sample(worker, self.workers, self.generator)
        self._free[worker] = end
        self._steps[worker] = step + 1
        heapq.heappush(self._arrivals, _Arrival(end, worker, step, version, grad.detach().reshape(-1).clone()))

    def drain(self) -> int:
        """Apply every arrival still in flight (in time order); returns how many."""
        n = 0
        while self._arrivals:
            arrival = heapq.heappop(self._arrivals)
            self.time = max(self.time, arrival.time)
            self._apply(arrival)
            n += 1
        return n

    def _apply(self, arrival: _Arrival) -> None:
        staleness = self.owner.arrivals - arrival.version
        if self.before_apply is not None:
            self.before_apply(arrival.worker, arrival.step)
        self.stats.update(staleness)
        self.arrived.append((arrival.worker, arrival.step, staleness))
        reply = self.owner.apply(arrival.grad, source=arrival.worker, step=arrival.step, staleness=staleness)
        real = self.owner.flat.detach().clone() if self._looks_ahead else None
        self._replies[arrival.worker][arrival.step] = (self.owner.arrivals, reply.detach().clone(), real)

    # ------------------------------------------------------------------ state
    @property
    def current(self) -> Optional[tuple[int, Tensor]]:
        """The worker :meth:`start` returned and the parameters it reads, until :meth:`finish`; else ``None``."""
        if self._current is None:
            return None
        worker, step, _ = self._current
        return worker, self._replies[worker][self._read_key(step)][1]

    def _read_key(self, step: int) -> int:
        """The worker's step whose reply its step ``step`` reads (-1: the initial parameters)."""
        return max(-1, step - self.depth)

    def state_dict(self) -> dict[str, Any]:
        """The clocks, the replies each worker may still read, the gradients in flight, the step started and not
        finished, the speed draws and the staleness statistics (the owner's state is saved with the owner)."""
        return {
            "current": self._current,
            "workers": self.workers, "depth": self.depth, "time": self.time, "free": list(self._free),
            "steps": list(self._steps), "generator": self.generator.get_state(), "stats": self.stats.state_dict(),
            "replies": [{k: (v, t.cpu().clone(), None if m is None else m.cpu().clone()) for k, (v, t, m) in r.items()}
                        for r in self._replies],
            "arrivals": [(a.time, a.worker, a.step, a.version, a.grad.cpu().clone()) for a in sorted(self._arrivals)],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["workers"]) != self.workers or int(state["depth"]) != self.depth:
            raise ValueError(f"saved with {state['workers']} virtual workers at depth {state['depth']}, resumed with "
                             f"{self.workers} at depth {self.depth}: resume with the same workers and depth")
        device, dtype = self.owner.reply.device, self.owner.reply.dtype
        self.time, self._free, self._steps = float(state["time"]), [float(x) for x in state["free"]], [int(x) for x in state["steps"]]
        self.generator.set_state(state["generator"])
        self.stats.load_state_dict(state["stats"])
        self._replies = [{int(k): (int(v), t.to(device, dtype), None if m is None else m.to(device, dtype))
                          for k, (v, t, m) in r.items()} for r in state["replies"]]
        self._arrivals = [_Arrival(float(t), int(w), int(s), int(v), g.to(device, dtype)) for t, w, s, v, g in state["arrivals"]]
        heapq.heapify(self._arrivals)
        current = state.get("current")
        self._current = None if current is None else tuple(int(x) for x in current)


class VirtualWorkersExchange(Exchange):
    """The exchange of ``async_pred_sim`` with ``workers=N``: the process is ``N`` virtual workers in turn.

    An owner-based exchange (``returns = "parameters"``, as p2p): every training step of the process is the step of
    the virtual worker that starts next (:class:`VirtualWorkers`); its gradient is handed over with :meth:`submit`,
    and :meth:`take_parameters` returns the parameters the next worker reads, to install before its forward pass.
    The owner holds the masters and the optimizer state (``gather_*`` return them, as p2p's writer rank does).
    ``ready()`` reports the arrivals applied since the last call (``staleness`` in arrivals).
    """

    name = "virtual"
    returns = "parameters"

    def __init__(self, owner: ShardOwner, workers: int, depth: int = 1, speeds: SpeedSpec = "equal", seed: int = 0) -> None:
        super().__init__(max_staleness=depth)
        self.owner = owner
        self.workers = VirtualWorkers(owner, workers, depth=depth, speeds=speeds, seed=seed)
        self._steps: dict[tuple[int, int], int] = {}  # (worker, its step) -> the submitting training step
        self._next: Optional[Tensor] = None
        self._begin()

    def _begin(self) -> None:
        _, params = self.workers.start()
        self._next = params

    @property
    def worker(self) -> int:
        """The virtual worker whose step the process computes now."""
        current = self.workers.current
        return -1 if current is None else current[0]

    @property
    def expected_staleness(self) -> float:
        """The mean staleness of the arrivals so far, in arrivals (``depth * N - 1`` before any)."""
        return self.stats.mean if self.stats.count else float(self.max_staleness * self.workers.workers - 1)

    def _submit(self, step: int, buckets: list[Tensor]) -> None:
        worker = self.worker
        self._steps[(worker, self.workers.steps(worker))] = step
        self.workers.finish(buckets[0])
        self._begin()

    def _results(self) -> list[ReadyGradient]:
        out = [ReadyGradient(self._steps.pop((w, s)), tau, 1, []) for w, s, tau in self.workers.arrived]
        self.workers.arrived.clear()
        return out

    def _ready(self) -> list[ReadyGradient]:
        return self._results()

    def _drain(self) -> list[ReadyGradient]:
        self.workers.drain()
        self._next = self.owner.flat  # the run ends on the masters
        return self._results()

    def take_parameters(self) -> dict[int, Tensor]:
        """``{0: flat}``: the parameters of the next step (its worker's read), once after each submission."""
        out, self._next = ({0: self._next} if self._next is not None else {}), None
        return out

    def resume_parameters(self) -> dict[int, Tensor]:
        """The parameters the current worker reads (after loading a checkpoint, before the first step)."""
        current = self.workers.current
        return {} if current is None else {0: current[1]}

    # owner-based checkpoints: the one owner holds everything (p2p's writer rank gathers them)
    def quiesce(self) -> None:
        pass

    def gather_masters(self) -> list[Tensor]:
        return [self.owner.flat.detach().to("cpu", copy=True)]

    def gather_optimizer_states(self) -> dict[int, dict[str, Any]]:
        return self.owner.state_dict()

    def gather_round_states(self) -> dict[str, Any]:
        return self.owner.round_state()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["rounds"] = self.gather_round_states()
        return state

    def load_state_dict(self, state: dict[str, Any], place: Any = list) -> None:
        super().load_state_dict(state, place)
        self.owner.load_round_state(state["rounds"])

    def _state_dict(self) -> dict[str, Any]:
        return {"workers": self.workers.state_dict(), "steps": [[w, s, t] for (w, s), t in self._steps.items()]}

    def _load_state_dict(self, state: Any, place: Any) -> int:
        self.workers.load_state_dict(state["workers"])
        self._steps = {(int(w), int(s)): int(t) for w, s, t in state["steps"]}
        self._next = None
        return self.workers.in_flight
