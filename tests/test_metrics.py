"""The p-value and GEV metrics against direct evaluations of their published formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize
import scipy.special
import scipy.stats

from dtm.errors import ConfigError
from dtm.search.metrics import (
    anisotropic_gaussian,
    gev_cutoff,
    gev_fit,
    probit_transform,
    pvalue_map,
)


def _probit_by_hand(values: np.ndarray) -> np.ndarray:
    """norm.ppf((rank − 0.5) / n), ties ranked in order of appearance."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    ranks = scipy.stats.rankdata(flat, method="ordinal")
    return scipy.stats.norm.ppf((ranks - 0.5) / flat.size)


def _neg_log_p_by_hand(z: np.ndarray, mip: np.ndarray, quadrant: int) -> np.ndarray:
    """IUCrJ 2025 eh5020 written out: probits, moments, closed-form axes, radius, −ln p."""
    x1, x2 = _probit_by_hand(z), _probit_by_hand(mip)
    s11, s22, s12 = np.mean(x1 * x1), np.mean(x2 * x2), np.mean(x1 * x2)
    half_trace, det = (s11 + s22) / 2, s11 * s22 - s12**2
    root = math.sqrt(half_trace**2 - det)
    a, b = math.sqrt(half_trace + root), math.sqrt(half_trace - root)  # major, minor
    w = 0.5 * math.atan2(2 * s12, s11 - s22)  # direction of the major axis
    gamma = math.atan2(1.0, 0.5 * math.sin(2 * w) * (b / a - a / b))
    along = (math.cos(w) * x1 + math.sin(w) * x2) / a
    across = (-math.sin(w) * x1 + math.cos(w) * x2) / b
    p = np.exp(-0.5 * (along**2 + across**2)) * gamma / (2 * math.pi)
    inside = (x1 > 0) & (x2 > 0) if quadrant == 1 else (x1 > 0) | (x2 > 0)
    return np.where(inside, -np.log(p), 0.0).reshape(np.shape(z))


def _correlated_maps(shape=(40, 50), rho=0.8, seed=3) -> tuple[np.ndarray, np.ndarray]:
    """A (mip, scaled_mip) pair of maps drawn from a correlated 2-D Gaussian."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(shape)
    mip = 4.0 + 0.5 * (rho * z + math.sqrt(1 - rho**2) * rng.standard_normal(shape))
    return mip.astype(np.float32), z.astype(np.float32)


def test_probit_is_the_normal_quantile_of_the_rank():
    values = np.array([[3.0, -1.0, 2.5], [0.0, 7.0, -4.0]])
    np.testing.assert_allclose(probit_transform(values), _probit_by_hand(values), atol=1e-12)
    # Hand values: n = 6, the smallest has rank 1: u = 0.5 / 6.
    assert probit_transform(values)[5] == pytest.approx(scipy.stats.norm.ppf(0.5 / 6))
    assert probit_transform(values).shape == (6,)


def test_probit_breaks_ties_by_flat_index_and_leaves_nan_out():
    values = np.array([1.0, 1.0, np.nan, 0.0, 1.0])
    out = probit_transform(values)
    assert np.isnan(out[2])
    # Ranks among the 4 finite values: 0.0 → 1, the 1.0s → 2, 3, 4 in order of index.
    expected = scipy.stats.norm.ppf((np.array([2, 3, 1, 4]) - 0.5) / 4)
    np.testing.assert_allclose(out[[0, 1, 3, 4]], expected, atol=1e-12)
    assert probit_transform(np.array([])).shape == (0,)


def test_anisotropic_gaussian_is_the_eigensystem_of_the_second_moments():
    x1 = np.array([1.0, -2.0, 0.5, 3.0])
    x2 = np.array([0.5, -1.0, 1.5, 2.0])
    values, vectors = anisotropic_gaussian(x1, x2)
    moments = np.array([[np.mean(x1 * x1), np.mean(x1 * x2)], [np.mean(x1 * x2), np.mean(x2 * x2)]])
    # No mean subtraction: ⟨x1²⟩ = (1 + 4 + 0.25 + 9) / 4.
    assert moments[0, 0] == pytest.approx(3.5625)
    np.testing.assert_allclose(moments @ vectors, vectors * values, atol=1e-12)
    np.testing.assert_allclose(sorted(values), np.linalg.eigvalsh(moments), atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=0), 1.0)


@pytest.mark.parametrize("quadrant", [1, 3])
def test_pvalue_map_equals_the_formula_evaluated_by_hand(quadrant):
    mip, z = _correlated_maps()
    out = pvalue_map(mip, z, quadrant=quadrant)
    assert out.shape == mip.shape and out.dtype == np.float64
    np.testing.assert_allclose(out, _neg_log_p_by_hand(z, mip, quadrant), rtol=1e-10, atol=1e-10)
    x1, x2 = _probit_by_hand(z).reshape(z.shape), _probit_by_hand(mip).reshape(z.shape)
    outside = ~((x1 > 0) & (x2 > 0)) if quadrant == 1 else ~((x1 > 0) | (x2 > 0))
    assert np.all(out[outside] == 0.0) and outside.any()
    assert np.all(out[~outside] > 0.0)


def test_pvalue_map_of_a_hand_made_sample():
    # Four points: probits ±0.674, ±0.674 symmetric, perfectly anti-/co-linear by pairs.
    z = np.array([[1.0, 2.0], [3.0, 4.0]])
    mip = np.array([[1.0, 3.0], [2.0, 4.0]])
    q = scipy.stats.norm.ppf([0.125, 0.375, 0.625, 0.875])
    x1 = q[[0, 1, 2, 3]]  # ranks of z in flat order
    x2 = q[[0, 2, 1, 3]]  # ranks of mip in flat order
    s11, s22, s12 = np.mean(x1 * x1), np.mean(x2 * x2), np.mean(x1 * x2)
    assert s11 == pytest.approx(s22)  # equal variances: the major axis is the diagonal
    a, b = math.sqrt(s11 + s12), math.sqrt(s11 - s12)
    w = math.pi / 4
    gamma = math.atan2(1.0, 0.5 * (b / a - a / b))
    r2 = ((x1 + x2) / math.sqrt(2) / a) ** 2 + ((x2 - x1) / math.sqrt(2) / b) ** 2
    expected = 0.5 * r2 - math.log(gamma / (2 * math.pi))
    assert w == pytest.approx(0.5 * math.atan2(2 * s12, s11 - s22))
    out = pvalue_map(mip, z).ravel()
    assert out[3] == pytest.approx(expected[3], rel=1e-12)  # the one pixel with both > 0
    assert out[0] == out[1] == out[2] == 0.0
    assert pvalue_map(mip, z, quadrant=3).ravel()[1] == pytest.approx(expected[1], rel=1e-12)


def test_pvalue_map_matches_leopard_ems_float32_steps():
    """Leopard-EM's order of operations (float32 probit, general eig, column swap, sign
    flip, exp then log) gives the same numbers to float32 precision."""
    mip, z = _correlated_maps(rho=-0.3, seed=7)
    n = z.size

    def probit32(v: np.ndarray) -> np.ndarray:
        ranks = (np.argsort(np.argsort(v.ravel(), kind="stable"), kind="stable") + 1).astype(
            np.float32
        )
        u = (ranks - np.float32(0.5)) / np.float32(n)
        return np.float32(math.sqrt(2)) * scipy.special.erfinv(2 * u - 1)

    x1, x2 = probit32(z), probit32(mip)
    stacked = np.stack([x1, x2])
    values, vectors = np.linalg.eig((stacked @ stacked.T) / n)
    a, b = np.sqrt(values.max()), np.sqrt(values.min())
    if values[0] <= values[1]:
        vectors = vectors[:, [1, 0]]
    if vectors[1, 0] < 0 and vectors[0, 0] < 0:
        vectors[:, 0] *= -1
    w = np.arctan2(vectors[1, 0], vectors[0, 0])
    gamma = np.arctan2(1.0, 0.5 * np.sin(2 * w) * (b / a - a / b))
    y0 = (np.cos(w) * x1 + np.sin(w) * x2) / a
    y1 = (-np.sin(w) * x1 + np.cos(w) * x2) / b
    p = np.ones_like(x1)
    mask = (x1 > 0) & (x2 > 0)
    p[mask] = np.exp(-0.5 * (y0**2 + y1**2)[mask]) * gamma / (2 * np.pi)
    leopard = -np.log(p)
    np.testing.assert_allclose(pvalue_map(mip, z).ravel(), leopard, rtol=2e-5, atol=2e-5)


def test_pvalue_map_stays_finite_for_a_strong_particle_and_leaves_nan_out():
    mip, z = _correlated_maps()
    mip[5, 5], z[5, 5] = 40.0, 30.0
    mip[0, 0] = np.nan
    out = pvalue_map(mip, z)
    assert np.isnan(out[0, 0]) and np.isfinite(out).sum() == out.size - 1
    assert out[5, 5] == np.nanmax(out)
    # The NaN pixel is simply absent: the other pixels score as on the smaller sample.
    keep = ~np.isnan(mip.ravel())
    expected = _neg_log_p_by_hand(z.ravel()[keep], mip.ravel()[keep], 1)
    np.testing.assert_allclose(out.ravel()[keep], expected, rtol=1e-10, atol=1e-10)


def test_pvalue_map_refuses_bad_arguments():
    mip, z = _correlated_maps()
    with pytest.raises(ConfigError, match="^quadrant: must be 1 or 3"):
        pvalue_map(mip, z, quadrant=2)
    with pytest.raises(ConfigError, match="^scaled_mip: shape"):
        pvalue_map(mip, z[:-1])
    with pytest.raises(ConfigError, match="^x2: expected"):
        anisotropic_gaussian(np.ones(3), np.ones(4))


def _gaussian_maxima(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` maxima of ``k`` independent N(0, 1) values each (inverse of Φᵏ)."""
    return scipy.stats.norm.ppf(rng.random(n) ** (1.0 / k))


def test_gev_cutoff_is_the_isf_of_the_fit_and_calibrated_on_fresh_samples():
    rng = np.random.default_rng(11)
    k = 2000  # correlations per pixel
    zscore = _gaussian_maxima(200_000, k, rng).reshape(400, 500)
    c, loc, scale = gev_fit(zscore, max_value=None, num_samples=None)
    false_positives = 100.0
    cutoff = gev_cutoff(zscore, false_positives=false_positives, max_value=None, num_samples=None)
    expected = scipy.stats.genextreme(c, loc=loc, scale=scale).isf(false_positives / zscore.size)
    assert cutoff == pytest.approx(expected, rel=1e-12)
    # The exact tail of a maximum of k Gaussians is P(max > t) = 1 − Φ(t)ᵏ; a GEV fitted
    # to the bulk extrapolates it to within 0.05 in z here (measured: 4.974 against 5.026),
    # which is 31 % more false positives than asked for at this rate.
    exact = scipy.optimize.brentq(
        lambda t: (1 - scipy.stats.norm.cdf(t) ** k) * zscore.size - false_positives, 3, 8
    )
    assert cutoff == pytest.approx(exact, abs=0.1)
    fresh = _gaussian_maxima(2_000_000, k, rng)
    per_map = np.count_nonzero(fresh > cutoff) * zscore.size / fresh.size
    assert per_map == pytest.approx(false_positives, rel=0.4)


def test_gev_fit_range_subset_and_seed():
    rng = np.random.default_rng(5)
    zscore = _gaussian_maxima(50_000, 500, rng)
    zscore[:10] = 12.0  # "particles" above max_value are left out of the fit
    with_particles = gev_fit(zscore, max_value=8.5, num_samples=None)
    without = gev_fit(zscore[10:], max_value=None, num_samples=None)
    assert with_particles == pytest.approx(without, rel=1e-6)
    one = gev_fit(zscore, num_samples=5_000, seed=1)
    assert gev_fit(zscore, num_samples=5_000, seed=1) == one
    other = gev_fit(zscore, num_samples=5_000, seed=2)
    assert other != one
    assert other == pytest.approx(one, abs=0.1)
    # Leopard-EM's definition of the subset: num_samples of the values within the range.
    chosen = np.random.default_rng(1).choice(zscore[zscore <= 8.5], 5_000, replace=False)
    assert one == pytest.approx(scipy.stats.genextreme.fit(chosen), rel=1e-9)


def test_gev_refuses_bad_arguments():
    zscore = _gaussian_maxima(1000, 100, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="^num_samples: "):
        gev_fit(zscore, num_samples=0)
    with pytest.raises(ConfigError, match="^max_value: must be >= min_value"):
        gev_fit(zscore, min_value=5.0, max_value=4.0)
    with pytest.raises(ConfigError, match="^max_value: only 0"):
        gev_fit(zscore, min_value=20.0, max_value=30.0)
    with pytest.raises(ConfigError, match="^false_positives: "):
        gev_cutoff(zscore, false_positives=0.0)
    with pytest.raises(ConfigError, match="^zscore: no values"):
        gev_fit(np.full(4, np.nan))
