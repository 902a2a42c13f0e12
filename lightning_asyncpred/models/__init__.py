"""Model factory: ``create_model(name, num_classes, **kwargs)`` over a registry of architectures."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from lightning_asyncpred.validation import check_int

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a builder ``fn(num_classes, **kwargs) -> nn.Module`` under ``name``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return wrap


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build the architecture ``name`` with ``num_classes`` outputs."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available_models())}")
    check_int("num_classes", num_classes, 1)
    return _REGISTRY[name](num_classes=num_classes, **kwargs)


from lightning_asyncpred.models import digits  # noqa: E402,F401  (registers digits_cnn)
from lightning_asyncpred.models import googlenet, nin, resnet  # noqa: E402,F401  (register googlenet, nin, resnet*)

__all__ = ["available_models", "create_model", "register_model"]
