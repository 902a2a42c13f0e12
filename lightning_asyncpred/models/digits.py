"""A small CNN for the 8x8 scikit-learn digits (about 0.14 M parameters)."""

from __future__ import annotations

from torch import nn

from lightning_asyncpred.models import register_model


class DigitsCNN(nn.Module):
    """conv3x3(32) -> ReLU -> conv3x3(64) -> ReLU -> maxpool2 -> fc(128) -> ReLU -> fc(num_classes).

    Input ``(N, 1, 8, 8)``, output logits ``(N, num_classes)``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 4 * 4, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@register_model("digits_cnn")
def digits_cnn(num_classes: int = 10, **kwargs) -> nn.Module:
    return DigitsCNN(num_classes=num_classes, **kwargs)


@register_model("digits_mlp")
def digits_mlp(num_classes: int = 10, hidden: int = 128, in_features: int = 64, **kwargs) -> nn.Module:
    """flatten -> fc(hidden) -> ReLU -> fc(hidden) -> ReLU -> fc(num_classes): a second, non-convolutional model
    for the digits benchmarks (input ``(N, 1, 8, 8)``)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))
