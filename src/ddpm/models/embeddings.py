"""Timestep embeddings shared by the networks (one implementation, used by mlp-2d and the U-Net)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0, shift: float = 0.0) -> Tensor:
    """The Transformer's sinusoidal position encoding (Vaswani et al. 2017, sec. 3.5), applied to timesteps.

    t: (B,) timesteps, integer (0..T-1, index 0 the least noisy step) or float.
    Returns (B, dim) float32: [sin(t * f_0), ..., sin(t * f_{h-1}), cos(t * f_0), ..., cos(t * f_{h-1})]
    with h = dim // 2 frequencies f_i = max_period ** (-i / h), geometric from 1 down towards
    1 / max_period; an odd dim gets a final zero column. DDPM uses this to tell the shared network
    which noise level it is at (Ho et al. 2020, sec. 4 and App. B). shift: f_i = max_period ** (-i / (h - shift)),
    so that shift = 1 reaches 1 / max_period at the last frequency, as the paper's TensorFlow code does
    (diffusers' freq_shift).
    """
    half = dim // 2
    exponents = torch.arange(half, device=t.device, dtype=torch.float32) / (half - shift)
    frequencies = torch.exp(-math.log(max_period) * exponents)  # (h,)
    # float32 is exact for integer t far beyond any T in use (2**24).
    angles = t.to(torch.float32)[:, None] * frequencies[None, :]  # (B, h)
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2 == 1:
        embedding = nn.functional.pad(embedding, (0, 1))
    return embedding


class SinusoidalEmbedding(nn.Module):
    """Module form of ``sinusoidal_embedding`` (no parameters), so it can sit in an ``nn.Sequential``.

    forward(t: (B,)) -> (B, dim).
    """

    def __init__(self, dim: int, max_period: float = 10000.0, shift: float = 0.0) -> None:
        super().__init__()
        self.dim = dim
        self.max_period = max_period
        self.shift = shift

    def forward(self, t: Tensor) -> Tensor:
        return sinusoidal_embedding(t, self.dim, self.max_period, self.shift)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_period={self.max_period:g}" + (f", shift={self.shift:g}" if self.shift else "")


class ClassEmbedding(nn.Module):
    """A learned vector per class, plus one for "no class", for class-conditional networks.

    The network adds it to its timestep embedding (Nichol & Dhariwal 2021, improved-diffusion's way),
    so every block that sees the noise level sees the class too. Index ``num_classes`` is "no class":
    training drops labels to it with some probability (classifier-free guidance, Ho & Salimans 2022),
    so one network learns both the conditional and the unconditional noise.

    forward(labels: (B,) int64 in 0..num_classes, or None for "no class" throughout, batch: B) -> (B, dim).
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Tensor | None, batch: int) -> Tensor:
        if labels is None:
            labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=self.table.weight.device)
        return self.table(labels)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes} (+1 for no class)"
