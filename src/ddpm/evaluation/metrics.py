"""Distances between sets of samples: Frechet distance of features, energy distance of points, and
the errors of samples of the built-in image sets against what they should be.

All functions take tensors and return floats or tensors; none draws samples or reads files.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["in_batches", "FeatureStatistics", "feature_statistics", "frechet_distance", "energy_distance",
           "square_error"]


def in_batches(apply: Callable[[Tensor], Tensor], images: Tensor, batch_size: int, device: torch.device,
               width: int, progress: str | None = None) -> Tensor:
    """apply(images) in batches of ``batch_size`` on ``device`` under inference mode -> float32 (N, width)
    on the CPU, concatenated outside inference mode so callers get an ordinary tensor. progress: the
    label of a progress bar over the images (None: no bar)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    chunks: list[Tensor] = []
    with torch.inference_mode(), tqdm(total=images.shape[0], desc=progress, unit="image", leave=False,
                                      disable=progress is None, dynamic_ncols=True, file=sys.stderr) as bar:
        for start in range(0, images.shape[0], batch_size):
            chunks.append(apply(images[start:start + batch_size].to(device)).float().cpu())
            bar.update(min(batch_size, images.shape[0] - start))
    return torch.cat(chunks) if chunks else torch.empty(0, width)


class FeatureStatistics(NamedTuple):
    """Mean (F,) and covariance (F, F) of a set of feature vectors, float64, and how many there were."""
    mean: Tensor
    cov: Tensor
    count: int


def feature_statistics(features: Tensor) -> FeatureStatistics:
    """Mean and unbiased covariance (divisor N - 1, as FID implementations use) of features (N, F)."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N, F) with N >= 2; got shape {tuple(features.shape)}")
    x = features.detach().to("cpu", torch.float64)
    mean = x.mean(0)
    centred = x - mean
    return FeatureStatistics(mean, centred.T @ centred / (x.shape[0] - 1), x.shape[0])


def _psd_sqrt(matrix: Tensor) -> Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (negative rounding
    noise in its eigenvalues is set to 0)."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """d^2 = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2}), the squared 2-Wasserstein
    distance between N(mu_a, S_a) and N(mu_b, S_b) (FID when the features are Inception's).

    tr((S_a S_b)^{1/2}) is computed as the sum of square roots of the eigenvalues of the symmetric
    PSD matrix S_a^{1/2} S_b S_a^{1/2}, which has the same eigenvalues as S_a S_b. This stays real and
    exact for singular covariances (fewer samples than features), where a general matrix square root
    of S_a S_b returns complex rounding noise that implementations have to discard.
    """
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"feature sizes differ: {tuple(a.mean.shape)} and {tuple(b.mean.shape)}")
    root_a = _psd_sqrt(a.cov)
    middle = root_a @ b.cov @ root_a
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (a.mean - b.mean).square().sum() + a.cov.trace() + b.cov.trace() - 2 * cross
    return max(float(distance), 0.0)


def _mean_pairwise_distance(x: Tensor, y: Tensor, chunk: int = 2048) -> Tensor:
    """Mean Euclidean distance over all N * M pairs (x_i, y_j); when y is x, the N zero distances of
    i = j count too. Distances are taken directly, not through |x|^2 + |y|^2 - 2 x.y, whose rounding
    would leave non-zero values on that diagonal."""
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, x.shape[0], chunk):
        total += torch.cdist(x[start:start + chunk], y, compute_mode="donot_use_mm_for_euclid_dist").sum()
    return total / (x.shape[0] * y.shape[0])


def energy_distance(x: Tensor, y: Tensor) -> float:
    """The energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely & Rizzo) between the empirical
    distributions of the samples x (N, D) and y (M, D): each expectation is a mean over all pairs,
    the zero distances of a point to itself included (the V-statistic).

    Why the V-statistic: it is the energy distance between the two empirical distributions, a squared
    distance in a Hilbert space, so it is never negative and is 0 only when the two sets hold the same
    points in the same proportions. The unbiased U-statistic (within-set means over distinct pairs)
    can come out negative for two draws of one distribution, which reads as nonsense beside a sample's
    distance. The price is a bias upwards: for independent samples the expected value is the
    distributions' energy distance plus E|X - X'| / N + E|Y - Y'| / M.

    What a value means: compare it with the same function applied to two disjoint draws of the real
    data, of the same sizes as x and y (the noise floor), whose expected value is that bias alone. A
    sample whose value is near the floor is as close to the data as fresh data is, and the excess over
    the floor estimates the distributions' energy distance; both need the one estimator and the same
    sizes to be comparable.
    The result is clipped at 0 only against rounding (of order 1e-15 times the distances).
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1] or min(x.shape[0], y.shape[0]) < 2:
        raise ValueError(f"energy_distance needs (N, D) and (M, D) with N, M >= 2; got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.detach().to("cpu", torch.float64), y.detach().to("cpu", torch.float64)
    between = _mean_pairwise_distance(x, y)
    distance = 2 * between - _mean_pairwise_distance(x, x) - _mean_pairwise_distance(y, y)
    return max(float(distance), 0.0)


def square_error(images: Tensor, target: Tensor) -> Tensor:
    """Root mean square error of each image (N, C, H, W) against the one target image (C, H, W), in
    the [-1, 1] units of the images: 0 is the square exactly, 2 is every pixel inverted. (N,)."""
    if images.dim() != 4 or tuple(images.shape[1:]) != tuple(target.shape):
        raise ValueError(f"images {tuple(images.shape)} do not match the target {tuple(target.shape)}")
    return (images.double() - target.double()).square().flatten(1).mean(1).sqrt().float()
