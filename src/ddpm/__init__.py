"""ddpm: denoising diffusion probabilistic models (Ho et al. 2020) and DDIM (Song et al. 2021)."""

from ddpm.diffusion import (
    q_posterior_mean_variance,
    q_sample,
    q_sample_iterative,
    training_loss,
)
from ddpm.run import Run, load
from ddpm.sampling import ddim_invert, sample, slerp, timestep_sequence
from ddpm.schedule import NoiseSchedule

__version__ = "0.1.0"

__all__ = [
    "NoiseSchedule",
    "Run",
    "ddim_invert",
    "load",
    "q_posterior_mean_variance",
    "q_sample",
    "q_sample_iterative",
    "sample",
    "slerp",
    "timestep_sequence",
    "training_loss",
]
