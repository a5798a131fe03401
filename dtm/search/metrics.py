"""Detection metrics of Leopard-EM 1.3: the anisotropic-Gaussian p-value and the GEV cut-off.

Both turn the statistics maps of a search into a per-pixel score or a threshold; they are
pure numpy/scipy functions of the maps, independent of how the maps were computed.

- :func:`pvalue_map`: ``−ln p`` from a 2-D Gaussian fitted to the probit-transformed
  ``(scaled_mip, mip)`` pairs of a micrograph, evaluated in the quadrant(s) where both (or
  either) are high. The metric is that of the 2DTM post-processing paper (IUCrJ 2025,
  https://journals.iucr.org/m/issues/2025/02/00/eh5020/, "eh5020") as implemented by
  Leopard-EM's ``leopard_em.analysis.pvalue_metric`` (``probit_transform_torch``,
  ``estimate_anisotropic_gaussian``, ``anisotropic_pvalue``); written here from the
  published formulas, with the same axis conventions, and tested against direct
  evaluations of them.
- :func:`gev_fit` and :func:`gev_cutoff`: a generalised extreme value distribution fitted
  to the z-score (scaled MIP) values, and the z-score above which ``false_positives``
  pixels of the map are expected, as Leopard-EM's ``leopard_em.analysis.gev_fit_metric``
  (``fit_gev_to_zscore``, ``gev_zscore_cutoff``) defines them.

Differences from Leopard-EM, all documented at the functions: every computation is in
float64 (Leopard-EM's probit is float32), ``−ln p`` is evaluated analytically (so it stays
finite where Leopard-EM's float32 ``exp`` underflows to ``p = 0`` and gives ``inf``), ties
are ranked by a stable sort, NaN pixels are excluded, and the GEV subsample is seeded.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.special
import scipy.stats

from dtm.errors import ConfigError

__all__ = [
    "anisotropic_gaussian",
    "gev_cutoff",
    "gev_fit",
    "probit_transform",
    "pvalue_map",
]

#: Smallest axis length of the fitted Gaussian (Leopard-EM clamps both axes at 1e-12).
_MIN_AXIS = 1e-12


def probit_transform(values: np.ndarray) -> np.ndarray:
    """Rank-based probit transform of the flattened array.

    Each value is replaced by the standard-normal quantile of its empirical rank:
    ranks ``1 … n`` in ascending order, ``u = (rank − 0.5) / n``, result
    ``√2 · erfinv(2u − 1)`` (= ``scipy.stats.norm.ppf(u)``). This is Leopard-EM's
    ``probit_transform_torch`` (``leopard_em.analysis.pvalue_metric``; IUCrJ 2025 eh5020).

    Parameters
    ----------
    values : numpy.ndarray
        Any shape; flattened in C order.

    Returns
    -------
    numpy.ndarray
        1-D float64 of ``values.size``, in the order of the flattened input.

    Notes
    -----
    Ties are broken deterministically: equal values get consecutive ranks in the order of
    their flat index (a stable sort), so the result never depends on the sorting algorithm
    (Leopard-EM's ``torch.argsort`` leaves the order of ties unspecified). NaN values are
    excluded from the ranking (``n`` counts the other values) and returned as NaN; ``±inf``
    are ranked like any value.
    """
    flat = np.asarray(values).ravel()
    if flat.dtype.kind not in "biuf":
        raise ConfigError(f"values: expected real numbers (got dtype {flat.dtype})")
    flat = flat.astype(np.float64, copy=False)
    valid = ~np.isnan(flat)
    out = np.full(flat.shape, np.nan)
    kept = flat[valid]
    n = kept.size
    if n == 0:
        return out
    order = np.argsort(kept, kind="stable")
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.arange(1, n + 1, dtype=np.float64)
    u = (ranks - 0.5) / n
    out[valid] = math.sqrt(2.0) * scipy.special.erfinv(2.0 * u - 1.0)
    return out


def anisotropic_gaussian(x1: np.ndarray, x2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of the second-moment matrix ``⟨x xᵀ⟩`` of ``x = (x1, x2)``.

    ``C = [[⟨x1²⟩, ⟨x1 x2⟩], [⟨x1 x2⟩, ⟨x2²⟩]]`` with means over the samples and no mean
    subtraction (the probit-transformed values are centred by construction), as
    Leopard-EM's ``estimate_anisotropic_gaussian`` (IUCrJ 2025 eh5020).

    Parameters
    ----------
    x1, x2 : numpy.ndarray
        Samples of the two variables, the same number of them (flattened).

    Returns
    -------
    eigenvalues : numpy.ndarray
        ``(2,)`` float64, ascending (``numpy.linalg.eigh``); Leopard-EM's ``torch.linalg.eig``
        leaves the order unspecified, which :func:`pvalue_map` does not depend on.
    eigenvectors : numpy.ndarray
        ``(2, 2)`` float64, column ``i`` the unit eigenvector of ``eigenvalues[i]``.
    """
    a = np.asarray(x1, dtype=np.float64).ravel()
    b = np.asarray(x2, dtype=np.float64).ravel()
    if a.size != b.size:
        raise ConfigError(f"x2: expected {a.size} values like x1 (got {b.size})")
    if a.size == 0:
        raise ConfigError("x1: no samples")
    stacked = np.stack([a, b])
    moments = (stacked @ stacked.T) / a.size
    eigenvalues, eigenvectors = np.linalg.eigh(moments)
    return eigenvalues, eigenvectors


def _major_axis_angle(eigenvalues: np.ndarray, eigenvectors: np.ndarray) -> float:
    """Angle ``w`` of the major axis, with Leopard-EM's column order and orientation rule.

    The major axis is the eigenvector of the larger eigenvalue (on equal eigenvalues the
    second column, as Leopard-EM swaps the columns when ``λ0 <= λ1``); it is negated when
    both its components are negative; ``w = atan2(v_y, v_x)``. The p-value does not depend
    on the eigenvectors' signs (only ``x0²``, ``x1r²`` and ``sin 2w`` enter it).
    """
    vectors = eigenvectors.copy()
    if eigenvalues[0] <= eigenvalues[1]:
        vectors = vectors[:, [1, 0]]
    if vectors[1, 0] < 0 and vectors[0, 0] < 0:
        vectors[:, 0] *= -1
    return math.atan2(vectors[1, 0], vectors[0, 0])


def _neg_log_pvalue(
    x1: np.ndarray,
    x2: np.ndarray,
    eigenvalues: np.ndarray,
    eigenvectors: np.ndarray,
    quadrant: int,
) -> np.ndarray:
    """``−ln p`` of Leopard-EM's ``anisotropic_pvalue`` (analytic, float64)."""
    major = math.sqrt(max(float(np.max(eigenvalues)), 0.0))
    minor = math.sqrt(max(float(np.min(eigenvalues)), 0.0))
    w = _major_axis_angle(eigenvalues, eigenvectors)
    a, b = max(major, _MIN_AXIS), max(minor, _MIN_AXIS)
    # The correction for the part of the ellipse's probability mass inside the quadrant.
    gamma = math.atan2(1.0, 0.5 * math.sin(2 * w) * (b / a - a / b))
    cos_w, sin_w = math.cos(w), math.sin(w)
    along = (cos_w * x1 + sin_w * x2) / a
    across = (-sin_w * x1 + cos_w * x2) / b
    r2 = along**2 + across**2
    inside = (x1 > 0) & (x2 > 0) if quadrant == 1 else (x1 > 0) | (x2 > 0)
    # −ln(exp(−r²/2) · γ / 2π), without the exponential's underflow; p = 1 outside.
    return np.where(inside, 0.5 * r2 - math.log(gamma / (2 * math.pi)), 0.0)


def pvalue_map(mip: np.ndarray, scaled_mip: np.ndarray, *, quadrant: int = 1) -> np.ndarray:
    """``−ln p`` of every pixel under the anisotropic-Gaussian model of IUCrJ 2025 eh5020.

    Both maps are probit-transformed (:func:`probit_transform`: ``x1`` of ``scaled_mip``,
    ``x2`` of ``mip``), a centred 2-D Gaussian is fitted by the second moments
    (:func:`anisotropic_gaussian`), and each pixel gets ``p = exp(−r²/2) · γ / 2π`` where
    ``r`` is its distance in the Gaussian's rotated, scaled frame: along the major axis
    (angle ``w``, standard deviation ``a = √λmax``) ``x0 = cos w·x1 + sin w·x2``, across
    it (``b = √λmin``) ``x1r = −sin w·x1 + cos w·x2``, ``r² = (x0/a)² + (x1r/b)²``, and
    ``γ = atan2(1, ½ sin 2w · (b/a − a/b))`` corrects for the quadrant. Pixels outside the
    quadrant get ``p = 1`` (``−ln p = 0``). This is Leopard-EM's
    ``anisotropic_pvalue(probit(scaled_mip), probit(mip), …)``
    (``leopard_em.analysis.pvalue_metric``), with its axis order, orientation flip and
    γ, and gives its numbers to its float32 precision.

    Parameters
    ----------
    mip, scaled_mip : numpy.ndarray
        The MIP and scaled MIP (z-score) maps of one micrograph, the same shape.
    quadrant : {1, 3}
        1: only pixels where both probits are positive may score (Leopard-EM's default);
        3: pixels where either is positive.

    Returns
    -------
    numpy.ndarray
        float64 map of ``−ln p``, the shape of the inputs; larger is more significant.

    Notes
    -----
    Pixels where either map is NaN are left out of the ranking and of the fit, and are NaN
    in the result. ``−ln p`` is computed as ``r²/2 − ln(γ/2π)``, so it stays finite where
    Leopard-EM's float32 ``exp(−r²/2)`` underflows (``−ln p`` above about 103) and it
    returns ``inf``.
    """
    if quadrant not in (1, 3):
        raise ConfigError(f"quadrant: must be 1 or 3 (got {quadrant!r})")
    mip = np.asarray(mip)
    scaled = np.asarray(scaled_mip)
    if mip.shape != scaled.shape:
        raise ConfigError(f"scaled_mip: shape {scaled.shape} differs from the mip's {mip.shape}")
    flat_mip = mip.astype(np.float64, copy=False).ravel()
    flat_z = scaled.astype(np.float64, copy=False).ravel()
    valid = ~(np.isnan(flat_mip) | np.isnan(flat_z))
    out = np.full(flat_mip.shape, np.nan)
    if not valid.any():
        return out.reshape(mip.shape)
    x1 = probit_transform(flat_z[valid])
    x2 = probit_transform(flat_mip[valid])
    eigenvalues, eigenvectors = anisotropic_gaussian(x1, x2)
    out[valid] = _neg_log_pvalue(x1, x2, eigenvalues, eigenvectors, quadrant)
    return out.reshape(mip.shape)


def _fit_sample(
    zscore: np.ndarray,
    min_value: float | None,
    max_value: float | None,
    num_samples: int | None,
    seed: int,
) -> np.ndarray:
    """The values a GEV is fitted to: within ``[min_value, max_value]``, subsampled."""
    values = np.asarray(zscore, dtype=np.float64).ravel()
    values = values[~np.isnan(values)]
    if values.size == 0:
        raise ConfigError("zscore: no values to fit (empty or all NaN)")
    if num_samples is not None and num_samples < 1:
        raise ConfigError(f"num_samples: must be >= 1 or None (got {num_samples})")
    low = float(values.min()) if min_value is None else float(min_value)
    high = float(values.max()) if max_value is None else float(max_value)
    if not low <= high:
        raise ConfigError(f"max_value: must be >= min_value ({low:g}) (got {high:g})")
    data = values[(values >= low) & (values <= high)]
    if data.size < 3:
        raise ConfigError(
            f"max_value: only {data.size} z-score value(s) within [{low:g}, {high:g}]; "
            "widen min_value/max_value"
        )
    if num_samples is not None and data.size > num_samples:
        data = np.random.default_rng(seed).choice(data, num_samples, replace=False)
    return data


def gev_fit(
    zscore: np.ndarray,
    *,
    min_value: float | None = None,
    max_value: float | None = 8.5,
    num_samples: int | None = 1_000_000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Fit a generalised extreme value distribution to the z-score values of a map.

    ``scipy.stats.genextreme.fit`` on the values within ``[min_value, max_value]``, as
    Leopard-EM's ``fit_gev_to_zscore`` (``leopard_em.analysis.gev_fit_metric``): the upper
    bound (8.5 by default, suited to a full 1.5°/2.5° search) keeps true particles out of
    the fit of the noise.

    Parameters
    ----------
    zscore : numpy.ndarray
        The scaled MIP (any shape; NaN values are ignored).
    min_value, max_value : float or None
        Values outside are left out; ``None``: the map's minimum / maximum.
    num_samples : int or None
        Fit a random subset of this many values when more are in range (fitting 10⁶
        values takes seconds to minutes); ``None``: all of them.
    seed : int
        Seed of the subset. Leopard-EM draws it with the unseeded ``np.random.choice``;
        dtm is deterministic: the same map and seed give the same fit.

    Returns
    -------
    tuple of float
        ``(c, loc, scale)``: the shape (scipy's sign convention) and the location and scale,
        for ``scipy.stats.genextreme(c, loc=loc, scale=scale)``.
    """
    data = _fit_sample(zscore, min_value, max_value, num_samples, seed)
    c, loc, scale = scipy.stats.genextreme.fit(data)
    return float(c), float(loc), float(scale)


def gev_cutoff(
    zscore: np.ndarray,
    *,
    false_positives: float = 1.0,
    min_value: float | None = None,
    max_value: float | None = 8.5,
    num_samples: int | None = 1_000_000,
    seed: int = 0,
) -> float:
    """The z-score above which ``false_positives`` pixels are expected under the fitted GEV.

    ``genextreme(c, loc, scale).isf(false_positives / n)`` with ``(c, loc, scale)`` from
    :func:`gev_fit` and ``n`` the number of pixels of the map: Leopard-EM's
    ``gev_zscore_cutoff`` (``leopard_em.analysis.gev_fit_metric``).

    Parameters
    ----------
    zscore : numpy.ndarray
        The scaled MIP of one micrograph.
    false_positives : float
        Expected false positives over the whole map, ``0 < false_positives < n``.
    min_value, max_value, num_samples, seed
        As :func:`gev_fit`.

    Returns
    -------
    float
        The cut-off.

    Notes
    -----
    NaN pixels are ignored and not counted in ``n`` (Leopard-EM counts every pixel; the
    two agree on maps without NaN).
    """
    values = np.asarray(zscore)
    n = int(np.count_nonzero(~np.isnan(values.astype(np.float64, copy=False))))
    if not (math.isfinite(false_positives) and 0 < false_positives < max(n, 1)):
        raise ConfigError(
            f"false_positives: must be > 0 and < the number of pixels ({n}) "
            f"(got {false_positives!r})"
        )
    c, loc, scale = gev_fit(
        values, min_value=min_value, max_value=max_value, num_samples=num_samples, seed=seed
    )
    return float(scipy.stats.genextreme(c, loc=loc, scale=scale).isf(false_positives / n))
