"""k-diffusion's samplers (``k_diffusion.sampling``), the peer of the sampler benchmark and of the
reference-implementation tests, on a CPU build of torch.

``import k_diffusion`` imports its whole package, whose ``utils`` and ``evaluation`` need
torchvision; PyPI's Linux torchvision is built against the CUDA torch and does not load next
to the CPU torch that difflab pins (and ``pip install k-diffusion`` with its dependencies
replaces that torch by a CUDA one). So ``make setup`` installs k-diffusion with ``--no-deps``
next to the three packages its ``sampling.py`` imports (torchsde, torchdiffeq, trampoline), and
:func:`load` runs that one file of the installed distribution, unchanged, when the package
itself does not import. Its only use of the rest of the package is ``utils.append_dims``, given
here.
"""

from __future__ import annotations

import importlib.util
import sys
import types

_NAME = "_kdiffusion_sampling_only"


def load() -> tuple[types.ModuleType | None, str]:
    """``(k_diffusion.sampling, version)``, or ``(None, why not)``."""
    try:
        from importlib.metadata import version

        release = version("k-diffusion")
    except Exception:
        return None, "k-diffusion is not installed (make setup installs it)"
    try:
        from k_diffusion import sampling

        return sampling, release
    except Exception:  # the package imports torchvision; its sampling.py does not
        pass
    if _NAME + ".sampling" in sys.modules:
        return sys.modules[_NAME + ".sampling"], release
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None, "k_diffusion's files were not found"
    folder = spec.submodule_search_locations[0]
    package = types.ModuleType(_NAME)
    package.__path__ = [folder]
    utils = types.ModuleType(_NAME + ".utils")
    utils.append_dims = _append_dims
    package.utils = utils
    sys.modules[_NAME], sys.modules[_NAME + ".utils"] = package, utils
    file_spec = importlib.util.spec_from_file_location(_NAME + ".sampling", f"{folder}/sampling.py")
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[_NAME + ".sampling"] = module
    try:
        file_spec.loader.exec_module(module)
    except ImportError as error:
        del sys.modules[_NAME + ".sampling"]
        return None, f"k_diffusion/sampling.py does not import: {error}"
    return module, release


def _append_dims(x, target_dims: int):
    """``x`` with trailing singleton axes up to ``target_dims`` axes (k-diffusion's helper)."""
    return x.reshape(*x.shape, *(1,) * (target_dims - x.ndim))
