"""Training-step throughput of the demo's denoiser against diffusers' UNet2DModel (issue 2).

Both networks are class-conditional U-Nets for 8x8 digits with two levels of 32 and 64 channels,
one residual block per level (diffusers: ``layers_per_block=1``), self-attention at 4x4 and in
the middle block, and a null class; both train with the same eps-prediction L_simple step
(cosine schedule, AdamW, batch 128), in the same process, alternating rounds so that machine
load hits both alike. Prints parameters, images/s and the ratio.

Usage: ``python benchmarks/bench_training.py [--rounds 5 --steps 20]``.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch import nn

from difflab.gaussian.objectives import loss_fn
from difflab.gaussian.parameterization import Denoiser
from difflab.recipes import load_config
from difflab.recipes.image import build_net, build_schedule


def diffusers_unet() -> nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=11,
        norm_num_groups=8,
    )


class DiffusersNet(nn.Module):
    """Adapter to difflab's network signature ``(x, c_noise, class_labels)``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels=None) -> torch.Tensor:
        return self.unet(x, c_noise, class_labels=class_labels).sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    _, cfg = load_config("digits")
    schedule = build_schedule(cfg.diffusion)
    torch.manual_seed(0)
    nets = {"difflab UNet": build_net(cfg.model, (1, 8, 8), 10), "diffusers UNet2DModel": None}
    nets["diffusers UNet2DModel"] = DiffusersNet(diffusers_unet())
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch_size, 1, 8, 8, generator=gen) * 2 - 1
    y = torch.randint(0, 10, (args.batch_size,), generator=gen)
    optims = {k: torch.optim.AdamW(n.parameters(), lr=1e-3) for k, n in nets.items()}
    seconds = dict.fromkeys(nets, 0.0)

    def step(name: str) -> None:
        den = Denoiser(nets[name], schedule, "eps")
        loss = loss_fn(den, x, {"class_labels": y}, generator=gen)
        optims[name].zero_grad(set_to_none=True)
        loss.backward()
        optims[name].step()

    for name in nets:  # warm-up
        for _ in range(3):
            step(name)
    for _ in range(args.rounds):
        for name in nets:
            start = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            seconds[name] += time.perf_counter() - start
    total = args.rounds * args.steps * args.batch_size
    rate = {k: total / v for k, v in seconds.items()}
    threads = torch.get_num_threads()
    print(f"machine: {platform.machine()}, {threads} threads, torch {torch.__version__}")
    print(f"batch {args.batch_size}, {args.rounds} x {args.steps} steps each")
    print("\n| network | parameters | training images/s | ratio to diffusers |")
    print("|---|---:|---:|---:|")
    for name, net in nets.items():
        params = sum(p.numel() for p in net.parameters())
        ratio = rate[name] / rate["diffusers UNet2DModel"]
        print(f"| {name} | {params:,} | {rate[name]:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
