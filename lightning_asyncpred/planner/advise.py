"""The configurations ``asyncpred plan`` compares at each number of ranks, and the one it recommends (pure Python).

Candidates: ``ddp``; ``allreduce`` with ``max_staleness`` 1, 2, 4 (``fixed``; ``eager`` too on NCCL, the only
backend where completion can be polled); ``p2p`` with ``max_staleness`` 0, 1, 2; ``p2p`` in sync groups of ``k``
(powers of two up to the ranks of a node, ``max_staleness=0``).

The rule: among the asynchronous configurations whose mean staleness is at most ``max_rounds`` rounds (a round:
one ``ddp`` step's worth of updates, ``N`` arrivals at a p2p owner; what asynchrony costs in accuracy grows with it:
in the README's staleness sweep prediction recovers most of the gap at 4 rounds and little at 8, so the default
bound of 2 keeps well inside), take the most samples/s,
and among those within 3% of it the least stale. It must beat ``ddp`` by ``min_gain`` (default 5%), else ``ddp``
is the advice: asynchrony costs accuracy per sample and pays only where it buys throughput. The remedy follows
the staleness: ``LinearPrediction()`` (the default, tuned by the convergence work) from half a round up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lightning_asyncpred.planner.model import Config, Prediction


def candidates(ranks: int, backend: str = "nccl", ranks_per_node: Optional[int] = None) -> list[Config]:
    out = [Config("ddp")] + [Config("allreduce", s) for s in (1, 2, 4)]
    if backend == "nccl":
        out += [Config("allreduce", s, "eager") for s in (2, 4)]
    out += [Config("p2p", s) for s in (0, 1, 2)]
    per_node = ranks_per_node or 8
    k = 2
    while k <= min(per_node, ranks // 2):
        if ranks % k == 0:
            out.append(Config("p2p", 0, group_size=k))
        k *= 2
    return out


@dataclass
class Advice:
    ranks: int
    choice: Prediction
    reason: str
    remedy: str

    @property
    def strategy_args(self) -> str:
        c = self.choice.config
        if c.transport == "ddp":
            return 'strategy="ddp"'
        args = [f'transport="{c.transport}"', f"max_staleness={c.max_staleness}"]
        if c.mode != "fixed":
            args.append(f'mode="{c.mode}"')
        if c.group_size > 1:
            args.append(f"sync_group_size={c.group_size}")
        return f"AsyncPredStrategy({', '.join(args)})"


def advise(predictions: list[Prediction], max_rounds: float = 2.0, min_gain: float = 1.05) -> Advice:
    """The recommended configuration among ``predictions`` (one number of ranks; see the module docstring)."""
    ddp = next(p for p in predictions if p.config.transport == "ddp")
    eligible = [p for p in predictions if p.config.transport != "ddp" and p.staleness_rounds <= max_rounds]
    if not eligible:
        return Advice(ddp.ranks, ddp, f"no asynchronous configuration stays within {max_rounds:g} rounds of staleness",
                      "none")
    top = max(p.samples_per_s for p in eligible)
    best = min((p for p in eligible if p.samples_per_s >= 0.97 * top), key=lambda p: (p.staleness_rounds, -p.samples_per_s))
    gain = best.samples_per_s / ddp.samples_per_s
    if gain < min_gain:
        return Advice(ddp.ranks, ddp, f"the best asynchronous configuration ({best.config.name}) reaches only "
                      f"{gain:.2f}x ddp's samples/s (< {min_gain:g}x): asynchrony would cost accuracy for nothing",
                      "none")
    reason = (f"{gain:.2f}x ddp's samples/s ({best.efficiency:.2f} of the sum-of-rates limit; ddp "
              f"{ddp.efficiency:.2f}), mean staleness {best.staleness_rounds:.2f} rounds (<= {max_rounds:g})")
    remedy = "LinearPrediction()" if best.staleness_rounds >= 0.5 else "none needed (LinearPrediction() optional)"
    return Advice(best.ranks, best, reason, remedy)
