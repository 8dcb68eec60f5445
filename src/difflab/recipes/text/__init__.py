"""Recipe ``text``: discrete diffusion language models and their autoregressive baseline, on any
text.

Wires text data (:mod:`difflab.data.text`) -> tokenizer -> :class:`TextTransformer` -> a token
process (:mod:`difflab.discrete.process`) and its objective (:mod:`difflab.discrete.objectives`)
-> the one :class:`~difflab.train.trainer.Trainer`; loads a checkpoint back into a model that
samples (:mod:`difflab.discrete.samplers`, :mod:`difflab.discrete.autoregressive`) and is
evaluated on held-out text.

``diffusion.kind`` picks the model (:data:`~difflab.recipes.text.config.KINDS`; seed 003; MDLM
Sahoo et al. 2024, D3PM Austin et al. 2021, UDLM Schiff et al. 2025, GIDD von Rutte et al. 2025):

==================  =====================================================================
``mdlm``            masked process, SUBS, continuous-time bound ``alpha'_t / (1 - alpha_t)``
``d3pm-absorbing``  masked process in ``T`` discrete steps, hybrid loss ``L_vb + lambda CE``
``d3pm-uniform``    uniform process in ``T`` discrete steps (cosine ``alpha_bar``), hybrid loss
``udlm``            uniform process, continuous-time bound
``hybrid``          mask-plus-uniform (GIDD) process, continuous-time bound
``ar``              the same transformer with a causal mask, next-token cross-entropy
``diffusion-lm``    Gaussian diffusion on learned word embeddings, rounding (Li et al. 2022)
``diffuseq``        the same on ``[source; target]`` rows, target only (Gong et al. 2023)
``latent-text``     Gaussian diffusion on a text autoencoder's latents (LD4LG, COSMOS)
==================  =====================================================================

The last three are the ``gaussian`` kinds (:mod:`~difflab.recipes.text.continuous`,
:mod:`~difflab.recipes.text.latent_text`).

The package: :mod:`~difflab.recipes.text.config` (the config and its migration from difflab
0.1), :mod:`~difflab.recipes.text.train` (data, tokenizer, network, process, loss),
:mod:`~difflab.recipes.text.sample` (generation), :mod:`~difflab.recipes.text.evaluate`
(held-out likelihood) and :mod:`~difflab.recipes.text.demo`; :data:`RECIPE` wires them on the
:class:`~difflab.recipes.Recipe` interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflab.config import from_dict
from difflab.data.text import Tokenizer, load_tokenizer
from difflab.errors import UserError
from difflab.recipes import (
    Evaluation,
    Recipe,
    Samples,
    load_network,
    reading_metadata,
    recipe_of_run,
)
from difflab.recipes.image import num_classes_of
from difflab.recipes.text import continuous, latent_text
from difflab.recipes.text.config import KINDS, TextConfig, migrate
from difflab.recipes.text.control import control_guidance
from difflab.recipes.text.demo import DEMO_FILES, mdlm_versus_ar
from difflab.recipes.text.evaluate import score_held_out
from difflab.recipes.text.sample import decode, generate_tokens
from difflab.recipes.text.speculative import check_speculative_options, speculative_tokens
from difflab.recipes.text.train import (
    TOKENIZER_FILE,
    LoadedTextModel,
    build_net,
    build_process,
    build_tokenizer,
    load_splits,
    make_loss,
    pack_split,
    run_metadata,
    save_tokenizer,
)
from difflab.train import distributed
from difflab.train.checkpoint import FILENAME, resolve_checkpoint
from difflab.train.trainer import Trainer, TrainResult

__all__ = ["KINDS", "RECIPE", "LoadedTextModel", "TextConfig", "TextRecipe"]


class TextRecipe(Recipe):
    name = "text"
    config_type = TextConfig
    preset = "text-shakespeare"
    data = "text"
    demo_files = DEMO_FILES

    def config_from_run(self, meta: dict[str, Any]) -> TextConfig:
        """The validated config a checkpoint records (migrated from difflab 0.1's layout when
        it has no ``config_version``); one that is not a mapping is a ``TypeError``, which
        :func:`~difflab.recipes.reading_metadata` reports as damaged metadata."""
        if not isinstance(meta["config"], dict):
            raise TypeError("its config is not a mapping")
        config = meta["config"] if meta.get("config_version") else migrate(meta["config"])
        return from_dict(TextConfig, config).validate()

    def build(self, cfg: TextConfig, meta: dict[str, Any]) -> nn.Module:
        return build_net(cfg, meta["vocab_size"], num_classes_of(meta))

    def train(self, cfg: TextConfig, *, resume: bool = False, progress: bool = True) -> TrainResult:
        """Train into ``train.out``: ``checkpoint.safetensors``, ``config.json``, ``loss.csv``
        and the tokenizer learned on the training split, ``tokenizer.json``. ``resume``
        continues from the checkpoint with the saved tokenizer."""
        out = Path(cfg.train.out)
        train_split, _, class_names = load_splits(cfg.data)

        def tokenizer_of_run() -> Tokenizer:  # on rank 0, which owns the run folder
            if not resume and (out / FILENAME).exists():
                raise UserError(f"{out} already holds a run: pass --resume to continue it or "
                                "choose another train.out")  # fmt: skip
            if resume and not (out / TOKENIZER_FILE).is_file():
                raise UserError(f"no run to resume in {out} (no {TOKENIZER_FILE} there)")
            if resume:
                return load_tokenizer(out / TOKENIZER_FILE)
            return build_tokenizer(cfg.data, train_split.documents)

        if cfg.diffusion.kind == latent_text.KIND and not resume:
            latent_text.check_fresh(out)
        tokenizer = distributed.from_main(tokenizer_of_run)
        tokens, loss_mask, labels = pack_split(train_split, tokenizer, cfg.data.length)
        if len(tokens) == 1 and not bool(loss_mask.all()):
            raise UserError(f"data.length={cfg.data.length:,} is longer than the training text "
                            f"({int(loss_mask.sum()):,} tokens): choose at most that")  # fmt: skip
        meta = run_metadata(cfg, tokenizer, class_names)
        process = build_process(cfg.diffusion, tokenizer.vocab_size)
        torch.manual_seed(cfg.train.seed)  # network initialisation
        net = self.build(cfg, meta)
        tensors = (tokens, loss_mask) if labels is None else (tokens, loss_mask, labels)
        if cfg.diffusion.lines:
            tensors = continuous.line_rows(train_split.documents, tokenizer, cfg.data.length)
        if cfg.diffusion.kind == latent_text.KIND:
            if not resume and distributed.is_main():
                save_tokenizer(tokenizer, out / TOKENIZER_FILE)
            return latent_text.train(cfg, net, process, tensors, meta, out, resume=resume,
                                     progress=progress)  # type: ignore[arg-type]  # fmt: skip
        if cfg.diffusion.kind == "diffuseq":
            task = continuous.task_rows(train_split.documents, tokenizer, cfg.data.length)
            tensors = (task.tokens, task.loss_mask, task.noise_mask)
        loss = make_loss(cfg, process, num_classes_of(meta))
        trainer = Trainer(net, loss, tensors, cfg.train, meta, out)
        if not resume and distributed.is_main():
            save_tokenizer(tokenizer, out / TOKENIZER_FILE)
        return trainer.fit(resume=resume, progress=progress)

    def load(self, path: Path, device: str = "auto") -> LoadedTextModel:
        """The run's EMA network, the tokenizer saved next to its checkpoint, and its process."""
        cfg, meta, net, step = load_network(self, path, device)
        with reading_metadata(path):
            vocab_size, class_names = meta["vocab_size"], meta["class_names"]
            names = class_names if isinstance(class_names, list) else [None]
            if class_names is not None and not all(isinstance(c, str) for c in names):
                raise TypeError("class_names is not a list of names")
        tokenizer_path = resolve_checkpoint(path).parent / TOKENIZER_FILE
        tokenizer = load_tokenizer(tokenizer_path)
        if tokenizer.vocab_size != vocab_size:
            raise UserError(f"{tokenizer_path} has {tokenizer.vocab_size} ids but the model was "
                            f"trained with {vocab_size}")  # fmt: skip
        process = build_process(cfg.diffusion, vocab_size)
        return LoadedTextModel(net, tokenizer, process, cfg, class_names, step,
                               folder=tokenizer_path.parent)  # fmt: skip

    def sample(
        self,
        model: LoadedTextModel,
        n: int,
        *,
        prompt: str | None = None,
        length: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        steps: int | None = None,
        sampler: str | None = None,
        label: Any = None,
        guidance: float | None = None,
        seed: int | None = None,
        draft: str | Path | None = None,
        draft_length: int | None = None,
        draft_steps: int | None = None,
        clamp: bool | None = None,
        control: list[str] | None = None,
        control_scale: float | None = None,
        control_steps: int | None = None,
        control_step_size: float | None = None,
    ) -> Samples:
        """``n`` passages of up to ``length`` tokens (prompt included), each ending before its
        first ``<eos>``, special tokens dropped; ``prompt`` is their given beginning (a
        character outside the vocabulary is refused). Diffusion kinds run ``sampler``
        (:data:`~difflab.discrete.samplers.TOKEN_SAMPLERS`) for ``steps`` steps per window of
        the context; ``ar`` samples token by token (``steps``, ``sampler`` and ``guidance`` do
        not apply). ``temperature`` (0: greedy) and ``top_p`` in (0, 1] shape every draw;
        ``label`` (class name or index, a comma list or a sequence cycled over the passages)
        conditions a labelled run, ``guidance`` ``w > 0`` guides towards it (:mod:`.sample`).
        Left empty: the run's ``sample`` section (``length``: the context). ``draft`` (an
        ``ar`` run's option): a masked diffusion run that drafts ``draft_length`` tokens at a
        time in ``draft_steps`` calls for speculative decoding, with the same law
        (:mod:`.speculative`). The ``gaussian`` kinds sample one window with a Gaussian
        ``sampler``, ``clamp`` switching the clamping trick (:mod:`.continuous`);
        ``temperature``, ``top_p``, ``label`` and ``guidance`` do not apply to them.
        ``control`` (``NAME=VALUE`` items) at ``control_scale``: classifier guidance of a
        ``diffusion-lm`` run (:mod:`.control`), on the score, or with ``control_steps`` by that
        many gradient steps of ``control_step_size`` on each ``x_{t-1}``."""
        check_speculative_options(draft, draft_length, draft_steps)
        if clamp is not None and not model.config.diffusion.gaussian:
            raise UserError(f"--clamp applies to the gaussian kinds only, not {model.kind}")
        guide = None
        if any(v is not None for v in (control, control_scale, control_steps, control_step_size)):
            guide = control_guidance(model, control, control_scale, length, control_steps,
                                     control_step_size)  # fmt: skip
        if draft is not None:
            drafter_recipe = recipe_of_run(draft)  # the text recipe or one built on it (adapt)
            if not isinstance(drafter_recipe, TextRecipe):
                raise UserError(f"--draft needs a masked diffusion text run; {draft} is a run of "
                                f"the {drafter_recipe.name} recipe")  # fmt: skip
            drafter = drafter_recipe.load(Path(draft), str(model.device))
            samples = speculative_tokens(
                model, drafter, n, draft_length=draft_length, draft_steps=draft_steps,
                prompt=prompt, length=length, temperature=temperature, top_p=top_p, steps=steps,
                sampler=sampler, label=label, guidance=guidance, seed=seed,
            )  # fmt: skip
            return Samples(texts=decode(model, samples))
        if model.kind == latent_text.KIND:
            return Samples(texts=latent_text.sample_texts(
                model, n, prompt=prompt, length=length, steps=steps, sampler=sampler,
                clamp=clamp, seed=seed, others={"temperature": temperature, "top_p": top_p,
                                                "label": label, "guidance": guidance},
            ))  # fmt: skip
        if model.config.diffusion.gaussian:
            return Samples(texts=continuous.sample_texts(
                model, n, prompt=prompt, length=length, steps=steps, sampler=sampler,
                clamp=clamp, seed=seed, others={"temperature": temperature, "top_p": top_p,
                                                "label": label, "guidance": guidance},
                guide=guide,
            ))  # fmt: skip
        samples = generate_tokens(
            model, n, prompt=prompt, length=length, temperature=temperature, top_p=top_p,
            steps=steps, sampler=sampler, label=label, guidance=guidance, seed=seed,
        )  # fmt: skip
        return Samples(texts=decode(model, samples))

    def evaluate(
        self,
        model: LoadedTextModel,
        *,
        n: int = 256,
        seed: int = 0,
        t_samples: int | None = None,
        judge: str | Path | None = None,
        progress: bool = True,
    ) -> Evaluation:
        """Nats per token, perplexity (bound) and bits per character on ``n`` held-out rows,
        ``t_samples`` draws of the noise level each (diffusion kinds; :mod:`.evaluate`). The
        ``gaussian`` kinds: their loss terms, and ``diffuseq`` its task score
        (:func:`.continuous.score_held_out`); ``latent-text`` its latent loss, autoencoder
        reconstruction and the quality of its samples, their perplexity under the ``ar`` run
        ``judge`` when given (:func:`.latent_text.score_held_out`)."""
        if judge is not None and model.kind != latent_text.KIND:
            raise UserError(f"--judge applies to diffusion.kind={latent_text.KIND} runs, not "
                            f"{model.kind}")  # fmt: skip
        if model.kind == latent_text.KIND:
            judge_model = None
            if judge is not None:
                judge_model = self.load(Path(judge), str(model.device))
                latent_text.check_judge(model, judge_model)
            held = load_splits(model.config.data)[1]
            return latent_text.score_held_out(model, held.documents, n=n, seed=seed,
                                              t_samples=t_samples,
                                              judge=judge_model and judge_model.net)  # fmt: skip
        if model.config.diffusion.gaussian:
            held = load_splits(model.config.data)[1]
            return continuous.score_held_out(model, held.documents, n=n, seed=seed,
                                             t_samples=t_samples)  # fmt: skip
        return score_held_out(model, n=n, seed=seed, t_samples=t_samples, progress=progress)

    def demo(self, out: Path, *, quiet: bool = False) -> str:
        """MDLM against the autoregressive baseline on Shakespeare (:mod:`.demo`)."""
        return mdlm_versus_ar(self, out, quiet=quiet)


RECIPE = TextRecipe()
