"""Register this package's strategies in Lightning's ``StrategyRegistry`` (on import, idempotent)."""

from __future__ import annotations

from pytorch_lightning.strategies import StrategyRegistry

from lightning_asyncpred.strategies import AsyncPredStrategy, SimulatedAsyncStrategy

_STRATEGIES = {
    "async_pred_sim": (SimulatedAsyncStrategy, "one device, simulated asynchronous staleness (lightning-asyncpred)", {}),
    "async_pred": (
        AsyncPredStrategy,
        "multi-process asynchronous SGD, point-to-point transport with sharded owners (lightning-asyncpred)",
        {"transport": "p2p"},
    ),
    "async_pred_p2p": (
        AsyncPredStrategy,
        "multi-process asynchronous SGD, point-to-point transport with sharded owners (lightning-asyncpred)",
        {"transport": "p2p"},
    ),
    "async_pred_allreduce": (
        AsyncPredStrategy,
        "multi-process asynchronous SGD, stale-synchronous all_reduce transport (lightning-asyncpred)",
        {"transport": "allreduce"},
    ),
    "async_pred_horovod": (
        AsyncPredStrategy,
        "multi-process asynchronous SGD over Horovod's allreduce_async_, launched with horovodrun (lightning-asyncpred)",
        {"transport": "horovod"},
    ),
}


def register_strategies() -> list[str]:
    """Register every strategy name not yet in the registry; returns the names this call registered."""
    added = []
    for name, (cls, description, params) in _STRATEGIES.items():
        if name in StrategyRegistry:
            continue
        StrategyRegistry.register(name, cls, description=description, **params)
        added.append(name)
    return added
