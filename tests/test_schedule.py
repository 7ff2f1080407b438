"""NoiseSchedule against known values and closed forms."""

import math

import pytest
import torch

from ddpm import NoiseSchedule
from ddpm.schedule import cosine_alpha_bar, extract


def test_linear_schedule_known_values():
    s = NoiseSchedule("linear", 1000)
    assert s.betas[0].item() == pytest.approx(1e-4)
    assert s.betas[-1].item() == pytest.approx(0.02)
    # prod_{i<1000} (1 - beta_i) for the paper's schedule, a value quoted widely (e.g. 4.036e-5).
    assert s.alphas_cumprod[-1].item() == pytest.approx(4.036e-5, rel=1e-3)
    exact = math.prod(1 - (1e-4 + (0.02 - 1e-4) * i / 999) for i in range(1000))
    assert s.alphas_cumprod[-1].item() == pytest.approx(exact, rel=1e-5)


def test_cosine_matches_closed_form_where_not_capped():
    T = 1000
    s = NoiseSchedule("cosine", T)
    u = torch.arange(1, T + 1, dtype=torch.float64) / T
    f = torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    f0 = math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    closed = f / f0
    uncapped = s.betas < 0.999
    first_capped = int((~uncapped).nonzero()[0]) if (~uncapped).any() else T
    assert first_capped > 990  # only the last steps hit the cap
    torch.testing.assert_close(s.alphas_cumprod[:first_capped].double(), closed[:first_capped],
                               rtol=1e-5, atol=1e-9)
    assert s.betas.max().item() == pytest.approx(0.999)
    torch.testing.assert_close(cosine_alpha_bar(torch.zeros(1, dtype=torch.float64)),
                               torch.ones(1, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("T", [1, 2, 10, 1000])
def test_tables_are_consistent(kind, T):
    s = NoiseSchedule(kind, T)
    b = s.betas.double()
    assert s.betas.dtype == torch.float32 and s.betas.shape == (T,)
    assert ((b > 0) & (b < 1)).all()
    torch.testing.assert_close(s.alphas_cumprod.double(), torch.cumprod(1 - b, 0), rtol=1e-5, atol=1e-7)
    assert s.alphas_cumprod_prev[0].item() == 1.0
    torch.testing.assert_close(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])
    assert s.posterior_variance[0].item() == 0.0
    assert torch.isfinite(s.posterior_log_variance_clipped).all()
    ab = torch.cumprod(1 - b, 0)  # float64, from the stored betas
    torch.testing.assert_close(s.snr.double(), ab / (1 - ab), rtol=1e-5, atol=1e-7)
    assert (s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all()


def test_posterior_variance_formula():
    s = NoiseSchedule("linear", 50)
    b = s.betas.double()
    ab = torch.cumprod(1 - b, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    expected = (1 - ab_prev) / (1 - ab) * b
    torch.testing.assert_close(s.posterior_variance.double(), expected, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(s.posterior_log_variance_clipped[1:].double(), expected[1:].log(), rtol=1e-5, atol=1e-6)
    assert s.posterior_log_variance_clipped[0] == s.posterior_log_variance_clipped[1]


def test_explicit_betas_and_to_device():
    s = NoiseSchedule(betas=[0.1, 0.2, 0.3])
    assert s.kind == "custom" and s.num_steps == 3
    assert s.alphas_cumprod[-1].item() == pytest.approx(0.9 * 0.8 * 0.7)
    moved = s.to("cpu")
    assert moved is not s and torch.equal(moved.posterior_variance, s.posterior_variance)
    assert "custom" in repr(moved)


def test_extract_broadcasts_over_any_trailing_shape():
    table = torch.arange(10.0)
    t = torch.tensor([0, 9, 3])
    assert extract(table, t, (3, 2)).shape == (3, 1)
    out = extract(table, t, (3, 1, 4, 4))
    assert out.shape == (3, 1, 1, 1)
    assert out.flatten().tolist() == [0.0, 9.0, 3.0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="quadratic"), "unknown schedule kind 'quadratic'; allowed: linear, cosine, sigmoid"),
    (dict(num_steps=0), "num_steps must be an integer >= 1; got 0"),
    (dict(num_steps=2.5), "num_steps must be an integer >= 1"),
    (dict(betas=[]), "at least one value"),
    (dict(betas=[[0.1, 0.2], [0.3, 0.4]]), "1-D sequence of at least one value (one per step); got shape (2, 2)"),
    (dict(kind="cosine", num_steps=10, betas=[0.1]), "leave out kind and num_steps"),
    (dict(num_steps=3, betas=[0.1, 0.2]), "leave out kind and num_steps"),
    (dict(betas=[0.1, 1.0]), "open interval (0, 1)"),
    (dict(betas=[0.0, 0.5]), "open interval (0, 1)"),
    (dict(beta_start=0.03, beta_end=0.02), "0 < beta_start <= beta_end < 1"),
])
def test_bad_schedule_arguments(kwargs, message):
    with pytest.raises(ValueError) as err:
        NoiseSchedule(**kwargs)
    assert message in str(err.value)
