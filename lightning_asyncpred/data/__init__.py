"""Data modules. ``DigitsDataModule`` and ``ImageNetDataModule`` are the default Lightning namespace's here
(``lightning_asyncpred.L.data``: ``lightning.pytorch``'s), imported on first use, so the Lightning-free parts of this
package (``pool``, ``dali``, ``folder``, ``resumable``) import without Lightning."""

from __future__ import annotations

import importlib
from typing import Any

from lightning_asyncpred.data.folder import CorruptImageError

_MODULES = {"DigitsDataModule": "digits", "ImageNetDataModule": "imagenet"}

__all__ = ["CorruptImageError", "DigitsDataModule", "ImageNetDataModule"]


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from lightning_asyncpred import _namespace

    mirrored = __name__.startswith(_namespace.MIRROR)
    base = _namespace.MIRROR if mirrored or _namespace.default_namespace() != "pytorch_lightning" else _namespace.PACKAGE
    return getattr(importlib.import_module(f"{base}.data.{_MODULES[name]}"), name)
