"""Lightning strategies that apply gradients asynchronously through an exchange."""

from lightning_asyncpred.strategies.base import AsyncUpdateMixin
from lightning_asyncpred.strategies.distributed import AsyncPredStrategy, ModelMismatchError
from lightning_asyncpred.strategies.simulated import SimulatedAsyncStrategy

__all__ = ["AsyncPredStrategy", "AsyncUpdateMixin", "ModelMismatchError", "SimulatedAsyncStrategy"]
