"""One-process transport: each gradient comes back after a simulated staleness ``tau``.

``tau`` is drawn per submission from a :class:`~lightning_asyncpred.staleness.StalenessDistribution`;
the gradient becomes ready once ``tau`` later gradients have been submitted, in submission order, and
never more than ``max_staleness`` are pending (:class:`~lightning_asyncpred.staleness.BoundedStalenessQueue`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_asyncpred.exchange.base import Exchange, ReadyGradient, saved_gradient
from lightning_asyncpred.staleness import BoundedStalenessQueue, Released, StalenessSpec, parse_staleness


class SimulatedExchange(Exchange):
    name = "simulated"

    def __init__(self, staleness: StalenessSpec = 0, max_staleness: int | None = None, seed: int = 0) -> None:
        self.distribution = parse_staleness(staleness, max_staleness)
        super().__init__(self.distribution.bound)
        self.queue: BoundedStalenessQueue[tuple[int, list[Tensor]]] = BoundedStalenessQueue(self.max_staleness)
        self.generator = torch.Generator().manual_seed(int(seed))

    @property
    def expected_staleness(self) -> float:
        return self.stats.mean if self.stats.count else self.distribution.mean

    def _submit(self, step: int, buckets: list[Tensor]) -> None:
        delay = self.distribution.sample(self.generator)
        self.queue.submit((step, [b.detach().clone() for b in buckets]), delay)

    @staticmethod
    def _convert(released: list[Released[tuple[int, list[Tensor]]]]) -> list[ReadyGradient]:
        return [ReadyGradient(r.item[0], r.staleness, 1, r.item[1]) for r in released]

    def _ready(self) -> list[ReadyGradient]:
        return self._convert(self.queue.ready())

    def _drain(self) -> list[ReadyGradient]:
        return self._convert(self.queue.drain())

    def _state_dict(self) -> dict:
        return {
            "queue": self.queue.state_dict(lambda item: saved_gradient(*item)),
            "generator": self.generator.get_state(),  # the staleness draws continue where they were
        }

    def _load_state_dict(self, state: dict, place) -> int:
        self.queue.load_state_dict(state["queue"], lambda e: (int(e["step"]), place(e["buckets"])))
        self.generator.set_state(state["generator"])
        return self.queue.in_flight

    def _close(self) -> None:
        self.queue.drain()
