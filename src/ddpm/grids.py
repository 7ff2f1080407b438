"""Timestep grids: which of the T trained timesteps a sampler visits, as data made by named functions.

Each grid function maps the schedule's alpha_bar table (float64, (T,)) and a count n to n positions
in t, descending from the noisiest to the cleanest, possibly fractional. ``timestep_grid`` snaps them
to distinct trained timesteps, so that every network call is made at a noise level the network was
trained at and the sampler's coefficients are exact for it:

    uniform    T-1 ... 0 evenly spaced in t (rounded): starts at the noisiest step, ends at the cleanest;
    leading    0, T//n, 2 T//n, ... (the DDIM paper's code, diffusers' "leading"): never starts at T-1;
    trailing   T-1, T-1 - T/n, ... (diffusers' "trailing", Lin et al. 2024): starts at T-1, ends at T/n - 1;
    quadratic  (T-1) u^2 for u evenly spaced from 1 to 0: dense near the data (the DDIM paper's
               "quad" on CIFAR-10 stops at 0.8 T; this one starts at T-1, where x_T ~ N(0, I) holds);
    logsnr     evenly spaced in lambda = log(alpha / sigma), half the log-SNR (DPM-Solver's choice
               for low-resolution images: its error terms are powers of the step in lambda);
    karras     sigma = sqrt((1 - alpha_bar) / alpha_bar) spaced evenly in sigma^(1/7) (Karras et al.
               2022, rho = 7): dense near the data, sparse at high noise.

Grids are clipped to the trained range: with the linear schedule sigma runs from 0.01 (t = 0) to
157 (t = 999). Where a grid asks for more levels near the data than there are trained timesteps,
snapping keeps them distinct (0, 1, 2, ...), so n levels always means n network calls.

The ODE solvers hand a grid the table up to ``ddpm.sampling.walk_top`` only, so that "T-1" above is
their noisiest usable step (t = 994 of the cosine schedule). On the cosine and sigmoid schedules they
also carry the grids in t over from the linear schedule by noise level (``carried_grid``;
docs/sampling.md).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ddpm.validation import check_choice, whole_number

KARRAS_RHO = 7.0

GridFunction = Callable[[Tensor, int], Tensor]  # (alpha_bar (T,) float64, n) -> positions in t (n,), descending


def uniform_grid(alpha_bar: Tensor, n: int) -> Tensor:
    return torch.linspace(0, alpha_bar.numel() - 1, n, dtype=torch.float64).round().flip(0)


def leading_grid(alpha_bar: Tensor, n: int) -> Tensor:
    return (torch.arange(n, dtype=torch.float64) * (alpha_bar.numel() // n)).flip(0)


def trailing_grid(alpha_bar: Tensor, n: int) -> Tensor:
    num_steps = alpha_bar.numel()
    return (num_steps - torch.arange(n, dtype=torch.float64) * (num_steps / n)).round() - 1


def quadratic_grid(alpha_bar: Tensor, n: int) -> Tensor:
    return (alpha_bar.numel() - 1) * torch.linspace(1.0, 0.0, n, dtype=torch.float64).square()


def logsnr_grid(alpha_bar: Tensor, n: int) -> Tensor:
    lam = half_log_snr(alpha_bar)
    return position_of(torch.linspace(float(lam[-1]), float(lam[0]), n, dtype=torch.float64), lam)


def karras_grid(alpha_bar: Tensor, n: int, rho: float = KARRAS_RHO) -> Tensor:
    lam = half_log_snr(alpha_bar)
    sigma = (-lam).exp()  # sqrt((1 - alpha_bar) / alpha_bar), increasing in t
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    high, low = float(sigma[-1]) ** (1 / rho), float(sigma[0]) ** (1 / rho)
    return position_of(-torch.log((high + ramp * (low - high)) ** rho), lam)


GRIDS: dict[str, GridFunction] = {
    "uniform": uniform_grid, "leading": leading_grid, "trailing": trailing_grid,
    "quadratic": quadratic_grid, "logsnr": logsnr_grid, "karras": karras_grid,
}


def half_log_snr(alpha_bar: Tensor) -> Tensor:
    """lambda_t = log(alpha_t / sigma_t) = log(alpha_bar / (1 - alpha_bar)) / 2, decreasing in t."""
    return 0.5 * (alpha_bar.log() - torch.log1p(-alpha_bar))


def position_of(lam: Tensor, table: Tensor) -> Tensor:
    """Fractional t at which the (decreasing) table of lambda takes each value of ``lam``, by linear
    interpolation between trained timesteps; values outside the table's range are clipped to it."""
    if table.numel() == 1:
        return torch.zeros_like(lam)
    rising = -table  # increasing in t
    target = (-lam).clamp(float(rising[0]), float(rising[-1]))
    left = torch.searchsorted(rising, target).clamp(1, rising.numel() - 1) - 1
    right = left + 1
    return left + (target - rising[left]) / (rising[right] - rising[left])


def snap(positions: Tensor, num_steps: int) -> list[int]:
    """Round descending positions in t to distinct trained timesteps in 0..T-1, in the same order.
    Where rounding would merge two levels, the lower ones move down (or the higher up) one step at a
    time, so the count never changes; needs len(positions) <= T."""
    rising = positions.flip(0).round().clamp(0, num_steps - 1).long().tolist()
    for j in range(1, len(rising)):  # from the data upwards: each strictly above the one before
        rising[j] = max(rising[j], rising[j - 1] + 1)
    rising[-1] = min(rising[-1], num_steps - 1)
    for j in range(len(rising) - 2, -1, -1):  # from the top down: each strictly below the one after
        rising[j] = min(rising[j], rising[j + 1] - 1)
    return rising[::-1]


TIME_GRIDS = ("uniform", "leading", "trailing", "quadratic")  # the grids that read t alone, not the levels


def carried_grid(alpha_bar: Tensor, levels: int, grid: str, reference: Tensor) -> list[int]:
    """The ``levels`` distinct timesteps (descending) of a schedule with ``alpha_bar`` at the noise levels
    that ``grid`` visits on the ``reference`` schedule: its timesteps there, turned into lambda and found
    again in ``alpha_bar`` (clipped to its range). On the reference itself this is ``timestep_grid``."""
    lam = half_log_snr(reference.to(torch.float64))[timestep_grid(reference, levels, grid)]
    table = alpha_bar.to(torch.float64)
    return snap(position_of(lam, half_log_snr(table)), table.numel())


def timestep_grid(alpha_bar: Tensor, levels: int, grid: str = "uniform") -> list[int]:
    """The ``levels`` distinct trained timesteps (descending) that ``grid`` picks from a schedule with
    ``alpha_bar`` (T,). One level is always t = T-1 (one step from pure noise to data)."""
    check_choice("spacing", grid, tuple(GRIDS))
    num_steps = alpha_bar.numel()
    levels = whole_number("steps", levels, 1, num_steps)
    if levels == 1:
        return [num_steps - 1]
    return snap(GRIDS[grid](alpha_bar.to(torch.float64), levels), num_steps)
