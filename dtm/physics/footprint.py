"""The particle's extent: the radius of the template's density (conventions.md#peaks).

Peaks closer than this radius are one particle: its own correlation peak and the near-miss
poses around it. It is also the reach of a particle's side maxima that
:mod:`dtm.search.side_maxima` explains away.
"""

from __future__ import annotations

import math

import numpy as np

from dtm.errors import ConfigError

__all__ = ["template_radius"]

#: Density above this fraction of the template's maximum counts as the particle's.
_DENSITY_FRACTION = 0.05
#: Share of that density (by weight) inside the radius.
_RADIUS_QUANTILE = 0.99
#: Boxes larger than this are averaged in bins first.
_LARGEST_BOX = 128


def template_radius(volume: np.ndarray) -> float:
    """Radius of the template's density about the box centre, in pixels.

    The radius of the sphere centred on ``d // 2`` that holds 99 % (by weight) of the
    density above 5 % of the template's maximum: the particle's own extent, insensitive to
    a few stray voxels and to an empty margin in the box. At least 1, at most half the box.

    Parameters
    ----------
    volume
        ``(d, d, d)`` density, positive where the molecule is; boxes over 128 voxels are
        averaged in bins of ``ceil(d / 128)`` first (the radius is then as coarse).

    Returns
    -------
    float
        Radius in pixels of ``volume``.
    """
    density = np.asarray(volume, dtype=np.float32)
    if density.ndim != 3:
        raise ConfigError(f"template: expected a 3-D volume, got shape {density.shape}")
    scale = math.ceil(max(density.shape) / _LARGEST_BOX)
    if scale > 1:
        n = [size // scale for size in density.shape]
        density = (
            density[: n[0] * scale, : n[1] * scale, : n[2] * scale]
            .reshape(n[0], scale, n[1], scale, n[2], scale)
            .mean(axis=(1, 3, 5))
        )
    top = float(np.nanmax(density))
    if not top > 0:
        raise ConfigError("template: no positive density (is its contrast inverted?)")
    zz, yy, xx = np.nonzero(density > _DENSITY_FRACTION * top)
    weights = density[zz, yy, xx].astype(np.float64)
    centre = np.array([n // 2 for n in density.shape], dtype=np.float64)
    distance = scale * np.linalg.norm(np.stack([zz, yy, xx], axis=1) - centre, axis=1)
    order = np.argsort(distance, kind="stable")
    cumulative = np.cumsum(weights[order])
    index = int(np.searchsorted(cumulative, _RADIUS_QUANTILE * cumulative[-1]))
    radius = float(distance[order][min(index, order.size - 1)])
    return min(max(radius, 1.0), min(volume.shape) / 2.0)
