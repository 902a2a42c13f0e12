"""lightning-asyncpred: asynchronous data-parallel training with linear parameter prediction for Lightning.

Importing the package registers the strategies (``async_pred``, ``async_pred_allreduce``, ``async_pred_sim``) in Lightning's
``StrategyRegistry``. The package uses the ``pytorch_lightning`` namespace throughout.
"""

from lightning_asyncpred.callbacks import LinearPrediction, StalenessMonitor, StalenessRemedies
from lightning_asyncpred.data import DigitsDataModule, ImageNetDataModule
from lightning_asyncpred.exchange import AllReduceExchange, ExchangeThreadError, PeerLostError
from lightning_asyncpred.module import ImageClassifier
from lightning_asyncpred.prediction import LinearPredictor
from lightning_asyncpred.registry import register_strategies
from lightning_asyncpred.staleness import BoundedStalenessQueue, StalenessStats, parse_staleness
from lightning_asyncpred.strategies import AsyncPredStrategy, ModelMismatchError, SimulatedAsyncStrategy

__version__ = "0.1.0"

register_strategies()

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
    "SimulatedAsyncStrategy",
    "StalenessMonitor",
    "StalenessRemedies",
    "StalenessStats",
    "parse_staleness",
    "register_strategies",
]
