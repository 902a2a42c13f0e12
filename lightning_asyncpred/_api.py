"""The public classes for one Lightning namespace: ``lightning_asyncpred.pl`` (this file) and ``lightning_asyncpred.L``
(the same file for ``lightning.pytorch``, ``_namespace.py``). Importing it registers the strategies (``async_pred``,
``async_pred_allreduce``, ``async_pred_sim``, ...) in that namespace's ``StrategyRegistry``.
"""

from lightning_asyncpred import _namespace
from lightning_asyncpred.callbacks import LinearPrediction, StalenessMonitor, StalenessRemedies
from lightning_asyncpred.data.digits import DigitsDataModule
from lightning_asyncpred.data.imagenet import ImageNetDataModule
from lightning_asyncpred.exchange import AllReduceExchange, ExchangeThreadError, PeerLostError
from lightning_asyncpred.module import ImageClassifier
from lightning_asyncpred.prediction import LinearPredictor
from lightning_asyncpred.profiling import ProfileRecorder
from lightning_asyncpred.registry import register_strategies
from lightning_asyncpred.staleness import BoundedStalenessQueue, StalenessStats, parse_staleness
from lightning_asyncpred.strategies import AsyncPredStrategy, ModelMismatchError, SimulatedAsyncStrategy

LIGHTNING = "pytorch_lightning"  # the namespace of this set ("lightning.pytorch" in lightning_asyncpred.L)

register_strategies()
_namespace.activate(LIGHTNING)  # idempotent: also when the import of this Lightning came first (_namespace.py)

__all__ = [
    "AllReduceExchange",
    "AsyncPredStrategy",
    "BoundedStalenessQueue",
    "DigitsDataModule",
    "ImageClassifier",
    "ImageNetDataModule",
    "LinearPrediction",
    "LinearPredictor",
    "ModelMismatchError",
    "ExchangeThreadError",
    "PeerLostError",
    "ProfileRecorder",
    "SimulatedAsyncStrategy",
    "StalenessMonitor",
    "StalenessRemedies",
    "StalenessStats",
    "parse_staleness",
    "register_strategies",
]
