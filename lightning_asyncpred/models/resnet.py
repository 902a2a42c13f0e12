"""torchvision ResNets / ResNeXts / wide ResNets, randomly initialised (``weights=None``: nothing is downloaded)."""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision import models as tvm

from lightning_asyncpred.models import register_model

RESNETS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)


def _register(name: str) -> None:
    builder = getattr(tvm, name)

    def build(num_classes: int = 1000, zero_init_residual: bool = False, **kwargs: Any) -> nn.Module:
        """``torchvision.models.<name>(weights=None, num_classes=..., zero_init_residual=..., **kwargs)``."""
        return builder(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual, **kwargs)

    build.__name__ = name
    register_model(name)(build)


for _name in RESNETS:
    _register(_name)
