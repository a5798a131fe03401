"""Side maxima: peaks that a stronger particle nearby explains (conventions.md#peaks).

Around a particle the search also finds the template at wrong poses, shifted so that part of
it lies on the particle: peaks of their own, often beyond the particle's radius and at
another defocus plane. In the linear model of the search (micrograph = particles + noise,
every correlation ~N(0, 1) in noise) a particle ``i`` of strength ``z_i`` contributes
``z_i · ρ_ij`` to the correlation of the pose and position of peak ``j``, where

    ρ_ij = Σ_u p_i(u) p_j(u − δ) / sqrt(Σ p_i² · Σ p_j²)

is the overlap of the two filtered, normalised projections that the search correlated
(their poses, their defocus planes, ``δ`` the shift between their boxes). Peaks are taken
strongest first; a weaker peak is kept only while what is left of it once the kept,
stronger peaks have been accounted for,

    z_j − Σ_i z_i · ρ_ij,

still passes the threshold — the same test a peak alone in the micrograph passes. A second
particle close to the first (touching it, or above it at another height) keeps its own
signal and stays; a side maximum, whose correlation is the first particle's, goes.

The projections are made exactly as the search made them (the micrograph's whitening, the
CTF at each peak's defocus, the edge-mean and variance normalisation), which needs the
micrograph and the template files (:func:`dtm.programs.search_model.search_model` reads them);
without them nothing is merged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dtm.physics.aberrations import magnified_rotations
from dtm.physics.projection import PreparedTemplate
from dtm.physics.rotations import euler_to_matrix
from dtm.search.kernel import filtered_projections
from dtm.search.prepare import FilterSettings, Optics, projection_filters

__all__ = ["SearchModel", "explained_peaks"]


@dataclass(frozen=True)
class SearchModel:
    """What it takes to remake the search's filtered projections of one micrograph."""

    template: PreparedTemplate
    optics: Optics
    filters: FilterSettings
    profile: tuple[np.ndarray, np.ndarray] | None
    image_shape: tuple[int, int]

    def projections(self, euler: np.ndarray, defocus: np.ndarray) -> np.ndarray:
        """``(n, h, w)`` filtered, normalised projections, each at its own relative
        defocus (Å), as :func:`dtm.search.kernel.filtered_projections` made them."""
        box = (self.template.box_size, self.template.box_size)
        out = np.empty((len(euler), *box), dtype=np.float32)
        for value in np.unique(defocus):
            rows = np.flatnonzero(defocus == value)
            stack = projection_filters(
                box, self.optics, np.array([value]), self.filters, self.profile
            )
            rotations = magnified_rotations(
                euler_to_matrix(np.asarray(euler, dtype=np.float64)[rows]),
                self.optics.slice_transform(),
            )
            out[rows] = filtered_projections(self.template, rotations, stack, self.image_shape)[
                :, 0
            ]
        return out


def _overlap(first: np.ndarray, second: np.ndarray, dy: int, dx: int) -> float:
    """``Σ_u first(u) second(u − δ)`` for boxes of one shape, ``δ = (dy, dx)``."""
    h, w = first.shape
    a = first[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)]
    b = second[max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)]
    return float(np.sum(a.astype(np.float64) * b))


def explained_peaks(
    model: SearchModel,
    strength: np.ndarray,
    positions: np.ndarray,
    euler: np.ndarray,
    defocus: np.ndarray,
    cutoff: float,
) -> np.ndarray:
    """Which peaks, strongest first, stand on their own (see the module docstring).

    Parameters
    ----------
    model
        The micrograph's :class:`SearchModel`.
    strength
        ``(n,)`` each peak's MIP in standard deviations of the background
        (``detection_z``), strongest first.
    positions
        ``(n, 2)`` their map positions ``(y, x)`` (template box top-left), pixels.
    euler, defocus
        ``(n, 3)`` their angles (degrees) and ``(n,)`` relative defocus (Å).
    cutoff
        The threshold that ``strength`` passed.

    Returns
    -------
    numpy.ndarray
        ``(n,)`` bool: True for the peaks kept (always those with no kept, stronger peak
        whose box overlaps theirs).
    """
    n = len(strength)
    keep = np.ones(n, dtype=bool)
    box = model.template.box_size
    positions = np.asarray(positions, dtype=np.int64).reshape(-1, 2)
    # Only peaks whose boxes overlap another's can explain or be explained.
    close = [
        np.flatnonzero(np.all(np.abs(positions[:j] - positions[j]) < box, axis=1)) for j in range(n)
    ]
    involved = sorted({j for j in range(n) if close[j].size} | {int(i) for c in close for i in c})
    if not involved:
        return keep
    index = {peak: row for row, peak in enumerate(involved)}
    stack = model.projections(np.asarray(euler)[involved], np.asarray(defocus)[involved])
    norms = np.sqrt(np.sum(stack.astype(np.float64) ** 2, axis=(1, 2)))
    for j in range(n):
        explainers = [int(i) for i in close[j] if keep[i]]
        if not explainers:
            continue
        explained = 0.0
        for i in explainers:
            dy, dx = (int(v) for v in positions[j] - positions[i])
            shared = _overlap(stack[index[i]], stack[index[j]], dy, dx)
            explained += float(strength[i]) * shared / (norms[index[i]] * norms[index[j]])
        keep[j] = float(strength[j]) - explained > cutoff
    return keep
