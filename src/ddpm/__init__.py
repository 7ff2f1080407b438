"""ddpm: denoising diffusion probabilistic models (Ho et al. 2020) and DDIM (Song et al. 2021).

The public names are imported when first used, so that ``import ddpm.cli`` (and `ddpm presets`,
`ddpm --help`) does not wait for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_HOMES = {
    "q_posterior_mean_variance": "ddpm.diffusion", "q_sample": "ddpm.diffusion",
    "q_sample_iterative": "ddpm.diffusion", "training_loss": "ddpm.diffusion",
    "Run": "ddpm.run", "load": "ddpm.run",
    "ddim_invert": "ddpm.sampling", "sample": "ddpm.sampling", "slerp": "ddpm.sampling",
    "timestep_sequence": "ddpm.sampling",
    "NoiseSchedule": "ddpm.schedule",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
        globals()[name] = value  # once: later lookups skip this function
        return value
    try:  # a submodule: ddpm.models, ddpm.build, ...
        return importlib.import_module(f"ddpm.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"ddpm.{name}":
            raise
    raise AttributeError(f"module 'ddpm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
