"""Gradient exchanges: transports behind one contract (pure torch, no Lightning)."""

from lightning_asyncpred.exchange.allreduce import (
    AllReduceExchange,
    PeerLostError,
    PeerMonitor,
    check_mode,
    describe_peer_failure,
    to_timedelta,
)
from lightning_asyncpred.exchange.base import Exchange, ReadyGradient
from lightning_asyncpred.exchange.buckets import GradientBuckets, sum_buckets
from lightning_asyncpred.exchange.simulated import SimulatedExchange

__all__ = [
    "AllReduceExchange",
    "Exchange",
    "GradientBuckets",
    "PeerLostError",
    "PeerMonitor",
    "ReadyGradient",
    "SimulatedExchange",
    "check_mode",
    "describe_peer_failure",
    "sum_buckets",
    "to_timedelta",
]

# ------------------------------------------------------------------ transports for multi-process strategies
# A transport factory takes keyword arguments ``max_staleness, mode, group, timeout, monitor, buckets``
# (a :class:`GradientBuckets` describing the layout) and returns an :class:`Exchange`. A new transport
# (e.g. point-to-point) registers itself here and ``AsyncPredStrategy(transport=...)`` picks it up.
TRANSPORTS = {}


def register_transport(name, factory, override=False):
    """Make ``factory`` available as ``AsyncPredStrategy(transport=name)``."""
    if name in TRANSPORTS and not override:
        raise ValueError(f"transport {name!r} is already registered; pass override=True to replace it")
    TRANSPORTS[name] = factory


def create_exchange(transport, **kwargs):
    """Build the exchange of a registered ``transport``."""
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}; registered: {', '.join(sorted(TRANSPORTS))}")
    return TRANSPORTS[transport](**kwargs)


def _allreduce_factory(max_staleness, mode, group, timeout, monitor, buckets=None):
    return AllReduceExchange(max_staleness, mode=mode, group=group, timeout=timeout, monitor=monitor)


register_transport("allreduce", _allreduce_factory)
__all__ += ["TRANSPORTS", "create_exchange", "register_transport"]
