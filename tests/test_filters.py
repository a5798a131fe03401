"""Radial power spectrum, whitening and band-pass filters."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft

from dtm.errors import ConfigError, InputError
from dtm.physics import bandpass_filter, radial_power_spectrum, whitening_filter


def _radius(shape: tuple[int, int]) -> np.ndarray:
    ky = np.fft.fftfreq(shape[0])[:, None]
    kx = np.fft.rfftfreq(shape[1])[None, :]
    return np.hypot(ky, kx)


def _profile(k: np.ndarray) -> np.ndarray:
    """A coloured-noise amplitude profile spanning more than a decade."""
    return np.exp(-k / 0.12) + 0.02


def test_radial_power_spectrum_of_a_plane_wave() -> None:
    shape = (64, 80)
    _, x = np.mgrid[: shape[0], : shape[1]]
    image = np.cos(2 * np.pi * 12 * x / shape[1]) + 5.0  # the offset (DC) must not count
    k, power = radial_power_spectrum(image, n_bins=40)
    assert k.shape == power.shape == (40,)
    k_max = np.hypot(0.5, 0.5)
    np.testing.assert_allclose(k, (np.arange(40) + 0.5) * k_max / 40)
    peak = int(np.argmax(power))
    assert abs(k[peak] - 12 / 80) <= k_max / 80  # within half a bin
    # |X|² at the wave's rfft coefficient is (H W / 2)²; its shell averages it with zeros.
    radius = _radius(shape)
    in_shell = (radius >= peak * k_max / 40) & (radius < (peak + 1) * k_max / 40)
    expected = (shape[0] * shape[1] / 2) ** 2 / np.count_nonzero(in_shell)
    assert power[peak] == pytest.approx(expected, rel=1e-5)
    assert np.all(np.delete(power, peak) < 1e-6 * power[peak])


def test_radial_power_spectrum_default_bins_and_white_noise_level() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(128, 96))
    k, power = radial_power_spectrum(image)
    assert k.shape == (64,)
    # White noise of unit variance: E|X(k)|² = H W at every frequency.
    inside = (k > 0.05) & (k < 0.45)
    assert np.mean(power[inside]) == pytest.approx(128 * 96, rel=0.05)


def test_whitening_flattens_coloured_noise() -> None:
    shape = (512, 512)
    rng = np.random.default_rng(1)
    white = rng.normal(size=shape)
    coloured = scipy.fft.irfft2(scipy.fft.rfft2(white) * _profile(_radius(shape)), s=shape)
    k, power = radial_power_spectrum(coloured)
    filt = whitening_filter(k, power, shape)
    assert filt.shape == (512, 257) and filt.dtype == np.float32
    whitened = scipy.fft.irfft2(scipy.fft.rfft2(coloured) * filt, s=shape)
    k_check, power_check = radial_power_spectrum(whitened, n_bins=32)
    band = (k_check >= 0.05) & (k_check <= 0.45)
    flatness = power_check[band] / np.mean(power_check[band])
    assert np.all(np.abs(flatness - 1) < 0.10), flatness
    # The unwhitened spectrum is far from flat over the same band (the test has teeth).
    _, power_before = radial_power_spectrum(coloured, n_bins=32)
    assert power_before[band].max() / power_before[band].min() > 100


def test_whitening_filter_on_template_grid_follows_inverse_amplitude() -> None:
    k = np.linspace(0, np.hypot(0.5, 0.5), 200)
    power = _profile(k) ** 2
    shape = (48, 48)
    filt = whitening_filter(k, power, shape, max_freq=0.4).astype(np.float64)
    radius = _radius(shape)
    inside = radius <= 0.4
    expected = 1 / _profile(radius)
    expected /= expected[inside].max()
    np.testing.assert_allclose(filt[inside], expected[inside], rtol=2e-3)
    assert filt[inside].max() == pytest.approx(1.0)
    # Above max_freq the filter keeps its value at max_freq (continuous, no jump to 1).
    at_edge = (1 / _profile(np.array([0.4])))[0] / (1 / _profile(radius))[inside].max()
    np.testing.assert_allclose(filt[~inside], at_edge, rtol=2e-3)


def test_whitening_ignores_empty_shells_and_rejects_blank_spectra() -> None:
    k = np.array([0.1, 0.2, 0.3, 0.4])
    filt = whitening_filter(k, np.array([4.0, 0.0, 1.0, 1.0]), (16, 16))
    assert np.all(np.isfinite(filt))
    with pytest.raises(InputError, match="zero everywhere"):
        whitening_filter(k, np.zeros(4), (16, 16))


def test_bandpass_values_at_and_around_cutoffs() -> None:
    shape, pixel_size, falloff = (200, 200), 1.5, 0.04
    filt = bandpass_filter(
        shape, pixel_size=pixel_size, low_resolution=30.0, high_resolution=5.0, falloff=falloff
    )
    assert filt.shape == (200, 101) and filt.dtype == np.float32
    assert filt.min() >= 0 and filt.max() <= 1
    k_low, k_high = pixel_size / 30.0, pixel_size / 5.0  # 0.05 and 0.3 cycles/pixel

    def along_x(frequency: float) -> float:
        """Filter value at (ky=0, kx=frequency), interpolated along the kx axis."""
        kx = np.fft.rfftfreq(shape[1])
        return float(np.interp(frequency, kx, filt[0]))

    assert along_x(k_low) == pytest.approx(0.5, abs=0.02)
    assert along_x(k_high) == pytest.approx(0.5, abs=0.02)
    radius = _radius(shape)
    np.testing.assert_array_equal(filt[radius <= k_low - falloff / 2], 0.0)
    np.testing.assert_array_equal(filt[radius >= k_high + falloff / 2], 0.0)
    np.testing.assert_array_equal(
        filt[(radius >= k_low + falloff / 2) & (radius <= k_high - falloff / 2)], 1.0
    )


def test_bandpass_hard_edges_and_open_ends() -> None:
    shape = (64, 64)
    radius = _radius(shape)
    hard = bandpass_filter(shape, pixel_size=1.0, high_resolution=4.0, falloff=0.0)
    np.testing.assert_array_equal(hard, (radius <= 0.25).astype(np.float32))
    np.testing.assert_array_equal(bandpass_filter(shape, pixel_size=1.0), 1.0)
    high_pass = bandpass_filter(shape, pixel_size=1.0, low_resolution=10.0)
    assert high_pass[0, 0] == 0.0 and high_pass[0, -1] == 1.0


def test_bandpass_rejects_inverted_band() -> None:
    with pytest.raises(ConfigError, match="high_resolution"):
        bandpass_filter((8, 8), pixel_size=1.0, low_resolution=3.0, high_resolution=50.0)
    with pytest.raises(ConfigError, match="pixel_size"):
        bandpass_filter((8, 8), pixel_size=-1.0)
