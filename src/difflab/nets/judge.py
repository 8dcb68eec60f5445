"""The network of the digits judge (``evaluate/digits_classifier.py`` trains and caches it)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

NUM_CLASSES = 10
FEATURE_DIM = 64
IMAGE_SHAPE = (1, 8, 8)


class DigitsClassifier(nn.Module):
    """CNN for ``(N, 1, 8, 8)`` digits in ``[-1, 1]``: three 3x3 convolutions with two 2x2 poolings,
    a 64-unit feature layer, and a linear read-out to the 10 classes (no dropout, no batch norm, so
    training and evaluation modes compute the same function)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 2 * 2, FEATURE_DIM),
            nn.GELU(),
        )
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(N, 10)``."""
        return self.head(self.body(x))

    def _prepare(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(f"expected digits of shape (N, 1, 8, 8), got {tuple(x.shape)}")
        weight = self.head.weight
        return x.to(device=weight.device, dtype=weight.dtype)

    @torch.inference_mode()
    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations ``(N, 64)``: the space of the feature Frechet distance."""
        return self.body(self._prepare(x))

    @torch.inference_mode()
    def predict(self, x: Tensor) -> Tensor:
        """Most probable class ``(N,)`` of each digit."""
        return self(self._prepare(x)).argmax(dim=1)

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        """Share of digits ``x`` whose predicted class equals the label ``y``."""
        return float((self.predict(x) == y.to(self.head.weight.device)).float().mean())
