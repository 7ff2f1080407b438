"""Samplers: DDPM (Algorithm 2, optionally with x0 clipping), DDIM (Song et al. 2021, eq. 12) and the
few-step ODE solvers of the probability-flow ODE: Euler and Heun on the sigma grid (Karras et al.
2022), iPNDM (Zhang & Chen 2023) and DPM-Solver++ 2M / 3M (Lu et al. 2022).

Each sampler is a plain function in ``SAMPLERS``, one visible loop over the levels of a timestep grid
(``ddpm.grids``) that reads its coefficients by name. A walk visits distinct trained timesteps,
descending, and ends with a step into the clean data (t_prev = -1 stands for it: alpha_bar = 1).
Samplers see the network only through a ``Denoiser``, ``denoiser(x_t, t) -> (pred_x0, pred_eps)``;
``sample()`` checks the options (a ``SampleConfig``), builds the denoiser and calls the sampler by name.

The ODE solvers work in the noise levels of the walk's timesteps (``walk_levels``), in float64:
alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar), lambda = log(alpha / sigma) and the
variance-exploding s = sigma / alpha (Karras's sigma). With y = x / alpha the probability-flow ODE is
dy/ds = eps(x, s): DDIM is its Euler method, which is why ``euler`` and ``ddim`` take the same steps.

Adding a sampler: write its function here, add it to ``SAMPLERS`` with its default grid, add its name
to ``SampleConfig.sampler`` (and to ``used_by`` of the options it reads), and test it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Callable, NamedTuple, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ddpm.config import SampleConfig
from ddpm.diffusion import PREDICTIONS, Denoised, Model, Prediction, denoise
from ddpm.grids import GRIDS, TIME_GRIDS, carried_grid, timestep_grid
from ddpm.schedule import NoiseSchedule, posterior_coefficients
from ddpm.validation import SettingError, check_choice, whole_number


def timestep_sequence(schedule: NoiseSchedule | int, steps: int | None = None, spacing: str = "uniform"
                      ) -> list[int]:
    """The trained timesteps a walk of ``steps`` levels visits (None: all T), descending, as the grid
    ``spacing`` picks them (``ddpm.grids``): e.g. uniform: evenly spaced from T-1 down to 0 (rounded);
    leading: 0, T//S, 2*T//S, ... as in the DDIM paper's code. ``schedule`` may be T itself for the
    grids that depend on t alone (uniform, leading, trailing, quadratic)."""
    if isinstance(schedule, NoiseSchedule):
        alpha_bar = schedule.alphas_cumprod_float64()
    else:
        num_steps = whole_number("num_steps", schedule, 1)
        if spacing not in TIME_GRIDS:
            check_choice("spacing", spacing, tuple(GRIDS))
            raise ValueError(f"spacing {spacing!r} depends on the noise levels: pass the NoiseSchedule, not T")
        alpha_bar = torch.full((num_steps,), 0.5, dtype=torch.float64)  # these grids read only its length
    return timestep_grid(alpha_bar, alpha_bar.numel() if steps is None else steps, spacing)


class StepCoefficients(NamedTuple):
    """Coefficients for walking a timestep sequence, one entry per step i (t_i -> t_{i+1}); each (S,).

    alpha_bar: alpha_bar at t_i; alpha_bar_prev: at t_{i+1} (1 after the last step);
    posterior_coef1/2 and posterior_variance: q(x_{t_{i+1}} | x_{t_i}, x0) (eq. 6-7, merged steps);
    beta: 1 - alpha_bar / alpha_bar_prev, the variance of the merged forward step (sigma^2 = beta_t).
    """
    alpha_bar: Tensor
    alpha_bar_prev: Tensor
    posterior_coef1: Tensor
    posterior_coef2: Tensor
    posterior_variance: Tensor
    beta: Tensor


def step_coefficients(schedule: NoiseSchedule, timesteps: list[int], dtype: torch.dtype = torch.float32
                      ) -> StepCoefficients:
    """Per-step coefficients for ``timesteps`` (descending), computed in float64 on the CPU once and
    stored as ``dtype`` on the schedule's device. With all T steps they equal the schedule's tables."""
    table = schedule.alphas_cumprod_float64()
    t = torch.tensor(timesteps, dtype=torch.long)
    alpha_bar = table[t]
    alpha_bar_prev = torch.cat([table[t[1:]], torch.ones(1, dtype=torch.float64)])
    coef1, coef2, variance = posterior_coefficients(alpha_bar, alpha_bar_prev)
    beta = 1.0 - alpha_bar / alpha_bar_prev
    return StepCoefficients(*(c.to(schedule.device, dtype)
                              for c in (alpha_bar, alpha_bar_prev, coef1, coef2, variance, beta)))


class SamplerStep(NamedTuple):
    """What a sampler hands its callback after step ``index``: t (int), x_t (the input of the step),
    pred_x0 (the model's estimate of the clean sample) and x_prev (the output); tensors (B, ...)."""
    index: int
    t: int
    x_t: Tensor
    pred_x0: Tensor
    x_prev: Tensor


Denoiser = Callable[[Tensor, int], Denoised]  # (x_t (B, ...), t) -> (pred_x0, pred_eps), each (B, ...)
Callback = Callable[[SamplerStep], None]


class Sampler(Protocol):
    """What every entry of ``SAMPLERS`` is: a walk from x = x_T down the timesteps, returning x_0."""

    def __call__(self, denoiser: Denoiser, x: Tensor, schedule: NoiseSchedule, timesteps: list[int],
                 options: SampleConfig, *, generator: torch.Generator | None, callback: Callback | None,
                 progress: bool) -> Tensor: ...


def ddpm_step(x_t: Tensor, pred_x0: Tensor, coef1: Tensor, coef2: Tensor, variance: Tensor,
              noise: Tensor | None) -> Tensor:
    """One step of Algorithm 2: x_{t-1} = mu(x_t, x0_hat) + sigma_t z.

    The mean is the posterior mean of eq. 7 at the predicted x0; for an eps model without clipping it
    equals Algorithm 2's 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) exactly.
    ``variance`` is sigma_t^2; the noise is scaled by its square root. ``noise=None`` on the last step.
    """
    mean = coef1 * pred_x0 + coef2 * x_t
    return mean if noise is None else mean + variance.sqrt() * noise


def ddim_step(pred_x0: Tensor, pred_eps: Tensor, sqrt_alpha_bar_prev: Tensor, direction: Tensor, sigma: Tensor,
              noise: Tensor | None) -> Tensor:
    """One step of DDIM (Song et al. 2021, eq. 12):
    x_prev = sqrt(alpha_bar_prev) x0_hat + sqrt(1 - alpha_bar_prev - sigma^2) eps_hat + sigma z,
    with ``direction`` = sqrt(1 - alpha_bar_prev - sigma^2) formed beforehand (``ddim_coefficients``)."""
    x_prev = sqrt_alpha_bar_prev * pred_x0 + direction * pred_eps
    return x_prev if noise is None else x_prev + sigma * noise


class DDIMCoefficients(NamedTuple):
    """Eq. 12's coefficients per step i (t_i -> t_{i+1}), each (S,): sqrt_alpha_bar_prev, sigma =
    eta sqrt(beta tilde) (eq. 16) and direction = sqrt(1 - alpha_bar_prev - sigma^2)."""
    sqrt_alpha_bar_prev: Tensor
    direction: Tensor
    sigma: Tensor


def ddim_coefficients(schedule: NoiseSchedule, timesteps: list[int], eta: float) -> DDIMCoefficients:
    """DDIM's coefficients for ``timesteps``, formed in float64 and stored as float32.

    On the step into t = 0, 1 - alpha_bar_prev - sigma^2 is a difference of numbers near 1 whose exact
    value (8.5e-8 at 10 steps, eta = 1) lies below one float32 ulp of 1: formed in float32 it comes out
    9.3% wrong at 10 steps. In float64 it is exact to 1e-16."""
    c = step_coefficients(schedule, timesteps, torch.float64)
    sigma = eta * c.posterior_variance.sqrt()
    direction = (1.0 - c.alpha_bar_prev - sigma.square()).clamp(min=0.0).sqrt()
    return DDIMCoefficients(*(v.to(torch.float32) for v in (c.alpha_bar_prev.sqrt(), direction, sigma)))


def _walk(timesteps: list[int], desc: str, progress: bool) -> Iterator[tuple[int, int, int]]:
    """(i, t, t_prev) for each step of the walk, t_prev = -1 on the last (the clean data)."""
    following = timesteps[1:] + [-1]
    for i, t in enumerate(tqdm(timesteps, desc=desc, disable=not progress, dynamic_ncols=True)):
        yield i, t, following[i]


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device)


def sample_ddpm(denoiser: Denoiser, x: Tensor, schedule: NoiseSchedule, timesteps: list[int],
                options: SampleConfig, *, generator: torch.Generator | None = None,
                callback: Callback | None = None, progress: bool = False) -> Tensor:
    """Algorithm 2 with sigma_t^2 = beta tilde_t (variance "fixed_small") or beta_t ("fixed_large").
    On fewer than T steps each step is the posterior of the merged steps (respacing). Default grid:
    uniform, which is every step on all T and otherwise starts at T-1, where x_T ~ N(0, I) holds."""
    c = step_coefficients(schedule, timesteps)
    variance = c.posterior_variance if options.variance == "fixed_small" else c.beta
    for i, t, t_prev in _walk(timesteps, "sampling (ddpm)", progress):
        pred_x0, _ = denoiser(x, t)
        # Algorithm 2, line 3: no noise is added on the final step (t = 0 here, t = 1 in the paper).
        z = _noise(x, generator) if t_prev >= 0 else None
        x_prev = ddpm_step(x, pred_x0, c.posterior_coef1[i], c.posterior_coef2[i], variance[i], z)
        if callback is not None:
            callback(SamplerStep(i, t, x, pred_x0, x_prev))
        x = x_prev
    return x


def sample_ddim(denoiser: Denoiser, x: Tensor, schedule: NoiseSchedule, timesteps: list[int],
                options: SampleConfig, *, generator: torch.Generator | None = None,
                callback: Callback | None = None, progress: bool = False) -> Tensor:
    """DDIM (eq. 12) with sigma = eta sqrt(beta tilde): eta = 0 is deterministic, and eta = 1 on all T
    steps is the same walk as DDPM with fixed_small. Default grid: uniform, so that the walk starts at
    T-1 (the "leading" grid of the paper's code starts T/S - 1 steps short of pure noise)."""
    c = ddim_coefficients(schedule, timesteps, options.eta)
    for i, t, t_prev in _walk(timesteps, "sampling (ddim)", progress):
        pred_x0, pred_eps = denoiser(x, t)
        z = _noise(x, generator) if options.eta > 0 and t_prev >= 0 else None
        x_prev = ddim_step(pred_x0, pred_eps, c.sqrt_alpha_bar_prev[i], c.direction[i], c.sigma[i], z)
        if callback is not None:
            callback(SamplerStep(i, t, x, pred_x0, x_prev))
        x = x_prev
    return x


# --- ODE solvers ----------------------------------------------------------------------------------

class Levels(NamedTuple):
    """The noise levels of a walk, one entry per timestep and a last for the clean data; floats in float64.

    alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar), lam = log(alpha / sigma) (+inf for the data)
    and s = sigma / alpha, the variance-exploding noise level (0 for the data)."""
    alpha: list[float]
    sigma: list[float]
    lam: list[float]
    s: list[float]


def walk_levels(schedule: NoiseSchedule, timesteps: list[int]) -> Levels:
    alpha_bar = schedule.alphas_cumprod_float64()[timesteps].tolist() + [1.0]
    alpha = [math.sqrt(a) for a in alpha_bar]
    sigma = [math.sqrt(1.0 - a) for a in alpha_bar]
    lam = [math.log(a / s) if s > 0 else math.inf for a, s in zip(alpha, sigma)]
    return Levels(alpha, sigma, lam, [s / a for a, s in zip(alpha, sigma)])


def ve_step(x: Tensor, slope: Tensor, levels: Levels, i: int) -> Tensor:
    """One step of y = x / alpha along dy/ds = ``slope`` from level i to level i + 1, back in x."""
    return levels.alpha[i + 1] * (x / levels.alpha[i] + (levels.s[i + 1] - levels.s[i]) * slope)


def sample_euler(denoiser: Denoiser, x: Tensor, schedule: NoiseSchedule, timesteps: list[int],
                 options: SampleConfig, *, generator: torch.Generator | None = None,
                 callback: Callback | None = None, progress: bool = False) -> Tensor:
    """Euler's method for dy/ds = eps on the walk's levels: first order, one network call a step.
    On any grid it takes DDIM's (eta = 0) steps exactly. Default grid: leading, the best of the six for
    it at 10 calls on MNIST (FID-MNIST 136 against 156 uniform and 245 Karras's, docs/results.md)."""
    levels = walk_levels(schedule, timesteps)
    for i, t, _ in _walk(timesteps, "sampling (euler)", progress):
        pred_x0, pred_eps = denoiser(x, t)
        x_prev = ve_step(x, pred_eps, levels, i)
        if callback is not None:
            callback(SamplerStep(i, t, x, pred_x0, x_prev))
        x = x_prev
    return x


def sample_heun(denoiser: Denoiser, x: Tensor, schedule: NoiseSchedule, timesteps: list[int],
                options: SampleConfig, *, generator: torch.Generator | None = None,
                callback: Callback | None = None, progress: bool = False) -> Tensor:
    """Heun's method (Karras et al. 2022, Algorithm 1 without churn): an Euler step to the next level,
    then the step again with the average of the slopes at both ends. Second order; two network calls a
    step, one on the last (the step into the data is Euler's), so S levels cost 2 S - 1 calls. Default
    grid: trailing, which ends its walk a step above t = 0 so that Euler's last step does the final
    denoising; at 9 calls on MNIST it measured FID-MNIST 68 against 216 on Karras's grid (the paper's),
    and it was the best of the six on the mixture too (docs/results.md, docs/sampling.md)."""
    levels = walk_levels(schedule, timesteps)
    for i, t, t_prev in _walk(timesteps, "sampling (heun)", progress):
        pred_x0, pred_eps = denoiser(x, t)
        x_prev = ve_step(x, pred_eps, levels, i)
        if t_prev >= 0:
            _, eps_next = denoiser(x_prev, t_prev)
            x_prev = ve_step(x, 0.5 * (pred_eps + eps_next), levels, i)
        if callback is not None:
            callback(SamplerStep(i, t, x, pred_x0, x_prev))
        x = x_prev
    return x


# Adams-Bashforth weights for equal steps, newest slope first, by how many slopes are known.
ADAMS_BASHFORTH = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def sample_ipndm(denoiser: Denoiser, x: Tensor, schedule: NoiseSchedule, timesteps: list[int],
                 options: SampleConfig, *, generator: torch.Generator | None = None,
                 callback: Callback | None = None, progress: bool = False) -> Tensor:
    """iPNDM (Zhang & Chen 2023, "improved PNDM"): dy/ds = eps stepped with the Adams-Bashforth
    combination of the last four slopes, starting at orders 1, 2, 3 while fewer are known. One network
    call a step (the step into the data is Euler's). The weights are those of equal steps, so on an
    uneven grid it is not fourth order; it is kept for what it gives at 5-20 calls (Zhou et al. 2024).
    Default grid: leading, the best of the six for it at 10 calls on MNIST (FID-MNIST 135 against 395
    on Karras's grid)."""
    levels = walk_levels(schedule, timesteps)
    slopes: list[Tensor] = []
    for i, t, t_prev in _walk(timesteps, "sampling (ipndm)", progress):
        pred_x0, pred_eps = denoiser(x, t)
        slopes = [pred_eps, *slopes[:3]]
        # The step into the data is Euler's, so that the walk returns the last x0 prediction (clipped,
        # when asked): from v = 0.01 at t = 0 the extrapolated slope would change it by 0.01 |d eps|.
        order = len(slopes) if t_prev >= 0 else 1
        slope = sum(w * e for w, e in zip(ADAMS_BASHFORTH[order - 1], slopes))
        x_prev = ve_step(x, slope, levels, i)
        if callback is not None:
            callback(SamplerStep(i, t, x, pred_x0, x_prev))
        x = x_prev
    return x


def _first_order_step(i: int, timesteps: list[int], h: float) -> bool:
    """Whether DPM-Solver++ step i must not extrapolate: the step into the data (h infinite) and, in
    walks of under 15 levels, the step into the last level, where uneven grids make the step ratio
    small and the extrapolation wild (DPM-Solver's lower_order_final)."""
    return math.isinf(h) or (len(timesteps) < 15 and i == len(timesteps) - 2)


def sample_dpmpp_2m(denoiser: Denoiser, x: Tensor, schedule: NoiseSchedule, timesteps: list[int],
                    options: SampleConfig, *, generator: torch.Generator | None = None,
                    callback: Callback | None = None, progress: bool = False) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): the exact solution of the ODE's linear part in
    lambda, x_next = (sigma_next / sigma) x - alpha_next expm1(-h) D with h = lambda_next - lambda, where
    D extrapolates the x0 predictions of this level and the one before (r = h_before / h):
    D = (1 + 1 / 2r) x0 - (1 / 2r) x0_before. Second order; one call a step. The first step and the
    step into the data (h infinite) use D = x0, and so does, in walks of under 15 levels, the step into
    the last level, where uneven grids make r small and the extrapolation wild (DPM-Solver's
    lower_order_final). Default grid: Karras's, the best for it at 10 calls on MNIST (FID-MNIST 60 at
    1000 samples, against 62 leading and 81 even in lambda, DPM-Solver's recommendation; on the exact
    mixture the lambda grid is the better one, docs/sampling.md)."""
    levels = walk_levels(schedule, timesteps)
    before: Tensor | None = None
    for i, t, _ in _walk(timesteps, "sampling (dpm++2m)", progress):
        pred_x0, _ = denoiser(x, t)
        h = levels.lam[i + 1] - levels.lam[i]
        if before is None or _first_order_step(i, timesteps, h):
            d = pred_x0
        else:
            r = (levels.lam[i] - levels.lam[i - 1]) / h
            d = (1 + 0.5 / r) * pred_x0 - (0.5 / r) * before
        x_prev = (levels.sigma[i + 1] / levels.sigma[i]) * x - levels.alpha[i + 1] * math.expm1(-h) * d
        if callback is not None:
            callback(SamplerStep(i, t, x, pred_x0, x_prev))
        x, before = x_prev, pred_x0
    return x


def sample_dpmpp_3m(denoiser: Denoiser, x: Tensor, schedule: NoiseSchedule, timesteps: list[int],
                    options: SampleConfig, *, generator: torch.Generator | None = None,
                    callback: Callback | None = None, progress: bool = False) -> Tensor:
    """DPM-Solver++(3M): the exact integral of x0(lambda) e^lambda over the step, with x0(lambda) the
    polynomial through the last three x0 predictions (in lambda):
        x_next = (sigma_next / sigma) x + alpha_next (phi1 x0 + phi2 x0' + phi3 x0''),
        phi1 = 1 - e^-h, phi2 = h - 1 + e^-h, phi3 = h^2 / 2 - h + 1 - e^-h,
    x0' and x0'' the polynomial's derivatives at this level (divided differences). Third order; one
    call a step. Lower orders where fewer predictions are known, and first order on the step into the
    data and, in walks of under 15 levels, on the step into the last level, as dpm++2m. Default grid:
    trailing, the best for it at 10 calls on MNIST (FID-MNIST 90 at 200 samples, against 162 even in
    lambda; 62 at 1000 samples).

    diffusers' third-order DPM-Solver++ weights the x0'' term by half of phi3 and converges at second
    order on the Gaussian closed form; this form converges at third order or better
    (benchmarks/solver_order.py, docs/sampling.md)."""
    levels = walk_levels(schedule, timesteps)
    lam = levels.lam
    known: list[Tensor] = []  # x0 predictions, newest first
    for i, t, _ in _walk(timesteps, "sampling (dpm++3m)", progress):
        pred_x0, _ = denoiser(x, t)
        known = [pred_x0, *known[:2]]
        h = lam[i + 1] - lam[i]
        order = 1 if _first_order_step(i, timesteps, h) else len(known)
        phi1 = -math.expm1(-h)
        update = phi1 * pred_x0
        if order >= 2:
            slope = (known[0] - known[1]) / (lam[i] - lam[i - 1])
            if order == 3:
                curve = (slope - (known[1] - known[2]) / (lam[i - 1] - lam[i - 2])) / (lam[i] - lam[i - 2])
                update = update + (h * h / 2 - (h - phi1)) * 2 * curve
                slope = slope + curve * (lam[i] - lam[i - 1])
            update = update + (h - phi1) * slope
        x_prev = (levels.sigma[i + 1] / levels.sigma[i]) * x + levels.alpha[i + 1] * update
        if callback is not None:
            callback(SamplerStep(i, t, x, pred_x0, x_prev))
        x = x_prev
    return x


class SamplerEntry(NamedTuple):
    """A registered sampler: its walk, its default timestep grid (``ddpm.grids``), its default number of
    network calls (None: T), how many calls it makes per step between two levels (the step into the
    data always takes one) and whether it is an ODE solver, whose walk starts at ``walk_top`` rather
    than at T-1 and carries time grids over by noise level (``walk_timesteps``). The defaults
    of the ODE solvers are the best of the MNIST table (docs/results.md): 10 calls, on the grid that
    measured best there."""
    walk: Sampler
    grid: str
    calls: int | None = None
    calls_per_step: int = 1
    ode_solver: bool = False

    def levels(self, calls: int) -> int:
        """How many levels a walk of at most ``calls`` network calls visits."""
        return (calls - 1) // self.calls_per_step + 1

    def calls_for(self, levels: int) -> int:
        """How many network calls a walk over ``levels`` levels makes."""
        return (levels - 1) * self.calls_per_step + 1


SAMPLERS: dict[str, SamplerEntry] = {
    "ddpm": SamplerEntry(sample_ddpm, "uniform"),
    "ddim": SamplerEntry(sample_ddim, "uniform"),
    "euler": SamplerEntry(sample_euler, "leading", calls=10, ode_solver=True),
    "heun": SamplerEntry(sample_heun, "trailing", calls=10, calls_per_step=2, ode_solver=True),
    "ipndm": SamplerEntry(sample_ipndm, "leading", calls=10, ode_solver=True),
    "dpm++2m": SamplerEntry(sample_dpmpp_2m, "karras", calls=10, ode_solver=True),
    "dpm++3m": SamplerEntry(sample_dpmpp_3m, "trailing", calls=10, ode_solver=True),
}

# The noisiest level an ODE walk starts from, as s = sigma / alpha (Karras's sigma). The linear schedule
# ends at s = 157, so its walks still start at t = T-1. The cosine schedule caps beta at 0.999, which
# puts s = 20,291 at t = T-1 (the sigmoid: 1825): a first step from there multiplies the network's
# error by about s, and Heun's first step is wrong by far even for the exact noise predictor
# (tests/test_solvers.py). A walk that starts lower takes x_T ~ N(0, I) for a sample at its first level
# and so leaves out that level's data part, alpha x0 with alpha = 1 / sqrt(1 + s^2): 0.6% of x0 at the
# linear schedule's t = T-1, 0.8% at the cosine's t = 994. (EDM starts at s = 80.) DDPM and DDIM keep
# the paper's walk from t = T-1.
MAX_START_LEVEL = 160.0


def walk_top(schedule: NoiseSchedule) -> int:
    """The noisiest timestep an ODE walk starts from: the largest t with sigma / alpha <= MAX_START_LEVEL
    (T-1 for the linear schedule; 994 of 1000 for the cosine, 998 for the sigmoid)."""
    alpha_bar = schedule.alphas_cumprod_float64()
    below = ((1.0 - alpha_bar) / alpha_bar <= MAX_START_LEVEL ** 2).nonzero()
    return int(below.max()) if below.numel() else schedule.num_steps - 1


def walk_grid(options: SampleConfig) -> str:
    """The timestep grid a walk with ``options`` uses: the options' own, else the sampler's default."""
    return options.spacing or SAMPLERS[options.sampler].grid


def walk_budget(schedule: NoiseSchedule, options: SampleConfig) -> int:
    """The network calls a walk with ``options`` may make: ``options.steps``, else the sampler's own
    default (T for ddpm and ddim), at most T."""
    return options.steps or min(SAMPLERS[options.sampler].calls or schedule.num_steps, schedule.num_steps)


# The schedules on which the ODE solvers' time grids are carried over from the linear schedule by noise
# level. Those grids (uniform, leading, trailing, quadratic) and each solver's choice among them were
# measured on the linear schedule, where a grid even in t is also a choice of noise levels. On the
# cosine schedule the same t are other levels: Heun's trailing grid there steps from sigma / alpha =
# 128 to 3 at once (157 to 26 on the linear) and drew noise from a network trained for 20 minutes
# (FID-MNIST 906), where the levels of the linear schedule's grid gave 34.8 (docs/results.md).
CARRIED_SCHEDULES = ("cosine", "sigmoid")


def walk_timesteps(schedule: NoiseSchedule, options: SampleConfig) -> list[int]:
    """The timesteps a walk with ``options`` visits: as many levels as ``walk_budget`` network calls
    allow, on ``walk_grid(options)``, laid over t = 0 ... T-1. The ODE solvers lay it over t = 0 ...
    ``walk_top`` instead, and on the schedules of CARRIED_SCHEDULES visit the noise levels a time grid
    visits on the linear schedule of the same T (``ddpm.grids.carried_grid``)."""
    entry, grid = SAMPLERS[options.sampler], walk_grid(options)
    alpha_bar = schedule.alphas_cumprod_float64()
    levels = entry.levels(walk_budget(schedule, options))
    if not entry.ode_solver:
        return timestep_grid(alpha_bar, levels, grid)
    alpha_bar = alpha_bar[:walk_top(schedule) + 1]
    levels = min(levels, alpha_bar.numel())
    if grid in TIME_GRIDS and schedule.kind in CARRIED_SCHEDULES:
        linear = NoiseSchedule("linear", schedule.num_steps).alphas_cumprod_float64()
        return carried_grid(alpha_bar, levels, grid, linear)
    return timestep_grid(alpha_bar, levels, grid)


def network_calls(options: SampleConfig, timesteps: list[int]) -> int:
    """The network calls a walk over ``timesteps`` makes with ``options``' sampler."""
    return SAMPLERS[options.sampler].calls_for(len(timesteps))


def _check_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    try:
        dims = tuple(shape)
    except TypeError:  # e.g. a bare int
        dims = ()
    if len(dims) < 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in dims):
        raise ValueError(f"shape must be (B, D) or (B, C, H, W) with positive integers; got {shape!r}")
    return dims


def sample(
    model: Model,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    sampler: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    variance: str = "fixed_small",
    clip_denoised: bool = False,
    prediction: Prediction = "eps",
    spacing: str | None = None,
    threshold: float | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    cuda_graph: bool = False,
) -> Tensor:
    """Draw samples of ``shape`` (B, ...) from the reverse process of a trained model.

    sampler: a name in ``SAMPLERS``: "ddpm" is Algorithm 2 with sigma_t^2 = beta tilde_t
      ("fixed_small") or beta_t ("fixed_large"); "ddim" is eq. 12 with sigma = eta * sqrt(beta tilde);
      "euler", "heun", "ipndm", "dpm++2m" and "dpm++3m" solve the probability-flow ODE (see each one).
    steps: how many network calls the walk may make (None: T); Heun makes two a step, the others one.
    spacing: the timestep grid (``ddpm.grids``; None: the sampler's own).
    clip_denoised: clip the predicted x0 to [-1, 1] before using it (the x0-clipped variant).
    threshold: dynamic thresholding (Imagen): the quantile of |x0| per sample, e.g. 0.995, above which
      x0 is clipped and rescaled into [-1, 1]; replaces clip_denoised.
    The options are checked as a ``SampleConfig`` (``sample_with`` takes one directly).
    noise: the starting x_T (default: drawn from ``generator``). Returns x_0, shape ``shape``.
    The callback receives a ``SamplerStep`` after every step.
    cuda_graph: replay the network as a CUDA graph (``ddpm.cuda_graph``). Off by default here, since a
      model of your own may read a value on the host, which a graph cannot record; a run's own sampling
      (``Run.sample``, ``ddpm sample``) turns it on for a CUDA device.
    """
    options = SampleConfig(sampler=sampler, steps=steps, eta=eta, variance=variance, spacing=spacing,
                           clip=clip_denoised, threshold=threshold)
    return sample_with(model, schedule, shape, options, prediction=prediction, generator=generator, noise=noise,
                       callback=callback, progress=progress, cuda_graph=cuda_graph)


def sample_with(model: Model, schedule: NoiseSchedule, shape: tuple[int, ...], options: SampleConfig, *,
                prediction: Prediction = "eps", generator: torch.Generator | None = None,
                noise: Tensor | None = None, callback: Callback | None = None, progress: bool = False,
                cuda_graph: bool = False) -> Tensor:
    """``sample`` with its options given as one ``SampleConfig`` (``options.clip`` is clip_denoised)."""
    if not isinstance(schedule, NoiseSchedule):
        raise ValueError(f"schedule must be a ddpm.NoiseSchedule; got {type(schedule).__name__} "
                         f"(e.g. NoiseSchedule('linear', 1000))")
    if not isinstance(options, SampleConfig):
        raise ValueError(f"options must be a ddpm.config.SampleConfig; got {type(options).__name__}")
    check_choice("prediction", prediction, PREDICTIONS)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None; got {type(generator).__name__} "
                         f"(for a seed, pass torch.Generator(device).manual_seed(seed))")
    if not isinstance(cuda_graph, bool):
        raise SettingError("cuda_graph", cuda_graph, "use True or False")
    shape = _check_shape(shape)
    timesteps = walk_timesteps(schedule, options)
    device = schedule.device
    if cuda_graph:
        from ddpm.cuda_graph import GraphedModel

        model = GraphedModel(model, capture=device.type == "cuda")

    def denoiser(x: Tensor, t: int) -> Denoised:
        t_batch = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
        return denoise(schedule, model(x, t_batch), x, t_batch, prediction, options.clip, options.threshold)

    # No autograd records. (torch.inference_mode was measured no faster: 1.007x on DDIM-50 of
    # unet-mnist, rounds 0.95-1.07, benchmarks/speed_tricks.py, docs/performance.md.)
    with torch.no_grad():
        if noise is None:
            x = torch.randn(shape, generator=generator, device=device)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape}; got {tuple(noise.shape)}")
        else:
            x = noise.to(device, torch.float32)
        return SAMPLERS[options.sampler].walk(denoiser, x, schedule, timesteps, options, generator=generator,
                                              callback=callback, progress=progress)


def ddim_invert(
    model: Model,
    schedule: NoiseSchedule,
    x0: Tensor,
    *,
    steps: int | None = None,
    prediction: Prediction = "eps",
    spacing: str = "uniform",
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """Map data x0 (B, ...) to its DDIM latent x_T by running the eta=0 sampler backwards.

    Walks the same timesteps as ``sample(..., sampler="ddim", steps=steps)`` in ascending order; at
    each step the noise is predicted at the next (noisier) timestep from the current point, the usual
    approximation eps(x_t, t) ~ eps(x_{t_prev}, t) that becomes exact as steps shrink.
    ``sample(..., sampler="ddim", noise=ddim_invert(...))`` reconstructs x0.
    """
    check_choice("prediction", prediction, PREDICTIONS)
    with torch.no_grad():  # as in sample()
        timesteps = timestep_sequence(schedule.num_steps, steps, spacing)[::-1]
        table = schedule.alphas_cumprod_float64()
        levels = torch.cat([torch.ones(1, dtype=torch.float64), table[timesteps]])  # alpha_bar before each step
        to_device = lambda v: v.to(schedule.device, torch.float32)  # noqa: E731
        sqrt_level, sqrt_one_minus = to_device(levels.sqrt()), to_device((1.0 - levels).sqrt())
        zero = torch.zeros((), device=schedule.device)
        x = x0.to(schedule.device, torch.float32)
        for i, t in enumerate(tqdm(timesteps, desc="DDIM inversion", disable=not progress)):
            t_batch = torch.full((x.shape[0],), t, device=schedule.device, dtype=torch.long)
            pred_eps = denoise(schedule, model(x, t_batch), x, t_batch, prediction).pred_eps
            # x0 estimate at the current level (eq. 4 solved for x0), then eq. 12 with sigma = 0
            # towards the noisier level alpha_bar_t.
            pred_x0 = (x - sqrt_one_minus[i] * pred_eps) / sqrt_level[i]
            x_next = ddim_step(pred_x0, pred_eps, sqrt_level[i + 1], sqrt_one_minus[i + 1], zero, None)
            if callback is not None:
                callback(SamplerStep(i, t, x, pred_x0, x_next))
            x = x_next
    return x


def slerp(z0: Tensor, z1: Tensor, weight: float) -> Tensor:
    """Spherical interpolation between latents z0 and z1 (B, ...), each example on its own great
    circle: weight 0 gives z0, 1 gives z1. Gaussian latents keep their typical norm along the way,
    which linear interpolation would shrink (DDIM paper, sec. 5.3)."""
    if z0.shape != z1.shape:
        raise ValueError(f"slerp needs latents of one shape; got {tuple(z0.shape)} and {tuple(z1.shape)}")
    a, b = z0.flatten(1).double(), z1.flatten(1).double()
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    theta = cos.clamp(-1.0, 1.0).acos().unsqueeze(1)
    sin = theta.sin()
    # Nearly parallel latents: the spherical weights tend to the linear ones.
    parallel = sin.abs() < 1e-6
    w0 = torch.where(parallel, 1.0 - weight, ((1.0 - weight) * theta).sin() / sin.where(~parallel, 1.0))
    w1 = torch.where(parallel, torch.full_like(theta, weight), (weight * theta).sin() / sin.where(~parallel, 1.0))
    return (w0 * a + w1 * b).to(z0.dtype).reshape(z0.shape)
