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
from lightning_asyncpred.exchange.owner import ShardOwner
from lightning_asyncpred.exchange.p2p import ExchangeThreadError, HandshakeError, P2PExchange
from lightning_asyncpred.exchange.simulated import SimulatedExchange

__all__ = [
    "AllReduceExchange",
    "Exchange",
    "GradientBuckets",
    "ExchangeThreadError",
    "HandshakeError",
    "P2PExchange",
    "PeerLostError",
    "PeerMonitor",
    "ReadyGradient",
    "ShardOwner",
    "SimulatedExchange",
    "check_mode",
    "describe_peer_failure",
    "sum_buckets",
    "to_timedelta",
]

# ------------------------------------------------------------------ transports for multi-process strategies
# A transport factory takes keyword arguments ``max_staleness, mode, group, timeout, monitor, buckets``
# (a :class:`GradientBuckets` describing the layout), ``optimizer`` (the user's), ``backend`` (of the data
# plane) and ``lookahead`` (of owners), ignores those it does not need, and returns an :class:`Exchange`. A new transport
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


def _allreduce_factory(max_staleness, mode, group, timeout, monitor, **_):
    return AllReduceExchange(max_staleness, mode=mode, group=group, timeout=timeout, monitor=monitor)


def _p2p_factory(max_staleness, group, timeout, monitor, buckets, optimizer, handshake_timeout=120.0, lookahead=None,
                 sync_group_size=1, **_):
    """Owner of shard ``rank`` (the buckets are the shards), looking ahead as ``lookahead`` says; the data plane
    (NCCL on CUDA, Gloo on CPU) connects and makes a round trip with every peer before this returns
    (``exchange/p2p.py``). With ``sync_group_size > 1`` the ranks' groups all-reduce and each column of the groups
    runs the data plane (``exchange/grouped.py``)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()

    def owner(arrivals_per_round):
        made = ShardOwner(optimizer, buckets.params, buckets.pieces[rank], world_size=arrivals_per_round)
        made.set_lookahead(lookahead)
        return made

    if sync_group_size > 1:
        from lightning_asyncpred.exchange.grouped import make_grouped_exchange

        return make_grouped_exchange(owner, buckets.numels, rank, sync_group_size, timeout, monitor, handshake_timeout)
    return P2PExchange(max_staleness, owner(world), buckets.numels, rank, world, control_group=group, timeout=timeout,
                       monitor=monitor, handshake_timeout=handshake_timeout)


def _horovod_factory(max_staleness, mode, timeout, monitor, **_):
    from lightning_asyncpred.exchange.horovod import HorovodExchange

    return HorovodExchange(max_staleness, mode=mode, timeout=timeout, monitor=monitor)


register_transport("allreduce", _allreduce_factory)
register_transport("horovod", _horovod_factory)
register_transport("p2p", _p2p_factory)
__all__ += ["TRANSPORTS", "create_exchange", "register_transport"]
