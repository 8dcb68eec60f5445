"""Control of Diffusion-LM by classifier guidance on the continuous latents (Li et al. 2022;
seed 000): ``log p(x | y) = log p(x) + gamma log p(y | x)``, the gradient of the second term
added to the denoiser's score at every step (:class:`~difflab.gaussian.control.LikelihoodGuidance`,
``gamma`` is ``--control-scale``), or with ``--control-steps K`` Diffusion-LM's own form, ``K``
gradient steps on each ``x_{t-1}`` of DDPM's sampler
(:func:`~difflab.gaussian.control.controlled_ddpm`).

The classifier, :class:`~difflab.nets.embedding_transformer.NoisyTokenClassifier`, reads the
noisy latents ``x_t = alpha_t E(w) + sigma_t eps`` of a ``diffusion-lm`` run (its embedding
``E`` and schedule, frozen) and gives, per position, ``p_phi(w_i | x_t, t)``; it is trained by
cross-entropy on the run's training rows (``difflab train-control RUN``, into ``RUN/control``).
Each control is a closed-form function of those per-position probabilities, treating the
positions as independent given ``x_t``:

- ``length=N``: the text has ``N`` tokens, i.e. positions ``i < N`` hold words and positions
  ``i >= N`` hold ``<eos>`` or ``<pad>``: ``log p = sum_{i<N} log(1 - e_i) + sum_{i>=N} log e_i``
  with ``e_i = p_phi(w_i in {<eos>, <pad>})``. It needs a run trained on whole lines
  (``diffusion.lines=true``): the packed stream has no ends to learn. Judged by the number of
  tokens of the sample (characters for the char tokenizer), a success within +-10%.
- ``word=W``: the text contains ``W`` (its ids ``u_1..u_m``) somewhere:
  ``log p = logsumexp_j sum_k log p_phi(w_{j+k} = u_k)`` over the start positions ``j``, the
  log of the expected number of occurrences (an upper bound of the log-probability of at least
  one, close to it when occurrences are rare). Judged by ``W in text``.
- ``lines=K``: the text has ``K`` lines, i.e. ``K - 1`` newline tokens: the law of a sum of
  independent Bernoulli variables ``b_i = p_phi(w_i = newline)`` (the Poisson-binomial), computed
  by dynamic programming over the positions in log space. Judged by ``text.count("\\n") + 1``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.data.text import EOS_ID, PAD_ID, UNK_ID, Tokenizer, pack_texts
from difflab.errors import UserError
from difflab.gaussian.control import CONTROL_STEP_SIZE, Guide, LogLikelihoodFn
from difflab.gaussian.embedding import draw_times
from difflab.gaussian.schedules import Schedule
from difflab.nets.embedding_transformer import NoisyTokenClassifier
from difflab.recipes.text.continuous import line_rows
from difflab.recipes.text.train import load_splits
from difflab.train.checkpoint import FILENAME, load_checkpoint
from difflab.train.trainer import Trainer, TrainResult, load_ema

#: The controls, ``--control NAME=VALUE``.
CONTROLS = ("length", "word", "lines")
#: Where ``difflab train-control RUN`` writes the classifier, under the run's folder.
CONTROL_FOLDER = "control"
#: ``difflab train-control``'s training steps when not given.
DEFAULT_STEPS = 500
#: The relative tolerance of a length control's success.
LENGTH_TOLERANCE = 0.1


# ---------------------------------------------------------------- the controls


@dataclass(frozen=True)
class Control:
    """One control ``name=value`` (module docstring); ``ids`` are the word's token ids."""

    name: str
    value: int | str
    ids: tuple[int, ...] = ()

    def log_likelihood(self, log_probs: Tensor) -> Tensor:
        """``(B,)`` ``log p(y | x_t)`` from the classifier's ``(B, L, V)`` log-probabilities."""
        if self.name == "length":
            return length_log_likelihood(log_probs, int(self.value))
        if self.name == "word":
            return word_log_likelihood(log_probs, self.ids)
        return count_log_likelihood(log_probs, self.ids[0], int(self.value) - 1)

    def measure(self, text: str, tokenizer: Tokenizer) -> int | bool:
        """The independent judgement of a sample: its token count, whether it holds the word,
        its number of lines."""
        if self.name == "length":
            return len(tokenizer.encode(text))
        if self.name == "word":
            return str(self.value) in text
        return text.count("\n") + 1

    def satisfied(self, text: str, tokenizer: Tokenizer) -> bool:
        """Whether the sample meets the control (length: within +-10%)."""
        measured = self.measure(text, tokenizer)
        if self.name == "length":
            return abs(int(measured) - int(self.value)) <= LENGTH_TOLERANCE * int(self.value)
        if self.name == "word":
            return bool(measured)
        return measured == self.value


def parse_controls(items: list[str], model: Any) -> list[Control]:
    """The ``--control NAME=VALUE`` items for a loaded ``diffusion-lm`` run, checked."""
    controls = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in CONTROLS:
            raise UserError(f"--control {item!r}: give NAME=VALUE with NAME one of "
                            f"{', '.join(CONTROLS)}")  # fmt: skip
        if name == "word":
            ids = tuple(model.tokenizer.encode(value))
            if not ids or UNK_ID in ids or len(ids) > model.context:
                raise UserError(f"--control word={value!r}: give a word of this model's "
                                f"vocabulary of at most {model.context} tokens")  # fmt: skip
            controls.append(Control(name, value, ids))
            continue
        if not value.isdigit() or int(value) < 1:
            raise UserError(f"--control {item!r}: the value must be a whole number >= 1")
        if name == "length":
            if int(value) > model.context:
                raise UserError(f"--control length={value}: at most the context, "
                                f"{model.context} tokens")  # fmt: skip
            if not model.config.diffusion.lines:
                raise UserError(
                    "--control length needs a run trained on whole lines "
                    "(diffusion.lines=true): the packed stream has no ends"
                )
            controls.append(Control(name, int(value)))
        else:
            newline = model.tokenizer.encode("\n")
            if len(newline) != 1:
                raise UserError("--control lines needs a tokenizer with a newline token")
            if int(value) > model.context:
                raise UserError(f"--control lines={value}: at most {model.context}")
            controls.append(Control(name, int(value), (newline[0],)))
    if len({c.name for c in controls}) != len(controls):
        raise UserError("--control: give each control once")
    return controls


def length_log_likelihood(log_probs: Tensor, n: int) -> Tensor:
    """``sum_{i<n} log(1 - e_i) + sum_{i>=n} log e_i``, ``e_i`` the probability of ``<eos>``
    or ``<pad>`` at position ``i`` (``(B, L, V)`` log-probabilities in, ``(B,)`` out)."""
    ended = torch.logsumexp(log_probs[..., [EOS_ID, PAD_ID]], dim=-1)
    words = torch.log(-torch.expm1(ended).clamp(max=-1e-12))  # log(1 - e), finite
    return words[:, :n].sum(-1) + ended[:, n:].sum(-1)


def word_log_likelihood(log_probs: Tensor, ids: tuple[int, ...]) -> Tensor:
    """``logsumexp_j sum_k log p(w_{j+k} = ids_k)`` over the starts ``j`` where it fits."""
    m, length = len(ids), log_probs.shape[1]
    starts = length - m + 1
    terms = sum(log_probs[:, k : k + starts, token] for k, token in enumerate(ids))
    return torch.logsumexp(terms, dim=-1)  # type: ignore[arg-type]


def count_log_likelihood(log_probs: Tensor, token: int, count: int) -> Tensor:
    """``log P(exactly count positions hold token)`` with independent positions, ``b_i =
    p(w_i = token)``: the Poisson-binomial law by ``f_{i+1}(c) = logaddexp(f_i(c) + log(1 -
    b_i), f_i(c - 1) + log b_i)`` from ``f_0 = log 1{c = 0}``, ``c = 0..count``."""
    hit = log_probs[..., token]
    miss = torch.log(-torch.expm1(hit).clamp(max=-1e-12))
    f = torch.full((log_probs.shape[0], count + 1), -torch.inf, dtype=hit.dtype, device=hit.device)
    f[:, 0] = 0.0
    for i in range(log_probs.shape[1]):
        shifted = torch.cat([f.new_full((f.shape[0], 1), -torch.inf), f[:, :-1]], dim=1)
        f = torch.logaddexp(f + miss[:, i : i + 1], shifted + hit[:, i : i + 1])
    return f[:, count]


def control_log_likelihood(classifier: nn.Module, controls: list[Control]) -> LogLikelihoodFn:
    """``log p(y | x_t, t)``: the sum of the controls' terms from one classifier call."""

    def log_likelihood(x_t: Tensor, t: Tensor) -> Tensor:
        log_probs = F.log_softmax(classifier(x_t, 1000.0 * t).float(), dim=-1)
        return sum(c.log_likelihood(log_probs) for c in controls)  # type: ignore[return-value]

    return log_likelihood


# ---------------------------------------------------------------- the classifier


def classifier_shape(model: Any) -> dict[str, int]:
    """The classifier's transformer: the run's width and heads, half its depth (at least 1)."""
    m = model.config.model
    return {"width": m.width, "depth": max(1, m.depth // 2), "num_heads": m.num_heads}


def classifier_loss(embeddings: Tensor, schedule: Schedule) -> Any:
    """``loss(classifier, (tokens,), generator)``: the cross-entropy of ``p_phi(w_i | x_t, t)``
    at ``x_t = alpha_t E(w) + sigma_t eps``, ``t`` uniform on ``(0, 1)`` (stratified)."""

    def loss(net: nn.Module, batch: tuple[Tensor, ...], generator: torch.Generator) -> Tensor:
        tokens = batch[0]
        x0 = embeddings.to(tokens.device)[tokens]
        t = draw_times(len(tokens), True, generator, tokens.device)
        alpha, sigma = (v.to(x0.dtype)[:, None, None] for v in schedule.alpha_sigma(t))
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        logits = net(alpha * x0 + sigma * noise, 1000.0 * t)
        return F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())

    return loss


def check_controllable(model: Any) -> None:
    if model.kind != "diffusion-lm":
        raise UserError(f"control applies to diffusion.kind=diffusion-lm runs, not {model.kind}")


def train_control(model: Any, *, steps: int | None, progress: bool) -> TrainResult:
    """Train the control classifier of the loaded ``diffusion-lm`` ``model`` on its training
    rows into ``RUN/control`` for ``steps`` steps (empty: :data:`DEFAULT_STEPS`), with the
    run's optimiser settings."""
    check_controllable(model)
    if steps is not None and steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    out = Path(model.folder) / CONTROL_FOLDER
    if (out / FILENAME).exists():
        raise UserError(f"{out} already holds a control classifier (delete it to retrain)")
    cfg = model.config
    documents = load_splits(cfg.data)[0].documents
    if cfg.diffusion.lines:
        tokens, _ = line_rows(documents, model.tokenizer, model.context)
    else:
        tokens = pack_texts(documents, model.tokenizer, model.context).tokens
    shape = classifier_shape(model)
    torch.manual_seed(cfg.train.seed)
    net = model.net
    classifier = NoisyTokenClassifier(net.vocab_size, net.embed.embedding_dim, model.context,
                                      **shape)  # type: ignore[arg-type]  # fmt: skip
    train_cfg = dataclasses.replace(cfg.train, steps=steps or DEFAULT_STEPS, out=str(out),
                                    max_minutes=0.0, device=str(model.device))  # fmt: skip
    run_config = {"recipe": "text-control", "config": {"train": dataclasses.asdict(train_cfg)},
                  "classifier": shape,
                  "vocab_size": net.vocab_size, "dim": net.embed.embedding_dim,
                  "length": model.context}  # fmt: skip
    loss = classifier_loss(net.embed.weight.detach().clone(), model.process)
    trainer = Trainer(classifier, loss, (tokens,), train_cfg, run_config, out)
    return trainer.fit(progress=progress)


def control_guidance(
    model: Any,
    items: list[str] | None,
    scale: float | None,
    length: int | None = None,
    steps: int | None = None,
    step_size: float | None = None,
) -> Guide:
    """The :class:`~difflab.gaussian.control.Guide` of ``--control`` ``items`` at
    ``--control-scale`` ``scale`` (empty: 1) for the loaded ``model``, its classifier read from
    ``RUN/control``: score guidance, or with ``--control-steps`` ``steps`` Diffusion-LM's
    gradient steps on each ``x_{t-1}`` of size ``--control-step-size`` ``step_size`` (empty:
    0.1); a length control longer than the passages' ``length`` (``--length``) is refused."""
    check_controllable(model)
    if not items:
        given = [f for f, v in [("--control-scale", scale), ("--control-steps", steps),
                                ("--control-step-size", step_size)] if v is not None]  # fmt: skip
        raise UserError(f"{given[0]} needs at least one --control NAME=VALUE")
    if scale is not None and not (scale >= 0 and scale < float("inf")):
        raise UserError(f"--control-scale must be a finite number >= 0, got {scale}")
    if steps is not None and not (isinstance(steps, int) and steps >= 1):
        raise UserError(f"--control-steps must be an integer >= 1, got {steps}")
    if step_size is not None:
        if steps is None:
            raise UserError("--control-step-size applies with --control-steps only")
        if not 0 < step_size <= 1:
            raise UserError(f"--control-step-size must be in (0, 1], got {step_size}")
    controls = parse_controls(items, model)
    for c in controls:
        if c.name == "length" and length is not None and int(c.value) > length:
            raise UserError(f"--control length={c.value} cannot be met by passages cut at "
                            f"--length {length}")  # fmt: skip
    return Guide(control_log_likelihood(load_classifier(model), controls),
                 1.0 if scale is None else scale, steps or 0,
                 CONTROL_STEP_SIZE if step_size is None else step_size)  # fmt: skip


def load_classifier(model: Any) -> nn.Module:
    """The control classifier in ``RUN/control`` for the loaded ``model``."""
    folder = Path(model.folder) / CONTROL_FOLDER
    if not (folder / FILENAME).is_file():
        raise UserError(f"no control classifier in {folder}: train one first with "
                        f"difflab train-control {model.folder}")  # fmt: skip
    ckpt = load_checkpoint(folder)
    meta = ckpt.config
    net = model.net
    if (meta.get("vocab_size"), meta.get("dim"), meta.get("length")) != (
        net.vocab_size,
        net.embed.embedding_dim,
        model.context,
    ):
        raise UserError(f"the classifier in {folder} was trained for another model")
    classifier = NoisyTokenClassifier(net.vocab_size, net.embed.embedding_dim, model.context,
                                      **meta["classifier"])  # fmt: skip
    return load_ema(classifier, ckpt.ema, folder, str(model.device))
