"""The exchange contract shared by every transport (pure torch, no Lightning).

A strategy hands each step's local gradient, flattened into a few buckets, to an exchange and asks it
for what is ready to apply. Ready results come back in a fixed order, identical on every rank.

- ``submit(step, buckets)``: non-blocking; the exchange copies or takes over the buckets.
- ``ready()``: results whose exchange finished; blocks only while more than ``max_staleness``
  submissions are in flight.
- ``drain()``: everything still in flight (checkpoint, end of fit, teardown).
- ``close()``: idempotent, also after a failed setup.
- ``state_dict()`` / ``load_state_dict(state, place)``: a checkpoint of the exchange. Saving *completes*
  every gradient in flight (waits for its communication) but applies nothing and releases nothing, so a
  checkpoint never changes the run; the completed gradients are stored (on the CPU) with their steps,
  submission indices and due points, and loading puts them back so the run continues exactly where it
  was. The saved state holds about ``in_flight`` gradient copies (``s`` in steady state).

Accounting: ``submitted == applied + in_flight`` always, where ``applied`` counts results handed out by
``ready()``/``drain()``; nothing submitted is lost and nothing is handed out twice.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, Sequence

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


def saved_gradient(step: int, buckets: Sequence[Tensor]) -> dict[str, Any]:
    """A gradient in flight as a checkpoint stores it: its step and a CPU copy of its buckets."""
    return {"step": int(step), "buckets": [b.detach().to("cpu", copy=True) for b in buckets]}


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

    def stop_gracefully(self) -> None:
        """End the exchange cleanly when the run stops early on every rank (SIGTERM): let the communication in
        flight complete, apply nothing more. Default: :meth:`drain` (the results are discarded)."""
        self.drain()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._close()

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Counters, staleness statistics and the in-flight gradients, completed but not applied."""
        if self.closed:
            raise RuntimeError(f"{type(self).__name__}.state_dict() after close()")
        return {
            "transport": self.name,
            "submitted": self.submitted,
            "applied": self.applied,
            "staleness": self.stats.state_dict(),
            "in_flight": self._state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], place: Callable[[Sequence[Tensor]], list[Tensor]] = list) -> None:
        """Restore :meth:`state_dict`; ``place`` checks a saved bucket list and moves it to the buckets' devices.

        Raises:
            ValueError: the state was saved by another transport with gradients in flight, or it is inconsistent.
        """
        if self.closed:
            raise RuntimeError(f"{type(self).__name__}.load_state_dict() after close()")
        submitted, applied = int(state["submitted"]), int(state["applied"])
        if state.get("transport") != self.name and submitted != applied:
            raise ValueError(
                f"the checkpoint holds {submitted - applied} gradients in flight of the {state.get('transport')!r} "
                f"transport, but this run uses {self.name!r}: resume with the same transport, or write the "
                "checkpoint with drain_on_save=True (which applies them before saving)"
            )
        same = state.get("transport") == self.name
        restored = self._load_state_dict(state["in_flight"], place) if same else 0
        if restored != submitted - applied:
            raise ValueError(
                f"inconsistent exchange state: submitted={submitted}, applied={applied}, but {restored} gradients in flight"
            )
        self.submitted, self.applied = submitted, applied
        self.stats.load_state_dict(state.get("staleness", {}))

    def _state_dict(self) -> Any:
        """The transport's in-flight state, completed (waited for), on the CPU."""
        raise NotImplementedError(f"the {self.name!r} transport cannot save its in-flight gradients")

    def _load_state_dict(self, state: Any, place: Callable[[Sequence[Tensor]], list[Tensor]]) -> int:
        """Put back :meth:`_state_dict`; returns how many gradients are in flight again."""
        raise NotImplementedError(f"the {self.name!r} transport cannot restore in-flight gradients")

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
