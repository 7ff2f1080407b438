"""The variational bound of eq. 5 (bits/dim), term by term against closed forms and brute force, and
as a whole against the exact answer on Gaussian data scored by the exact noise predictor."""

import math

import mpmath
import pytest
import torch

from ddpm import NoiseSchedule
from ddpm.analytic import GaussianMixture, optimal_eps_model
from ddpm.diffusion import (discretized_gaussian_log_likelihood, gaussian_log_likelihood, is_8bit, normal_kl,
                            predict_eps_from_x0, prior_kl, variational_bound)

mpmath.mp.dps = 40


def _kl_by_quadrature(m1, v1, m2, v2):
    def integrand(x):
        p = mpmath.npdf(x, m1, mpmath.sqrt(v1))
        return p * (mpmath.log(p) - mpmath.log(mpmath.npdf(x, m2, mpmath.sqrt(v2))))
    width = 12 * mpmath.sqrt(v1)
    return float(mpmath.quad(integrand, [m1 - width, m1, m1 + width]))


@pytest.mark.parametrize("m1, v1, m2, v2", [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -0.2, 2.0), (1.5, 0.01, 1.4, 0.02),
                                            (-2.0, 3.0, 0.5, 0.7)])
def test_normal_kl_matches_quadrature(m1, v1, m2, v2):
    got = normal_kl(*(torch.tensor(v, dtype=torch.float64) for v in (m1, math.log(v1), m2, math.log(v2))))
    assert got.item() == pytest.approx(_kl_by_quadrature(m1, v1, m2, v2), rel=1e-9, abs=1e-12)


def test_gaussian_log_likelihood_matches_the_density():
    x, mean, var = torch.tensor([0.3, -1.2, 4.0]), torch.tensor([0.0, -1.0, 1.0]), torch.tensor([1.0, 0.04, 2.5])
    got = gaussian_log_likelihood(x.double(), mean.double(), var.double().log())
    for i in range(3):
        want = float(mpmath.log(mpmath.npdf(float(x[i]), float(mean[i]), math.sqrt(float(var[i])))))
        assert got[i].item() == pytest.approx(want, rel=1e-12)


LEVELS = torch.linspace(-1.0, 1.0, 256)


@pytest.mark.parametrize("mean, std", [(0.0, 0.5), (0.9, 0.01), (-1.3, 0.2), (0.37, 1e-3), (0.0, 5.0)])
def test_discretized_likelihood_sums_to_one_over_the_256_levels(mean, std):
    log_p = discretized_gaussian_log_likelihood(LEVELS, torch.full((256,), mean),
                                                torch.full((256,), 2 * math.log(std)))
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("level, mean, std", [(0, 0.0, 0.3), (255, 0.0, 0.3), (128, 0.004, 0.002),
                                              (200, -0.9, 0.05), (10, 0.95, 0.01), (255, 1.0, 1e-3)])
def test_discretized_likelihood_matches_the_bin_mass(level, mean, std):
    """Each level's probability is the Gaussian mass over its bin (the outer bins open-ended), computed in
    600-digit arithmetic; even a mass of 1e-188 far in the upper tail is right to 1e-6 in log."""
    with mpmath.workdps(600):  # enough digits that 1 - 1e-190 minus 1 - 1e-189 is still exact
        low = -mpmath.inf if level == 0 else (mpmath.mpf(2 * level - 1) / 255 - 1 - mean) / std
        high = mpmath.inf if level == 255 else (mpmath.mpf(2 * level + 1) / 255 - 1 - mean) / std
        want = float(mpmath.log(mpmath.ncdf(high) - mpmath.ncdf(low)))
    got = discretized_gaussian_log_likelihood(LEVELS[level:level + 1], torch.tensor([mean], dtype=torch.float64),
                                              torch.tensor([2 * math.log(std)], dtype=torch.float64)).item()
    assert math.isfinite(got)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-9)


def test_prior_term_closed_form():
    schedule = NoiseSchedule("linear", 1000)
    x0 = torch.tensor([[0.5, -1.0], [0.0, 0.25]])
    a = float(torch.prod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)))
    want = [sum(0.5 * (a * v * v + (1 - a) - 1 - math.log(1 - a)) for v in row) for row in x0.tolist()]
    torch.testing.assert_close(prior_kl(schedule, x0), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-12)


def _oracle(schedule, x0):
    """A model that knows the data: it returns the exact noise of each x_t, so its reverse mean is the
    true posterior mean at every t."""
    return lambda x_t, t: predict_eps_from_x0(schedule, x_t, t, x0)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_bound_of_a_model_that_knows_x0(variance):
    """With the true posterior mean, every KL term is the variance mismatch alone: 0 for fixed_small,
    (beta_tilde / beta - 1 + log(beta / beta_tilde)) / 2 per dimension for fixed_large; the decoder
    term is the bin mass of a Gaussian centred on the data. Any off-by-one in t shows up here."""
    schedule = NoiseSchedule("linear", 50, beta_start=2e-3, beta_end=0.4)
    x0 = LEVELS[torch.tensor([[0, 30, 128], [255, 77, 200]])].reshape(2, 3)
    bound = variational_bound(_oracle(schedule, x0), schedule, x0, variance=variance,
                              generator=torch.Generator().manual_seed(0))
    betas = schedule.betas.double()
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    beta_tilde = (1 - alphas_cumprod[:-1]) / (1 - alphas_cumprod[1:]) * betas[1:]
    if variance == "fixed_small":
        want_kl = torch.zeros(49, dtype=torch.float64)
        decoder_var = beta_tilde[0]
    else:
        want_kl = 0.5 * (beta_tilde / betas[1:] - 1 + torch.log(betas[1:] / beta_tilde))
        decoder_var = betas[0]
    to_bits = 1 / math.log(2)
    torch.testing.assert_close(bound.terms[:, 1:], (want_kl * to_bits).expand(2, 49), atol=2e-6, rtol=1e-4)
    half = 1 / 255
    for i, row in enumerate(x0.tolist()):
        nats = 0.0
        for v in row:
            low = -mpmath.inf if v <= -1 else -half / mpmath.sqrt(float(decoder_var))
            high = mpmath.inf if v >= 1 else half / mpmath.sqrt(float(decoder_var))
            nats -= float(mpmath.log(mpmath.ncdf(high) - mpmath.ncdf(low)))
        assert bound.terms[i, 0].item() == pytest.approx(nats / 3 * to_bits, rel=1e-4)
    torch.testing.assert_close(bound.total, bound.prior + bound.terms.sum(1))


def _expected_bound_nats(schedule, m, s, variance):
    """E over x0 ~ N(m, s^2) of the bound (nats, one dimension) for the exact predictor, in closed form.

    The exact x0_hat is the posterior mean E[x0 | x_t], whose error variance is
    Var(x0 | x_t) = s^2 (1 - a) / (a s^2 + 1 - a). The true posterior (eq. 6-7) has variance beta tilde
    and mean coef1 x0 + coef2 x_t; the model's has variance sigma^2 and mean coef1 x0_hat + coef2 x_t,
    so E[KL] = (beta_tilde / sigma^2 - 1 + log(sigma^2 / beta_tilde) + coef1^2 Var(x0 | x_t) / sigma^2) / 2.
    """
    betas = schedule.betas.double().tolist()
    total, alpha_bar, tilde = 0.0, 1.0, []
    for t, beta in enumerate(betas):
        previous, alpha_bar = alpha_bar, alpha_bar * (1 - beta)
        tilde.append((1 - previous) / (1 - alpha_bar) * beta)
        if t == 0:
            error_var0 = s * s * (1 - alpha_bar) / (alpha_bar * s * s + 1 - alpha_bar)
            continue
        error_var = s * s * (1 - alpha_bar) / (alpha_bar * s * s + 1 - alpha_bar)
        coef1 = math.sqrt(previous) * beta / (1 - alpha_bar)
        sigma2 = tilde[t] if variance == "fixed_small" else beta
        total += 0.5 * (tilde[t] / sigma2 - 1 + math.log(sigma2 / tilde[t]) + coef1 ** 2 * error_var / sigma2)
    # The decoder's mean is x0_hat at t = 0; its variance is beta tilde at t = 1 (beta tilde at t = 0 is
    # 0) for fixed_small, beta_0 for fixed_large.
    decoder_var = tilde[1] if variance == "fixed_small" else betas[0]
    total += 0.5 * math.log(2 * math.pi * decoder_var) + error_var0 / (2 * decoder_var)
    total += 0.5 * (alpha_bar * (m * m + s * s) - alpha_bar - math.log(1 - alpha_bar))  # prior
    return total


GAUSSIAN = ((0.3, 0.5), (-0.4, 0.2))  # (mean, std) of each of the two dimensions
ENTROPY = sum(0.5 * math.log(2 * math.pi * math.e * s * s) for _, s in GAUSSIAN)  # the true NLL, nats


@pytest.mark.parametrize("variance, num_steps", [("fixed_large", 10), ("fixed_large", 1000), ("fixed_small", 100)])
def test_bound_on_gaussian_data_matches_its_closed_form(variance, num_steps):
    """Data N(m, s^2) per dimension, the exact noise predictor, the continuous decoder: the estimated
    bound equals its closed form within 5 standard errors, and that closed form is above the true NLL."""
    mixture = GaussianMixture.create([1.0], [[m for m, _ in GAUSSIAN]], [[s for _, s in GAUSSIAN]])
    schedule = NoiseSchedule("cosine", num_steps)
    x0 = mixture.sample(2000, torch.Generator().manual_seed(num_steps))
    bound = variational_bound(optimal_eps_model(mixture, schedule), schedule, x0, decoder="gaussian",
                              variance=variance, generator=torch.Generator().manual_seed(1))
    nats = bound.total * 2 * math.log(2)  # bits/dim back to nats per example
    expected = sum(_expected_bound_nats(schedule, m, s, variance) for m, s in GAUSSIAN)
    standard_error = nats.std().item() / math.sqrt(len(nats))
    assert abs(nats.mean().item() - expected) < 5 * standard_error, (nats.mean().item(), expected)
    assert expected > ENTROPY


def test_bound_approaches_the_true_nll_as_T_grows():
    """With sigma^2 = beta_t the bound tends to the data's negative log-likelihood as T grows (the gap
    falls as 1/T); with sigma^2 = beta tilde it is never below it either, but a gap of about a nat
    stays, because at the data end the true reverse variance is near beta_t, not beta tilde
    (which is about beta_t / 2 there at any T). That is why the bound defaults to fixed_large."""
    gaps = {variance: [sum(_expected_bound_nats(NoiseSchedule("cosine", T), m, s, variance) for m, s in GAUSSIAN)
                       - ENTROPY for T in (10, 100, 1000, 10_000)] for variance in ("fixed_large", "fixed_small")}
    large, small = gaps["fixed_large"], gaps["fixed_small"]
    assert all(gap > 0 for gap in large + small)
    assert large[0] > large[1] > large[2] > large[3]
    assert large[3] < 1e-3 < 0.01 * large[0]
    assert min(small) > 0.3


def test_discretized_decoder_refuses_continuous_data():
    schedule = NoiseSchedule("linear", 10, beta_start=1e-3, beta_end=0.2)
    x0 = torch.tensor([[0.1234, 0.5]])
    assert not is_8bit(x0) and is_8bit(LEVELS[None, :4])
    with pytest.raises(ValueError, match="8-bit"):
        variational_bound(lambda x, t: torch.zeros_like(x), schedule, x0)
