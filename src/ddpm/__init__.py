"""ddpm: denoising diffusion probabilistic models (Ho et al. 2020) and DDIM (Song et al. 2021)."""

__version__ = "0.1.0"
