"""Data modules."""

from lightning_asyncpred.data.digits import DigitsDataModule
from lightning_asyncpred.data.folder import CorruptImageError
from lightning_asyncpred.data.imagenet import ImageNetDataModule

__all__ = ["CorruptImageError", "DigitsDataModule", "ImageNetDataModule"]
