"""Shared exact answers for the sampler tests: what a sampler walk must produce on Gaussian data.

For x0 ~ N(m, s^2) (per dimension) the exact predictor makes every sampler step affine in x_t:
    x0_hat = m + k (x_t - sqrt(a) m),  k = sqrt(a) s^2 / (a s^2 + 1 - a)      (posterior mean of x0)
    eps_hat = (x_t - sqrt(a) x0_hat) / sqrt(1 - a)
so the law of the sampler's output is Gaussian with a mean and variance that can be carried through
the walk in closed form. Written from the paper's equations, independently of ddpm.sampling.
"""

import math

import torch


def walk_moments(alphas_cumprod, timesteps, m, s, *, sampler, eta=0.0, variance="fixed_small"):
    """Mean and variance of the output of a DDPM/DDIM walk over ``timesteps`` (descending), started
    from x_T ~ N(0, 1), for data N(m, s^2) and the exact eps-predictor. Floats in float64."""
    ab = alphas_cumprod.double().tolist()
    mean, var = 0.0, 1.0
    for i, t in enumerate(timesteps):
        a = ab[t]
        a_prev = ab[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        k = math.sqrt(a) * s * s / (a * s * s + 1 - a)
        # x0_hat = k x_t + (m - k sqrt(a) m); eps_hat = (x_t - sqrt(a) x0_hat) / sqrt(1 - a)
        x0_gain, x0_offset = k, m - k * math.sqrt(a) * m
        eps_gain = (1 - math.sqrt(a) * x0_gain) / math.sqrt(1 - a)
        eps_offset = -math.sqrt(a) * x0_offset / math.sqrt(1 - a)
        beta = 1 - a / a_prev
        beta_tilde = (1 - a_prev) / (1 - a) * beta
        last = i + 1 == len(timesteps)
        if sampler == "ddpm":
            c1 = math.sqrt(a_prev) * beta / (1 - a)            # eq. 7
            c2 = math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)
            gain, offset = c1 * x0_gain + c2, c1 * x0_offset
            noise_var = 0.0 if last else (beta_tilde if variance == "fixed_small" else beta)
        else:
            sigma2 = eta * eta * beta_tilde                     # eq. 16 of the DDIM paper
            d = math.sqrt(max(1 - a_prev - sigma2, 0.0))        # eq. 12
            gain = math.sqrt(a_prev) * x0_gain + d * eps_gain
            offset = math.sqrt(a_prev) * x0_offset + d * eps_offset
            noise_var = 0.0 if last else sigma2
        mean, var = gain * mean + offset, gain * gain * var + noise_var
    return mean, var


def assert_gaussian_moments(samples: torch.Tensor, mean, var, *, z: float = 5.0):
    """Per-dimension sample mean and variance within z standard errors of N(mean, var).

    samples: (N, D); mean, var: floats or (D,) tensors. SE(mean) = sqrt(var / N),
    SE(variance) = var * sqrt(2 / (N - 1)) for Gaussian samples.
    """
    n = samples.shape[0]
    mean = torch.as_tensor(mean, dtype=torch.float64)
    var = torch.as_tensor(var, dtype=torch.float64)
    got_mean = samples.double().mean(0)
    got_var = samples.double().var(0)
    mean_z = ((got_mean - mean) / (var / n).sqrt()).abs().max().item()
    var_z = ((got_var / var - 1) / math.sqrt(2 / (n - 1))).abs().max().item()
    assert mean_z < z, f"sample mean {got_mean.tolist()} is {mean_z:.1f} SE from {mean.tolist()}"
    assert var_z < z, f"sample variance {got_var.tolist()} is {var_z:.1f} SE from {var.tolist()}"


def reparameterised(eps_model, schedule, prediction):
    """The x0- or v-model that predicts what ``eps_model`` does (x_t = sqrt(a) x0 + sqrt(1 - a) eps,
    v = sqrt(a) eps - sqrt(1 - a) x0), for points (B, D)."""
    ab = schedule.alphas_cumprod

    def model(x, t):
        a = ab[t].unsqueeze(1)
        eps = eps_model(x, t)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return x0 if prediction == "x0" else a.sqrt() * eps - (1 - a).sqrt() * x0

    return model
