"""A residual MLP denoiser for vector data (2-D toys, tabular data, small latents).

``x_t (B, dim) -> prediction (B, dim)``. The input is lifted to width ``hidden``, passed through
``depth`` pre-norm residual blocks that each read the conditioning vector
``e = MLP(PE(c_noise)) + E[y]`` (:mod:`difflab.nets.embeddings`) as a scale and shift

    h <- h + W_2 SiLU(W_1 (LN(h) (1 + s(e)) + b(e))),

and projected back by a zero-initialised linear layer, so the output is exactly ``0`` at
initialisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.nets.embeddings import ConditionEmbedding, check_sizes


class MLPBlock(nn.Module):
    """``h -> h + W_2 SiLU(W_1 (LN(h) (1 + s) + b))`` with ``(s, b) = Linear(SiLU(e))``."""

    def __init__(self, hidden: int, emb_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.film = nn.Linear(emb_dim, 2 * hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, emb_act: Tensor) -> Tensor:
        scale, shift = self.film(emb_act).chunk(2, dim=1)
        a = torch.addcmul(shift, self.norm(h), 1.0 + scale)
        return h + self.fc2(F.silu(self.fc1(a)))


class MLPDenoiserNet(nn.Module):
    """Residual MLP ``forward(x, c_noise, class_labels=None) -> (B, dim)``.

    Args:
        dim: size of each data vector.
        hidden: width of the residual stream (and of the conditioning vector).
        depth: number of residual blocks.
        num_classes: enables ``class_labels``; index ``num_classes`` is the NULL class, used when
            ``class_labels`` is ``None``.
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 4, num_classes: int | None = None):
        super().__init__()
        check_sizes({"dim": dim, "hidden": hidden}, {"depth": depth})
        self.dim = dim
        self.embed = ConditionEmbedding(hidden, num_classes, freq_dim=hidden + hidden % 2)
        self.proj_in = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(MLPBlock(hidden, hidden) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden)
        self.proj_out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    @property
    def null_class(self) -> int | None:
        """Index of the NULL (unconditional) label, ``num_classes``; ``None`` if unconditional."""
        return self.embed.null_class

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected x of shape (B, {self.dim}), got {tuple(x.shape)}")
        emb_act = F.silu(self.embed(c_noise, class_labels, x.shape[0]))
        h = self.proj_in(x)
        for block in self.blocks:
            h = block(h, emb_act)
        return self.proj_out(F.silu(self.norm_out(h)))
