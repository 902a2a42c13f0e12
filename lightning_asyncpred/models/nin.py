"""Network in Network (Lin, Chen, Yan 2014), the ImageNet variant of the Caffe model zoo (top-1 59.4%).

Layers (ReLU after every convolution, Caffe's round-up pooling = ``ceil_mode=True``)::

    conv 11x11/4 96   -> 1x1 96  -> 1x1 96   -> maxpool 3/2
    conv 5x5 p2 256   -> 1x1 256 -> 1x1 256  -> maxpool 3/2
    conv 3x3 p1 384   -> 1x1 384 -> 1x1 384  -> maxpool 3/2 -> dropout 0.5
    conv 3x3 p1 1024  -> 1x1 1024 -> 1x1 num_classes -> global average pool

7,595,176 parameters with 1000 classes (the Caffe model's count). Spatial sizes at 224: 54, 27, 13, 6.
The smallest input it accepts is 55x55. Initialisation: Kaiming-normal (fan-out, ReLU) for every conv but
the classifier conv, which gets N(0, 0.01) (the Caffe model used Gaussian initialisers).
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_asyncpred.models import register_model


def _mlpconv(in_ch: int, out_ch: int, kernel: int, stride: int, padding: int, mid: int | None = None, last: int | None = None) -> list[nn.Module]:
    mid = out_ch if mid is None else mid
    last = out_ch if last is None else last
    return [
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_ch, mid, 1),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, last, 1),
        nn.ReLU(inplace=True),
    ]


class NiN(nn.Module):
    """Network in Network for ImageNet; input ``(N, 3, H, W)`` with ``H, W >= 55``, output ``(N, num_classes)``."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_mlpconv(3, 96, 11, 4, 0),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            *_mlpconv(96, 256, 5, 1, 2),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            *_mlpconv(256, 384, 3, 1, 1),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Dropout(dropout),
            *_mlpconv(384, 1024, 3, 1, 1, last=num_classes),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        convs = [m for m in self.modules() if isinstance(m, nn.Conv2d)]
        for conv in convs[:-1]:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        nn.init.normal_(convs[-1].weight, 0.0, 0.01)
        nn.init.zeros_(convs[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


@register_model("nin")
def nin(num_classes: int = 1000, **kwargs) -> nn.Module:
    return NiN(num_classes=num_classes, **kwargs)
