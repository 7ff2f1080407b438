"""Each mistake of the reference tutorials, injected into a copy of the step it lives in, is caught by
a named check that the project's own code passes. The checks are the exact-answer tests: sampling
Gaussian data with its exact noise predictor must give the data's mean and variance, and training
timesteps must be uniform over all of 0..T-1."""

import pytest
import torch
from exact import assert_gaussian_moments

from ddpm import NoiseSchedule
from ddpm.analytic import GaussianMixture, optimal_eps_model
from ddpm.diffusion import denoise, sample_timesteps
from ddpm.sampling import ddpm_step

N = 20000
DATA = GaussianMixture.create([1.0], [[0.3]], [0.2])
SCHEDULE = NoiseSchedule("linear", 1000)


def walk(step):
    """Algorithm 2's loop over t = T-1..0 around a step function step(x_t, t, eps, z) -> x_{t-1}."""
    model = optimal_eps_model(DATA, SCHEDULE)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, 1, generator=gen)
    for t in reversed(range(SCHEDULE.num_steps)):
        t_batch = torch.full((N,), t)
        z = torch.randn(N, 1, generator=gen) if t > 0 else None
        x = step(x, t, t_batch, model(x, t_batch), z)
    return x


def project_step(x_t, t, t_batch, eps, z, *, clip=False):
    """The project's own step: ddpm.sampling.ddpm_step with the schedule's tables."""
    pred_x0 = denoise(SCHEDULE, eps, x_t, t_batch, "eps", clip).pred_x0
    return ddpm_step(x_t, pred_x0, SCHEDULE.posterior_mean_coef1[t], SCHEDULE.posterior_mean_coef2[t],
                     SCHEDULE.posterior_variance[t], z)


def check_sampler_reproduces_gaussian_data(step):
    """The named check: samples of N(0.3, 0.2^2) data have its mean and variance (the walk's own
    3.7% under-dispersion at std 0.2 is inside the 6-SE tolerance for N = 20000)."""
    assert_gaussian_moments(walk(step), DATA.mean(), DATA.variance(), z=6.0)


def alpha_bar_prev_wrapping(t):
    """Mistake 3: alpha_bar[t - 1] read with Python indexing, which at t = 0 is alpha_bar[-1]."""
    return SCHEDULE.alphas_cumprod[t - 1]


@pytest.fixture(scope="module")
def project_passes():
    check_sampler_reproduces_gaussian_data(project_step)
    check_sampler_reproduces_gaussian_data(lambda *a: project_step(*a, clip=True))
    return True


def test_project_step_passes_the_check(project_passes):
    assert project_passes


def test_mistake_1_noise_scaled_by_beta_instead_of_sqrt_beta(project_passes):
    def step(x_t, t, t_batch, eps, z):
        b, ab = SCHEDULE.betas[t], SCHEDULE.alphas_cumprod[t]
        mean = (x_t - b / (1 - ab).sqrt() * eps) / (1 - b).sqrt()
        return mean if z is None else mean + b * z  # should be b.sqrt() * z

    with pytest.raises(AssertionError, match="sample variance"):
        check_sampler_reproduces_gaussian_data(step)


def test_mistake_2_posterior_variance_over_sqrt(project_passes):
    def step(x_t, t, t_batch, eps, z):
        b, ab = SCHEDULE.betas[t], SCHEDULE.alphas_cumprod[t]
        mean = (x_t - b / (1 - ab).sqrt() * eps) / (1 - b).sqrt()
        variance = (1 - ab) / (1 - ab).sqrt() * b  # should be (1 - ab_prev) / (1 - ab) * b
        return mean if z is None else mean + variance.sqrt() * z

    with pytest.raises(AssertionError, match="sample variance"):
        check_sampler_reproduces_gaussian_data(step)
    # And the table itself is the right formula: tiny at t = 0, half of beta for small t.
    assert SCHEDULE.posterior_variance[0] == 0
    wrong = (1 - SCHEDULE.alphas_cumprod) / (1 - SCHEDULE.alphas_cumprod).sqrt() * SCHEDULE.betas
    assert not torch.allclose(SCHEDULE.posterior_variance, wrong, rtol=0.1)


def test_mistake_3_alpha_bar_prev_wraps_at_t0(project_passes):
    """The x0-clipped step (posterior mean, eq. 7) with alpha_bar[t-1] read at t = 0."""
    def step(x_t, t, t_batch, eps, z):
        b, ab, ab_prev = SCHEDULE.betas[t], SCHEDULE.alphas_cumprod[t], alpha_bar_prev_wrapping(t)
        x0 = denoise(SCHEDULE, eps, x_t, t_batch, "eps", True).pred_x0
        mean = ab_prev.sqrt() * b / (1 - ab) * x0 + (1 - b).sqrt() * (1 - ab_prev) / (1 - ab) * x_t
        variance = (1 - ab_prev) / (1 - ab) * b
        return mean + variance.sqrt() * (z if z is not None else torch.zeros_like(x_t))

    with pytest.raises(AssertionError):
        check_sampler_reproduces_gaussian_data(step)
    assert SCHEDULE.alphas_cumprod_prev[0] == 1.0  # the project's table never wraps


def check_timesteps_cover_all(draw):
    """The named check for Algorithm 1: every t in 0..T-1 is drawn, uniformly (chi-square, T=20)."""
    t = draw(200000)
    counts = torch.bincount(t, minlength=20).double()
    assert counts.numel() == 20, f"timesteps outside 0..19: max {int(t.max())}"
    assert counts[0] > 0, "t = 0 is never trained, yet the sampler's last step uses it"
    chi2 = ((counts - 10000) ** 2 / 10000).sum().item()
    assert chi2 < 43.8, f"timesteps are not uniform over 0..19 (chi-square {chi2:.0f})"  # 0.999 quantile, 19 dof


def test_mistake_4_training_timesteps_from_randint_1_T():
    schedule = NoiseSchedule("linear", 20)
    gen = torch.Generator().manual_seed(0)
    check_timesteps_cover_all(lambda n: sample_timesteps(schedule, n, generator=gen))
    with pytest.raises(AssertionError, match="t = 0 is never trained"):
        check_timesteps_cover_all(lambda n: torch.randint(1, 20, (n,), generator=gen))
