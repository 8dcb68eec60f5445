"""The explorer's responsiveness (issue 18): time from a slider move (or a button click) in a
real headless Chromium to the updated figure and numbers, for each tab; and a screenshot of
each tab.

Serves ``difflab explore`` in-process on a free port of 127.0.0.1 (on one CPU thread, as
``difflab explore`` does) with the runs given, drives the page with Playwright and Debian's
``chromium``, and for each action measures the wall time from the input to the moment the
numbers table shows a new value and the figure has a new picture. Each action is repeated
``--repeats`` times with different values; the table gives the median and the worst.

Targets (the issue): under 0.5 s for the 2-D tabs, under 2 s for a 20-step reverse process of
the digits model. Usage (the runs ``make demo`` and ``difflab demo --text`` write)::

    python benchmarks/bench_explore.py --digits runs/demo --text runs/demo-text/mdlm \\
        --moons runs/moons --screenshots docs/img

``--moons`` (a 2-D run, ``difflab train moons``) is optional, as are the others; a tab whose run
is not given is timed on what it has without one (tabs 1, 2 and 4 need no run).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import socket
import statistics
import time
from pathlib import Path

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Page:
    """A Playwright page on the explorer, with the waits the measurements need."""

    def __init__(self, page):
        self.page = page

    def number(self, tab: str, key: str) -> float:
        return float(self.page.locator(f"#{tab}-numbers [data-key='{key}']").inner_text())

    def source(self, figure: str) -> str:
        return self.page.locator(f"#{figure} img").get_attribute("src") or ""

    def timed(self, act, figure: str, number: str | None = None) -> float:
        """Seconds from ``act()`` until the picture ``figure`` changed, and the number
        ``number`` (``"tab:key"``) too when given."""
        sel = ""
        old = None
        if number is not None:
            tab, key = number.split(":")
            sel = f"#{tab}-numbers [data-key='{key}']"
            old = self.page.locator(sel).inner_text() if self.page.locator(sel).count() else None
        old_src = self.source(figure) if self.page.locator(f"#{figure} img").count() else ""
        start = time.perf_counter()
        act()
        self.page.wait_for_function(
            """([sel, old, img, oldSrc]) => {
                const e = sel ? document.querySelector(sel) : null;
                const i = document.querySelector(img);
                const moved = !sel || (e && e.innerText !== old);
                return moved && i && i.src && i.src !== oldSrc; }""",
            arg=[sel, old, f"#{figure} img", old_src],
        )
        return time.perf_counter() - start

    def slider(self, elem: str, value: float) -> None:
        self.page.locator(f"#{elem} input[type=range]").fill(str(value))

    def tab(self, name: str) -> None:
        self.page.get_by_role("tab", name=name).click()

    def shot(self, folder: Path | None, name: str) -> None:
        if folder is not None:
            self.page.wait_for_timeout(5000)  # every queued update has drawn
            path = folder / f"explore-{name}.png"
            self.page.screenshot(path=str(path), full_page=True)
            print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--digits", help="a class-conditional digits run (runs/demo)")
    parser.add_argument("--text", help="a diffusion language model run (runs/demo-text/mdlm)")
    parser.add_argument("--moons", help="a 2-D run (difflab train moons)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--screenshots", type=Path, help="folder for explore-<tab>.png")
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("needs Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    from difflab.explore.app import build_app, launch

    torch.set_num_threads(1)
    runs = [r for r in (args.digits, args.text, args.moons) if r]
    app = build_app(runs)
    port = free_port()
    launch(app, "127.0.0.1", port, block=False)
    times: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        times.setdefault(name, []).append(seconds)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 1100})
        page.set_default_timeout(120_000)
        page.goto(f"http://127.0.0.1:{port}/")
        ui = Page(page)
        page.locator("#forward-numbers [data-key='alpha']").wait_for()
        for data in ("1-D mixture (seed 001)", "2-D mixture (8 Gaussians)", "digits"):
            page.locator("#forward-data input").fill(data)
            page.get_by_role("option", name=data).click()
            page.wait_for_timeout(1500)
            for k in range(args.repeats):
                t = 0.2 + 0.2 * k
                record(f"1 forward process: t slider ({data})",
                       ui.timed(lambda t=t: ui.slider("forward-t", t), "forward-figure",
                                "forward:alpha"))  # fmt: skip
            if data.startswith("1-D"):
                ui.slider("forward-t", 0.35)
                page.wait_for_timeout(1500)
                ui.shot(args.screenshots, "forward")

        ui.tab("Score field and sampling")
        page.locator("#score-numbers [data-key='nfe']").wait_for()
        for k in range(args.repeats):
            record(
                "2 score field: t slider (exact mixture)",
                ui.timed(lambda k=k: ui.slider("score-t", 0.2 + 0.2 * k), "score-figure"),
            )
            record("2 sampling: steps slider (exact mixture)",
                   ui.timed(lambda k=k: ui.slider("score-steps", 12 + 5 * k), "score-figure",
                            "score:endpoint_error"))  # fmt: skip
        ui.shot(args.screenshots, "score")
        if args.moons:
            page.locator("#score-source input").fill(args.moons)
            page.locator("#score-source input").press("Enter")
            page.wait_for_timeout(3000)
            for k in range(args.repeats):
                record("2 sampling: steps slider (trained 2-D run)",
                       ui.timed(lambda k=k: ui.slider("score-steps", 30 + 5 * k), "score-figure",
                                "score:endpoint_error"))  # fmt: skip

        if args.digits:
            ui.tab("Reverse process")
            page.locator("#reverse-steps input").fill("20")
            for k in range(args.repeats):
                page.locator("#reverse-seed input").fill(str(k + 1))
                record("3 reverse process: 20-step digits sample (Sample button)",
                       ui.timed(lambda: page.locator("#reverse-sample").click(),
                                "reverse-figure"))  # fmt: skip
            for k in range(args.repeats):
                record("3 reverse process: step slider",
                       ui.timed(lambda k=k: ui.slider("reverse-frame", 4 + 4 * k),
                                "reverse-figure", "reverse:t"))  # fmt: skip
            ui.slider("reverse-frame", 10)
            page.wait_for_timeout(1500)
            ui.shot(args.screenshots, "reverse")

        ui.tab("Guidance")
        page.locator("#guidance-numbers [data-key='accuracy']").wait_for()
        for k in range(args.repeats):
            record("4 guidance: w slider (2-D mixture)",
                   ui.timed(lambda k=k: ui.slider("guidance-w", 0.5 + 1.5 * k),
                            "guidance-figure", "guidance:w"))  # fmt: skip
        if args.digits:
            for k in range(args.repeats):
                ui.slider("guidance-w", 1.0 + k)
                page.wait_for_timeout(1000)
                record(
                    "4 guidance: 40 guided digits, 20 steps (button)",
                    ui.timed(lambda: page.locator("#digits-draw").click(), "digits-figure"),
                )
        ui.shot(args.screenshots, "guidance")

        if args.text:
            ui.tab("Text")
            page.locator("#text-steps input").fill("32")
            page.locator("#text-sample").click()
            page.locator("#text-numbers [data-key='step']").wait_for()
            page.wait_for_timeout(1000)
            ui.slider("text-frame", 16)
            page.wait_for_timeout(1500)
            ui.shot(args.screenshots, "text")
        browser.close()
    app.close()
    print(f"\nmachine: {platform.machine()}, torch {torch.__version__}, one torch thread, "
          f"{args.repeats} repeats\n")  # fmt: skip
    print("| action | median s | worst s |\n|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} | {max(values):.2f} |")


if __name__ == "__main__":
    main()
