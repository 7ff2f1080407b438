"""Built-in datasets generated from a seed: the tutorials' square, colour gradients, 2-D point sets.

Every generator is ``make_<name>(n, *, seed=0, ...)`` and returns float32 data in the package's
conventions: images (n, C, H, W) in [-1, 1], points (n, 2). Randomness comes from a private
``torch.Generator`` seeded with ``seed``, so the same seed gives the same data and the global RNG
is never touched.

The point sets are scaled by fixed constants derived from each noise-free distribution (not from the
sample), so a set drawn with any n or seed comes from the same distribution, roughly centred with
about unit variance per coordinate; a metric can compare samples to a fresh draw.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ddpm.data._checks import require_channels, require_int
from ddpm.data.errors import DataError

__all__ = [
    "make_square", "make_gradients", "nearest_gradient_distance",
    "make_moons", "make_swissroll", "make_8gaussians", "eight_gaussians_centres", "make_checkerboard",
]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Images


def make_square(n: int = 1, *, seed: int = 0, channels: int = 1, image_size: int = 8) -> Tensor:
    """The tutorials' overfitting target: a bright square on a dark background, repeated n times.

    In [0, 1] space the image is zero with the central half set to one (pixels [2:6, 2:6] at the
    default 8x8; [s//4 : s - s//4] in general), then mapped to [-1, 1]: background -1, square +1.
    ``seed`` is accepted for the common signature; the square has no randomness.
    Returns (n, channels, image_size, image_size) float32.
    """
    require_int("n", n)
    require_channels(channels)
    require_int("image_size", image_size, minimum=4)
    image = torch.full((channels, image_size, image_size), -1.0)
    lo, hi = image_size // 4, image_size - image_size // 4
    image[:, lo:hi, lo:hi] = 1.0
    return image.expand(n, -1, -1, -1).contiguous()


def _unit_coordinates(height: int, width: int) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates x (columns) and y (rows) in [0, 1], each (H, W) float64."""
    y = torch.linspace(0.0, 1.0, height, dtype=torch.float64)
    x = torch.linspace(0.0, 1.0, width, dtype=torch.float64)
    return x.expand(height, width), y[:, None].expand(height, width)


def make_gradients(n: int, *, seed: int = 0, image_size: int = 16, channels: int = 3) -> Tensor:
    """Linear colour gradients: each image blends two random colours along a random direction.

    With pixel coordinates (x, y) in [0, 1]^2, a direction u = (cos a, sin a) with a ~ U[0, 2pi)
    and colours c0, c1 ~ U[0, 1]^C, the image is c0 + (c1 - c0) * s(x, y) in [0, 1] space, where
    s = u . (x, y) rescaled so that it runs from 0 at one corner to 1 at the opposite corner;
    then mapped to [-1, 1]. Every channel is an affine function of (x, y), which is what
    :func:`nearest_gradient_distance` measures. Returns (n, channels, image_size, image_size) float32.
    """
    require_int("n", n)
    require_channels(channels)
    require_int("image_size", image_size, minimum=2)
    g = _generator(seed)
    angle = 2 * math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    colours = torch.rand(2, n, channels, generator=g, dtype=torch.float64)  # c0, c1 per image
    ux, uy = torch.cos(angle), torch.sin(angle)  # (n,)
    x, y = _unit_coordinates(image_size, image_size)
    projection = ux[:, None, None] * x + uy[:, None, None] * y  # (n, H, W)
    # The extremes of an affine function over the unit square sit at its corners.
    low = ux.clamp(max=0) + uy.clamp(max=0)
    high = ux.clamp(min=0) + uy.clamp(min=0)
    s = (projection - low[:, None, None]) / (high - low)[:, None, None]  # |cos|+|sin| >= 1, no 0/0
    c0, c1 = colours[0][:, :, None, None], colours[1][:, :, None, None]  # (n, C, 1, 1)
    images = c0 + (c1 - c0) * s[:, None]  # (n, C, H, W) in [0, 1]
    return (2 * images - 1).to(torch.float32)


def nearest_gradient_distance(images: Tensor) -> Tensor:
    """RMS distance from each image to the nearest image whose channels are affine in (x, y).

    Fits pixel_c = a_c + b_c x + c_c y per image and channel by least squares and returns the root
    mean square residual over all C*H*W values, in the [-1, 1] units of ``images``. The affine family
    contains every exact gradient of :func:`make_gradients` (which also ties the channels to one
    direction and keeps colours in range), so an exact gradient scores 0 up to rounding, and a low
    score is necessary, not sufficient, for a sample to be a gradient.

    images: (N, C, H, W) with H, W >= 2. Returns (N,) float32.
    """
    if images.ndim != 4 or images.shape[-1] < 2 or images.shape[-2] < 2:
        raise ValueError(
            f"images must be (N, C, H, W) with H, W >= 2; got shape {tuple(images.shape)}"
        )
    n, c, h, w = images.shape
    x, y = _unit_coordinates(h, w)
    design = torch.stack([torch.ones(h * w, dtype=torch.float64), x.flatten(), y.flatten()], dim=1)
    basis, _ = torch.linalg.qr(design)  # (H*W, 3) orthonormal basis of the affine functions
    values = images.detach().to("cpu", torch.float64).reshape(n * c, h * w)
    residual = values - (values @ basis) @ basis.T  # what no affine function explains
    return residual.reshape(n, c * h * w).pow(2).mean(dim=1).sqrt().to(torch.float32)


# ---------------------------------------------------------------------------------------------
# 2-D points


def _check_noise(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise DataError(f"{name}={value!r} is not allowed; use a number >= 0")


def make_moons(n: int, *, seed: int = 0, noise: float = 0.1) -> Tensor:
    """Two interleaved half circles, each point on either with probability 1/2. Returns (n, 2).

    Upper moon (cos t, sin t), lower moon (1 - cos t, 1/2 - sin t), t ~ U[0, pi]; then centred
    on the exact mean (1/2, 1/4) and divided by the root of the mean per-coordinate variance,
    ((3/4) + (9/16 - 1/pi)) / 2, so the noise-free set has unit average variance. ``noise`` is the
    std of the Gaussian noise added afterwards, in those output units.
    """
    require_int("n", n)
    _check_noise("noise", noise)
    g = _generator(seed)
    lower = torch.rand(n, generator=g) < 0.5
    t = math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    x = torch.where(lower, 1 - torch.cos(t), torch.cos(t))
    y = torch.where(lower, 0.5 - torch.sin(t), torch.sin(t))
    scale = math.sqrt((0.75 + (9 / 16 - 1 / math.pi)) / 2)
    points = torch.stack([x - 0.5, y - 0.25], dim=1) / scale
    points = points + noise * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return points.to(torch.float32)


def make_swissroll(n: int, *, seed: int = 0, noise: float = 0.1) -> Tensor:
    """A 2-D spiral: (t cos t, t sin t) with t ~ U[1.5 pi, 4.5 pi] (one and a half turns). Returns (n, 2).

    Centred on the exact mean (2, 2/(3 pi)) and divided by the root of the mean per-coordinate
    variance, (E[t^2] - |mean|^2) / 2 with E[t^2] = 9.75 pi^2. ``noise`` is the std of the
    Gaussian noise added afterwards, in output units.
    """
    require_int("n", n)
    _check_noise("noise", noise)
    g = _generator(seed)
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=torch.float64))
    mean_x, mean_y = 2.0, 2 / (3 * math.pi)
    scale = math.sqrt((9.75 * math.pi**2 - mean_x**2 - mean_y**2) / 2)
    points = torch.stack([t * torch.cos(t) - mean_x, t * torch.sin(t) - mean_y], dim=1) / scale
    points = points + noise * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return points.to(torch.float32)


def eight_gaussians_centres(radius: float = math.sqrt(2)) -> Tensor:
    """The modes of :func:`make_8gaussians`: (8, 2) float32, at angles k*pi/4 on a circle of ``radius``."""
    angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
    return (radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)).to(torch.float32)


def make_8gaussians(n: int, *, seed: int = 0, radius: float = math.sqrt(2), std: float = 0.1) -> Tensor:
    """A mixture of 8 equally likely isotropic Gaussians centred on a circle. Returns (n, 2).

    Defaults: radius sqrt(2), std 0.1, so the per-coordinate variance is radius^2/2 + std^2 = 1.01,
    and neighbouring modes (1.08 apart) are about ten stds apart: a sampler that drops or merges
    modes shows it plainly. The centres are :func:`eight_gaussians_centres`.
    """
    require_int("n", n)
    _check_noise("std", std)
    _check_noise("radius", radius)
    g = _generator(seed)
    component = torch.randint(0, 8, (n,), generator=g)
    centres = eight_gaussians_centres(radius).to(torch.float64)[component]
    points = centres + std * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return points.to(torch.float32)


def make_checkerboard(n: int, *, seed: int = 0) -> Tensor:
    """Points uniform on the dark cells of a 4x4 checkerboard. Returns (n, 2).

    The board is [-2, 2]^2 with unit cells; a cell (column c, row r), counted from the lower left,
    is dark when c + r is even. Every row and column holds two dark cells, so both marginals are
    uniform on [-2, 2] (variance 4/3); scaling by sqrt(3)/2 makes the variance exactly 1.
    """
    require_int("n", n)
    g = _generator(seed)
    x = 4 * torch.rand(n, generator=g, dtype=torch.float64) - 2
    column = (x + 2).floor().clamp(0, 3).long()
    # The dark rows of column c are c % 2 and c % 2 + 2; pick one at random.
    row = column % 2 + 2 * torch.randint(0, 2, (n,), generator=g)
    y = row - 2 + torch.rand(n, generator=g, dtype=torch.float64)
    return (torch.stack([x, y], dim=1) * (math.sqrt(3) / 2)).to(torch.float32)
