"""``difflab explore``: a local web page where the lectures' figures come alive on exact
oracles and on the user's own trained runs.

Five tabs (:mod:`.app`): the forward process (:mod:`.forward`), the score field and sampler
trajectories in 2-D (:mod:`.score`), the reverse process of an image model (:mod:`.reverse`),
guidance (:mod:`.guidance`) and a diffusion language model unmasking a passage (:mod:`.text`).
Every number and picture is computed by the library's own functions in Python; the page
(Gradio) only shows them. It sits at the top layer, beside the command line that starts it.
"""

from __future__ import annotations


def serve(runs: list[str], host: str = "127.0.0.1", port: int = 7860) -> None:
    """Load ``runs`` (refusing a missing or damaged one before serving), then serve the
    explorer on ``host:port`` until interrupted. Sampling in the page runs on one CPU thread:
    its batches are small, and one thread answers fastest on a busy machine."""
    import torch

    from difflab.errors import UserError

    try:
        from difflab.explore.app import build_app, launch
    except ModuleNotFoundError as e:
        if e.name != "gradio":
            raise
        raise UserError("the explorer needs gradio: pip install 'difflab[explore]'") from None

    torch.set_num_threads(1)
    app = build_app(runs)
    print(f"difflab explorer on http://{host}:{port} (Ctrl-C stops it)", flush=True)
    launch(app, host, port)
