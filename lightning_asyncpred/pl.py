"""The classes for ``import pytorch_lightning as pl`` (``lightning_asyncpred.L``: for ``import lightning as L``)."""

from lightning_asyncpred._api import *  # noqa: F401,F403
from lightning_asyncpred._api import __all__  # noqa: F401
