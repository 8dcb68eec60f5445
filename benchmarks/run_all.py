"""``make bench``: every benchmark in sequence, each printing its markdown table.

The demo benchmark trains the digits demo into ``runs/bench-demo``; the sampler and guidance
benchmarks reuse that checkpoint. Figures go into docs/BENCHMARKS.md by hand, with this command
and the machine named.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
RUN = "runs/bench-demo"
JOBS = [
    ["bench_demo.py", "--out", RUN],
    ["bench_training.py"],
    ["bench_samplers.py", "--out", "runs/bench-samplers.png", "--checkpoint", RUN],
    ["bench_guidance.py", "--checkpoint", RUN, "--out", "runs/bench-guidance"],
    ["bench_text.py", "--minutes", "2", "--demo"],
    ["bench_toys.py", "--runs", "runs/bench-toys", "--plot", "runs/bench-toys/moons_defaults.png"],
    ["bench_sampler_peers.py", "--samples", "300", "--full"],
    ["bench_fewstep.py", "--teacher", RUN, "--work", "runs/bench-fewstep"],
    ["bench_gpu.py", "--parts", "train,sample,scaling"],
    ["bench_latent.py", "--out", "runs/bench/glyphs-ae"],
    ["bench_glyphs.py", "--autoencoder", "runs/bench/glyphs-ae"],
    ["bench_explore.py", "--digits", RUN, "--text", "runs/bench-text/mdlm"],
]


def main() -> None:
    for script, *args in JOBS:
        if not (HERE / script).exists():
            print(f"\n## {script}: not present, skipped")
            continue
        print(f"\n## {script} {' '.join(args)}", flush=True)
        subprocess.run([sys.executable, str(HERE / script), *args], check=True)


if __name__ == "__main__":
    main()
