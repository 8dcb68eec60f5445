"""GPU benchmark (issue 13): training and sampling throughput, precision, compile, memory, and
how training scales over processes; one script for any CUDA machine, and for the CPU.

Parts (``--parts``, all by default):

- ``train``: training images/s of the ``digits`` and ``glyphs`` presets' U-Nets against
  diffusers' ``UNet2DModel`` of matched parameters (the diffusers width whose parameter count
  is nearest; same levels, one residual block per level, attention at the same resolution,
  class embedding with a null class), in the same process, alternating rounds so that machine
  load hits both alike. Both run the very step of difflab's ``Trainer`` (eps L_simple on the
  cosine schedule, AdamW, EMA, gradient clipping) under each ``--precisions`` entry (fp32,
  bf16, bf16+compile), on random data of each preset's shape (throughput does not depend on
  pixel values); peak GPU memory of each.
- ``sample``: sampling images/s of each preset's network (DDIM at 10 and 50 steps, through
  ``Run.sample``, so under the run's precision) for fp32 and bf16 runs.
- ``scaling``: ``difflab train digits`` for a fixed number of steps under ``torchrun`` with 1
  and 2 processes (``--processes``), the global batch unchanged; images/s as the trainer
  reports it (on a GPU machine: one GPU per process).

``--tiny`` shrinks every size (channels, batch, steps, samples) so that the whole script runs
in about a minute on 2 CPU cores (its test: ``--device cpu --tiny``). Prints Markdown tables.

Usage: ``python benchmarks/bench_gpu.py [--device cuda] [--parts train,sample,scaling]
[--precisions fp32,bf16,bf16+compile] [--rounds 5 --steps 20] [--processes 1,2] [--tiny]``.
"""

from __future__ import annotations

import argparse
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from difflab.config import TrainConfig
from difflab.recipes import Run, get, load_config
from difflab.recipes.image import LoadedModel, build_denoiser, build_net, make_loss
from difflab.train.trainer import Trainer

#: Each preset's data: image shape and number of classes (digits: scikit-learn's 8x8 digits;
#: glyphs: 32x32 colour characters, 62 classes).
PRESETS = {"digits": ((1, 8, 8), 10), "glyphs": ((3, 32, 32), 62)}
PRECISIONS = {"fp32": ("fp32", False), "bf16": ("bf16", False), "bf16+compile": ("bf16", True)}


class DiffusersNet(nn.Module):
    """diffusers' ``UNet2DModel`` with difflab's network signature ``(x, c_noise, labels)``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels=None) -> torch.Tensor:
        return self.unet(x, c_noise, class_labels=class_labels).sample


def diffusers_unet(cfg, shape: tuple[int, ...], classes: int, channels: int) -> nn.Module:
    """The diffusers U-Net of difflab's ``model.unet`` layout at base width ``channels``."""
    from diffusers import UNet2DModel

    u = cfg.model.unet
    widths = tuple(channels * m for m in u.channel_mults)
    resolutions = [shape[1] // 2**i for i in range(len(widths))]
    attn = [r in u.attn_resolutions for r in resolutions]
    return UNet2DModel(
        sample_size=shape[1],
        in_channels=shape[0],
        out_channels=shape[0],
        block_out_channels=widths,
        layers_per_block=u.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        num_class_embeds=classes + 1,
        norm_num_groups=8,
    )


def matched_diffusers(cfg, shape, classes: int, target: int) -> nn.Module:
    """The diffusers U-Net whose parameter count is nearest ``target`` (widths step by 8)."""
    best = None
    for channels in range(8, 4 * cfg.model.unet.channels + 1, 8):
        net = diffusers_unet(cfg, shape, classes, channels)
        gap = abs(_params(net) - target)
        if best is None or gap < best[0]:
            best = (gap, net)
    return DiffusersNet(best[1])


def _params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def preset_config(preset: str, tiny: bool):
    overrides = ["model.unet.channels=8", "model.unet.num_heads=2"] if tiny else []
    return load_config(preset, overrides)[1]


def bench_training(args, device: torch.device) -> list[str]:
    rows = ["| preset | network | parameters | precision | images/s | vs diffusers | "
            "peak GPU memory |", "|---|---|---:|---|---:|---:|---:|"]  # fmt: skip
    for preset, (shape, classes) in PRESETS.items():
        cfg = preset_config(preset, args.tiny)
        torch.manual_seed(0)
        ours = build_net(cfg.model, shape, classes)
        peer = matched_diffusers(cfg, shape, classes, _params(ours))
        nets = {"difflab": ours, "diffusers UNet2DModel": peer}
        gen = torch.Generator().manual_seed(0)
        data = (torch.rand(4096, *shape, generator=gen) * 2 - 1,
                torch.randint(0, classes, (4096,), generator=gen))  # fmt: skip
        for label, (precision, compiled) in PRECISIONS.items():
            if label not in args.precisions:
                continue
            trainers = {}
            with tempfile.TemporaryDirectory() as out:
                for name, net in nets.items():
                    train = TrainConfig(batch_size=args.batch_size or cfg.train.batch_size,
                                        lr=1e-4, warmup=1, device=str(device),
                                        precision=precision, compile=compiled, out=out)  # fmt: skip
                    loss = make_loss(cfg.diffusion, classes)
                    run = {"recipe": "bench", "config": {}}
                    trainers[name] = Trainer(net, loss, data, train, run, Path(out))
                seconds, memory = _time_steps(trainers, args, device)
            batch = next(iter(trainers.values())).cfg.batch_size
            rate = {k: args.rounds * args.steps * batch / s for k, s in seconds.items()}
            for name, net in nets.items():
                ratio = rate[name] / rate["diffusers UNet2DModel"]
                gib = "n/a" if memory[name] is None else f"{memory[name] / 2**30:.2f} GiB"
                rows.append(f"| {preset} | {name} | {_params(net):,} | {label} | "
                            f"{rate[name]:.0f} | {ratio:.2f}x | {gib} |")  # fmt: skip
    return rows


def _time_steps(trainers: dict[str, Trainer], args, device: torch.device):
    """Seconds of ``rounds x steps`` optimisation steps per trainer (alternating rounds, after
    warm-up steps that include any compilation) and each one's peak GPU memory."""
    memory: dict[str, int | None] = dict.fromkeys(trainers)
    for name, trainer in trainers.items():
        trainer.model.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            trainer.optimisation_step()
        _sync(device)
        if device.type == "cuda":
            memory[name] = torch.cuda.max_memory_allocated(device)
    seconds = dict.fromkeys(trainers, 0.0)
    for _ in range(args.rounds):
        for name, trainer in trainers.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                trainer.optimisation_step()
            _sync(device)
            seconds[name] += time.perf_counter() - start
    return seconds, memory


def bench_sampling(args, device: torch.device) -> list[str]:
    rows = ["| preset | precision | DDIM steps | images/s |", "|---|---|---:|---:|"]
    recipe = get("image")
    for preset, (shape, classes) in PRESETS.items():
        cfg = preset_config(preset, args.tiny)
        torch.manual_seed(0)
        net = build_net(cfg.model, shape, classes).to(device).eval()
        for precision in ("fp32", "bf16"):
            cfg.train.precision = precision
            model = LoadedModel(build_denoiser(net, cfg.diffusion), cfg, shape,
                                [str(i) for i in range(classes)], 0)  # fmt: skip
            run = Run(recipe, model, Path("bench"))
            for steps in (10, 50):
                run.sample(min(args.samples, 8), sampler="ddim", steps=steps, seed=0)  # warm-up
                _sync(device)
                start = time.perf_counter()
                run.sample(args.samples, sampler="ddim", steps=steps, seed=1)
                _sync(device)
                rate = args.samples / (time.perf_counter() - start)
                rows.append(f"| {preset} | {precision} | {steps} | {rate:.0f} |")
    return rows


def bench_scaling(args, device: torch.device) -> list[str]:
    """``difflab train digits`` under torchrun with each number of processes."""
    rows = ["| processes | global batch | steps | images/s |", "|---|---:|---:|---:|"]
    steps = 3 if args.tiny else args.scaling_steps
    settings = [f"train.steps={steps}", f"train.device={device.type}", "train.log_every=1000"]
    if args.tiny:
        settings += ["model.unet.channels=8", "model.unet.num_heads=2", "train.batch_size=16"]
    for n in args.processes:
        with tempfile.TemporaryDirectory() as out:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={n}", "-m", "difflab", "train", "digits", *settings,
                       f"train.out={out}/run", "--quiet"]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, check=False)
        found = re.search(r"trained (\d+) steps in [\d.]+ s \((\d+) examples/s\)", done.stdout)
        if done.returncode != 0 or found is None:
            raise SystemExit(f"torchrun with {n} processes failed:\n{done.stderr[-2000:]}")
        batch = 16 if args.tiny else preset_config("digits", False).train.batch_size
        rows.append(f"| {n} | {batch} | {found[1]} | {found[2]} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parts", default="train,sample,scaling")
    parser.add_argument("--precisions", default="fp32,bf16,bf16+compile")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--warmup", type=int, default=5, help="steps before timing")
    parser.add_argument("--batch-size", type=int, default=0, help="0: the preset's")
    parser.add_argument("--samples", type=int, default=0, help="0: 1024 on a GPU, 64 on a CPU")
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--scaling-steps", type=int, default=100)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke run")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.parts = args.parts.split(",")
    args.precisions = args.precisions.split(",")
    args.processes = [int(n) for n in args.processes.split(",")]
    unknown = [p for p in args.precisions if p not in PRECISIONS]
    if unknown:
        parser.error(f"unknown precision {unknown[0]}: choose from {', '.join(PRECISIONS)}")
    if args.tiny:
        args.rounds, args.steps, args.warmup = 1, 2, 1
        args.batch_size = args.batch_size or 8
    args.samples = args.samples or (4 if args.tiny else 1024 if device.type == "cuda" else 64)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"device: {device} ({name or platform.machine()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads{', tiny sizes' if args.tiny else ''}")  # fmt: skip
    parts = {"train": bench_training, "sample": bench_sampling, "scaling": bench_scaling}
    for part in args.parts:
        print(f"\n### {part}\n")
        print("\n".join(parts[part](args, device)))


if __name__ == "__main__":
    main()
