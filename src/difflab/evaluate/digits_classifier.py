"""The judge for generated digits: a small CNN trained on the real 8x8 digits of scikit-learn.

It serves the quality benchmark of the digits demo (issue 2) and the fidelity axis of the guidance
trade-off (issue 4): ``predict`` gives the class a generated digit is read as (accuracy on
class-conditional samples), and ``features`` gives the 64-dimensional penultimate activations in
which Frechet distances and precision/recall are measured.

Data convention: the digits as :func:`difflab.data.images.digits` gives them, ``(N, 1, 8, 8)``
in ``[-1, 1]`` on the 8-bit grid. Samples stored in ``[0, 1]`` (as ``difflab sample`` writes them)
must be mapped back with ``2 x - 1`` before they are judged.

The network is trained once on the training split of :func:`difflab.data.images.digits_split`
(seeded, about five seconds on one CPU core, about 99% held-out accuracy) and cached as
safetensors under ``$DIFFLAB_CACHE`` or ``~/.cache/difflab``; :func:`load_digits_classifier`
retrains when the file is missing or unreadable.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.data.images import digits_split
from difflab.evaluate.cached import load_cached, save_cached
from difflab.files import cache_folder
from difflab.nets.judge import DigitsClassifier

# Bump when the architecture, the data split or the training recipe changes: it names the cache
# file, so a stale classifier is never loaded.
CACHE_VERSION = 2
EPOCHS = 15
BATCH_SIZE = 64
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-2


def _random_shift(x: Tensor, generator: torch.Generator) -> Tensor:
    """Translate each image by -1, 0 or +1 pixel along each axis, filling with background (-1)."""
    n, height, width = x.shape[0], x.shape[2], x.shape[3]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    offsets = torch.randint(0, 3, (n, 2), generator=generator)
    rows = offsets[:, 0, None] + torch.arange(height)
    cols = offsets[:, 1, None] + torch.arange(width)
    return padded[torch.arange(n)[:, None, None], 0, rows[:, :, None], cols[:, None, :]].unsqueeze(
        1
    )


def _initial_model(seed: int) -> DigitsClassifier:
    """A freshly initialised network, seeded without touching the caller's global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DigitsClassifier()


def train_digits_classifier(
    x: Tensor, y: Tensor, *, seed: int = 0, epochs: int = EPOCHS
) -> DigitsClassifier:
    """Train a :class:`DigitsClassifier` on ``(x, y)`` with cross-entropy, deterministically.

    AdamW (learning rate 3e-3 with a one-cycle schedule, weight decay 1e-2), batches of 64,
    random one-pixel shifts as augmentation. All randomness comes from ``seed``; the caller's
    global random state is left untouched.
    """
    steps_per_epoch = -(-len(y) // BATCH_SIZE)
    generator = torch.Generator().manual_seed(seed)
    model = _initial_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=LEARNING_RATE, total_steps=epochs * steps_per_epoch
    )
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(BATCH_SIZE):
            loss = F.cross_entropy(model(_random_shift(x[batch], generator)), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval().requires_grad_(False)


def load_digits_classifier(cache_dir: str | Path | None = None, seed: int = 0) -> DigitsClassifier:
    """The classifier trained on ``digits_split(seed)``'s training split, from the cache if there.

    The weights live in ``<cache_dir>/digits_classifier_v<CACHE_VERSION>_seed<seed>.safetensors``
    (:func:`difflab.files.cache_folder`). A missing or unreadable file is (re)trained (a few
    seconds) and written atomically, so concurrent users never read a half-written file.
    """
    path = cache_folder(cache_dir) / f"digits_classifier_v{CACHE_VERSION}_seed{seed}.safetensors"
    cached = load_cached(_initial_model(seed), path, "digits classifier")
    if cached is not None:
        return cached
    train, _ = digits_split(seed=seed)
    model = train_digits_classifier(train.x, train.labels, seed=seed)
    save_cached(model, path, {"version": str(CACHE_VERSION), "seed": str(seed)})
    return model
