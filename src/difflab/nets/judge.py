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


GLYPHS_FEATURE_DIM = 128
GLYPHS_IMAGE_SHAPE = (3, 32, 32)
#: The heads of :class:`GlyphsJudge`, in order.
GLYPHS_HEADS = ("character", "family", "weight", "slant", "colour", "background")


class GlyphsJudge(nn.Module):
    """CNN for ``(N, 3, 32, 32)`` glyphs in ``[-1, 1]`` (``evaluate/glyphs_judge.py`` trains and
    caches it): a shared body of four 3x3 convolutions (the first with stride 2) and two 2x2
    poolings down to 4x4, a 128-unit feature layer, and six linear heads reading the character
    (the 62 Latin classes of the training split), the font family, the weight (regular, bold),
    the slant (upright, italic), the glyph colour and the background colour. No dropout, no
    batch norm: training and evaluation modes agree."""

    def __init__(self, width: int = 32) -> None:
        from difflab.data.glyphs import FAMILIES, LATIN, PALETTE

        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1),  # 16x16
            nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(4 * width, 4 * width, 3, padding=1),
            nn.GELU(),
            nn.Flatten(),
            nn.Linear(4 * width * 4 * 4, GLYPHS_FEATURE_DIM),
            nn.GELU(),
        )
        sizes = {
            "character": len(LATIN),
            "family": len(FAMILIES),
            "weight": 2,
            "slant": 2,
            "colour": len(PALETTE),
            "background": len(PALETTE),
        }
        self.heads = nn.ModuleDict(
            {name: nn.Linear(GLYPHS_FEATURE_DIM, sizes[name]) for name in GLYPHS_HEADS}
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Logits of each head, ``{"character": (N, 62), "family": (N, 7), "weight": (N, 2),
        "slant": (N, 2), "colour": (N, 10), "background": (N, 10)}``."""
        h = self.body(x)
        return {name: head(h) for name, head in self.heads.items()}

    def _prepare(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != GLYPHS_IMAGE_SHAPE:
            raise ValueError(f"expected glyphs of shape (N, 3, 32, 32), got {tuple(x.shape)}")
        weight = self.heads["character"].weight
        return x.to(device=weight.device, dtype=weight.dtype)

    @torch.inference_mode()
    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations ``(N, 128)``: the space of the feature Frechet distance."""
        return self.body(self._prepare(x))

    @torch.inference_mode()
    def predict(self, x: Tensor) -> dict[str, Tensor]:
        """Most probable class ``(N,)`` of each head, keyed by :data:`GLYPHS_HEADS`."""
        return {name: logits.argmax(dim=1) for name, logits in self(self._prepare(x)).items()}
