"""Contrast transfer function on the rfft grid, for many defocus values at once.

Formulae and conventions: ``conventions.md#ctf`` (CTFFIND convention, defocus positive =
underfocus, astigmatism angle from the x axis, counter-clockwise); the optional Zernike
aberrations and anisotropic magnification are Leopard-EM's (:mod:`dtm.physics.aberrations`).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from dtm.errors import ConfigError
from dtm.physics.aberrations import (
    as_mag_matrix,
    as_zernikes,
    transformed_frequencies,
    zernike_phase,
)
from dtm.physics.filters import frequency_grid

# CODATA 2018 exact / recommended values (SI).
_PLANCK = 6.62607015e-34  # J s
_SPEED_OF_LIGHT = 299_792_458.0  # m / s
_ELEMENTARY_CHARGE = 1.602176634e-19  # C
_ELECTRON_MASS = 9.1093837015e-31  # kg
_MM_TO_ANGSTROM = 1e7


def electron_wavelength(voltage_kv: float) -> float:
    """Relativistic electron wavelength.

    Parameters
    ----------
    voltage_kv : float
        Accelerating voltage in kV.

    Returns
    -------
    float
        Wavelength in Å: ``h c / sqrt(e V (2 m0 c² + e V))`` (300 kV -> 0.019687 Å).
    """
    if not voltage_kv > 0:
        raise ConfigError(f"voltage must be > 0 kV, got {voltage_kv}")
    energy = _ELEMENTARY_CHARGE * voltage_kv * 1e3  # J
    rest_energy = _ELECTRON_MASS * _SPEED_OF_LIGHT**2
    wavelength_m = _PLANCK * _SPEED_OF_LIGHT / np.sqrt(energy * (2.0 * rest_energy + energy))
    return float(wavelength_m * 1e10)


def _check_optics(
    pixel_size: float, spherical_aberration: float, amplitude_contrast_ratio: float
) -> None:
    if not pixel_size > 0:
        raise ConfigError(f"pixel_size must be > 0 Å, got {pixel_size}")
    if not spherical_aberration >= 0:
        raise ConfigError(f"spherical_aberration must be >= 0 mm, got {spherical_aberration}")
    if not 0 <= amplitude_contrast_ratio < 1:
        raise ConfigError(
            f"amplitude_contrast_ratio must be in [0, 1), got {amplitude_contrast_ratio}"
        )


def ctf_2d(
    shape: tuple[int, int],
    *,
    pixel_size: float,
    voltage: float,
    spherical_aberration: float,
    amplitude_contrast_ratio: float,
    defocus_u: float,
    defocus_v: float,
    astigmatism_angle: float,
    phase_shift: float = 0.0,
    b_factor: float = 0.0,
    relative_defocus: ArrayLike = (0.0,),
    even_zernikes: Any = None,
    odd_zernikes: Any = None,
    mag_matrix: Any = None,
    xp: ModuleType = np,
) -> Any:
    """CTF on the rfft grid of an ``(ny, nx)`` image for several relative defocus values.

    ``CTF(k) = -sin(chi(k)) * exp(-b_factor * k² / 4)`` with
    ``chi = -pi λ Δf(α) k² + (pi/2) Cs λ³ k⁴ - phase_shift - arcsin(A)`` and
    ``Δf(α) = ½ [du + dv + (du - dv) cos 2(α - astigmatism_angle)]``,
    ``du = defocus_u + δ``, ``dv = defocus_v + δ`` (``conventions.md#ctf``). ``CTF(0) = A``.

    With Leopard-EM's optional terms (``conventions.md#aberrations``): χ, k and α are
    evaluated at the magnified frequency ``k' = (A⁻¹)ᵀ k`` (the B-factor envelope at ``k``,
    as Leopard-EM does), even Zernike terms add to χ, and odd ones multiply the CTF by
    ``exp(i χ_odd)``, which makes it complex. None of them given: the plain CTF, unchanged.

    Parameters
    ----------
    shape : (int, int)
        ``(ny, nx)`` of the real-space image.
    pixel_size : float
        Å per pixel.
    voltage : float
        Accelerating voltage, kV.
    spherical_aberration : float
        Cs, mm.
    amplitude_contrast_ratio : float
        A, in [0, 1).
    defocus_u, defocus_v : float
        Å, positive = underfocus; ``defocus_u`` applies along ``astigmatism_angle``.
    astigmatism_angle : float
        Degrees from the x axis, counter-clockwise.
    phase_shift : float
        Phase-plate phase shift, degrees.
    b_factor : float
        Envelope B-factor, Å².
    relative_defocus : array_like, shape (n_defocus,)
        δ values in Å added to both ``defocus_u`` and ``defocus_v``.
    even_zernikes, odd_zernikes : dict or JSON text, optional
        Zernike coefficients in radians per Å⁻ⁿ (:func:`dtm.physics.aberrations.as_zernikes`).
    mag_matrix : sequence of 4 floats, optional
        Leopard-EM's real-space magnification matrix on ``(y, x)`` vectors.
    xp : module
        Array module of the result.

    Returns
    -------
    array, shape (n_defocus, ny, nx // 2 + 1)
        float32; complex64 when odd Zernike coefficients are given.
    """
    _check_optics(pixel_size, spherical_aberration, amplitude_contrast_ratio)
    even = as_zernikes(even_zernikes, kind="even")
    odd = as_zernikes(odd_zernikes, kind="odd")
    magnification = as_mag_matrix(mag_matrix)
    deltas = np.atleast_1d(np.asarray(relative_defocus, dtype=np.float64))
    if deltas.ndim != 1:
        raise ConfigError(f"relative_defocus must be 1-D, got shape {deltas.shape}")
    wavelength = electron_wavelength(voltage)
    cs = spherical_aberration * _MM_TO_ANGSTROM

    ky, kx = frequency_grid(shape, xp)
    ky = ky / pixel_size
    kx = kx / pixel_size
    envelope = xp.exp(-b_factor * (kx**2 + ky**2) / 4.0)
    ky, kx = transformed_frequencies(ky, kx, magnification)
    k2 = kx**2 + ky**2  # Å⁻²
    direction = xp.arctan2(ky, kx)
    astig = np.deg2rad(astigmatism_angle)
    # chi for the base defocus; each relative defocus δ only adds -pi λ δ k².
    mean_defocus = 0.5 * (defocus_u + defocus_v)
    half_difference = 0.5 * (defocus_u - defocus_v)
    defocus = mean_defocus + half_difference * xp.cos(2.0 * (direction - astig))
    chi_base = (
        -np.pi * wavelength * defocus * k2
        + 0.5 * np.pi * cs * wavelength**3 * k2**2
        - np.deg2rad(phase_shift)
        - np.arcsin(amplitude_contrast_ratio)
        + zernike_phase(even, xp.sqrt(k2), direction, kind="even", xp=xp)
    )
    chi = chi_base[None] - np.pi * wavelength * xp.asarray(deltas)[:, None, None] * k2[None]
    ctf = -xp.sin(chi) * envelope[None]
    if odd is None:
        return ctf.astype(xp.float32)
    odd_phase = zernike_phase(odd, xp.sqrt(k2), direction, kind="odd", xp=xp)
    return (ctf * xp.exp(1j * odd_phase)[None]).astype(xp.complex64)
