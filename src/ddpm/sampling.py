"""Samplers: DDPM (Algorithm 2, optionally with x0 clipping) and DDIM (Song et al. 2021, eq. 12).

Each sampler is a plain function in ``SAMPLERS``, one visible loop over the (t, t_prev) pairs of a
timestep sequence that reads its coefficients by name. The sequence is data made by one function
(``timestep_sequence``) and always ends at t = 0 (t_prev = -1 stands for the clean data, alpha_bar = 1).
Samplers see the network only through a ``Denoiser``, ``denoiser(x_t, t) -> (pred_x0, pred_eps)``;
``sample()`` checks the options (a ``SampleConfig``), builds the denoiser and calls the sampler by name.

Adding a sampler: write its function here, add it to ``SAMPLERS``, add its name to
``SampleConfig.sampler`` (and to ``used_by`` of the options it reads), and test it.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator
from typing import Callable, NamedTuple, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ddpm.config import SampleConfig
from ddpm.diffusion import PREDICTIONS, Denoised, Model, Prediction, denoise
from ddpm.schedule import NoiseSchedule, posterior_coefficients
from ddpm.validation import SettingError, check_choice, choices_of, whole_number

SPACINGS: tuple[str, ...] = choices_of(typing.get_type_hints(SampleConfig)["spacing"])


def timestep_sequence(num_steps: int, steps: int | None = None, spacing: str = "uniform") -> list[int]:
    """The trained timesteps a sampler visits, in the order it visits them (descending).

    num_steps: T; steps: how many to visit (None: all T); spacing:
      "uniform": evenly spaced from T-1 down to 0 inclusive (rounded), so the walk starts at the
                 noisiest trained step and ends at the cleanest;
      "leading": 0, T//S, 2*T//S, ... as in the DDIM paper's code; never starts at T-1.
    Always ends at t = 0, except that a single step (steps=1) is taken from t = T-1.
    """
    check_choice("spacing", spacing, SPACINGS)
    steps = whole_number("steps", num_steps if steps is None else steps, 1, num_steps)
    if steps == 1:
        return [num_steps - 1]
    if spacing == "uniform":
        grid = torch.linspace(0, num_steps - 1, steps, dtype=torch.float64).round().long()
    else:
        grid = torch.arange(steps, dtype=torch.long) * (num_steps // steps)
    return grid.flip(0).tolist()


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
    On fewer than T steps each step is the posterior of the merged steps (respacing)."""
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
    steps is the same walk as DDPM with fixed_small."""
    c = ddim_coefficients(schedule, timesteps, options.eta)
    for i, t, t_prev in _walk(timesteps, "sampling (ddim)", progress):
        pred_x0, pred_eps = denoiser(x, t)
        z = _noise(x, generator) if options.eta > 0 and t_prev >= 0 else None
        x_prev = ddim_step(pred_x0, pred_eps, c.sqrt_alpha_bar_prev[i], c.direction[i], c.sigma[i], z)
        if callback is not None:
            callback(SamplerStep(i, t, x, pred_x0, x_prev))
        x = x_prev
    return x


SAMPLERS: dict[str, Sampler] = {"ddpm": sample_ddpm, "ddim": sample_ddim}


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
    spacing: str = "uniform",
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    cuda_graph: bool = False,
) -> Tensor:
    """Draw samples of ``shape`` (B, ...) from the reverse process of a trained model.

    sampler: a name in ``SAMPLERS``: "ddpm" is Algorithm 2 with sigma_t^2 = beta tilde_t
      ("fixed_small") or beta_t ("fixed_large"); "ddim" is eq. 12 with sigma = eta * sqrt(beta tilde).
    steps: how many of the T trained timesteps to visit (None: all), chosen by ``spacing``.
    clip_denoised: clip the predicted x0 to [-1, 1] before using it (the x0-clipped variant).
    The options are checked as a ``SampleConfig`` (``sample_with`` takes one directly).
    noise: the starting x_T (default: drawn from ``generator``). Returns x_0, shape ``shape``.
    The callback receives a ``SamplerStep`` after every step.
    cuda_graph: replay the network as a CUDA graph (``ddpm.cuda_graph``); opt-in until measured on a GPU.
    """
    options = SampleConfig(sampler=sampler, steps=steps, eta=eta, variance=variance, spacing=spacing,
                           clip=clip_denoised)
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
    timesteps = timestep_sequence(schedule.num_steps, options.steps, options.spacing)
    device = schedule.device
    if cuda_graph:
        from ddpm.cuda_graph import GraphedModel

        model = GraphedModel(model, capture=device.type == "cuda")

    def denoiser(x: Tensor, t: int) -> Denoised:
        t_batch = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
        return denoise(schedule, model(x, t_batch), x, t_batch, prediction, options.clip)

    # No autograd records. (torch.inference_mode was measured no faster: 1.007x on DDIM-50 of
    # unet-mnist, rounds 0.95-1.07, benchmarks/speed_tricks.py, docs/performance.md.)
    with torch.no_grad():
        if noise is None:
            x = torch.randn(shape, generator=generator, device=device)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape}; got {tuple(noise.shape)}")
        else:
            x = noise.to(device, torch.float32)
        return SAMPLERS[options.sampler](denoiser, x, schedule, timesteps, options, generator=generator,
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
