"""Forward process, posterior, conversions and training loss, against exact answers."""

import math

import pytest
import torch

from ddpm import NoiseSchedule, q_posterior_mean_variance, q_sample, q_sample_iterative, training_loss
from ddpm.analytic import GaussianMixture, optimal_eps_model
from ddpm.diffusion import (
    denoise,
    loss_weights,
    predict_eps_from_v,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_v,
    sample_timesteps,
    training_target,
    velocity,
)


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule("linear", 1000)


def test_eq2_and_eq4_give_the_same_distribution():
    """Step-by-step noising (eq. 2) and the closed form (eq. 4) agree in mean and variance; both
    equal sqrt(alpha_bar) x0 and 1 - alpha_bar. Tolerance: 5 standard errors of N draws."""
    schedule = NoiseSchedule("linear", 200)
    n = 20000
    x0 = torch.full((n, 1), 0.7)
    gen = torch.Generator().manual_seed(0)
    for step in [0, 10, 100, 199]:
        t = torch.full((n,), step)
        closed = q_sample(schedule, x0, t, torch.randn(n, 1, generator=gen))
        iterative = q_sample_iterative(schedule, x0, t, generator=gen)
        ab = schedule.alphas_cumprod[step].item()
        mean, var = math.sqrt(ab) * 0.7, 1 - ab
        for draws in (closed, iterative):
            assert abs(draws.mean().item() - mean) < 5 * math.sqrt(var / n)
            assert abs(draws.var().item() / var - 1) < 5 * math.sqrt(2 / n)


def test_q_sample_iterative_handles_mixed_timesteps_per_example():
    schedule = NoiseSchedule(betas=[0.5, 0.5])
    x0 = torch.ones(3, 2)
    t = torch.tensor([0, 1, 0])
    gen = torch.Generator().manual_seed(0)
    x = q_sample_iterative(schedule, x0, t, generator=gen)
    gen = torch.Generator().manual_seed(0)
    e1 = torch.randn(3, 2, generator=gen)
    e2 = torch.randn(3, 2, generator=gen)
    x1 = math.sqrt(0.5) * x0 + math.sqrt(0.5) * e1
    torch.testing.assert_close(x[[0, 2]], x1[[0, 2]])
    torch.testing.assert_close(x[1], math.sqrt(0.5) * x1[1] + math.sqrt(0.5) * e2[1])


def test_posterior_matches_brute_force_bayes(schedule):
    """q(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0), computed on a fine grid."""
    grid = torch.linspace(-6, 6, 200001, dtype=torch.float64)
    x0 = torch.tensor([[0.4]])
    for step in [1, 5, 250, 999]:
        ab_prev = schedule.alphas_cumprod[step - 1].double()
        beta = schedule.betas[step].double()
        x_t = torch.tensor([[0.9]])
        log_prior = -0.5 * (grid - ab_prev.sqrt() * 0.4) ** 2 / (1 - ab_prev)
        log_lik = -0.5 * (0.9 - (1 - beta).sqrt() * grid) ** 2 / beta
        w = torch.softmax(log_prior + log_lik, 0)
        mean = (w * grid).sum()
        var = (w * (grid - mean) ** 2).sum()
        post = q_posterior_mean_variance(schedule, x0, x_t, torch.tensor([step]))
        assert post.mean.item() == pytest.approx(mean.item(), rel=1e-4, abs=1e-6)
        assert post.variance.item() == pytest.approx(var.item(), rel=1e-3)
        assert post.log_variance.item() == pytest.approx(math.log(var.item()), abs=1e-3)


def test_posterior_at_t0_is_the_data(schedule):
    x0, x_t = torch.randn(4, 3), torch.randn(4, 3)
    post = q_posterior_mean_variance(schedule, x0, x_t, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(post.mean, x0)
    assert (post.variance == 0).all()


def test_posterior_of_gaussian_data_is_consistent_with_the_marginal(schedule):
    """For x0 ~ N(m, s^2), averaging the posterior over x0 | x_t must give the marginal q(x_{t-1} | x_t):
    Monte Carlo over the joint (x0, x_t) draws x_{t-1} from the posterior; its law is that of eq. 4 at t-1."""
    n, m, s, step = 200000, 0.3, 0.5, 400
    gen = torch.Generator().manual_seed(1)
    x0 = m + s * torch.randn(n, 1, generator=gen)
    t = torch.full((n,), step)
    x_t = q_sample(schedule, x0, t, torch.randn(n, 1, generator=gen))
    post = q_posterior_mean_variance(schedule, x0, x_t, t)
    x_prev = post.mean + post.variance.sqrt() * torch.randn(n, 1, generator=gen)
    ab = schedule.alphas_cumprod[step - 1].item()
    assert x_prev.mean().item() == pytest.approx(math.sqrt(ab) * m, abs=5 * math.sqrt(1 / n))
    assert x_prev.var().item() == pytest.approx(ab * s * s + 1 - ab, rel=5 * math.sqrt(2 / n))


@pytest.mark.parametrize("shape", [(6, 2), (6, 3, 4, 4)])
def test_conversions_invert_each_other(schedule, shape):
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    x_t = q_sample(schedule, x0, t, eps)
    v = velocity(schedule, x0, t, eps)
    torch.testing.assert_close(predict_eps_from_x0(schedule, x_t, t, x0), eps, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(predict_x0_from_v(schedule, x_t, t, v), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(predict_eps_from_v(schedule, x_t, t, v), eps, rtol=1e-4, atol=1e-4)
    # x0 from eps amplifies float32 rounding by 1/sqrt(alpha_bar) (~160 at t=999): compare where it is tame.
    torch.testing.assert_close(predict_x0_from_eps(schedule, x_t, t, eps)[:4], x0[:4], rtol=1e-4, atol=1e-4)
    for prediction, output in [("eps", eps), ("x0", x0), ("v", v)]:
        assert torch.equal(training_target(schedule, x0, t, eps, prediction), output)
        d = denoise(schedule, output, x_t, t, prediction)
        torch.testing.assert_close(d.pred_x0[:4], x0[:4], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(d.pred_eps[1:], eps[1:], rtol=1e-3, atol=2e-3)


def test_clipping_recomputes_eps_from_the_clipped_x0(schedule):
    x_t = torch.tensor([[3.0, -0.2]])
    t = torch.tensor([300])
    d = denoise(schedule, torch.zeros_like(x_t), x_t, t, "eps", clip_denoised=True)
    assert d.pred_x0.abs().max() <= 1.0
    # x_t must be reproduced by eq. 4 from the clipped x0 and the recomputed eps.
    torch.testing.assert_close(q_sample(schedule, d.pred_x0, t, d.pred_eps), x_t)


def test_training_loss_of_the_optimal_model_equals_the_bayes_error(schedule):
    """For x0 ~ N(m, s^2 I), Var(eps | x_t) = a s^2 / (a s^2 + 1 - a) per dimension, a = alpha_bar_t:
    the loss of the exact predictor (and no less: a perturbed one does worse)."""
    mixture = GaussianMixture.create([1.0], [[0.3, -0.1]], [0.5])
    model = optimal_eps_model(mixture, schedule)
    n = 50000
    gen = torch.Generator().manual_seed(0)
    x0 = mixture.sample(n, gen)
    for step in [0, 100, 600]:
        t = torch.full((n,), step)
        a = schedule.alphas_cumprod[step].item()
        bayes = a * 0.25 / (a * 0.25 + 1 - a)
        loss = training_loss(model, schedule, x0, t=t, generator=gen)
        assert loss.item() == pytest.approx(bayes, rel=5 * math.sqrt(2 / n))
        worse = training_loss(lambda x, tt: 1.1 * model(x, tt), schedule, x0, t=t, generator=gen)
        assert worse.item() > loss.item()


def test_training_loss_per_example_and_weighting(schedule):
    x0 = torch.randn(8, 2)
    t = torch.arange(8) * 100
    noise = torch.randn(8, 2)
    zero = lambda x, tt: torch.zeros_like(x)  # noqa: E731
    per = training_loss(zero, schedule, x0, t=t, noise=noise, reduction="none")
    torch.testing.assert_close(per, noise.square().mean(1))
    weighted = training_loss(zero, schedule, x0, t=t, noise=noise, weighting="min_snr", reduction="none")
    snr = schedule.snr[t]
    torch.testing.assert_close(weighted, per * snr.clamp(max=5) / snr)


def test_min_snr_weights_closed_form(schedule):
    t = torch.tensor([0, 200, 999])
    ab = torch.cumprod(1 - schedule.betas.double(), 0)[t]
    snr = ab / (1 - ab)
    g = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64))
    for prediction, expected in [("eps", g / snr), ("x0", g), ("v", g / (snr + 1))]:
        weights = loss_weights(schedule, t, prediction, "min_snr").double()
        torch.testing.assert_close(weights, expected, rtol=1e-5, atol=0)
    assert loss_weights(schedule, t, "eps", None) is None


def test_timesteps_are_uniform_over_all_of_0_to_T_minus_1():
    """Algorithm 1 draws t from all T values: chi-square over a small T, and t=0 is drawn."""
    schedule = NoiseSchedule("linear", 10)
    t = sample_timesteps(schedule, 100000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(t, minlength=10).double()
    assert counts.numel() == 10 and (counts > 0).all()
    chi2 = ((counts - 10000) ** 2 / 10000).sum().item()
    assert chi2 < 27.9  # the 0.999 quantile of chi-square with 9 degrees of freedom


@pytest.mark.parametrize("call, message", [
    (lambda s: q_sample(s, torch.zeros(2, 2), torch.tensor([0, 1000]), torch.zeros(2, 2)),
     "timesteps must lie in 0..999 (T=1000); got values from 0 to 1000"),
    (lambda s: q_sample(s, torch.zeros(2, 2), torch.tensor([-1, 3]), torch.zeros(2, 2)), "got values from -1"),
    (lambda s: q_sample(s, torch.zeros(2, 2), torch.tensor([0.5, 3.0]), torch.zeros(2, 2)), "integer tensor"),
    (lambda s: q_sample(s, torch.zeros(2, 2), torch.tensor([1, 2, 3]), torch.zeros(2, 2)), "shape (2,)"),
    (lambda s: q_sample(s, torch.zeros(2, 2), torch.tensor([1, 2]), torch.zeros(2, 3)), "noise must have the shape"),
    (lambda s: training_loss(lambda x, t: x, s, torch.zeros(2, 2), prediction="score"),
     "prediction = 'score' is not allowed; choose from: eps, x0, v"),
    (lambda s: training_loss(lambda x, t: x, s, torch.zeros(2, 2), weighting="snr"),
     "weighting = 'snr' is not allowed; choose from: min_snr"),
    (lambda s: training_loss(lambda x, t: x[:, :1], s, torch.zeros(2, 2)), "the model returned shape (2, 1)"),
])
def test_bad_arguments_raise_value_error(schedule, call, message):
    with pytest.raises(ValueError) as err:
        call(schedule)
    assert message in str(err.value)
