"""The few-step ODE solvers and the timestep grids, checked against exact answers.

For Gaussian data N(m, s^2) (per dimension) the probability-flow ODE has a closed-form solution: with
y = x / alpha and the variance-exploding noise level v = sigma / alpha, (y - m) / sqrt(s^2 + v^2)
stays constant along every trajectory. Each solver is fed the exact denoiser and its error against
that solution is measured as the number of network calls doubles; the slope of log error against
log calls is the solver's order of convergence. The mixture tests compare the law of the samples
with the data's, as the DDPM/DDIM tests of test_sampling.py do.
"""

import math

import pytest
import torch
from exact import reparameterised

from ddpm import NoiseSchedule, sample
from ddpm.analytic import GaussianMixture, optimal_eps_model
from ddpm.config import SampleConfig
from ddpm.diffusion import Denoised, denoise, dynamic_threshold
from ddpm.grids import GRIDS, carried_grid, half_log_snr, snap, timestep_grid
from ddpm.sampling import MAX_START_LEVEL, SAMPLERS, network_calls, walk_grid, walk_timesteps, walk_top

ODE_SOLVERS = ["euler", "heun", "ipndm", "dpm++2m", "dpm++3m"]
MEAN, STD = torch.tensor([0.3, -0.4], dtype=torch.float64), torch.tensor([0.5, 0.2], dtype=torch.float64)


# --- grids ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def linear():
    return NoiseSchedule("linear", 1000)


def test_the_time_grids_are_the_published_ones(linear):
    table = linear.alphas_cumprod_float64()
    assert timestep_grid(table, 10, "uniform") == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert timestep_grid(table, 10, "leading") == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    # diffusers' "trailing": round(arange(T, 0, -T/S)) - 1.
    assert timestep_grid(table, 10, "trailing") == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert timestep_grid(table, 3, "trailing") == [999, 666, 332]
    # (T-1) u^2 for u = 1, 8/9, ..., 0
    assert timestep_grid(table, 10, "quadratic") == [round(999 * (k / 9) ** 2) for k in range(9, -1, -1)]


def test_logsnr_and_karras_grids_are_even_in_their_variables(linear):
    table = linear.alphas_cumprod_float64()
    lam = half_log_snr(table)
    assert float(lam[0]) == pytest.approx(math.log(math.sqrt(1 - 1e-4) / 0.01), rel=1e-12)  # sigma_min 0.01
    assert float((-lam[-1]).exp()) == pytest.approx(157.0, rel=0.01)  # sigma_max 157 for the linear schedule
    for name, variable in [("logsnr", lambda lv: lv), ("karras", lambda lv: (-lv / 7).exp())]:
        positions = GRIDS[name](table, 12)
        assert float(positions[0]) == pytest.approx(999) and float(positions[-1]) == pytest.approx(0, abs=1e-9)
        # the interpolated lambda at the positions, in the grid's variable, has equal steps
        left = positions.floor().long().clamp(max=998)
        at = lam[left] + (positions - left) * (lam[left + 1] - lam[left])
        steps = variable(at).diff()
        torch.testing.assert_close(steps, steps.mean().expand_as(steps), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("levels", [1, 2, 3, 10, 50, 200, 999, 1000])
def test_every_grid_gives_distinct_trained_timesteps(linear, grid, levels):
    ts = timestep_grid(linear.alphas_cumprod_float64(), levels, grid)
    assert len(ts) == levels and ts == sorted(set(ts), reverse=True) and 0 <= ts[-1] and ts[0] <= 999
    if grid != "leading":
        assert ts[0] == 999


def test_snapping_keeps_the_count_where_rounding_would_merge_levels():
    assert snap(torch.tensor([3.2, 0.4, 0.3, 0.1], dtype=torch.float64), 10) == [3, 2, 1, 0]
    assert snap(torch.tensor([9.9, 9.8, 9.7, 2.0], dtype=torch.float64), 10) == [9, 8, 7, 2]
    assert snap(torch.tensor([5.0, 4.0], dtype=torch.float64), 10) == [5, 4]


def test_each_sampler_counts_its_network_calls_honestly(linear):
    for name, entry in SAMPLERS.items():
        for steps in (1, 2, 5, 10, 11):
            options = SampleConfig(sampler=name, steps=steps)
            calls = []
            sample(lambda x, t: calls.append(1) or 0.1 * x, linear, (2, 3), generator=torch.Generator().manual_seed(0),
                   **{k: getattr(options, k) for k in ("sampler", "steps")})
            assert len(calls) == network_calls(options, walk_timesteps(linear, options)) <= steps, (name, steps)
            assert steps - len(calls) < entry.calls_per_step, (name, steps)  # no call of the budget left unused


# --- order of convergence on the closed form --------------------------------------------------------

def gaussian_denoiser(table):
    """The exact (x0, eps) predictions of N(MEAN, STD^2) data at timestep t, in float64."""
    def denoiser(x, t):
        a = table[t]
        gain = a.sqrt() * STD**2 / (a * STD**2 + 1 - a)
        x0 = MEAN + gain * (x - a.sqrt() * MEAN)
        return Denoised(x0, (x - a.sqrt() * x0) / (1 - a).sqrt())
    return denoiser


def flow_solution(table, x_start, t_start, t_end):
    """The probability-flow ODE's solution at t_end from x_start at t_start, for N(MEAN, STD^2) data."""
    a, b = table[t_start], table[t_end]
    v_start, v_end = ((1 - a) / a).sqrt(), ((1 - b) / b).sqrt()
    y = MEAN + (x_start / a.sqrt() - MEAN) * (STD**2 + v_end**2).sqrt() / (STD**2 + v_start**2).sqrt()
    return b.sqrt() * y


def walk_errors(name, schedule, budgets, grid):
    """RMS error at the walk's last level (before the step into the data) for each call budget."""
    table = schedule.alphas_cumprod_float64()
    x_start = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    entry, errors, calls = SAMPLERS[name], [], []
    for budget in budgets:
        timesteps = timestep_grid(table, entry.levels(budget), grid)
        seen = []
        entry.walk(gaussian_denoiser(table), x_start.clone(), schedule, timesteps,
                   SampleConfig(sampler=name, clip=False), callback=seen.append)
        exact = flow_solution(table, x_start, timesteps[0], timesteps[-1])
        errors.append(float((seen[-1].x_t - exact).square().mean().sqrt()))
        calls.append(entry.calls_for(len(timesteps)))
    return calls, errors


def slope(calls, errors):
    x, y = torch.tensor(calls, dtype=torch.float64).log(), torch.tensor(errors, dtype=torch.float64).log()
    return float(-((x - x.mean()) * (y - y.mean())).sum() / (x - x.mean()).square().sum())


# The linear schedule on a fine time axis (T = 20000, betas scaled by 1000/T: the same process). With
# T = 1000 an 80-level walk even in lambda asks for more levels near the data than there are trained
# timesteps, so snapping caps the refinement there and blurs the slopes.
FINE = NoiseSchedule("linear", 20_000, beta_start=5e-6, beta_end=1e-3)


@pytest.mark.parametrize("name, order, low, high", [
    ("ddim", 1, 0.9, 1.1), ("euler", 1, 0.9, 1.1),
    ("heun", 2, 1.8, 2.5), ("dpm++2m", 2, 1.8, 2.3),
    ("dpm++3m", 3, 2.8, 4.5),
])
def test_order_of_convergence_on_the_gaussian_closed_form(name, order, low, high):
    """Error at 5, 10, 20, 40 and 80 calls on the logSNR grid; the slope is fitted on 20-80 calls, where
    steps in lambda are below 0.5 (at 5-10 calls they exceed 1: too coarse for the order to show)."""
    calls, errors = walk_errors(name, FINE, [5, 10, 20, 40, 80], "logsnr")
    assert all(b < a for a, b in zip(errors[1:], errors[2:])), (calls, errors)  # from 10 calls on
    fitted = slope(calls[2:], errors[2:])
    assert low <= fitted <= high, f"{name}: slope {fitted:.2f} (order {order}); calls {calls}, errors {errors}"


def test_dpmpp_3m_is_far_ahead_of_2m_at_equal_calls():
    calls, errors_3m = walk_errors("dpm++3m", FINE, [20, 40, 80], "logsnr")
    _, errors_2m = walk_errors("dpm++2m", FINE, [20, 40, 80], "logsnr")
    assert errors_3m[-1] < errors_2m[-1] / 20


def test_ipndm_is_second_order_on_an_uneven_grid_and_beats_euler():
    # Its Adams-Bashforth weights assume equal steps in v; on the logSNR grid they are not, and the
    # order drops from 4 to 2: still far ahead of Euler for the same calls.
    calls, errors = walk_errors("ipndm", FINE, [20, 40, 80], "logsnr")
    _, euler = walk_errors("euler", FINE, [20, 40, 80], "logsnr")
    assert 1.8 <= slope(calls, errors) <= 2.5 and all(a < b / 5 for a, b in zip(errors, euler))


@pytest.mark.parametrize("grid", list(GRIDS))
def test_euler_takes_ddims_steps(linear, grid):
    model = optimal_eps_model(GaussianMixture.create([1.0], [[0.3, -0.4]], [[0.5, 0.2]]), linear)
    out = {name: sample(model, linear, (64, 2), sampler=name, steps=12, spacing=grid,
                        generator=torch.Generator().manual_seed(0)) for name in ("ddim", "euler")}
    torch.testing.assert_close(out["euler"], out["ddim"], rtol=1e-4, atol=1e-5)


# --- where a walk starts -------------------------------------------------------------------------------

def noise_level(schedule, t):
    alpha_bar = float(schedule.alphas_cumprod_float64()[t])
    return math.sqrt((1 - alpha_bar) / alpha_bar)


@pytest.mark.parametrize("kind, top", [("linear", 999), ("cosine", 994), ("sigmoid", 998)])
def test_ode_walks_start_below_the_level_cap_and_ddpm_ddim_at_t_minus_one(kind, top):
    schedule = NoiseSchedule(kind, 1000)
    assert walk_top(schedule) == top
    assert noise_level(schedule, top) <= MAX_START_LEVEL
    assert top == 999 or noise_level(schedule, top + 1) > MAX_START_LEVEL
    for name in ODE_SOLVERS:
        walk = walk_timesteps(schedule, SampleConfig(sampler=name))
        assert walk[0] <= top and len(walk) == SAMPLERS[name].levels(10)
        if walk_grid(SampleConfig(sampler=name)) != "leading":
            assert walk[0] == top
    for name in ("ddpm", "ddim"):
        assert walk_timesteps(schedule, SampleConfig(sampler=name, steps=20))[0] == 999
    # as many levels as the walk's range holds, never more
    assert walk_timesteps(schedule, SampleConfig(sampler="euler", steps=1000)) == list(range(top, -1, -1))


def sample_errors(schedule, name, timesteps, bias):
    """Largest error of the mean and of the standard deviation of 20,000 samples of Gaussian data, for
    the exact noise predictor plus ``bias`` (a network's error), walked over ``timesteps``."""
    model = optimal_eps_model(GaussianMixture.create([1.0], [MEAN.tolist()], [STD.tolist()]), schedule)

    def denoiser(x, t):
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long)
        return denoise(schedule, model(x, t_batch) + bias, x, t_batch)

    x = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(0))
    out = SAMPLERS[name].walk(denoiser, x, schedule, timesteps, SampleConfig(sampler=name, clip=False)).double()
    return float((out.mean(0) - MEAN).abs().max()), float((out.std(0) - STD).abs().max())


def test_on_the_cosine_schedule_the_time_grids_visit_the_linear_schedules_noise_levels():
    cosine, linear = NoiseSchedule("cosine", 1000), NoiseSchedule("linear", 1000)
    lam_cos, lam_lin = half_log_snr(cosine.alphas_cumprod_float64()), half_log_snr(linear.alphas_cumprod_float64())
    for grid in ("uniform", "leading", "trailing", "quadratic"):  # on the reference itself: the grid as it is
        assert carried_grid(linear.alphas_cumprod_float64(), 10, grid, linear.alphas_cumprod_float64()) == \
            timestep_grid(linear.alphas_cumprod_float64(), 10, grid)
    walk, on_linear = walk_timesteps(cosine, SampleConfig()), walk_timesteps(linear, SampleConfig())
    assert on_linear == [999, 799, 599, 399, 199] and walk[0] == 994  # the linear's s = 157 is above the cap
    for t, t_linear in zip(walk[1:], on_linear[1:]):  # brute force: the cosine's t nearest in lambda
        nearest = int((lam_cos[:995] - lam_lin[t_linear]).abs().argmin())
        assert abs(t - nearest) <= 1, (t, nearest)
    # DDPM and DDIM keep their grids in t (diffusers' DDIM on the cosine schedule visits the same)
    assert walk_timesteps(cosine, SampleConfig(sampler="ddim", steps=5, spacing="trailing")) == on_linear


def test_the_cosine_schedules_ten_call_walks_are_as_good_as_the_linear_schedules():
    # With the exact noise predictor of Gaussian data, and with it off by 0.01 (a network's error).
    # From t = 999 (s = 20,291) Heun's first step is wrong even for the exact predictor: the samples'
    # spread is off by 36 where the data's is 0.5; DPM-Solver++(3M) turns the 0.01 into 14 in the mean.
    # Starting at walk_top alone leaves Heun's trailing grid a first step from s = 128 to 3, which
    # turns the 0.01 into 3.4. With the start capped and the grids carried over by noise level, every
    # solver's errors are the linear schedule's.
    cosine, linear = NoiseSchedule("cosine", 1000), NoiseSchedule("linear", 1000)
    table = cosine.alphas_cumprod_float64()
    from_999 = {name: timestep_grid(table, SAMPLERS[name].levels(10), SAMPLERS[name].grid) for name in ODE_SOLVERS}
    assert sample_errors(cosine, "heun", from_999["heun"], 0.0)[1] > 10
    assert sample_errors(cosine, "dpm++3m", from_999["dpm++3m"], 0.01)[0] > 5
    capped_only = timestep_grid(table[:walk_top(cosine) + 1], SAMPLERS["heun"].levels(10), "trailing")
    assert sample_errors(cosine, "heun", capped_only, 0.01)[0] > 1
    for name in ODE_SOLVERS:
        options = SampleConfig(sampler=name)
        for bias in (0.0, 0.01):
            mine = sample_errors(cosine, name, walk_timesteps(cosine, options), bias)
            reference = sample_errors(linear, name, walk_timesteps(linear, options), bias)
            assert all(m <= 1.25 * r + 0.005 for m, r in zip(mine, reference)), (name, bias, mine, reference)


# --- the mixture, with the exact noise predictor -----------------------------------------------------

MIXTURE = GaussianMixture.create([0.2, 0.3, 0.5], [[-0.7, -0.4], [0.7, -0.4], [0.0, 0.7]], [0.15, 0.2, 0.15])
MIX_N = 100_000


def component_statistics(x):
    """Per component (by the data's own classifier): share, mean and standard deviation (3, 5)."""
    component = MIXTURE.classify(x)
    rows = []
    for k in range(3):
        members = x[component == k].double()
        rows.append(torch.cat([torch.tensor([members.shape[0] / x.shape[0]]), members.mean(0), members.std(0)]))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def mixture_error():
    """The largest error of a sample's component statistics against those of a large draw of the data
    itself (so the classifier's own overlap errors cancel), shares relative to the weight and means and
    standard deviations in units of the component's standard deviation."""
    reference = component_statistics(MIXTURE.sample(400_000, torch.Generator().manual_seed(9)).float())
    scale = torch.cat([reference[:, :1], MIXTURE.stds.double(), MIXTURE.stds.double()], 1)
    return lambda x: float(((component_statistics(x) - reference) / scale).abs().max())


@pytest.fixture(scope="module")
def mixture_samples():
    schedule = NoiseSchedule("linear", 1000)
    model = optimal_eps_model(MIXTURE, schedule)
    return lambda **options: sample(model, schedule, (MIX_N, 2), generator=torch.Generator().manual_seed(1),
                                    **options)


def test_twenty_calls_reproduce_the_mixture_as_closely_as_ddpm_on_all_steps(mixture_samples, mixture_error):
    # On the exact problem the grids even in lambda and in t^(1/2) suit the solvers best (the MNIST
    # table prefers others for a trained network: docs/sampling.md); the best pair matches DDPM-1000.
    ddpm_error = mixture_error(mixture_samples(sampler="ddpm"))
    errors = {(name, grid): mixture_error(mixture_samples(sampler=name, steps=20, spacing=grid))
              for name in ODE_SOLVERS for grid in ("quadratic", "logsnr")}
    ddim_error = mixture_error(mixture_samples(sampler="ddim", steps=20))
    assert min(errors.values()) <= ddpm_error < ddim_error / 4, (errors, ddpm_error, ddim_error)


def test_ten_calls_have_at_most_two_thirds_of_ddims_error(mixture_samples, mixture_error):
    # each solver on its default grid
    ddim_error = mixture_error(mixture_samples(sampler="ddim", steps=10))
    errors = {name: mixture_error(mixture_samples(sampler=name, steps=10)) for name in ODE_SOLVERS}
    assert min(errors.values()) <= 2 / 3 * ddim_error, (errors, ddim_error)


# --- the model contract: eps, x0 and v models; clipping and thresholding; image shapes ----------------

@pytest.mark.parametrize("name", ODE_SOLVERS)
@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_every_solver_gives_the_same_samples_for_eps_x0_and_v_models(linear, name, prediction):
    eps_model = optimal_eps_model(GaussianMixture.create([1.0], [[0.3, -0.4]], [[0.5, 0.2]]), linear)
    model = reparameterised(eps_model, linear, prediction)

    base = sample(eps_model, linear, (256, 2), sampler=name, steps=15, generator=torch.Generator().manual_seed(5))
    other = sample(model, linear, (256, 2), sampler=name, steps=15, prediction=prediction,
                   generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(base, other, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ODE_SOLVERS)
def test_clipping_and_thresholding_bound_every_x0_the_solver_uses(linear, name):
    model = lambda x, t: -5.0 * torch.ones_like(x)  # noqa: E731  (x0 estimates far outside [-1, 1])
    for options in (dict(clip_denoised=True), dict(threshold=0.9)):
        seen = []
        x = sample(model, linear, (4, 3, 4, 4), sampler=name, steps=8, generator=torch.Generator().manual_seed(0),
                   callback=seen.append, **options)
        assert all(step.pred_x0.abs().max() <= 1.0 + 1e-6 for step in seen), options
        assert x.shape == (4, 3, 4, 4) and x.abs().max() <= 1.0 + 1e-4, options  # the last step returns an x0


def test_dynamic_threshold_on_a_small_case():
    x0 = torch.tensor([[0.5, -3.0, 2.0, 0.1], [0.5, -0.9, 0.2, 0.1]])
    out = dynamic_threshold(x0, 1.0)  # s = max |x0| = 3 for the first, < 1 (so 1) for the second
    torch.testing.assert_close(out, torch.tensor([[0.5 / 3, -1.0, 2 / 3, 0.1 / 3], [0.5, -0.9, 0.2, 0.1]]))
    # quantile 0.5 of |(0.5, 3, 2, 0.1)| is 1.25: clip to [-1.25, 1.25], then divide by it.
    torch.testing.assert_close(dynamic_threshold(x0[:1], 0.5), torch.tensor([[0.4, -1.0, 1.0, 0.08]]))


@pytest.mark.parametrize("name", ODE_SOLVERS)
def test_same_generator_same_samples_and_the_callback_walks_every_level(linear, name):
    model = lambda x, t: 0.1 * x  # noqa: E731
    seen = []
    a = sample(model, linear, (4, 1, 4, 4), sampler=name, steps=9, generator=torch.Generator().manual_seed(7),
               callback=seen.append)
    b = sample(model, linear, (4, 1, 4, 4), sampler=name, steps=9, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.isfinite(a).all()
    options = SampleConfig(sampler=name, steps=9)
    assert [s.t for s in seen] == walk_timesteps(linear, options)
    assert torch.equal(seen[-1].x_prev, a)
    for one, two in zip(seen, seen[1:]):
        assert torch.equal(one.x_prev, two.x_t)
