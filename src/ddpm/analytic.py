"""Exact answers for data drawn from a Gaussian mixture: the noised marginals, their score, and the
optimal noise predictor. They stand in for a perfectly trained network, so that samplers can be
checked against the true data distribution with no training at all.

For data x0 ~ sum_k w_k N(mu_k, diag(s_k^2)), eq. 4 gives the marginal
    q(x_t) = sum_k w_k N(sqrt(alpha_bar_t) mu_k, diag(alpha_bar_t s_k^2 + 1 - alpha_bar_t)),
and the eps-prediction that minimises the training loss is E[eps | x_t] = -sqrt(1 - alpha_bar_t) * grad log q(x_t)
(Tweedie's formula).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ddpm.schedule import NoiseSchedule


@dataclass(frozen=True)
class GaussianMixture:
    """A mixture of axis-aligned Gaussians in D dimensions.

    weights: (K,) summing to 1; means: (K, D); stds: (K, D) per-dimension standard deviations.
    Points are (B, D); ``shape`` lets the same mixture describe images, e.g. (C, H, W) with D = C*H*W.
    """
    weights: Tensor
    means: Tensor
    stds: Tensor
    shape: tuple[int, ...] = ()

    @staticmethod
    def create(weights, means, stds, shape: tuple[int, ...] | None = None) -> "GaussianMixture":
        """Build from lists or tensors; ``stds`` may be a scalar per component (K,) or (K, D)."""
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() == 1:
            means = means.unsqueeze(0)
        weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        stds = torch.as_tensor(stds, dtype=torch.float64)
        stds = stds.reshape(-1, 1).expand_as(means) if stds.dim() <= 1 else stds
        if weights.shape[0] != means.shape[0] or stds.shape != means.shape:
            raise ValueError(f"mixture needs weights (K,), means (K, D), stds (K,) or (K, D); got "
                             f"{tuple(weights.shape)}, {tuple(means.shape)}, {tuple(stds.shape)}")
        if (weights < 0).any() or abs(float(weights.sum()) - 1.0) > 1e-9 or (stds <= 0).any():
            raise ValueError("mixture weights must be non-negative and sum to 1, and stds positive")
        shape = (means.shape[1],) if shape is None else tuple(shape)
        if math.prod(shape) != means.shape[1]:
            raise ValueError(f"shape {shape} does not hold D={means.shape[1]} values")
        return GaussianMixture(weights, means, stds.contiguous(), shape)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> Tensor:
        """The mixture's mean (D,)."""
        return self.weights @ self.means

    def variance(self) -> Tensor:
        """The mixture's per-dimension variance (D,) (law of total variance)."""
        second = self.weights @ (self.stds.square() + self.means.square())
        return second - self.mean().square()

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws, shaped (n, *shape), float32."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[k] + self.stds[k] * z
        return x.to(torch.float32).reshape(n, *self.shape)

    def marginal(self, alpha_bar: Tensor) -> tuple[Tensor, Tensor]:
        """Component means (B, K, D) and variances (B, K, D) of q(x_t) for alpha_bar (B,)."""
        a = alpha_bar.to(torch.float64).reshape(-1, 1, 1)
        return a.sqrt() * self.means, a * self.stds.square() + (1.0 - a)

    def log_responsibilities(self, x: Tensor, alpha_bar: Tensor) -> Tensor:
        """log p(component k | x_t) under q(x_t), shape (B, K), for x (B, ...) and alpha_bar (B,)."""
        x = x.reshape(x.shape[0], 1, -1).to(torch.float64)
        mean, var = self.marginal(alpha_bar)
        log_pdf = -0.5 * (((x - mean).square() / var) + var.log() + math.log(2 * math.pi)).sum(-1)
        joint = log_pdf + self.weights.log()
        return joint - joint.logsumexp(dim=1, keepdim=True)

    def score(self, x: Tensor, alpha_bar: Tensor) -> Tensor:
        """grad_x log q(x_t) at x (B, ...) for alpha_bar (B,); float64, shaped like x."""
        flat = x.reshape(x.shape[0], 1, -1).to(torch.float64)
        mean, var = self.marginal(alpha_bar)
        resp = self.log_responsibilities(x, alpha_bar).exp().unsqueeze(-1)
        return (resp * (-(flat - mean) / var)).sum(1).reshape(x.shape)

    def classify(self, x: Tensor) -> Tensor:
        """The most probable component of each data point x (B, ...) (alpha_bar = 1): LongTensor (B,)."""
        ones = torch.ones(x.shape[0], dtype=torch.float64)
        return self.log_responsibilities(x, ones).argmax(dim=1)


def optimal_eps_model(mixture: GaussianMixture, schedule: NoiseSchedule):
    """The exact minimiser of the eps-prediction loss for this data: a callable model(x_t, t).

    eps*(x_t, t) = -sqrt(1 - alpha_bar_t) * grad log q_t(x_t); computed in float64, returned as x_t's dtype.
    """
    alphas_cumprod = schedule.alphas_cumprod.to(torch.float64)

    def model(x_t: Tensor, t: Tensor) -> Tensor:
        alpha_bar = alphas_cumprod[t.to(alphas_cumprod.device)].cpu()
        score = mixture.score(x_t.cpu(), alpha_bar)
        eps = -(1.0 - alpha_bar).sqrt().reshape(-1, *([1] * (x_t.dim() - 1))) * score
        return eps.to(device=x_t.device, dtype=x_t.dtype)

    return model
