"""Data modules."""

from lightning_asyncpred.data.digits import DigitsDataModule

__all__ = ["DigitsDataModule"]
