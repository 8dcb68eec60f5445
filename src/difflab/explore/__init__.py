"""``difflab explore``: a local web page where the lectures' figures come alive on exact
oracles and on the user's own trained runs.

Five tabs (:mod:`.app`): the forward process (:mod:`.forward`), the score field and sampler
trajectories in 2-D (:mod:`.score`), the reverse process of an image model (:mod:`.reverse`),
guidance (:mod:`.guidance`) and a diffusion language model unmasking a passage (:mod:`.text`).
Every number and picture is computed by the library's own functions in Python; the page
(Gradio) only shows them. :func:`.app.serve` starts it; the package sits at the top layer,
beside the command line.
"""
