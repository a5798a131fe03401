"""Threshold and peak picking on a metric map (conventions.md#threshold, #peaks).

A peak is a position of the picking metric's map (:func:`dtm.search.detection.metric_map`) above
its cut-off, e.g. ``z*``. Peaks are taken strongest
first (ties: lower y, then lower x) and each accepted peak suppresses every weaker position
closer than ``min_distance`` pixels (Euclidean): the greedy non-maximum suppression of
cisTEM and Leopard-EM, over all positions above the cut-off.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.special
from scipy.ndimage import maximum_filter

from dtm.backend import to_numpy
from dtm.errors import ConfigError

__all__ = ["default_min_distance", "pick_peaks", "threshold"]

#: Largest number of (peak, offset) pairs handled at once when suppressing neighbourhoods.
_SUPPRESS_BATCH = 1 << 22


def threshold(n_positions: int, n_correlations: int, false_positives: float = 1.0) -> float:
    """Z-score cut-off for an expected number of false positives per micrograph.

    ``z* = sqrt(2) * erfcinv(2 * FP / (N_pos * N))``: under the Gaussian noise model each of
    the ``N_pos * N`` correlations exceeds ``z*`` with probability ``FP / (N_pos * N)``.

    Parameters
    ----------
    n_positions
        Number of valid positions ``N_pos`` (pixels of the map where the template box lies
        inside the micrograph).
    n_correlations
        Correlations per position ``N`` (orientations × defocus planes).
    false_positives
        Expected false positives per micrograph ``FP``, > 0.

    Returns
    -------
    float
        The cut-off ``z*`` (in standard deviations).
    """
    trials = float(n_positions) * float(n_correlations)
    if not (n_positions > 0 and n_correlations > 0):
        raise ConfigError(
            f"threshold: positions ({n_positions}) and correlations ({n_correlations}) "
            "must be positive"
        )
    if not (0 < false_positives < trials):
        raise ConfigError(
            f"false_positives: must be > 0 and below the number of trials {trials:g}, "
            f"got {false_positives}"
        )
    return float(math.sqrt(2.0) * scipy.special.erfcinv(2.0 * false_positives / trials))


def default_min_distance(template_box: int) -> float:
    """Default minimum distance between peaks, in pixels: ``0.15 × template_box``.

    A template box is usually 1.5–2 × the particle's diameter, so the particle spans about
    0.6 of it and ``0.15 × box`` is about half the particle's radius. That is wide enough to
    remove the secondary maxima that a particle's own correlation peak and its near-miss
    orientations raise around it, yet particles at different heights that overlap in
    projection (common in cells, and found by 2DTM) stay separate peaks down to half a
    radius apart. Leopard-EM's fixed 5 px is far smaller for typical 300–500 px boxes.
    """
    if template_box <= 0:
        raise ConfigError(f"template_box: must be a positive number of pixels, got {template_box}")
    return max(1.0, 0.15 * float(template_box))


def _disk_offsets(min_distance: float) -> np.ndarray:
    """``(k, 2)`` offsets ``(dy, dx)`` with ``dy² + dx² < min_distance²``, and ``(0, 0)``."""
    half = max(math.ceil(min_distance) - 1, 0)
    dy, dx = np.mgrid[-half : half + 1, -half : half + 1]
    squared = dy.astype(np.float64) ** 2 + dx.astype(np.float64) ** 2
    # (0, 0) always: an accepted position leaves the candidates even when nothing is suppressed.
    inside = (squared < min_distance**2) | (squared == 0)
    return np.stack([dy[inside], dx[inside]], axis=1)


def _suppress(key: np.ndarray, ys: np.ndarray, xs: np.ndarray, offsets: np.ndarray) -> None:
    """Set ``key`` to 0 at every pixel within the disk ``offsets`` of each ``(ys, xs)``."""
    ny, nx = key.shape
    batch = max(1, _SUPPRESS_BATCH // len(offsets))
    for start in range(0, len(ys), batch):
        yy = (ys[start : start + batch, None] + offsets[None, :, 0]).ravel()
        xx = (xs[start : start + batch, None] + offsets[None, :, 1]).ravel()
        inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
        key[yy[inside], xx[inside]] = 0


def pick_peaks(
    metric: np.ndarray, cutoff: float, *, min_distance: float, border: int = 0
) -> np.ndarray:
    """Greedy non-maximum suppression of the positions above ``cutoff``.

    Equivalent to: sort the positions above the cut-off by value (descending; ties by y,
    then x), walk the list, accept a position unless an accepted one lies closer than
    ``min_distance``. It runs in rounds instead of a loop over candidates: every position
    that is the strongest remaining one within the square of half-width
    ``ceil(min_distance) - 1`` (which contains its suppression disk) cannot be suppressed by
    anything, so all such positions are accepted at once (one maximum filter) and their
    disks removed; the strongest remaining position is always accepted, so rounds end.

    Parameters
    ----------
    metric
        ``(ny, nx)`` map of the picking metric (numpy or cupy). NaN never passes the cut-off.
    cutoff
        Positions strictly above it are candidates.
    min_distance
        Suppression radius in pixels (>= 0; distances ``< min_distance`` are suppressed).
    border
        Positions within this many pixels of the map's edges are excluded.

    Returns
    -------
    numpy.ndarray
        ``(n, 2)`` int64 ``[y, x]`` of the peaks, strongest first.
    """
    values = to_numpy(metric)
    if values.ndim != 2:
        raise ValueError(f"pick_peaks: expected a 2-D map, got shape {values.shape}")
    if not (min_distance >= 0 and math.isfinite(min_distance)):
        raise ConfigError(f"min_distance: must be >= 0 pixels, got {min_distance}")
    if border < 0:
        raise ConfigError(f"border: must be >= 0 pixels, got {border}")
    ny, nx = values.shape
    inside = np.zeros(values.shape, dtype=bool)
    inside[border : max(ny - border, 0), border : max(nx - border, 0)] = True
    with np.errstate(invalid="ignore"):
        ys, xs = np.nonzero((values > cutoff) & inside)
    if ys.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    # nonzero lists positions in raster order, so a stable sort breaks ties by (y, x).
    order = np.argsort(-values[ys, xs], kind="stable")
    rank_key = np.empty(ys.size, dtype=np.int64)
    rank_key[order] = np.arange(ys.size, 0, -1)  # unique, > 0, larger = picked first
    key = np.zeros(values.shape, dtype=np.int32 if ys.size < 2**31 - 1 else np.int64)
    key[ys, xs] = rank_key

    offsets = _disk_offsets(min_distance)
    size = 2 * max(math.ceil(min_distance) - 1, 0) + 1
    picked_y, picked_x, picked_key = [], [], []
    while True:
        rows = np.flatnonzero(key.any(axis=1))
        if rows.size == 0:
            break
        cols = np.flatnonzero(key[rows[0] : rows[-1] + 1].any(axis=0))
        # Only the bounding box of the remaining candidates matters (zeros outside it).
        top, left = rows[0], cols[0]
        window = key[top : rows[-1] + 1, left : cols[-1] + 1]
        local_max = maximum_filter(window, size=size, mode="constant", cval=0)
        ay, ax = np.nonzero((window == local_max) & (window > 0))
        picked_key.append(window[ay, ax].copy())
        ay, ax = ay + top, ax + left
        picked_y.append(ay)
        picked_x.append(ax)
        _suppress(key, ay, ax, offsets)
    all_keys = np.concatenate(picked_key)
    strongest_first = np.argsort(-all_keys.astype(np.int64), kind="stable")
    peaks = np.stack([np.concatenate(picked_y), np.concatenate(picked_x)], axis=1)
    return peaks[strongest_first].astype(np.int64)
