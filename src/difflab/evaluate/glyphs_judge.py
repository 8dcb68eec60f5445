"""The judge for generated glyphs: a small CNN trained on the rendered glyphs of
:mod:`difflab.data.glyphs` (issue 12).

``predict`` reads six attributes of a glyph, its character (the 62 Latin classes of the training
split), font family, weight, slant, glyph colour and background colour, which the glyphs
benchmarks score against the prompts; ``features`` gives the 128-dimensional penultimate
activations in which Frechet distances are measured.

Data convention: ``(N, 3, 32, 32)`` in ``[-1, 1]``; :func:`glyphs_to_tensor` maps the uint8
``(N, 32, 32, 3)`` images of a :class:`~difflab.data.glyphs.Glyphs` there. Samples stored in
``[0, 1]`` must be mapped back with ``2 x - 1`` before they are judged.

The network is trained once on the ``train`` split (seed 0, 50,000 glyphs; see
``docs/BENCHMARKS.md`` for its time on 2 CPU cores and its held-out accuracies) and cached as
safetensors under ``$DIFFLAB_CACHE`` or ``~/.cache/difflab``; :func:`load_glyphs_judge` retrains
when the file is missing or unreadable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.data.glyphs import Glyphs, glyphs_dataset
from difflab.evaluate.cached import load_cached, save_cached
from difflab.files import cache_folder
from difflab.nets.judge import GLYPHS_HEADS, GlyphsJudge

# Bump when the architecture, the data or the training recipe changes: it names the cache file,
# so a stale judge is never loaded.
CACHE_VERSION = 2
EPOCHS = 5
BATCH_SIZE = 128
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-2
MAX_SHIFT = 2


def glyphs_to_tensor(images: np.ndarray) -> Tensor:
    """uint8 images ``(N, 32, 32, 3)`` as float ``(N, 3, 32, 32)`` in ``[-1, 1]``."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def glyphs_targets(glyphs: Glyphs) -> dict[str, Tensor]:
    """The label of each head of :class:`GlyphsJudge` (int64 ``(N,)``), keyed by head name."""
    values = {
        "character": glyphs.labels,
        "family": glyphs.attributes["family"],
        "weight": glyphs.attributes["weight"],
        "slant": glyphs.attributes["slant"],
        "colour": glyphs.attributes["colour"],
        "background": glyphs.attributes["background"],
    }
    return {
        name: torch.from_numpy(np.asarray(values[name], dtype=np.int64)) for name in GLYPHS_HEADS
    }


def _random_shift(x: Tensor, generator: torch.Generator) -> Tensor:
    """Translate each image by up to :data:`MAX_SHIFT` pixels along each axis, repeating the
    border pixels (the background) into the space uncovered."""
    n, _, height, width = x.shape
    padded = F.pad(x, (MAX_SHIFT,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * MAX_SHIFT + 1, (n, 2), generator=generator)
    rows = offsets[:, 0, None] + torch.arange(height)
    cols = offsets[:, 1, None] + torch.arange(width)
    batch = torch.arange(n)[:, None, None, None]
    channels = torch.arange(x.shape[1])[None, :, None, None]
    return padded[batch, channels, rows[:, None, :, None], cols[:, None, None, :]]


def _initial_model(seed: int) -> GlyphsJudge:
    """A freshly initialised network, seeded without touching the caller's global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GlyphsJudge()


def train_glyphs_judge(
    glyphs: Glyphs, *, seed: int = 0, epochs: int = EPOCHS, max_steps: int | None = None
) -> GlyphsJudge:
    """Train a :class:`GlyphsJudge` on ``glyphs`` (the sum of the heads' cross-entropies),
    deterministically.

    AdamW (learning rate 3e-3 with a one-cycle schedule, weight decay 1e-2), batches of 128,
    random shifts of up to two pixels as augmentation; ``max_steps`` cuts the run short (for
    tests). All randomness comes from ``seed``; the caller's global random state is left alone.
    """
    images = torch.from_numpy(np.ascontiguousarray(glyphs.images))
    targets = glyphs_targets(glyphs)
    n = len(glyphs)
    steps = epochs * -(-n // BATCH_SIZE)
    steps = min(steps, max_steps) if max_steps is not None else steps
    generator = torch.Generator().manual_seed(seed)
    model = _initial_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=LEARNING_RATE, total_steps=steps
    )
    step = 0
    while step < steps:
        for batch in torch.randperm(n, generator=generator).split(BATCH_SIZE):
            x = images[batch].permute(0, 3, 1, 2).float() / 127.5 - 1
            logits = model(_random_shift(x, generator))
            loss = sum(F.cross_entropy(logits[k], targets[k][batch]) for k in GLYPHS_HEADS)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step == steps:
                break
    return model.eval().requires_grad_(False)


def judge_accuracies(judge: GlyphsJudge, glyphs: Glyphs, chunk: int = 2048) -> dict[str, float]:
    """Share of ``glyphs`` each head reads correctly, keyed by head name."""
    targets = glyphs_targets(glyphs)
    correct = dict.fromkeys(GLYPHS_HEADS, 0)
    for lo in range(0, len(glyphs), chunk):
        predicted = judge.predict(glyphs_to_tensor(glyphs.images[lo : lo + chunk]))
        for name in GLYPHS_HEADS:
            correct[name] += int((predicted[name].cpu() == targets[name][lo : lo + chunk]).sum())
    return {name: correct[name] / max(len(glyphs), 1) for name in GLYPHS_HEADS}


def cache_path(cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """``<cache_dir>/glyphs_judge_v<CACHE_VERSION>_seed<seed>.safetensors``."""
    return cache_folder(cache_dir) / f"glyphs_judge_v{CACHE_VERSION}_seed{seed}.safetensors"


def save_glyphs_judge(judge: GlyphsJudge, path: str | Path, seed: int = 0) -> Path:
    """Write ``judge``'s weights to ``path`` as safetensors, atomically."""
    return save_cached(judge, Path(path), {"version": str(CACHE_VERSION), "seed": str(seed)})


def load_glyphs_judge(cache_dir: str | Path | None = None, seed: int = 0) -> GlyphsJudge:
    """The judge trained on ``glyphs_dataset("train", seed)``, from the cache if there
    (:func:`cache_path`). A missing or unreadable file is (re)trained (about two minutes on two
    CPU cores) and written atomically."""
    path = cache_path(cache_dir, seed)
    cached = load_cached(_initial_model(seed), path, "glyphs judge")
    if cached is not None:
        return cached
    model = train_glyphs_judge(glyphs_dataset("train", seed=seed, cache_dir=cache_dir), seed=seed)
    save_glyphs_judge(model, path, seed)
    return model
