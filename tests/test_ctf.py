"""CTF and electron wavelength against independent references (conventions.md#ctf)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from scipy.optimize import brentq

from dtm.errors import ConfigError
from dtm.physics import ctf_2d, electron_wavelength, frequency_grid

OPTICS: dict[str, Any] = {
    "pixel_size": 1.0,
    "voltage": 300.0,
    "spherical_aberration": 2.7,
    "amplitude_contrast_ratio": 0.07,
    "defocus_u": 12000.0,
    "defocus_v": 12000.0,
    "astigmatism_angle": 0.0,
}
# Textbook approximation lambda = 12.26426 / sqrt(V (1 + 0.978476e-6 V)) Å (V in volts),
# independent of the module's constants and accurate to ~1e-8 relative.
WAVELENGTH_300KV = 12.2642598 / np.sqrt(300e3 * (1 + 0.97847573e-6 * 300e3))


@pytest.mark.parametrize(
    ("kilovolts", "angstrom"), [(100.0, 0.037014), (200.0, 0.025079), (300.0, 0.019687)]
)
def test_electron_wavelength_tabulated(kilovolts: float, angstrom: float) -> None:
    assert electron_wavelength(kilovolts) == pytest.approx(angstrom, abs=1e-6)


def test_frequency_grid_is_the_rfft_grid() -> None:
    ky, kx = frequency_grid((6, 9))
    assert ky.shape == (6, 1) and kx.shape == (1, 5)
    np.testing.assert_allclose(ky[:, 0], [0, 1 / 6, 2 / 6, -3 / 6, -2 / 6, -1 / 6])
    np.testing.assert_allclose(kx[0], np.arange(5) / 9)


def test_shape_dtype_and_zero_frequency_equals_amplitude_contrast() -> None:
    ctf = ctf_2d((30, 41), **OPTICS, relative_defocus=[-200.0, 0.0, 200.0])
    assert ctf.shape == (3, 30, 21)
    assert ctf.dtype == np.float32
    np.testing.assert_allclose(ctf[:, 0, 0], 0.07, rtol=1e-6)
    assert np.all(np.abs(ctf) <= 1.0)


def test_phase_shift_moves_zero_frequency_value() -> None:
    ctf = ctf_2d((16, 16), **{**OPTICS, "phase_shift": 90.0})
    # CTF(0) = -sin(-pi/2 - arcsin A) = cos(arcsin A) = sqrt(1 - A²)
    assert ctf[0, 0, 0] == pytest.approx(np.sqrt(1 - 0.07**2), rel=1e-6)


def _sign_change_positions(k: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Zero crossings of sampled values, located by linear interpolation."""
    idx = np.nonzero(np.sign(values[:-1]) * np.sign(values[1:]) < 0)[0]
    t = values[idx] / (values[idx] - values[idx + 1])
    return k[idx] + t * (k[idx + 1] - k[idx])


def test_zeros_without_spherical_aberration_are_analytic() -> None:
    nx, pixel_size, defocus, amplitude = 4096, 1.0, 15000.0, 0.1
    optics = {
        **OPTICS,
        "spherical_aberration": 0.0,
        "amplitude_contrast_ratio": amplitude,
        "defocus_u": defocus,
        "defocus_v": defocus,
    }
    ctf = ctf_2d((8, nx), **optics)[0, 0].astype(np.float64)  # ky = 0 row
    k = np.arange(nx // 2 + 1) / nx / pixel_size
    found = _sign_change_positions(k, ctf)
    # chi = -pi λ Δf k² - arcsin A = -n pi  =>  k_n = sqrt((n - arcsin(A)/pi) / (λ Δf))
    n = np.arange(1, len(found) + 1)
    expected = np.sqrt((n - np.arcsin(amplitude) / np.pi) / (WAVELENGTH_300KV * defocus))
    assert len(found) > 20
    np.testing.assert_allclose(found, expected, atol=0.05 / nx)


def test_zeros_with_spherical_aberration_match_root_finding() -> None:
    nx, pixel_size, defocus = 2048, 0.8, 8000.0
    cs_angstrom, amplitude, lam = 2.7e7, 0.07, WAVELENGTH_300KV
    optics = {**OPTICS, "pixel_size": pixel_size, "defocus_u": defocus, "defocus_v": defocus}
    ctf = ctf_2d((4, nx), **optics)[0, 0].astype(np.float64)
    k = np.arange(nx // 2 + 1) / nx / pixel_size
    found = _sign_change_positions(k, ctf)

    def chi(kk: float) -> float:
        return -np.pi * lam * defocus * kk**2 + 0.5 * np.pi * cs_angstrom * lam**3 * kk**4

    # Zeros where chi - arcsin(A) is a multiple of pi; chi is monotonic below its minimum.
    k_turn = np.sqrt(defocus / (cs_angstrom * lam**2))
    assert k_turn > k[-1]
    expected = [
        brentq(lambda kk, m=m: chi(kk) - np.arcsin(amplitude) + m * np.pi, 0.0, k[-1])
        for m in range(1, len(found) + 1)
    ]
    assert len(found) > 10
    np.testing.assert_allclose(found, expected, atol=0.05 / (nx * pixel_size))


def _isotropic_reference(k: np.ndarray, defocus: float, amplitude: float = 0.07) -> np.ndarray:
    cs, lam = 2.7e7, WAVELENGTH_300KV
    chi = -np.pi * lam * defocus * k**2 + 0.5 * np.pi * cs * lam**3 * k**4 - np.arcsin(amplitude)
    return -np.sin(chi)


@pytest.mark.parametrize("angle", [0.0, 45.0, 90.0])
def test_astigmatism_defocus_u_lies_along_the_angle(angle: float) -> None:
    n, du, dv = 128, 15000.0, 10000.0
    ctf = ctf_2d((n, n), **{**OPTICS, "defocus_u": du, "defocus_v": dv, "astigmatism_angle": angle})
    i = np.arange(1, n // 2)
    k_axis = i / n
    # Directions on the grid that are exactly along and across `angle`.
    rows_cols = {
        0.0: ((np.zeros_like(i), i), (i, np.zeros_like(i))),
        90.0: ((i, np.zeros_like(i)), (np.zeros_like(i), i)),
        45.0: ((i, i), (n - i, i)),  # ky = +kx is 45°, ky = -kx is -45°
    }[angle]
    (along_r, along_c), (across_r, across_c) = rows_cols
    radius = k_axis * (np.sqrt(2) if angle == 45.0 else 1.0)
    np.testing.assert_allclose(
        ctf[0, along_r, along_c], _isotropic_reference(radius, du), atol=2e-5
    )
    np.testing.assert_allclose(
        ctf[0, across_r, across_c], _isotropic_reference(radius, dv), atol=2e-5
    )


def test_relative_defocus_adds_to_both_defoci() -> None:
    optics = {**OPTICS, "defocus_u": 11000.0, "defocus_v": 9000.0, "astigmatism_angle": 25.0}
    stack = ctf_2d((32, 32), **optics, relative_defocus=[-400.0, 300.0])
    shifted = {**optics, "defocus_u": 11300.0, "defocus_v": 9300.0}
    np.testing.assert_allclose(stack[1], ctf_2d((32, 32), **shifted)[0], atol=1e-6)


def test_b_factor_envelope() -> None:
    pixel_size, b_factor = 1.3, 120.0
    optics = {**OPTICS, "pixel_size": pixel_size}
    plain = ctf_2d((64, 64), **optics)[0].astype(np.float64)
    damped = ctf_2d((64, 64), **optics, b_factor=b_factor)[0].astype(np.float64)
    ky, kx = np.meshgrid(np.fft.fftfreq(64), np.fft.rfftfreq(64), indexing="ij")
    k2 = (kx**2 + ky**2) / pixel_size**2
    ok = np.abs(plain) > 0.1
    np.testing.assert_allclose(damped[ok] / plain[ok], np.exp(-b_factor * k2[ok] / 4), rtol=1e-4)


def test_bad_optics_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="amplitude_contrast_ratio"):
        ctf_2d((8, 8), **{**OPTICS, "amplitude_contrast_ratio": 1.5})
    with pytest.raises(ConfigError, match="pixel_size"):
        ctf_2d((8, 8), **{**OPTICS, "pixel_size": 0.0})
    with pytest.raises(ConfigError, match="voltage"):
        electron_wavelength(-300.0)
