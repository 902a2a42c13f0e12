"""Gradient exchanges: transports behind one contract (pure torch, no Lightning)."""

from lightning_asyncpred.exchange.base import Exchange, ReadyGradient
from lightning_asyncpred.exchange.buckets import GradientBuckets, sum_buckets
from lightning_asyncpred.exchange.simulated import SimulatedExchange

__all__ = ["Exchange", "GradientBuckets", "ReadyGradient", "SimulatedExchange", "sum_buckets"]
