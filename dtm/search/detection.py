"""The detection statistic and the picking metrics.

The scaled MIP divides by each position's own mean and standard deviation over the search.
At a particle those include the particle's correlations with every neighbouring orientation,
so its variance grows with the particle's strength and the scaled MIP saturates: strong
particles fall under the threshold (conventions.md#detection). The detection statistic
measures the MIP instead against the correlations of the *background around* the position:

    detection_z = (mip − background_mean) / sqrt(background_variance)

with the pooled mean and variance of every correlation at the positions within a few
template boxes that are not near a detection (:func:`background_statistics`). When whitening
makes the correlations N(0, 1), as it should, this is the raw MIP; the background
statistics check that from the maps themselves and correct what is off (a local change of
ice, an imperfect whitening). In noise it is as calibrated as the MIP (the same threshold
z*); at a particle it does not saturate.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import scipy.ndimage

from dtm.errors import ConfigError
from dtm.search.metrics import pvalue_map

__all__ = [
    "BACKGROUND_BOXES",
    "background_statistics",
    "detection_z",
    "metric_map",
]

#: Width of the background window, in template boxes: local enough to follow gradients of
#: ice thickness, wide enough that a few particles leave most of it as background.
BACKGROUND_BOXES = 5
#: Masking rounds: each masks the positions near what the previous estimate finds.
_ROUNDS = 3
#: Windows with less background than this share of their positions use the whole map's.
_MIN_BACKGROUND = 0.05


def _local_average(values: np.ndarray, weights: np.ndarray, window: tuple[int, int]) -> np.ndarray:
    """Weighted average of ``values`` over a ``window`` centred on every position (windows
    cut by the map's edge average what they hold); NaN where the weights are too few."""
    total = scipy.ndimage.uniform_filter(values * weights, window, mode="constant")
    count = scipy.ndimage.uniform_filter(weights, window, mode="constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        average = total / count
    average[~(count >= _MIN_BACKGROUND)] = np.nan
    return average


def background_statistics(
    correlation_mean: np.ndarray,
    correlation_variance: np.ndarray,
    box: tuple[int, int],
    background: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of all the correlations of the background around every position.

    The pooled moments of the correlations at the background positions within a window of
    :data:`BACKGROUND_BOXES` template boxes: ``mean = <correlation_mean>``,
    ``variance = <correlation_variance + correlation_mean²> − mean²`` — the variance of the
    correlations themselves, not the average of the per-position variances (which leaves
    out how much the per-position means scatter; in noise it is ~15 % lower).

    Parameters
    ----------
    correlation_mean, correlation_variance
        ``(ny, nx)`` maps of the search region.
    box
        ``(h, w)`` of the template box, pixels of the map.
    background
        ``(ny, nx)`` bool, the positions to pool (default: every finite one). Where a
        window holds too little background, the pooled moments of the whole map's
        background are used.

    Returns
    -------
    tuple of numpy.ndarray
        ``(mean, variance)``, float64 ``(ny, nx)``.
    """
    mean = np.asarray(correlation_mean, dtype=np.float64)
    second = np.asarray(correlation_variance, dtype=np.float64) + mean**2
    if mean.shape != second.shape or mean.ndim != 2:
        raise ValueError(
            f"background_statistics: maps of {mean.shape} and {np.shape(correlation_variance)}"
        )
    usable = np.isfinite(mean) & np.isfinite(second)
    weights = (usable if background is None else usable & background).astype(np.float64)
    if not weights.any():
        weights = usable.astype(np.float64)
    mean, second = np.where(usable, mean, 0.0), np.where(usable, second, 0.0)
    # A window as wide as the map averages the whole of it from every position.
    # Odd widths: centred on the position itself.
    widths = [BACKGROUND_BOXES * int(b) | 1 for b in box]
    window = (
        widths[0] if widths[0] < mean.shape[0] else 2 * mean.shape[0] + 1,
        widths[1] if widths[1] < mean.shape[1] else 2 * mean.shape[1] + 1,
    )
    level = _local_average(mean, weights, window)
    pooled = _local_average(second, weights, window)
    n = weights.sum()
    if n:
        whole_mean = float((mean * weights).sum() / n)
        whole_second = float((second * weights).sum() / n)
        level[np.isnan(level)] = whole_mean
        pooled[np.isnan(pooled)] = whole_second
    return level, pooled - level**2


def detection_z(
    mip: np.ndarray,
    correlation_mean: np.ndarray,
    correlation_variance: np.ndarray,
    box: tuple[int, int],
    cutoff: float,
) -> np.ndarray:
    """The MIP in standard deviations of the background's correlations, float32 ``(ny, nx)``.

    ``(mip − mean) / sqrt(variance)`` with :func:`background_statistics` pooled over the
    positions farther than one template box from any position above ``cutoff``: the
    estimate is made on every position, then again without the neighbourhoods of what it
    finds (up to three rounds), so that the particles' own correlations do not inflate it.

    Parameters
    ----------
    mip, correlation_mean, correlation_variance
        ``(ny, nx)`` maps of the search region.
    box
        ``(h, w)`` of the template box, pixels of the map.
    cutoff
        The detection threshold: positions above it are not background.

    Returns
    -------
    numpy.ndarray
        float32; NaN where the MIP is not finite or the background variance not positive.
    """
    peak = np.asarray(mip, dtype=np.float64)
    reach = float(max(box))
    background = None
    for _ in range(_ROUNDS):
        level, variance = background_statistics(
            correlation_mean, correlation_variance, box, background
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            z = (peak - level) / np.sqrt(variance)
        z[~(variance > 0)] = np.nan
        with np.errstate(invalid="ignore"):
            found = z > cutoff
        if not found.any():
            break
        nearby = scipy.ndimage.distance_transform_edt(~found) < reach
        if background is not None and np.array_equal(~nearby, background):
            break
        background = ~nearby
    return z.astype(np.float32)


def metric_map(
    maps: Mapping[str, np.ndarray], metric: str, box: tuple[int, int], cutoff: float
) -> np.ndarray:
    """The map that picking thresholds and suppresses, for one of ``PeaksConfig.metric``.

    Parameters
    ----------
    maps
        ``mip``, ``scaled_mip``, ``correlation_mean``, ``correlation_variance`` of the search
        region, ``(ny, nx)`` each.
    metric
        ``detection_z``, ``scaled_mip``, ``mip``, ``pvalue`` (−ln p,
        :func:`dtm.search.metrics.pvalue_map`) or ``gev`` (the scaled MIP; the GEV sets only the
        cut-off).
    box
        ``(h, w)`` of the template box.
    cutoff
        The threshold of ``detection_z`` (what :func:`detection_z` masks).
    """
    if metric == "detection_z":
        return detection_z(
            maps["mip"], maps["correlation_mean"], maps["correlation_variance"], box, cutoff
        )
    if metric in ("scaled_mip", "gev"):
        return np.asarray(maps["scaled_mip"])
    if metric == "mip":
        return np.asarray(maps["mip"])
    if metric == "pvalue":
        return pvalue_map(np.asarray(maps["mip"]), np.asarray(maps["scaled_mip"]))
    raise ConfigError(f"peaks.metric: unknown metric {metric!r}")
