"""Orientation grids: the global search grids, symmetry ranges and local refinement grids.

All angles are in degrees. An Euler array has shape ``(n, 3)`` with columns
``(phi, theta, psi)`` (ZYZ, intrinsic, ``R = Rz(phi) @ Ry(theta) @ Rz(psi)``), ``float64``.
Grids are ordered by viewing direction (theta, then phi) with psi fastest, so that the
orientation index is ``direction_index * n_psi + psi_index`` (conventions.md#search-grids,
docs/architecture.md).
"""

from __future__ import annotations

import math
import re

import numpy as np

from dtm.errors import ConfigError
from dtm.physics.rotations import euler_to_matrix

# Relative tolerance for inclusive/exclusive range ends built from float steps: 180 / 2.5
# must count 73 theta values even when the division lands a hair below an integer.
_RANGE_TOLERANCE = 1e-9

#: (phi_max, theta_max) in degrees per symmetry group family (conventions.md#search-grids);
#: ``n`` is the order for the cyclic and dihedral families. psi always spans [0, 360).
SYMMETRY_RANGES: dict[str, tuple[float, float]] = {
    "C": (360.0, 180.0),  # phi_max divided by n
    "D": (360.0, 90.0),  # phi_max divided by n
    "T": (180.0, 54.7356),
    "O": (90.0, 54.7356),
    "I": (180.0, 31.7),
}

_SYMMETRY_PATTERN = re.compile(r"^\s*([CDTOI])(\d*)\s*$", re.IGNORECASE)


def symmetry_ranges(symmetry: str) -> tuple[float, float]:
    """Angular ranges of the asymmetric unit of a point group.

    Parameters
    ----------
    symmetry
        ``"Cn"`` or ``"Dn"`` (n ≥ 1), ``"T"``, ``"O"`` or ``"I"``; case-insensitive.

    Returns
    -------
    tuple of float
        ``(phi_max, theta_max)`` in degrees; the minima are 0.

    Raises
    ------
    ConfigError
        If the symmetry is not recognised.
    """
    match = _SYMMETRY_PATTERN.match(symmetry) if isinstance(symmetry, str) else None
    if match is None:
        raise ConfigError(
            f"symmetry: {symmetry!r} is not a point group (use Cn, Dn, T, O or I, e.g. C1)"
        )
    family, order_text = match.group(1).upper(), match.group(2)
    phi_max, theta_max = SYMMETRY_RANGES[family]
    if family in "CD":
        if not order_text or int(order_text) < 1:
            raise ConfigError(f"symmetry: {symmetry!r} needs an order n >= 1 (e.g. {family}1)")
        return phi_max / int(order_text), theta_max
    if order_text:
        raise ConfigError(f"symmetry: {symmetry!r} takes no order (use {family})")
    return phi_max, theta_max


def _inclusive_steps(start: float, stop: float, step: float) -> np.ndarray:
    """``start, start + step, ...`` up to and including ``stop`` (within tolerance)."""
    count = math.floor((stop - start) / step * (1 + _RANGE_TOLERANCE) + _RANGE_TOLERANCE) + 1
    return start + step * np.arange(count, dtype=np.float64)


def _psi_values(psi_min: float, psi_max: float, psi_step: float) -> np.ndarray:
    """psi from ``psi_min`` up to but excluding ``psi_max`` in ``psi_step`` (degrees)."""
    count = math.ceil((psi_max - psi_min) / psi_step * (1 - _RANGE_TOLERANCE) - _RANGE_TOLERANCE)
    return psi_min + psi_step * np.arange(max(count, 1), dtype=np.float64)


def _phi_count(phi_range: float, theta_step: float, theta: float) -> int:
    """Number of phi values on the ring at ``theta``: steps of ``theta_step / sin(theta)``."""
    sin_theta = abs(math.sin(math.radians(theta)))
    return max(1, round(phi_range * sin_theta / theta_step))


def _combine_with_psi(directions: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """Every (phi, theta) direction with every psi, psi fastest → Euler array (n, 3)."""
    n_dir, n_psi = len(directions), len(psi)
    euler = np.empty((n_dir * n_psi, 3), dtype=np.float64)
    euler[:, 0] = np.repeat(directions[:, 0], n_psi)
    euler[:, 1] = np.repeat(directions[:, 1], n_psi)
    euler[:, 2] = np.tile(psi, n_dir)
    return euler


def uniform_grid(
    *,
    psi_step: float,
    theta_step: float,
    phi_min: float = 0.0,
    phi_max: float = 360.0,
    theta_min: float = 0.0,
    theta_max: float = 180.0,
    psi_min: float = 0.0,
    psi_max: float = 360.0,
) -> np.ndarray:
    """The "uniform" orientation grid of cisTEM and Leopard-EM (conventions.md#search-grids).

    theta runs from ``theta_min`` to ``theta_max`` inclusive in ``theta_step``; at each theta,
    ``n_phi = max(1, round(phi_range / (theta_step / sin theta)))`` values
    ``phi_min + k * phi_range / n_phi`` (a single phi at the poles); psi runs from ``psi_min``
    up to but excluding ``psi_max`` in ``psi_step``.

    Parameters
    ----------
    psi_step, theta_step
        In-plane and out-of-plane steps, degrees (> 0).
    phi_min, phi_max, theta_min, theta_max, psi_min, psi_max
        Ranges in degrees.

    Returns
    -------
    numpy.ndarray
        Euler angles, shape ``(n_directions * n_psi, 3)``, columns ``(phi, theta, psi)``,
        float64, ordered by theta, then phi, psi fastest.
    """
    _validate(psi_step, theta_step, phi_min, phi_max, theta_min, theta_max, psi_min, psi_max)
    phi_range = phi_max - phi_min
    rows = []
    for theta in _inclusive_steps(theta_min, theta_max, theta_step):
        n_phi = _phi_count(phi_range, theta_step, theta)
        phi = phi_min + phi_range * np.arange(n_phi, dtype=np.float64) / n_phi
        rows.append(np.column_stack([phi, np.full(n_phi, theta)]))
    return _combine_with_psi(np.concatenate(rows), _psi_values(psi_min, psi_max, psi_step))


def healpix_nside(theta_step: float) -> int:
    """Smallest HEALPix ``nside`` whose pixel spacing ``sqrt(4π / (12 nside²))`` ≤ the step."""
    spacing_at_nside_1 = math.sqrt(4.0 * math.pi / 12.0)
    return max(1, math.ceil(spacing_at_nside_1 / math.radians(theta_step) - _RANGE_TOLERANCE))


def healpix_pix2ang(nside: int) -> tuple[np.ndarray, np.ndarray]:
    """Centres of all HEALPix pixels in the RING scheme (Górski et al. 2005, ApJ 622, 759).

    The arithmetic of HEALPix's ``pix2ang_ring`` (the C++ library behind ``healpy``),
    vectorised: importing healpy costs seconds (it imports matplotlib), paid at every start
    of a search. Tested against ``healpy.pix2ang``.

    Returns
    -------
    theta, phi : numpy.ndarray
        ``(12 nside²,)`` colatitude in ``[0, π]`` and longitude in ``[0, 2π)``, radians.
    """
    npix, ncap = 12 * nside * nside, 2 * nside * (nside - 1)
    fact2 = 4.0 / npix
    fact1 = 2 * nside * fact2
    pix = np.arange(npix, dtype=np.int64)
    z, phi, sin_theta = np.empty(npix), np.empty(npix), np.full(npix, np.nan)

    north = pix < ncap
    ring = (1 + _isqrt(1 + 2 * pix[north])) >> 1  # counted from the north pole
    tmp = ring * ring * fact2
    z[north] = 1.0 - tmp
    sin_theta[north] = np.sqrt(tmp * (2.0 - tmp))
    phi[north] = (pix[north] + 1 - 2 * ring * (ring - 1) - 0.5) * (0.5 * np.pi) / ring

    equator = (pix >= ncap) & (pix < npix - ncap)
    ip = pix[equator] - ncap
    row = ip // (4 * nside)
    ring = row + nside
    odd = np.where((ring + nside) & 1, 1.0, 0.5)
    z[equator] = (2 * nside - ring) * fact1
    phi[equator] = (ip - 4 * nside * row + 1 - odd) * np.pi * 0.75 * fact1

    south = pix >= npix - ncap
    ip = npix - pix[south]
    ring = (1 + _isqrt(2 * ip - 1)) >> 1  # counted from the south pole
    tmp = ring * ring * fact2
    z[south] = tmp - 1.0
    sin_theta[south] = np.sqrt(tmp * (2.0 - tmp))
    phi[south] = (4 * ring + 1 - (ip - 2 * ring * (ring - 1)) - 0.5) * (0.5 * np.pi) / ring

    # One θ per ring (4 nside - 1 of them), from libm as in HEALPix: numpy's SIMD arccos
    # (SVML on AVX-512 CPUs) can differ in the last bit, which would make the grid depend
    # on the CPU. Near the poles acos(z) loses precision: HEALPix uses atan2(sin θ, z) there.
    rings, first, inverse = np.unique(z, return_index=True, return_inverse=True)
    ring_theta = [
        math.atan2(sin_theta[i], z_ring) if abs(z_ring) > 0.99 else math.acos(z_ring)
        for z_ring, i in zip(rings.tolist(), first.tolist(), strict=True)
    ]
    return np.array(ring_theta)[inverse], phi


def _isqrt(values: np.ndarray) -> np.ndarray:
    """Exact integer square root of non-negative int64 values."""
    root = np.sqrt(values.astype(np.float64)).astype(np.int64)
    root -= root * root > values
    root += (root + 1) * (root + 1) <= values
    return root


def healpix_grid(
    *,
    psi_step: float,
    theta_step: float,
    phi_min: float = 0.0,
    phi_max: float = 360.0,
    theta_min: float = 0.0,
    theta_max: float = 180.0,
    psi_min: float = 0.0,
    psi_max: float = 360.0,
) -> np.ndarray:
    """Orientation grid whose viewing directions are HEALPix pixel centres (equal area).

    ``nside`` is the smallest whose mean pixel spacing is at most ``theta_step``; directions
    with ``phi_min <= phi < phi_max`` and ``theta_min <= theta <= theta_max`` are kept.

    Parameters
    ----------
    psi_step, theta_step
        In-plane step and the largest allowed direction spacing, degrees (> 0).
    phi_min, phi_max, theta_min, theta_max, psi_min, psi_max
        Ranges in degrees.

    Returns
    -------
    numpy.ndarray
        Euler angles ``(n, 3)`` float64, ordered by theta, then phi, psi fastest.
    """
    _validate(psi_step, theta_step, phi_min, phi_max, theta_min, theta_max, psi_min, psi_max)
    nside = healpix_nside(theta_step)
    theta_rad, phi_rad = healpix_pix2ang(nside)
    theta = np.degrees(theta_rad)
    phi = np.degrees(phi_rad)
    tolerance = _RANGE_TOLERANCE * 360.0
    keep = (
        (phi >= phi_min - tolerance)
        & (phi < phi_max - tolerance)
        & (theta >= theta_min - tolerance)
        & (theta <= theta_max + tolerance)
    )
    theta, phi = theta[keep], phi[keep]
    if theta.size == 0:
        raise ConfigError(
            f"orientation ranges phi [{phi_min}, {phi_max}), theta [{theta_min}, {theta_max}] "
            f"contain no HEALPix direction at nside {nside}"
        )
    order = np.lexsort((phi, theta))
    directions = np.column_stack([phi[order], theta[order]])
    return _combine_with_psi(directions, _psi_values(psi_min, psi_max, psi_step))


def orientation_grid(
    *,
    psi_step: float,
    theta_step: float,
    symmetry: str = "C1",
    phi_min: float | None = None,
    phi_max: float | None = None,
    theta_min: float | None = None,
    theta_max: float | None = None,
    psi_min: float | None = None,
    psi_max: float | None = None,
    base_grid_method: str = "uniform",
) -> np.ndarray:
    """The global search's orientation grid from a configuration's fields.

    Ranges not given explicitly come from ``symmetry`` (phi and theta) or are the full
    circle (psi in [0, 360)); explicit ranges override the symmetry's.

    Parameters
    ----------
    psi_step, theta_step
        Steps in degrees (> 0).
    symmetry
        Point group, see :func:`symmetry_ranges`.
    phi_min, phi_max, theta_min, theta_max, psi_min, psi_max
        Optional explicit ranges, degrees.
    base_grid_method
        ``"uniform"`` (cisTEM / Leopard-EM) or ``"healpix"``.

    Returns
    -------
    numpy.ndarray
        Euler angles ``(n, 3)`` float64, ordered by direction, psi fastest.

    Raises
    ------
    ConfigError
        Unknown symmetry or grid method, non-positive step, or an empty/reversed range.
    """
    sym_phi_max, sym_theta_max = symmetry_ranges(symmetry)
    ranges = {
        "phi_min": 0.0 if phi_min is None else float(phi_min),
        "phi_max": sym_phi_max if phi_max is None else float(phi_max),
        "theta_min": 0.0 if theta_min is None else float(theta_min),
        "theta_max": sym_theta_max if theta_max is None else float(theta_max),
        "psi_min": 0.0 if psi_min is None else float(psi_min),
        "psi_max": 360.0 if psi_max is None else float(psi_max),
    }
    method = base_grid_method.lower() if isinstance(base_grid_method, str) else base_grid_method
    if method == "uniform":
        return uniform_grid(psi_step=psi_step, theta_step=theta_step, **ranges)
    if method == "healpix":
        return healpix_grid(psi_step=psi_step, theta_step=theta_step, **ranges)
    raise ConfigError(
        f"base_grid_method: {base_grid_method!r} is not supported (use 'uniform' or 'healpix')"
    )


def local_grid(
    *,
    theta_step_coarse: float,
    theta_step_fine: float,
    psi_step_coarse: float,
    psi_step_fine: float,
) -> np.ndarray:
    """Rotation offsets covering every rotation within the coarse steps (conventions.md#refinement).

    The viewing direction is tilted by ``theta = 0, tf, 2 tf, ... <= tc`` towards every
    azimuth phi (steps of ``tf / sin theta`` around the full circle, one phi at theta 0),
    combined with in-plane turns ``psi`` in ``[-pc, pc]`` step ``pf`` (symmetric, includes 0):
    ``R_offset = Rz(phi) @ Ry(theta) @ Rz(psi - phi)``, to be applied as
    ``R_new = R_best @ R_offset``.

    Parameters
    ----------
    theta_step_coarse, theta_step_fine
        Out-of-plane coarse range ``tc`` and fine step ``tf``, degrees.
    psi_step_coarse, psi_step_fine
        In-plane coarse range ``pc`` and fine step ``pf``, degrees.

    Returns
    -------
    numpy.ndarray
        Rotation matrices ``(m, 3, 3)`` float64; the identity is the first.

    Raises
    ------
    ConfigError
        A fine step that is not positive, or a coarse range that is negative.
    """
    for name, value in (("theta_step_fine", theta_step_fine), ("psi_step_fine", psi_step_fine)):
        if not value > 0:
            raise ConfigError(f"{name}: must be > 0, got {value}")
    for name, value in (
        ("theta_step_coarse", theta_step_coarse),
        ("psi_step_coarse", psi_step_coarse),
    ):
        if not value >= 0:
            raise ConfigError(f"{name}: must be >= 0, got {value}")
    n_psi_side = math.floor(psi_step_coarse / psi_step_fine * (1 + _RANGE_TOLERANCE))
    # 0 first, so that the identity (theta 0, psi 0) is the grid's first offset.
    psi = psi_step_fine * np.concatenate(
        [[0.0], np.arange(-n_psi_side, 0), np.arange(1, n_psi_side + 1)]
    )
    tilts = []
    for theta in _inclusive_steps(0.0, theta_step_coarse, theta_step_fine):
        n_phi = _phi_count(360.0, theta_step_fine, theta)
        phi = 360.0 * np.arange(n_phi, dtype=np.float64) / n_phi
        tilts.append(np.column_stack([phi, np.full(n_phi, theta)]))
    directions = np.concatenate(tilts)
    euler = _combine_with_psi(directions, psi)
    euler[:, 2] -= euler[:, 0]  # Rz(psi - phi): undo the azimuth so psi is a pure turn
    return np.asarray(euler_to_matrix(euler), dtype=np.float64)


def _validate(
    psi_step: float,
    theta_step: float,
    phi_min: float,
    phi_max: float,
    theta_min: float,
    theta_max: float,
    psi_min: float,
    psi_max: float,
) -> None:
    """Reject non-positive steps and empty, reversed or out-of-bounds ranges."""
    for name, step in (("psi_step", psi_step), ("theta_step", theta_step)):
        if not (isinstance(step, int | float | np.floating) and math.isfinite(step) and step > 0):
            raise ConfigError(f"{name}: must be a positive number of degrees, got {step!r}")
    for name, low, high in (
        ("phi", phi_min, phi_max),
        ("theta", theta_min, theta_max),
        ("psi", psi_min, psi_max),
    ):
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ConfigError(f"{name}_min/{name}_max: must be finite, got {low}, {high}")
        if name == "theta" and not (0.0 <= low <= high <= 180.0):
            raise ConfigError(
                f"theta_min/theta_max: need 0 <= theta_min <= theta_max <= 180, got {low}, {high}"
            )
        if name != "theta" and not low < high:
            raise ConfigError(
                f"{name}_min/{name}_max: need {name}_min < {name}_max, got {low}, {high}"
            )
