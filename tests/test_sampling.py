"""Samplers fed the exact noise predictor reproduce the data distribution (the project's proof that
sampling is right), plus determinism, step-for-step identities, DDIM inversion and argument errors."""

import math

import pytest
import torch
from exact import assert_gaussian_moments, reparameterised, walk_moments

import ddpm
from ddpm import NoiseSchedule, ddim_invert, sample, slerp, timestep_sequence
from ddpm.analytic import GaussianMixture, optimal_eps_model
from ddpm.sampling import SamplerStep, ddpm_step

N = 20000
T = 1000

# (options, whether the walk is fine enough that its output law equals the data law within 5%).
# Even 1000 steps are not exact: DDPM with fixed_small under-disperses data of std 0.2 by 3.7% (the
# closed form says so; docs/equations.md tabulates it), so "equals the data" needs that margin.
SAMPLERS = {
    "ddpm-fixed_small-1000": (dict(sampler="ddpm"), True),
    "ddpm-fixed_large-1000": (dict(sampler="ddpm", variance="fixed_large"), True),
    "ddim-1000": (dict(sampler="ddim"), True),
    "ddim-eta1-1000": (dict(sampler="ddim", eta=1.0), True),
    "ddim-100": (dict(sampler="ddim", steps=100), False),
    "ddim-eta1-100": (dict(sampler="ddim", steps=100, eta=1.0), False),
    "ddpm-fixed_small-100": (dict(sampler="ddpm", steps=100), False),
}


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule("linear", T)


@pytest.fixture(scope="module")
def gaussian():
    # Two dimensions with different scales: the narrow one is the harder test for few steps.
    return GaussianMixture.create([1.0], [[0.3, -0.4]], [[0.5, 0.2]])


@pytest.mark.parametrize("name", SAMPLERS)
def test_exact_score_gaussian(name, schedule, gaussian):
    """Samples match, within 5 standard errors, the exact law of the sampler's output on Gaussian data;
    for 1000-step walks that law is the data's own within 5%."""
    options, fine = SAMPLERS[name]
    gen = torch.Generator().manual_seed(0)
    x = sample(optimal_eps_model(gaussian, schedule), schedule, (N, 2), generator=gen, **options)
    steps = timestep_sequence(T, options.get("steps"))
    moments = [walk_moments(schedule.alphas_cumprod, steps, m, s, sampler=options["sampler"],
                            eta=options.get("eta", 0.0), variance=options.get("variance", "fixed_small"))
               for m, s in zip(gaussian.means[0].tolist(), gaussian.stds[0].tolist())]
    mean = torch.tensor([m for m, _ in moments], dtype=torch.float64)
    var = torch.tensor([v for _, v in moments], dtype=torch.float64)
    assert_gaussian_moments(x, mean, var)
    if fine:
        torch.testing.assert_close(mean, gaussian.mean(), atol=0.01, rtol=0)
        torch.testing.assert_close(var, gaussian.variance(), rtol=0.05, atol=0)
        assert_gaussian_moments(x, gaussian.mean(), gaussian.variance(), z=6.0)


def test_few_steps_are_measurably_biased(schedule, gaussian):
    """The closed form is sharp enough to see DDIM's discretisation error: with 100 steps the narrow
    dimension's variance is several percent low, and the samples agree with that, not with the data."""
    steps = timestep_sequence(T, 100)
    _, var = walk_moments(schedule.alphas_cumprod, steps, -0.4, 0.2, sampler="ddim")
    assert 0.80 < var / 0.04 < 0.95


MIXTURE = GaussianMixture.create([0.2, 0.3, 0.5], [[-0.7, -0.4], [0.7, -0.4], [0.0, 0.7]], [0.15, 0.2, 0.15])


@pytest.mark.parametrize("name", ["ddpm-fixed_small-1000", "ddpm-fixed_large-1000", "ddim-1000",
                                  "ddim-eta1-1000", "ddim-100"])
def test_exact_score_mixture(name, schedule):
    """Mixture weights (5 SE of a binomial), component means (5 SE) and, for 1000-step walks,
    component variances (5 SE, plus the 5% walk bias bounded in the Gaussian test)."""
    options, fine = SAMPLERS[name]
    gen = torch.Generator().manual_seed(1)
    x = sample(optimal_eps_model(MIXTURE, schedule), schedule, (N, 2), generator=gen, **options)
    component = MIXTURE.classify(x)
    for k, w in enumerate(MIXTURE.weights.tolist()):
        members = x[component == k].double()
        share = members.shape[0] / N
        assert abs(share - w) < 5 * math.sqrt(w * (1 - w) / N), f"component {k}: share {share:.4f}, weight {w}"
        s = MIXTURE.stds[k, 0].item()
        se_mean = s / math.sqrt(members.shape[0])
        mean_err = (members.mean(0) - MIXTURE.means[k]).abs().max().item()
        assert mean_err < 5 * se_mean + (0 if fine else 0.01), f"component {k}: mean off by {mean_err:.4f}"
        if fine:
            ratio = members.var(0) / s**2
            assert ((ratio - 1).abs() < 5 * math.sqrt(2 / members.shape[0]) + 0.05).all(), ratio


def test_ddim_eta1_on_all_steps_is_ddpm_step_for_step(schedule, gaussian):
    model = optimal_eps_model(gaussian, schedule)
    runs = {}
    for name, options in {"ddpm": dict(sampler="ddpm"), "ddim": dict(sampler="ddim", eta=1.0)}.items():
        trace = []
        x = sample(model, schedule, (64, 2), generator=torch.Generator().manual_seed(3),
                   callback=lambda step, trace=trace: trace.append(step.x_prev), **options)
        runs[name] = (x, trace)
    assert len(runs["ddpm"][1]) == T
    for a, b in zip(runs["ddpm"][1], runs["ddim"][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runs["ddpm"][0], runs["ddim"][0], rtol=1e-5, atol=1e-5)


def test_ddpm_step_is_algorithm_2(schedule):
    """Without clipping, the posterior-mean form equals Algorithm 2, line 4 written out literally."""
    gen = torch.Generator().manual_seed(0)
    x_t, eps, z = (torch.randn(5, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    b = schedule.betas.double()
    ab = torch.cumprod(1 - b, 0)
    for t in [1, 7, 500, 999]:
        x0_hat = (x_t - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()
        c1 = ab[t - 1].sqrt() * b[t] / (1 - ab[t])
        c2 = (1 - b[t]).sqrt() * (1 - ab[t - 1]) / (1 - ab[t])
        sigma2 = (1 - ab[t - 1]) / (1 - ab[t]) * b[t]
        ours = ddpm_step(x_t, x0_hat, c1, c2, sigma2, z)
        algorithm_2 = (x_t - b[t] / (1 - ab[t]).sqrt() * eps) / (1 - b[t]).sqrt() + sigma2.sqrt() * z
        torch.testing.assert_close(ours, algorithm_2, rtol=1e-10, atol=1e-10)


def test_all_steps_coefficients_equal_the_schedule_tables(schedule):
    from ddpm.sampling import step_coefficients
    coefs = step_coefficients(schedule, timestep_sequence(T))
    flip = lambda table: table.flip(0)  # noqa: E731  (the walk is descending)
    torch.testing.assert_close(coefs.posterior_coef1, flip(schedule.posterior_mean_coef1))
    torch.testing.assert_close(coefs.posterior_coef2, flip(schedule.posterior_mean_coef2))
    torch.testing.assert_close(coefs.posterior_variance, flip(schedule.posterior_variance))
    torch.testing.assert_close(coefs.beta, flip(schedule.betas), rtol=1e-4, atol=0)


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_other_parameterisations_give_the_same_samples(schedule, gaussian, prediction):
    """An x0- or v-model built from the exact eps-model samples the same trajectory."""
    eps_model = optimal_eps_model(gaussian, schedule)
    model = reparameterised(eps_model, schedule, prediction)

    base = sample(eps_model, schedule, (256, 2), sampler="ddim", steps=50,
                  generator=torch.Generator().manual_seed(5))
    other = sample(model, schedule, (256, 2), sampler="ddim", steps=50, prediction=prediction,
                   generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(base, other, rtol=1e-3, atol=1e-3)


def test_clip_denoised_clips_x0_and_uses_the_posterior_mean(schedule):
    # A wild model: x0 estimates far outside [-1, 1] at every step.
    model = lambda x, t: -5.0 * torch.ones_like(x)  # noqa: E731
    seen = []
    x = sample(model, schedule, (8, 3, 4, 4), clip_denoised=True, generator=torch.Generator().manual_seed(0),
               callback=seen.append)
    assert all(step.pred_x0.abs().max() <= 1.0 for step in seen)
    assert x.abs().max() <= 1.0 + 1e-6  # the last step returns the clipped x0 itself
    unclipped = sample(model, schedule, (8, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    assert unclipped.abs().max() > 2.0


def test_callback_sees_every_step_in_order(schedule):
    seen: list[SamplerStep] = []
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    out = sample(model, schedule, (2, 1, 4, 4), sampler="ddim", steps=10, callback=seen.append,
                 generator=torch.Generator().manual_seed(0))
    assert [s.index for s in seen] == list(range(10))
    assert [s.t for s in seen] == timestep_sequence(T, 10)
    assert seen[-1].t == 0 and torch.equal(seen[-1].x_prev, out)
    for a, b in zip(seen, seen[1:]):
        assert torch.equal(a.x_prev, b.x_t)


@pytest.mark.parametrize("shape", [(16, 2), (4, 3, 8, 8)])
@pytest.mark.parametrize("options", [dict(sampler="ddpm"), dict(sampler="ddim", steps=20, eta=0.5)])
def test_same_generator_same_samples(schedule, shape, options):
    model = lambda x, t: 0.1 * x  # noqa: E731
    a = sample(model, schedule, shape, generator=torch.Generator().manual_seed(7), **options)
    b = sample(model, schedule, shape, generator=torch.Generator().manual_seed(7), **options)
    c = sample(model, schedule, shape, generator=torch.Generator().manual_seed(8), **options)
    assert a.shape == shape and torch.equal(a, b) and not torch.equal(a, c)


def test_image_shaped_mixture_samples(schedule):
    """The same maths on (B, C, H, W): a Gaussian over 1x2x2 images."""
    images = GaussianMixture.create([1.0], [[0.5, -0.5, 0.0, 0.2]], [0.3], shape=(1, 2, 2))
    x = sample(optimal_eps_model(images, schedule), schedule, (N, 1, 2, 2), sampler="ddim",
               generator=torch.Generator().manual_seed(0))
    assert x.shape == (N, 1, 2, 2)
    assert_gaussian_moments(x.flatten(1), images.mean(), images.variance(), z=6.0)


def test_timestep_sequences():
    assert timestep_sequence(1000) == list(range(999, -1, -1))
    assert timestep_sequence(1000, 10) == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert timestep_sequence(1000, 10, "leading") == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert timestep_sequence(1000, 1) == [999]
    assert timestep_sequence(1, None) == [0]
    for steps in [2, 3, 7, 50, 333, 999, 1000]:
        for spacing in ["uniform", "leading"]:
            seq = timestep_sequence(1000, steps, spacing)
            assert len(seq) == len(set(seq)) == steps and seq[-1] == 0 and seq == sorted(seq, reverse=True)


def test_ddim_inversion_reconstructs_data(schedule, gaussian):
    """x0 -> x_T -> x0 with the exact model and 1000 steps, and the latents of data look like N(0, 1)."""
    model = optimal_eps_model(gaussian, schedule)
    x0 = gaussian.sample(4000, torch.Generator().manual_seed(0))
    latent = ddim_invert(model, schedule, x0)
    assert_gaussian_moments(latent, torch.zeros(2), torch.ones(2), z=6.0)
    back = sample(model, schedule, x0.shape, sampler="ddim", noise=latent)
    assert (back - x0).abs().max().item() < 0.02
    # With 50 steps the round trip is coarser but still close.
    latent50 = ddim_invert(model, schedule, x0[:100], steps=50)
    back50 = sample(model, schedule, (100, 2), sampler="ddim", steps=50, noise=latent50)
    assert (back50 - x0[:100]).abs().mean().item() < 0.05


def test_slerp():
    gen = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    torch.testing.assert_close(slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(slerp(z0, z1, 1.0), z1)
    # Orthogonal unit vectors: the midpoint lies on the circle at 45 degrees.
    e0, e1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(slerp(e0, e1, 0.5), torch.tensor([[math.sqrt(0.5), math.sqrt(0.5)]]))
    # Gaussian latents keep their norm along the path (linear interpolation would shrink it ~ by 1/sqrt 2).
    mid = slerp(z0, z1, 0.5).flatten(1).norm(dim=1)
    ends = 0.5 * (z0.flatten(1).norm(dim=1) + z1.flatten(1).norm(dim=1))
    assert ((mid / ends - 1).abs() < 0.05).all()
    torch.testing.assert_close(slerp(z0, z0, 0.3), z0)  # parallel: no division by zero


def bad(**kwargs):
    return lambda s: sample(lambda x, t: torch.zeros_like(x), s, kwargs.pop("shape", (2, 2)), **kwargs)


@pytest.mark.parametrize("call, message", [
    (bad(sampler="euler2"), "sampler = 'euler2' is not allowed; choose from: ddpm, ddim, euler, heun, ipndm, "
                            "dpm++2m, dpm++3m"),
    (bad(variance="learned"), "variance = 'learned' is not allowed; choose from: fixed_small, fixed_large"),
    (bad(prediction="score"), "prediction = 'score' is not allowed; choose from: eps, x0, v"),
    (bad(spacing="quad"), "spacing = 'quad' is not allowed; choose from: uniform, leading, trailing, quadratic, "
                          "logsnr, karras (or none)"),
    (bad(threshold=1.5), "threshold = 1.5 is not allowed; it must be in (0, 1]"),
    (bad(steps=0), "steps = 0 is not allowed; it must be at least 1"),
    (bad(steps=1001), "steps = 1001 is not allowed; use an integer in 1..1000"),
    (bad(steps=2.0), "steps = 2.0 is not allowed; expected an integer or none"),
    (bad(sampler="ddim", eta=1.5), "eta = 1.5 is not allowed; it must be in [0, 1]"),
    (bad(sampler="ddim", eta=-0.1), "eta = -0.1 is not allowed; it must be in [0, 1]"),
    (bad(sampler="ddim", eta=True), "eta = True is not allowed; expected a number"),
    (bad(sampler="ddpm", eta=0.5), "eta = 0.5 is not allowed; it applies to sampler ddim only, not ddpm"),
    (bad(sampler="ddim", variance="fixed_large"), "variance = 'fixed_large' is not allowed; it applies to sampler "
                                                  "ddpm only, not ddim"),
    (bad(shape=(0, 2)), "shape must be (B, D) or (B, C, H, W)"),
    (bad(noise=torch.zeros(3, 2)), "noise must have shape (2, 2); got (3, 2)"),
    (lambda s: sample(lambda x, t: x[:, :1], s, (2, 2)), "the model returned shape (2, 1)"),
    (lambda s: sample(lambda x, t: (x, x), s, (2, 2)), "the model returned a tuple; it must return one tensor"),
    (bad(shape=3), "shape must be (B, D) or (B, C, H, W) with positive integers; got 3"),
    (bad(generator=0), "generator must be a torch.Generator or None; got int"),
    (lambda s: sample(lambda x, t: x, "linear", (2, 2)), "schedule must be a ddpm.NoiseSchedule; got str"),
])
def test_bad_arguments_raise_value_error(schedule, call, message):
    with pytest.raises(ValueError) as err:
        call(schedule)
    assert message in str(err.value)


def test_public_names():
    for name in ["NoiseSchedule", "q_sample", "q_sample_iterative", "sample", "training_loss",
                 "q_posterior_mean_variance", "ddim_invert", "slerp"]:
        assert hasattr(ddpm, name)


def test_samplers_run_without_autograd_and_return_ordinary_tensors(schedule):
    # The walk records no autograd graph, even for a model with parameters that require grad; what
    # comes back is an ordinary tensor the caller may change in place.
    seen = []
    layer = torch.nn.Linear(2, 2)

    def model(x, t):
        out = layer(x)
        seen.append(out.requires_grad)
        return out

    x = sample(model, schedule, (2, 2), steps=3, generator=torch.Generator().manual_seed(0))
    z = ddim_invert(model, schedule, x, steps=3)
    assert seen == [False] * 6
    for out in (x, z):
        assert not out.is_inference() and not out.requires_grad
        out.clamp_(-1, 1)


@pytest.mark.parametrize("options", [
    dict(sampler="ddpm", steps=12, clip_denoised=True),
    dict(sampler="ddpm", steps=12, variance="fixed_large", prediction="v"),
    dict(sampler="ddim", steps=12),
    dict(sampler="ddim", steps=12, eta=0.5, prediction="x0"),
    dict(sampler="ddim", steps=1),
])
def test_the_cuda_graph_walk_gives_the_plain_walks_numbers(schedule, options):
    # cuda_graph=True off CUDA runs the walk a CUDA graph replays (fixed input and output tensors, the
    # step's coefficients copied in, noise drawn outside) without recording a graph. It must give the
    # plain loop's samples, callbacks and generator state, bit for bit, with a network whose output
    # depends on x and t; a callback keeps its tensors although the fixed ones are overwritten.
    unet = ddpm.models.build_model("unet", in_channels=2, image_size=8, ch=16, channel_mult=(1, 2),
                                   num_res_blocks=1, num_groups=8, attention_resolutions=(4,), seed=0).eval()
    with torch.no_grad():  # the last conv starts at zero: give every weight a value
        for p in unet.parameters():
            p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    results = {}
    for graph in (False, True):
        seen = []
        generator = torch.Generator().manual_seed(3)
        x = sample(unet, schedule, (3, 2, 8, 8), generator=generator, cuda_graph=graph,
                   callback=lambda step: seen.append(step), **options)
        results[graph] = x, seen, generator.get_state()
    (x_plain, seen_plain, state_plain), (x_graph, seen_graph, state_graph) = results[False], results[True]
    torch.testing.assert_close(x_graph, x_plain, rtol=0, atol=0)
    assert torch.equal(state_graph, state_plain)
    assert [s.t for s in seen_graph] == [s.t for s in seen_plain] == timestep_sequence(T, options["steps"])
    for a, b in zip(seen_graph, seen_plain):
        for name in ("x_t", "pred_x0", "x_prev"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0, msg=name)
    assert len({id(s.x_prev) for s in seen_graph}) == len(seen_graph)


def test_cuda_graph_must_be_a_bool(schedule):
    with pytest.raises(ValueError, match="cuda_graph = 'yes' is not allowed; use True or False"):
        sample(lambda x, t: torch.zeros_like(x), schedule, (2, 2), cuda_graph="yes")
