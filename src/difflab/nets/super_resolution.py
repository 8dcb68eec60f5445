"""The super-resolution network of a cascade (Ho et al. 2021; seed 004, "Cascade networks").

A U-Net whose input is ``x_t`` concatenated, on channels, with the bilinearly upsampled
conditioning image ``z_s`` and a constant channel holding its augmentation level ``s`` (the
``cascade`` recipe explains the noise-conditioning augmentation).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from difflab.nets.unet import UNet


class SuperResolutionNet(nn.Module):
    """``(x_t, c_noise, low_res, aug_level, class_labels) -> prediction``: a U-Net whose input is
    ``x_t`` concatenated with the upsampled ``[z_s, s]`` (the augmented low-resolution image and
    a constant channel holding its level ``s``)."""

    def __init__(self, unet: UNet):
        super().__init__()
        if unet.cond_channels != unet.in_channels + 1:
            raise ValueError("the U-Net needs cond_channels = in_channels + 1 (image and level)")
        self.unet = unet

    def forward(
        self,
        x: Tensor,
        c_noise: Tensor,
        low_res: Tensor,
        aug_level: Tensor,
        class_labels: Tensor | None = None,
    ) -> Tensor:
        level = (
            aug_level.to(low_res.dtype)
            .reshape(-1, 1, 1, 1)
            .expand(low_res.shape[0], 1, *low_res.shape[-2:])
        )
        return self.unet(x, c_noise, class_labels, low_res=torch.cat([low_res, level], dim=1))
