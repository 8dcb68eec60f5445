"""``python -m difflab``: the same as the ``difflab`` command."""

from difflab.cli import main

main()
