"""GoogLeNet (Inception v1) from torchvision, randomly initialised, with the two auxiliary classifiers.

In training mode the model returns ``GoogLeNetOutputs(logits, aux_logits2, aux_logits1)``;
:class:`~lightning_asyncpred.module.ImageClassifier` adds ``0.3 *`` each auxiliary head's loss
(``aux_loss_weight``). In eval mode it returns the main logits only, so the heads are ignored.

Input size: any size from 32x32 up works (the auxiliary heads use adaptive 4x4 pooling); 224 is the
reference. The tests use 64.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision import models as tvm

from lightning_asyncpred.models import register_model


@register_model("googlenet")
def googlenet(num_classes: int = 1000, aux_logits: bool = True, transform_input: bool = False, **kwargs: Any) -> nn.Module:
    """``torchvision.models.googlenet(weights=None, init_weights=True, aux_logits=True, ...)``."""
    return tvm.googlenet(
        weights=None,
        num_classes=num_classes,
        aux_logits=aux_logits,
        transform_input=transform_input,
        init_weights=True,
        **kwargs,
    )
