"""The forward process, its posterior, conversions between parameterisations, and the training loss.

Shapes: x0, x_t, eps are (B, ...) -- points (B, D) or images (B, C, H, W); t is a LongTensor (B,)
of timesteps in {0, ..., T-1}. Every function takes the schedule and, where needed, the model as
arguments; none of them owns either.
"""

from __future__ import annotations

from typing import Callable, Literal, NamedTuple, get_args

import torch
from torch import Tensor

from ddpm.schedule import NoiseSchedule, check_timesteps, extract

Model = Callable[[Tensor, Tensor], Tensor]
Prediction = Literal["eps", "x0", "v"]
PREDICTIONS: tuple[str, ...] = get_args(Prediction)
Weighting = Literal["min_snr"]
WEIGHTINGS: tuple[str, ...] = get_args(Weighting)


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    """Raise ValueError naming ``value`` and the allowed choices unless ``value`` is one of them."""
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(map(str, allowed))}")


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


# --- forward process ---------------------------------------------------------------------------

def q_sample(schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Draw x_t ~ q(x_t | x0) in closed form (eq. 4): sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps."""
    check_timesteps(schedule, t, x0.shape[0])
    if noise.shape != x0.shape:
        raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}; got {tuple(noise.shape)}")
    return _q_sample(schedule, x0, t, noise)


def _q_sample(schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    return (extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * x0
            + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise)


def q_sample_iterative(schedule: NoiseSchedule, x0: Tensor, t: Tensor, *,
                       generator: torch.Generator | None = None) -> Tensor:
    """Draw x_t by applying q(x_s | x_{s-1}) = N(sqrt(1 - beta_s) x_{s-1}, beta_s I) (eq. 2) for
    s = 0, ..., t, one step at a time. Same distribution as ``q_sample``; slower, for checking it."""
    check_timesteps(schedule, t, x0.shape[0])
    x = x0.clone()
    for s in range(int(t.max()) + 1 if t.numel() else 0):
        stepped = schedule.alphas[s].sqrt() * x + schedule.betas[s].sqrt() * _randn_like(x, generator)
        active = (t >= s).reshape(-1, *([1] * (x.dim() - 1)))
        x = torch.where(active, stepped, x)
    return x


class Posterior(NamedTuple):
    """q(x_{t-1} | x_t, x0) = N(mean, variance I): mean (B, ...), variance and log_variance (B, 1, ...)."""
    mean: Tensor
    variance: Tensor
    log_variance: Tensor


def q_posterior_mean_variance(schedule: NoiseSchedule, x0: Tensor, x_t: Tensor, t: Tensor) -> Posterior:
    """The forward-process posterior q(x_{t-1} | x_t, x0) (eq. 6-7).

    mean = coef1_t x0 + coef2_t x_t, variance = beta tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t.
    At t = 0 the "previous" sample is the data itself: variance 0 and mean x0.
    """
    check_timesteps(schedule, t, x0.shape[0])
    mean = (extract(schedule.posterior_mean_coef1, t, x_t.shape) * x0
            + extract(schedule.posterior_mean_coef2, t, x_t.shape) * x_t)
    variance = extract(schedule.posterior_variance, t, x_t.shape)
    log_variance = extract(schedule.posterior_log_variance_clipped, t, x_t.shape)
    return Posterior(mean, variance, log_variance)


# --- conversions between x0, eps and v -----------------------------------------------------------
# x_t = sqrt(ab) x0 + sqrt(1 - ab) eps (eq. 4) and v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho
# 2022, sec. 4) are two linear relations; each function solves them for one unknown.

def predict_x0_from_eps(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t) (eq. 4 solved for x0)."""
    return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)


def predict_eps_from_x0(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
    """eps = (x_t - sqrt(alpha_bar_t) x0) / sqrt(1 - alpha_bar_t) (eq. 4 solved for eps)."""
    return ((extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x0)
            / extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.shape))


def velocity(schedule: NoiseSchedule, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """The v target: v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0."""
    return (extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * eps
            - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape) * x0)


def predict_x0_from_v(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """x0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v."""
    return (extract(schedule.sqrt_alphas_cumprod, t, x_t.shape) * x_t
            - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v)


def predict_eps_from_v(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """eps = sqrt(1 - alpha_bar_t) x_t + sqrt(alpha_bar_t) v."""
    return (extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t
            + extract(schedule.sqrt_alphas_cumprod, t, x_t.shape) * v)


class Denoised(NamedTuple):
    """A model output read as both parameterisations: predicted x0 and predicted eps, each (B, ...)."""
    pred_x0: Tensor
    pred_eps: Tensor


def denoise(schedule: NoiseSchedule, model_output: Tensor, x_t: Tensor, t: Tensor,
            prediction: Prediction = "eps", clip_denoised: bool = False) -> Denoised:
    """Turn a model output into (x0, eps) predictions.

    With ``clip_denoised`` x0 is clipped to the data range [-1, 1] and eps is recomputed from the
    clipped x0, so that any sampler built on (x0, eps) stays consistent with x_t.
    """
    if model_output.shape != x_t.shape:
        raise ValueError(f"the model returned shape {tuple(model_output.shape)}; it must return the "
                         f"shape of x_t {tuple(x_t.shape)}")
    if prediction == "eps":
        pred_x0 = predict_x0_from_eps(schedule, x_t, t, model_output)
        pred_eps = model_output
    elif prediction == "x0":
        pred_x0 = model_output
        pred_eps = predict_eps_from_x0(schedule, x_t, t, model_output)
    elif prediction == "v":
        pred_x0 = predict_x0_from_v(schedule, x_t, t, model_output)
        pred_eps = predict_eps_from_v(schedule, x_t, t, model_output)
    else:
        check_choice("prediction", prediction, PREDICTIONS)
    if clip_denoised:
        pred_x0 = pred_x0.clamp(-1.0, 1.0)
        pred_eps = predict_eps_from_x0(schedule, x_t, t, pred_x0)
    return Denoised(pred_x0, pred_eps)


# --- training objective (Algorithm 1) ------------------------------------------------------------

def sample_timesteps(schedule: NoiseSchedule, batch_size: int, *, device: torch.device | str | None = None,
                     generator: torch.Generator | None = None) -> Tensor:
    """t ~ Uniform{0, ..., T-1} (Algorithm 1, line 3), shape (B,). Every trained t is one the sampler
    visits: none is left out (drawing from 1..T-1 would never train t = 0 yet sample it)."""
    device = schedule.device if device is None else device
    return torch.randint(0, schedule.num_steps, (batch_size,), generator=generator, device=device)


def training_target(schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor,
                    prediction: Prediction = "eps") -> Tensor:
    """What the model is trained to output for this parameterisation: eps, x0 or v."""
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    if prediction == "v":
        return velocity(schedule, x0, t, noise)
    check_choice("prediction", prediction, PREDICTIONS)
    raise AssertionError("unreachable")


def loss_weights(schedule: NoiseSchedule, t: Tensor, prediction: Prediction,
                 weighting: Weighting | None, gamma: float = 5.0) -> Tensor | None:
    """Per-example loss weights (B,), or None for the paper's unweighted ("simple") loss.

    "min_snr" is Min-SNR-gamma (Hang et al. 2023): weight the x0-space error by min(SNR_t, gamma),
    which in the eps parameterisation is min(SNR, gamma) / SNR and for v is min(SNR, gamma) / (SNR + 1).
    """
    if weighting is None:
        return None
    check_choice("weighting", weighting, WEIGHTINGS)
    snr = schedule.snr.gather(0, t)
    clipped = snr.clamp(max=gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "v":
        return clipped / (snr + 1.0)
    return clipped


def training_loss(
    model: Model,
    schedule: NoiseSchedule,
    x0: Tensor,
    *,
    prediction: Prediction = "eps",
    weighting: Weighting | None = None,
    generator: torch.Generator | None = None,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    reduction: Literal["mean", "none"] = "mean",
) -> Tensor:
    """The denoising loss of Algorithm 1: || target - model(x_t, t) ||^2 with x_t from eq. 4.

    x0: (B, ...) data in the model's range; t and noise are drawn from ``generator`` unless given
    (give them to make a batch independent of how it is split across processes).
    Returns the mean over the batch, or with reduction="none" the per-example mean squared error (B,).
    """
    check_choice("prediction", prediction, PREDICTIONS)
    if weighting is not None:
        check_choice("weighting", weighting, WEIGHTINGS)
    check_choice("reduction", reduction, ("mean", "none"))
    if t is None:
        t = sample_timesteps(schedule, x0.shape[0], device=x0.device, generator=generator)
    else:
        check_timesteps(schedule, t, x0.shape[0])
    if noise is None:
        noise = _randn_like(x0, generator)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}; got {tuple(noise.shape)}")
    x_t = _q_sample(schedule, x0, t, noise)
    output = model(x_t, t)
    if output.shape != x0.shape:
        raise ValueError(f"the model returned shape {tuple(output.shape)}; it must return the shape "
                         f"of x_t {tuple(x0.shape)}")
    target = training_target(schedule, x0, t, noise, prediction)
    per_example = (output.float() - target.float()).square().flatten(1).mean(dim=1)
    weights = loss_weights(schedule, t, prediction, weighting)
    if weights is not None:
        per_example = per_example * weights
    return per_example.mean() if reduction == "mean" else per_example
