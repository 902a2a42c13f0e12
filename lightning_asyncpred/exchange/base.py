"""The exchange contract shared by every transport (pure torch, no Lightning).

A strategy hands each step's local gradient, flattened into a few buckets, to an exchange and asks it
for what is ready to apply. Ready results come back in a fixed order, identical on every rank.

- ``submit(step, buckets)``: non-blocking; the exchange copies or takes over the buckets.
- ``ready()``: results whose exchange finished; blocks only while more than ``max_staleness``
  submissions are in flight.
- ``drain()``: everything still in flight (checkpoint, end of fit, teardown).
- ``close()``: idempotent, also after a failed setup.

Accounting: ``submitted == applied + in_flight`` always, where ``applied`` counts results handed out by
``ready()``/``drain()``; nothing submitted is lost and nothing is handed out twice.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from torch import Tensor

from lightning_asyncpred.staleness import StalenessStats, _parse_int


@dataclass
class ReadyGradient:
    """An exchanged gradient ready to apply.

    ``buckets`` hold the gradient (the mean over the ``count`` gradients it aggregates) laid out like the
    submitted buckets; ``step`` is the step it was computed at and ``staleness`` the number of updates
    submitted after it before it became ready.
    """

    step: int
    staleness: int
    count: int
    buckets: list[Tensor]


class Exchange(abc.ABC):
    """Base class of the transports: bookkeeping and the public contract."""

    name = "exchange"

    def __init__(self, max_staleness: int) -> None:
        self.max_staleness = _parse_int(max_staleness, "max_staleness", max_staleness)
        self.stats = StalenessStats()
        self.submitted = 0
        self.applied = 0
        self.closed = False

    @property
    def in_flight(self) -> int:
        return self.submitted - self.applied

    @property
    def expected_staleness(self) -> float:
        """The staleness the next submission is expected to have (for the prediction horizon)."""
        return self.stats.mean if self.stats.count else float(self.max_staleness)

    def submit(self, step: int, buckets: list[Tensor]) -> None:
        if self.closed:
            raise RuntimeError(f"{type(self).__name__}.submit() after close()")
        self._submit(step, buckets)
        self.submitted += 1

    def ready(self) -> list[ReadyGradient]:
        return self._account(self._ready())

    def drain(self) -> list[ReadyGradient]:
        if self.closed:
            return []
        out = self._account(self._drain())
        if self.in_flight:
            raise RuntimeError(f"{type(self).__name__}.drain() left {self.in_flight} gradients in flight")
        return out

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._close()

    def _account(self, results: list[ReadyGradient]) -> list[ReadyGradient]:
        self.applied += len(results)
        self.stats.update(r.staleness for r in results)
        return results

    @abc.abstractmethod
    def _submit(self, step: int, buckets: list[Tensor]) -> None: ...

    @abc.abstractmethod
    def _ready(self) -> list[ReadyGradient]: ...

    @abc.abstractmethod
    def _drain(self) -> list[ReadyGradient]: ...

    def _close(self) -> None:  # noqa: B027  (optional hook, no-op by default)
        """Release transport resources. Called once."""
