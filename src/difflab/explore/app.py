"""The explorer's web page: five tabs wired to the computations of this package (Gradio).

Every handler calls the library (through :mod:`.forward`, :mod:`.score`, :mod:`.reverse`,
:mod:`.guidance`, :mod:`.text`) and returns a picture and an HTML table of the numbers it shows
(``<td data-key="alpha">``), so a browser test can read them. A mistake in the page (a run
folder that is not there, a step count a sampler cannot take) raises ``gr.Error`` with the
library's one-line message, which Gradio shows in the page; the server carries on.
"""

from __future__ import annotations

import functools
import html
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import torch

from difflab.discrete.samplers import TOKEN_SAMPLERS, semi_autoregressive_sample
from difflab.errors import UserError
from difflab.explore import forward, guidance, reverse, score, text
from difflab.explore.data import (
    CLASSES_2D,
    DATASETS,
    MIXTURE_1D,
    MIXTURE_2D,
    figure_image,
    mixture,
    schedule,
)
from difflab.gaussian.parameterization import KINDS
from difflab.gaussian.samplers import SAMPLERS
from difflab.gaussian.schedules import SCHEDULES
from difflab.recipes import Run, load

#: The choice of the score tab that means the exact oracle rather than a trained run.
EXACT = f"exact: {MIXTURE_2D}"
#: The text tab's first sampler: exact ancestral sampling (MDLM), skipping idle network calls.
TEXT_SAMPLER = "cached"


class Runs:
    """Trained runs loaded once per path, sorted by what they hold: ``vectors`` (2-D data),
    ``images`` and ``text``."""

    def __init__(self, paths: list[str]):
        self._loaded: dict[str, Run] = {}
        for path in paths:
            self.get(path)

    def get(self, path: str) -> Run:
        """The run in the folder ``path`` (loaded on first use, then kept)."""
        key = str(Path(path).expanduser().resolve())
        if key not in self._loaded:
            run = load(path, "cpu")
            if kind_of(run) == "vectors":
                if tuple(run.model.shape) != (2,):
                    raise UserError(f"{path} models {run.model.shape[0]}-D vectors: the "
                                    "explorer draws 2-D data")  # fmt: skip
                run.model.denoiser.net.double()  # the page computes in float64
            self._loaded[key] = run
        return self._loaded[key]

    def of_kind(self, kind: str) -> list[str]:
        """The folders of the loaded runs of ``kind``."""
        return [str(r.path) for r in self._loaded.values() if kind_of(r) == kind]


def kind_of(run: Run) -> str:
    """``text``, ``vectors`` or ``images``: what a run models."""
    if run.recipe.data == "text":
        return "text"
    shape = getattr(run.model, "shape", ())
    return "vectors" if len(shape) == 1 else "images"


def numbers_html(numbers: dict[str, float], elem: str) -> str:
    """The numbers as a two-column table; each value cell carries its key in ``data-key``."""
    rows = "".join(
        f'<tr><td>{html.escape(k)}</td><td data-key="{html.escape(k)}">{_format(v)}</td></tr>'
        for k, v in numbers.items()
    )
    return f'<table id="{elem}-table" class="numbers">{rows}</table>'


def _format(value: float) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.6g}"
    return str(value)


def shown(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a user's mistake (``UserError``, or a ``ValueError`` from the library's
    checks) shown in the page as ``gr.Error`` instead of a broken figure."""

    @functools.wraps(fn)
    def handler(*args: Any) -> Any:
        try:
            return fn(*args)
        except (UserError, ValueError) as e:
            raise gr.Error(" ".join(str(e).split()), print_exception=False) from None

    return handler


def _whole(value: Any, what: str) -> int:
    """A number from the page as an int; a fraction or an empty box is refused."""
    if value is None or not float(value).is_integer():
        raise UserError(f"{what} must be a whole number, got {value!r}")
    return int(value)


# ---------------------------------------------------------------- the handlers


def forward_tab(data: str, schedule_name: str, prediction: str, t: float):
    view = forward.forward_view(data, schedule_name, prediction, float(t))
    fig = forward.forward_figure(view, data, schedule_name, prediction)
    return figure_image(fig), numbers_html(view.numbers, "forward")


@functools.lru_cache(maxsize=32)
def _oracle(name: str, schedule_name: str):
    return mixture(name, schedule(schedule_name))


def score_tab(runs: Runs, source: str, schedule_name: str, sampler: str, steps: Any, t: float):
    if source == EXACT:
        oracle = _oracle(MIXTURE_2D, schedule_name)
        denoiser = oracle
    else:
        run = runs.get(source)
        if kind_of(run) != "vectors":
            raise UserError(f"{source} is not a run of 2-D data")
        oracle, denoiser = None, run.model.denoiser
    result = score.trajectories(denoiser, sampler, _whole(steps, "the step count"),
                                oracle=oracle)  # fmt: skip
    fig = score.score_figure(denoiser, float(t), result, sampler, oracle)
    return figure_image(fig), numbers_html(result.numbers, "score")


def reverse_sample(runs: Runs, source: str, sampler: str, steps: Any, label: str,
                   w: float, prompt: str, seed: Any):  # fmt: skip
    if not source:
        raise UserError("give a run folder of an image model")
    run = runs.get(source)
    options: dict[str, Any] = {"sampler": sampler, "seed": _whole(seed, "the seed")}
    if label:
        options["label"] = label
    if w:
        options["guidance"] = float(w)
    if prompt:
        options["prompt"] = prompt
    frames = reverse.reverse_frames(run, steps=_whole(steps, "the step count"), **options)
    last = len(frames.times) - 1
    image, table = reverse_show(frames, last)
    return frames, gr.Slider(minimum=0, maximum=last, value=last, step=1), image, table


def reverse_show(frames: reverse.ReverseFrames | None, index: Any):
    if frames is None:
        raise UserError("draw samples first (the Sample button)")
    index = _whole(index, "the frame")
    fig = reverse.reverse_figure(frames, index)
    numbers = {"step": float(index), "t": frames.times[index],
               "distance_to_sample": reverse.distance_to_sample(frames, index)}  # fmt: skip
    return figure_image(fig), numbers_html(numbers, "reverse")


def guidance_tab(label: Any, w: float, t: float):
    oracle = _oracle(CLASSES_2D, "cosine")
    label = _whole(label, "the class")
    view = guidance.guidance_view(oracle, label, float(w), float(t))
    fig = guidance.guidance_figure(view, oracle, label, float(t))
    return figure_image(fig), numbers_html(view.numbers, "guidance")


def digits_tab(runs: Runs, source: str, label: Any, w: float):
    if not source:
        raise UserError("give the run folder of a class-conditional digits model")
    label = _whole(label, "the digit")
    samples, numbers = guidance.digits_guidance(runs.get(source), label, float(w))
    return figure_image(guidance.digits_figure(samples, numbers, label)), numbers_html(
        numbers, "digits"
    )


def text_sample(runs: Runs, source: str, sampler: str, steps: Any, seed: Any):
    if not source:
        raise UserError("give the run folder of a diffusion language model")
    run = runs.get(source)
    if kind_of(run) != "text":
        raise UserError(f"{source} is not a text run")
    result = text.unmasking(run.model, sampler, _whole(steps, "the step count"),
                            _whole(seed, "the seed"))  # fmt: skip
    last = len(result.times) - 1
    passage, table = text_show(result, run.model.tokenizer, last)
    return result, gr.Slider(minimum=0, maximum=last, value=last, step=1), passage, table


def text_show(result: text.Unmasking | None, tokenizer, index: Any):
    if result is None:
        raise UserError("draw a passage first (the Sample button)")
    index = _whole(index, "the step")
    marks = text.step_marks(result, index)
    numbers = {
        "step": float(index),
        "t": result.times[index],
        "masked_fraction": text.masked_fraction(result, index),
        "expected_masked_fraction": result.expected_masked[index],
        **{k: float(v.sum()) for k, v in marks.items()},
    }
    return text.passage_html(result, index, tokenizer), numbers_html(numbers, "text")


# ---------------------------------------------------------------- the page


def build_app(run_paths: list[str] | None = None) -> gr.Blocks:
    """The explorer with the runs in ``run_paths`` loaded (each checked now: a missing or
    damaged run is a :class:`UserError` before anything is served)."""
    runs = Runs(list(run_paths or []))
    vectors, images, texts = (runs.of_kind(k) for k in ("vectors", "images", "text"))
    token_samplers = [n for n, f in TOKEN_SAMPLERS.items() if f is not semi_autoregressive_sample]
    with gr.Blocks(title="difflab explorer", analytics_enabled=False) as app:
        gr.Markdown("# difflab explorer\nThe lectures' figures, computed by difflab itself.")
        with gr.Tab("Forward process", id="forward"):
            with gr.Row():
                f_data = gr.Dropdown(list(DATASETS), value=MIXTURE_1D, label="data",
                                     elem_id="forward-data")  # fmt: skip
                f_schedule = gr.Dropdown(list(SCHEDULES), value="cosine", label="schedule",
                                         elem_id="forward-schedule")  # fmt: skip
                f_prediction = gr.Dropdown(list(KINDS), value="eps", label="parameterization",
                                           elem_id="forward-prediction")  # fmt: skip
            f_t = gr.Slider(0.01, 1.0, value=0.5, step=0.01, label="t", elem_id="forward-t")
            f_figure = gr.Image(type="pil", show_label=False, interactive=False,
                                elem_id="forward-figure")  # fmt: skip
            f_numbers = gr.HTML(elem_id="forward-numbers")
            f_inputs = [f_data, f_schedule, f_prediction, f_t]
            for component in f_inputs:
                component.change(shown(forward_tab), f_inputs, [f_figure, f_numbers],
                                 trigger_mode="always_last")  # fmt: skip
        with gr.Tab("Score field and sampling", id="score"):
            with gr.Row():
                s_source = gr.Dropdown([EXACT, *vectors], value=EXACT, allow_custom_value=True,
                                       label="model (or a run folder of 2-D data)",
                                       elem_id="score-source")  # fmt: skip
                s_schedule = gr.Dropdown(list(SCHEDULES), value="cosine",
                                         label="schedule (exact mixture)",
                                         elem_id="score-schedule")  # fmt: skip
                s_sampler = gr.Dropdown(list(SAMPLERS), value="ddim", label="sampler",
                                        elem_id="score-sampler")  # fmt: skip
            with gr.Row():
                s_steps = gr.Slider(1, score.MAX_STEPS, value=10, step=1, label="steps",
                                    elem_id="score-steps")  # fmt: skip
                s_t = gr.Slider(0.01, 1.0, value=0.3, step=0.01, label="t of the score field",
                                elem_id="score-t")  # fmt: skip
            s_figure = gr.Image(type="pil", show_label=False, interactive=False,
                                elem_id="score-figure")  # fmt: skip
            s_numbers = gr.HTML(elem_id="score-numbers")
            s_inputs = [s_source, s_schedule, s_sampler, s_steps, s_t]
            s_handler = shown(functools.partial(score_tab, runs))
            for component in s_inputs:
                component.change(s_handler, s_inputs, [s_figure, s_numbers],
                                 trigger_mode="always_last")  # fmt: skip
        with gr.Tab("Reverse process", id="reverse"):
            with gr.Row():
                r_source = gr.Dropdown(images, value=images[0] if images else None,
                                       allow_custom_value=True, label="image run folder",
                                       elem_id="reverse-source")  # fmt: skip
                r_sampler = gr.Dropdown(list(SAMPLERS), value="ddim", label="sampler",
                                        elem_id="reverse-sampler")  # fmt: skip
                r_steps = gr.Number(20, precision=0, label="steps", elem_id="reverse-steps")
                r_seed = gr.Number(0, precision=0, label="seed", elem_id="reverse-seed")
            with gr.Row():
                r_label = gr.Textbox("", label="class (empty: one per row / unconditional)",
                                     elem_id="reverse-label")  # fmt: skip
                r_prompt = gr.Textbox("", label="prompt (caption runs)", elem_id="reverse-prompt")
                r_w = gr.Slider(0.0, 8.0, value=0.0, step=0.1, label="guidance w",
                                elem_id="reverse-w")  # fmt: skip
            r_button = gr.Button("Sample", elem_id="reverse-sample")
            r_frame = gr.Slider(0, 1, value=0, step=1, label="step", elem_id="reverse-frame")
            r_figure = gr.Image(type="pil", show_label=False, interactive=False,
                                elem_id="reverse-figure")  # fmt: skip
            r_numbers = gr.HTML(elem_id="reverse-numbers")
            r_frames = gr.State(None)
            r_button.click(shown(functools.partial(reverse_sample, runs)),
                           [r_source, r_sampler, r_steps, r_label, r_w, r_prompt, r_seed],
                           [r_frames, r_frame, r_figure, r_numbers])  # fmt: skip
            r_frame.change(shown(reverse_show), [r_frames, r_frame], [r_figure, r_numbers],
                           trigger_mode="always_last")  # fmt: skip
        with gr.Tab("Guidance", id="guidance"):
            with gr.Row():
                g_label = gr.Dropdown([0, 1, 2], value=2, label="class y", elem_id="guidance-y")
                g_w = gr.Slider(0.0, 8.0, value=1.0, step=0.1, label="guidance scale w",
                                elem_id="guidance-w")  # fmt: skip
                g_t = gr.Slider(0.01, 1.0, value=0.5, step=0.01, label="t of the scores",
                                elem_id="guidance-t")  # fmt: skip
            g_figure = gr.Image(type="pil", show_label=False, interactive=False,
                                elem_id="guidance-figure")  # fmt: skip
            g_numbers = gr.HTML(elem_id="guidance-numbers")
            g_inputs = [g_label, g_w, g_t]
            for component in g_inputs:
                component.change(shown(guidance_tab), g_inputs, [g_figure, g_numbers],
                                 trigger_mode="always_last")  # fmt: skip
            gr.Markdown("### On a class-conditional digits run (the same w)")
            with gr.Row():
                d_source = gr.Dropdown(images, value=images[0] if images else None,
                                       allow_custom_value=True, label="digits run folder",
                                       elem_id="digits-source")  # fmt: skip
                d_label = gr.Dropdown(list(range(10)), value=3, label="digit",
                                      elem_id="digits-y")  # fmt: skip
                d_button = gr.Button("Draw guided digits", elem_id="digits-draw")
            d_figure = gr.Image(type="pil", show_label=False, interactive=False,
                                elem_id="digits-figure")  # fmt: skip
            d_numbers = gr.HTML(elem_id="digits-numbers")
            d_button.click(shown(functools.partial(digits_tab, runs)), [d_source, d_label, g_w],
                           [d_figure, d_numbers])  # fmt: skip
        with gr.Tab("Text", id="text"):
            with gr.Row():
                x_source = gr.Dropdown(texts, value=texts[0] if texts else None,
                                       allow_custom_value=True, label="text run folder",
                                       elem_id="text-source")  # fmt: skip
                x_sampler = gr.Dropdown(token_samplers, value=TEXT_SAMPLER, label="sampler",
                                        elem_id="text-sampler")  # fmt: skip
                x_steps = gr.Number(32, precision=0, label="steps", elem_id="text-steps")
                x_seed = gr.Number(0, precision=0, label="seed", elem_id="text-seed")
            x_button = gr.Button("Sample", elem_id="text-sample")
            x_frame = gr.Slider(0, 1, value=0, step=1, label="step", elem_id="text-frame")
            gr.Markdown("green: revealed at this step; orange: corrected (a placed token "
                        "redrawn); grey italics: still masked, showing the model's current "
                        "guess, dotted underline where the sampler remasked it")  # fmt: skip
            x_passage = gr.HTML(elem_id="text-passage")
            x_numbers = gr.HTML(elem_id="text-numbers")
            x_result = gr.State(None)

            def tokenizer_of(source: str):
                return runs.get(source).model.tokenizer

            x_button.click(shown(functools.partial(text_sample, runs)),
                           [x_source, x_sampler, x_steps, x_seed],
                           [x_result, x_frame, x_passage, x_numbers])  # fmt: skip
            x_frame.change(shown(lambda r, source, i: text_show(r, tokenizer_of(source), i)),
                           [x_result, x_source, x_frame], [x_passage, x_numbers],
                           trigger_mode="always_last")  # fmt: skip
        app.load(shown(forward_tab), f_inputs, [f_figure, f_numbers])
        app.load(s_handler, s_inputs, [s_figure, s_numbers])
        app.load(shown(guidance_tab), g_inputs, [g_figure, g_numbers])
    return app


#: Interface fonts that need no download (the page works without a network).
THEME = gr.themes.Default(font=["sans-serif"], font_mono=["monospace"])


def launch(app: gr.Blocks, host: str, port: int, *, block: bool = True) -> None:
    """Serve ``app`` on ``host:port``; a port in use is a :class:`UserError`."""
    try:
        app.launch(server_name=host, server_port=port, prevent_thread_lock=not block,
                   quiet=True, show_error=True, theme=THEME)  # fmt: skip
    except OSError as e:
        raise UserError(f"cannot serve on {host}:{port}: {e}") from None


def serve(runs: list[str], host: str = "127.0.0.1", port: int = 7860) -> None:
    """Load ``runs`` (refusing a missing or damaged one before serving), then serve the
    explorer on ``host:port`` until interrupted. Sampling in the page runs on one CPU thread:
    its batches are small, and one thread answers fastest on a busy machine."""
    torch.set_num_threads(1)
    app = build_app(runs)
    launch(app, host, port, block=False)
    print(f"difflab explorer on http://{host}:{port} (Ctrl-C stops it)", flush=True)
    app.block_thread()
