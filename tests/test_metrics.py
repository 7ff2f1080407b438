"""Distances between sample sets, against closed forms: the Frechet distance between Gaussians, the
energy distance between point masses and between normals, the error to the square."""

import math

import numpy as np
import pytest
import torch

from ddpm.evaluation.metrics import (FeatureStatistics, energy_distance, feature_statistics, frechet_distance,
                                     square_error)


def _stats(mean, cov):
    return FeatureStatistics(torch.tensor(mean, dtype=torch.float64), torch.tensor(cov, dtype=torch.float64), 0)


def test_frechet_distance_of_diagonal_gaussians():
    """Commuting covariances: d^2 = |mu_a - mu_b|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2."""
    a = _stats([0.0, 1.0, -2.0], np.diag([1.0, 4.0, 0.25]))
    b = _stats([0.5, 1.0, 0.0], np.diag([9.0, 1.0, 0.25]))
    want = 0.25 + 4.0 + (1 - 3) ** 2 + (2 - 1) ** 2 + 0.0
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-12)
    assert frechet_distance(b, a) == pytest.approx(want, rel=1e-12)


def test_frechet_distance_of_non_commuting_2x2_covariances():
    """For 2x2 S_a S_b with positive eigenvalues, tr sqrt(S_a S_b) = sqrt(tr(S_a S_b) + 2 sqrt(det S_a det S_b))."""
    sa = np.array([[2.0, 0.9], [0.9, 1.0]])
    sb = np.array([[0.5, -0.3], [-0.3, 3.0]])
    cross = math.sqrt(np.trace(sa @ sb) + 2 * math.sqrt(np.linalg.det(sa) * np.linalg.det(sb)))
    want = (1.0 ** 2 + 2.0 ** 2) + np.trace(sa) + np.trace(sb) - 2 * cross
    assert frechet_distance(_stats([1.0, -1.0], sa), _stats([0.0, 1.0], sb)) == pytest.approx(want, rel=1e-12)


def test_frechet_distance_with_singular_covariances():
    """Fewer samples than features (rank-deficient covariances, as FID with few samples has): same
    statistics give 0, a shift by v gives |v|^2, and a scaling by c of the same covariance gives
    (c - 1)^2 tr(S)."""
    features = torch.randn(8, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = feature_statistics(features)
    assert torch.linalg.matrix_rank(s.cov) == 7
    # The 13 zero eigenvalues come out as rounding noise ~1e-16, whose square roots (~1e-8) add up:
    # the distance is exact to about 1e-7 here, not to machine precision.
    assert frechet_distance(s, s) == pytest.approx(0.0, abs=1e-6)
    shift = torch.linspace(-1, 1, 20, dtype=torch.float64)
    assert frechet_distance(s, feature_statistics(features + shift)) == pytest.approx(float(shift @ shift), rel=1e-6)
    scaled = feature_statistics(3.0 * features)
    want = float((s.mean * 2).square().sum()) + 4.0 * float(s.cov.trace())
    assert frechet_distance(s, scaled) == pytest.approx(want, rel=1e-6)


def test_feature_statistics_match_numpy():
    features = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    s = feature_statistics(features)
    np.testing.assert_allclose(s.mean.numpy(), features.double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.cov.numpy(), np.cov(features.double().numpy(), rowvar=False), rtol=1e-10)
    assert s.count == 50
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(features[:1])


def test_energy_distance_by_brute_force():
    """Every pair written out, each mean over all pairs: the within-set means keep the zero distance of
    each point to itself (the V-statistic)."""
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, 3, generator=gen), torch.randn(7, 3, generator=gen) + 0.5
    dist = lambda a, b: math.dist(a.tolist(), b.tolist())  # noqa: E731
    between = sum(dist(x[i], y[j]) for i in range(5) for j in range(7)) / 35
    within_x = sum(dist(x[i], x[j]) for i in range(5) for j in range(5)) / 25
    within_y = sum(dist(y[i], y[j]) for i in range(7) for j in range(7)) / 49
    assert energy_distance(x, y) == pytest.approx(2 * between - within_x - within_y, rel=1e-9)
    assert energy_distance(x, x) == 0.0 and energy_distance(y, y) == 0.0


def _distinct_pair_mean(a):
    return float(torch.cdist(a, a).sum()) / (len(a) * (len(a) - 1))


def _unbiased_energy(x, y):
    """The U-statistic, within-set means over distinct pairs only (what energy_distance once returned)."""
    return 2 * float(torch.cdist(x, y).mean()) - _distinct_pair_mean(x) - _distinct_pair_mean(y)


def test_energy_distance_of_two_draws_of_one_distribution_is_never_negative():
    """The noise floor's case, small: two independent draws of 8 points from N(0, I). The unbiased
    estimator is negative for seed 0 (and for most seeds); energy_distance never is."""
    def draws(seed):
        gen = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(8, 2, generator=gen, dtype=torch.float64) for _ in range(2))

    assert _unbiased_energy(*draws(0)) < 0
    values = [energy_distance(*draws(seed)) for seed in range(200)]
    assert min(values) > 0
    # What it adds to the U-statistic: the within-set distinct-pair means over N and over M.
    x, y = draws(0)
    bias = (_distinct_pair_mean(x) + _distinct_pair_mean(y)) / 8
    assert values[0] == pytest.approx(_unbiased_energy(x, y) + bias, rel=1e-12)


def test_energy_distance_of_point_masses_and_of_shifted_normals():
    """Two point masses a apart: 2a. N(0, 1) against N(mu, 1): 2 E|Z_mu| - 2 E|Z_0| with Z_mu ~ N(mu, 2),
    E|Z_mu| = sqrt(2) sqrt(2/pi) exp(-mu^2/4) + mu (1 - 2 Phi(-mu/sqrt(2)))."""
    assert energy_distance(torch.zeros(4, 1), torch.full((3, 1), 1.5)) == pytest.approx(3.0)
    mu, n = 1.0, 8000
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(n, 1, generator=gen), torch.randn(n, 1, generator=gen) + mu
    abs_mean = lambda m: (math.sqrt(2) * math.sqrt(2 / math.pi) * math.exp(-m * m / 4)  # noqa: E731
                          + m * (1 - 2 * 0.5 * math.erfc(m / 2)))
    want = 2 * abs_mean(mu) - 2 * abs_mean(0.0)
    assert energy_distance(x, y) == pytest.approx(want, abs=0.04)  # about 3.5 standard deviations at this n
    same = energy_distance(x, torch.randn(n, 1, generator=gen))
    assert 0 <= same < 0.01  # the noise floor at this n, about 2 E|X - X'| / n = 3e-4 above 0


def test_energy_distance_refuses_mismatched_sets():
    with pytest.raises(ValueError, match="energy_distance"):
        energy_distance(torch.zeros(5, 2), torch.zeros(5, 3))


def test_square_error():
    target = torch.full((1, 4, 4), -1.0)
    images = torch.stack([target, -target, target.clone().index_fill_(1, torch.tensor([0]), 1.0)])
    torch.testing.assert_close(square_error(images, target), torch.tensor([0.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="do not match"):
        square_error(images[:, :, :2], target)
