"""Bounded-staleness queue, staleness distributions and running statistics (pure Python/torch).

Staleness is counted in submissions: a gradient submitted as the ``i``-th item and released when ``j``
later items have been submitted has staleness ``tau = j``. With one submission per optimizer step this is
the number of updates between the parameters the gradient was computed on and the parameters it is
applied to (``w_t`` -> applied as update ``t + tau``).

This module imports no Lightning.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterable, TypeVar, Union

import torch

T = TypeVar("T")

StalenessSpec = Union[int, str]

_DISTRIBUTIONS = ("fixed", "uniform", "geometric")


def _parse_int(value: Any, what: str, spec: Any) -> int:
    """An integer >= 0 from ``value`` or a ``ValueError`` naming ``spec``."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a non-negative integer, got {value!r} in staleness spec {spec!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{what} must be a non-negative integer, got {value!r} in staleness spec {spec!r}")
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(
                f"{what} must be a non-negative integer, got {value!r} in staleness spec {spec!r}"
            ) from None
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r} in staleness spec {spec!r}")
    return value


@dataclass(frozen=True)
class StalenessDistribution:
    """A distribution of simulated staleness values ``tau`` (integers >= 0).

    - ``fixed``: ``tau = a``.
    - ``uniform``: ``tau ~ U{a, ..., b}`` (inclusive), mean ``(a + b) / 2``.
    - ``geometric``: ``P(tau = k) = p (1 - p)^k`` with ``p = 1 / (1 + m)``, mean ``m``, truncated at
      ``bound`` (values above it are clipped to it).
    """

    kind: str
    a: float
    b: float = 0.0
    bound: int = 0

    @property
    def mean(self) -> float:
        if self.kind == "fixed":
            return float(self.a)
        if self.kind == "uniform":
            return (self.a + self.b) / 2.0
        # geometric truncated at bound: E[min(X, bound)] = sum_{k=1}^{bound} P(X >= k) = sum q^k
        q = self.a / (1.0 + self.a)
        return float(sum(q**k for k in range(1, self.bound + 1)))

    def sample(self, generator: torch.Generator) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return int(torch.randint(int(self.a), int(self.b) + 1, (1,), generator=generator).item())
        p = 1.0 / (1.0 + self.a)
        u = float(torch.rand((), generator=generator).item())
        # inverse CDF of the geometric distribution on {0, 1, ...}
        k = int(math.floor(math.log1p(-u) / math.log1p(-p))) if p < 1.0 else 0
        return min(k, self.bound)


def parse_staleness(spec: StalenessSpec, max_staleness: int | None = None) -> StalenessDistribution:
    """Parse a staleness spec: an integer ``>= 0`` or ``"fixed:N"``, ``"uniform:A:B"``, ``"geometric:MEAN"``.

    ``max_staleness`` bounds the geometric distribution (default ``4 * MEAN``, at least 1) and must be at
    least the largest value a fixed or uniform spec can produce.

    Raises:
        ValueError: naming the bad value and what is allowed.
    """
    allowed = "an integer >= 0, 'fixed:N', 'uniform:A:B' (A <= B) or 'geometric:MEAN'"
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        n = _parse_int(spec, "staleness", spec)
        dist = StalenessDistribution("fixed", n, bound=n)
    elif isinstance(spec, str):
        parts = [p.strip() for p in spec.split(":")]
        name = parts[0].lower()
        if len(parts) == 1:
            try:
                float(name)
            except ValueError:
                raise ValueError(
                    f"unknown staleness distribution {parts[0]!r} in spec {spec!r}; allowed: {allowed}"
                ) from None
            n = _parse_int(float(name), "staleness", spec)
            dist = StalenessDistribution("fixed", n, bound=n)
        elif name not in _DISTRIBUTIONS:
            raise ValueError(
                f"unknown staleness distribution {parts[0]!r} in spec {spec!r}; "
                f"allowed names: {', '.join(_DISTRIBUTIONS)} ({allowed})"
            )
        elif name == "fixed":
            if len(parts) != 2:
                raise ValueError(f"staleness spec {spec!r}: 'fixed' takes one value, e.g. 'fixed:4'")
            n = _parse_int(parts[1], "staleness", spec)
            dist = StalenessDistribution("fixed", n, bound=n)
        elif name == "uniform":
            if len(parts) != 3:
                raise ValueError(f"staleness spec {spec!r}: 'uniform' takes two values, e.g. 'uniform:0:8'")
            lo, hi = _parse_int(parts[1], "uniform low", spec), _parse_int(parts[2], "uniform high", spec)
            if lo > hi:
                raise ValueError(f"staleness spec {spec!r}: low {lo} is above high {hi}")
            dist = StalenessDistribution("uniform", lo, hi, bound=hi)
        else:  # geometric
            if len(parts) != 2:
                raise ValueError(f"staleness spec {spec!r}: 'geometric' takes one mean, e.g. 'geometric:4'")
            try:
                mean = float(parts[1])
            except ValueError:
                mean = float("nan")
            if not math.isfinite(mean) or mean < 0:
                raise ValueError(f"staleness spec {spec!r}: geometric mean must be a number >= 0, got {parts[1]!r}")
            bound = max(1, int(math.ceil(4 * mean))) if max_staleness is None else max_staleness
            dist = StalenessDistribution("geometric", mean, bound=bound)
    else:
        raise ValueError(f"staleness spec must be {allowed}; got {spec!r} of type {type(spec).__name__}")

    if max_staleness is not None:
        max_staleness = _parse_int(max_staleness, "max_staleness", max_staleness)
        if dist.kind != "geometric" and dist.bound > max_staleness:
            raise ValueError(
                f"staleness spec {spec!r} can produce {dist.bound}, above max_staleness={max_staleness}"
            )
        dist = StalenessDistribution(dist.kind, dist.a, dist.b, bound=max_staleness)
    return dist


@dataclass
class Released(Generic[T]):
    """An item leaving the queue: its submission index, its staleness and the payload."""

    index: int
    staleness: int
    item: T


class BoundedStalenessQueue(Generic[T]):
    """FIFO queue of in-flight items with a bound on how many may be pending.

    ``submit(item, delay)`` enqueues an item that becomes ready once ``delay`` later items have been
    submitted. Items leave strictly in submission order, each exactly once. While more than
    ``max_staleness`` items are pending, the oldest is released at once (the bounded-staleness rule), so
    the staleness of every released item is at most ``max_staleness``.

    Counters: ``submitted == released + in_flight`` at all times.
    """

    def __init__(self, max_staleness: int) -> None:
        self.max_staleness = _parse_int(max_staleness, "max_staleness", max_staleness)
        self._pending: deque[tuple[int, int, T]] = deque()  # (index, due_index, item)
        self._out: list[Released[T]] = []
        self.submitted = 0
        self.released = 0

    @property
    def in_flight(self) -> int:
        return len(self._pending) + len(self._out)

    def _release_head(self) -> None:
        index, _, item = self._pending.popleft()
        # items are FIFO, so every later submission is counted by ``submitted - 1 - index``
        self._out.append(Released(index, self.submitted - 1 - index, item))

    def submit(self, item: T, delay: int = 0) -> int:
        """Enqueue ``item``; it is ready after ``delay`` more submissions. Returns its index."""
        delay = _parse_int(delay, "delay", delay)
        index = self.submitted
        self.submitted += 1
        self._pending.append((index, index + delay, item))
        while len(self._pending) > self.max_staleness:
            self._release_head()
        return index

    def ready(self) -> list[Released[T]]:
        """Release the ready prefix of the queue, oldest first."""
        now = self.submitted - 1
        while self._pending and self._pending[0][1] <= now:
            self._release_head()
        return self._take()

    def release_while(self, predicate: Callable[[T], bool]) -> list[Released[T]]:
        """Release the head early while ``predicate(item)`` holds (an eager exchange: its reduction completed),
        oldest first; with :meth:`ready` the head still leaves at the latest when due."""
        while self._pending and predicate(self._pending[0][2]):
            self._release_head()
        return self._take()

    def drain(self) -> list[Released[T]]:
        """Release everything pending, oldest first."""
        while self._pending:
            self._release_head()
        return self._take()

    def _take(self) -> list[Released[T]]:
        out, self._out = self._out, []
        self.released += len(out)
        return out

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self, encode: Callable[[T], Any] = lambda item: item) -> dict[str, Any]:
        """The counters, the items released but not yet taken (``"out"``: index, staleness, item) and every
        pending item (``"pending"``: index, due point, item), oldest first; each item as ``encode(item)``.

        Nothing is released: saving never changes what the queue hands out next.
        """
        return {
            "submitted": self.submitted,
            "released": self.released,
            "out": [{"index": r.index, "staleness": r.staleness, "item": encode(r.item)} for r in self._out],
            "pending": [{"index": i, "due": d, "item": encode(x)} for i, d, x in self._pending],
        }

    def load_state_dict(self, state: dict[str, Any], decode: Callable[[Any], T] = lambda item: item) -> None:
        """Put back what :meth:`state_dict` saved, each item as ``decode(saved)``.

        Raises:
            ValueError: if the counters and the items do not balance (a corrupt state).
        """
        submitted, released = int(state["submitted"]), int(state["released"])
        out, pending = list(state.get("out", [])), list(state["pending"])
        indices = [int(e["index"]) for e in out + pending]
        if indices != list(range(released, submitted)):
            raise ValueError(
                f"inconsistent queue state: submitted={submitted}, released={released}, in-flight indices {indices} "
                f"(expected {list(range(released, submitted))})"
            )
        self._out = [Released(int(e["index"]), int(e["staleness"]), decode(e["item"])) for e in out]
        self._pending = deque((int(e["index"]), int(e["due"]), decode(e["item"])) for e in pending)
        self.submitted, self.released = submitted, released


class StalenessStats:
    """Running count, mean, max and histogram of observed staleness values."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0
        self.max = 0
        self.histogram: list[int] = []

    def update(self, values: int | Iterable[int]) -> None:
        for tau in [values] if isinstance(values, int) else values:
            tau = int(tau)
            if tau < 0:
                raise ValueError(f"staleness must be >= 0, got {tau}")
            if tau >= len(self.histogram):
                self.histogram.extend([0] * (tau + 1 - len(self.histogram)))
            self.histogram[tau] += 1
            self.count += 1
            self.total += tau
            self.max = max(self.max, tau)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def merge(self, other: "StalenessStats") -> "StalenessStats":
        merged = StalenessStats()
        merged.load_state_dict(self.state_dict())
        for tau, n in enumerate(other.histogram):
            merged.update([tau] * n)
        return merged

    def state_dict(self) -> dict[str, Any]:
        return {"histogram": list(self.histogram)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__init__()
        for tau, n in enumerate(state.get("histogram", [])):
            self.update([tau] * int(n))

    def summary(self) -> str:
        if not self.count:
            return "staleness: no gradient applied yet"
        return f"staleness: mean {self.mean:.2f}, max {self.max}, applied {self.count}, histogram {self.histogram}"
