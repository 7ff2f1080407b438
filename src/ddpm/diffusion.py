"""The forward process, its posterior, conversions between parameterisations, and the training loss.

Shapes: x0, x_t, eps are (B, ...) -- points (B, D) or images (B, C, H, W); t is a LongTensor (B,)
of timesteps in {0, ..., T-1}. Every function takes the schedule and, where needed, the model as
arguments; none of them owns either.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Callable, Literal, NamedTuple, get_args

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ddpm.schedule import NoiseSchedule, check_timesteps, extract
from ddpm.validation import check_choice

Model = Callable[[Tensor, Tensor], Tensor]
Prediction = Literal["eps", "x0", "v"]
PREDICTIONS: tuple[str, ...] = get_args(Prediction)
Weighting = Literal["min_snr", "edm"]
WEIGHTINGS: tuple[str, ...] = get_args(Weighting)
Variance = Literal["fixed_small", "fixed_large"]
VARIANCES: tuple[str, ...] = get_args(Variance)
Decoder = Literal["discretized", "gaussian"]
DECODERS: tuple[str, ...] = get_args(Decoder)


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


def _check_output(output: Any, x_t: Tensor) -> None:
    """A model maps (x_t, t) to one tensor of x_t's shape."""
    if not isinstance(output, Tensor):
        raise ValueError(f"the model returned a {type(output).__name__}; it must return one tensor of the shape "
                         f"of x_t {tuple(x_t.shape)} (wrap a model that returns more, e.g. lambda x, t: net(x, t)[0])")
    if output.shape != x_t.shape:
        raise ValueError(f"the model returned shape {tuple(output.shape)}; it must return the shape "
                         f"of x_t {tuple(x_t.shape)}")


def denoise(schedule: NoiseSchedule, model_output: Tensor, x_t: Tensor, t: Tensor,
            prediction: Prediction = "eps", clip_denoised: bool = False, threshold: float | None = None
            ) -> Denoised:
    """Turn a model output into (x0, eps) predictions.

    With ``clip_denoised`` x0 is clipped to the data range [-1, 1]; with ``threshold`` it is dynamically
    thresholded instead (``dynamic_threshold``). Either way eps is recomputed from the new x0, so
    that any sampler built on (x0, eps) stays consistent with x_t.
    """
    _check_output(model_output, x_t)
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
    if threshold is not None:
        pred_x0 = dynamic_threshold(pred_x0, threshold)
    elif clip_denoised:
        pred_x0 = pred_x0.clamp(-1.0, 1.0)
    if threshold is not None or clip_denoised:
        pred_eps = predict_eps_from_x0(schedule, x_t, t, pred_x0)
    return Denoised(pred_x0, pred_eps)


def dynamic_threshold(x0: Tensor, quantile: float) -> Tensor:
    """Dynamic thresholding (Saharia et al. 2022, sec. 2.3): per example, s = the ``quantile`` of |x0|
    over its values, at least 1; x0 is clipped to [-s, s] and divided by s. An x0 already inside
    [-1, 1] is left as it is; a saturated one is pulled inwards rather than flattened at +-1."""
    flat = x0.flatten(1).abs().float()
    s = torch.quantile(flat, quantile, dim=1).clamp(min=1.0).to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


# --- training objective (Algorithm 1) ------------------------------------------------------------

def sample_timesteps(schedule: NoiseSchedule, batch_size: int, *, device: torch.device | str | None = None,
                     generator: torch.Generator | None = None, weighting: Weighting | None = None) -> Tensor:
    """t ~ Uniform{0, ..., T-1} (Algorithm 1, line 3), shape (B,). Every trained t is one the sampler
    visits: none is left out (drawing from 1..T-1 would never train t = 0 yet sample it). With
    weighting "edm", t is drawn from ``timestep_density`` instead (every t keeps some mass)."""
    device = schedule.device if device is None else device
    if weighting == "edm":
        density = timestep_density(schedule, weighting).to(device)
        return torch.multinomial(density, batch_size, replacement=True, generator=generator)
    return torch.randint(0, schedule.num_steps, (batch_size,), generator=generator, device=device)


# EDM (Karras et al. 2022, Table 1, "Training"): ln sigma ~ N(P_mean, P_std^2) and the denoising error
# weighted by lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, for data of std sigma_data.
EDM_P_MEAN, EDM_P_STD, EDM_SIGMA_DATA = -1.2, 1.2, 0.5


def timestep_density(schedule: NoiseSchedule, weighting: Weighting | None) -> Tensor:
    """The probabilities (T,) with which training draws each t: uniform, or for "edm" the mass EDM's
    log-normal density of sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) gives the stretch of ln sigma
    around t (the density at ln sigma_t times the step in ln sigma), normalised."""
    if weighting != "edm":
        return torch.full((schedule.num_steps,), 1.0 / schedule.num_steps, device=schedule.device)
    return _edm_tables(schedule)[0]


# A training step asks for EDM's tables twice (its timesteps, its weights): they are made once per schedule,
# in float64 on the CPU, and kept on the schedule's device.
_EDM_TABLES: weakref.WeakKeyDictionary[NoiseSchedule, tuple[Tensor, Tensor]] = weakref.WeakKeyDictionary()


def _edm_tables(schedule: NoiseSchedule) -> tuple[Tensor, Tensor]:
    """EDM's timestep density (T,) and its lambda(sigma_t) (T,), scaled so that its eps-space weight
    lambda sigma^2 = 1 + sigma^2 / sigma_data^2 averages 1 under the density."""
    if schedule not in _EDM_TABLES:
        sigma2 = 1.0 / schedule.alphas_cumprod_float64() - 1.0
        log_sigma = 0.5 * torch.log(sigma2)
        width = torch.gradient(log_sigma)[0] if len(log_sigma) > 1 else torch.ones_like(log_sigma)
        mass = torch.exp(-0.5 * ((log_sigma - EDM_P_MEAN) / EDM_P_STD) ** 2) * width.abs()
        density = mass / mass.sum()
        lam = (sigma2 + EDM_SIGMA_DATA ** 2) / (sigma2 * EDM_SIGMA_DATA ** 2)
        weights = lam / (density.float().double() * lam * sigma2).sum()
        _EDM_TABLES[schedule] = (density.float().to(schedule.device), weights.float().to(schedule.device))
    return _EDM_TABLES[schedule]


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

    Both weightings are a weight w(t) of the x0-space error ||x0_hat - x0||^2, turned into one of the
    network's error: x0_hat - x0 is sigma_t (eps - eps_hat) for eps and sqrt(1 - alpha_bar_t)
    (v - v_hat) for v, so w becomes w / SNR for eps and w / (SNR + 1) for v.
    "min_snr" is Min-SNR-gamma (Hang et al. 2023): w = min(SNR_t, gamma).
    "edm" is EDM's lambda(sigma_t) (Karras et al. 2022), divided by its mean under
    ``timestep_density`` so that the loss keeps the simple loss's scale; training then draws t from
    that density too.
    """
    if weighting is None:
        return None
    check_choice("weighting", weighting, WEIGHTINGS)
    snr = schedule.snr.gather(0, t)
    if weighting == "min_snr":
        x0_weight = snr.clamp(max=gamma)
    else:
        x0_weight = _edm_tables(schedule)[1].gather(0, t)
    if prediction == "eps":
        return x0_weight / snr
    if prediction == "v":
        return x0_weight / (snr + 1.0)
    return x0_weight


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
    per_example = per_example_loss(model, schedule, x0, t, noise, prediction=prediction, weighting=weighting)
    return per_example.mean() if reduction == "mean" else per_example


def per_example_loss(model: Model, schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor, *,
                     prediction: Prediction = "eps", weighting: Weighting | None = None) -> Tensor:
    """``training_loss(..., reduction="none")`` without checking t and noise: the training loop draws
    them itself, and checking t's values would make every step wait for the device."""
    x_t = _q_sample(schedule, x0, t, noise)
    output = model(x_t, t)
    _check_output(output, x_t)
    target = training_target(schedule, x0, t, noise, prediction)
    per_example = (output.float() - target.float()).square().flatten(1).mean(dim=1)
    weights = loss_weights(schedule, t, prediction, weighting)
    return per_example if weights is None else per_example * weights


# --- the variational bound (eq. 5) ---------------------------------------------------------------
# L = D_KL(q(x_T | x0) || p(x_T)) + sum_{t>1} D_KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) - log p(x0 | x_1).
# In the package's indices the paper's x_1..x_T are t = 0..T-1: the prior term uses t = T-1, the KL
# terms t = 1..T-1, and the decoder L_0 reads the network at t = 0.

def normal_kl(mean1: Tensor, log_var1: Tensor, mean2: Tensor, log_var2: Tensor) -> Tensor:
    """KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))) per element, in nats (broadcasting)."""
    return 0.5 * (log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2).square() * torch.exp(-log_var2) - 1.0)


def gaussian_log_likelihood(x: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """log N(x; mean, exp(log_var)) per element, in nats: the decoder for continuous data (points)."""
    return -0.5 * (math.log(2 * math.pi) + log_var + (x - mean).square() * torch.exp(-log_var))


def _log_normal_mass(lower: Tensor, upper: Tensor) -> Tensor:
    """log(Phi(upper) - Phi(lower)) for lower < upper (either may be infinite), without cancellation.

    The difference of two CDFs near 1 loses every digit, so an interval in the upper tail is
    reflected to the lower one (Phi(b) - Phi(a) = Phi(-a) - Phi(-b)), where log_ndtr is accurate.
    """
    flip = lower > 0
    lower, upper = torch.where(flip, -upper, lower), torch.where(flip, -lower, upper)
    log_upper, log_lower = torch.special.log_ndtr(upper), torch.special.log_ndtr(lower)
    return log_upper + torch.log1p(-torch.exp(log_lower - log_upper))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_var: Tensor, *, bins: int = 256) -> Tensor:
    """log P(x) per element in nats, for data on ``bins`` evenly spaced levels from -1 to 1 (eq. 13).

    P(x) is the mass N(mean, exp(log_var)) puts on x's bin, [x - 1/(bins-1), x + 1/(bins-1)], with the
    outermost bins running to -inf and +inf, so the probabilities of all levels sum to 1.
    Computed in float64; returned in float64.
    """
    # Bin edges from the level's index in float64, so neighbouring bins share an edge exactly (edges
    # from a float32 x would leave slivers between bins and the masses would not sum to 1).
    level = ((x.double() + 1.0) * (bins - 1) / 2.0).round()
    mean, std = mean.double(), torch.exp(0.5 * log_var.double())
    edge = lambda offset: (2.0 * (level + offset) / (bins - 1) - 1.0 - mean) / std  # noqa: E731
    lower = torch.where(level <= 0, -math.inf, edge(-0.5))
    upper = torch.where(level >= bins - 1, math.inf, edge(0.5))
    return _log_normal_mass(lower, upper)


def is_8bit(x: Tensor, bins: int = 256) -> bool:
    """Whether every value of ``x`` is one of the ``bins`` levels of [-1, 1] (up to float32 rounding)."""
    levels = (x.double() + 1.0) * (bins - 1) / 2.0
    return bool(((levels - levels.round()).abs() <= 1e-3).all() and x.min() >= -1.0 - 1e-6 and x.max() <= 1.0 + 1e-6)


def model_log_variance(schedule: NoiseSchedule, t: Tensor, variance: Variance, shape: tuple[int, ...]) -> Tensor:
    """log sigma_t^2 of p(x_{t-1} | x_t), shaped (B, 1, ...) (sec. 3.2).

    "fixed_small": sigma_t^2 = beta tilde_t, the posterior variance; at t = 0, where beta tilde is 0,
    the t = 1 value stands in (as in the official code). "fixed_large": sigma_t^2 = beta_t.
    """
    check_choice("variance", variance, VARIANCES)
    table = schedule.posterior_log_variance_clipped if variance == "fixed_small" else schedule.betas.log()
    return extract(table, t, shape)


class ReverseStep(NamedTuple):
    """p(x_{t-1} | x_t) = N(mean, exp(log_variance) I): mean (B, ...), log_variance (B, 1, ...), and the
    network's x0 estimate (B, ...) that the mean is built from."""
    mean: Tensor
    log_variance: Tensor
    pred_x0: Tensor


def p_mean_variance(model: Model, schedule: NoiseSchedule, x_t: Tensor, t: Tensor, *,
                    prediction: Prediction = "eps", variance: Variance = "fixed_small",
                    clip_denoised: bool = False) -> ReverseStep:
    """The model's reverse step: mean = posterior mean (eq. 7) at the predicted x0, which for an eps
    model is eq. 11; variance fixed as ``variance`` says."""
    check_timesteps(schedule, t, x_t.shape[0])
    pred_x0 = denoise(schedule, model(x_t, t), x_t, t, prediction, clip_denoised).pred_x0
    mean = q_posterior_mean_variance(schedule, pred_x0, x_t, t).mean
    return ReverseStep(mean, model_log_variance(schedule, t, variance, x_t.shape), pred_x0)


class VariationalBound(NamedTuple):
    """The negative ELBO of eq. 5 per example, in bits per dimension (nats / (D ln 2)).

    total (B,) = prior + terms.sum(1). prior (B,): L_T = KL(q(x_T | x0) || N(0, I)).
    terms (B, T): terms[:, 0] is the decoder's -log p(x0 | x at t = 0) (L_0), terms[:, t] for t >= 1
    is KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) (L_{t-1} of the paper, which counts from 1).
    """
    total: Tensor
    prior: Tensor
    terms: Tensor


def prior_kl(schedule: NoiseSchedule, x0: Tensor) -> Tensor:
    """KL(q(x_T | x0) || N(0, I)) summed over each example's dimensions, in nats (B,). Float64."""
    last = torch.full((x0.shape[0],), schedule.num_steps - 1, dtype=torch.long, device=schedule.device)
    alpha_bar = extract(schedule.alphas_cumprod_float64().to(x0.device), last.to(x0.device), x0.shape)
    kl = normal_kl(alpha_bar.sqrt() * x0.double(), torch.log1p(-alpha_bar), torch.zeros((), dtype=torch.float64),
                   torch.zeros((), dtype=torch.float64))
    return kl.flatten(1).sum(1)


@torch.no_grad()
def variational_bound(
    model: Model,
    schedule: NoiseSchedule,
    x0: Tensor,
    *,
    prediction: Prediction = "eps",
    variance: Variance = "fixed_large",
    decoder: Decoder = "discretized",
    clip_denoised: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> VariationalBound:
    """Evaluate the bound of eq. 5 on data x0 (B, ...), one network call per timestep, in bits/dim.

    Each KL term is exact given its x_t, which is drawn once per (example, t) from q(x_t | x0), so the
    total is an unbiased estimate of the bound for each example.
    decoder: "discretized" for 8-bit images (eq. 13; x0 must lie on the 256 levels of [-1, 1]), which
      makes the total an upper bound on the negative log-likelihood in bits per subpixel, as papers
      report it; "gaussian" for continuous data, a bound on the differential NLL (can be negative).
    variance: sigma_t^2 of the reverse steps. The default, "fixed_large" (beta_t), gives the tighter
      bound: with the exact noise predictor it tends to the true NLL as T grows, while "fixed_small"
      keeps a gap at the data end (tests/test_variational_bound.py shows both).
    """
    check_choice("decoder", decoder, DECODERS)
    check_choice("prediction", prediction, PREDICTIONS)
    if decoder == "discretized" and not is_8bit(x0):
        raise ValueError("the discretized decoder needs 8-bit data: x0 on the 256 levels of [-1, 1] "
                         "(quantize it, or use decoder='gaussian' for continuous data)")
    x0 = x0.to(schedule.device, torch.float32)
    batch, dims = x0.shape[0], x0[0].numel()
    nats = torch.zeros(batch, schedule.num_steps, dtype=torch.float64, device=x0.device)
    for step in tqdm(range(schedule.num_steps - 1, -1, -1), desc="variational bound", disable=not progress):
        t = torch.full((batch,), step, dtype=torch.long, device=x0.device)
        x_t = _q_sample(schedule, x0, t, _randn_like(x0, generator))
        reverse = p_mean_variance(model, schedule, x_t, t, prediction=prediction, variance=variance,
                                  clip_denoised=clip_denoised)
        if step > 0:
            true = q_posterior_mean_variance(schedule, x0, x_t, t)
            term = normal_kl(true.mean.double(), true.log_variance.double(), reverse.mean.double(),
                             reverse.log_variance.double())
        elif decoder == "discretized":
            term = -discretized_gaussian_log_likelihood(x0, reverse.mean, reverse.log_variance)
        else:
            term = -gaussian_log_likelihood(x0.double(), reverse.mean.double(), reverse.log_variance.double())
        nats[:, step] = term.flatten(1).sum(1)
    to_bits = 1.0 / (dims * math.log(2.0))
    prior = prior_kl(schedule, x0) * to_bits
    terms = nats * to_bits
    return VariationalBound(prior + terms.sum(1), prior, terms)
