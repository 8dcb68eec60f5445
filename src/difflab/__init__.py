"""difflab: diffusion models, Gaussian and discrete, correct, fast and readable.

The Python API, which the ``difflab`` command itself uses::

    import difflab

    result = difflab.train("digits", steps=3000, out="runs/digits")  # preset, file or run
    run = difflab.load("runs/digits")
    samples = run.sample(16, sampler="dpmpp_2m", steps=10, label=3, guidance=1.5)
    samples.x               # (16, 1, 8, 8) in [-1, 1]; samples.save("seven") writes npz + png
    print(run.evaluate(n=64).summary)
"""

from difflab.recipes import Evaluation, Run, Samples, load, train
from difflab.version import __version__

__all__ = ["Evaluation", "Run", "Samples", "__version__", "load", "train"]
