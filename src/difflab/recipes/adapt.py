"""Recipe ``adapt``: a masked diffusion language model adapted from a trained autoregressive one
(Gong et al. 2024, Algorithm 1 in seed 000): ``difflab adapt RUN_AR --out DIR [key=value ...]``.

The network is the ``ar`` run's transformer with its weights
(:class:`~difflab.nets.adapted.ShiftedTransformer`: the output at position ``i - 1`` predicts
token ``i``, and the attention mask is annealed from causal to bidirectional over
``adapt.anneal_steps`` training steps, each future edge opened at random with a probability
rising linearly to 1). It trains with MDLM's masked-diffusion loss on the log-linear schedule,
``E_t [ -alpha'_t / (1 - alpha_t) sum_{i masked} -log x_theta(x_0^i | x_t) ]`` with
``alpha_t = 1 - t``: the ``1 / t`` weight on masked tokens of seed 000. The run's config is the
``ar`` run's (its data, tokenizer and model; those must stay as they were) with
``diffusion.kind=mdlm`` and the ``adapt`` section; the result is an ordinary MDLM run of the
text recipe's interface (every text sampler, ``eval``, prompts, and ``--draft`` for speculative
decoding), whose network is bidirectional once loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from difflab.config import check, from_dict, to_dict
from difflab.data.text import BOS_ID
from difflab.discrete.objectives import continuous_time_loss
from difflab.discrete.process import TokenProcess
from difflab.errors import UserError
from difflab.nets.adapted import ShiftedTransformer
from difflab.recipes.text import RECIPE as TEXT
from difflab.recipes.text import TextConfig, TextRecipe
from difflab.recipes.text.config import given
from difflab.recipes.text.train import (
    TOKENIZER_FILE,
    build_process,
    load_splits,
    pack_split,
    run_metadata,
    save_tokenizer,
)
from difflab.train import distributed
from difflab.train.checkpoint import FILENAME
from difflab.train.trainer import Trainer, TrainResult

#: ``adapt.anneal_steps`` when not given.
DEFAULT_ANNEAL_STEPS = 200


@dataclass
class AdaptSection:
    """``source``: the ``ar`` run adapted (its folder). ``anneal_steps``: training steps over
    which the attention mask goes from causal to bidirectional (0: bidirectional at once)."""

    source: str = ""
    anneal_steps: int = DEFAULT_ANNEAL_STEPS

    def validate(self) -> None:
        check(bool(self.source), "adapt.source must name the ar run to adapt")
        check(self.anneal_steps >= 0, "adapt.anneal_steps must be non-negative")


@dataclass
class AdaptConfig(TextConfig):
    """The text recipe's config with the ``adapt`` section."""

    adapt: AdaptSection = field(default_factory=AdaptSection)

    def validate(self) -> AdaptConfig:
        super().validate()
        self.adapt.validate()
        check(self.diffusion.kind == "mdlm", "the adapt recipe trains diffusion.kind=mdlm, not "
              f"{self.diffusion.kind}")  # fmt: skip
        check(not self.time_conditioning, "the adapt recipe's network reads no time, as the ar "
              "model it starts from (model.time_conditioning)")  # fmt: skip
        check(not self.data.labels, "the adapt recipe adapts unlabelled ar runs (data.labels)")
        check(self.train.accumulate == 1, "the adapt recipe anneals once per batch: "
              "train.accumulate must be 1")  # fmt: skip
        return self


class AdaptRecipe(TextRecipe):
    name = "adapt"
    config_type = AdaptConfig

    def adopt(self, raw: dict[str, Any]) -> dict[str, Any]:
        """An ``ar`` run's config (``difflab adapt RUN``, which reads the run folder, whose
        ``train.out`` is the run itself) as this recipe's: MDLM, adapting that run."""
        return {**raw, "diffusion": {"kind": "mdlm"},
                "adapt": {"source": str(raw.get("train", {}).get("out", ""))}}  # fmt: skip

    def config_from_run(self, meta: dict[str, Any]) -> AdaptConfig:
        if not isinstance(meta["config"], dict):
            raise TypeError("its config is not a mapping")
        return from_dict(AdaptConfig, meta["config"]).validate()

    def build(self, cfg: AdaptConfig, meta: dict[str, Any]) -> nn.Module:
        m = cfg.model
        return ShiftedTransformer(
            meta["vocab_size"], cfg.data.length, bos_id=BOS_ID,
            anneal_steps=cfg.adapt.anneal_steps, width=m.width, depth=m.depth,
            num_heads=m.num_heads, dropout=m.dropout,
        )  # fmt: skip

    def train(
        self, cfg: AdaptConfig, *, resume: bool = False, progress: bool = True
    ) -> TrainResult:
        """Into ``train.out``, from the weights and tokenizer of the ``ar`` run
        ``adapt.source`` (a resumed run continues from its own checkpoint)."""
        out = Path(cfg.train.out)
        if not resume and (out / FILENAME).exists():
            raise UserError(f"{out} already holds a run: pass --resume to continue it or choose "
                            "another --out")  # fmt: skip
        ar = TEXT.load(Path(cfg.adapt.source), "cpu")
        check_source(cfg, ar.config, cfg.adapt.source, ar.kind)
        train_split, _, _ = load_splits(cfg.data)
        tokens, loss_mask, _ = pack_split(train_split, ar.tokenizer, cfg.data.length)
        meta = {**run_metadata(cfg, ar.tokenizer, None), "recipe": self.name}
        process = build_process(cfg.diffusion, ar.tokenizer.vocab_size)
        net = self.build(cfg, meta)
        missing, unexpected = net.load_state_dict(ar.net.state_dict(), strict=False)
        if missing != ["anneal_step"] or unexpected:  # pragma: no cover - same architecture
            raise RuntimeError(f"adaptation weights: missing {missing}, unexpected {unexpected}")
        trainer = Trainer(net, adaptation_loss(cfg, process), (tokens, loss_mask), cfg.train,
                          meta, out)  # fmt: skip
        if not resume and distributed.is_main():
            save_tokenizer(ar.tokenizer, out / TOKENIZER_FILE)
        return trainer.fit(resume=resume, progress=progress)


def check_source(cfg: AdaptConfig, source: TextConfig, path: str, kind: str) -> None:
    """The adapted run keeps the ``ar`` run's network and tokenization."""
    if kind != "ar":
        raise UserError(f"adapt.source {path} is a {kind} run: adaptation starts from an ar run")
    mine, theirs = to_dict(cfg), to_dict(source)
    for section, key in [("model", k) for k in ("width", "depth", "num_heads", "dropout")] + [
        ("data", k) for k in ("tokenizer", "bpe_vocab", "length")
    ]:
        if mine[section][key] != theirs[section][key]:
            raise UserError(f"{section}.{key} is {theirs[section][key]} in the ar run "
                            f"{path}; the adapted model keeps it")  # fmt: skip


def adaptation_loss(
    cfg: AdaptConfig, process: TokenProcess
) -> Callable[[nn.Module, tuple[Tensor, ...], torch.Generator], Tensor]:
    """MDLM's continuous-time bound (:func:`~difflab.discrete.objectives.continuous_time_loss`)
    of the shifted network, whose annealed mask is drawn with the batch's generator."""

    def loss(model: nn.Module, batch: tuple[Tensor, ...], generator: torch.Generator) -> Tensor:
        def denoiser(x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
            return model(x_t, t, cond, generator=generator)

        options = given(stratified=cfg.diffusion.stratified)
        return continuous_time_loss(denoiser, process, batch[0], loss_mask=batch[1],
                                    generator=generator, **options).loss  # fmt: skip

    return loss


RECIPE = AdaptRecipe()
