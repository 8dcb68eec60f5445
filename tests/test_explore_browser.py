"""The explorer in a real headless Chromium (Playwright driving Debian's ``chromium``): each tab
loads, a moved slider changes the picture and the numbers, the numbers are the library's, and a
bad input shows a message in the page while the server carries on.

Skipped, with the reason, where Chromium or Playwright is missing (``.ci/run`` installs
Debian's ``chromium`` first, so CI runs them).
"""

from __future__ import annotations

import shutil
import socket
import urllib.request

import pytest
import torch

pytest.importorskip("gradio", reason="the explorer needs gradio (pip install 'difflab[explore]')")
sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests need playwright")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None,
                       reason="no chromium on this machine (apt-get install chromium)"),
    pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),  # gradio's use of pandas
]  # fmt: skip

TINY = ["train.steps=2", "train.batch_size=8", "train.log_every=1", "model.unet.channels=8",
        "model.unet.num_heads=2", "diffusion.T=20", "sample.steps=2"]  # fmt: skip
#: Milliseconds a page element may take to appear or change (a busy 2-core machine).
WAIT = 60_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The explorer on a free port of 127.0.0.1 with a tiny digits run and a tiny text run."""
    import difflab
    from difflab.explore.app import build_app, launch

    root = tmp_path_factory.mktemp("explore-browser")
    difflab.train("digits-tiny", TINY, out=str(root / "digits"), progress=False)
    difflab.train("text-tiny", ["train.steps=2"], out=str(root / "text"), progress=False)
    app = build_app([str(root / "digits"), str(root / "text")])
    port = free_port()
    launch(app, "127.0.0.1", port, block=False)
    yield {"url": f"http://127.0.0.1:{port}/", "root": root}
    app.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1200, "height": 1100})
    page.set_default_timeout(WAIT)
    page.goto(server["url"])
    number(page, "forward", "alpha")  # the first tab has drawn
    yield page
    page.close()


def number(page, tab: str, key: str) -> float:
    """The value the page shows for ``key`` in the table of ``tab``."""
    return float(page.locator(f"#{tab}-numbers [data-key='{key}']").inner_text())


def changed(page, tab: str, key: str, old: float) -> float:
    """Wait until the number ``key`` of ``tab`` differs from ``old``; return it."""
    page.wait_for_function(
        """([sel, old]) => { const e = document.querySelector(sel);
                             return e && parseFloat(e.innerText) !== old; }""",
        arg=[f"#{tab}-numbers [data-key='{key}']", old],
    )
    return number(page, tab, key)


def set_slider(page, elem: str, value: float) -> None:
    page.locator(f"#{elem} input[type=range]").fill(str(value))


def picture(page, elem: str) -> bytes:
    return page.locator(f"#{elem} img").screenshot()


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def test_forward_tab_slider_moves_picture_and_numbers(page, tmp_path):
    from difflab.explore.data import schedule

    sched = schedule("cosine")
    alpha = number(page, "forward", "alpha")
    assert alpha == pytest.approx(float(sched.alpha_sigma(torch.tensor(0.5))[0]), rel=1e-5)
    before = picture(page, "forward-figure")
    set_slider(page, "forward-t", 0.8)
    alpha = changed(page, "forward", "alpha", alpha)
    a, s = sched.alpha_sigma(torch.tensor(0.8, dtype=torch.float64))
    assert alpha == pytest.approx(float(a), rel=1e-5)
    assert number(page, "forward", "sigma") == pytest.approx(float(s), rel=1e-5)
    assert number(page, "forward", "log_snr") == pytest.approx(float(sched.log_snr(
        torch.tensor(0.8, dtype=torch.float64))), rel=1e-5)  # fmt: skip
    assert picture(page, "forward-figure") != before
    page.screenshot(path=str(tmp_path / "forward.png"), full_page=True)


def test_score_tab_steps_slider_matches_the_library(page):
    from difflab.explore import score
    from difflab.explore.data import MIXTURE_2D, mixture, schedule

    open_tab(page, "Score field and sampling")
    error = number(page, "score", "endpoint_error")
    before = picture(page, "score-figure")
    set_slider(page, "score-steps", 40)
    error = changed(page, "score", "endpoint_error", error)
    oracle = mixture(MIXTURE_2D, schedule("cosine"))
    expected = score.trajectories(oracle, "ddim", 40, oracle=oracle).numbers
    assert error == pytest.approx(expected["endpoint_error"], rel=1e-5)
    assert number(page, "score", "nfe") == 40
    assert picture(page, "score-figure") != before


def test_reverse_tab_steps_through_the_runs_frames(page, server):
    import difflab
    from difflab.explore import reverse

    open_tab(page, "Reverse process")
    page.locator("#reverse-steps input").fill("6")
    page.locator("#reverse-sample").click()
    assert changed(page, "reverse", "step", -1.0) == 6
    before = picture(page, "reverse-figure")
    set_slider(page, "reverse-frame", 2)
    changed(page, "reverse", "step", 6.0)
    run = difflab.load(server["root"] / "digits")
    frames = reverse.reverse_frames(run, steps=6, sampler="ddim", seed=0)
    assert number(page, "reverse", "t") == pytest.approx(frames.times[2], rel=1e-5)
    assert number(page, "reverse", "distance_to_sample") == pytest.approx(
        reverse.distance_to_sample(frames, 2), rel=1e-4
    )
    assert picture(page, "reverse-figure") != before


def test_guidance_tab_scale_moves_accuracy_and_diversity(page):
    from difflab.explore import guidance
    from difflab.explore.data import CLASSES_2D, mixture, schedule

    open_tab(page, "Guidance")
    diversity = number(page, "guidance", "diversity")
    before = picture(page, "guidance-figure")
    set_slider(page, "guidance-w", 4)
    diversity = changed(page, "guidance", "diversity", diversity)
    expected = guidance.guidance_view(mixture(CLASSES_2D, schedule("cosine")), 2, 4.0, 0.5)
    assert diversity == pytest.approx(expected.numbers["diversity"], rel=1e-5)
    assert number(page, "guidance", "accuracy") == pytest.approx(expected.numbers["accuracy"])
    assert picture(page, "guidance-figure") != before


def test_text_tab_unmasks_step_by_step(page, server):
    import difflab
    from difflab.explore import text
    from difflab.explore.app import TEXT_SAMPLER

    open_tab(page, "Text")
    page.locator("#text-steps input").fill("8")
    page.locator("#text-sample").click()
    assert changed(page, "text", "step", -1.0) == 8
    assert number(page, "text", "masked_fraction") == 0.0
    set_slider(page, "text-frame", 3)
    fraction = changed(page, "text", "masked_fraction", 0.0)
    model = difflab.load(server["root"] / "text").model
    expected = text.unmasking(model, TEXT_SAMPLER, 8, seed=0)
    assert fraction == pytest.approx(text.masked_fraction(expected, 3))
    assert page.locator("#text-passage .tok").count() == model.context


def test_bad_inputs_show_a_message_and_the_server_stays_up(page, server):
    open_tab(page, "Reverse process")
    source = page.locator("#reverse-source input")
    source.fill(str(server["root"] / "missing"))
    source.press("Enter")
    page.locator("#reverse-sample").click()
    page.get_by_text("no checkpoint at").first.wait_for()
    source.fill(str(server["root"] / "digits"))
    source.press("Enter")
    page.locator("#reverse-steps input").fill("0")
    page.locator("#reverse-sample").click()
    page.get_by_text("step count must be a whole number in 1..1000").first.wait_for()
    assert urllib.request.urlopen(server["url"]).status == 200
    open_tab(page, "Forward process")
    alpha = number(page, "forward", "alpha")
    set_slider(page, "forward-t", 0.2)
    assert changed(page, "forward", "alpha", alpha) > alpha
